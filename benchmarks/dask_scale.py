"""The same CPU job on a Dask LocalCluster of 1 and of 2 single-threaded worker processes.

A whole `prefixbatch run` (read, tokenize, plan, shards on the workers, parts written by the
workers, commits by the driver) on the `small` test model with the native engine:
8 system prompts (~200 words) x `--questions` (96) questions (~18 words) = 768 prompts of
random words (no chat template), 32 new tokens each, greedy, `--shards-per-worker` (2).
Every process runs torch on one thread (`OMP_NUM_THREADS=1`).

Each cluster is started, and runs one untimed warm-up job, before the clock starts: a
long-lived cluster's worker processes have imported torch and transformers already (the
first job on a fresh cluster pays that too; its time is printed, not counted). Every timed
run still loads the engine (weights) on each worker, in parallel with the driver's reading
and planning. Reported: wall seconds of the run, output tokens/s, and 2-worker / 1-worker
throughput; median of `--repeats`, the two cluster sizes alternating. Per run (stderr):
when the first shard started, each worker's busy seconds (engine load + generation), and
the driver's CPU seconds (this process, which also hosts the LocalCluster scheduler).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/dask_scale.py --repeats 5
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/dask_scale.py --repeats 3 --plan-on workers
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ["OMP_NUM_THREADS"] = "1"  # before torch loads, here and in the workers (inherited)

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

WORDS = """
time year people way day man thing woman life child world school state family student group
country problem hand part place case week company system program question work government
number night point home water room mother area money story fact month lot right study book
eye job word business issue side kind head house service friend father power hour game line
end member law car city community name president team minute idea kid body information back
parent face others level office door health person art war history party result change
morning reason research girl guy moment air teacher force education foot boy age policy
process music market sense nation plan college interest death experience effect use class
control care field development role effort rate heart drug show leader light voice wife
police mind price report decision son view relationship town road arm difference value
""".split()


def write_prompts(folder: Path, vocabulary: list[str], seed: int, questions: int = 24) -> None:
    rng = np.random.default_rng(seed)
    words = lambda n: " ".join(rng.choice(vocabulary, size=n))  # noqa: E731
    systems = [words(200) for _ in range(8)]
    prompts = [f"{system}\nQuestion: {words(18)}" for system in systems for _ in range(questions)]
    ids = [f"p{i:03d}" for i in range(len(prompts))]
    order = rng.permutation(len(prompts))  # the input order does not group the prefixes
    pq.write_table(pa.table({"id": [ids[i] for i in order], "prompt": [prompts[i] for i in order]}), folder / "in.parquet")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--questions", type=int, default=96, help="prompts per system prompt (8 system prompts)")
    parser.add_argument("--shards-per-worker", type=int, default=2)
    parser.add_argument("--plan-on", choices=["driver", "workers"], default="driver", help="cluster.plan_on")
    parser.add_argument("--model-dir", type=Path, default=Path(".cache/engine_bench/small-llama"))
    args = parser.parse_args(argv)

    from distributed import LocalCluster

    from prefixbatch.executors.random_model import make_test_model
    from prefixbatch.jobs.run import run_job
    from prefixbatch.jobs.spec import spec_from_dict

    if not (args.model_dir / "config.json").exists():
        make_test_model(args.model_dir, arch="llama", size="small")
    work = Path(tempfile.mkdtemp(prefix="dask-scale-"))
    write_prompts(work, WORDS, seed=0, questions=args.questions)
    clusters = {n: LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None) for n in (1, 2)}
    seconds: dict[int, list[float]] = {1: [], 2: []}
    tokens: dict[int, int] = {}

    def run(n: int, name: str) -> tuple[float, object]:
        spec = {
            "name": f"dask-scale-{n}",
            "input": {"path": str(work / "in.parquet"), "prompt_column": "prompt"},
            "output": {"path": str(work / f"out-{n}-{name}")},
            "model": {"path": str(args.model_dir.resolve())},
            "sampling": {"max_tokens": 32},
            "executor": {"kind": "native"},
            "cluster": {"kind": "dask", "address": clusters[n].scheduler_address, "shards_per_worker": args.shards_per_worker,
                        "plan_on": args.plan_on},
        }
        start, wall_start, cpu_start = time.perf_counter(), time.time(), time.process_time()
        summary = run_job(spec_from_dict(spec, base_dir=work, source="bench"), live_progress=False, log=lambda _: None)
        wall = time.perf_counter() - start
        driver_cpu = time.process_time() - cpu_start  # this process: driver and scheduler
        first = min(s["started"] for s in summary.shards) - wall_start
        busy = {w: sum(s["generate_s"] + s["engine_load_s"] for s in summary.shards if s["worker"] == w)
                for w in {s["worker"] for s in summary.shards}}
        print(f"  {n} worker(s), {name}: {wall:.2f} s, {summary.output_tokens} output tokens, "
              f"{len(summary.shards)} shards, {summary.prefill_tokens_computed} prefill tokens; first shard at {first:.2f} s, "
              f"worker busy {', '.join(f'{b:.2f}' for b in sorted(busy.values()))} s, driver CPU {driver_cpu:.2f} s",
              file=sys.stderr, flush=True)
        return wall, summary

    try:
        for n in clusters:
            run(n, "warm-up (fresh cluster, not counted)")
        for repeat in range(args.repeats):
            for n in clusters:
                wall, summary = run(n, f"run {repeat + 1}")
                seconds[n].append(wall)
                tokens[n] = summary.output_tokens
    finally:
        for cluster in clusters.values():
            cluster.close()
    rate = {n: tokens[n] / statistics.median(seconds[n]) for n in (1, 2)}
    print("| workers | median s | output tok/s | vs 1 worker |")
    print("|---|---|---|---|")
    for n in (1, 2):
        print(f"| {n} | {statistics.median(seconds[n]):.2f} | {rate[n]:.1f} | {rate[n] / rate[1]:.2f}× |")


if __name__ == "__main__":
    main()
