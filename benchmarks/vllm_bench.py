"""The peer benchmark: vLLM alone vs vLLM through prefixbatch (the plan's order) vs native.

Each variant runs in a process of its own (`--variant`), so each starts cold and vLLM's
prefix cache starts empty; variants alternate within each repeat and the median of
`--repeats` is kept. Every variant gets the same token-id requests:

    vllm-alone        vLLM's engine as a user drives it: every request added at once, in
                      input order, prefix caching on (vLLM's own first-come-first-served
                      scheduling and LRU eviction)
    vllm-prefixbatch  `executor.kind: vllm`: the same engine settings, fed the job's plan
                      group by group (`prefixbatch.executors.vllm_engine`)
    native            `executor.kind: native`, planned with the same KV budget
    vllm-prefixbatch-compiled
                      vllm-prefixbatch with `executor.vllm.enforce_eager: false` (torch.compile),
                      only when named in `--variants`

vLLM: the CPU build (`make install-vllm`), in-process engine, eager, 32-token blocks, 1 GiB
of KV cache; fp32, 2 threads everywhere.

Jobs (`--jobs`, comma-separated):

    a, b, c, d, e-random, e-tiled, e-interleaved
                      engine_bench.py's scenarios (system prompt; few-shot tree; no sharing;
                      n samples, T = 1.0, seeded; document QA in three orders)
    over-interleaved, over-random
                      40 documents (900–1,100 tokens) × 4 questions (16–48), 16 new tokens,
                      vLLM's cache capped at 8,192 tokens: the documents (~40K tokens) are
                      five times what it holds
    long              4 prompts of 256 tokens, 1,024 new tokens each

Reported per job and variant: wall s from the process's start to its last completion
(imports, model load and engine start included), generate s (the requests only), output
tok/s over generate s, prompt tokens computed (vLLM: prompt − cached tokens; native: its
prefill) against the planner's unique tokens and the bound vLLM's blocks allow (unique + one
partial block per request), and agreement with the first variant (token for token).

    .venv/bin/python benchmarks/vllm_bench.py --repeats 3
    .venv/bin/python benchmarks/vllm_bench.py --jobs a,c --model qwen2.5-0.5b --variants vllm-alone,native
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

START = time.perf_counter()
BLOCK = 32  # vLLM's smallest CPU block: a shared prefix is reused in whole blocks of it
VARIANTS = ("vllm-alone", "vllm-prefixbatch", "native")
COMPILED = "vllm-prefixbatch-compiled"
DEFAULT_JOBS = "a,over-interleaved,over-random"
MODELS = {
    "small": Path(".cache/engine_bench/small-llama"),
    "qwen2.5-0.5b": Path(".cache/bench-models/qwen2.5-0.5b"),
    "llama-3.2-1b": Path(".cache/bench-models/llama-3.2-1b"),
}


def make_jobs(model_dir: Path, names: list[str]) -> dict[str, list]:
    """job → its requests (token ids and sampling), the same in every process."""
    import numpy as np
    from transformers import AutoTokenizer

    sys.path.insert(0, str(Path(__file__).parent))
    import engine_bench

    from prefixbatch.types import Request, SamplingParams

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    jobs = {}
    for name in names:
        prompts = engine_bench.Prompts(len(tokenizer), tokenizer.all_special_ids, 1.0, seed=0)
        scenario = name.split("-")[0]
        if scenario in engine_bench.SCENARIOS and name not in ("over-interleaved", "over-random"):
            jobs[name] = next(w.requests for w in engine_bench.SCENARIOS[scenario](prompts) if w.name == name)
            continue
        rng = np.random.default_rng(0)

        def tokens(n: int) -> list[int]:
            return rng.choice(prompts.regular, size=n).tolist()  # noqa: B023 (used at once)

        if name == "long":
            jobs[name] = [Request(i, tuple(tokens(256)), SamplingParams(max_tokens=1024)) for i in range(4)]
            continue
        docs = [tokens(int(rng.integers(900, 1101))) for _ in range(40)]
        questions = [[tokens(int(rng.integers(16, 49))) for _ in range(4)] for _ in docs]
        interleaved = [docs[d] + questions[d][q] for q in range(4) for d in range(len(docs))]
        if name == "over-random":
            interleaved = [interleaved[i] for i in rng.permutation(len(interleaved))]
        jobs[name] = [Request(i, tuple(p), SamplingParams(max_tokens=16)) for i, p in enumerate(interleaved)]
    return jobs


def engine_settings(job: str) -> dict:
    settings = {"cpu_kv_cache_gib": 1, "block_size": BLOCK}
    if job.startswith("over"):
        settings["kv_cache_tokens"] = 8_192
    return settings


def run_variant(variant: str, model_dir: Path, requests: list, job: str) -> dict:
    """In this process: one variant on one job → its measurements."""
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    from prefixbatch.executors.config import ExecutorSpec, ModelSpec
    from prefixbatch.prefix_tree import PlanSettings, plan_requests

    model = ModelSpec(path=str(model_dir), dtype="float32")
    settings = engine_settings(job)
    if variant == "vllm-alone":
        engine = _vllm_engine(model_dir, settings)
        started = time.perf_counter()
        outputs, computed = _vllm_alone(engine, requests)
        budget = None
    else:
        from prefixbatch.executors.registry import create_executor

        kind = "native" if variant == "native" else "vllm"
        if variant == COMPILED:
            settings["enforce_eager"] = False
        executor = create_executor(model, ExecutorSpec(kind=kind, device="cpu", vllm=settings))
        budget = getattr(executor, "kv_cache_tokens", settings.get("kv_cache_tokens", 131_072))
        started = time.perf_counter()
        work = plan_requests(requests, PlanSettings(kv_budget_tokens=budget))
        index = {(r.row_index, r.sample_index): i for i, r in enumerate(requests)}
        outputs = {index[c.row_index, c.sample_index]: list(c.token_ids) for c in executor.generate(work)}
        computed = executor.stats.num_prefill_tokens
    end = time.perf_counter()
    return {"wall_s": end - START, "generate_s": end - started, "computed": computed, "outputs": outputs,
            "kv_budget": budget, "output_tokens": sum(len(t) for t in outputs.values())}


def _vllm_engine(model_dir: Path, settings: dict):
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(settings["cpu_kv_cache_gib"])
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from vllm import EngineArgs, LLMEngine

    override = settings.get("kv_cache_tokens")
    return LLMEngine.from_engine_args(EngineArgs(
        model=str(model_dir), dtype="float32", seed=0, enable_prefix_caching=True, block_size=BLOCK,
        enforce_eager=True, distributed_executor_backend="uni", disable_log_stats=True,
        num_gpu_blocks_override=None if override is None else override // BLOCK,
    ))


def _vllm_alone(engine, requests) -> tuple[dict, int]:
    """Every request at once, in input order; stepped until all finish."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    for i, r in enumerate(requests):
        p = r.sampling
        engine.add_request(str(i), TokensPrompt(prompt_token_ids=list(r.token_ids)), SamplingParams(
            max_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k or 0,
            seed=None if p.is_greedy else p.seed))
    outputs, computed = {}, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outputs[int(out.request_id)] = list(out.outputs[0].token_ids)
                computed += len(out.prompt_token_ids) - (out.num_cached_tokens or 0)
    return outputs, computed


def native_setup(job: str, model: str = "small"):
    """(native executor, planned work) for one job, planned with the job's KV budget: what the
    profiling benchmarks run (`engine_profile.py`, `phase_times.py`)."""
    from prefixbatch.executors.config import ExecutorSpec, ModelSpec
    from prefixbatch.executors.registry import create_executor
    from prefixbatch.prefix_tree import PlanSettings, plan_requests

    folder = model_dir(model)
    requests = make_jobs(folder, [job])[job]
    executor = create_executor(ModelSpec(path=str(folder), dtype="float32"), ExecutorSpec(kind="native", device="cpu"))
    budget = engine_settings(job).get("kv_cache_tokens", 131_072)
    return executor, plan_requests(requests, PlanSettings(kv_budget_tokens=budget))


def model_dir(name: str) -> Path:
    from prefixbatch.executors.random_model import make_test_model

    folder = MODELS[name]
    if not (folder / "config.json").exists():
        make_test_model(folder, arch="llama", size=name)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--jobs", default=DEFAULT_JOBS)
    parser.add_argument("--model", choices=sorted(MODELS), default="small")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--hog", action="store_true",
                        help="a process spinning on one core beside every run (contention)")
    args = parser.parse_args()
    folder = model_dir(args.model)
    names = [j for j in args.jobs.split(",") if j]
    if args.variant:  # a child: one measurement, as JSON on stdout
        [job] = names
        print(json.dumps(run_variant(args.variant, folder, make_jobs(folder, names)[job], job)))
        return
    from prefixbatch.prefix_tree import PlanSettings, plan_requests

    variants = [v for v in args.variants.split(",") if v]
    jobs = make_jobs(folder, names)
    runs: dict[tuple[str, str], list[dict]] = {}
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    for repeat in range(args.repeats):
        for job in names:
            for variant in variants:
                command = [sys.executable, __file__, "--variant", variant, "--jobs", job, "--model", args.model]
                hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if args.hog else None
                try:
                    # vLLM alone as a user runs it: GNU OpenMP's default spin count, not the
                    # one importing prefixbatch sets (`prefixbatch/__init__.py`).
                    own = {"GOMP_SPINCOUNT": "300000"} if variant == "vllm-alone" else {}
                    done = subprocess.run(command, env=env | own, capture_output=True, text=True, timeout=3600)
                finally:
                    if hog is not None:
                        hog.kill()
                        hog.wait()
                if done.returncode != 0:
                    sys.exit(f"{variant} on {job} failed:\n{done.stderr[-3000:]}")
                result = json.loads(done.stdout.strip().splitlines()[-1])
                runs.setdefault((job, variant), []).append(result)
                print(f"  {job:17s} {variant:17s} run {repeat + 1}: {result['wall_s']:6.1f} s wall, "
                      f"{result['generate_s']:6.1f} s generating, {result['computed']} prompt tokens computed",
                      file=sys.stderr, flush=True)
    print(f"model {args.model}, {args.repeats} repeats (median){', one-core CPU hog running' if args.hog else ''}\n")
    print("| job | variant | wall s (with start-up) | generate s | output tok/s | prompt tokens computed | "
          "planner unique | unique + 1 partial block per request | prompt tokens | agreement |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    report = {}
    for job in names:
        requests = jobs[job]
        unique = plan_requests(requests, PlanSettings(kv_budget_tokens=131_072)).plan.stats.num_unique_tokens
        bound = unique + len(requests) * (BLOCK - 1)
        reference = runs[(job, variants[0])][0]["outputs"]
        for variant in variants:
            measured = runs[(job, variant)]
            median = sorted(measured, key=lambda r: r["generate_s"])[len(measured) // 2]
            agree = sum(median["outputs"][k] == reference[k] for k in reference)
            wall = statistics.median(r["wall_s"] for r in measured)
            generate = statistics.median(r["generate_s"] for r in measured)
            print(f"| {job} | {variant} | {wall:.1f} | {generate:.2f} | {median['output_tokens'] / generate:.1f} | "
                  f"{median['computed']:,} | {unique:,} | {bound:,} | {sum(r.num_prompt_tokens for r in requests):,} "
                  f"| {agree}/{len(reference)} |")
            report[f"{job}/{variant}"] = {"walls": [r["wall_s"] for r in measured],
                                          "generates": [r["generate_s"] for r in measured],
                                          "computed": median["computed"], "unique": unique, "bound": bound}
    if "vllm-alone" in variants and "native" in variants:
        print("\nnative speed ÷ vLLM alone's (generate time, median):")
        for job in names:
            vllm, native = (statistics.median(r["generate_s"] for r in runs[(job, v)]) for v in ("vllm-alone", "native"))
            print(f"  {job}: {vllm / native:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
