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
from dataclasses import asdict, dataclass, field

import pyarrow as pa

import prefixbatch
from prefixbatch.executors.base import Executor, create_executor
from prefixbatch.executors.model_folder import check_model_folder
from prefixbatch.jobs.progress import JobProgress
from prefixbatch.jobs.spec import JobSpec
from prefixbatch.pipeline.prepare import PreparedInput, input_columns, prepare_input
from prefixbatch.pipeline.reader import check_ids, scan_inputs
from prefixbatch.pipeline.tokenize import PromptTokenizer
from prefixbatch.pipeline.writer import OutputFolder, completions_to_table, output_schema
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
    wall_s: float  # the whole run: reading, loading the model, generating, writing
    generate_s: float  # from the first request handed to the executor to the last part written
    output_tokens_per_s: float  # output tokens / generate_s
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
    files = scan_inputs(spec.input.paths, columns, storage_options=spec.input.storage_options)
    check_ids(files, columns, storage_options=spec.input.storage_options)
    tokenizer = prompt_tokenizer(spec)
    if not show_progress:
        return prepare_input(files, spec.input, spec.sampling, tokenizer)
    total = sum(f.num_rows for f in files)
    with JobProgress(total, label="tokenizing", count_tokens=False, live=live_progress) as progress:
        return prepare_input(
            files, spec.input, spec.sampling, tokenizer, on_batch=lambda rows: progress.advance(rows, 0)
        )


def check_job(spec: JobSpec) -> str:
    """Everything `run` checks before loading weights, without writing anything."""
    check_model_folder(spec.model.path)
    prepared = read_job_input(spec)
    OutputFolder(spec.output.path, mode=spec.output.mode, storage_options=spec.output.storage_options).check()
    return (
        f"{prepared.num_rows} rows, {len(prepared.requests)} to generate, "
        f"{len(prepared.errors)} would be error rows"
    )


def run_job(spec: JobSpec, *, live_progress: bool | None = None, log: Callable[[str], None] = print) -> RunSummary:
    start = time.monotonic()
    check_model_folder(spec.model.path)
    prepared = read_job_input(spec, show_progress=True, live_progress=live_progress)
    log(f"read {prepared.num_rows} rows: {len(prepared.requests)} to generate, {len(prepared.errors)} error rows")
    output = OutputFolder(spec.output.path, mode=spec.output.mode, storage_options=spec.output.storage_options)
    writer = PartWriter(output, prepared, spec)  # checks the output columns before any model work
    output.prepare()
    executor = create_executor(spec.model, spec.executor)
    with JobProgress(prepared.num_output_rows, live=live_progress) as progress:
        for completion in _all_completions(prepared, executor.generate(prepared.requests)):
            writer.add(completion)
            progress.advance(1, completion.num_output_tokens)
        writer.flush()
    summary = summarize(
        spec, prepared, writer, executor, wall_s=time.monotonic() - start, generate_s=progress.elapsed_s
    )
    output.write_json("_summary.json", summary.to_dict())
    return summary


def _all_completions(prepared: PreparedInput, generated: Iterable[Completion]) -> Iterable[Completion]:
    yield from prepared.errors
    yield from generated


class PartWriter:
    """Buffers completions and writes a part file every `rows_per_part` rows, sorted by
    (row, sample); a row's id and carried values repeat on each of its samples."""

    def __init__(self, output: OutputFolder, prepared: PreparedInput, spec: JobSpec) -> None:
        self.output = output
        self.prepared = prepared
        self.rows_per_part = spec.output.rows_per_part
        self.metadata = output_metadata(spec)
        carry_fields = list(prepared.carry.schema)
        self.schema = output_schema(prepared.ids.type, carry_fields, id_column=spec.input.id_column)
        self.buffer: list[Completion] = []
        self.parts: list[str] = []
        self.counts: Counter[str] = Counter()
        self.totals = Counter()

    def add(self, completion: Completion) -> None:
        self.buffer.append(completion)
        if len(self.buffer) >= self.rows_per_part:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        rows = sorted(self.buffer, key=lambda c: (c.row_index, c.sample_index))
        self.buffer = []
        indices = pa.array([c.row_index for c in rows], type=pa.int64())
        table = completions_to_table(
            rows,
            ids=self.prepared.ids.take(indices),
            carry=self.prepared.carry.take(indices) if self.prepared.carry.num_columns else None,
            schema=self.schema,
        )
        self.parts.append(self.output.write_part(table, metadata=self.metadata))
        for c in rows:
            self.totals["rows"] += 1
            self.totals["prompt_tokens"] += c.num_prompt_tokens
            self.totals["output_tokens"] += c.num_output_tokens
            self.totals["cached_prompt_tokens"] += c.num_cached_prompt_tokens
            if c.error is not None:
                self.counts[c.error.split(":", 1)[0]] += 1


def summarize(
    spec: JobSpec,
    prepared: PreparedInput,
    writer: PartWriter,
    executor: Executor,
    *,
    wall_s: float,
    generate_s: float,
) -> RunSummary:
    totals = writer.totals
    return RunSummary(
        job=spec.name,
        output_path=spec.output.path,
        input_rows=prepared.num_rows,
        rows=totals["rows"],
        error_rows=sum(writer.counts.values()),
        errors_by_code=dict(sorted(writer.counts.items())),
        prompt_tokens=totals["prompt_tokens"],
        output_tokens=totals["output_tokens"],
        cached_prompt_tokens=totals["cached_prompt_tokens"],
        executor=type(executor).__name__.removesuffix("Executor").lower(),
        prefill_tokens_computed=executor.stats.num_prefill_tokens,
        decode_tokens_computed=executor.stats.num_decode_tokens,
        rows_with_clamped_max_tokens=prepared.num_clamped,
        wall_s=round(wall_s, 3),
        generate_s=round(generate_s, 3),
        output_tokens_per_s=round(totals["output_tokens"] / max(generate_s, 1e-9), 2),
        parts=writer.parts,
    )
