"""Running one job end to end: check → read and tokenize → generate → write → summarize.

Order matters for the user: everything that can be wrong with the spec, the input files
or the model folder is found before the model's weights are loaded, and the output folder
is claimed before any generation, so a mistake costs seconds, not a run.
Invariant: the output holds exactly one row per sample of each input row (n rows for a row
with `n` samples, `sample_index` 0..n-1) and one row per error row: every (id, sample_index)
exactly once.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace

import pyarrow as pa

import prefixbatch
from prefixbatch.executors.base import Executor, ExecutorStats, create_executor
from prefixbatch.faults import fault_point
from prefixbatch.jobs.fingerprint import job_fingerprint
from prefixbatch.executors.model_folder import check_model_folder
from prefixbatch.jobs.progress import JobProgress
from prefixbatch.jobs.spec import JobSpec
from prefixbatch.pipeline.prepare import PreparedInput, input_columns, prepare_input
from prefixbatch.pipeline.reader import check_ids, scan_inputs
from prefixbatch.pipeline.tokenize import PromptTokenizer
from prefixbatch.pipeline.commits import SUMMARY, CommitRecord, OutputFolder, indices_to_ranges
from prefixbatch.pipeline.writer import completions_to_table, output_schema
from prefixbatch.types import Completion


@dataclass(frozen=True)
class RunSummary:
    """What a run did; also written as `summary.json` beside the parts."""

    job: str
    output_path: str
    input_rows: int
    rows: int  # output rows: one per sample (n per input row), one per error row
    error_rows: int
    errors_by_code: dict[str, int]
    prompt_tokens: int
    output_tokens: int
    cached_prompt_tokens: int
    executor: str  # the executor kind that ran the job
    prefill_tokens_computed: int  # prompt tokens whose KV the executor computed
    decode_tokens_computed: int  # tokens fed back while decoding (hf: padded batch rows included)
    rows_with_clamped_max_tokens: int
    rows_with_truncated_prompt: int  # input.truncate left / right
    skipped_input_files: list[str]  # unreadable files left out (input.ignore_corrupt_files)
    resumed_rows: int  # input rows committed by earlier runs into the same folder (resume)
    wall_s: float  # the whole run: reading, loading the model, generating, writing
    generate_s: float  # from the first request handed to the executor to the last part written
    output_tokens_per_s: float  # this run's output tokens / generate_s
    parts: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def output_metadata(spec: JobSpec) -> dict[str, str]:
    return {
        "prefixbatch.job": spec.name,
        "prefixbatch.model": spec.model.path,
        "prefixbatch.version": prefixbatch.__version__,
    }


def prompt_tokenizer(spec: JobSpec) -> PromptTokenizer:
    return PromptTokenizer(
        spec.model.path,
        text_kind="messages" if spec.input.messages_column else "prompt",
        chat_template=spec.model.chat_template,
        trust_remote_code=spec.model.trust_remote_code,
    )


def read_job_input(
    spec: JobSpec, *, show_progress: bool = False, live_progress: bool | None = None
) -> PreparedInput:
    """Job-level input checks, then every row as a request or an error row. No weights loaded."""
    columns = input_columns(spec.input)
    skipped: list[str] | None = [] if spec.input.ignore_corrupt_files else None
    files = scan_inputs(spec.input.paths, columns, storage_options=spec.input.storage_options, skipped=skipped)
    check_ids(files, columns, storage_options=spec.input.storage_options)
    tokenizer = prompt_tokenizer(spec)
    if not show_progress:
        prepared = prepare_input(files, spec.input, spec.sampling, tokenizer)
    else:
        total = sum(f.num_rows for f in files)
        with JobProgress(total, label="tokenizing", count_tokens=False, live=live_progress) as progress:
            prepared = prepare_input(
                files, spec.input, spec.sampling, tokenizer, on_batch=lambda rows: progress.advance(rows, 0)
            )
    return replace(prepared, skipped_files=skipped or [])


def check_job(spec: JobSpec) -> str:
    """Everything `run` checks before loading weights, without writing anything."""
    check_model_folder(spec.model.path)
    prepared = read_job_input(spec)
    output = _output_folder(spec)
    committed = output.check(job_fingerprint(spec, prepared.files))
    resumed = f", {committed} already committed (resume)" if committed else ""
    return (
        f"{prepared.num_rows} rows, {len(prepared.requests)} to generate, "
        f"{len(prepared.errors)} would be error rows{resumed}"
    )


def _output_folder(spec: JobSpec) -> OutputFolder:
    return OutputFolder(spec.output.path, mode=spec.output.mode, storage_options=spec.output.storage_options)


def run_job(spec: JobSpec, *, live_progress: bool | None = None, log: Callable[[str], None] = print) -> RunSummary:
    """Read, claim the output, generate what is not committed yet, commit part by part, finish.

    Killed at any point, the same call with `output.mode: resume` runs only the rows no
    commit covers; the finished output equals that of a run that never stopped.
    """
    start = time.monotonic()
    check_model_folder(spec.model.path)
    prepared = read_job_input(spec, show_progress=True, live_progress=live_progress)
    fault_point("tokenized")
    log(f"read {prepared.num_rows} rows: {len(prepared.requests)} to generate, {len(prepared.errors)} error rows")
    for problem in prepared.skipped_files:
        log(f"skipped (input.ignore_corrupt_files): {problem}")
    output = _output_folder(spec)
    writer = PartWriter(output, prepared, spec)  # checks the output columns before any model work
    committed = output.open(job_fingerprint(spec, prepared.files))
    todo = prepared.without_rows(committed)
    if len(committed):
        log(f"resuming: {len(committed)} input rows were committed before; running the other {prepared.num_rows - len(committed)}")
    executor = create_executor(spec.model, spec.executor) if todo.requests else None
    with JobProgress(todo.num_output_rows, live=live_progress) as progress:
        generated = executor.generate(todo.requests) if executor is not None else ()
        for completion in _all_completions(todo, generated):
            writer.add(completion)
            progress.advance(1, completion.num_output_tokens)
        writer.flush()
    records = output.write_manifest(
        prepared.num_rows, extra={"job": spec.name, "skipped_input_files": prepared.skipped_files}
    )
    summary = summarize(
        spec,
        prepared,
        records,
        executor,
        resumed_rows=len(committed),
        run_output_tokens=sum(r.stats["output_tokens"] for r in writer.records),
        parts=output.part_urls(records),
        wall_s=time.monotonic() - start,
        generate_s=progress.elapsed_s,
    )
    output.write_json(SUMMARY, summary.to_dict())
    output.mark_success(records)
    return summary


def _all_completions(prepared: PreparedInput, generated: Iterable[Completion]) -> Iterable[Completion]:
    yield from prepared.errors
    yield from generated


class PartWriter:
    """Collects completions until whole input rows (every sample) are done, and commits them
    part by part: every `rows_per_part` output rows, sorted by (row, sample), one part and one
    commit record. A row's id and carried values repeat on each of its samples."""

    def __init__(self, output: OutputFolder, prepared: PreparedInput, spec: JobSpec) -> None:
        self.output = output
        self.prepared = prepared
        self.rows_per_part = spec.output.rows_per_part
        self.metadata = output_metadata(spec)
        carry_fields = list(prepared.carry.schema)
        self.schema = output_schema(prepared.ids.type, carry_fields, id_column=spec.input.id_column)
        self.samples_left = Counter(r.row_index for r in prepared.requests)
        self.samples_left.update(e.row_index for e in prepared.errors)
        self.pending: dict[int, list[Completion]] = {}  # rows with samples still running
        self.ready: list[Completion] = []  # whole rows, not yet written
        self.records: list[CommitRecord] = []

    def add(self, completion: Completion) -> None:
        row = completion.row_index
        self.pending.setdefault(row, []).append(completion)
        self.samples_left[row] -= 1
        if self.samples_left[row] == 0:
            del self.samples_left[row]
            self.ready += self.pending.pop(row)
            if len(self.ready) >= self.rows_per_part:
                self.flush()

    def flush(self) -> None:
        """Write and commit the whole rows collected so far."""
        if not self.ready:
            return
        rows = sorted(self.ready, key=lambda c: (c.row_index, c.sample_index))
        self.ready = []
        indices = pa.array([c.row_index for c in rows], type=pa.int64())
        table = completions_to_table(
            rows,
            ids=self.prepared.ids.take(indices),
            carry=self.prepared.carry.take(indices) if self.prepared.carry.num_columns else None,
            schema=self.schema,
        )
        unit, name, num_bytes = self.output.write_part(table, metadata=self.metadata)
        record = CommitRecord(
            unit=unit,
            part=name,
            rows=indices_to_ranges(c.row_index for c in rows),
            num_output_rows=len(rows),
            num_bytes=num_bytes,
            stats=_part_stats(rows),
        )
        self.output.commit(record)
        self.records.append(record)


def _part_stats(rows: list[Completion]) -> dict:
    errors = Counter(c.error.split(":", 1)[0] for c in rows if c.error is not None)
    return {
        "prompt_tokens": sum(c.num_prompt_tokens for c in rows),
        "output_tokens": sum(c.num_output_tokens for c in rows),
        "cached_prompt_tokens": sum(c.num_cached_prompt_tokens for c in rows),
        "errors_by_code": dict(errors),
    }


def summarize(
    spec: JobSpec,
    prepared: PreparedInput,
    records: list[CommitRecord],
    executor: Executor | None,
    *,
    resumed_rows: int,
    run_output_tokens: int,
    parts: list[str],
    wall_s: float,
    generate_s: float,
) -> RunSummary:
    """The whole output's counts (every commit, earlier runs' too); this run's executor work."""
    totals: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    for record in records:
        totals["rows"] += record.num_output_rows
        for key in ("prompt_tokens", "output_tokens", "cached_prompt_tokens"):
            totals[key] += record.stats.get(key, 0)
        errors.update(record.stats.get("errors_by_code", {}))
    stats = executor.stats if executor is not None else ExecutorStats()
    kind = type(executor).__name__.removesuffix("Executor").lower() if executor is not None else "none"
    return RunSummary(
        job=spec.name,
        output_path=spec.output.path,
        input_rows=prepared.num_rows,
        rows=totals["rows"],
        error_rows=sum(errors.values()),
        errors_by_code=dict(sorted(errors.items())),
        prompt_tokens=totals["prompt_tokens"],
        output_tokens=totals["output_tokens"],
        cached_prompt_tokens=totals["cached_prompt_tokens"],
        executor=kind,
        prefill_tokens_computed=stats.num_prefill_tokens,
        decode_tokens_computed=stats.num_decode_tokens,
        rows_with_clamped_max_tokens=prepared.num_clamped,
        rows_with_truncated_prompt=prepared.num_truncated,
        skipped_input_files=prepared.skipped_files,
        resumed_rows=resumed_rows,
        wall_s=round(wall_s, 3),
        generate_s=round(generate_s, 3),
        output_tokens_per_s=round(run_output_tokens / max(generate_s, 1e-9), 2),
        parts=parts,
    )
