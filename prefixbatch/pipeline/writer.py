"""The output's rows: the output schema, and `Completion`s turned into a table of it.

Invariant: every part is built against the explicit `output_schema`, whatever the batch
held. Writing and committing parts is `commits.OutputFolder`'s.

in: `Completion`s + ids + carried columns -> Arrow table.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from prefixbatch.errors import SpecError
from prefixbatch.types import Completion, TokenLogprob

OutputMode = Literal["error", "overwrite", "resume"]

# `logprobs`: per output token its id, text and logprob, and the top k alternatives.
_TOP_LOGPROB = pa.struct([("token_id", pa.int32()), ("token", pa.string()), ("logprob", pa.float32())])
LOGPROBS_TYPE = pa.list_(pa.struct([
    ("token_id", pa.int32()), ("token", pa.string()), ("logprob", pa.float32()),
    ("top_logprobs", pa.list_(_TOP_LOGPROB)),
]))

# The columns prefixbatch writes after the id and the carried columns.
RESULT_FIELDS: tuple[pa.Field, ...] = (
    pa.field("sample_index", pa.int32(), nullable=False),  # 0..n-1; 0 on error rows
    pa.field("output_text", pa.string()),  # null on error rows
    pa.field("output_token_ids", pa.list_(pa.int32())),  # null on error rows
    pa.field("finish_reason", pa.string(), nullable=False),  # "stop" | "length" | "error"
    pa.field("num_prompt_tokens", pa.int32(), nullable=False),
    pa.field("num_output_tokens", pa.int32(), nullable=False),
    pa.field("num_cached_prompt_tokens", pa.int32(), nullable=False),
    pa.field("error", pa.string()),  # null, or "code: message"
    pa.field("logprobs", LOGPROBS_TYPE),  # null unless the row asked (`sampling.logprobs`)
    pa.field("prompt_logprobs", LOGPROBS_TYPE),  # null unless asked (`sampling.prompt_logprobs`)
    pa.field("continuation_logprob", pa.float64()),  # task score: the continuation's summed logprob
    pa.field("continuation_is_greedy", pa.bool_()),  # task score: every token the argmax
)
_RESULT_NAMES = tuple(f.name for f in RESULT_FIELDS)


def output_schema(
    id_type: pa.DataType, carry_fields: Sequence[pa.Field], *, id_column: str
) -> pa.Schema:
    """The id column (named as in the input), the carried columns, then the result columns."""
    fields = [pa.field(id_column, id_type), *carry_fields, *RESULT_FIELDS]
    names = [f.name for f in fields]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        msg = (
            f"output columns would repeat {clashes}: the id column and carry_columns must not"
            f" reuse each other's names or prefixbatch's own ({', '.join(_RESULT_NAMES)})"
        )
        raise SpecError(msg)
    return pa.schema(fields)


def completions_to_table(
    completions: Sequence[Completion],
    *,
    ids: pa.Array | pa.ChunkedArray,
    carry: pa.Table | None,
    schema: pa.Schema,
) -> pa.Table:
    """One row per completion (per sample of a row); `ids` and `carry` rows are aligned with
    `completions`, so a row's id and carried values repeat once per sample."""
    num_rows = len(completions)
    num_carry = num_rows if carry is None else carry.num_rows
    if len(ids) != num_rows or num_carry != num_rows:  # a caller bug, not a user mistake
        msg = f"{num_rows} completions but {len(ids)} ids and {num_carry} carry rows"
        raise ValueError(msg)
    columns: dict[str, Any] = {schema.field(0).name: ids}
    if carry is not None:
        columns.update({name: carry.column(name) for name in carry.column_names})
    columns.update(_result_columns(completions))
    arrays = [_as_type(columns[field.name], field.type) for field in schema]
    return pa.Table.from_arrays(arrays, schema=schema)


def _result_columns(completions: Sequence[Completion]) -> dict[str, pa.Array]:
    is_error = [c.finish_reason == "error" for c in completions]
    # Token ids as one flat buffer plus offsets: no Python list per row.
    offsets = np.zeros(len(completions) + 1, np.int32)
    np.cumsum([len(c.token_ids) for c in completions], out=offsets[1:])
    flat = (t for c in completions for t in c.token_ids)
    values = pa.array(np.fromiter(flat, np.int32, int(offsets[-1])))
    texts = [None if c.finish_reason == "error" else c.text for c in completions]
    cached = [c.num_cached_prompt_tokens for c in completions]
    return {
        "sample_index": pa.array([c.sample_index for c in completions], pa.int32()),
        "output_text": pa.array(texts, pa.string()),
        "output_token_ids": pa.ListArray.from_arrays(
            pa.array(offsets), values, mask=pa.array(is_error, pa.bool_())
        ),
        "finish_reason": pa.array([c.finish_reason for c in completions], pa.string()),
        "num_prompt_tokens": pa.array([c.num_prompt_tokens for c in completions], pa.int32()),
        "num_output_tokens": pa.array(np.diff(offsets)),
        "num_cached_prompt_tokens": pa.array(cached, pa.int32()),
        "error": pa.array([c.error for c in completions], pa.string()),
        "logprobs": pa.array([_logprob_rows(c.logprobs) for c in completions], LOGPROBS_TYPE),
        "prompt_logprobs": pa.array([_logprob_rows(c.prompt_logprobs) for c in completions], LOGPROBS_TYPE),
        "continuation_logprob": pa.array([c.continuation_logprob for c in completions], pa.float64()),
        "continuation_is_greedy": pa.array([c.continuation_is_greedy for c in completions], pa.bool_()),
    }


def _logprob_rows(logprobs: Sequence[TokenLogprob] | None) -> list[dict[str, Any]] | None:
    if logprobs is None:
        return None
    return [
        {"token_id": t.token_id, "token": t.token, "logprob": t.logprob,
         "top_logprobs": [{"token_id": i, "token": text, "logprob": lp} for i, text, lp in t.top]}
        for t in logprobs
    ]


def _as_type(column: pa.Array | pa.ChunkedArray, target: pa.DataType) -> pa.Array:
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return column if column.type == target else column.cast(target)


__all__ = ["RESULT_FIELDS", "completions_to_table", "output_schema"]
