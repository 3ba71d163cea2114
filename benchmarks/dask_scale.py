"""The same CPU job on a Dask LocalCluster of 1 and of 2 single-threaded worker processes.

A whole `prefixbatch run` (read, tokenize, plan, shards on the workers, parts written by the
workers, commits by the driver) on the `small` test model with the native engine:
8 system prompts (~200 words) x 24 questions (~18 words) = 192 prompts of random words
(no chat template), 32 new tokens each, greedy, 2 shards per worker. Every process runs torch on one thread
(`OMP_NUM_THREADS=1`). Each cluster is started before the clock starts; the timed run
includes loading the engine on each worker (once per worker, in parallel). Reported: wall
seconds of the run, output tokens/s, and 2-worker / 1-worker throughput; median of
`--repeats`, the two cluster sizes alternating.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/dask_scale.py --repeats 3
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
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--questions", type=int, default=96, help="prompts per system prompt (8 system prompts)")
    parser.add_argument("--shards-per-worker", type=int, default=2)
    parser.add_argument("--model-dir", type=Path, default=Path(".cache/engine_bench/small-llama"))
    args = parser.parse_args(argv)

    from distributed import LocalCluster

    from prefixbatch.executors.test_model import make_test_model
    from prefixbatch.jobs.run import run_job
    from prefixbatch.jobs.spec import spec_from_dict

    if not (args.model_dir / "config.json").exists():
        make_test_model(args.model_dir, arch="llama", size="small")
    vocabulary = [w for w in Path(__file__).read_text().split() if w.isalpha()]
    work = Path(tempfile.mkdtemp(prefix="dask-scale-"))
    write_prompts(work, vocabulary, seed=0, questions=args.questions)
    clusters = {n: LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None) for n in (1, 2)}
    seconds: dict[int, list[float]] = {1: [], 2: []}
    tokens: dict[int, int] = {}
    try:
        for repeat in range(args.repeats):
            for n, cluster in clusters.items():
                spec = {
                    "name": f"dask-scale-{n}",
                    "input": {"path": str(work / "in.parquet"), "prompt_column": "prompt"},
                    "output": {"path": str(work / f"out-{n}-{repeat}")},
                    "model": {"path": str(args.model_dir.resolve())},
                    "sampling": {"max_tokens": 32},
                    "executor": {"kind": "native"},
                    "cluster": {"kind": "dask", "address": cluster.scheduler_address, "shards_per_worker": args.shards_per_worker},
                }
                start = time.perf_counter()
                summary = run_job(spec_from_dict(spec, base_dir=work, source="bench"), live_progress=False, log=lambda _: None)
                seconds[n].append(time.perf_counter() - start)
                tokens[n] = summary.output_tokens
                print(f"  {n} worker(s), run {repeat + 1}: {seconds[n][-1]:.2f} s, {summary.output_tokens} output tokens, "
                      f"{len(summary.shards)} shards, {summary.prefill_tokens_computed} prefill tokens", file=sys.stderr, flush=True)
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
