"""Structured output (xgrammar) in the `native` and `hf` executors, on a tiny real model.

200+ rows with a nested JSON schema, a regex and a choice list: every output that ended by
end-of-sequence parses and validates, and at temperature 0 both executors give the same
tokens; constraints that do not compile are error rows; unconstrained rows are untouched.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from functools import cache
from pathlib import Path

import jsonschema
import pytest
from transformers import AutoTokenizer

from prefixbatch.executors.config import ExecutorSpec, ModelSpec
from prefixbatch.executors.grammar import choice_grammar
from prefixbatch.executors.hf import HfExecutor
from prefixbatch.executors.native.executor import NativeExecutor
from prefixbatch.types import Completion, Request, SamplingParams
from tests.executors.planned import planned

SCHEMA = {
    "type": "object",
    "properties": {
        "label": {"enum": ["spam", "ham", "unsure"]},
        "tags": {"type": "array", "items": {"enum": ["x", "y", "z"]}, "maxItems": 3},
        "meta": {
            "type": "object",
            "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 99}},
            "required": ["ok", "n"],
            "additionalProperties": False,
        },
    },
    "required": ["label", "tags", "meta"],
    "additionalProperties": False,
}
REGEX = r"[A-Z][a-z]{1,6}-[0-9]{2,4}"
CHOICES = ("positive", "negative", "neutral ground")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/executors/conftest.py


@cache
def executor(kind: str, folder: Path) -> NativeExecutor | HfExecutor:
    make = NativeExecutor if kind == "native" else HfExecutor
    return make(ModelSpec(path=str(folder), dtype="float32"), ExecutorSpec(kind=kind, device="cpu"))


def run(kind: str, folder: Path, batch: list[Request]) -> dict[int, Completion]:
    return {c.row_index: c for c in executor(kind, folder).generate(planned(batch, kind=kind))}


def constrained_requests(folder: Path, num_rows: int = 210) -> list[Request]:
    encode = AutoTokenizer.from_pretrained(folder)
    by_kind = [
        SamplingParams(max_tokens=64, json_schema=json.dumps(SCHEMA, sort_keys=True)),
        SamplingParams(max_tokens=24, regex=REGEX),
        SamplingParams(max_tokens=12, choice=CHOICES),
    ]
    return [
        Request(i, tuple(encode(f"Row {i}: classify message number {i * 7}.")["input_ids"]), by_kind[i % 3])
        for i in range(num_rows)
    ]


def check_valid(batch: list[Request], found: dict[int, Completion]) -> dict[str, int]:
    """Every output that ended by end-of-sequence is valid; → finish reasons counted."""
    counts: dict[str, int] = {}
    for request in batch:
        completion, p = found[request.row_index], request.sampling
        counts[completion.finish_reason] = counts.get(completion.finish_reason, 0) + 1
        assert completion.constrained
        if completion.finish_reason != "stop":
            continue
        if p.json_schema is not None:
            jsonschema.validate(json.loads(completion.text), SCHEMA)
        elif p.regex is not None:
            assert re.fullmatch(REGEX, completion.text), completion.text
        else:
            assert completion.text in CHOICES
    return counts


@pytest.mark.slow
def test_outputs_ended_by_eos_are_valid_and_native_equals_hf(tiny_llama: Path) -> None:
    batch = constrained_requests(tiny_llama)
    native, hf = run("native", tiny_llama, batch), run("hf", tiny_llama, batch)
    counts = check_valid(batch, native)
    assert check_valid(batch, hf) == counts
    assert counts["stop"] >= 200  # nearly all complete within max_tokens
    assert {i: c.token_ids for i, c in native.items()} == {i: c.token_ids for i, c in hf.items()}


def test_sampled_constrained_rows_are_valid_too(tiny_qwen2: Path) -> None:
    batch = [replace(r, sampling=replace(r.sampling, temperature=1.0, seed=r.row_index))
             for r in constrained_requests(tiny_qwen2, 60)]
    for kind in ("native", "hf"):
        assert check_valid(batch, run(kind, tiny_qwen2, batch))["stop"] >= 50


def test_a_constraint_that_does_not_compile_is_an_error_row(tiny_llama: Path) -> None:
    batch = constrained_requests(tiny_llama, 6)
    batch[0] = replace(batch[0], sampling=replace(batch[0].sampling, json_schema='{"type": "no-such-type"}'))
    batch[1] = replace(batch[1], sampling=replace(batch[1].sampling, regex="([a-z]"))
    for kind in ("native", "hf"):
        found = run(kind, tiny_llama, batch)
        assert found[0].finish_reason == found[1].finish_reason == "error"
        assert found[0].error.startswith("invalid_constraint: json_schema does not compile: ")
        assert found[1].error.startswith("invalid_constraint: regex does not compile: ")
        assert "parenthesis" in found[1].error
        assert all(found[i].finish_reason in ("stop", "length") for i in range(2, 6))


def test_unconstrained_rows_are_untouched_by_constrained_batch_mates(tiny_llama: Path) -> None:
    constrained = constrained_requests(tiny_llama, 12)
    encode = AutoTokenizer.from_pretrained(tiny_llama)
    free = [Request(100 + i, tuple(encode(f"free text {i}")["input_ids"]), SamplingParams(max_tokens=10))
            for i in range(4)]
    for kind in ("native", "hf"):
        together, alone = run(kind, tiny_llama, constrained + free), run(kind, tiny_llama, free)
        assert {i: together[i].token_ids for i in alone} == {i: c.token_ids for i, c in alone.items()}
        assert not any(c.constrained for c in alone.values())


def test_choice_grammar_escapes_quotes_and_backslashes(tiny_llama: Path) -> None:
    choices = ('say "hi"', "a\\b", "new\nline")
    assert choice_grammar(choices) == 'root ::= "say \\"hi\\"" | "a\\\\b" | "new\\nline"'
    batch = [replace(r, sampling=SamplingParams(max_tokens=16, choice=choices)) for r in constrained_requests(tiny_llama, 9)]
    for completion in run("native", tiny_llama, batch).values():
        assert completion.finish_reason == "length" or completion.text in choices


def test_a_constrained_row_resumed_from_a_checkpoint_continues_its_grammar(tiny_llama: Path) -> None:
    whole = {r.row_index: r for r in constrained_requests(tiny_llama, 9)}
    done = run("native", tiny_llama, list(whole.values()))
    resumed = []
    for row, request in whole.items():
        generated = done[row].token_ids[:4]  # what a checkpoint held
        resumed.append(replace(request, token_ids=request.token_ids + generated, num_generated=len(generated)))
    again = run("native", tiny_llama, resumed)
    assert {row: c.token_ids for row, c in again.items()} == {row: c.token_ids for row, c in done.items()}
    assert all(c.finish_reason == done[row].finish_reason for row, c in again.items())
