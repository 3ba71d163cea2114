"""The CLI as a user's shell runs it (a subprocess): what `validate` and `plan` say, the
messages mistakes get, and the first-run surface — messages and exit codes asserted."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import prefixbatch

ROOT = Path(__file__).parents[2]


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prefixbatch", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": str(cwd)})


@pytest.fixture
def job(tmp_path: Path, tiny_llama: Path) -> Path:
    pq.write_table(pa.table({
        "id": ["ok", "empty", "null", "hot", "long"],
        "prompt": ["Tell me about trains.", "  ", None, "hi", "x " * 1500],
        "temperature": [None, None, None, -1.0, None],
        "max_tokens": [4, None, None, None, None],
    }), tmp_path / "in.parquet")
    spec = {"name": "cli", "input": {"path": "in.parquet", "prompt_column": "prompt"}, "output": {"path": "out"},
            "model": {"path": str(tiny_llama)}, "sampling": {"max_tokens": 1000}}
    path = tmp_path / "job.json"
    path.write_text(json.dumps(spec))
    return path


def test_validate_says_what_run_would_do(job: Path) -> None:
    result = cli("validate", str(job), "--errors", "errors.jsonl", cwd=job.parent)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "5 rows, 2 to generate, 3 would be error rows; device cpu (auto)" in out
    assert "1 error row(s) empty_prompt: ids 'empty'" in out and "1 error row(s) null_prompt: ids 'null'" in out
    assert "1 error row(s) invalid_sampling: ids 'hot'" in out
    assert "per-row sampling from input columns: max_tokens, temperature (non-null values override the spec)" in out
    assert "1 row(s) get max_tokens clamped to fit the model's context" in out  # 1,000 after a 1,500-token prompt
    errors = [json.loads(line) for line in (job.parent / "errors.jsonl").read_text().splitlines()]
    assert sorted(e["id"] for e in errors) == ["empty", "hot", "null"]
    truncated = cli("validate", str(job), "--set", "input.truncate=left", cwd=job.parent)
    assert truncated.returncode == 0 and "1 row(s) get their prompt truncated (input.truncate)" in truncated.stdout
    assert not (job.parent / "out").exists()


def test_a_missing_device_is_refused_before_anything_is_written(job: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    for verb in ("validate", "run"):
        result = cli(verb, str(job), "--set", "executor.device=cuda", cwd=job.parent)
        assert result.returncode == 2 and "executor.device is 'cuda' but no CUDA device is visible" in result.stderr
        assert "Traceback" not in result.stderr
    assert not (job.parent / "out").exists()  # so the corrected run needs no --resume
    assert cli("run", str(job), "--no-progress", cwd=job.parent).returncode == 0


def test_mistakes_get_one_helpful_message(job: Path) -> None:
    spec = json.loads(job.read_text())
    spec["input"]["prompt_column"] = "promt"
    job.write_text(json.dumps(spec))
    result = cli("validate", str(job), cwd=job.parent)
    assert result.returncode == 2
    assert "has no column 'promt' (did you mean 'prompt'? columns: id, prompt, temperature, max_tokens)" in result.stderr
    assert "ignore_corrupt_files" not in result.stderr  # the file is fine: skipping it would lose its rows
    spec["input"]["prompt_column"] = "prompt"
    job.write_text(json.dumps(spec))
    result = cli("validate", str(job), "--set", "sampling.min_tokens=5000", cwd=job.parent)
    assert result.returncode == 2
    assert "sampling: min_tokens (5000) must not exceed max_tokens (1000) [from --set sampling.min_tokens=5000]" in result.stderr
    assert "{" not in result.stderr and "Traceback" not in result.stderr  # no spec dump
    debug = cli("validate", str(job), "--set", "sampling.min_tokens=5000", "--debug", cwd=job.parent)
    assert debug.returncode == 2 and "Traceback" in debug.stderr
    result = cli("validate", str(job), "--set", "sampling.temprature=1", cwd=job.parent)
    assert result.returncode == 2 and "unknown field (did you mean 'temperature'?)" in result.stderr
    assert "[from --set sampling.temprature=1]" in result.stderr


def test_the_first_run_surface(tmp_path: Path) -> None:
    version = cli("--version", cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.strip() == f"prefixbatch {prefixbatch.__version__}"
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(([^)]+)\)", readme)
    for link in links:
        assert not link.startswith(("../", "/")), link  # nothing outside the repository
        if not link.startswith(("http://", "https://", "#")):
            assert (ROOT / link.split("#")[0]).exists(), link
    makefile = (ROOT / "Makefile").read_text()
    assert "\ntest-fast:" in makefile and "make test-fast" in readme and "source .venv/bin/activate" in readme
    assert 'pl.read_parquet("out/*.parquet")' in readme and "not in input order" in readme


def test_plan_estimates_time_from_a_calibration_and_says_how(job: Path) -> None:
    result = cli("plan", str(job), "--estimate", cwd=job.parent)
    assert result.returncode == 0, result.stderr
    assert re.search(r"Estimate: up to \d+ s — model load \d+ s, prefill ~\d+ s at [\d,]+ tok/s, decode up to \d+ s",
                     result.stdout), result.stdout
    assert "How: calibrated on this machine: the first 2 requests of the plan" in result.stdout
    as_json = json.loads(cli("plan", str(job), "--estimate", "--json", cwd=job.parent).stdout)
    estimate = as_json["estimate"]
    assert estimate["prefill_tokens_per_s"] > 0 and estimate["decode_tokens_per_s"] > 0
    # each figure is rounded to 0.1 s on its own: the parts may pass the total by that much
    assert estimate["total_s_at_most"] >= estimate["prefill_s"] + estimate["decode_s_at_most"] - 0.2
    assert not (job.parent / "out").exists()
