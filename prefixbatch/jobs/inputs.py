"""A job's input, read once: the files checked, every row a request or an error row.

Everything here runs before any weights load, for `validate`, `plan` and `run` alike.
"""

from __future__ import annotations

from dataclasses import replace

import pyarrow as pa

from prefixbatch.jobs.progress import JobProgress
from prefixbatch.jobs.spec import JobSpec
from prefixbatch.pipeline.prepare import PreparedInput, input_columns, prepare_input
from prefixbatch.pipeline.reader import check_ids, scan_inputs
from prefixbatch.pipeline.tokenize import PromptTokenizer, prompt_tokenizer


def job_tokenizer(spec: JobSpec) -> PromptTokenizer:
    return prompt_tokenizer(spec.model, messages=spec.input.messages_column is not None)


def read_job_input(
    spec: JobSpec, *, show_progress: bool = False, live_progress: bool | None = None
) -> PreparedInput:
    """Job-level input checks, then every row as a request or an error row. No weights loaded."""
    files, _, skipped = scan_job_input(spec)
    tokenizer = job_tokenizer(spec)
    if not show_progress:
        prepared = prepare_input(files, spec.input, spec.sampling, tokenizer)
    else:
        total = sum(f.num_rows for f in files)
        with JobProgress(total, label="tokenizing", count_tokens=False, live=live_progress) as progress:
            prepared = prepare_input(
                files, spec.input, spec.sampling, tokenizer, on_batch=lambda rows: progress.advance(rows, 0)
            )
    return replace(prepared, skipped_files=skipped)


def scan_job_input(spec: JobSpec) -> tuple[list, pa.ChunkedArray, list[str]]:
    """The input files (footers checked), every row's id (unique, non-null), the files skipped."""
    columns = input_columns(spec.input)
    skipped: list[str] | None = [] if spec.input.ignore_corrupt_files else None
    files = scan_inputs(spec.input.paths, columns, storage_options=spec.input.storage_options, skipped=skipped)
    ids = check_ids(files, columns, storage_options=spec.input.storage_options)
    return files, ids, skipped or []
