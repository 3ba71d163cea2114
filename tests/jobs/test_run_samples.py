"""`prefixbatch run` with `n` samples per prompt, end to end on a real tiny model and real Parquet.

A row with n = k gives k output rows (`sample_index` 0..k-1) and every (id, sample_index)
appears exactly once. Greedy samples of one prompt are identical, to each other and to the
n = 1 run of that prompt; sampled ones differ from each other and are the same in every run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from prefixbatch.jobs.cli import main
from prefixbatch.pipeline.commits import read_committed
from tests.output_helpers import finished_output

GREEDY = "Tell me about the blue train and its driver."
SAMPLED = "Write one line about the sea at night."

# id, prompt, n (None: the spec's default, 1), temperature (None: the spec's 0.0), seed
ROWS = [
    ("g3", GREEDY, 3, None, None),
    ("g1", GREEDY, None, None, None),  # the n = 1 run of g3's prompt
    ("s3", SAMPLED, 3, 0.9, 42),
    ("s1", SAMPLED, 1, 0.9, 42),  # the same seed: s3's sample 0
    ("other", "A short question about bread?", 2, None, None),
    ("bad", None, 3, None, None),  # an error row: one row, sample_index 0
]
NUM_OUTPUT_ROWS = 3 + 1 + 3 + 1 + 2 + 1


def write_job(folder: Path, model: Path) -> Path:
    ids, prompts, ns, temperatures, seeds = zip(*ROWS)
    table = pa.table({
        "id": pa.array(ids),
        "prompt": pa.array(prompts, pa.string()),
        "n": pa.array(ns, pa.int32()),
        "temperature": pa.array(temperatures, pa.float64()),
        "seed": pa.array(seeds, pa.int64()),
        "topic": pa.array([f"t-{i}" for i in ids]),
    })
    pq.write_table(table, folder / "in.parquet", row_group_size=4)
    spec = {
        "name": "samples",
        "input": {"path": "in.parquet", "prompt_column": "prompt", "carry_columns": ["topic"]},
        "output": {"path": "out", "rows_per_part": 4},
        "model": {"path": str(model)},
        "sampling": {"max_tokens": 10, "seed": 3},
        "executor": {"kind": "hf", "hf": {"max_batch_size": 3}},
    }
    path = folder / "job.json"
    path.write_text(json.dumps(spec))
    return path


def read_rows(folder: Path) -> tuple[pa.Schema, dict[tuple[str, int], dict]]:
    finished_output(str(folder))
    table = read_committed(str(folder))
    rows = table.to_pylist()
    by_key = {(r["id"], r["sample_index"]): r for r in rows}
    assert len(by_key) == len(rows)  # every (id, sample_index) exactly once
    return table.schema, by_key


def test_n_samples_per_row(tmp_path, tiny_llama):
    spec = write_job(tmp_path, tiny_llama)
    assert main(["run", str(spec), "--no-progress"]) == 0
    schema, rows = read_rows(tmp_path / "out")
    assert schema.names[:4] == ["id", "topic", "sample_index", "output_text"]
    assert schema.field("sample_index").type == pa.int32()
    assert len(rows) == NUM_OUTPUT_ROWS
    assert sorted(rows) == sorted(
        [("g3", 0), ("g3", 1), ("g3", 2), ("g1", 0), ("s3", 0), ("s3", 1), ("s3", 2), ("s1", 0)]
        + [("other", 0), ("other", 1), ("bad", 0)]
    )
    assert all(r["topic"] == f"t-{r['id']}" for r in rows.values())  # carried onto every sample
    assert rows["bad", 0]["error"].startswith("null_prompt: ")
    assert rows["bad", 0]["finish_reason"] == "error"

    def ids(row_id: str, n: int) -> list[list[int]]:
        return [rows[row_id, k]["output_token_ids"] for k in range(n)]

    greedy = ids("g3", 3)
    assert greedy[0]  # a real completion, not an empty one
    assert greedy == [rows["g1", 0]["output_token_ids"]] * 3
    assert ids("other", 2)[0] == ids("other", 2)[1]
    sampled = ids("s3", 3)
    assert len({tuple(s) for s in sampled}) == 3  # each sample has its own seed
    assert sampled[0] == rows["s1", 0]["output_token_ids"]  # sample 0 keeps the row's seed

    summary = json.loads((tmp_path / "out" / "_summary.json").read_text())
    assert summary["input_rows"] == len(ROWS) and summary["rows"] == NUM_OUTPUT_ROWS
    assert summary["error_rows"] == 1 and summary["errors_by_code"] == {"null_prompt": 1}

    # Seeds depend on the job seed, the row and the sample only: a second run gives the same rows.
    assert main(["run", str(spec), "--no-progress", "--set", "output.path=again"]) == 0
    _, again = read_rows(tmp_path / "again")
    assert again == rows


def test_plan_counts_samples_as_requests(tmp_path, tiny_llama, capsys):
    spec = write_job(tmp_path, tiny_llama)
    assert main(["plan", str(spec), "--json", "--set", "executor.kind=native"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rows"] == len(ROWS) and report["requests"] == NUM_OUTPUT_ROWS - 1
    assert report["error_rows"] == 1
    # g3's 3 samples and g1 are one prompt: the tree holds it once.
    assert report["prefill_tokens"]["with_sharing"] < report["prefill_tokens"]["without_sharing"]
    assert report["top_prefixes"][0]["requests"] == 4
    # The job's own executor, hf, cannot share: its plan prefills every prompt in full.
    assert main(["plan", str(spec), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["plan"]["prefix_sharing"] is False
    assert report["prefill_tokens"]["with_sharing"] == report["prefill_tokens"]["without_sharing"]
