"""vLLM as its users run it: what `vllm_bench.py` times for the `vllm` and `vllm-eager` variants.

A script of its own that imports vLLM and nothing of prefixbatch (importing prefixbatch would
set its OpenMP spin count in this process's environment): `LLM(model, dtype, seed=0)` with
every other setting vLLM's default — compiled (unless `--eager`), its block size, its KV cache
size, its engine process, its OpenMP thread binding, prefix caching on — then one
`LLM.generate` of every request of a job, in input order, token ids in. Compiling and engine
start happen in `LLM(...)`, before the timed part. Prints one JSON line a generate: the
outputs, the timings, prompt tokens computed (prompt − cached) and what vLLM says it set up
(block size, cache blocks, CPU kernel ISA, thread binding).

Several jobs (request files) and `--repeats` run on the one engine, its prefix cache emptied
before each generate (`reset_prefix_cache`): each generate starts as cold as in a fresh
process, only the engine's start-up (its compile: minutes on a 2-core CPU) is paid once; a
later generate can only gain from the warm-up of earlier ones. Its "wall s" is the start-up
plus that generate.

    python benchmarks/vllm_alone.py REQUESTS.json [MORE.json ...] MODEL_DIR --dtype float32 [--eager] [--repeats 3]
"""

from __future__ import annotations

import json
import sys
import time

START = time.perf_counter()


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("requests", nargs="+", help="JSON files: each a list of {prompt_token_ids, max_tokens, "
                        "temperature, top_p, top_k, seed}")
    parser.add_argument("model")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--eager", action="store_true")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    from vllm import LLM

    llm = LLM(model=args.model, dtype=args.dtype, seed=0, enforce_eager=args.eager)
    started = time.perf_counter() - START
    for repeat in range(args.repeats):
        for path in args.requests:
            with open(path) as file:
                requests = json.load(file)
            assert llm.reset_prefix_cache(), "vLLM did not empty its prefix cache"
            result = generate(llm, requests, eager=args.eager)
            result["wall_s"] = started + result["generate_s"]
            print(json.dumps({"requests": path, "repeat": repeat, **result}))
            sys.stdout.flush()


def generate(llm, requests: list[dict], *, eager: bool) -> dict:
    """One `LLM.generate` of a job's requests → its measurements."""
    import torch
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

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
    return {
        "generate_s": end - started,
        "outputs": dict(enumerate(tokens)),
        "computed": sum(len(o.prompt_token_ids) - (o.num_cached_tokens or 0) for o in outputs),
        "output_tokens": sum(map(len, tokens)),
        "setup": {
            "block_size": cache.block_size,
            "kv_cache_tokens": (cache.num_gpu_blocks or 0) * cache.block_size,
            "isa": torch.backends.cpu.get_cpu_capability(),
            "compiled": not eager,
        },
    }


def _without_eos(output) -> list[int]:
    """The generated tokens as prefixbatch reports them: a row ended by end-of-sequence does not
    count the end-of-sequence token (vLLM's `token_ids` hold it)."""
    ids = list(output.token_ids)
    ended_by_eos = output.finish_reason == "stop" and output.stop_reason is None
    return ids[:-1] if ended_by_eos and ids else ids


if __name__ == "__main__":
    main()
