"""A job's input, read once: the files checked, every row a request or an error row.

Everything here runs before any weights load, for `validate`, `plan` and `run` alike.
"""

from __future__ import annotations

from dataclasses import replace

import pyarrow as pa

from prefixbatch.errors import SpecError
from prefixbatch.jobs.progress import JobProgress
from prefixbatch.jobs.spec import JobSpec
from prefixbatch.model_folder import read_config
from prefixbatch.pipeline.prepare import PreparedInput, input_columns, prepare_input
from prefixbatch.pipeline.reader import check_ids, scan_inputs
from prefixbatch.pipeline.tokenize import PromptTokenizer, prompt_tokenizer
from prefixbatch.types import SamplingParams


def job_tokenizer(spec: JobSpec) -> PromptTokenizer:
    return prompt_tokenizer(spec.model, messages=spec.input.messages_column is not None)


def read_job_input(
    spec: JobSpec,
    *,
    show_progress: bool = False,
    live_progress: bool | None = None,
    tokenizer: PromptTokenizer | None = None,
) -> PreparedInput:
    """Job-level input checks, then every row as a request or an error row. No weights loaded.
    `tokenizer`: the job's (`job_tokenizer`), when the caller keeps one loaded."""
    files, _, skipped = scan_job_input(spec)
    tokenizer = tokenizer or job_tokenizer(spec)
    check_constraint(spec, tokenizer)
    if not show_progress:
        prepared = prepare_input(files, spec.input, spec.sampling, tokenizer)
    else:
        total = sum(f.num_rows for f in files)
        with JobProgress(total, label="tokenizing", count_tokens=False, live=live_progress) as progress:
            prepared = prepare_input(
                files, spec.input, spec.sampling, tokenizer, on_batch=lambda rows: progress.advance(rows, 0)
            )
    return replace(prepared, skipped_files=skipped)


def check_constraint(spec: JobSpec, tokenizer: PromptTokenizer) -> None:
    """The spec's own structured-output constraint compiles against the model's vocabulary
    (else a job error naming the field); a row's own is checked when it runs (an error row)."""
    sampling = spec.sampling
    field = next((f for f in ("json_schema", "regex", "choice") if getattr(sampling, f) is not None), None)
    if field is None:
        return
    from prefixbatch.executors.grammar import check_spec_constraint  # xgrammar: only for such jobs
    from prefixbatch.pipeline.requests import request_params

    vocab_size = read_config(spec.model.path).get("vocab_size") or len(tokenizer.tokenizer)
    problem = check_spec_constraint(SamplingParams(**request_params(sampling)), tokenizer.tokenizer, vocab_size)
    if problem is not None:
        raise SpecError(f"sampling.{field}: {problem}")


def scan_job_input(spec: JobSpec) -> tuple[list, pa.ChunkedArray, list[str]]:
    """The input files (footers checked), every row's id (unique, non-null), the files skipped."""
    columns = input_columns(spec.input)
    skipped: list[str] | None = [] if spec.input.ignore_corrupt_files else None
    files = scan_inputs(spec.input.paths, columns, storage_options=spec.input.storage_options, skipped=skipped)
    ids = check_ids(files, columns, storage_options=spec.input.storage_options)
    return files, ids, skipped or []
