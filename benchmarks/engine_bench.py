"""Native engine vs the hf executor: throughput on jobs with and without prefix sharing.

Every scenario runs on the `small` test model (Llama, 8 layers, hidden 512, vocabulary
8,192; built once into `--model-dir`), fp32 on the CPU, on `torch.set_num_threads(2)`.
Prompts are token ids drawn uniformly from the tokenizer's regular vocabulary (no special
ids); requests are greedy except in (d).

    a  system prompt: 64 prompts = one 1,024-token prefix + a unique 64-token suffix; 32 new tokens
    b  two-level few-shot tree: 4 instructions (128) x 8 few-shot blocks (256) x 8 questions (32);
       32 new tokens
    c  no sharing: 64 prompts of 32-512 tokens, 16-64 new tokens
    d  n samples: one 512-token prompt, 32 requests (temperature 1.0, seeds 1000..1031); 64 new tokens
    e  long-document QA: 8 documents (900-1,100 tokens) x 8 questions (16-48) each, 32 new
       tokens, in three input orders: random shuffle; tiled (every question of document 1,
       then document 2, ...); interleaved (question 1 of every document, then question 2, ...)

`--scale s` multiplies every count and length (and max_tokens) by s, at least 1.

`--model smollm2` runs the trained SmolLM2-135M-Instruct (30 layers, hidden 576, vocabulary
49,152; the PyPI wheel's GGUF file dequantized once, `real_chats.py`) on real chats:

    chat-shared   2 long system prompts (~220 tokens) × 32 questions, up to 128 new tokens
    chat-unique   64 short chats, each under a system prompt of its own (little to share),
                  up to 128 new tokens

rows ending at end-of-sequence at natural lengths.

Each executor is loaded once per process and reused by every repeat (loading is not timed);
one warm-up call runs first. A run is planning the requests as a job's run does
(`plan_requests` with the executor's settings: hf without sharing) and
`list(executor.generate(plan))`, timed wall clock;
the figures are the median run of `--repeats`, executors (and e's three orders) alternating
within a repeat so that drift in the load of the shared machine hits them alike. Reported per scenario and executor: requests/s,
output tokens/s, prefill tokens computed (`executor.stats.num_prefill_tokens`) against the
planner's unique prompt tokens (`plan.stats.num_unique_tokens`, the least any
executor must compute), native/hf output tokens/s, and for native the peak KV tokens held
(`stats.peak_kv_tokens`) against the KV budget. `native-noshare` is the native engine with
`executor.prefix_sharing: false` (the ablation), run on (a), (b), (d). `native-invariant`
is the native engine with `executor.native.batch_invariant: true` (exact seeded samples
whatever the batch; what that costs) and `native-16k-steps` native with
`executor.native.max_step_tokens: 16384` (the GPU default; against the CPU's 2,048) run only
when named in `--executors`.

    .venv/bin/python benchmarks/engine_bench.py                       # everything, full scale
    .venv/bin/python benchmarks/engine_bench.py --scenario a --scale 0.25 --repeats 1
    .venv/bin/python benchmarks/engine_bench.py --json results.json
    .venv/bin/python benchmarks/engine_bench.py --model smollm2      # the trained model's chats
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from prefixbatch.executors.base import ExecutorStats
from prefixbatch.executors.config import ExecutorSpec, ModelSpec
from prefixbatch.executors.hf import HfExecutor
from prefixbatch.executors.native.executor import NativeExecutor
from prefixbatch.executors.random_model import make_test_model
from prefixbatch.jobs.planning import DEFAULT_CPU_KV_BUDGET
from prefixbatch.prefix_tree import PlanSettings, plan_requests
from prefixbatch.types import Request, SamplingParams

ABLATION_SCENARIOS = ("a", "b", "d", "chat-shared")
EXECUTORS = ("native", "native-noshare", "hf", "native-invariant", "native-16k-steps")
DEFAULT_EXECUTORS = ("native", "native-noshare", "hf")


@dataclass(frozen=True)
class Workload:
    name: str  # "a", ..., "e-tiled"
    title: str
    requests: list[Request]


@dataclass
class Result:
    scenario: str
    executor: str
    num_requests: int
    seconds: list[float]  # every repeat
    num_output_tokens: int
    num_prefill_tokens: int
    num_prompt_tokens: int
    num_unique_tokens: int  # the planner's: prefill with exact sharing
    peak_kv_tokens: int | None  # native only
    kv_budget_tokens: int | None  # native only
    ratio_to_hf: float | None = None  # output tokens/s over hf's on the same scenario
    extra: dict = field(default_factory=dict)

    @property
    def median_seconds(self) -> float:
        return statistics.median(self.seconds)

    @property
    def requests_per_s(self) -> float:
        return self.num_requests / self.median_seconds

    @property
    def output_tokens_per_s(self) -> float:
        return self.num_output_tokens / self.median_seconds


# Scenarios --------------------------------------------------------------------------------


class Prompts:
    """Random token ids from the regular vocabulary, at a scale."""

    def __init__(self, vocab_size: int, special_ids: list[int], scale: float, seed: int, tokenizer=None) -> None:
        regular = np.setdiff1d(np.arange(vocab_size), special_ids)
        self.tokenizer = tokenizer  # for the real-text scenarios
        self.regular = regular
        self.scale = scale
        self.rng = np.random.default_rng(seed)

    def n(self, value: float) -> int:
        """A count or length at this scale (at least 1)."""
        return max(1, round(value * self.scale))

    def tokens(self, length: int) -> list[int]:
        return self.rng.choice(self.regular, size=length).tolist()

    def between(self, low: int, high: int) -> int:
        """A length uniform in [low, high], both scaled."""
        return int(self.rng.integers(self.n(low), self.n(high) + 1))


def _greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens)


def _requests(prompts: list[list[int]], params: list[SamplingParams]) -> list[Request]:
    return [Request(i, tuple(p), s) for i, (p, s) in enumerate(zip(prompts, params, strict=True))]


def system_prompt(p: Prompts) -> list[Workload]:
    system = p.tokens(p.n(1024))
    prompts = [system + p.tokens(p.n(64)) for _ in range(p.n(64))]
    title = f"system prompt: {len(prompts)} × ({len(system)} shared + {p.n(64)}), {p.n(32)} new"
    return [Workload("a", title, _requests(prompts, [_greedy(p.n(32))] * len(prompts)))]


def few_shot_tree(p: Prompts) -> list[Workload]:
    num_inst, num_blocks, num_questions = p.n(4), p.n(8), p.n(8)
    prompts = []
    for _ in range(num_inst):
        instruction = p.tokens(p.n(128))
        for _ in range(num_blocks):
            block = p.tokens(p.n(256))
            prompts += [instruction + block + p.tokens(p.n(32)) for _ in range(num_questions)]
    title = (
        f"few-shot tree: {num_inst} instr ({p.n(128)}) × {num_blocks} blocks ({p.n(256)}) × "
        f"{num_questions} questions ({p.n(32)}), {p.n(32)} new"
    )
    return [Workload("b", title, _requests(prompts, [_greedy(p.n(32))] * len(prompts)))]


def no_sharing(p: Prompts) -> list[Workload]:
    count = p.n(64)
    prompts = [p.tokens(p.between(32, 512)) for _ in range(count)]
    params = [_greedy(p.between(16, 64)) for _ in range(count)]
    title = f"no sharing: {count} prompts of {p.n(32)}–{p.n(512)}, {p.n(16)}–{p.n(64)} new"
    return [Workload("c", title, _requests(prompts, params))]


def n_samples(p: Prompts) -> list[Workload]:
    prompt, count = p.tokens(p.n(512)), p.n(32)
    params = [SamplingParams(max_tokens=p.n(64), temperature=1.0, seed=1000 + k) for k in range(count)]
    requests = [Request(0, tuple(prompt), s, sample_index=k) for k, s in enumerate(params)]
    title = f"n samples: 1 prompt ({len(prompt)}), n = {count}, T = 1.0, {p.n(64)} new"
    return [Workload("d", title, requests)]


def document_qa(p: Prompts) -> list[Workload]:
    num_docs, num_questions = p.n(8), p.n(8)
    docs = [p.tokens(p.between(900, 1100)) for _ in range(num_docs)]
    questions = [[p.tokens(p.between(16, 48)) for _ in range(num_questions)] for _ in range(num_docs)]
    tiled = [(d, q) for d in range(num_docs) for q in range(num_questions)]
    orders = {
        "random": [tiled[i] for i in p.rng.permutation(len(tiled))],
        "tiled": tiled,
        "interleaved": [(d, q) for q in range(num_questions) for d in range(num_docs)],
    }
    out = []
    for order, pairs in orders.items():
        prompts = [docs[d] + questions[d][q] for d, q in pairs]
        title = (
            f"document QA, {order} order: {num_docs} docs ({p.n(900)}–{p.n(1100)}) × "
            f"{num_questions} questions ({p.n(16)}–{p.n(48)}), {p.n(32)} new"
        )
        out.append(Workload(f"e-{order}", title, _requests(prompts, [_greedy(p.n(32))] * len(prompts))))
    return out


def real_chats(p: Prompts) -> list[Workload]:
    """The trained model's chat jobs (`real_chats.py`; `--scale` does not apply)."""
    sys.path.insert(0, str(Path(__file__).parent))
    import real_chats as chats

    return [
        Workload("chat-shared", "chats: 2 system prompts (~220 tokens) × 32 questions, ≤ 128 new (natural ends)",
                 chats.chat_shared(p.tokenizer)),
        Workload("chat-unique", "chats: 64 short ones, each under a system prompt of its own, ≤ 128 new (natural ends)",
                 chats.chat_unique(p.tokenizer)),
    ]


SCENARIOS: dict[str, Callable[[Prompts], list[Workload]]] = {
    "a": system_prompt,
    "b": few_shot_tree,
    "c": no_sharing,
    "d": n_samples,
    "e": document_qa,
    "chat": real_chats,
}
RANDOM_SCENARIOS = ("a", "b", "c", "d", "e")


# Running ----------------------------------------------------------------------------------


def load_executors(model_dir: Path, names: list[str], kv_budget: int | None) -> dict[str, object]:
    model = ModelSpec(path=str(model_dir), dtype="float32")
    executors: dict[str, object] = {}
    for name in names:
        if name == "hf":
            executors[name] = HfExecutor(model, ExecutorSpec(kind="hf", device="cpu"))
        else:
            spec = ExecutorSpec(
                kind="native",
                device="cpu",
                kv_budget_tokens=kv_budget,
                prefix_sharing=name != "native-noshare",
                native={"batch_invariant": name == "native-invariant",
                        "max_step_tokens": 16_384 if name == "native-16k-steps" else None},
            )
            executors[name] = NativeExecutor(model, spec)
        executors[name].plan_settings = PlanSettings(
            kv_budget_tokens=kv_budget or DEFAULT_CPU_KV_BUDGET,
            prefix_sharing=name not in ("native-noshare", "hf"),
        )
    warm_up = [Request(0, tuple(range(5, 69)), _greedy(4))]
    for executor in executors.values():
        list(executor.generate(plan_requests(warm_up, executor.plan_settings)))
    return executors


def _reset_stats(executor: object) -> None:
    # Stats accumulate over an executor's life; each timed run starts from zero.
    holder = getattr(executor, "engine", executor)
    holder.stats = ExecutorStats()


def timed_run(executor: object, requests: list[Request]) -> tuple[float, int, ExecutorStats]:
    _reset_stats(executor)
    start = time.perf_counter()
    completions = list(executor.generate(plan_requests(requests, executor.plan_settings)))
    seconds = time.perf_counter() - start
    assert len(completions) == len(requests)
    return seconds, sum(c.num_output_tokens for c in completions), executor.stats


def run_scenario(
    workloads: list[Workload], executors: dict[str, object], *, repeats: int, kv_budget: int
) -> list[Result]:
    """Every workload of a scenario (e's three orders) on every executor, `repeats` times.

    Workloads and executors alternate within each repeat, so drift in the machine's load
    hits them alike; the median run of each pair is reported.
    """
    cases = [
        (workload, name)
        for workload in workloads
        for name in executors
        if name != "native-noshare" or workload.name in ABLATION_SCENARIOS
    ]
    runs: dict[tuple[str, str], list[tuple[float, int, ExecutorStats]]] = {}
    for repeat in range(repeats):
        for workload, name in cases:
            seconds, num_out, stats = timed_run(executors[name], workload.requests)
            runs.setdefault((workload.name, name), []).append((seconds, num_out, stats))
            print(
                f"  {workload.name:14s} {name:15s} run {repeat + 1}/{repeats}: {seconds:7.2f} s, "
                f"{num_out} output tokens, {stats.num_prefill_tokens} prefill",
                file=sys.stderr,
                flush=True,
            )
    results = []
    for workload in workloads:
        plan = plan_requests(workload.requests, PlanSettings(kv_budget_tokens=kv_budget)).plan
        num_prompt_tokens = sum(r.num_prompt_tokens for r in workload.requests)
        results += _results(workload, runs, num_prompt_tokens, plan.stats.num_unique_tokens, kv_budget)
    return results


def _results(workload: Workload, runs, num_prompt_tokens: int, num_unique: int, kv_budget: int) -> list[Result]:
    results = []
    for (name_of_workload, name), measured in runs.items():
        if name_of_workload != workload.name:
            continue
        seconds = [s for s, _, _ in measured]
        _, num_out, stats = measured[int(np.argsort(seconds)[len(seconds) // 2])]  # the median run
        is_native = name != "hf"
        results.append(
            Result(
                scenario=workload.name,
                executor=name,
                num_requests=len(workload.requests),
                seconds=seconds,
                num_output_tokens=num_out,
                num_prefill_tokens=stats.num_prefill_tokens,
                num_prompt_tokens=num_prompt_tokens,
                num_unique_tokens=num_unique,
                peak_kv_tokens=stats.peak_kv_tokens if is_native else None,
                kv_budget_tokens=kv_budget if is_native else None,
                extra={"num_steps": stats.num_steps, "num_decode_tokens": stats.num_decode_tokens},
            )
        )
    hf = next((r for r in results if r.executor == "hf"), None)
    for result in results:
        if hf is not None and result is not hf:
            result.ratio_to_hf = result.output_tokens_per_s / hf.output_tokens_per_s
    return results


# Reporting --------------------------------------------------------------------------------


def markdown_table(results: list[Result]) -> str:
    head = (
        "| scenario | executor | requests/s | output tok/s | native/hf | prefill computed | "
        "planner unique | prompt tokens | peak KV / budget | median s |"
    )
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in results:
        ratio = f"{r.ratio_to_hf:.2f}×" if r.ratio_to_hf is not None else ""
        peak = f"{r.peak_kv_tokens:,} / {r.kv_budget_tokens:,}" if r.peak_kv_tokens is not None else ""
        lines.append(
            f"| {r.scenario} | {r.executor} | {r.requests_per_s:.2f} | {r.output_tokens_per_s:.1f} | "
            f"{ratio} | {r.num_prefill_tokens:,} | {r.num_unique_tokens:,} | {r.num_prompt_tokens:,} | "
            f"{peak} | {r.median_seconds:.2f} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--scenario", action="append", choices=sorted(SCENARIOS),
        help="run only this scenario (repeatable; default: all)",
    )
    parser.add_argument("--scale", type=float, default=1.0, help="multiply counts and lengths (default 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per executor; the median is reported")
    parser.add_argument(
        "--executors", default=",".join(DEFAULT_EXECUTORS),
        help=f"comma-separated subset of {','.join(EXECUTORS)} (default: {','.join(DEFAULT_EXECUTORS)})",
    )
    parser.add_argument("--kv-budget", type=int, default=None, help=f"native KV budget (default {DEFAULT_CPU_KV_BUDGET})")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--model-dir", type=Path, default=Path(".cache/engine_bench/small-llama"),
        help="the small test model, built here on first use",
    )
    parser.add_argument(
        "--model", choices=("small", "smollm2"), default="small",
        help="small: the random-weight test model in --model-dir; smollm2: the trained SmolLM2-135M-Instruct "
             "(its chat scenarios by default)",
    )
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args(argv)
    args.executors = [e for e in args.executors.split(",") if e]
    unknown = sorted(set(args.executors) - set(EXECUTORS))
    if unknown:
        parser.error(f"--executors must name some of {list(EXECUTORS)}, got {unknown}")
    if args.scale <= 0 or args.repeats < 1:
        parser.error(f"--scale must be > 0 and --repeats >= 1, got {args.scale} and {args.repeats}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.model == "smollm2":
        sys.path.insert(0, str(Path(__file__).parent))
        import real_chats as chats

        args.model_dir = chats.smollm2_folder()
    elif not (args.model_dir / "config.json").exists():
        make_test_model(args.model_dir, arch="llama", size="small")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    prompts = Prompts(len(tokenizer), tokenizer.all_special_ids, args.scale, args.seed, tokenizer)
    names = sorted(set(args.scenario or (["chat"] if args.model == "smollm2" else RANDOM_SCENARIOS)))
    scenarios = {name: SCENARIOS[name](prompts) for name in names}
    workloads = [w for name in names for w in scenarios[name]]
    executor_names = list(args.executors)
    if not any(w.name in ABLATION_SCENARIOS for w in workloads) and "native-noshare" in executor_names:
        executor_names.remove("native-noshare")
    kv_budget = args.kv_budget or DEFAULT_CPU_KV_BUDGET
    started = time.perf_counter()
    executors = load_executors(args.model_dir, executor_names, args.kv_budget)
    results = []
    for name in names:
        for workload in scenarios[name]:
            print(f"{workload.name}: {workload.title}", file=sys.stderr, flush=True)
        results += run_scenario(scenarios[name], executors, repeats=args.repeats, kv_budget=kv_budget)
    elapsed = time.perf_counter() - started

    print()
    for workload in workloads:
        print(f"- **{workload.name}**: {workload.title}")
    print()
    print(markdown_table(results))
    print(f"\nmodel {args.model}, {args.repeats} repeats, scale {args.scale}, {args.threads} threads, total {elapsed:.0f} s")
    if args.json:
        report = {
            "command": " ".join(sys.argv),
            "scale": args.scale,
            "repeats": args.repeats,
            "threads": args.threads,
            "torch": torch.__version__,
            "machine": platform.platform(),
            "total_seconds": elapsed,
            "workloads": {w.name: w.title for w in workloads},
            "results": [
                {**asdict(r), "median_seconds": r.median_seconds, "requests_per_s": r.requests_per_s,
                 "output_tokens_per_s": r.output_tokens_per_s}
                for r in results
            ],
        }
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
