"""CSV and JSON Lines inputs: the same column checks, messages and outputs as Parquet."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.csv  # noqa: F401  (pa.csv)
import pyarrow.parquet as pq

from prefixbatch.jobs.cli import main
from tests.output_helpers import finished_output


def run(tmp_path: Path, model: Path, path: str, **input_spec) -> int:
    spec = {"name": "text", "input": {"path": path, **input_spec}, "output": {"path": "out"},
            "model": {"path": str(model)}, "sampling": {"max_tokens": 3}}
    (tmp_path / "job.json").write_text(json.dumps(spec))
    return main(["run", str(tmp_path / "job.json"), "--no-progress"])


def test_csv_with_a_per_row_override_and_a_parquet_file_beside_it(tmp_path: Path, tiny_llama: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.csv").write_text('id,prompt,max_tokens\n1,"Hello, there",2\n2,"Two\nlines",\n')
    pq.write_table(pa.table({"id": [3], "prompt": ["from parquet"]}), tmp_path / "data" / "b.parquet")
    assert run(tmp_path, tiny_llama, "data/*", prompt_column="prompt") == 0
    rows = {r["id"]: r for r in finished_output(str(tmp_path / "out"))}
    assert set(rows) == {1, 2, 3}
    assert rows[1]["num_output_tokens"] <= 2 and rows[1]["error"] is None


def test_jsonl_with_messages_and_a_scoring_job(tmp_path: Path, tiny_llama: Path) -> None:
    lines = [{"id": "a", "messages": [{"role": "user", "content": "Hi"}], "choices": [" yes", " no"]},
             {"id": "b", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Ok?"}],
              "choices": [" sure"]}]
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    assert run(tmp_path, tiny_llama, "in.jsonl", messages_column="messages") == 0
    assert {r["id"] for r in finished_output(str(tmp_path / "out"))} == {"a", "b"}
    spec = json.loads((tmp_path / "job.json").read_text())
    spec.update(task="score", output={"path": "scores"})
    spec["input"]["continuations_column"] = "choices"
    (tmp_path / "job.json").write_text(json.dumps(spec))
    assert main(["run", str(tmp_path / "job.json"), "--no-progress"]) == 0
    scores = finished_output(str(tmp_path / "scores"))
    assert sorted((r["id"], r["sample_index"]) for r in scores) == [("a", 0), ("a", 1), ("b", 0)]
    assert all(r["continuation_logprob"] < 0 for r in scores)


def test_unreadable_text_files_and_wrong_columns_are_named(tmp_path: Path, tiny_llama: Path, capsys) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "ragged.csv").write_text("id,prompt\n1,a\n2,b,extra\n")
    (data / "array.json").write_text('[{"id": 1, "prompt": "x"}]')
    assert run(tmp_path, tiny_llama, "data/*", prompt_column="prompt") == 2
    err = capsys.readouterr().err
    assert f"file {data}/ragged.csv is not a readable CSV file" in err
    assert f"file {data}/array.json is not a readable JSON Lines file" in err
    (data / "ragged.csv").unlink()
    (data / "array.json").unlink()
    (data / "ok.csv").write_text("id,text\n1,a\n")
    assert run(tmp_path, tiny_llama, "data/*", prompt_column="prompt") == 2
    err = capsys.readouterr().err
    assert f"file {data}/ok.csv has no column 'prompt' (did you mean 'text'?" not in err  # too far to guess
    assert f"file {data}/ok.csv has no column 'prompt'" in err and "ignore_corrupt_files" not in err


def test_csv_jsonl_and_openai_batch_inputs_give_the_parquet_jobs_completions(tmp_path: Path, tiny_llama: Path) -> None:
    prompts = ["Tell me about trains.", "Hello, world", "Two\nlines here", "A \"quoted\" word"]
    budgets = [4, 2, 5, 3]

    def outputs(folder: str) -> dict:
        return {r["id"]: r["output_token_ids"] for r in finished_output(str(tmp_path / folder))}

    def job(name: str, path: str, **input_spec) -> None:
        spec = {"name": name, "input": {"path": path, **input_spec}, "output": {"path": name},
                "model": {"path": str(tiny_llama)}, "sampling": {"max_tokens": 8}}
        (tmp_path / f"{name}.json").write_text(json.dumps(spec))
        assert main(["run", str(tmp_path / f"{name}.json"), "--no-progress"]) == 0

    ids = [f"r{i}" for i in range(len(prompts))]
    pq.write_table(pa.table({"id": ids, "prompt": prompts, "max_tokens": budgets}), tmp_path / "p.parquet")
    job("parquet", "p.parquet", prompt_column="prompt")
    pa.csv.write_csv(pa.table({"id": ids, "prompt": prompts, "max_tokens": budgets}), tmp_path / "p.csv")
    job("csv", "p.csv", prompt_column="prompt")
    rows = [{"id": i, "prompt": p, "max_tokens": b} for i, p, b in zip(ids, prompts, budgets)]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    job("jsonl", "p.jsonl", prompt_column="prompt")
    assert outputs("parquet") == outputs("csv") == outputs("jsonl")
    # OpenAI Batch requests are chats: the same as a Parquet job with a messages column.
    messages = [[{"role": "user", "content": p}] for p in prompts]
    pq.write_table(pa.table({"id": ids, "messages": messages, "max_tokens": budgets}), tmp_path / "m.parquet")
    job("messages", "m.parquet", messages_column="messages")
    lines = [{"custom_id": i, "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "x", "messages": m, "max_tokens": b}} for i, m, b in zip(ids, messages, budgets)]
    (tmp_path / "batch.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    job("openai", "batch.jsonl", format="openai")
    openai_rows = {r["custom_id"]: r["output_token_ids"] for r in finished_output(str(tmp_path / "openai"))}
    assert openai_rows == outputs("messages")
