"""The CUDA path, checked in one call on a lent GPU: right first, then how fast.

    python benchmarks/gpu_check.py --json $OUT/gpu_check.json     # on the GPU machine
    python benchmarks/gpu_check.py --dry-run                       # anywhere: CPU, tiny shapes

Steps, each with its budget on one H100 (their sum, 7 minutes, fits the 8-minute call by
construction: a step past its budget stops where it is, records `"overran": true`, and the
next step starts):

    1 probe         10 s  versions, device, FA2's schema, Triton's
    2 contract      60 s  FA2 varlen and the compiled Triton kernel against the reference on
                          40 random tree cases, bf16 and fp16 (`spans` contract: parts and merge)
    3 exactness    120 s  native bf16 (the table's backend) against transformers bf16 and fp32:
                          greedy agreement on 16 prompts × 32 tokens; each first divergence's
                          margin in the fp32 logits (a near-tie: under `TIE_MARGIN`); the
                          first forward compiles the pointwise passes (~30 s)
    4 speed        200 s  scenarios a (one 2,048-token prefix + 256 suffixes of 128; 64 new) and
                          c (256 unshared prompts of 128–2,048 tokens; 64–256 new), median of 3:
                          old path (PyTorch's bmm span by span: `torch`), new path (the table's),
                          new without prefix sharing, and a no-attention ceiling (attention
                          skipped: the most any attention kernel could give); target new ≥ 70%
                          of the ceiling on a
    5 roofline       0 s  each run's fraction of speed of light: FLOPs at 790 TFLOP/s (H100
                          bf16 dense), bytes at 3.0 TB/s

The model is built on the machine: a random-weight checkpoint with Qwen2.5-0.5B's shapes
(`make-test-model --size qwen2.5-0.5b`, ~1 GB), loaded by the same code that loads a real one.
Needs torch, transformers, numpy, safetensors (and triton for its backend): what the lent
machines have. prefixbatch's own modules used here import nothing else (a test checks it).

The JSON has one entry per `scenario/variant` with the peer benchmark's fields (`walls`,
`generates`, `computed`, `unique`, `output_tokens`, `setup`: benchmarks/vllm_bench.py), so a
run beside vLLM on a GPU machine that has it compares directly, and a `checks` section.

`--dry-run`: the CPU, fp32, the reference backend (and FA2's packing emulated, Triton
interpreted), the tiny test model and scaled-down scenarios: every step's code end to end in
well under a minute (CI runs it: tests/benchmarks/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prefixbatch.executors.native.attention import backends, reference, tree  # noqa: E402
from prefixbatch.executors.native.attention.plan import QueryRun, SegmentKV, plan_attention  # noqa: E402
from prefixbatch.executors.native.attention.spans import SpanBatch, merge_entries  # noqa: E402
from prefixbatch.executors.native.kv import KVStore  # noqa: E402

TIE_MARGIN = 0.1  # fp32 logit gap under which two tokens count as tied for greedy decoding
PEAK_FLOPS = 790e12  # H100 SXM bf16 dense, as the issue states it
PEAK_BYTES = 3.0e12  # H100 HBM3, bytes/s
BUDGETS_S = {"probe": 10, "contract": 60, "exactness": 120, "speed": 200, "roofline": 0}


@dataclass
class Settings:
    device: torch.device
    dtype: torch.dtype
    size: str  # make-test-model size
    contract_cases: int
    contract_backends: tuple[str, ...]
    contract_dtypes: tuple[torch.dtype, ...]
    prompts: int
    new_tokens: int
    scale: float  # of the speed scenarios
    repeats: int

    @classmethod
    def of(cls, dry_run: bool) -> Settings:
        if dry_run:
            return cls(torch.device("cpu"), torch.float32, "tiny", 6, ("flash-emulated", "triton"),
                       (torch.float32, torch.bfloat16), 2, 6, 1 / 32, 1)  # fmt: skip
        return cls(torch.device("cuda"), torch.bfloat16, "qwen2.5-0.5b", 40, ("flash", "triton"),
                   (torch.bfloat16, torch.float16), 16, 32, 1.0, 3)  # fmt: skip


class Deadline:
    """A step's budget: `over()` once its time is spent (the step stops where it is)."""

    def __init__(self, seconds: float, scale: float = 1.0) -> None:
        self.end = time.monotonic() + seconds * scale

    def over(self) -> bool:
        return time.monotonic() > self.end


# 1 probe ------------------------------------------------------------------------------------


def probe(settings: Settings) -> dict:
    found = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("triton", "transformers", "numpy", "safetensors"):
        try:
            found[name] = importlib.import_module(name).__version__
        except ImportError:
            found[name] = None
    if settings.device.type == "cuda":
        props = torch.cuda.get_device_properties(settings.device)
        found.update(device=props.name, capability=f"{props.major}.{props.minor}",
                     memory_gib=round(props.total_memory / 2**30, 1))  # fmt: skip
    flash = getattr(torch.ops.aten, "_flash_attention_forward", None)
    found["flash_schema"] = None if flash is None else str(flash.default._schema)
    found["table"] = {
        str(dtype): backends.select(settings.device, dtype, 64) for dtype in (torch.float32, torch.bfloat16, torch.float16)
    }
    return found


# 2 contract ---------------------------------------------------------------------------------


def random_case(rng: random.Random, device: torch.device, dtype: torch.dtype):
    """A random segment tree and step on it (as tests/executors/native/test_tree_attention.py
    makes them, without hypothesis): (store, plan, q, layer keys/values written)."""
    heads, kv_heads = rng.choice([(8, 8), (8, 2), (16, 2), (14, 2), (32, 8), (8, 1)])
    head_dim = rng.choice([64, 128])
    num_segments = rng.randint(1, 8)
    parents = [None] + [rng.choice([None, *range(i)]) for i in range(1, num_segments)]
    lengths = [rng.randint(1, 300) for _ in range(num_segments)]
    with_runs = sorted(rng.sample(range(num_segments), rng.randint(1, num_segments)))
    runs, row = [], 0
    for s in with_runs:
        below = any(_is_ancestor(s, other, parents) for other in with_runs)
        offset = 0 if below else rng.randint(0, lengths[s] - 1)
        count = lengths[s] - offset if below or rng.random() < 0.5 else 1
        runs.append((s, offset, count))
    rng.shuffle(runs)
    store = KVStore(num_layers=1, num_kv_heads=kv_heads, head_dim=head_dim, capacity_tokens=sum(lengths) + 64,
                    dtype=dtype, device=device)  # fmt: skip
    store.allocate(-1, rng.randint(0, 40))
    stored = list(lengths)
    for s, offset, count in runs:
        stored[s] = offset + count
    segments = [SegmentKV(i, parents[i], store.allocate(i, n).start, stored[i]) for i, n in enumerate(lengths)]
    store.keys.normal_()
    store.values.normal_()
    query_runs = []
    for s, offset, count in runs:
        query_runs.append(QueryRun(s, row, offset, count))
        row += count
    plan = plan_attention(segments, query_runs)
    q = torch.randn(row, heads, head_dim, device=device).to(dtype)
    return store, plan, q


def _is_ancestor(a: int, b: int, parents) -> bool:
    while parents[b] is not None:
        b = parents[b]
        if b == a:
            return True
    return False


def contract(settings: Settings, deadline: Deadline) -> dict:
    """Each backend's merged output against the reference's, per dtype: the largest error."""
    rng = random.Random(0)
    worst: dict[str, float] = {}
    done = 0
    for _ in range(settings.contract_cases):
        if deadline.over():
            break
        for dtype in settings.contract_dtypes:
            store, plan, q = random_case(rng, settings.device, dtype)
            batch = SpanBatch.of(plan, settings.device)
            keys, values = store.keys[0], store.values[0]
            scale = q.shape[-1] ** -0.5
            truth, _ = merge_entries(*reference.attend_spans(q, keys, values, batch, scale=scale), batch)
            for name in settings.contract_backends:
                try:
                    parts = backends.span_function(name)(q, keys, values, batch, scale=scale)
                    error = (merge_entries(*parts, batch)[0] - truth).abs().max().item()
                except Exception as exc:  # a backend that cannot run here says why, once
                    worst.setdefault(f"{name}/{dtype}/error", repr(exc)[:300])
                    continue
                key = f"{name}/{str(dtype).removeprefix('torch.')}"
                worst[key] = max(worst.get(key, 0.0), error)
        done += 1
    memory = long_chunk_memory(settings)
    tolerance = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 4e-3}
    passed = all(
        not isinstance(v, float) or v <= tolerance[k.split("/")[1]] for k, v in worst.items()
    ) and not any(k.endswith("/error") for k in worst)
    passed = passed and all(m.get("within_bound", True) for m in memory.values() if isinstance(m, dict))
    return {"cases": done, "max_abs_error": worst, "tolerance": tolerance, "long_chunk_memory": memory, "passed": passed}


def long_chunk_memory(settings: Settings) -> dict:
    """Peak device memory of one layer's attention over a 16,384-row prefill chunk after a
    16,384-key prefix (Qwen2.5-0.5B's 14 heads, 2 KV heads, 64 dims), per backend, against
    what the step must hold whatever the backend (q, the parts and the output: O(rows)) plus
    64 MiB; one score matrix would be 15 GiB. On the CPU the tests check the reference's
    (tests/executors/native/test_attention_backends.py)."""
    if settings.device.type != "cuda":
        return {"skipped": "CUDA only"}
    heads, kv_heads, head_dim, rows, prefix = 14, 2, 64, 16_384, 16_384
    segments = [SegmentKV(0, None, 0, prefix), SegmentKV(1, 0, prefix, rows)]
    plan = plan_attention(segments, [QueryRun(1, 0, 0, rows)])
    keys = torch.randn(prefix + rows, kv_heads, head_dim, device=settings.device, dtype=torch.bfloat16)
    values = torch.randn_like(keys)
    q = torch.randn(rows, heads, head_dim, device=settings.device, dtype=torch.bfloat16)
    batch = SpanBatch.of(plan, settings.device)
    must_hold = (3 * batch.num_entries + rows) * heads * (head_dim + 1) * 4 + (64 << 20)
    found = {}
    for name in settings.contract_backends:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        try:
            out = merge_entries(*backends.span_function(name)(q, keys, values, batch, scale=0.125), batch)
            torch.cuda.synchronize()
        except Exception as exc:
            found[name] = {"failed": repr(exc)[:300]}
            continue
        peak = torch.cuda.max_memory_allocated() - before
        found[name] = {"peak_bytes": peak, "bound_bytes": must_hold, "within_bound": peak <= must_hold}
        del out
    return found


# 3 exactness --------------------------------------------------------------------------------


def build_model(settings: Settings, folder: Path) -> Path:
    from prefixbatch.executors.random_model import make_test_model

    if not (folder / "config.json").exists():
        make_test_model(folder, size=settings.size)
    return folder


def native_engine(folder: Path, settings: Settings, *, dtype: torch.dtype | None = None):
    from transformers import AutoTokenizer

    from prefixbatch.executors.grammar import LazyConstraints
    from prefixbatch.executors.native.engine import Engine
    from prefixbatch.executors.native.weights import load_model
    from prefixbatch.executors.sampling import TokenTexts
    from prefixbatch.model_folder import eos_token_ids

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = load_model(folder, dtype=dtype or settings.dtype, device=settings.device)
    if settings.device.type == "cpu" and model.dtype == torch.float32:
        model.pack()
    elif settings.device.type == "cuda":  # as the executor runs it there: compiled norms and rope
        from prefixbatch.executors.native import pointwise

        model.use_pointwise(pointwise.compiled())
    return Engine(
        model, eos_token_ids=eos_token_ids(str(folder), tokenizer), decode=lambda ids: tokenizer.decode(ids),
        token_texts=TokenTexts(tokenizer), constraints=LazyConstraints(tokenizer, model.config.vocab_size),
        max_step_tokens=16_384 if settings.device.type == "cuda" else 2_048,
    )  # fmt: skip


def run_engine(engine, requests, *, share: bool = True, budget: int = 1 << 20):
    from prefixbatch.prefix_tree import PlanSettings, plan_requests

    work = plan_requests(requests, PlanSettings(kv_budget_tokens=budget, prefix_sharing=share))
    completions = {c.row_index: c for c in engine.run(work.requests, work.plan, work.tokens)}
    return completions, work


def exactness(settings: Settings, folder: Path, deadline: Deadline) -> dict:
    """Greedy tokens of native (settings' dtype) against transformers in that dtype and fp32."""
    from transformers import AutoModelForCausalLM

    from prefixbatch.types import Request, SamplingParams

    rng = np.random.default_rng(1)
    vocab = 4000  # regular ids of every test tokenizer
    prompts = [rng.integers(10, vocab, size=int(rng.integers(16, 200))).tolist() for _ in range(settings.prompts)]
    params = SamplingParams(max_tokens=settings.new_tokens, min_tokens=settings.new_tokens)
    engine = native_engine(folder, settings)
    native, _ = run_engine(engine, [Request(i, tuple(p), params) for i, p in enumerate(prompts)])
    del engine
    result: dict = {"prompts": len(prompts), "new_tokens": settings.new_tokens}
    for name, dtype in (("hf-" + str(settings.dtype).removeprefix("torch."), settings.dtype), ("hf-float32", torch.float32)):
        if deadline.over():
            result[name] = "skipped: the step's budget was spent"
            continue
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(settings.device).eval()
        agree, margins = 0, []
        for i, prompt in enumerate(prompts):
            theirs = _hf_greedy(hf, prompt, settings.new_tokens, settings.device)
            ours = list(native[i].token_ids)
            if ours == theirs:
                agree += 1
                continue
            t = next(k for k, (a, b) in enumerate(zip(ours, theirs)) if a != b)
            margins.append(_margin(hf, prompt + ours[:t], ours[t], theirs[t], settings.device))
        result[name] = {"identical": agree, "divergences": len(margins), "margins": margins,
                        "all_at_near_ties": all(abs(m) < TIE_MARGIN for m in margins)}  # fmt: skip
        del hf
    return result


@torch.inference_mode()
def _hf_greedy(hf, prompt, num_tokens: int, device) -> list[int]:
    ids = torch.tensor([prompt], device=device)
    out = hf.generate(ids, max_new_tokens=num_tokens, min_new_tokens=num_tokens, do_sample=False,
                      attention_mask=torch.ones_like(ids), pad_token_id=0)  # fmt: skip
    return out[0, len(prompt):].tolist()


@torch.inference_mode()
def _margin(hf, context, ours: int, theirs: int, device) -> float:
    """fp32 logit of their token minus ours after the shared context, as this hf model sees it."""
    logits = hf(torch.tensor([context], device=device)).logits[0, -1].float()
    return float(logits[theirs] - logits[ours])


# 4 speed ------------------------------------------------------------------------------------


def scenarios(settings: Settings) -> dict[str, list]:
    from prefixbatch.types import Request, SamplingParams

    rng = np.random.default_rng(2)

    def n(x: float) -> int:
        return max(1, round(x * settings.scale))

    def tokens(count: int) -> list[int]:
        return rng.integers(10, 4000, size=count).tolist()

    shared = tokens(n(2048))
    def fixed(count: int) -> SamplingParams:  # no early end: every run decodes the same tokens
        return SamplingParams(max_tokens=count, min_tokens=count)

    a = [Request(i, tuple(shared + tokens(n(128))), fixed(n(64))) for i in range(n(256))]
    c = [Request(i, tuple(tokens(int(rng.integers(n(128), n(2048) + 1)))), fixed(int(rng.integers(n(64), n(256) + 1))))
         for i in range(n(256))]  # fmt: skip
    return {"a": a, "c": c}


class _NoAttention(tree.TreeAttention):
    """The ceiling: k, v stored, attention not computed (zeros). Only for timing."""

    def __call__(self, layer, q, k, v):
        self.store.write(layer, self.plan.write_slots, k, v)
        return torch.zeros_like(q)

    def attend_unroped(self, *args, **kwargs):
        return None


@contextlib.contextmanager
def variant(name: str, settings: Settings):
    """The engine's attention for one variant: old path, new path, no attention."""
    saved_env, saved_class = os.environ.get(backends.ENV), tree.TreeAttention
    if name == "old-path":
        os.environ[backends.ENV] = "torch"
    elif name == "ceiling":
        tree.TreeAttention = _NoAttention
    elif settings.device.type == "cpu":
        os.environ[backends.ENV] = "reference"  # the dry run: the new path is the reference there
    try:
        yield
    finally:
        tree.TreeAttention = saved_class
        if saved_env is None:
            os.environ.pop(backends.ENV, None)
        else:
            os.environ[backends.ENV] = saved_env


VARIANTS = ("new-path", "old-path", "new-path-noshare", "ceiling")


def speed(settings: Settings, folder: Path, deadline: Deadline) -> dict:
    engine = native_engine(folder, settings)
    config = engine.model.config
    report: dict = {}
    run_engine(engine, scenarios(settings)["c"][:2])  # warm-up (kernels built, caches made)
    for name, requests in scenarios(settings).items():
        for variant_name in VARIANTS:
            times, stats = [], None
            for _ in range(settings.repeats):
                if deadline.over():
                    break
                with variant(variant_name, settings):
                    before = engine.stats.num_prefill_tokens
                    _sync(settings)
                    started = time.perf_counter()
                    done, work = run_engine(engine, requests, share=variant_name != "new-path-noshare")
                    _sync(settings)
                    times.append(time.perf_counter() - started)
                    stats = (engine.stats.num_prefill_tokens - before, sum(c.num_output_tokens for c in done.values()),
                             work.plan.stats.num_unique_tokens)  # fmt: skip
            if not times:
                report[f"{name}/{variant_name}"] = {"skipped": "the step's budget was spent"}
                continue
            computed, output_tokens, unique = stats
            report[f"{name}/{variant_name}"] = {
                "walls": times, "generates": times, "computed": computed, "unique": unique,
                "output_tokens": output_tokens, "setup": {"device": str(settings.device), "dtype": str(settings.dtype)},
                "roofline": roofline(config, requests, computed, output_tokens, statistics.median(times), settings),
            }  # fmt: skip
    for name in scenarios(settings):
        new, ceiling = report.get(f"{name}/new-path", {}), report.get(f"{name}/ceiling", {})
        if "walls" in new and "walls" in ceiling:
            report[f"{name}/new-vs-ceiling"] = statistics.median(ceiling["walls"]) / statistics.median(new["walls"])
    return report


def _sync(settings: Settings) -> None:
    if settings.device.type == "cuda":
        torch.cuda.synchronize()


# 5 roofline ---------------------------------------------------------------------------------


def roofline(config, requests, computed: int, output_tokens: int, seconds: float, settings: Settings) -> dict:
    """The run's fraction of the speed of light: dense FLOPs (2 per weight per token) plus
    attention's (4 · H · D per query-key pair), against 790 TFLOP/s; and bytes (the weights
    once per step, the KV read by every decode token) against 3.0 TB/s. Estimates: steps are
    taken as the longest request's output tokens."""
    per_layer = config.hidden_size * (config.num_heads + 2 * config.num_kv_heads) * config.head_dim
    per_layer += config.num_heads * config.head_dim * config.hidden_size + 3 * config.hidden_size * config.intermediate_size
    weights = config.num_layers * per_layer + config.vocab_size * config.hidden_size
    tokens = computed + output_tokens
    contexts = [r.num_prompt_tokens + r.sampling.max_tokens / 2 for r in requests]
    pairs = computed * np.mean(contexts) / 2 + output_tokens * np.mean(contexts)
    flops = 2 * weights * tokens + 4 * config.num_heads * config.head_dim * config.num_layers * pairs
    element = torch.finfo(settings.dtype).bits // 8
    steps = max(r.sampling.max_tokens for r in requests)
    kv_bytes = output_tokens * np.mean(contexts) * 2 * config.num_kv_heads * config.head_dim * config.num_layers * element
    moved = steps * weights * element + kv_bytes
    light = max(flops / PEAK_FLOPS, moved / PEAK_BYTES)
    return {"flops": flops, "bytes": moved, "speed_of_light_s": light, "fraction": light / seconds}


# main ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, the reference backend")
    parser.add_argument("--json", type=Path, default=Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else None)
    parser.add_argument("--model-dir", type=Path, default=None, help="where the random checkpoint is built")
    args = parser.parse_args(argv)
    settings = Settings.of(args.dry_run)
    if settings.device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device is visible: run with --dry-run on a machine without one")
    scale = 1.0 if not args.dry_run else 0.5
    report: dict = {"dry_run": args.dry_run, "budgets_s": BUDGETS_S, "checks": {}, "timings_s": {}}
    model_dir = args.model_dir or Path(tempfile.mkdtemp(prefix="prefixbatch-gpu-check-"))

    def step(name: str, run):
        started = time.monotonic()
        deadline = Deadline(BUDGETS_S[name], scale)
        try:
            result = run(deadline)
        except Exception as exc:  # one failing step must not hide the others' results
            result = {"failed": repr(exc)[:2000]}
        elapsed = time.monotonic() - started
        report["timings_s"][name] = round(elapsed, 1)
        if isinstance(result, dict) and elapsed > BUDGETS_S[name] * scale + 1:
            result["overran"] = True
        print(f"{name}: {elapsed:.1f} s", json.dumps(result, default=str)[:3000], flush=True)
        return result

    report["checks"]["probe"] = step("probe", lambda d: probe(settings))
    report["checks"]["contract"] = step("contract", lambda d: contract(settings, d))
    folder = build_model(settings, model_dir / settings.size)
    report["checks"]["exactness"] = step("exactness", lambda d: exactness(settings, folder, d))
    speeds = step("speed", lambda d: speed(settings, folder, d))
    report["checks"]["speed"] = {k: v for k, v in speeds.items() if not isinstance(v, dict) or "walls" not in v}
    report.update({k: v for k, v in speeds.items() if isinstance(v, dict) and "walls" in v})
    report["checks"]["roofline"] = step(
        "roofline", lambda d: {k: v["roofline"]["fraction"] for k, v in speeds.items() if isinstance(v, dict) and "roofline" in v}
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=str))
        print(f"written: {args.json}")
    return report


if __name__ == "__main__":
    main()
