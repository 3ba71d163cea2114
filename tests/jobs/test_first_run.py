"""A new user's first minutes: `--version`, and `demo` ending with a command that works as shown."""

from __future__ import annotations

import shlex
import subprocess
import sys

import pytest

import prefixbatch
from prefixbatch.jobs.cli import main


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"prefixbatch {prefixbatch.__version__}"


def test_the_demo_says_its_model_is_random_and_prints_a_command_that_works(tmp_path) -> None:
    demo = subprocess.run([sys.executable, "-m", "prefixbatch", "demo", str(tmp_path / "demo")], capture_output=True,
                          text=True, env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)},
                          timeout=600)
    assert demo.returncode == 0, demo.stderr[-2000:]
    lines = demo.stderr.splitlines()
    assert any("random weights" in line and "gibberish on purpose" in line for line in lines)
    command = next(line for line in lines if line.startswith("run it yourself:")).split(":", 1)[1].strip()
    # Run exactly as printed, from a shell without the venv activated (no PATH to it).
    result = subprocess.run(command + " --no-progress", shell=True, capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "done: 300 rows" in result.stderr
    assert shlex.split(command)[1:3] == ["run", str(tmp_path / "demo" / "job.yaml")]


def test_a_second_demo_run_keeps_the_users_edits(tmp_path) -> None:
    from prefixbatch.jobs.demo import run_demo

    lines: list[str] = []
    run_demo(tmp_path / "demo", log=lines.append)
    spec = tmp_path / "demo" / "job.yaml"
    edited = spec.read_text().replace("max_tokens: 24", "max_tokens: 3")
    spec.write_text(edited)
    lines.clear()
    run_demo(tmp_path / "demo", log=lines.append)
    assert spec.read_text() == edited and any(line.startswith(f"kept {spec}") for line in lines)
    assert any("300 rows" in line and "output:" in line for line in lines)
