"""Prefill and decode apart: each engine's step times on one peer-benchmark job.

Runs `vllm_bench.py`'s job once to warm up and once timed, step by step, for the native
engine and for vLLM (each in its own process), and prints the time of the steps that prefill
and the median decode step. This is how BENCHMARKS.md splits the gap to vLLM between the two
phases.

The same scope on both sides: a step is everything its engine does from the end of one step
to the end of the next — vLLM's `LLMEngine.step()` (schedule, forward, sample, outputs; its
engine process at its defaults, so the wait for it too), native's loop turn (admission,
schedule, forward, sampling, stop rules, completions). vLLM runs as its users run it
(`LLM`'s defaults: compiled, its block size and cache, its engine process and binding) —
`vllm` — or with its threads on every core, `vllm-all-cores` (`vllm_bench.py` says why).

    .venv/bin/python benchmarks/phase_times.py --job a
    .venv/bin/python benchmarks/phase_times.py --job chat-shared --model smollm2 --dtype bfloat16
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

VARIANTS = ("vllm", "vllm-all-cores", "native")


def native_steps(job: str, model: str, dtype: str) -> list[tuple[bool, float]]:
    import vllm_bench

    from prefixbatch.executors.native import engine

    executor, work = vllm_bench.native_setup(job, model, dtype)
    steps: list[tuple[bool, float]] = []
    run = engine._PlanRun._run
    last = [0.0]

    def timed(self, step):
        finished = run(self, step)
        now = time.perf_counter()
        steps.append((bool(step.prefill_chunks), now - last[0]))  # since the last step's end
        last[0] = now
        return finished

    list(executor.generate(work))  # warm-up
    engine._PlanRun._run = timed
    last[0] = time.perf_counter()
    list(executor.generate(work))
    return steps


def vllm_steps(job: str, model: str, dtype: str) -> list[tuple[bool, float]]:
    import vllm_bench
    from vllm import EngineArgs, LLMEngine, SamplingParams
    from vllm.inputs import TokensPrompt

    folder = vllm_bench.model_dir(model)
    requests = vllm_bench.make_jobs(folder, [job])[job]
    engine = LLMEngine.from_engine_args(EngineArgs(model=str(folder), dtype=dtype, seed=0))  # its defaults
    steps: list[tuple[bool, float]] = []
    for repeat in range(2):  # the first warms up
        assert engine.reset_prefix_cache(), "vLLM did not empty its prefix cache"
        for i, r in enumerate(requests):
            engine.add_request(f"{repeat}-{i}", TokensPrompt(prompt_token_ids=list(r.token_ids)),
                               SamplingParams(max_tokens=r.sampling.max_tokens, temperature=0))
        steps.clear()
        prefilled = 0  # requests whose prompt is done: a step before all are is a prefill step
        last = time.perf_counter()
        while engine.has_unfinished_requests():
            outputs = engine.step()
            now = time.perf_counter()
            steps.append((prefilled < len(requests), now - last))
            last = now
            prefilled += sum(1 for out in outputs if len(out.outputs[0].token_ids) == 1)
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", default="a")
    parser.add_argument("--model", default="small")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--variant", choices=VARIANTS, help="(internal) run one variant here")
    args = parser.parse_args()
    if args.variant:
        if args.variant == "native":  # prefixbatch before torch, as in a user's process: it
            importlib.import_module("prefixbatch")  # sets GOMP_SPINCOUNT before OpenMP loads
        steps = (native_steps if args.variant == "native" else vllm_steps)(args.job, args.model, args.dtype)
        print("steps " + json.dumps(steps), flush=True)  # vLLM logs to stdout too
        return
    print("| variant | prefill steps | prefill s | decode steps | median decode step ms | total s |\n|---|---|---|---|---|---|")
    for variant in VARIANTS:
        env = dict(os.environ)  # the user's environment, at each engine's defaults
        if variant == "vllm-all-cores":
            env["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{os.cpu_count() - 1}"
        result = subprocess.run(
            [sys.executable, __file__, "--job", args.job, "--model", args.model, "--dtype", args.dtype,
             "--variant", variant],
            capture_output=True, text=True, env=env, check=True,
        )
        [line] = [line for line in result.stdout.splitlines() if line.startswith("steps ")]
        steps = json.loads(line.removeprefix("steps "))
        prefill = [s for is_prefill, s in steps if is_prefill]
        decode = [s for is_prefill, s in steps if not is_prefill]
        print(f"| {variant} | {len(prefill)} | {sum(prefill):.2f} | {len(decode)} | "
              f"{statistics.median(decode) * 1e3:.1f} | {sum(s for _, s in steps):.2f} |")


if __name__ == "__main__":
    main()
