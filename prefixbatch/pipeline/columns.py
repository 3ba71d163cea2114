"""Which column types the input may have, and the one type each column has in every batch.

One `ColumnRule` per column role (id, prompt, messages, carried, each sampling override),
so every type check and every message reads from this one table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa

from prefixbatch.pipeline.config import SAMPLING_FIELDS, SamplingSpec


def _decoded(t: pa.DataType) -> pa.DataType:
    return t.value_type if pa.types.is_dictionary(t) else t


def is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(_decoded(t)) or pa.types.is_large_string(_decoded(t))


def _is_integer(t: pa.DataType) -> bool:
    return pa.types.is_integer(_decoded(t))


def _is_number(t: pa.DataType) -> bool:
    return _is_integer(t) or pa.types.is_floating(_decoded(t))


def _is_list_of(accepts_item: Callable[[pa.DataType], bool]) -> Callable[[pa.DataType], bool]:
    def accepts(t: pa.DataType) -> bool:
        is_list = pa.types.is_list(t) or pa.types.is_large_list(t)
        return is_list and accepts_item(t.value_type)

    return accepts


def _is_message(t: pa.DataType) -> bool:
    if not pa.types.is_struct(t):
        return False
    names = [t.field(i).name for i in range(t.num_fields)]
    return all(n in names and is_string(t.field(n).type) for n in ("role", "content"))


def _always(target: pa.DataType) -> Callable[[pa.DataType], pa.DataType]:
    return lambda _stored: target


@dataclass(frozen=True)
class ColumnRule:
    """What a column must hold, and the type it has in every batch."""

    expected: str  # completes "column 'x' in FILE must be ..."
    accepts: Callable[[pa.DataType], bool]
    batch_type: Callable[[pa.DataType], pa.DataType]  # stored type -> type in batches


MESSAGES_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))

ID_RULE = ColumnRule(
    "a string or an integer",
    lambda t: is_string(t) or _is_integer(t),
    lambda t: pa.string() if is_string(t) else pa.int64(),
)
PROMPT_RULE = ColumnRule("a string", is_string, _always(pa.string()))
MESSAGES_RULE = ColumnRule(
    "a list of structs with string fields 'role' and 'content'",
    _is_list_of(_is_message),
    _always(MESSAGES_TYPE),
)
CARRY_RULE = ColumnRule("any type", lambda t: True, _decoded)
CONTINUATIONS_RULE = ColumnRule("a list of strings", _is_list_of(is_string), _always(pa.list_(pa.string())))

_INTEGER = ("an integer", _is_integer)
_NUMBER = ("a float or an integer", _is_number)
_STOP = ("a string or a list of strings", lambda t: is_string(t) or _is_list_of(is_string)(t))
_INTEGERS = ("a list of integers", _is_list_of(_is_integer))

# Per-row sampling overrides, one per `SamplingSpec` field, by the field's Python type:
# (expected, accepts, type in batches). Read where a file has the column, all null where not.
_BY_TYPE = {
    int: (*_INTEGER, pa.int64()),
    int | None: (*_INTEGER, pa.int64()),
    float: (*_NUMBER, pa.float64()),
    tuple[str, ...]: (*_STOP, pa.list_(pa.string())),  # a plain string becomes a one-element list
    tuple[int, ...]: (*_INTEGERS, pa.list_(pa.int64())),
    str | None: ("a string", is_string, pa.string()),  # json_schema (JSON text), regex
    tuple[str, ...] | None: ("a list of strings", _is_list_of(is_string), pa.list_(pa.string())),  # choice
    tuple[tuple[int, float], ...]: ('a JSON object of token ids to biases (text, e.g. {"15": -100})', is_string,
                                    pa.string()),  # logit_bias
}
_OVERRIDES = {name: _BY_TYPE[field.annotation] for name, field in SamplingSpec.model_fields.items()}
OVERRIDE_TYPES: dict[str, pa.DataType] = {name: t for name, (*_, t) in _OVERRIDES.items()}
OVERRIDE_RULES: dict[str, ColumnRule] = {
    name: ColumnRule(expected, accepts, _always(t))
    for name, (expected, accepts, t) in _OVERRIDES.items()
}
SAMPLING_OVERRIDE_COLUMNS: tuple[str, ...] = SAMPLING_FIELDS
