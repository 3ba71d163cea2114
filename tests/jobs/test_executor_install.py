"""An executor whose package is not installed: one message saying how to install it, at
`validate` and before `run` writes anything (vLLM hidden from the import system)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from prefixbatch.jobs.cli import main


def test_without_vllm_installed_validate_says_how_to_install_it(tiny_llama, tmp_path, monkeypatch, capsys):
    pq.write_table(pa.table({"p": ["hello"]}), tmp_path / "in.parquet")
    spec = tmp_path / "job.yaml"
    spec.write_text(f"name: x\ninput: {{path: in.parquet, prompt_column: p}}\noutput: {{path: out}}\n"
                    f"model: {{path: {tiny_llama}}}\nexecutor: {{kind: vllm}}\n")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    for command in ("validate", "run"):
        assert main([command, str(spec)]) == 2
        err = capsys.readouterr().err
        assert "executor.kind is 'vllm' but vLLM is not installed" in err and "make install-vllm" in err
        assert "Traceback" not in err
    assert not (tmp_path / "out").exists()  # nothing written


def test_make_test_fails_rather_than_skips_when_vllm_breaks(tmp_path):
    # A vLLM whose import raises, ahead of the installed one on the path.
    (tmp_path / "vllm").mkdir()
    (tmp_path / "vllm" / "__init__.py").write_text("raise ImportError('broken vllm, planted by the test')\n")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{root}", "PREFIXBATCH_REQUIRE_VLLM": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/executors/test_vllm.py"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=root)
    assert result.returncode != 0
    assert "broken vllm, planted by the test" in result.stdout and "make install-vllm" in result.stdout
    assert "skipped" not in result.stdout.splitlines()[-1]
