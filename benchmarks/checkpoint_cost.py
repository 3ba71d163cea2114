"""What checkpointing generations in flight costs: whole `prefixbatch run` jobs, on and off.

Two jobs on the `small` test model (fp32, CPU, 2 threads), each run with
`output.checkpoint_seconds: 1` (sixty times the default's rate) and with checkpoints off
(`null`), alternating (and alternating which goes first), `--repeats` times; reported: the median `generate_s` and output
tokens/s of each, their ratio, and how many checkpoints the "on" runs wrote.

    a     like engine_bench (a): 64 prompts = one ~1,000-token shared system prompt + a unique
          question, 32 new tokens
    long  4 prompts, 1,024 new tokens each (a long generation: checkpoints hold ~4K tokens)

    .venv/bin/python benchmarks/checkpoint_cost.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from prefixbatch.executors.random_model import make_test_model
from prefixbatch.jobs.run import run_job
from prefixbatch.jobs.spec import spec_from_dict
from prefixbatch.pipeline import checkpoints as checkpoint_module

WORDS = "river stone lamp seed tower bread violin ocean cloud apple garden window letter".split()


def prompts(job: str) -> tuple[list[str], int]:
    rnd = random.Random(0)
    if job == "a":
        system = " ".join(rnd.choice(WORDS) for _ in range(700))
        return [f"{system}\nQuestion {i}: " + " ".join(rnd.sample(WORDS, 8)) for i in range(64)], 32
    return [f"Story {i}: " + " ".join(rnd.sample(WORDS, 6)) for i in range(4)], 1024


def run_once(model: Path, work: Path, job: str, every_s: float | None) -> tuple[float, float]:
    texts, max_tokens = prompts(job)
    pq.write_table(pa.table({"id": list(range(len(texts))), "prompt": texts}), work / "in.parquet")
    spec = {
        "name": f"checkpoint-cost-{job}",
        "input": {"path": str(work / "in.parquet"), "prompt_column": "prompt"},
        "output": {"path": str(work / "out"), "mode": "overwrite", "checkpoint_seconds": every_s},
        "model": {"path": str(model), "dtype": "float32"},
        "sampling": {"max_tokens": max_tokens},
        "executor": {"kind": "native", "device": "cpu"},
    }
    summary = run_job(spec_from_dict(spec, base_dir=work, source="bench"), live_progress=False, log=lambda _: None)
    return summary.generate_s, summary.output_tokens_per_s


class CountWrites:
    """Counts checkpoint files written (patched in for the measurement only)."""

    def __init__(self) -> None:
        self.count = 0
        self._write = checkpoint_module.Checkpoints.write

    def __enter__(self) -> CountWrites:
        def counted(checkpoints, partials):
            self.count += 1
            return self._write(checkpoints, partials)

        checkpoint_module.Checkpoints.write = counted
        return self

    def __exit__(self, *exc: object) -> None:
        checkpoint_module.Checkpoints.write = self._write


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model-dir", type=Path, default=Path(".cache/engine_bench/small-llama"))
    parser.add_argument("--jobs", default="a,long", help="comma-separated: a, long")
    args = parser.parse_args()
    args.model_dir = args.model_dir.resolve()
    torch.set_num_threads(2)
    if not (args.model_dir / "config.json").exists():
        make_test_model(args.model_dir, arch="llama", size="small")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for job in args.jobs.split(","):
            run_once(args.model_dir, Path(tmp), job, None)  # warm-up: model load, page cache
            times: dict[str, list[tuple[float, float]]] = {"on": [], "off": []}
            with CountWrites() as writes:
                for repeat in range(args.repeats):  # which goes first alternates too
                    pair = (("off", None), ("on", 1.0))
                    for mode, every_s in pair if repeat % 2 == 0 else pair[::-1]:
                        times[mode].append(run_once(args.model_dir, Path(tmp), job, every_s))
            med = {m: (statistics.median(t for t, _ in v), statistics.median(r for _, r in v)) for m, v in times.items()}
            rows.append({
                "job": job, "off_s": med["off"][0], "on_s": med["on"][0], "off_tok_s": med["off"][1],
                "on_tok_s": med["on"][1], "on_over_off": med["on"][1] / med["off"][1],
                "checkpoints_written": writes.count, "repeats": args.repeats,
            })
    print("| job | off: generate s | on (every 1 s): generate s | off tok/s | on tok/s | on ÷ off | checkpoints written |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['job']} | {r['off_s']:.2f} | {r['on_s']:.2f} | {r['off_tok_s']:.1f} | {r['on_tok_s']:.1f} |"
              f" {r['on_over_off']:.3f} | {r['checkpoints_written']} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    start = time.monotonic()
    main()
    print(f"total {time.monotonic() - start:.0f} s")
