"""The Makefile's clean targets, run for real on a copy: `make clean` never deletes the demo
folder a user may have edited (its job.yaml pointed at a real model); `make clean-demo` does."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def test_make_clean_leaves_the_demo_folder_byte_for_byte(tmp_path):
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    (tmp_path / "demo" / "model").mkdir(parents=True)
    edited = {"demo/job.yaml": b"model:\n  path: /models/my-real-checkpoint\n", "demo/model/config.json": b"{}"}
    for name, data in edited.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / ".venv").mkdir()
    (tmp_path / ".venv" / "pyvenv.cfg").write_text("home = x\n")

    subprocess.run(["make", "-s", "clean"], cwd=tmp_path, check=True, capture_output=True, timeout=60)
    assert not (tmp_path / ".venv").exists()
    assert {name: (tmp_path / name).read_bytes() for name in edited} == edited

    subprocess.run(["make", "-s", "clean-demo"], cwd=tmp_path, check=True, capture_output=True, timeout=60)
    assert not (tmp_path / "demo").exists()
