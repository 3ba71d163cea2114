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
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import numpy as np

import prefixbatch
from prefixbatch.executors.base import Executed, ExecutorStats, StopFlag
from prefixbatch.executors.loop import generate_into
from prefixbatch.executors.registry import ResolvedExecutor, create_executor
from prefixbatch.faults import fault_point
from prefixbatch.jobs.fingerprint import job_fingerprint
from prefixbatch.jobs.inputs import read_job_input, scan_job_input
from prefixbatch.jobs.planning import (
    plan_job,
    plan_settings,
    plan_summary,
    resolve_job_executor,
    with_loaded_cache,
)
from prefixbatch.jobs.progress import JobProgress
from prefixbatch.jobs.signals import JobStopped
from prefixbatch.jobs.spec import JobSpec, with_local_model
from prefixbatch.model_folder import check_model_folder, gguf_source, model_name
from prefixbatch.periodic import Periodic
from prefixbatch.pipeline.checkpoints import Checkpoints, continue_from
from prefixbatch.pipeline.commits import (
    OPENAI_OUTPUT,
    SUMMARY,
    CommitRecord,
    OutputFolder,
    committed_rows,
    indices_to_ranges,
)
from prefixbatch.pipeline.config import SAMPLING_FIELDS
from prefixbatch.pipeline.openai_batch import response_lines
from prefixbatch.pipeline.parts import PartWriter, RowColumns, samples_per_row
from prefixbatch.pipeline.prepare import PreparedInput, input_columns
from prefixbatch.pipeline.reader import batch_schema
from prefixbatch.pipeline.writer import output_schema


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
    rows_resumed_mid_generation: int  # input rows this run continued from a checkpoint's tokens
    tokens_reused_from_checkpoints: int  # generated tokens it did not generate again
    wall_s: float  # the whole run: reading, loading the model, generating, writing
    generate_s: float  # from the first request handed to the executor to the last part written
    output_tokens_per_s: float  # this run's output tokens / generate_s
    # Structured-output rows cut by max_tokens before their grammar completed (not valid JSON etc.).
    constrained_rows_cut_by_max_tokens: int = 0
    parts: list[str] = field(default_factory=list)
    shards: list[dict] = field(default_factory=list)  # cluster.kind dask: what each shard ran, where
    plan: dict | None = None  # what the plan predicted (`plan --json` shows the same), its digest
    executed: dict = field(default_factory=dict)  # what the executors did: groups, prefill, decode, peak KV

    def to_dict(self) -> dict:
        return asdict(self)


def output_metadata(spec: JobSpec) -> dict[str, str]:
    return {
        "prefixbatch.job": spec.name,
        "prefixbatch.model": spec.model.path,
        "prefixbatch.version": prefixbatch.__version__,
    }


def _open_output(spec: JobSpec, prepared: PreparedInput, log: Callable[[str], None]) -> tuple[OutputFolder, PartWriter, np.ndarray]:
    """Claim the output folder for this input: the driver's writer and the rows already committed."""
    for problem in prepared.skipped_files:
        log(f"skipped (input.ignore_corrupt_files): {problem}")
    output = _output_folder(spec, prepared)
    writer = part_writer(output, prepared, spec)  # checks the output columns before any model work
    committed = output.open(job_fingerprint(spec, prepared.files))
    if len(committed):
        log(f"resuming: {len(committed)} input rows were committed before; running the other {prepared.num_rows - len(committed)}")
    return output, writer, committed


def check_job(spec: JobSpec) -> str:
    """Everything `run` checks before loading weights, without writing anything: a line on
    the rows, then what `run` would do to them that the spec alone does not say."""
    return inspect_job(spec)[0]


def inspect_job(spec: JobSpec) -> tuple[str, PreparedInput]:
    """`check_job`'s report, and the input as `run` would read it."""
    spec = with_local_model(spec, weights=False)
    check_model_folder(spec.model.path)
    device = _where(spec, resolve_job_executor(spec))
    _refuse_input_in_output(spec)
    prepared = read_job_input(spec)
    output = _output_folder(spec, prepared)
    committed = len(output.check(job_fingerprint(spec, prepared.files)))
    resumed = f", {committed} already committed (resume)" if committed else ""
    lines = [
        f"{prepared.num_rows} rows, {len(prepared.requests)} to generate, "
        f"{len(prepared.errors)} would be error rows{resumed}; {device}"
    ]
    gguf = gguf_source(spec.model.path)
    if gguf is not None:
        from prefixbatch.executors.gguf import GgufInfo

        lines.append(f"  model: {GgufInfo(**gguf).summary()}")
    return "\n".join(lines + _row_notes(prepared)), prepared


def _row_notes(prepared: PreparedInput, num_ids: int = 3) -> list[str]:
    """Error rows by code (with their first ids), the per-row sampling columns found, and the
    rows whose max_tokens would be clamped or prompt truncated."""
    notes = []
    by_code: dict[str, list[int]] = {}
    for error in prepared.errors:
        by_code.setdefault(error.error.split(":", 1)[0], []).append(error.row_index)
    for code, rows in sorted(by_code.items()):
        ids = ", ".join(repr(prepared.ids[row].as_py()) for row in rows[:num_ids])
        more = ", ..." if len(rows) > num_ids else ""
        notes.append(f"  {len(rows)} error row(s) {code}: ids {ids}{more}")
    columns: dict[str, int] = {}
    for file in prepared.files:
        for name in SAMPLING_FIELDS:
            if name in file.schema.names:
                columns[name] = columns.get(name, 0) + 1
    if columns:
        found = ", ".join(
            name + ("" if count == len(prepared.files) else f" (in {count} of {len(prepared.files)} files)")
            for name, count in columns.items()
        )
        notes.append(f"  per-row sampling from input columns: {found} (non-null values override the spec)")
    if prepared.num_clamped:
        notes.append(f"  {prepared.num_clamped} row(s) get max_tokens clamped to fit the model's context")
    if prepared.num_truncated:
        notes.append(f"  {prepared.num_truncated} row(s) get their prompt truncated (input.truncate)")
    return notes


def _where(spec: JobSpec, resolved: ResolvedExecutor) -> str:
    """Where the job would run, said in words. A Dask job's device is the workers' business."""
    if spec.cluster.kind == "dask":
        return f"device {spec.executor.device} on the Dask workers"
    return f"device {resolved.device}" + (" (auto)" if spec.executor.device == "auto" else "")


def committed_before(spec: JobSpec, prepared: PreparedInput) -> np.ndarray:
    """The input rows an earlier run committed that this one keeps (resume); writes nothing."""
    return _output_folder(spec, prepared).check(job_fingerprint(spec, prepared.files))


def _output_folder(spec: JobSpec, prepared: PreparedInput | None = None) -> OutputFolder:
    """The job's output folder; refused where it holds any of `prepared`'s input files."""
    output = OutputFolder(spec.output.path, mode=spec.output.mode, storage_options=spec.output.storage_options)
    if prepared is not None:
        output.refuse_inputs_inside([file.url for file in prepared.files], spec.input.storage_options)
    return output


def _refuse_input_in_output(spec: JobSpec) -> None:
    """Before any input is read: no input path (or what its glob can match) lies in the output
    folder. Checked again on the files found (`_output_folder`), links resolved."""
    _output_folder(spec).refuse_inputs_inside(spec.input.paths, spec.input.storage_options)


def run_job(
    spec: JobSpec,
    *,
    live_progress: bool | None = None,
    log: Callable[[str], None] = print,
    stop: StopFlag | None = None,
    log_every_s: float = 5.0,
) -> RunSummary:
    """Read, claim the output, generate what is not committed yet, commit part by part, finish.

    Killed at any point, the same call with `output.mode: resume` runs only the rows no
    commit covers; the finished output equals that of a run that never stopped. Once `stop`
    is set, no new step or shard starts, the whole rows generated so far are committed, and
    `JobStopped` says how many rows are in.
    """
    start = time.monotonic()
    spec = with_local_model(spec)  # a Hub id: fetched, or found in the cache
    check_model_folder(spec.model.path)
    # What runs the job, on which device, holding how much KV: decided once, before anything
    # is written (an executor not installed, a device this machine lacks: refused here).
    resolved = resolve_job_executor(spec)
    _refuse_input_in_output(spec)
    show = _Show(live_progress, log, stop, log_every_s)
    if spec.cluster.kind != "dask":
        return _run(spec, resolved, None, start, show)
    from prefixbatch.cluster.config import ClusterJob
    from prefixbatch.cluster.dask_run import DaskSession

    with DaskSession(ClusterJob.of(spec), resolved) as cluster:  # workers load the engine while the driver reads
        run = _run_planned_on_workers if spec.cluster.plan_on == "workers" else _run
        summary = run(spec, resolved, cluster, start, show)
    # Once the run's own workers are gone: a part that a worker the scheduler had given up
    # for dead wrote late is not the result's (never committed, never read), but not left.
    _output_folder(spec).remove_stray_parts()
    return summary


@dataclass(frozen=True)
class _Show:
    """How a run talks to its user: progress display, log lines, and the stop flag it obeys."""

    live: bool | None
    log: Callable[[str], None]
    stop: StopFlag | None
    log_every_s: float

    def progress(self, total: int, **options) -> JobProgress:
        return JobProgress(total, live=self.live, log_every_s=self.log_every_s, **options)

    @property
    def stopping(self) -> bool:
        return self.stop is not None and self.stop.is_set()


def _run(spec: JobSpec, resolved: ResolvedExecutor, cluster, start: float, show: _Show) -> RunSummary:
    prepared = read_job_input(spec, show_progress=True, live_progress=show.live)
    fault_point("tokenized")
    log = show.log
    log(f"read {prepared.num_rows} rows: {len(prepared.requests)} to generate, {len(prepared.errors)} error rows")
    output, writer, committed = _open_output(spec, prepared, log)
    todo = prepared.without_rows(committed)
    checkpoints = Checkpoints(output)
    todo, partials = _continue_from_checkpoints(resolved, todo, checkpoints, log)
    executor = None
    if cluster is None and todo.requests and not show.stopping:
        # Loaded before planning: an engine that sizes its own KV cache (vLLM) tells the plan
        # what it really holds.
        executor = create_executor(spec.model, spec.executor, resolved)
        resolved = with_loaded_cache(resolved, spec, executor)
    work = plan_job(spec, resolved, todo.requests, num_shards=cluster.num_shards() if cluster else 1)
    plan = work.plan
    log(
        f"plan {plan.digest()}: {_count(plan.num_groups, 'group')}, {_count(plan.num_shards, 'shard')},"
        f" {plan.num_prefill_tokens} prefill tokens, up to {plan.num_decode_tokens} output tokens"
    )
    with show.progress(todo.num_output_rows, work=(plan.num_prefill_tokens, plan.num_decode_tokens)) as progress:
        for completion in todo.errors:
            writer.add(completion)
            progress.advance(1, 0)
        writer.flush()
        if cluster is not None and todo.requests and not show.stopping:
            executed = cluster.run(work, todo, output, writer, progress, log=log, stop=show.stop)
        else:
            executed = None
            if executor is not None:
                executed = _generate_here(spec, resolved, executor, work, writer, progress, show, checkpoints, partials)
        writer.flush()
    if show.stopping:
        raise _stopped(spec, prepared, output)
    resumed = {"rows": len({k[0] for k in partials}), "tokens": sum(map(len, partials.values()))}
    return _finish(
        spec, prepared, output, writer, executed, committed, progress, start, plan=plan_summary(work), partials=resumed
    )


def _continue_from_checkpoints(resolved: ResolvedExecutor, todo: PreparedInput, checkpoints: Checkpoints, log):
    """The requests with an earlier run's checkpointed tokens carried on (executors that can
    continue them); the partial generations used, by (row, sample)."""
    if not resolved.kind.resumes_generations:
        return todo, {}
    requests, used = continue_from(todo.requests, checkpoints.load())
    if used:
        log(
            f"resuming mid-generation: {len(used)} samples continue from {sum(map(len, used.values()))}"
            " tokens checkpointed by an earlier run"
        )
    return replace(todo, requests=requests), used


def _generate_here(
    spec: JobSpec, resolved: ResolvedExecutor, executor, work, writer: PartWriter, progress: JobProgress, show: _Show,
    checkpoints: Checkpoints, partials,
) -> Executed | None:
    """The plan on this process's executor (the loop every run calls); its work shown while
    steps run, rows as they finish."""
    if show.stopping:
        return None
    with _Watch(executor, progress):
        generate_into(
            executor, resolved, work, writer, checkpoints,
            checkpoint_seconds=spec.output.checkpoint_seconds, stop=show.stop, known=partials,
            on_completion=lambda completion, unused: progress.advance(
                1, completion.num_output_tokens, unused_tokens=unused
            ),
        )
    return Executed(resolved.name, executor.stats)


class _Watch(Periodic):
    """Shows an executor's prefill and decode tokens every `every_s` while it generates (rows
    finish in bursts; tokens flow every step). Output tokens of finished rows are counted by
    `advance`; the decode tokens of rows still running show as running work."""

    def __init__(self, executor, progress: JobProgress, every_s: float = 0.5) -> None:
        super().__init__(every_s, self._report, name="prefixbatch-progress", final=True)
        self.executor, self.progress = executor, progress
        self.before = executor.stats.copy()

    def _report(self) -> None:
        done, progress = self.executor.stats.since(self.before), self.progress
        decoding = max(done.num_decode_tokens - progress.output_tokens, 0)
        progress.running("here", 0, decoding, done.num_prefill_tokens)


def _stopped(spec: JobSpec, prepared: PreparedInput, output: OutputFolder) -> JobStopped:
    records, _ = output.load_records()
    return JobStopped(
        reason="stop requested",
        committed_rows=len(committed_rows(records)),
        total_rows=prepared.num_rows,
        output_path=spec.output.path,
    )


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _run_planned_on_workers(spec: JobSpec, resolved: ResolvedExecutor, cluster, start: float, show: _Show) -> RunSummary:
    """`cluster.plan_on: workers`: the driver reads only ids; the workers tokenize, the driver
    partitions by leading tokens, each partition is planned and run on a worker."""
    files, ids, skipped = scan_job_input(spec)
    carry = batch_schema(files, input_columns(spec.input)).empty_table().select(list(spec.input.carry_columns))
    prepared = PreparedInput([], [], ids, carry, num_clamped=0, files=files, skipped_files=skipped)
    log = show.log
    output, writer, committed = _open_output(spec, prepared, log)
    with show.progress(prepared.num_rows, label="tokenizing", count_tokens=False) as progress:
        chunks, keys = cluster.tokenize_on_workers(files, committed, progress)
    prepared = replace(
        prepared, num_clamped=sum(k.num_clamped for k in keys), num_truncated=sum(k.num_truncated for k in keys)
    )
    total = sum(len(k.request_rows) + len(k.error_rows) for k in keys)
    log(f"read {prepared.num_rows} rows on the workers: {total} output rows to write")
    found = {}
    if resolved.kind.resumes_generations:
        done = set(np.asarray(committed).tolist())
        found = {key: tokens for key, tokens in Checkpoints(output).load().items() if key[0] not in done}
    if found:
        log(f"resuming mid-generation: {len(found)} samples have checkpointed tokens; their workers continue them")
    with show.progress(total) as progress:
        settings = plan_settings(spec, resolved, num_shards=1)  # each partition is one shard, planned on its worker
        executed = None
        if total and not show.stopping:
            executed = cluster.run_partitions(
                files, chunks, keys, settings, output, writer, progress, log=log, stop=show.stop, partials=found
            )
    if show.stopping:
        raise _stopped(spec, prepared, output)
    shards = executed.shards if executed is not None else []
    resumed = {"rows": sum(s.resumed[0] for s in shards), "tokens": sum(s.resumed[1] for s in shards)}
    return _finish(spec, prepared, output, writer, executed, committed, progress, start, plan=None, partials=resumed)


def _finish(
    spec: JobSpec, prepared: PreparedInput, output, writer, executed, committed, progress, start: float, *,
    plan: dict | None, partials: dict | None = None,
) -> RunSummary:
    """Manifest, summary and `_SUCCESS` once every row is committed."""
    records = output.write_manifest(
        prepared.num_rows, extra={"job": spec.name, "skipped_input_files": prepared.skipped_files}
    )
    summary = summarize(
        spec,
        prepared,
        records,
        executed,
        plan=plan,
        resumed_rows=len(committed),
        partials=partials or {"rows": 0, "tokens": 0},
        run_output_tokens=sum(r.stats["output_tokens"] for r in [*writer.records, *_shard_records(executed)]),
        parts=output.part_urls(records),
        wall_s=time.monotonic() - start,
        generate_s=progress.elapsed_s,
    )
    output.write_json(SUMMARY, summary.to_dict())
    if spec.output.format == "openai":
        _write_openai_output(spec, prepared, output, records)
    output.mark_success(records)
    return summary


def _write_openai_output(spec: JobSpec, prepared: PreparedInput, output: OutputFolder, records) -> None:
    """`output.format: openai`: the response lines, from the committed parts alone."""
    rows = [row for record in records for row in output.read_part(record).to_pylist()]
    order = {row_id: i for i, row_id in enumerate(prepared.ids.to_pylist())}
    lines = response_lines(rows, model=model_name(spec.model.path), order=order)
    output.write_file(OPENAI_OUTPUT, ("\n".join(lines) + "\n").encode())


def _shard_records(executed: Executed | None) -> list:
    """The parts a cluster's workers wrote in this run (the driver's writer holds the rest)."""
    return [record for shard in (executed.shards if executed else []) for record in shard.records]


def part_writer(output: OutputFolder, prepared: PreparedInput, spec: JobSpec) -> PartWriter:
    """The driver's writer: commits every part it writes."""
    schema = output_schema(prepared.ids.type, list(prepared.carry.schema), id_column=spec.input.id_column)
    return PartWriter(
        output,
        RowColumns(prepared.ids, prepared.carry),
        schema=schema,
        metadata=output_metadata(spec),
        rows_per_part=spec.output.rows_per_part,
        samples_per_row=samples_per_row(prepared.requests, prepared.errors),
        commit=True,
    )


def summarize(
    spec: JobSpec,
    prepared: PreparedInput,
    records: list[CommitRecord],
    executed: Executed | None,
    *,
    plan: dict | None,
    resumed_rows: int,
    partials: dict,
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
        for key in ("prompt_tokens", "output_tokens", "cached_prompt_tokens", "constrained_cut"):
            totals[key] += record.stats.get(key, 0)
        errors.update(record.stats.get("errors_by_code", {}))
    stats = executed.stats if executed is not None else ExecutorStats()
    kind = "none" if executed is None else executed.kind
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
        rows_resumed_mid_generation=partials["rows"],
        tokens_reused_from_checkpoints=partials["tokens"],
        wall_s=round(wall_s, 3),
        generate_s=round(generate_s, 3),
        output_tokens_per_s=round(run_output_tokens / max(generate_s, 1e-9), 2),
        constrained_rows_cut_by_max_tokens=totals["constrained_cut"],
        parts=parts,
        shards=[
            {
                "shard": s.shard_id,
                "worker": s.worker,
                "pid": s.pid,
                "requests": s.num_requests,
                "prefill_tokens": s.stats.num_prefill_tokens,
                "decode_tokens": s.stats.num_decode_tokens,
                "rows": indices_to_ranges(s.rows),
                "engine_load_s": round(s.engine_load_s, 3),
                "engine_loaded_at": s.engine_loaded_at,
                "generate_s": round(s.generate_s, 3),
                "started": s.started,
                "finished": s.finished,
            }
            for s in (executed.shards if executed else [])
        ],
        plan=plan,
        executed={
            "groups": stats.num_groups,
            "prefill_tokens": stats.num_prefill_tokens,
            "decode_tokens": stats.num_decode_tokens,
            "peak_kv_tokens": stats.peak_kv_tokens,
            "steps": stats.num_steps,
        },
    )
