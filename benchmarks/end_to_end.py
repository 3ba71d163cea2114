"""End to end, start-up included: `prefixbatch run` against the vLLM script a user would write.

Job (a) of the peer benchmark (64 prompts under one 1,024-token system prompt, 32 new
tokens, greedy), as text: each prompt's token ids decoded by the model's tokenizer, written
to a Parquet file. Timed from launching the process to its exit, each in a fresh process,
alternating, median of `--repeats`:

    prefixbatch   `prefixbatch run job.yaml` (the CLI: reads the Parquet, tokenizes, plans,
                  loads the native engine, writes the output table)
    vllm-script   `LLM(model, dtype=DTYPE, enable_prefix_caching=True)` and
                  `llm.generate(prompts, SamplingParams(max_tokens=32, temperature=0))`, vLLM's
                  defaults otherwise: compiled (at engine start; vLLM caches the compiled
                  graphs on disk, so runs after the first compile less), its engine in a
                  separate process, as `LLM` starts it
    vllm-script-eager  the same with `enforce_eager=True` (no compile)

    .venv/bin/python benchmarks/end_to_end.py --repeats 3 [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
# Both commands get the environment this script started with (importing prefixbatch here
# sets GOMP_SPINCOUNT; the vLLM script must run as a user's would).
START_ENV = dict(os.environ)

VLLM_SCRIPT = """
import sys

import pyarrow.parquet as pq
from vllm import LLM, SamplingParams

if __name__ == "__main__":  # vLLM starts its engine process by spawning: this file is re-imported
    prompts = pq.read_table(sys.argv[2]).column("prompt").to_pylist()
    llm = LLM(model=sys.argv[1], dtype=sys.argv[3], enable_prefix_caching=True, seed=0, enforce_eager=sys.argv[4] == "eager")
    outputs = llm.generate(prompts, SamplingParams(max_tokens=32, temperature=0.0))
    assert len(outputs) == len(prompts)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default="small")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = parser.parse_args()

    import pyarrow as pa
    import pyarrow.parquet as pq
    import vllm_bench
    from transformers import AutoTokenizer

    folder = vllm_bench.model_dir(args.model).resolve()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    requests = vllm_bench.make_jobs(folder, ["a"])["a"]
    texts = [tokenizer.decode(list(r.token_ids)) for r in requests]
    work = Path(tempfile.mkdtemp(prefix="e2e-"))
    prompts = work / "prompts.parquet"
    pq.write_table(pa.table({"id": list(range(len(texts))), "prompt": texts}), prompts)
    (work / "job.yaml").write_text(
        f"name: e2e-a\ninput:\n  path: {prompts}\n  id_column: id\n  prompt_column: prompt\n"
        f"output:\n  path: {work / 'out'}\nmodel:\n  path: {folder}\n  dtype: {args.dtype}\n"
        "sampling:\n  max_tokens: 32\n  temperature: 0.0\nexecutor:\n  kind: native\n  device: cpu\n"
    )
    (work / "vllm_script.py").write_text(VLLM_SCRIPT)
    bin_dir = Path(sys.executable).parent
    commands = {
        "prefixbatch": [str(bin_dir / "prefixbatch"), "run", str(work / "job.yaml"), "--overwrite"],
        "vllm-script": [sys.executable, str(work / "vllm_script.py"), str(folder), str(prompts), args.dtype, "compiled"],
        "vllm-script-eager": [sys.executable, str(work / "vllm_script.py"), str(folder), str(prompts), args.dtype, "eager"],
    }
    times: dict[str, list[float]] = {name: [] for name in commands}
    for repeat in range(args.repeats):
        for name, command in commands.items():
            start = time.perf_counter()
            done = subprocess.run(command, env=START_ENV, capture_output=True, text=True, timeout=1800)
            if done.returncode != 0:
                sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
            times[name].append(time.perf_counter() - start)
            print(f"  {name} run {repeat + 1}: {times[name][-1]:.1f} s", file=sys.stderr, flush=True)
    medians = {name: statistics.median(t) for name, t in times.items()}
    print(f"\nmodel {args.model} ({args.dtype}), job (a) as text, {args.repeats} repeats (median)\n")
    print("| command | median s (process start to exit) | runs |\n|---|---|---|")
    for name, runs in times.items():
        print(f"| {name} | {medians[name]:.1f} | {', '.join(f'{t:.1f}' for t in runs)} |")
    for name in ("vllm-script", "vllm-script-eager"):
        print(f"prefixbatch is {medians[name] / medians['prefixbatch']:.1f}x faster end to end than {name}")


if __name__ == "__main__":
    main()
