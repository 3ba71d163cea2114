"""Planner at scale: a million synthetic prompts with realistic sharing, timed stage by stage.

Prompts are token ids (vocabulary 32,000) built like chat requests:

    header (6, shared by all) + system prompt (100-200, 1 of --systems)
    + few-shot block (100-200, 1 of --shots) + user marker (5) + question (10-58, unique)
    + assistant marker (5)

about 350 tokens each, max_tokens uniform in [16, 512]. Generation is timed separately;
planning (validate, sort, tree, statistics, groups, shards, plan) is what the targets are
about: <= 10 s and <= 3 GB peak RSS for 1,000,000 prompts on 2 cores.

    .venv/bin/python benchmarks/plan_scale.py                # 1,000,000 prompts
    .venv/bin/python benchmarks/plan_scale.py --prompts 10000

It also times tokenization, the stage before planning, on text of the same size: a sample of
the prompts is decoded with the `small` test model's tokenizer (vocabulary 8,192) and
encoded again the way the pipeline does (`tokenizer(texts, add_special_tokens=False)`, a
fast tokenizer on all cores); its tokens/s is set against the planner's.
"""

from __future__ import annotations

import argparse
import resource
import time
from contextlib import contextmanager

import numpy as np

from prefixbatch.prefix_tree.groups import schedule_groups
from prefixbatch.prefix_tree.inputs import check_prompts
from prefixbatch.prefix_tree.lexsort import sort_prompts
from prefixbatch.prefix_tree.plan import assemble_plan
from prefixbatch.prefix_tree.shards import cut_shards
from prefixbatch.prefix_tree.stats import tree_stats
from prefixbatch.prefix_tree.tree import tree_from_lex_order

VOCAB = 32_000
HEADER, USER, ASSISTANT = 6, 5, 5


def generate(num_prompts: int, *, num_systems: int = 100, num_shots: int = 10, seed: int = 0):
    """(tokens int32, offsets int64, max_tokens int32), written chunk by chunk to bound memory."""
    rng = np.random.default_rng(seed)
    system_lens = rng.integers(100, 201, num_systems)
    shot_lens = rng.integers(100, 201, num_shots)
    pieces = [
        rng.integers(0, VOCAB, n) for n in [HEADER, USER, ASSISTANT, *system_lens, *shot_lens]
    ]
    pool = np.concatenate(pieces).astype(np.int32)
    piece_start = np.cumsum([0] + [len(p) for p in pieces])[:-1]
    system_start, shot_start = piece_start[3 : 3 + num_systems], piece_start[3 + num_systems :]

    system = rng.integers(0, num_systems, num_prompts)
    shot = rng.integers(0, num_shots, num_prompts)
    question_lens = rng.integers(10, 59, num_prompts)
    lengths = HEADER + system_lens[system] + shot_lens[shot] + USER + question_lens + ASSISTANT
    offsets = np.zeros(num_prompts + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = np.empty(int(offsets[-1]), np.int32)
    for lo in range(0, num_prompts, 50_000):
        hi = min(lo + 50_000, num_prompts)
        q = question_lens[lo:hi]
        questions = rng.integers(0, VOCAB, int(q.sum()), dtype=np.int32)
        rows = hi - lo
        starts = np.stack(
            [
                np.full(rows, piece_start[0]),
                system_start[system[lo:hi]],
                shot_start[shot[lo:hi]],
                np.full(rows, piece_start[1]),
                len(pool) + np.cumsum(q) - q,
                np.full(rows, piece_start[2]),
            ],
            axis=1,
        )
        lens = np.stack(
            [
                np.full(rows, HEADER),
                system_lens[system[lo:hi]],
                shot_lens[shot[lo:hi]],
                np.full(rows, USER),
                q,
                np.full(rows, ASSISTANT),
            ],
            axis=1,
        )
        tokens[offsets[lo] : offsets[hi]] = _concat_pieces(
            np.concatenate([pool, questions]), starts, lens
        )
    max_tokens = rng.integers(16, 513, num_prompts).astype(np.int32)
    return tokens, offsets, max_tokens


def _concat_pieces(pool: np.ndarray, starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Each row's pieces pool[start:start+len], concatenated row by row."""
    flat_lens = lens.ravel()
    piece_offset = np.cumsum(flat_lens) - flat_lens
    src = np.repeat(starts.ravel() - piece_offset, flat_lens) + np.arange(int(flat_lens.sum()))
    return pool[src]


@contextmanager
def timed(timings: dict, name: str):
    start = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompts", type=int, default=1_000_000)
    parser.add_argument("--systems", type=int, default=100)
    parser.add_argument("--shots", type=int, default=10)
    parser.add_argument(
        "--kv-budget-tokens",
        type=int,
        default=300_000,
        help="~40 GB of Llama-3-8B KV (128 KiB per token)",
    )
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--tokenize-sample", type=int, default=20_000, help="prompts tokenized for the comparison (0: skip)"
    )
    args = parser.parse_args()

    start = time.perf_counter()
    tokens, offsets, max_tokens = generate(
        args.prompts, num_systems=args.systems, num_shots=args.shots, seed=args.seed
    )
    generation_s = time.perf_counter() - start
    rss_after_data = _peak_rss_gb()

    t: dict[str, float] = {}
    with timed(t, "validate"):
        prompts = check_prompts(tokens, offsets, max_tokens)
    with timed(t, "sort + lcp"):
        lex = sort_prompts(prompts.tokens, prompts.offsets)
    with timed(t, "tree"):
        tree = tree_from_lex_order(prompts.tokens, prompts.offsets, lex)
    with timed(t, "statistics"):
        stats = tree_stats(tree)
    with timed(t, "groups + order"):
        schedule = schedule_groups(
            tree, prompts.max_tokens, kv_budget_tokens=args.kv_budget_tokens, num_shards=args.shards
        )
    with timed(t, "shards"):
        shards = cut_shards(schedule, args.shards)
    with timed(t, "plan"):
        plan = assemble_plan(tree, stats, schedule, shards)

    planning_s = sum(t.values())
    print(
        f"prompts: {args.prompts:,}  tokens: {len(tokens):,} "
        f"(mean {len(tokens) / max(args.prompts, 1):.0f})  nodes: {tree.num_nodes:,}"
    )
    print(f"generation (not planning): {generation_s:.2f} s, peak RSS then {rss_after_data:.2f} GB")
    for name, seconds in t.items():
        print(f"  {name:<15} {seconds:7.2f} s")
    rate = len(tokens) / planning_s / 1e6
    print(f"planning total: {planning_s:.2f} s  ({rate:.0f} M prompt tokens/s)")
    print(f"peak RSS (whole process): {_peak_rss_gb():.2f} GB")
    if args.tokenize_sample:
        tokenize_rate = tokenization_rate(tokens, offsets, min(args.tokenize_sample, args.prompts))
        print(
            f"tokenization: {tokenize_rate / 1e6:.2f} M tokens/s -> the planner is "
            f"{rate * 1e6 / tokenize_rate:.0f}x faster than tokenizing the same prompts"
        )
    print()
    print(plan.explain())


def tokenization_rate(tokens: np.ndarray, offsets: np.ndarray, num_prompts: int) -> float:
    """Tokens/s of the pipeline's tokenizer call on text as long as `num_prompts` prompts."""
    from prefixbatch.executors.random_model import SIZES, train_tokenizer

    shape = SIZES["small"]
    tokenizer = train_tokenizer(vocab_size=shape["vocab_size"], model_max_length=1 << 20)
    vocab = shape["vocab_size"]
    first_regular = len(tokenizer.all_special_ids)  # map ids into the regular vocabulary
    texts = [
        tokenizer.decode((tokens[offsets[i] : offsets[i + 1]] % (vocab - first_regular) + first_regular).tolist())
        for i in range(num_prompts)
    ]
    start = time.perf_counter()
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    seconds = time.perf_counter() - start
    return sum(len(ids) for ids in encoded) / seconds


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: KiB


if __name__ == "__main__":
    main()
