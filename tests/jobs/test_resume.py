"""Kill the CLI with SIGKILL across a run, resume, and get exactly the output of a run that never stopped.

Each kill is a real `prefixbatch run --resume` process that SIGKILLs itself at a named
fault point (`prefixbatch.faults`): after tokenizing, after planning, mid-prefill,
mid-decode, after a part is written but before its commit, right after a commit, inside
a file write, after the manifest. The same folder is resumed after every kill. After each
kill: the committed rows are read through the commit records (every committed file opens),
each (id, sample) is there at most once, and rows committed earlier are unchanged. At the
end: every input row is there exactly once and the rows equal an uninterrupted run's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prefixbatch.jobs.cli import main
from prefixbatch.pipeline.commits import read_committed
from tests.jobs.test_run import conversation
from tests.output_helpers import finished_output, without_cached

NUM_ROWS = 48
LOCAL_KILLS = [
    "tokenized", "planned", "prefill:2", "decode:3", "part_written:1",
    "committed:1", "write:4", "decode:12", "committed:2", "manifest",
]
S3_KILLS = ["prefill:1", "part_written:2", "committed:2", "manifest"]


def write_input(folder: Path) -> list[dict]:
    rows = []
    for i in range(NUM_ROWS):
        rows.append({
            "id": f"r{i:03d}",
            "messages": None if i % 17 == 5 else conversation(i),  # a few error rows
            "max_tokens": 4 + i % 7,
            "temperature": 0.8 if i % 9 == 0 else None,  # some sampled rows, with n = 2
            "n": 2 if i % 9 == 0 else None,
        })
    messages_type = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    schema = pa.schema([("id", pa.string()), ("messages", messages_type), ("max_tokens", pa.int64()),
                        ("temperature", pa.float64()), ("n", pa.int64())])
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(2):
        pq.write_table(pa.Table.from_pylist(rows[k * 24:(k + 1) * 24], schema=schema), folder / f"in-{k}.parquet")
    return rows


def write_spec(path: Path, model: Path, inputs: Path, output: str, storage_options: dict | None = None) -> Path:
    spec = {
        "name": "resume-test",
        "input": {"path": str(inputs / "*.parquet"), "messages_column": "messages"},
        "output": {"path": output, "rows_per_part": 5, "storage_options": storage_options or {}},
        "model": {"path": str(model)},
        "sampling": {"max_tokens": 6},
        # Small budgets: several groups one after another, prefill in chunks of 24 tokens.
        "executor": {"kind": "native", "kv_budget_tokens": 400, "native": {"max_step_tokens": 24}},
    }
    path.write_text(json.dumps(spec))
    return path


def run_cli(spec: Path, fault: str | None, fault_signal: str = "KILL") -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PREFIXBATCH_FAULT_SIGNAL": fault_signal}
    env.pop("PREFIXBATCH_FAULT", None)
    if fault:
        env["PREFIXBATCH_FAULT"] = fault
    command = [sys.executable, "-m", "prefixbatch", "run", str(spec), "--resume", "--no-progress"]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def by_key(rows: list[dict]) -> dict[tuple[str, int], dict]:
    keyed = {(r["id"], r["sample_index"]): r for r in rows}
    assert len(keyed) == len(rows), "an (id, sample_index) committed twice"
    return keyed



def expected_keys(rows: list[dict]) -> set[tuple[str, int]]:
    return {(r["id"], k) for r in rows for k in range(r["n"] or 1 if r["messages"] is not None else 1)}


def kill_and_resume(spec: Path, url: str, kills: list[str], reference: dict, inputs: list[dict],
                    storage_options: dict | None, success_exists) -> None:
    seen: dict[tuple[str, int], dict] = {}
    for fault in kills:
        result = run_cli(spec, fault)
        assert result.returncode == -signal.SIGKILL, (fault, result.returncode, result.stderr[-2000:])
        committed = by_key(read_committed(url, storage_options=storage_options).to_pylist())
        assert set(committed) <= expected_keys(inputs)
        for key, row in seen.items():  # committed before this kill: unchanged
            assert committed[key] == row, (fault, key)
        seen.update(committed)
        assert not success_exists(), fault
    result = run_cli(spec, None)
    assert result.returncode == 0, result.stderr[-2000:]
    final = by_key(finished_output(url, storage_options))
    assert set(final) == expected_keys(inputs)
    assert all(final[key] == row for key, row in seen.items())
    # Every column equal, but for how many prompt tokens reused KV computed for another
    # request: a resumed run plans only the missing rows, so it shares with fewer of them.
    assert without_cached(final) == without_cached(reference)


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_llama):
    """The input, and the output of a run that never stopped (in process)."""
    folder = tmp_path_factory.mktemp("resume")
    inputs = write_input(folder / "in")
    spec = write_spec(folder / "reference.json", tiny_llama, folder / "in", str(folder / "reference"))
    assert main(["run", str(spec), "--no-progress"]) == 0
    reference = by_key(finished_output(str(folder / "reference")))
    assert {r["finish_reason"] for r in reference.values()} >= {"error", "length"}
    return folder, inputs, reference


def test_sigkill_anywhere_then_resume_gives_the_uninterrupted_output(job, tiny_llama, tmp_path):
    folder, inputs, reference = job
    url = str(tmp_path / "out")
    spec = write_spec(tmp_path / "job.json", tiny_llama, folder / "in", url)
    kill_and_resume(spec, url, LOCAL_KILLS, reference, inputs, None, lambda: (tmp_path / "out" / "_SUCCESS").exists())
    summary = json.loads((tmp_path / "out" / "_summary.json").read_text())
    assert summary["rows"] == len(reference) and summary["input_rows"] == NUM_ROWS
    assert summary["resumed_rows"] > 0


def test_sigkill_then_resume_on_s3(job, tiny_llama, tmp_path, s3_server):
    folder, inputs, reference = job
    bucket = s3_server.create_bucket()
    url = f"s3://{bucket}/out"
    options = s3_server.storage_options
    spec = write_spec(tmp_path / "job.json", tiny_llama, folder / "in", url, options)
    fs = s3_server.filesystem()

    def success_exists() -> bool:
        fs.invalidate_cache()
        return fs.exists(f"{bucket}/out/_SUCCESS")

    kill_and_resume(spec, url, S3_KILLS, reference, inputs, options, success_exists)


def test_resume_of_a_finished_job_loads_no_model_and_changes_nothing(job, tiny_llama, tmp_path):
    folder, _, reference = job
    url = str(tmp_path / "out")
    spec = write_spec(tmp_path / "job.json", tiny_llama, folder / "in", url)
    assert main(["run", str(spec), "--no-progress"]) == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").glob("part-*.parquet")}
    assert main(["run", str(spec), "--resume", "--no-progress"]) == 0
    after = {p.name: p.read_bytes() for p in (tmp_path / "out").glob("part-*.parquet")}
    assert before == after and by_key(finished_output(url)) == reference  # cached counts too: one run
    summary = json.loads((tmp_path / "out" / "_summary.json").read_text())
    assert summary["executor"] == "none" and summary["resumed_rows"] == NUM_ROWS


def test_resume_refuses_output_of_a_different_job(job, tiny_llama, tmp_path, capsys):
    folder, _, _ = job
    url = str(tmp_path / "out")
    spec = write_spec(tmp_path / "job.json", tiny_llama, folder / "in", url)
    assert main(["run", str(spec), "--no-progress"]) == 0
    capsys.readouterr()
    code = main(["run", str(spec), "--resume", "--set", "sampling.max_tokens=7", "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"output folder {url} holds the output of a different job" in err
    assert "sampling.max_tokens was 6, now 7" in err and "--overwrite" in err
    assert main(["run", str(spec), "--overwrite", "--set", "sampling.max_tokens=7", "--no-progress"]) == 0
