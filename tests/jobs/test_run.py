"""`prefixbatch run` end to end on a real tiny model, real Parquet, local and memory:// storage.

The oracle for greedy rows is a direct `model.generate` on that single prompt.
"""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from prefixbatch.jobs.cli import main

SYSTEMS = (
    "You are a terse assistant for a hardware store.",
    "You answer questions about the history of trains, carefully and in order.",
    "Reply as a poet who likes the sea, in short lines.",
)
NUM_ROWS = 210


def conversation(i: int, systems: tuple[str, ...] = SYSTEMS) -> list[dict]:
    return [
        {"role": "system", "content": systems[i % len(systems)]},
        {"role": "user", "content": f"Question {i}: what about item {i * 7 % 13} and colour {i % 5}?"},
    ]


class Oracle:
    """Direct, one-prompt-at-a-time `model.generate`, the reference for greedy rows."""

    def __init__(self, model_dir: Path) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        eos = self.model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos])

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def greedy(self, messages: list[dict], max_tokens: int) -> tuple[list[int], str]:
        """Generated ids without a final eos, and the finish reason."""
        ids = torch.tensor([self.prompt_ids(messages)])
        with torch.inference_mode():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_tokens)
        new = out[0, ids.shape[1]:].tolist()
        if new and new[-1] in self.eos:
            return new[:-1], "stop"
        return new, "length"


@pytest.fixture(scope="module")
def oracle(tiny_llama) -> Oracle:
    return Oracle(tiny_llama)


@pytest.fixture(scope="module")
def job_rows(oracle) -> tuple[list[dict], dict[str, dict]]:
    """Input rows and, for greedy rows, the expected output (from the oracle)."""
    rows, expected = [], {}
    for i in range(NUM_ROWS):
        messages = conversation(i)
        max_tokens = None if i % 4 == 0 else 4 + i % 13  # None: the spec default (12)
        temperature = 0.8 if i % 10 == 3 else (None if i % 2 else 0.0)
        row = {"id": f"r{i:04d}", "messages": messages, "max_tokens": max_tokens, "temperature": temperature,
               "topic": f"t{i % 7}", "weight": i / 10, "stop": None, "stop_token_ids": None}
        if temperature != 0.8:
            ids, reason = oracle.greedy(messages, max_tokens or 12)
            text = oracle.tokenizer.decode(ids, skip_special_tokens=True)
            want = {"ids": ids, "reason": reason, "text": text}
            if i % 10 == 5 and len(ids) > 3:  # stop at a token id the greedy output produces
                k = len(ids) // 2
                row["stop_token_ids"] = [ids[k]]
                k = ids.index(ids[k])
                want = {"ids": ids[:k], "reason": "stop", "text": oracle.tokenizer.decode(ids[:k], skip_special_tokens=True)}
            elif i % 10 == 7 and len(text.strip()) > 6:  # stop at a string the greedy output produces
                middle = text[len(text) // 2:len(text) // 2 + 3]
                row["stop"] = [middle]
                want = {"ids": None, "reason": "stop", "text": text[: text.index(middle)]}
            expected[row["id"]] = want
        rows.append(row)
    return rows, expected


def input_table(rows: list[dict]) -> pa.Table:
    schema = pa.schema([
        ("id", pa.string()),
        ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
        ("max_tokens", pa.int64()), ("temperature", pa.float64()), ("topic", pa.string()),
        ("weight", pa.float64()), ("stop", pa.list_(pa.string())), ("stop_token_ids", pa.list_(pa.int64())),
    ])
    return pa.Table.from_pylist(rows, schema=schema)


def write_spec(folder: Path, input_path: str, output_path: str, model: Path, kind: str = "hf") -> Path:
    spec = {
        "name": "e2e",
        "input": {"path": input_path, "messages_column": "messages", "carry_columns": ["topic", "weight"]},
        "output": {"path": output_path, "rows_per_part": 64},
        "model": {"path": str(model)},
        "sampling": {"max_tokens": 12, "seed": 1},
        "executor": {"kind": kind, "hf": {"max_batch_size": 16}},
    }
    path = folder / "job.json"
    path.write_text(json.dumps(spec))
    return path


def read_output(url: str) -> pa.Table:
    fs, root = fsspec.core.url_to_fs(url)
    parts = sorted(p for p in fs.ls(root, detail=False) if p.rsplit("/", 1)[-1].startswith("part-"))
    tables = [pq.read_table(fs.open(p, "rb")) for p in parts]
    meta = tables[0].schema.metadata
    assert meta[b"prefixbatch.job"] == b"e2e" and b"prefixbatch.version" in meta
    return pa.concat_tables(tables)


def check_output(output: pa.Table, rows: list[dict], expected: dict, tokenizer) -> None:
    got = {r["id"]: r for r in output.to_pylist()}
    assert output.num_rows == len(rows) and len(got) == len(rows)  # every id exactly once
    for row in rows:
        out = got[row["id"]]
        assert out["topic"] == row["topic"] and out["weight"] == row["weight"]
        assert out["error"] is None
        assert out["num_output_tokens"] == len(out["output_token_ids"]) <= (row["max_tokens"] or 12)
        decoded = tokenizer.decode(out["output_token_ids"], skip_special_tokens=True)
        if row["stop"]:
            assert decoded.startswith(out["output_text"])
        else:
            assert out["output_text"] == decoded
        want = expected.get(row["id"])
        if want is None:  # a sampled row
            assert out["finish_reason"] in ("stop", "length")
            continue
        assert out["finish_reason"] == want["reason"], row["id"]
        assert out["output_text"] == want["text"], row["id"]
        if want["ids"] is not None:
            assert out["output_token_ids"] == want["ids"], row["id"]
        if want["reason"] == "length":
            assert out["num_output_tokens"] == (row["max_tokens"] or 12)
    reasons = {r["finish_reason"] for r in got.values()}
    assert {"stop", "length"} <= reasons


@pytest.mark.parametrize("kind", ["hf", "native"])
def test_run_local_folder(tmp_path, tiny_llama, job_rows, oracle, kind):
    rows, expected = job_rows
    pq.write_table(input_table(rows[:100]), tmp_path / "in-0.parquet", row_group_size=32)
    pq.write_table(input_table(rows[100:]), tmp_path / "in-1.parquet", row_group_size=32)
    spec = write_spec(tmp_path, "in-*.parquet", "out", tiny_llama, kind)
    assert main(["run", str(spec), "--no-progress"]) == 0
    output = read_output(str(tmp_path / "out"))
    check_output(output, rows, expected, oracle.tokenizer)
    summary = json.loads((tmp_path / "out" / "_summary.json").read_text())
    assert summary["rows"] == NUM_ROWS and summary["error_rows"] == 0
    assert summary["output_tokens"] == sum(output.column("num_output_tokens").to_pylist())
    assert len(summary["parts"]) == 4  # 210 rows, 64 per part
    assert summary["executor"] == kind
    prompt_tokens = sum(output.column("num_prompt_tokens").to_pylist())
    if kind == "native":  # shared system prompts computed once, the rest reused
        assert summary["prefill_tokens_computed"] + summary["cached_prompt_tokens"] == prompt_tokens
        assert summary["prefill_tokens_computed"] < prompt_tokens / 2
    else:
        assert summary["prefill_tokens_computed"] == prompt_tokens and summary["cached_prompt_tokens"] == 0


def test_run_memory_filesystem_matches_local(tmp_path, tiny_llama, job_rows, oracle):
    rows, expected = job_rows
    fs = fsspec.filesystem("memory")
    with fs.open("/e2e-in/prompts.parquet", "wb") as f:
        pq.write_table(input_table(rows), f, row_group_size=50)
    spec = write_spec(tmp_path, "memory://e2e-in/prompts.parquet", "memory://e2e-out", tiny_llama)
    assert main(["run", str(spec), "--no-progress"]) == 0
    output = read_output("memory://e2e-out")
    check_output(output, rows, expected, oracle.tokenizer)
    # Sampled rows are seeded per row: the same job gives the same samples.
    assert main(["run", str(spec), "--no-progress", "--set", "output.path=memory://e2e-out2"]) == 0
    again = read_output("memory://e2e-out2")
    assert output.sort_by("id").column("output_token_ids") == again.sort_by("id").column("output_token_ids")
