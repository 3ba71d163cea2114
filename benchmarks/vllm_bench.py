"""vLLM alone vs vLLM through prefixbatch (the plan's order) vs the native engine.

Each variant runs in a process of its own (`--variant`), timed from the process's start to
its last completion (start-up included: imports, model load, engine start), on the same
token-id prompts; variants alternate within each repeat, the median of `--repeats` is kept.

    vllm-alone        vLLM's engine as a user drives it: every request added at once, in
                      input order, prefix caching on (vLLM's own first-come-first-served
                      scheduling and LRU eviction)
    vllm-prefixbatch  `executor.kind: vllm`: the same engine settings, fed the job's plan
                      group by group (`prefixbatch.executors.vllm_engine`)
    native            `executor.kind: native`, planned with the same KV budget

Jobs (fp32, CPU, greedy, 2 threads):

    a        the `small` model: 64 prompts = one 1,024-token prefix + a unique 64-token
             suffix; 32 new tokens (engine_bench scenario a)
    over     the `small` model: 40 documents (900–1,100 tokens) × 4 questions (16–48), 16
             new tokens, in interleaved order (question 1 of every document, then question
             2, ...) and in random order; the vLLM cache is capped at 8,192 tokens, so the
             documents (~40K tokens) are five times what it holds

Reported: wall s (start-up included), output tok/s over that wall, prompt tokens computed
(vLLM: prompt − cached tokens; native: its prefill) against the planner's unique tokens and
the bound vLLM's blocks allow (unique + one partial block per request), greedy agreement
with the first variant.

    .venv/bin/python benchmarks/vllm_bench.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

START = time.perf_counter()
BLOCK = 32  # vLLM's smallest CPU block: a shared prefix is reused in whole blocks of it
VARIANTS = ("vllm-alone", "vllm-prefixbatch", "native")


def make_jobs(tokenizer_dir: dict[str, Path]) -> dict[str, tuple[str, list[list[int]], int]]:
    """job → (model size, prompts as token ids, max new tokens)."""
    from transformers import AutoTokenizer

    jobs = {}
    rng = np.random.default_rng(0)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir["small"])
    regular = np.setdiff1d(np.arange(len(tokenizer)), tokenizer.all_special_ids)

    def tokens(n: int) -> list[int]:
        return rng.choice(regular, size=n).tolist()

    prefix = tokens(1024)
    jobs["a"] = ("small", [prefix + tokens(64) for _ in range(64)], 32)
    docs = [tokens(int(rng.integers(900, 1101))) for _ in range(40)]
    questions = [[tokens(int(rng.integers(16, 49))) for _ in range(4)] for _ in docs]
    interleaved = [docs[d] + questions[d][q] for q in range(4) for d in range(len(docs))]
    jobs["over-interleaved"] = ("small", interleaved, 16)
    order = rng.permutation(len(interleaved))
    jobs["over-random"] = ("small", [interleaved[i] for i in order], 16)
    return jobs


def engine_settings(job: str) -> dict:
    settings = {"cpu_kv_cache_gib": 1, "block_size": BLOCK}
    if job.startswith("over"):
        settings["kv_cache_tokens"] = 8_192
    return settings


def run_variant(variant: str, model_dir: Path, prompts: list[list[int]], max_tokens: int, job: str) -> dict:
    """In this process: one variant on one job → its measurements."""
    import torch

    torch.set_num_threads(2)
    from prefixbatch.executors.config import ExecutorSpec, ModelSpec
    from prefixbatch.prefix_tree import PlanSettings, plan_requests
    from prefixbatch.types import Request, SamplingParams

    requests = [Request(i, tuple(p), SamplingParams(max_tokens=max_tokens)) for i, p in enumerate(prompts)]
    model = ModelSpec(path=str(model_dir), dtype="float32")
    settings = engine_settings(job)
    if variant == "vllm-alone":
        outputs, computed = _vllm_alone(model_dir, requests, settings)
        budget = None
    else:
        from prefixbatch.executors.registry import create_executor

        kind = "vllm" if variant == "vllm-prefixbatch" else "native"
        executor = create_executor(model, ExecutorSpec(kind=kind, device="cpu", vllm=settings))
        budget = getattr(executor, "kv_cache_tokens", settings.get("kv_cache_tokens", 131_072))
        work = plan_requests(requests, PlanSettings(kv_budget_tokens=budget))
        outputs = {c.row_index: list(c.token_ids) for c in executor.generate(work)}
        computed = executor.stats.num_prefill_tokens
    wall = time.perf_counter() - START
    return {"wall_s": wall, "computed": computed, "outputs": outputs, "kv_budget": budget,
            "output_tokens": sum(len(t) for t in outputs.values())}


def _vllm_alone(model_dir: Path, requests, settings: dict) -> tuple[dict, int]:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(settings["cpu_kv_cache_gib"])
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from vllm import EngineArgs, LLMEngine, SamplingParams
    from vllm.inputs import TokensPrompt

    override = settings.get("kv_cache_tokens")
    engine = LLMEngine.from_engine_args(EngineArgs(
        model=str(model_dir), dtype="float32", seed=0, enable_prefix_caching=True, block_size=BLOCK,
        enforce_eager=True, distributed_executor_backend="uni", disable_log_stats=True,
        num_gpu_blocks_override=None if override is None else override // BLOCK,
    ))
    for r in requests:
        engine.add_request(str(r.row_index), TokensPrompt(prompt_token_ids=list(r.token_ids)),
                           SamplingParams(max_tokens=r.sampling.max_tokens, temperature=0.0))
    outputs, computed = {}, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outputs[int(out.request_id)] = list(out.outputs[0].token_ids)
                computed += len(out.prompt_token_ids) - (out.num_cached_tokens or 0)
    return outputs, computed


def model_dirs() -> dict[str, Path]:
    from prefixbatch.executors.random_model import make_test_model

    dirs = {"small": Path(".cache/engine_bench/small-llama")}
    for size, folder in dirs.items():
        if not (folder / "config.json").exists():
            make_test_model(folder, arch="llama", size=size)
    return dirs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--jobs", default="a,over-interleaved,over-random")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    dirs = model_dirs()
    jobs = make_jobs(dirs)
    if args.variant:  # a child: one measurement, as JSON on stdout
        size, prompts, max_tokens = jobs[args.job]
        print(json.dumps(run_variant(args.variant, dirs[size], prompts, max_tokens, args.job)))
        return
    from prefixbatch.prefix_tree import PlanSettings, plan_requests
    from prefixbatch.types import Request, SamplingParams

    names = [j for j in args.jobs.split(",") if j]
    runs: dict[tuple[str, str], list[dict]] = {}
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    for repeat in range(args.repeats):
        for job in names:
            for variant in VARIANTS:
                command = [sys.executable, __file__, "--variant", variant, "--job", job]
                done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
                if done.returncode != 0:
                    sys.exit(f"{variant} on {job} failed:\n{done.stderr[-3000:]}")
                result = json.loads(done.stdout.strip().splitlines()[-1])
                runs.setdefault((job, variant), []).append(result)
                print(f"  {job:17s} {variant:17s} run {repeat + 1}: {result['wall_s']:6.1f} s, "
                      f"{result['computed']} prompt tokens computed", file=sys.stderr, flush=True)
    print("| job | variant | wall s (with start-up) | output tok/s | prompt tokens computed | planner unique "
          "| unique + 1 partial block per request | prompt tokens | greedy agreement |")
    print("|---|---|---|---|---|---|---|---|---|")
    report = {}
    for job in names:
        size, prompts, max_tokens = jobs[job]
        requests = [Request(i, tuple(p), SamplingParams(max_tokens=max_tokens)) for i, p in enumerate(prompts)]
        budget = runs[(job, "vllm-prefixbatch")][0]["kv_budget"]
        unique = plan_requests(requests, PlanSettings(kv_budget_tokens=budget)).plan.stats.num_unique_tokens
        bound = unique + len(requests) * (BLOCK - 1)
        reference = runs[(job, VARIANTS[0])][0]["outputs"]
        for variant in VARIANTS:
            measured = runs[(job, variant)]
            median = sorted(measured, key=lambda r: r["wall_s"])[len(measured) // 2]
            agree = sum(median["outputs"][k] == reference[k] for k in reference)
            wall = statistics.median(r["wall_s"] for r in measured)
            print(f"| {job} | {variant} | {wall:.1f} | {median['output_tokens'] / wall:.1f} | {median['computed']:,} "
                  f"| {unique:,} | {bound:,} | {sum(len(p) for p in prompts):,} | {agree}/{len(reference)} |")
            report[f"{job}/{variant}"] = {"walls": [r["wall_s"] for r in measured], "computed": median["computed"],
                                          "unique": unique, "bound": bound}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
