"""How close the native engine runs to this machine's limits: FLOP/s against the fp32 GEMM
peak, bytes per decode step against the memory bandwidth — measured in one run.

1. Measures, in this process (2 threads): the fp32 GEMM peak of our packed products (what the
   engine's dense layers call on AVX-512; `dense.py`), of oneDNN on packed weights (what they
   call elsewhere) and of MKL (`F.linear`) over the
   model's own weight shapes at 256 and 1,024 rows; the memory bandwidth of a 1 GiB copy
   (bytes read + written per second) and of a 1 GiB read (a sum).
2. Runs `vllm_bench.py`'s native variant on each job (`--repeats`, median; own process).
3. Counts each job's work from its requests: dense FLOPs (2 × weights × tokens computed:
   every unique prompt token once, as the prefix tree computes them, and every decode
   token; lm_head only for the rows sampled; in the last layer a prompt token that is not
   sampled needs only its k, v projection) and attention FLOPs (4 × visible keys × heads ×
   head_dim per token and layer; in the last layer only for the rows sampled), and for
   decode the bytes a step must read (every weight once; every prompt key once, shared or
   not, as shared-prefix attention reads it; each row's own generated keys).

Decode tokens are counted as if every request generated its `max_tokens` (random weights
rarely stop early), scaled to the output tokens the run reported.

    .venv/bin/python benchmarks/roofline.py --jobs a,c,long
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

GIB = 1 << 30


def _timed(fn, seconds: float = 1.0) -> float:
    fn()
    fn()
    start, count = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        fn()
        count += 1
    return (time.perf_counter() - start) / count


def gemm_peaks(shapes: list[tuple[int, int]]) -> dict[str, float]:
    """GFLOP/s of our packed products (where this CPU runs them), oneDNN packed and MKL over
    `shapes` ([out, in] weights), best row count; "peak": the best of them."""
    import torch
    import torch.nn.functional as F

    from prefixbatch.executors.native.dense import PackedWeight

    best = {"ours packed": 0.0, "oneDNN packed": 0.0, "MKL (F.linear)": 0.0}
    for rows in (256, 1024):
        flops = sum(2 * rows * n_in * n_out for n_out, n_in in shapes)
        weights = [torch.randn(n_out, n_in) for n_out, n_in in shapes]
        inputs = [torch.randn(rows, n_in) for _, n_in in shapes]
        products = {"MKL (F.linear)": lambda x, w: F.linear(x, w)}
        for name, ours in (("ours packed", True), ("oneDNN packed", False)):
            packed = {id(w): PackedWeight.of(w, ours=ours) for w in weights}
            if ours and packed[id(weights[0])].kernel is None:
                continue  # this CPU has no AVX-512: the engine runs oneDNN's
            products[name] = lambda x, w, packed=packed: packed[id(w)].linear(x, None)
        for name, product in products.items():
            seconds = _timed(lambda: [product(x, w) for w, x in zip(weights, inputs)])  # noqa: B023
            best[name] = max(best[name], flops / seconds / 1e9)
    best["peak"] = max(best.values())
    return best


def bandwidth() -> dict[str, float]:
    """GB/s: a 1 GiB copy (read + write bytes) and a 1 GiB sum (read)."""
    import torch

    src = torch.ones(GIB // 4)
    dst = torch.empty_like(src)
    copy = _timed(lambda: dst.copy_(src))
    read = _timed(lambda: src.sum())
    return {"copy (read+write)": 2 * GIB / copy / 1e9, "read (sum)": GIB / read / 1e9}


def job_work(requests, config) -> dict[str, float]:
    """FLOPs and decode bytes of a job as the prefix tree computes it (see the docstring)."""
    hidden, layers = config.hidden_size, config.num_layers
    heads, head_dim, kv_heads = config.num_heads, config.head_dim, config.num_kv_heads
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    layer_weights = hidden * (q_size + 2 * kv_size) + q_size * hidden + 3 * hidden * config.intermediate_size
    kv_weights = hidden * 2 * kv_size  # all a prompt token not sampled needs of the last layer
    head_weights = hidden * config.vocab_size
    attn_per_key = 4 * heads * head_dim * layers  # q·k and p·v, every layer
    trie: dict[tuple[int, int], int] = {}
    prefill_tokens, prefill_keys = 0, 0
    sampled: dict[int, int] = {}  # the node each prompt ends at → its keys: the rows sampled
    for request in requests:  # each new trie edge is a token the tree computes once
        node = 0
        for depth, token in enumerate(request.token_ids):
            child = trie.get((node, token))
            if child is None:
                child = trie[(node, token)] = len(trie) + 1
                prefill_tokens += 1
                prefill_keys += depth + 1
            node = child
        sampled[node] = request.num_prompt_tokens
    decode_tokens, decode_keys, step_keys = 0, 0, 0
    for request in requests:
        for i in range(1, request.sampling.max_tokens):  # the first token comes from prefill
            decode_tokens += 1
            decode_keys += request.num_prompt_tokens + i
            step_keys += i  # its own tokens; the prompts' unique keys are added per step below
    steps = max(r.sampling.max_tokens for r in requests) - 1
    step_keys += prefill_tokens * steps  # shared-prefix attention reads each prompt key once a step
    return {
        "prefill_flops": 2 * (layer_weights * (layers - 1) + kv_weights) * prefill_tokens
        + 2 * (layer_weights - kv_weights + head_weights) * len(sampled)
        + attn_per_key // layers * ((layers - 1) * prefill_keys + sum(sampled.values())),
        "decode_flops": 2 * (layer_weights * layers + head_weights) * decode_tokens + attn_per_key * decode_keys,
        "attention_flops": attn_per_key // layers * ((layers - 1) * prefill_keys + sum(sampled.values()))
        + attn_per_key * decode_keys,
        "weight_bytes": 4 * (layer_weights * layers + head_weights),
        "decode_kv_bytes": 2 * 4 * kv_size * layers * step_keys,  # over all steps
        "max_tokens": sum(r.sampling.max_tokens for r in requests),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", default="a,c,long")
    parser.add_argument("--model", default="small")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch
    import vllm_bench

    from prefixbatch.executors.native.weights import read_model_config

    torch.set_num_threads(2)
    folder = vllm_bench.model_dir(args.model)
    config = read_model_config(folder)
    hidden, inter = config.hidden_size, config.intermediate_size
    q_size, kv_size = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    shapes = [(q_size + 2 * kv_size, hidden), (hidden, q_size), (2 * inter, hidden), (hidden, inter),
              (config.vocab_size, hidden)]
    peaks, memory = gemm_peaks(shapes), bandwidth()
    names = [j for j in args.jobs.split(",") if j]
    jobs = vllm_bench.make_jobs(folder, names)
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    print(f"model {args.model}; fp32 GEMM peak over its shapes (GFLOP/s): "
          + ", ".join(f"{k} {v:.0f}" for k, v in peaks.items())
          + "; memory (GB/s): " + ", ".join(f"{k} {v:.1f}" for k, v in memory.items()) + "\n")
    print("| job | native generate s | GFLOP | of which attention | achieved GFLOP/s | of GEMM peak "
          "| decode steps | bytes per decode step (weights + KV) | GB/s if decode-bound | of read bandwidth |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for job in names:
        results = []
        for _ in range(args.repeats):
            command = [sys.executable, str(Path(__file__).parent / "vllm_bench.py"), "--variant", "native",
                       "--jobs", job, "--model", args.model]
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=3600, check=True)
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        generate = statistics.median(r["generate_s"] for r in results)
        work = job_work(jobs[job], config)
        scale = results[0]["output_tokens"] / work["max_tokens"]
        flops = work["prefill_flops"] + work["decode_flops"] * scale
        # Decode steps: the longest request's tokens (every running sequence decodes each step).
        steps = max(r.sampling.max_tokens for r in jobs[job]) - 1
        step_bytes = work["weight_bytes"] + work["decode_kv_bytes"] * scale / max(steps, 1)
        achieved = flops / generate / 1e9
        gbps = step_bytes * steps / generate / 1e9
        print(f"| {job} | {generate:.2f} | {flops / 1e9:.0f} | {work['attention_flops'] / 1e9 / (flops / 1e9):.0%} "
              f"| {achieved:.0f} | {achieved / peaks['peak']:.0%} | {steps} | {step_bytes / 1e6:.0f} MB "
              f"| {gbps:.1f} | {gbps / memory['read (sum)']:.0%} |", flush=True)


if __name__ == "__main__":
    main()
