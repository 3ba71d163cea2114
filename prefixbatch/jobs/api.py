"""The Python API: validate, plan and run a job from a notebook, a script or an orchestrator.

The same calls the CLI makes, without its printing or exit codes: mistakes raise
`UserError` (with the message the CLI would print), results come back as objects.

    import prefixbatch

    spec = prefixbatch.load_job({"name": "j", "input": {...}, "output": {...}, "model": {...}})
    print(prefixbatch.validate(spec))          # what run would do; nothing written
    preview = prefixbatch.plan(spec)           # the plan run executes; no weights loaded
    print(preview.plan.explain(), preview.plan.digest())
    summary = prefixbatch.run(spec)            # RunSummary; also in the folder's _summary.json
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from prefixbatch.jobs.spec import JobSpec, load_spec, spec_from_dict

JobLike = JobSpec | str | Path | Mapping[str, Any]


def load_job(job: JobLike, *, overrides: Sequence[str] = (), base_dir: str | Path | None = None) -> JobSpec:
    """A validated `JobSpec` from a spec file's path, a dict, or a `JobSpec` (returned as is).

    `overrides` are `section.field=value` strings, as `--set` takes them (files only); a
    dict's relative local paths resolve against `base_dir` (default: the working folder).
    """
    if isinstance(job, JobSpec):
        return job
    if isinstance(job, (str, Path)):
        return load_spec(job, list(overrides))
    if isinstance(job, Mapping):
        return spec_from_dict(dict(job), base_dir=Path(base_dir or Path.cwd()).resolve(), source="job dict")
    raise TypeError(f"`job` must be a JobSpec, a spec file path or a dict, got {type(job).__name__}")


def validate(job: JobLike) -> str:
    """Everything `run` checks before loading weights (spec, input files, ids, model folder,
    output folder); a one-line account of the rows. Writes nothing."""
    from prefixbatch.jobs.run import check_job

    return check_job(load_job(job))


def plan(job: JobLike, *, num_shards: int | None = None):
    """The plan `run` would execute now (`JobPlan`: `.plan`, `.work`, `.prepared`), made
    exactly as `run` makes it; no weights loaded. `num_shards` previews another cut."""
    from prefixbatch.jobs.plan import preview_job

    return preview_job(load_job(job), num_shards=num_shards)


def run(
    job: JobLike, *, progress: bool = False, log: Callable[[str], None] | None = None, stop: Any = None
):
    """Run the job to its output folder; the `RunSummary`. `progress=True` shows a live bar
    on a terminal; `log` receives the run's log lines (default: dropped). Setting `stop` (a
    `threading.Event`) from another thread stops the run gracefully: it commits the whole
    rows generated so far and raises `JobStopped`; run again with `output.mode: resume`."""
    from prefixbatch.jobs.run import run_job

    return run_job(
        load_job(job), live_progress=None if progress else False, log=log or (lambda _: None), stop=stop
    )


__all__ = ["JobLike", "load_job", "plan", "run", "validate"]
