"""Prefill and decode apart: each engine's step times on one peer-benchmark job.

Runs `vllm_bench.py`'s job once to warm up and once timed, step by step, for the native
engine and for vLLM alone (each in its own process, as `vllm_bench.py` runs them), and prints
the time of the steps that prefill (any prompt token in the step) and the median decode step.
This is how BENCHMARKS.md splits the gap to vLLM between the two phases.

    .venv/bin/python benchmarks/phase_times.py --job a
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def native_steps(job: str, model: str) -> list[tuple[bool, float]]:
    import vllm_bench

    from prefixbatch.executors.native import engine

    executor, work = vllm_bench.native_setup(job, model)
    steps: list[tuple[bool, float]] = []
    forward = engine._forward

    def timed(model, store, step, *args):
        started = time.perf_counter()
        logits = forward(model, store, step, *args)
        steps.append((bool(step.prefill_chunks), time.perf_counter() - started))
        return logits

    list(executor.generate(work))  # warm-up
    engine._forward = timed
    list(executor.generate(work))
    return steps


def vllm_steps(job: str, model: str) -> list[tuple[bool, float]]:
    import vllm_bench
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    folder = vllm_bench.model_dir(model)
    requests = vllm_bench.make_jobs(folder, [job])[job]
    engine = _vllm_engine(folder)
    steps: list[tuple[bool, float]] = []
    for repeat in range(2):  # the first warms up
        engine.reset_prefix_cache()
        for i, r in enumerate(requests):
            engine.add_request(f"{repeat}-{i}", TokensPrompt(prompt_token_ids=list(r.token_ids)),
                               SamplingParams(max_tokens=r.sampling.max_tokens, temperature=0))
        steps.clear()
        prefilled = 0  # requests whose prompt is done: a step before all are is a prefill step
        while engine.has_unfinished_requests():
            started = time.perf_counter()
            outputs = engine.step()
            elapsed = time.perf_counter() - started
            steps.append((prefilled < len(requests), elapsed))
            prefilled += sum(1 for out in outputs if len(out.outputs[0].token_ids) == 1)
    return steps


def _vllm_engine(folder: Path):
    """vLLM's engine in this process, stepped by hand (eager, 32-token blocks, 1 GiB of cache): not
    vLLM as its users run it (`vllm_alone.py`), and `engine.step()` is more than native's forward;
    issue 29 asks for the same scope on both sides."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from vllm import EngineArgs, LLMEngine

    return LLMEngine.from_engine_args(EngineArgs(
        model=str(folder), dtype="float32", seed=0, enable_prefix_caching=True, block_size=32,
        enforce_eager=True, distributed_executor_backend="uni", disable_log_stats=True,
    ))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", default="a")
    parser.add_argument("--model", default="small")
    parser.add_argument("--variant", choices=["native", "vllm-alone"], help="(internal) run one variant here")
    args = parser.parse_args()
    if args.variant:
        if args.variant == "native":  # prefixbatch before torch, as in a user's process: it
            importlib.import_module("prefixbatch")  # sets GOMP_SPINCOUNT before OpenMP loads
        import torch

        torch.set_num_threads(2)
        steps = (native_steps if args.variant == "native" else vllm_steps)(args.job, args.model)
        print(json.dumps(steps))
        return
    print("| variant | prefill steps | prefill s | decode steps | median decode step ms | total s |\n|---|---|---|---|---|---|")
    for variant in ("vllm-alone", "native"):
        env = dict(os.environ)
        if variant == "vllm-alone":
            env["GOMP_SPINCOUNT"] = "300000"  # GNU's default, as vllm_bench.py runs vLLM alone
        result = subprocess.run(
            [sys.executable, __file__, "--job", args.job, "--model", args.model, "--variant", variant],
            capture_output=True, text=True, env=env, check=True,
        )
        steps = json.loads(result.stdout.strip().splitlines()[-1])
        prefill = [s for is_prefill, s in steps if is_prefill]
        decode = [s for is_prefill, s in steps if not is_prefill]
        print(f"| {variant} | {len(prefill)} | {sum(prefill):.2f} | {len(decode)} | "
              f"{statistics.median(decode) * 1e3:.1f} | {sum(s for _, s in steps):.2f} |")


if __name__ == "__main__":
    main()
