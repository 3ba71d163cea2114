"""Stopping a real `prefixbatch run` with SIGINT / SIGTERM, and watching it work.

A one-group job whose rows all finish near the end (long `max_tokens`): the run is signalled
while it decodes (seen from its progress lines), must exit within 10 s with 130 / 143, say
how many rows are committed and print the command that finishes it; that command finishes
the job with the rows an uninterrupted run gives. The progress lines of such a job show
prefill and output tokens rising before any row is finished.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.output_helpers import finished_output, without_cached

PROGRESS = re.compile(
    r"generating: (\d+)/(\d+) rows, prefill ([\d,]+)/([\d,]+) tokens, (\d+) output tokens"
)


def write_job(folder: Path, model: Path, output: str = "out") -> Path:
    prompts = [f"Story {i}: once upon a time there was a lighthouse keeper named {i}." for i in range(6)]
    rows = {"id": [f"s{i}" for i in range(6)] + ["bad"], "prompt": prompts + [None]}
    pq.write_table(pa.table(rows, schema=pa.schema([("id", pa.string()), ("prompt", pa.string())])), folder / "in.parquet")
    spec = {
        "name": "stop-test",
        "input": {"path": "in.parquet", "prompt_column": "prompt"},
        "output": {"path": output, "rows_per_part": 2},
        "model": {"path": str(model)},
        # one group; every row runs the whole 2,000 tokens (min_tokens: an end-of-sequence token
        # the random model happens to pick cannot finish a row early), in 8-token steps. Long
        # enough that decoding outlasts the first progress report (every 0.5 s) on a fast engine.
        "sampling": {"max_tokens": 2000, "min_tokens": 2000},
        "executor": {"kind": "native", "device": "cpu", "native": {"max_step_tokens": 8}},
    }
    (folder / "job.json").write_text(json.dumps(spec))
    return folder / "job.json"


def start(spec: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PREFIXBATCH_FAULT", None)
    command = [sys.executable, "-m", "prefixbatch", "run", str(spec), "--no-progress", "--log-every", "0.2", *extra]
    return subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)


def wait_for_decode(process: subprocess.Popen) -> list[str]:
    """Progress lines until one shows output tokens with no row finished (mid-decode)."""
    lines = []
    for line in process.stderr:
        lines.append(line)
        match = PROGRESS.search(line)
        if match and int(match.group(5)) > 0:  # decoding
            assert int(match.group(1)) <= 1  # at most the error row is done: every row is in flight
            if int(match.group(5)) >= 20:  # a few steps into decoding
                return lines
    raise AssertionError("the run ended before decoding was seen:\n" + "".join(lines))


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_mid_decode_stops_within_seconds_and_says_how_to_resume(tmp_path, tiny_llama, signum, code):
    spec = write_job(tmp_path, tiny_llama)
    process = start(spec)
    wait_for_decode(process)
    signalled = time.monotonic()
    process.send_signal(signum)
    rest = process.stderr.read()
    assert process.wait(timeout=10) == code
    assert time.monotonic() - signalled < 10
    name = signal.Signals(signum).name
    assert f"{name}: stopping" in rest
    assert f"stopped (stop requested): 1 of 7 input rows are committed in {tmp_path / 'out'}" in rest
    command = rest.strip().splitlines()[-1].strip()
    assert command == f"prefixbatch run {spec} --no-progress --resume"
    assert "Traceback" not in rest

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = shlex.split(command)
    resumed = subprocess.run([sys.executable, "-m", "prefixbatch", *args[1:]], env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming: 1 input rows were committed before" in resumed.stderr

    other = write_job(tmp_path, tiny_llama, output="uninterrupted")
    whole = subprocess.run([sys.executable, "-m", "prefixbatch", "run", str(other), "--no-progress"], env=env,
                           capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr
    # The stop checkpointed every generation in flight: the resumed run continues them all and
    # recomputes no decode token of an uninterrupted run (it loses no work at all).
    after = json.loads((tmp_path / "out" / "_summary.json").read_text())
    before = json.loads((tmp_path / "uninterrupted" / "_summary.json").read_text())
    assert after["rows_resumed_mid_generation"] == 6 and after["tokens_reused_from_checkpoints"] >= 20
    assert after["decode_tokens_computed"] <= before["decode_tokens_computed"] - after["tokens_reused_from_checkpoints"]
    got = without_cached({(r["id"], r["sample_index"]): r for r in finished_output(str(tmp_path / "out"))})
    want = without_cached({(r["id"], r["sample_index"]): r for r in finished_output(str(tmp_path / "uninterrupted"))})
    assert got == want and len(got) == 7


def test_a_second_ctrl_c_stops_at_once(tmp_path, tiny_llama):
    spec = write_job(tmp_path, tiny_llama)
    process = start(spec)
    wait_for_decode(process)
    process.send_signal(signal.SIGINT)
    process.send_signal(signal.SIGINT)
    rest = process.stderr.read()
    assert process.wait(timeout=10) == 130
    assert "Traceback" not in rest and "--resume" in rest


def test_progress_without_a_terminal_shows_prefill_and_output_tokens_before_any_row_finishes(tmp_path, tiny_llama):
    spec = write_job(tmp_path, tiny_llama)
    process = start(spec)
    lines = wait_for_decode(process)
    process.send_signal(signal.SIGTERM)
    process.stderr.read()
    process.wait(timeout=10)
    seen = [tuple(int(g.replace(",", "")) for g in m.groups()) for m in map(PROGRESS.search, lines) if m]
    assert seen[0][0] == 0 and seen[0][2] == 0  # the first line comes before any work
    rows, total, prefill, prefill_total, output = zip(*seen)
    assert set(rows) <= {0, 1} and set(total) == {7}  # no generated row finished meanwhile
    assert max(prefill) == prefill_total[0] > 0 and output[-1] > 0  # prefill done, decode under way
    assert list(prefill) == sorted(prefill) and list(output) == sorted(output)  # they only rise
