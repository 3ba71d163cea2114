"""Where a native run's time goes: one peer-benchmark job under `torch.profiler`, by kind.

Runs `vllm_bench.py`'s job (same requests, same KV budget) once untimed and once profiled,
then prints the profile's self CPU time per op family — dense layers, attention, KV writes,
pointwise ops, sampling — and the Python/other remainder (wall minus op time), and the top
ops. This is the profile BENCHMARKS.md quotes before and after each engine change.

    .venv/bin/python benchmarks/engine_profile.py --job a
    .venv/bin/python benchmarks/engine_profile.py --job long --model qwen2.5-0.5b --top 25
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

FAMILIES = {  # op name fragment → family; first match wins
    "linear": "dense", "prefixbatch::dense": "dense", "addmm": "dense", "mm": "dense", "_linear_pointwise": "dense",
    "flash_attention": "attention", "span_attention": "attention", "bmm": "attention", "logsumexp": "attention",
    "logaddexp": "attention", "index_copy": "kv write", "argmax": "sampling",
    "multinomial": "sampling", "sort": "sampling", "softmax": "sampling",
}


def family(op: str) -> str:
    return next((f for key, f in FAMILIES.items() if key in op), "pointwise/copies")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", default="a")
    parser.add_argument("--model", default="small")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = parser.parse_args()

    # prefixbatch before torch, as in a user's process: it sets GOMP_SPINCOUNT before OpenMP loads.
    importlib.import_module("prefixbatch")
    import torch
    import vllm_bench
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(2)
    executor, work = vllm_bench.native_setup(args.job, args.model, args.dtype)
    started = time.perf_counter()
    list(executor.generate(work))
    plain = time.perf_counter() - started
    steps = executor.stats.num_steps
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        started = time.perf_counter()
        list(executor.generate(work))
        profiled = time.perf_counter() - started
    totals: dict[str, float] = defaultdict(float)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    for event in events:
        totals[family(event.key)] += event.self_cpu_time_total / 1e6
    op_time = sum(totals.values())
    print(f"job {args.job}, model {args.model}: {plain:.2f} s unprofiled, {profiled:.2f} s profiled, {steps} steps, "
          f"{plain / steps * 1e3:.2f} ms/step")
    print("\n| family | s | share of profiled wall |\n|---|---|---|")
    for name, seconds in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {seconds:.2f} | {seconds / profiled:.0%} |")
    print(f"| Python and other (wall − ops) | {profiled - op_time:.2f} | {(profiled - op_time) / profiled:.0%} |")
    print(f"\ntop {args.top} ops by self CPU time:")
    for event in sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.top]:
        print(f"  {event.key:60s} {event.self_cpu_time_total / 1e6:7.3f} s  {event.count:7d} calls")


if __name__ == "__main__":
    main()
