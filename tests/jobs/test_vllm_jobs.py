"""Whole jobs with `executor.kind: vllm`: the pipeline around vLLM's engine.

Per-row overrides (max_tokens, temperature, n), error rows, stop strings and `n > 1` on the
resume tests' 48-row chat job: greedy rows equal the native executor's run of the same job
token for token, sampled rows come back with every sample, error rows are the same. A run
SIGKILLed at several points and resumed ends with exactly the uninterrupted vLLM output, and
a 2-worker Dask run (one engine per worker) gives the local output.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from prefixbatch.jobs.cli import main
from prefixbatch.jobs.run import run_job
from prefixbatch.jobs.spec import spec_from_dict
from tests.jobs.test_resume import by_key, expected_keys, kill_and_resume, write_input, write_spec
from tests.output_helpers import finished_output, without_cached
from tests.vllm_import import import_vllm

import_vllm()

VLLM = {"kind": "vllm", "device": "cpu", "vllm": {"cpu_kv_cache_gib": 1, "cpu_threads_bind": "nobind"}}
STOP = ["e "]  # ends many rows of the random model's text early


def vllm_spec(path, model, inputs, output: str, **executor):
    spec_path = write_spec(path, model, inputs, output)
    spec = json.loads(spec_path.read_text())
    spec["executor"] = {**VLLM, **executor}
    spec["sampling"]["stop"] = STOP
    spec_path.write_text(json.dumps(spec))
    return spec_path


def run_cli(spec) -> None:
    """`prefixbatch run` in a process of its own, as a user runs it. (vLLM's CPU start-up walks
    every imported module's globals and trips over Flask's context proxies, which the S3
    tests' moto server brings into this process.)"""
    command = [sys.executable, "-m", "prefixbatch", "run", str(spec), "--no-progress"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def vllm_job(tmp_path_factory, tiny_llama):
    """The input, and the uninterrupted vLLM output and native output of the same job."""
    folder = tmp_path_factory.mktemp("vllm-job")
    inputs = write_input(folder / "in")
    spec = vllm_spec(folder / "vllm.json", tiny_llama, folder / "in", str(folder / "vllm"))
    run_cli(spec)
    native_spec = vllm_spec(folder / "native.json", tiny_llama, folder / "in", str(folder / "native"))
    raw = json.loads(native_spec.read_text())
    raw["executor"] = {"kind": "native", "device": "cpu"}
    native_spec.write_text(json.dumps(raw))
    assert main(["run", str(native_spec), "--no-progress"]) == 0
    return folder, inputs, by_key(finished_output(str(folder / "vllm"))), by_key(finished_output(str(folder / "native")))


def test_a_vllm_job_equals_the_native_job_on_greedy_rows(vllm_job):
    folder, inputs, got, native = vllm_job
    assert set(got) == set(native) == expected_keys(inputs)
    sampled = {(r["id"], k) for r in inputs if r["temperature"] for k in range(r["n"] or 1)}
    fields = ("output_token_ids", "output_text", "finish_reason", "error", "num_prompt_tokens")
    for key in set(native) - sampled:
        assert {f: got[key][f] for f in fields} == {f: native[key][f] for f in fields}, key
    for key in sampled:  # n = 2 with their own seeds: each sample there, generated
        assert got[key]["finish_reason"] in ("stop", "length") and got[key]["error"] is None
    reasons = {r["finish_reason"] for r in got.values()}
    assert reasons >= {"stop", "length", "error"}  # stop strings, max_tokens overrides, error rows
    assert any(got[k]["output_text"] != "" and got[k]["finish_reason"] == "stop" for k in got)
    summary = json.loads((folder / "vllm" / "_summary.json").read_text())
    assert summary["executor"] == "vllm"
    assert summary["plan"]["kv_budget_tokens"] == 2**30 // 2048  # the engine's real cache


def test_sigkill_then_resume_with_vllm_gives_the_uninterrupted_output(vllm_job, tiny_llama, tmp_path):
    folder, inputs, reference, _ = vllm_job
    url = str(tmp_path / "out")
    spec = vllm_spec(tmp_path / "job.json", tiny_llama, folder / "in", url)
    kills = ["planned", "decode:3", "committed:1", "manifest"]
    kill_and_resume(spec, url, kills, reference, inputs, None, lambda: (tmp_path / "out" / "_SUCCESS").exists())


def test_two_dask_workers_run_vllm_and_give_the_local_output(vllm_job, tmp_path):
    folder, _, reference, _ = vllm_job
    raw = json.loads((folder / "vllm.json").read_text())
    raw["output"]["path"] = str(tmp_path / "out")
    raw["cluster"] = {"kind": "dask", "local_workers": 2, "threads_per_worker": 1, "shards_per_worker": 2}
    summary = run_job(spec_from_dict(raw, base_dir=folder, source="test"), live_progress=False, log=lambda _: None)
    got = by_key(finished_output(str(tmp_path / "out")))
    assert without_cached(got) == without_cached(reference)
    assert len({s["pid"] for s in summary.shards}) == 2  # both workers ran an engine
