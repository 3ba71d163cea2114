"""What checkpointing generations in flight costs: whole `prefixbatch run` jobs, on and off.

Two jobs on the `small` test model (fp32, CPU, 2 threads), each run with
`output.checkpoint_seconds: 1` (sixty times the default's rate) and with checkpoints off
(`null`), alternating (and alternating which goes first), `--repeats` times; reported: the median `generate_s` and output
tokens/s of each, their ratio, and how many checkpoints the "on" runs wrote.

    a     like engine_bench (a): 64 prompts = one ~1,000-token shared system prompt + a unique
          question, 32 new tokens
    long  4 prompts, 1,024 new tokens each (a long generation: checkpoints hold ~4K tokens)

    .venv/bin/python benchmarks/checkpoint_cost.py --repeats 3

`--fsync`: instead, what making every write durable costs (each part, commit record and
checkpoint fsync'ed, then its folder: `pipeline/commits.py`). Job (a) at the shipped
settings and at a write-heavy one (checkpoints every 1 s, 8 rows a part), each with fsync and
with `_fsync` patched to do nothing, alternating; reported: median whole-job wall time of
each and their ratio, and the time spent inside fsync itself, timed directly.

    .venv/bin/python benchmarks/checkpoint_cost.py --fsync --repeats 5
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
from prefixbatch.pipeline import commits as commits_module

WORDS = "river stone lamp seed tower bread violin ocean cloud apple garden window letter".split()


def prompts(job: str) -> tuple[list[str], int]:
    rnd = random.Random(0)
    if job == "a":
        system = " ".join(rnd.choice(WORDS) for _ in range(700))
        return [f"{system}\nQuestion {i}: " + " ".join(rnd.sample(WORDS, 8)) for i in range(64)], 32
    return [f"Story {i}: " + " ".join(rnd.sample(WORDS, 6)) for i in range(4)], 1024


def run_once(model: Path, work: Path, job: str, every_s: float | None, rows_per_part: int = 10_000) -> tuple[float, float]:
    texts, max_tokens = prompts(job)
    pq.write_table(pa.table({"id": list(range(len(texts))), "prompt": texts}), work / "in.parquet")
    spec = {
        "name": f"checkpoint-cost-{job}",
        "input": {"path": str(work / "in.parquet"), "prompt_column": "prompt"},
        "output": {"path": str(work / "out"), "mode": "overwrite", "checkpoint_seconds": every_s,
                   "rows_per_part": rows_per_part},
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


FSYNC_SETTINGS = {  # (checkpoint_seconds, rows_per_part)
    "defaults": (60.0, 10_000),  # a job as shipped: a part, its record, the side files
    "stress": (1.0, 8),  # 60x the checkpoints, 8 parts and 8 records: far more writes than real jobs make
}


def fsync_cost(model: Path, repeats: int) -> None:
    """Job (a), durable writes on and off (`_fsync` a no-op), alternating, at the shipped
    settings and at a write-heavy stress setting: wall and generate medians, and the time spent
    inside fsync itself (timed directly: immune to other processes slowing whole runs)."""
    real_fsync = commits_module._fsync
    print("| settings | no fsync: wall s | fsync: wall s | wall ratio | fsync calls a run | inside fsync a run | share of the fsync runs' wall |")
    print("|---|---|---|---|---|---|---|")
    for name, (every_s, rows_per_part) in FSYNC_SETTINGS.items():
        inside = [0.0, 0]  # seconds inside fsync, calls

        def timed_fsync(path: str, inside=inside) -> None:
            start = time.monotonic()
            real_fsync(path)
            inside[0] += time.monotonic() - start
            inside[1] += 1

        walls: dict[str, list[float]] = {"fsync": [], "no fsync": []}
        with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:  # a real disk, not tmpfs
            run_once(model, Path(tmp), "a", every_s, rows_per_part=rows_per_part)  # warm-up
            for repeat in range(repeats):
                pair = ("no fsync", "fsync")
                for mode in pair if repeat % 2 == 0 else pair[::-1]:
                    commits_module._fsync = timed_fsync if mode == "fsync" else (lambda path: None)
                    start = time.monotonic()
                    run_once(model, Path(tmp), "a", every_s, rows_per_part=rows_per_part)
                    walls[mode].append(time.monotonic() - start)
            commits_module._fsync = real_fsync
        off, on = statistics.median(walls["no fsync"]), statistics.median(walls["fsync"])
        print(f"| {name} (checkpoint every {every_s:g} s, {rows_per_part} rows a part) | {off:.2f} | {on:.2f} |"
              f" {on / off:.3f} | {inside[1] / repeats:.0f} | {1000 * inside[0] / repeats:.0f} ms |"
              f" {100 * inside[0] / sum(walls['fsync']):.2f}% |")
        print(json.dumps({"settings": name, "repeats": repeats, "walls": walls, "inside_fsync_s": inside[0]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model-dir", type=Path, default=Path(".cache/engine_bench/small-llama"))
    parser.add_argument("--jobs", default="a,long", help="comma-separated: a, long")
    parser.add_argument("--fsync", action="store_true", help="measure durable writes (fsync) on vs off on job (a)")
    args = parser.parse_args()
    args.model_dir = args.model_dir.resolve()
    torch.set_num_threads(2)
    if not (args.model_dir / "config.json").exists():
        make_test_model(args.model_dir, arch="llama", size="small")
    if args.fsync:
        fsync_cost(args.model_dir, args.repeats)
        return
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
