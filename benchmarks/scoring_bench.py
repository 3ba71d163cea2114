"""Scoring a 5-shot multiple-choice evaluation: native (prefix tree) vs hf (padded batches).

The job is lm-evaluation-harness' shape: `--subjects` subjects, each with its own 5-shot
block (`--shot-tokens` tokens), `--questions` questions spread over them (a question of
16–48 tokens) and 4 choices each (1–6 tokens): one scoring request per choice, context =
shots + question. Token ids are random (the `small` test model, fp32). Both executors get
the same requests, planned as a run plans them; each runs once to warm up on a small slice,
then on the whole job. Reported: continuations scored per second, prefill tokens computed
(against the prefix tree's unique tokens and the job's total), and the largest difference
between the two executors' scores.

    .venv/bin/python benchmarks/scoring_bench.py --questions 1000 --subjects 5
    .venv/bin/python benchmarks/scoring_bench.py --questions 1000 --subjects 5 --executors native,vllm
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def make_requests(model_dir: Path, *, subjects: int, questions: int, shot_tokens: int, seed: int = 0) -> list:
    import numpy as np
    from transformers import AutoTokenizer

    from prefixbatch.types import Request, SamplingParams

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    regular = np.setdiff1d(np.arange(len(tokenizer)), tokenizer.all_special_ids)
    rng = np.random.default_rng(seed)
    shots = [rng.choice(regular, size=shot_tokens).tolist() for _ in range(subjects)]
    params = SamplingParams(max_tokens=0)
    requests = []
    for question in range(questions):
        context = shots[question % subjects] + rng.choice(regular, size=int(rng.integers(16, 49))).tolist()
        for choice in range(4):
            continuation = rng.choice(regular, size=int(rng.integers(1, 7))).tolist()
            requests.append(Request(question, tuple(context + continuation), params, sample_index=choice,
                                    num_scored_tokens=len(continuation)))
    return requests


def run(kind: str, model_dir: Path, requests: list) -> tuple[float, dict, int]:
    from prefixbatch.executors.config import ExecutorSpec, ModelSpec
    from prefixbatch.executors.registry import create_executor
    from prefixbatch.jobs.planning import DEFAULT_CPU_KV_BUDGET
    from prefixbatch.prefix_tree import PlanSettings, plan_requests

    # vllm: prefixbatch's vLLM executor (vLLM's CPU build, prefix caching on) fed the same plan;
    # each continuation is one request with prompt logprobs and one dropped output token.
    settings = {"vllm": {"cpu_kv_cache_gib": 1}} if kind == "vllm" else {}
    executor = create_executor(ModelSpec(path=str(model_dir), dtype="float32"),
                               ExecutorSpec(kind=kind, device="cpu", **settings))
    sharing = kind != "hf"

    def score(batch: list) -> tuple[float, dict]:
        started = time.perf_counter()
        work = plan_requests(batch, PlanSettings(kv_budget_tokens=DEFAULT_CPU_KV_BUDGET, prefix_sharing=sharing))
        scores = {(c.row_index, c.sample_index): c.continuation_logprob for c in executor.generate(work)}
        return time.perf_counter() - started, scores

    score(requests[:32])  # warm-up
    before = executor.stats.num_prefill_tokens
    seconds, scores = score(requests)
    return seconds, scores, executor.stats.num_prefill_tokens - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=1000)
    parser.add_argument("--subjects", type=int, default=5)
    parser.add_argument("--shot-tokens", type=int, default=400)
    parser.add_argument("--executors", default="native,hf")
    args = parser.parse_args()

    import torch
    import vllm_bench

    torch.set_num_threads(2)
    model_dir = vllm_bench.model_dir("small")
    requests = make_requests(model_dir, subjects=args.subjects, questions=args.questions, shot_tokens=args.shot_tokens)
    total = sum(len(r.token_ids) for r in requests)
    unique = len({r.token_ids[:i] for r in requests for i in range(1, len(r.token_ids) + 1)})
    print(f"{args.questions} questions × 4 choices over {args.subjects} subjects ({args.shot_tokens}-token 5-shot "
          f"blocks): {len(requests)} continuations, {total:,} prompt tokens, {unique:,} unique")
    print("\n| executor | s | continuations/s | prefill tokens computed | of all prompt tokens |\n|---|---|---|---|---|")
    results = {}
    for kind in args.executors.split(","):
        seconds, scores, computed = run(kind, model_dir, requests)
        results[kind] = (seconds, scores)
        print(f"| {kind} | {seconds:.1f} | {len(scores) / seconds:.1f} | {computed:,} | {computed / total:.1%} |")
    for peer in ("hf", "vllm"):
        if {"native", peer} <= set(results):
            native, other = results["native"], results[peer]
            diff = max(abs(native[1][key] - other[1][key]) for key in other[1])
            print(f"\nnative ÷ {peer}, continuations per second: {other[0] / native[0]:.1f}×; "
                  f"largest score difference {diff:.2e}")


if __name__ == "__main__":
    main()
