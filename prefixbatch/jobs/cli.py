"""The `prefixbatch` command: run, validate, plan, make-test-model, demo, spec-reference.

Exit codes: 0 success; 2 a user's mistake (one message, no traceback; `--debug` shows it);
3 the job finished but more rows than `max_error_fraction` are error rows; 130 / 143 `run`
stopped by SIGINT (Ctrl-C) / SIGTERM after committing what was complete; 1 an internal
error. Verbs are thin: each calls one function of `jobs/`.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import traceback
from collections.abc import Sequence

from prefixbatch.errors import UserError


def _add_spec_args(parser: argparse.ArgumentParser, *, optional: bool = False) -> None:
    parser.add_argument("spec", nargs="?" if optional else None, help="job spec file (.yaml, .yml, .toml or .json)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override a spec field, e.g. --set sampling.max_tokens=64 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prefixbatch",
        description="Offline batch LLM inference over Parquet that computes each shared prefix once.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for every error")
    parser.add_argument("--version", action="version", version=f"prefixbatch {_version()}")
    # `--debug` is accepted after the verb too; SUPPRESS keeps a sub-parser from resetting it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB", parser_class=_sub_parser(common))

    run = verbs.add_parser("run", help="run a job: Parquet prompts in, Parquet completions out")
    _add_spec_args(run)
    run.add_argument("--overwrite", action="store_true", help="same as --set output.mode=overwrite")
    run.add_argument("--resume", action="store_true", help="same as --set output.mode=resume")
    run.add_argument("--no-progress", action="store_true", help="plain log lines instead of a live bar")
    run.add_argument(
        "--log-every", type=float, default=5.0, metavar="SECONDS",
        help="seconds between progress lines when there is no live bar (default 5)",
    )
    run.set_defaults(func=cmd_run)

    validate = verbs.add_parser("validate", help="check the spec, input files and model folder; load no weights")
    _add_spec_args(validate, optional=True)
    validate.add_argument(
        "--errors", metavar="FILE.jsonl", help="write every row that would be an error row (id, code, message)"
    )
    validate.add_argument(
        "--explain", metavar="FIELD",
        help="print a spec field's type, default, allowed values and meaning (e.g. sampling.max_tokens; a section"
        " such as sampling lists its fields) instead of validating; needs no spec file",
    )
    validate.set_defaults(func=cmd_validate)

    plan = verbs.add_parser(
        "plan", help="tokenize, build the global prefix tree and the plan, report sharing; load no weights"
    )
    _add_spec_args(plan)
    plan.add_argument("--json", action="store_true", help="print the report as JSON")
    plan.add_argument(
        "--shards", type=_positive, default=None, metavar="K",
        help="preview a cut into K shards (default: the run's: 1, or Dask workers × shards_per_worker)",
    )
    plan.add_argument(
        "--kv-budget", type=_positive, default=None, metavar="TOKENS",
        help="same as --set executor.kv_budget_tokens=TOKENS",
    )
    plan.add_argument("--report", metavar="FILE.html", help="write a picture of the prefix sharing (HTML)")
    plan.add_argument(
        "--estimate", action="store_true",
        help="load the model and time a short calibration on the job's own requests to estimate the run's time",
    )
    plan.set_defaults(func=cmd_plan)

    make_model = verbs.add_parser("make-test-model", help="write a small random-weight Hugging Face model folder")
    make_model.add_argument("dir", help="folder to write the checkpoint into")
    make_model.add_argument("--arch", choices=["llama", "qwen2", "qwen3"], default="llama")
    make_model.add_argument(
        "--size", choices=["tiny", "small", "qwen2.5-0.5b", "llama-3.2-1b", "kv-heavy"], default="tiny",
        help="tiny/small: test sizes; qwen2.5-0.5b/llama-3.2-1b: those checkpoints' shapes and "
        "architecture, random weights, for benchmarks; kv-heavy: Llama-3.1-8B's KV bytes per token "
        "and little else (the over-capacity benchmark)",
    )
    make_model.add_argument("--seed", type=int, default=0)
    make_model.set_defaults(func=cmd_make_test_model)

    demo = verbs.add_parser("demo", help="make a tiny model and sample prompts, run a job, show the output")
    demo.add_argument("dir", nargs="?", default="demo", help="working folder (default: ./demo)")
    demo.set_defaults(func=cmd_demo)

    reference = verbs.add_parser(
        "spec-reference", help="write the job spec reference (Markdown) generated from the spec's models"
    )
    reference.add_argument(
        "--output", metavar="FILE.md", help="file to write (default: print it); the project's is docs/spec.md"
    )
    reference.set_defaults(func=cmd_spec_reference)
    return parser


def _version() -> str:
    from prefixbatch import __version__

    return __version__


def _sub_parser(common: argparse.ArgumentParser) -> type[argparse.ArgumentParser]:
    class SubParser(argparse.ArgumentParser):
        def __init__(self, **kwargs):
            super().__init__(parents=[common], **kwargs)

    return SubParser


def _load(args: argparse.Namespace, extra: Sequence[str] = ()):
    from prefixbatch.jobs.spec import load_spec

    return load_spec(args.spec, [*args.overrides, *extra])


def cmd_run(args: argparse.Namespace) -> int:
    from prefixbatch.jobs.run import run_job
    from prefixbatch.jobs.signals import GracefulStop, JobStopped

    if args.overwrite and args.resume:
        raise UserError("--overwrite and --resume cannot be used together")
    mode = ["output.mode=overwrite"] if args.overwrite else ["output.mode=resume"] if args.resume else []
    spec = _load(args, mode)
    with GracefulStop(_info) as stop:
        try:
            summary = run_job(
                spec, live_progress=False if args.no_progress else None, log=_info, stop=stop.event,
                log_every_s=args.log_every,
            )
        except JobStopped as stopped:
            _info(f"{stopped}; to finish the job, run:\n  {_resume_command(args)}")
            return stop.exit_code
    _report_run(summary)
    error_fraction = summary.error_rows / max(summary.input_rows, 1)
    if error_fraction > spec.max_error_fraction:
        print(
            f"error: {summary.error_rows} of {summary.input_rows} input rows ({error_fraction:.1%}) are error"
            f" rows, above max_error_fraction {spec.max_error_fraction}; every row was written"
            " (see the error column and _summary.json)",
            file=sys.stderr,
        )
        return 3
    return 0


def _report_run(summary) -> None:
    inputs = f" from {summary.input_rows} input rows" if summary.input_rows != summary.rows else ""
    earlier = f", {summary.resumed_rows} of them committed by earlier runs" if summary.resumed_rows else ""
    if summary.rows_resumed_mid_generation:
        earlier += (
            f", {summary.rows_resumed_mid_generation} continued from checkpoints"
            f" ({summary.tokens_reused_from_checkpoints} generated tokens reused)"
        )
    _info(
        f"done: {summary.rows} rows{inputs}{earlier} ({summary.error_rows} errors), "
        f"{summary.output_tokens} output tokens, "
        f"{summary.output_tokens_per_s:.1f} tok/s while generating, {summary.wall_s:.1f}s in all "
        f"→ {summary.output_path}"
    )
    if summary.executor == "none":
        _info("nothing was left to generate: every row was committed before (or is an error row)")
    else:
        _info(
            f"{summary.executor} executor: computed {summary.prefill_tokens_computed} prefill tokens for "
            f"{summary.prompt_tokens} prompt tokens ({summary.cached_prompt_tokens} reused), "
            f"{summary.decode_tokens_computed} decode tokens"
        )
    if summary.errors_by_code:
        _info("error rows by code: " + ", ".join(f"{k}={v}" for k, v in summary.errors_by_code.items()))
    if summary.constrained_rows_cut_by_max_tokens:
        _info(
            f"{summary.constrained_rows_cut_by_max_tokens} structured-output rows reached max_tokens before their"
            " grammar completed (finish_reason length: not valid yet); raise sampling.max_tokens"
        )


def _resume_command(args: argparse.Namespace) -> str:
    """The command that finishes a stopped run: the same spec and overrides, with --resume."""
    words = ["prefixbatch", "run", args.spec]
    for override in args.overrides:
        words += ["--set", override]
    if args.no_progress:
        words.append("--no-progress")
    return shlex.join([*words, "--resume"])


def cmd_validate(args: argparse.Namespace) -> int:
    if args.explain is not None:
        from prefixbatch.jobs.spec_reference import explain

        print(explain(args.explain))
        return 0
    if args.spec is None:
        raise UserError("validate needs a spec file (or --explain FIELD to look a field up)")
    from prefixbatch.jobs.run import inspect_job

    spec = _load(args)
    report, prepared = inspect_job(spec)
    print(f"{args.spec}: OK — {report}")
    if args.errors:
        with open(args.errors, "w", encoding="utf-8") as out:
            for error in prepared.errors:
                code, _, message = error.error.partition(": ")
                row_id = prepared.ids[error.row_index].as_py()
                out.write(json.dumps({"id": row_id, "code": code, "message": message}, default=str) + "\n")
        _info(f"wrote {len(prepared.errors)} error row(s) to {args.errors}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from prefixbatch.jobs.plan import plan_report, plan_text, preview_job, write_plan_report
    from prefixbatch.jobs.spec import with_local_model

    spec = with_local_model(_load(args, [f"executor.kv_budget_tokens={args.kv_budget}"] if args.kv_budget else []), weights=False)
    job = preview_job(spec, num_shards=args.shards)
    report = plan_report(job, spec)
    if args.estimate:
        from prefixbatch.jobs.plan import estimate_text, estimate_time

        report["estimate"] = estimate_time(job, spec)
    text = plan_text(job, report) + ("\n" + estimate_text(report["estimate"]) if args.estimate else "")
    print(json.dumps(report, indent=2) if args.json else text)
    if args.report:
        _info(f"wrote {write_plan_report(job, spec, args.report, report)}")
    return 0


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def cmd_make_test_model(args: argparse.Namespace) -> int:
    from prefixbatch.executors.random_model import arch_for, make_test_model

    folder = make_test_model(args.dir, arch=args.arch, size=args.size, seed=args.seed)
    print(f"wrote a {args.size} {arch_for(args.size, args.arch)} test model to {folder}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from prefixbatch.jobs.demo import run_demo

    run_demo(args.dir, log=_info)
    return 0


def cmd_spec_reference(args: argparse.Namespace) -> int:
    from pathlib import Path

    from prefixbatch.jobs.spec_reference import spec_reference_markdown

    text = spec_reference_markdown()
    if args.output is None:
        print(text, end="")
        return 0
    path = Path(args.output)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    _info(f"wrote {path}")
    return 0


def _info(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "stopped at once (interrupted): what was committed is kept; run the same command with"
            " --resume to finish the job",
            file=sys.stderr,
        )
        return 130
    except Exception as exc:
        if args.debug:
            traceback.print_exc()
        else:
            print(f"internal error: {type(exc).__name__}: {exc}\n(run with --debug for the traceback)", file=sys.stderr)
        return 1
