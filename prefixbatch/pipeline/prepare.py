"""Input files → requests: read the needed columns batch by batch, tokenize, apply per-row settings.

Every input row ends up either as its `n` `Request`s (one per sample, `sample_index`
0..n-1) or as one error `Completion`, never dropped: each row index appears in exactly one
of `requests` and `errors`. Ids and carried columns are kept (as Arrow, indexed by row
index) for writing the output rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow as pa

from prefixbatch.pipeline.config import SAMPLING_FIELDS, InputSpec, SamplingSpec
from prefixbatch.pipeline.openai_batch import UNSUPPORTED
from prefixbatch.pipeline.reader import InputBatch, InputColumns, InputFile, iter_input_batches
from prefixbatch.pipeline.requests import make_requests, row_sampling
from prefixbatch.pipeline.tokenize import PromptTokenizer, RowError
from prefixbatch.types import Completion, Request, SamplingParams, error_completion


@dataclass
class PreparedInput:
    """Everything generation and output writing need from the input, by global row index."""

    requests: list[Request]  # a row's n samples are adjacent, in sample order
    errors: list[Completion]  # rows that never reach an executor, one per row
    ids: pa.ChunkedArray  # id of row i at index i
    carry: pa.Table  # carried columns of row i at index i (no columns if none carried)
    num_clamped: int  # input rows whose max_tokens was cut to fit the model's context
    num_truncated: int = 0  # input rows whose prompt was truncated (input.truncate)
    files: list[InputFile] = field(default_factory=list)  # the input files, as scanned
    skipped_files: list[str] = field(default_factory=list)  # unreadable files left out, and why

    def without_rows(self, done: np.ndarray) -> PreparedInput:
        """The same input with the rows `done` (sorted row indices) left out of the work;
        ids and carried columns stay indexed by row, for all rows."""
        if not len(done):
            return self
        return replace(
            self,
            requests=[r for r, gone in zip(self.requests, in_rows(self.requests, done)) if not gone],
            errors=[e for e, gone in zip(self.errors, in_rows(self.errors, done)) if not gone],
        )

    @property
    def num_rows(self) -> int:
        """Input rows."""
        return len(self.ids)

    @property
    def num_output_rows(self) -> int:
        """One per request (sample) plus one per error row."""
        return len(self.requests) + len(self.errors)


def in_rows(items: Sequence[Request | Completion], rows: np.ndarray) -> np.ndarray:
    """[len(items)] bool: whether each request's or error row's row index is in `rows`."""
    return np.isin(np.fromiter((x.row_index for x in items), np.int64, len(items)), rows)


def input_columns(spec: InputSpec) -> InputColumns:
    return InputColumns(
        id_column=spec.id_column,
        prompt_column=spec.prompt_column,
        messages_column=spec.messages_column,
        carry_columns=spec.carry_columns,
        override_columns=SAMPLING_FIELDS,
        continuations_column=spec.continuations_column,
        openai_batch=spec.format == "openai",
    )


def prepare_input(
    files: Sequence[InputFile],
    spec: InputSpec,
    sampling: SamplingSpec,
    tokenizer: PromptTokenizer,
    *,
    on_batch: Callable[[int], None] | None = None,
    job_files: Sequence[InputFile] | None = None,
) -> PreparedInput:
    """Stream every file once; `on_batch(num_rows)` after each batch (for progress).

    `job_files`: all the job's files when `files` is a part of them (column types are the
    job's); ids and carried columns are then indexed from the first row of `files`."""
    columns = input_columns(spec)
    requests: list[Request] = []
    errors: list[Completion] = []
    id_chunks: list[pa.Array] = []
    carry_chunks: list[pa.Table] = []
    num_clamped = num_truncated = 0
    for batch in iter_input_batches(files, columns, storage_options=spec.storage_options, job_files=job_files):
        table = batch.table
        id_chunks.extend(table.column(spec.id_column).chunks)
        carry_chunks.append(table.select(list(spec.carry_columns)))
        for item in _batch_requests(batch, spec, sampling, tokenizer):
            if isinstance(item, Completion):
                errors.append(item)
            else:
                row_requests, clamped, truncated = item
                requests.extend(row_requests)
                num_clamped += clamped
                num_truncated += truncated
        if on_batch:
            on_batch(table.num_rows)
    return PreparedInput(
        files=list(files),
        requests=requests,
        errors=errors,
        ids=pa.chunked_array(id_chunks, type=id_chunks[0].type if id_chunks else pa.string()),
        carry=pa.concat_tables(carry_chunks) if carry_chunks else pa.table({}),
        num_clamped=num_clamped,
        num_truncated=num_truncated,
    )


def _batch_requests(
    batch: InputBatch, spec: InputSpec, sampling: SamplingSpec, tokenizer: PromptTokenizer
) -> Iterator[Completion | tuple[list[Request], bool, bool]]:
    """Each row as an error row, or as (its requests, max_tokens clamped?, prompt truncated?)."""
    if spec.continuations_column is not None:
        yield from _scoring_requests(batch, spec, sampling, tokenizer)
        return
    table = batch.table
    ids = table.column(spec.id_column).to_pylist()
    encoded = _encode(_row_values(table.column(spec.text_column)), spec, tokenizer)
    overrides = {name: table.column(name).to_pylist() for name in SAMPLING_FIELDS if name in table.column_names}
    unsupported = table.column(UNSUPPORTED).to_pylist() if UNSUPPORTED in table.column_names else [None] * len(ids)
    for offset, (row_id, token_ids) in enumerate(zip(ids, encoded)):
        row_index = batch.first_row_index + offset
        if unsupported[offset] is not None:  # an OpenAI Batch request that cannot run as asked
            yield _error_row(row_index, RowError("unsupported_request", unsupported[offset]), token_ids)
            continue
        row = {name: values[offset] for name, values in overrides.items()}
        settings = token_ids if isinstance(token_ids, RowError) else row_sampling(sampling, row)
        if isinstance(settings, RowError):
            yield _error_row(row_index, settings, token_ids)
            continue
        requests = make_requests(
            row_index,
            row_id,
            token_ids,  # type: ignore[arg-type]
            settings,
            job_seed=sampling.seed,
            has_row_seed=row.get("seed") is not None,
            context_length=tokenizer.context_length,
            truncate=spec.truncate,
            overflow=spec.max_tokens_overflow,
            vocab_size=tokenizer.vocab_size,
        )
        if isinstance(requests, RowError):
            yield _error_row(row_index, requests, token_ids)
        else:
            fitted = requests[0]
            clamped = fitted.sampling.max_tokens < settings.max_tokens
            yield (requests, clamped, len(fitted.token_ids) < len(token_ids))  # type: ignore[arg-type]


def _scoring_requests(
    batch: InputBatch, spec: InputSpec, sampling: SamplingSpec, tokenizer: PromptTokenizer
) -> Iterator[Completion | tuple[list[Request], bool, bool]]:
    """`task: score`: per row one request per continuation (`sample_index` its position), the
    prompt's tokens then the continuation's, nothing generated; or an error row.

    Tokenization (lm-evaluation-harness' convention): the context and each continuation are
    tokenized separately and joined, the continuation without special tokens; whitespace at
    the end of a raw-text context moves to the front of each continuation first, so
    "Answer: " + "Paris" is scored as "Answer:" + " Paris". A chat-templated context is kept
    as the template renders it (its generation prompt opened).
    """
    table = batch.table
    continuations = table.column(spec.continuations_column).to_pylist()
    values = _row_values(table.column(spec.text_column))
    moved = [""] * len(values)
    if not tokenizer.use_template:
        for i, value in enumerate(values):
            if isinstance(value, str):
                kept = value.rstrip()
                values[i], moved[i] = kept, value[len(kept) :]
    contexts = _encode(values, spec, tokenizer)
    overrides = {name: table.column(name).to_pylist() for name in SAMPLING_FIELDS if name in table.column_names}
    for offset, (context, choices) in enumerate(zip(contexts, continuations, strict=True)):
        row_index = batch.first_row_index + offset
        settings = row_sampling(sampling, {name: values_[offset] for name, values_ in overrides.items()})
        problem = context if isinstance(context, RowError) else settings if isinstance(settings, RowError) else None
        problem = problem or _check_continuations(choices)
        if problem is not None:
            yield _error_row(row_index, problem, context)
            continue
        encoded = tokenizer.tokenizer([moved[offset] + c for c in choices], add_special_tokens=False)["input_ids"]
        params = SamplingParams(max_tokens=0, prompt_logprobs=settings.prompt_logprobs)
        requests = []
        for choice, tokens in enumerate(encoded):
            total = len(context) + len(tokens)
            limit = tokenizer.context_length
            if limit is not None and total > limit:
                msg = f"the prompt and continuation {choice} have {total} tokens; the model's context is {limit}"
                problem = RowError("prompt_too_long", msg)
                break
            requests.append(Request(row_index, tuple(context + tokens), params, sample_index=choice,
                                    num_scored_tokens=len(tokens)))
        if problem is not None:
            yield _error_row(row_index, problem, context)
        else:
            yield (requests, False, False)


def _check_continuations(choices: object) -> RowError | None:
    if not isinstance(choices, list) or not choices:
        return RowError("invalid_continuations", "the continuations must be a non-empty list of strings")
    for position, choice in enumerate(choices):
        if not isinstance(choice, str) or not choice.strip():
            return RowError("invalid_continuations", f"continuation {position} is empty or null")
    return None


def _encode(values: list, spec: InputSpec, tokenizer: PromptTokenizer) -> list[list[int] | RowError]:
    """Token ids per row of the text column's `values` (`_row_values`), or why not:
    undecodable or oversized rows are refused untokenized."""
    values = list(values)
    for i, value in enumerate(values):
        num_chars = 0 if isinstance(value, RowError) else _num_chars(value)
        if num_chars > spec.max_prompt_chars:
            values[i] = RowError(
                "prompt_too_large",
                f"the prompt has {num_chars} characters; input.max_prompt_chars is {spec.max_prompt_chars}",
            )
    todo = [i for i, value in enumerate(values) if not isinstance(value, RowError)]
    results: list[list[int] | RowError] = list(values)  # type: ignore[arg-type]
    for i, encoded in zip(todo, tokenizer.encode([values[i] for i in todo])):
        results[i] = encoded
    return results


def _row_values(column: pa.ChunkedArray) -> list:
    """The column as Python values; a row whose strings are not valid UTF-8 as a `RowError`."""
    try:
        return column.to_pylist()
    except UnicodeDecodeError:
        pass
    values = []
    for i in range(len(column)):  # only for a batch holding a bad row: find which
        try:
            values.append(column[i].as_py())
        except UnicodeDecodeError as exc:
            values.append(RowError("invalid_utf8", f"the prompt is not valid UTF-8 ({exc.reason} at byte {exc.start})"))
    return values


def _num_chars(value) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):  # messages
        return sum(len(m.get("content") or "") for m in value if isinstance(m, dict))
    return 0


def _error_row(row_index: int, error: RowError, token_ids) -> Completion:
    num_tokens = 0 if isinstance(token_ids, RowError) else len(token_ids)
    return error_completion(row_index, error.code, error.message, num_prompt_tokens=num_tokens)
