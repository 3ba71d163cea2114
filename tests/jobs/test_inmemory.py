"""`prefixbatch.generate` / `Engine`: prompts in memory, a table out, the same pipeline as `run`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import prefixbatch
from prefixbatch.errors import InputError
from prefixbatch.jobs.cli import main
from prefixbatch.pipeline.writer import RESULT_FIELDS
from tests.output_helpers import finished_output

PROMPTS = ["You are a helpful assistant. Tell me about trains.", "You are a helpful assistant. Tell me about boats.",
           "   ", "Hello"]


@pytest.fixture(scope="module")
def engine(tiny_llama: Path) -> prefixbatch.Engine:
    return prefixbatch.Engine(str(tiny_llama), executor={"kind": "native"})


def test_generate_equals_a_file_run_in_input_order(tmp_path: Path, tiny_llama: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    table = prefixbatch.generate(PROMPTS, model=str(tiny_llama), max_tokens=5)
    assert os.listdir(tmp_path) == []  # nothing written
    assert table.column_names == ["id", *(f.name for f in RESULT_FIELDS)]
    assert table.column("id").to_pylist() == [0, 1, 2, 3]
    assert table.column("error").to_pylist()[2].startswith("empty_prompt: ")
    pq.write_table(pa.table({"id": range(4), "prompt": PROMPTS}), tmp_path / "in.parquet")
    (tmp_path / "job.json").write_text(json.dumps({
        "name": "same", "input": {"path": "in.parquet", "prompt_column": "prompt"}, "output": {"path": "out"},
        "model": {"path": str(tiny_llama)}, "sampling": {"max_tokens": 5}}))
    assert main(["run", str(tmp_path / "job.json"), "--no-progress"]) == 0
    from_files = {r["id"]: r["output_token_ids"] for r in finished_output(str(tmp_path / "out"))}
    assert dict(zip(table.column("id").to_pylist(), table.column("output_token_ids").to_pylist())) == from_files


def test_tables_messages_carried_columns_and_per_row_sampling(engine: prefixbatch.Engine) -> None:
    columns = {"id": ["a", "b"], "prompt": ["one", "two"], "max_tokens": [1, 3], "topic": ["x", "y"]}
    out = engine.generate(pl.DataFrame(columns), temperature=0.0)
    assert out.column("topic").to_pylist() == ["x", "y"] and out.column("num_output_tokens").to_pylist()[0] <= 1
    arrow_out = engine.generate(pa.table(columns))
    assert arrow_out.column("output_token_ids").to_pylist() == out.column("output_token_ids").to_pylist()
    chats = [[{"role": "user", "content": "Hi"}], [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Ok?"}]]
    messages = engine.generate(chats, sampling={"max_tokens": 2, "n": 2})
    assert messages.num_rows == 4 and messages.column("sample_index").to_pylist() == [0, 1, 0, 1]


def test_score_on_the_same_engine(engine: prefixbatch.Engine) -> None:
    out = engine.score(["Q: 2 + 2? A:", "Q: the sky? A:"], [[" 4", " 5"], [" blue"]])
    assert [(r["id"], r["sample_index"], r["finish_reason"]) for r in out.to_pylist()] == [
        (0, 0, "scored"), (0, 1, "scored"), (1, 0, "scored")]
    assert all(v < 0 for v in out.column("continuation_logprob").to_pylist())


def test_mistakes_are_clear(engine: prefixbatch.Engine) -> None:
    with pytest.raises(InputError, match="needs a 'prompt' or 'messages' column"):
        engine.generate(pa.table({"text": ["x"]}))
    with pytest.raises(InputError, match="prompts must be strings"):
        engine.generate([1, 2])
    with pytest.raises(prefixbatch.UserError, match="temperature"):
        engine.generate(["x"], temperature=-1)


def test_a_pandas_frame(engine: prefixbatch.Engine) -> None:
    pd = pytest.importorskip("pandas")
    out = engine.generate(pd.DataFrame({"prompt": ["one", "two"]}), max_tokens=2)
    assert out.column("id").to_pylist() == [0, 1] and out.column("error").null_count == 2
