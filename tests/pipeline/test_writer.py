"""Writer: the output schema and completions -> table."""

from __future__ import annotations

import pyarrow as pa
import pytest

from prefixbatch.errors import SpecError
from prefixbatch.pipeline.writer import completions_to_table, output_schema
from prefixbatch.types import Completion, TokenLogprob, error_completion

METADATA = {
    "prefixbatch.job": "demo",
    "prefixbatch.model": "/models/tiny",
    "prefixbatch.version": "0.1.0",
}
SCHEMA = output_schema(pa.string(), [pa.field("topic", pa.string())], id_column="qid")


def sample_table() -> pa.Table:
    completions = [
        Completion(0, (5, 6), "hi there", "stop", num_prompt_tokens=4, num_cached_prompt_tokens=3),
        error_completion(
            1, "prompt_too_long", "4096 tokens, the model takes 2048", num_prompt_tokens=4096
        ),
        Completion(2, (7,), "ok", "length", num_prompt_tokens=2),
        Completion(2, (8, 9), "no", "stop", num_prompt_tokens=2, sample_index=1),
    ]
    ids = pa.array(["a", "b", "c", "c"], pa.large_string())  # cast to the schema's string
    carry = pa.table({"topic": ["x", None, "z", "z"]})
    return completions_to_table(completions, ids=ids, carry=carry, schema=SCHEMA)


def test_output_schema_is_id_then_carry_then_results():
    expected = pa.schema(
        [
            pa.field("qid", pa.string()),
            pa.field("topic", pa.string()),
            pa.field("sample_index", pa.int32(), nullable=False),
            pa.field("output_text", pa.string()),
            pa.field("output_token_ids", pa.list_(pa.int32())),
            pa.field("finish_reason", pa.string(), nullable=False),
            pa.field("num_prompt_tokens", pa.int32(), nullable=False),
            pa.field("num_output_tokens", pa.int32(), nullable=False),
            pa.field("num_cached_prompt_tokens", pa.int32(), nullable=False),
            pa.field("error", pa.string()),
            pa.field("logprobs", pa.list_(pa.struct([
                ("token_id", pa.int32()), ("token", pa.string()), ("logprob", pa.float32()),
                ("top_logprobs", pa.list_(pa.struct([
                    ("token_id", pa.int32()), ("token", pa.string()), ("logprob", pa.float32()),
                ]))),
            ]))),
        ]
    )
    expected = expected.append(expected.field("logprobs").with_name("prompt_logprobs"))
    expected = expected.append(pa.field("continuation_logprob", pa.float64()))
    expected = expected.append(pa.field("continuation_is_greedy", pa.bool_()))
    assert expected == SCHEMA


def test_logprobs_column_holds_each_output_tokens_logprob_and_alternatives():
    logprobs = (
        TokenLogprob(5, "hi", -0.25, ((5, "hi", -0.25), (9, "yo", -1.5))),
        TokenLogprob(6, " there", -2.0, ((7, "!", -0.5), (6, " there", -2.0))),
    )
    completions = [
        Completion(0, (5, 6), "hi there", "stop", num_prompt_tokens=4, logprobs=logprobs),
        Completion(1, (5,), "hi", "length", num_prompt_tokens=4),
    ]
    table = completions_to_table(completions, ids=pa.array(["a", "b"]), carry=pa.table({"topic": ["x", "y"]}),
                                 schema=SCHEMA)
    asked, not_asked = table.column("logprobs").to_pylist()
    assert not_asked is None
    assert asked == [
        {"token_id": 5, "token": "hi", "logprob": -0.25, "top_logprobs": [
            {"token_id": 5, "token": "hi", "logprob": -0.25}, {"token_id": 9, "token": "yo", "logprob": -1.5}]},
        {"token_id": 6, "token": " there", "logprob": -2.0, "top_logprobs": [
            {"token_id": 7, "token": "!", "logprob": -0.5}, {"token_id": 6, "token": " there", "logprob": -2.0}]},
    ]


def test_output_schema_refuses_repeated_column_names():
    with pytest.raises(SpecError, match=r"output columns would repeat \['error'\]"):
        output_schema(pa.int64(), [pa.field("error", pa.string())], id_column="id")


def test_completions_to_table_values():
    table = sample_table()
    assert table.schema == SCHEMA
    assert table.to_pydict() == {
        "qid": ["a", "b", "c", "c"],
        "topic": ["x", None, "z", "z"],
        "sample_index": [0, 0, 0, 1],
        "output_text": ["hi there", None, "ok", "no"],
        "output_token_ids": [[5, 6], None, [7], [8, 9]],
        "finish_reason": ["stop", "error", "length", "stop"],
        "num_prompt_tokens": [4, 4096, 2, 2],
        "num_output_tokens": [2, 0, 1, 2],
        "num_cached_prompt_tokens": [3, 0, 0, 0],
        "error": [None, "prompt_too_long: 4096 tokens, the model takes 2048", None, None],
        "logprobs": [None, None, None, None],
        "prompt_logprobs": [None, None, None, None],
        "continuation_logprob": [None, None, None, None],
        "continuation_is_greedy": [None, None, None, None],
    }


def test_completions_to_table_without_carry_and_empty():
    schema = output_schema(pa.int64(), [], id_column="id")
    table = completions_to_table([], ids=pa.array([], pa.int64()), carry=None, schema=schema)
    assert table.schema == schema and table.num_rows == 0
