"""The peer benchmark: native vs vLLM as its users run it vs vLLM fed our plan.

Each variant runs in a process of its own, one engine for every job and repeat (`--variant`;
vLLM alone in `vllm_alone.py`), with vLLM's prefix cache emptied before each generate: each
generate starts as cold as in a fresh process, the engine's start-up (vLLM's compile takes
minutes on a 2-core CPU) is paid once, and a generate can only gain from the warm-up of the
ones before it. The median of `--repeats` is kept. Every variant gets the same token-id
requests:

    vllm              vLLM as its users run it (`vllm_alone.py`, which imports nothing of
                      prefixbatch): `LLM(model, dtype, seed=0)` with every other setting its
                      default — compiled, its block size, its KV cache size, its engine process,
                      its OpenMP thread binding, prefix caching on — and one `LLM.generate` of
                      every request in input order; the environment as the user's shell has it
                      (no prefixbatch OpenMP spin count), plus the allocator and OpenMP runtime
                      vLLM's CPU docs recommend (`LD_PRELOAD` of tcmalloc and Intel OpenMP)
                      where they are installed (`--preload`, found automatically; which, is logged)
    vllm-all-cores    the same with its OpenMP threads bound to every core (`VLLM_CPU_OMP_THREADS_BIND=0-N`):
                      by default vLLM keeps one core for its engine process and binds threads
                      to the rest (on a 2-core machine: one thread)
    vllm-eager        `vllm` with `enforce_eager=True`
    vllm-prefixbatch  `executor.kind: vllm` at its defaults: the same engine fed the job's plan
                      group by group (`prefixbatch.executors.vllm_engine`)
    native            `executor.kind: native` at its defaults

Compiling and engine start are outside "generate s" for every variant (they are in "wall s":
start-up plus that generate, for vLLM alone too).
`--dtype` is the model's dtype for all (float32 or bfloat16). `--kv-cache-tokens N` caps every
variant's cache at N tokens (a labelled extra: vLLM's default cache is far larger).

Jobs (`--jobs`, comma-separated):

    a, b, c, d, e-random, e-tiled, e-interleaved
                      engine_bench.py's scenarios (system prompt; few-shot tree; no sharing;
                      n samples, T = 1.0, seeded; document QA in three orders)
    chat-shared, chat-unique
                      real chats (`real_chats.py`), for `--model smollm2`: two long system
                      prompts × 32 questions; 64 short chats under system prompts of their own
                      (little to share); up to 128 new tokens, rows ending at end-of-sequence
    over-grouped, over-interleaved, over-random
                      over capacity, for `--model kv-heavy` (a random model with Llama-3.1-8B's
                      KV bytes per token, 128 KiB in bf16, and little else), `--dtype float32`:
                      416 documents (240–272 tokens) × 4 questions (8–24), 8 new tokens — the
                      documents' KV (26 GiB) over vLLM's default cache (~21 GiB here); each
                      document's questions together (input order), interleaved, random
    long              4 prompts of 256 tokens, 1,024 new tokens each

Reported per job and variant: wall s from the process's start to its last completion
(imports, model load, compile and engine start included), generate s (the requests only),
output tok/s over generate s, prompt tokens computed (vLLM: prompt − cached tokens; native: its
prefill) against the planner's unique tokens, agreement with the first variant (token for
token), and each engine's set-up: CPU kernel ISA, threads and their binding, block size, KV
cache tokens.

    .venv/bin/python benchmarks/vllm_bench.py --repeats 3
    .venv/bin/python benchmarks/vllm_bench.py --model smollm2 --jobs chat-shared,chat-unique
    .venv/bin/python benchmarks/vllm_bench.py --jobs a,c --dtype bfloat16 --variants vllm,native
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

START = time.perf_counter()
USER_ENV = dict(os.environ)  # before anything imports prefixbatch (which sets GOMP_SPINCOUNT)
HERE = Path(__file__).parent
VARIANTS = ("vllm", "vllm-all-cores", "vllm-eager", "vllm-prefixbatch", "native")
ALONE = ("vllm", "vllm-all-cores", "vllm-eager")  # vLLM as its users run it: `vllm_alone.py`
DEFAULT_JOBS = "a,c"
MODELS = {
    "small": Path(".cache/engine_bench/small-llama"),
    "qwen2.5-0.5b": Path(".cache/bench-models/qwen2.5-0.5b"),
    "llama-3.2-1b": Path(".cache/bench-models/llama-3.2-1b"),
    "kv-heavy": Path(".cache/bench-models/kv-heavy"),  # the over-capacity jobs' model
    "smollm2": None,  # the trained model (`real_chats.smollm2_folder`)
}
# vLLM's CPU docs: tcmalloc and Intel OpenMP preloaded; the first match of each is used.
PRELOADS = (
    ("tcmalloc", ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", "/usr/lib64/libtcmalloc_minimal.so.4",
                  "{site}/**/libtcmalloc_minimal.so*", "{site}/**/libtcmalloc.so*")),
    ("iomp", ("{prefix}/lib/libiomp5.so", "{site}/**/libiomp5.so")),
)


# Over capacity (`--model kv-heavy --dtype float32`): documents of 240–272 tokens × 4
# questions each, the documents' KV 26 GiB in fp32 against vLLM's default cache of ~21 GiB
# here (in bf16 the cache holds twice the tokens: the job would need twice the documents):
# in input order (each document's questions together), interleaved (every document's first
# question, then every second, ...) and in a random order.
OVER_DOCUMENTS = 416
OVER_ORDERS = {
    "over-grouped": lambda rows, rng: rows,
    "over-interleaved": lambda rows, rng: [rows[d * 4 + q] for q in range(4) for d in range(len(rows) // 4)],
    "over-random": lambda rows, rng: [rows[i] for i in rng.permutation(len(rows))],
}


def make_jobs(model_dir: Path, names: list[str]) -> dict[str, list]:
    """job → its requests (token ids and sampling), the same in every process."""
    import numpy as np
    from transformers import AutoTokenizer

    sys.path.insert(0, str(HERE))
    import engine_bench
    import real_chats

    from prefixbatch.types import Request, SamplingParams

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    jobs = {}
    for name in names:
        prompts = engine_bench.Prompts(len(tokenizer), tokenizer.all_special_ids, 1.0, seed=0)
        scenario = name.split("-")[0]
        if name in ("chat-shared", "chat-unique"):
            jobs[name] = getattr(real_chats, name.replace("-", "_"))(tokenizer)
            continue
        if scenario in engine_bench.SCENARIOS:
            jobs[name] = next(w.requests for w in engine_bench.SCENARIOS[scenario](prompts) if w.name == name)
            continue
        rng = np.random.default_rng(0)

        def tokens(n: int) -> list[int]:
            return rng.choice(prompts.regular, size=n).tolist()  # noqa: B023 (used at once)

        if name == "long":
            jobs[name] = [Request(i, tuple(tokens(256)), SamplingParams(max_tokens=1024)) for i in range(4)]
            continue
        if name not in OVER_ORDERS:
            sys.exit(f"--jobs: unknown job {name!r}")
        docs = [tokens(int(rng.integers(240, 273))) for _ in range(OVER_DOCUMENTS)]
        questions = [[tokens(int(rng.integers(8, 25))) for _ in range(4)] for _ in docs]
        prompts = OVER_ORDERS[name]([d + q for d, qs in zip(docs, questions) for q in qs], rng)
        jobs[name] = [Request(i, tuple(p), SamplingParams(max_tokens=8)) for i, p in enumerate(prompts)]
    return jobs


def run_variant(variant: str, model_dir: Path, jobs: dict[str, list], args) -> None:
    """In this process: vllm-prefixbatch or native, one executor for every job and repeat →
    one JSON line each on stdout. vLLM's prefix cache is emptied before each generate (as
    `vllm_alone.py` does); native keeps nothing between plans."""
    import torch

    from prefixbatch.executors.config import ExecutorSpec, ModelSpec
    from prefixbatch.executors.registry import create_executor
    from prefixbatch.jobs.planning import cpu_kv_budget
    from prefixbatch.prefix_tree import PlanSettings, plan_requests

    kind = "native" if variant == "native" else "vllm"
    kv_cache_tokens = args.kv_cache_tokens
    vllm = {} if kv_cache_tokens is None else {"kv_cache_tokens": kv_cache_tokens}
    executor = create_executor(ModelSpec(path=str(model_dir), dtype=args.dtype),
                               ExecutorSpec(kind=kind, device="cpu", vllm=vllm, kv_budget_tokens=kv_cache_tokens))
    start_up = time.perf_counter() - START
    budget = getattr(executor, "kv_cache_tokens", kv_cache_tokens or cpu_kv_budget(str(model_dir), args.dtype))
    setup = {"isa": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
             "kv_cache_tokens": budget}
    if kind == "native":
        setup.update(_native_kernels())
    else:
        setup["block_size"] = executor.block_size
        setup["compiled"] = False
    for repeat in range(args.repeats):
        for job, requests in jobs.items():
            if kind == "vllm":
                assert executor.engine.reset_prefix_cache(), "vLLM did not empty its prefix cache"
            computed_before = executor.stats.num_prefill_tokens
            started = time.perf_counter()
            work = plan_requests(requests, PlanSettings(kv_budget_tokens=budget))
            index = {(r.row_index, r.sample_index): i for i, r in enumerate(requests)}
            outputs = {index[c.row_index, c.sample_index]: list(c.token_ids) for c in executor.generate(work)}
            generate_s = time.perf_counter() - started
            print(json.dumps({"job": job, "repeat": repeat, "wall_s": start_up + generate_s, "generate_s": generate_s,
                              "computed": executor.stats.num_prefill_tokens - computed_before, "outputs": outputs,
                              "output_tokens": sum(len(t) for t in outputs.values()), "setup": setup}), flush=True)


def _native_kernels() -> dict:
    from prefixbatch.executors.native.span_kernel import MARCH_ENV, attention_wins, load_span_kernel

    kernel = load_span_kernel()
    if kernel is None:
        return {"kernels": "PyTorch's only (no kernel library)"}
    march = os.environ.get(MARCH_ENV) or "native"
    parts = [f"library -march={march} ({kernel.vector_bytes * 8}-bit vectors)",
             "attention: ours" if attention_wins(kernel) else "attention: PyTorch's",
             "dense fp32: ours" if kernel.has_dense else "dense fp32: oneDNN's",
             "dense bf16: ours (AVX512-BF16)" if kernel.has_dense_bf16 else "dense bf16: oneDNN's or PyTorch's"]
    return {"kernels": ", ".join(parts)}


def _vllm_requests_file(requests: list) -> str:
    handle, path = tempfile.mkstemp(prefix="vllm-bench-", suffix=".json")
    with os.fdopen(handle, "w") as file:
        json.dump([{"prompt_token_ids": list(r.token_ids), "max_tokens": r.sampling.max_tokens,
                    "temperature": r.sampling.temperature, "top_p": r.sampling.top_p, "top_k": r.sampling.top_k,
                    "seed": None if r.sampling.is_greedy else r.sampling.seed} for r in requests], file)
    return path


def preloads() -> dict[str, str]:
    """The libraries vLLM's CPU docs say to preload, where installed: name → path."""
    import site

    found = {}
    places = {"site": site.getsitepackages()[0], "prefix": sys.prefix}
    for name, patterns in PRELOADS:
        for pattern in patterns:
            hits = sorted(glob.glob(pattern.format(**places), recursive=True))
            if hits:
                found[name] = hits[0]
                break
    return found


def native_setup(job: str, model: str = "small", dtype: str = "float32"):
    """(native executor, planned work) for one job, planned with the native default KV budget:
    what the profiling benchmarks run (`engine_profile.py`, `phase_times.py`)."""
    from prefixbatch.executors.config import ExecutorSpec, ModelSpec
    from prefixbatch.executors.registry import create_executor
    from prefixbatch.jobs.planning import DEFAULT_CPU_KV_BUDGET
    from prefixbatch.prefix_tree import PlanSettings, plan_requests

    folder = model_dir(model)
    requests = make_jobs(folder, [job])[job]
    executor = create_executor(ModelSpec(path=str(folder), dtype=dtype), ExecutorSpec(kind="native", device="cpu"))
    return executor, plan_requests(requests, PlanSettings(kv_budget_tokens=DEFAULT_CPU_KV_BUDGET))


def model_dir(name: str) -> Path:
    if name == "smollm2":
        sys.path.insert(0, str(HERE))
        import real_chats

        return real_chats.smollm2_folder()
    from prefixbatch.executors.random_model import make_test_model

    folder = MODELS[name]
    if not (folder / "config.json").exists():
        make_test_model(folder, arch="llama", size=name)
    return folder


def measure(variant: str, names: list[str], args) -> dict[tuple[str, int], dict]:
    """native or vllm-prefixbatch, every job and repeat in one process of its own →
    {(job, repeat): its JSON result}."""
    command = [sys.executable, __file__, "--variant", variant, "--jobs", ",".join(names), "--model", args.model,
               "--dtype", args.dtype, "--repeats", str(args.repeats)]
    if args.kv_cache_tokens is not None:
        command += ["--kv-cache-tokens", str(args.kv_cache_tokens)]
    stdout, _ = _run(variant, command, USER_ENV, hog=args.hog)  # at their defaults (threads included)
    results = {}
    for line in stdout.splitlines():
        if line.startswith('{"job"'):  # vLLM prints too
            result = json.loads(line)
            results[(result.pop("job"), result.pop("repeat"))] = result
    return results


def measure_alone(variant: str, files: dict[str, str], args) -> tuple[dict[tuple[str, int], dict], str]:
    """Every job and repeat of a vLLM-alone variant on one engine (`vllm_alone.py`) →
    ({(job, repeat): its JSON result}, its binding log lines)."""
    command = [sys.executable, str(HERE / "vllm_alone.py"), *files.values(), str(args.folder), "--dtype", args.dtype,
               "--repeats", str(args.repeats)] + (["--eager"] if variant == "vllm-eager" else [])
    child_env = USER_ENV | {"VLLM_LOGGING_LEVEL": "INFO"}
    if variant == "vllm-all-cores":
        child_env["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{os.cpu_count() - 1}"
    if args.preload:
        child_env["LD_PRELOAD"] = ":".join(args.preload.values())
    stdout, stderr = _run(variant, command, child_env, hog=args.hog)
    job_of = {path: job for job, path in files.items()}
    results = {}
    for line in stdout.splitlines():
        if line.startswith('{"requests"'):
            result = json.loads(line)
            results[(job_of[result.pop("requests")], result.pop("repeat"))] = result
    log = stdout + "\n" + stderr  # vLLM logs to stdout by default
    binding = [re.sub(r"^.*?\] ", "", line.strip()) for line in log.splitlines()
               if re.search(r"VLLM_CPU_OMP|core ids|reserved_cpus|Torch threads|for KV cache|not found in LD_PRELOAD", line)]
    return results, "\n".join(binding[-8:])


def _run(variant: str, command: list[str], env: dict, *, hog: bool) -> tuple[str, str]:
    """The command's (stdout, stderr); hog: a process spinning on one core beside it."""
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if hog else None
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=4 * 3600)
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    if done.returncode != 0:  # its results so far are kept; the table says what is missing
        print(f"{variant} failed (exit {done.returncode}):\n{done.stderr[-3000:]}\n{done.stdout[-3000:]}",
              file=sys.stderr, flush=True)
    return done.stdout, done.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--jobs", default=DEFAULT_JOBS)
    parser.add_argument("--model", choices=sorted(MODELS), default="small")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--kv-cache-tokens", type=int, help="cap native's and vllm-prefixbatch's cache (an extra)")
    parser.add_argument("--no-preload", dest="use_preload", action="store_false",
                        help="run vLLM without the LD_PRELOAD its CPU docs recommend")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--hog", action="store_true",
                        help="a process spinning on one core beside every run (contention)")
    args = parser.parse_args()
    args.folder = model_dir(args.model)
    names = [j for j in args.jobs.split(",") if j]
    if args.variant:  # a child: its measurements, as JSON lines on stdout
        run_variant(args.variant, args.folder, make_jobs(args.folder, names), args)
        return
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        sys.exit(f"--variants must name some of {list(VARIANTS)}, got {unknown}")
    if args.kv_cache_tokens is not None and set(ALONE) & set(variants):
        sys.exit("--kv-cache-tokens: vLLM as users run it keeps its default cache; drop the vllm variants")
    args.preload = preloads() if args.use_preload else {}
    jobs = make_jobs(args.folder, names)
    files = {job: _vllm_requests_file(jobs[job]) for job in names}
    runs: dict[tuple[str, str], list[dict]] = {}
    bindings: dict[str, str] = {}

    def record(job: str, variant: str, repeat: int, result: dict) -> None:
        result["outputs"] = {int(k): v for k, v in result["outputs"].items()}
        runs.setdefault((job, variant), []).append(result)
        print(f"  {job:17s} {variant:17s} run {repeat + 1}: {result['wall_s']:6.1f} s wall, "
              f"{result['generate_s']:6.2f} s generating, {result['computed']} prompt tokens computed",
              file=sys.stderr, flush=True)

    try:
        for variant in variants:
            if variant in ALONE:
                results, bindings[variant] = measure_alone(variant, files, args)
            else:
                results = measure(variant, names, args)
            missing = {(job, r) for job in names for r in range(args.repeats)} - results.keys()
            if missing:
                print(f"  {variant}: no result for {sorted(missing)}", file=sys.stderr, flush=True)
            for (job, repeat), result in sorted(results.items(), key=lambda item: item[0][1]):
                record(job, variant, repeat, result)
    finally:
        for path in files.values():
            os.unlink(path)
    report_tables(args, names, variants, jobs, runs, bindings)


def _common(a: list[int], b: list[int]) -> int:
    """How many tokens two outputs share before they first differ."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def report_tables(args, names, variants, jobs, runs, bindings) -> None:
    import platform

    from prefixbatch.prefix_tree import PlanSettings, plan_requests

    print(f"model {args.model} ({args.dtype}), {args.repeats} repeats (median)"
          f"{', one-core CPU hog running' if args.hog else ''}; machine {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs; vLLM preloads: {args.preload or 'none found'}\n")
    print("| job | variant | wall s (with start-up) | generate s | output tok/s | prompt tokens computed | "
          "planner unique | prompt tokens | agreement (share of tokens before rows part) |")
    print("|---|---|---|---|---|---|---|---|---|")
    report = {}
    for job in names:
        requests = jobs[job]
        unique = plan_requests(requests, PlanSettings(kv_budget_tokens=131_072)).plan.stats.num_unique_tokens
        measured_variants = [v for v in variants if (job, v) in runs]
        if not measured_variants:
            continue
        reference = runs[(job, measured_variants[0])][0]["outputs"]
        for variant in variants:
            measured = runs.get((job, variant))
            if not measured:
                print(f"| {job} | {variant} | failed (its log above) | | | | | | |")
                continue
            median = sorted(measured, key=lambda r: r["generate_s"])[len(measured) // 2]
            agree = sum(median["outputs"][k] == reference[k] for k in reference)
            shared = sum(_common(median["outputs"][k], reference[k]) for k in reference)
            wall = statistics.median(r["wall_s"] for r in measured)
            generate = statistics.median(r["generate_s"] for r in measured)
            print(f"| {job} | {variant} | {wall:.1f} | {generate:.2f} | {median['output_tokens'] / generate:.1f} | "
                  f"{median['computed']:,} | {unique:,} | {sum(r.num_prompt_tokens for r in requests):,} "
                  f"| {agree}/{len(reference)} ({shared / max(1, sum(map(len, reference.values()))):.0%}) |")
            report[f"{job}/{variant}"] = {"walls": [r["wall_s"] for r in measured],
                                          "generates": [r["generate_s"] for r in measured],
                                          "computed": median["computed"], "unique": unique,
                                          "output_tokens": median["output_tokens"], "setup": median["setup"]}
    print("\nset-up of each engine (last run):")
    for variant in variants:
        done = [runs[(job, variant)] for job in names if (job, variant) in runs]
        if not done:
            continue
        setup = done[-1][-1]["setup"]
        print(f"  {variant}: " + ", ".join(f"{k} {v}" for k, v in setup.items()))
        if bindings.get(variant):
            print("    " + bindings[variant].replace("\n", "\n    "))
    if "native" in variants and len(variants) > 1:
        print("\nnative speed ÷ each variant's (generate time, median):")
        for job in [job for job in names if (job, "native") in runs]:
            native = statistics.median(r["generate_s"] for r in runs[(job, "native")])
            ratios = [f"{v} {statistics.median(r['generate_s'] for r in runs[(job, v)]) / native:.2f}x"
                      for v in variants if v != "native" and (job, v) in runs]
            print(f"  {job}: " + ", ".join(ratios))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
