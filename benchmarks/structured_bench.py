"""What a structured-output constraint costs: output tokens/s with and without a JSON schema.

The same `--rows` prompts (random token ids, the `small` test model, fp32, greedy) run on the
native executor three ways, alternating within each repeat, median of `--repeats`:

    free          no constraint, max_tokens = the constrained runs' mean output length
    json_schema   a nested schema (objects, an array, enums, required fields)
    mixed         half the rows constrained, half free (what unconstrained rows pay)

Reported per variant: output tokens, seconds, output tokens/s, and the ratio to free.

    .venv/bin/python benchmarks/structured_bench.py --rows 64 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

SCHEMA = {
    "type": "object",
    "properties": {
        "label": {"enum": ["positive", "negative", "neutral", "mixed"]},
        "topics": {"type": "array", "items": {"enum": ["price", "quality", "service", "delivery"]}, "maxItems": 4},
        "scores": {
            "type": "object",
            "properties": {"stars": {"type": "integer", "minimum": 1, "maximum": 5}, "verified": {"type": "boolean"}},
            "required": ["stars", "verified"],
            "additionalProperties": False,
        },
    },
    "required": ["label", "topics", "scores"],
    "additionalProperties": False,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import numpy as np
    import torch
    import vllm_bench
    from transformers import AutoTokenizer

    from prefixbatch.executors.config import ExecutorSpec, ModelSpec
    from prefixbatch.executors.registry import create_executor
    from prefixbatch.jobs.planning import DEFAULT_CPU_KV_BUDGET
    from prefixbatch.prefix_tree import PlanSettings, plan_requests
    from prefixbatch.types import Request, SamplingParams

    torch.set_num_threads(2)
    folder = vllm_bench.model_dir("small")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    regular = np.setdiff1d(np.arange(len(tokenizer)), tokenizer.all_special_ids)
    rng = np.random.default_rng(0)
    prompts = [tuple(rng.choice(regular, size=int(rng.integers(64, 257))).tolist()) for _ in range(args.rows)]
    schema = SamplingParams(max_tokens=96, json_schema=json.dumps(SCHEMA, sort_keys=True))
    executor = create_executor(ModelSpec(path=str(folder), dtype="float32"), ExecutorSpec(kind="native", device="cpu"))

    def run(requests: list) -> tuple[float, int, list]:
        started = time.perf_counter()
        work = plan_requests(requests, PlanSettings(kv_budget_tokens=DEFAULT_CPU_KV_BUDGET))
        completions = list(executor.generate(work))
        return time.perf_counter() - started, sum(c.num_output_tokens for c in completions), completions

    constrained = [Request(i, p, schema) for i, p in enumerate(prompts)]
    _, tokens, completions = run(constrained)  # warm-up, and the output length to match
    stopped = sum(c.finish_reason == "stop" for c in completions)
    length = max(1, round(tokens / len(completions)))
    free = [Request(i, p, SamplingParams(max_tokens=length)) for i, p in enumerate(prompts)]
    mixed = [r if r.row_index % 2 else replace(r, sampling=SamplingParams(max_tokens=length)) for r in constrained]
    variants = {"free": free, "json_schema": constrained, "mixed": mixed}
    results: dict[str, list[tuple[float, int]]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, requests in variants.items():
            seconds, tokens, _ = run(requests)
            results[name].append((seconds, tokens))
    print(f"{args.rows} rows, prompts 64–256 tokens; constrained outputs: {stopped}/{len(completions)} ended by EOS "
          f"(valid), mean length {length} tokens; free rows get max_tokens = {length}\n")
    print("| variant | output tokens | s (median) | output tok/s | vs free |\n|---|---|---|---|---|")
    free_rate = None
    for name, runs in results.items():
        seconds = statistics.median(s for s, _ in runs)
        tokens = runs[0][1]
        rate = tokens / seconds
        free_rate = free_rate or rate
        print(f"| {name} | {tokens:,} | {seconds:.2f} | {rate:.1f} | {rate / free_rate:.2f} |")


if __name__ == "__main__":
    main()
