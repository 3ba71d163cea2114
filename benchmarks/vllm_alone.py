"""vLLM as its users run it: what `vllm_bench.py` times for the `vllm` and `vllm-eager` variants.

A script of its own that imports vLLM and nothing of prefixbatch (importing prefixbatch would
set its OpenMP spin count in this process's environment): `LLM(model, dtype, seed=0)` with
every other setting vLLM's default — compiled (unless `--eager`), its block size, its KV cache
size, its engine process, its OpenMP thread binding, prefix caching on — then one
`LLM.generate` of every request, in input order, token ids in. Compiling and engine start
happen in `LLM(...)`, before the timed part. Prints one JSON line: the outputs, the timings,
prompt tokens computed (prompt − cached) and what vLLM says it set up (block size, cache
blocks, CPU kernel ISA, thread binding).

    python benchmarks/vllm_alone.py REQUESTS.json MODEL_DIR --dtype float32 [--eager]
"""

from __future__ import annotations

import json
import sys
import time

START = time.perf_counter()


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("requests", help="JSON: a list of {prompt_token_ids, max_tokens, temperature, top_p, top_k, seed}")
    parser.add_argument("model")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--eager", action="store_true")
    args = parser.parse_args()
    with open(args.requests) as file:
        requests = json.load(file)

    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=args.model, dtype=args.dtype, seed=0, enforce_eager=args.eager)
    prompts = [TokensPrompt(prompt_token_ids=r["prompt_token_ids"]) for r in requests]
    params = [
        SamplingParams(max_tokens=r["max_tokens"], temperature=r["temperature"], top_p=r["top_p"],
                       top_k=r["top_k"] or 0, seed=r["seed"])
        for r in requests
    ]
    started = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    end = time.perf_counter()
    cache = llm.llm_engine.vllm_config.cache_config
    tokens = [_without_eos(o.outputs[0]) for o in outputs]
    print(json.dumps({
        "wall_s": end - START,
        "generate_s": end - started,
        "outputs": dict(enumerate(tokens)),
        "computed": sum(len(o.prompt_token_ids) - (o.num_cached_tokens or 0) for o in outputs),
        "output_tokens": sum(map(len, tokens)),
        "setup": {
            "block_size": cache.block_size,
            "kv_cache_tokens": (cache.num_gpu_blocks or 0) * cache.block_size,
            "isa": torch.backends.cpu.get_cpu_capability(),
            "compiled": not args.eager,
        },
    }))
    sys.stdout.flush()


def _without_eos(output) -> list[int]:
    """The generated tokens as prefixbatch reports them: a row ended by end-of-sequence does not
    count the end-of-sequence token (vLLM's `token_ids` hold it)."""
    ids = list(output.token_ids)
    ended_by_eos = output.finish_reason == "stop" and output.stop_reason is None
    return ids[:-1] if ended_by_eos and ids else ids


if __name__ == "__main__":
    main()
