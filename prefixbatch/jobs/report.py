"""`prefixbatch plan --report FILE.html`: a picture of a job's prefix sharing.

An icicle of the prefix tree: each node is a rectangle whose width is the share of the
job's requests under it (requests in the tree's lexicographic order, so a subtree is one
horizontal span) and whose height is its segment's length in tokens, placed at its token
depth. A long prefix shared by many prompts is therefore a wide, tall block at the top; a
prompt's own suffix a thin sliver at the bottom. Colour follows the tokens a node saves,
`(requests − 1) × length`. The file is one self-contained HTML page (inline SVG, no
scripts), so it opens anywhere.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from prefixbatch.prefix_tree import PrefixTree, TreeStats

WIDTH, HEIGHT, MARGIN = 1200, 560, 40
MIN_PIXELS = 0.6  # narrower nodes are not drawn: they would be invisible anyway
MAX_NODES = 6000  # keeps the file small for a million-prompt job
SNIPPET_TOKENS = 24


@dataclass(frozen=True)
class PlanFacts:
    """What the plan adds to the picture: its shards, its cost with and without sharing, and
    the rows that never reach it."""

    request_shard: np.ndarray  # [n] the shard each request (by id) runs in
    num_shards: int
    prefill_tokens: tuple[int, int]  # (without sharing, with sharing)
    peak_kv_tokens: tuple[int, int]  # per group: (without sharing, with sharing)
    error_rows: dict[str, int]  # by code


def write_report(
    path: str | Path,
    tree: PrefixTree,
    stats: TreeStats,
    *,
    title: str,
    decode: Callable[[np.ndarray], str],
    facts: PlanFacts | None = None,
) -> Path:
    """Write the icicle page; returns its path."""
    path = Path(path)
    nodes = _visible_nodes(tree)
    depth_scale = HEIGHT / max(int(tree.node_end_depth.max(initial=1)), 1)
    x_scale = WIDTH / max(tree.num_requests, 1)
    saved = (tree.node_num_requests - 1).clip(min=0) * tree.node_num_tokens
    top_saved = max(int(saved[nodes].max(initial=1)), 1)
    shapes = [
        _rect(tree, int(x), x_scale, depth_scale, saved[x] / top_saved, _snippet(tree, int(x), decode))
        for x in nodes
    ]
    shapes.append(_legend(top_saved))
    shapes.append(_axis_titles(tree))
    if facts is not None and facts.num_shards > 1:
        shapes.append(_shard_strip(tree, facts))
    page = _PAGE.format(
        title=html.escape(title),
        summary=html.escape(_summary(stats)),
        costs=_costs(facts) if facts is not None else "",
        width=WIDTH + 2 * MARGIN + LEGEND_WIDTH,
        height=HEIGHT + 2 * MARGIN + (STRIP + 14 if facts is not None and facts.num_shards > 1 else 0),
        shapes="\n".join(shapes),
        axis=_axis(tree, depth_scale),
        rows="\n".join(_prefix_row(p) for p in stats.top_prefixes),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


def _visible_nodes(tree: PrefixTree) -> np.ndarray:
    width = tree.node_num_requests * (WIDTH / max(tree.num_requests, 1))
    candidates = np.flatnonzero((width >= MIN_PIXELS) & (tree.node_num_tokens > 0))
    if len(candidates) > MAX_NODES:  # keep the widest: they carry the picture
        candidates = candidates[np.argsort(-width[candidates], kind="stable")[:MAX_NODES]]
    return np.sort(candidates)


def _snippet(tree: PrefixTree, node: int, decode: Callable[[np.ndarray], str]) -> str:
    return decode(tree.segment(node)[:SNIPPET_TOKENS]).replace("\n", "⏎ ")


def _rect(tree: PrefixTree, x: int, x_scale: float, y_scale: float, heat: float, text: str) -> str:
    left = MARGIN + tree.node_lo[x] * x_scale
    width = tree.node_num_requests[x] * x_scale
    top = MARGIN + tree.node_depth[x] * y_scale
    height = max(tree.node_num_tokens[x] * y_scale, 0.5)
    fill = _colour(heat)
    tip = (
        f"{tree.node_num_tokens[x]} tokens at depth {tree.node_depth[x]}, "
        f"{tree.node_num_requests[x]} requests: {text}"
    )
    label = ""
    if width > 60 and height > 12:
        chars = int(width / 7)
        label = (
            f'<text x="{left + 3:.1f}" y="{top + 11:.1f}" font-size="10">'
            f"{html.escape(text[:chars])}</text>"
        )
    return (
        f'<g><title>{html.escape(tip)}</title><rect x="{left:.2f}" y="{top:.2f}" '
        f'width="{width:.2f}" height="{height:.2f}" fill="{fill}" stroke="#fff" '
        f'stroke-width="0.4"/>{label}</g>'
    )


def _colour(heat: float) -> str:
    # Pale sand for nodes that save nothing, deep blue for the node that saves the most.
    light, dark = np.array([240, 228, 200]), np.array([30, 70, 150])
    r, g, b = (light + (dark - light) * float(np.sqrt(heat))).astype(int)
    return f"rgb({r},{g},{b})"


def _axis(tree: PrefixTree, y_scale: float) -> str:
    deepest = int(tree.node_end_depth.max(initial=0))
    step = max(1, 10 ** max(len(str(deepest)) - 1, 0) // 2 or 1)
    ticks = range(0, deepest + 1, step) if deepest else [0]
    return "\n".join(
        f'<text x="{MARGIN - 4}" y="{MARGIN + t * y_scale + 3:.1f}" font-size="9" '
        f'text-anchor="end">{t}</text>'
        for t in list(ticks)[:30]
    )


LEGEND_WIDTH, STRIP = 150, 18
SHARD_COLOURS = ["#d95f02", "#1b9e77", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#666666"]


def _legend(top_saved: int) -> str:
    """The colour scale: tokens a node saves by being computed once, pale to dark."""
    x, y, h = MARGIN + WIDTH + 40, MARGIN + 20, 200
    steps = 20
    bands = "".join(
        f'<rect x="{x}" y="{y + h * (1 - (i + 1) / steps):.1f}" width="16" height="{h / steps + 0.5:.1f}" '
        f'fill="{_colour((i + 0.5) / steps)}"/>'
        for i in range(steps)
    )
    return (
        f'<g>{bands}<text x="{x}" y="{y - 8}" font-size="10">tokens saved</text>'
        f'<text x="{x + 20}" y="{y + 8}" font-size="9">{top_saved:,}</text>'
        f'<text x="{x + 20}" y="{y + h}" font-size="9">0</text></g>'
    )


def _axis_titles(tree: PrefixTree) -> str:
    """Axis units: prompts across (in the tree's order), token depth down."""
    return (
        f'<text x="{MARGIN + WIDTH / 2:.0f}" y="{MARGIN - 14}" font-size="11" text-anchor="middle">'
        f"prompts ({tree.num_requests:,}, in prefix order) →</text>"
        f'<text x="12" y="{MARGIN + HEIGHT / 2:.0f}" font-size="11" text-anchor="middle" '
        f'transform="rotate(-90 12 {MARGIN + HEIGHT / 2:.0f})">token depth (tokens) ↓</text>'
    )


def _shard_strip(tree: PrefixTree, facts: PlanFacts) -> str:
    """Under the icicle: which shard each prompt runs in, in the same left-to-right order."""
    y = MARGIN + HEIGHT + 8
    shard_in_order = facts.request_shard[tree.order]  # [n] by position in the picture
    x_scale = WIDTH / max(tree.num_requests, 1)
    runs, start = [], 0
    for i in range(1, len(shard_in_order) + 1):  # consecutive prompts of one shard: one rectangle
        if i == len(shard_in_order) or shard_in_order[i] != shard_in_order[start]:
            runs.append((start, i, int(shard_in_order[start])))
            start = i
    rects = "".join(
        f'<rect x="{MARGIN + lo * x_scale:.2f}" y="{y}" width="{max((hi - lo) * x_scale, 0.3):.2f}" height="{STRIP}" '
        f'fill="{SHARD_COLOURS[k % len(SHARD_COLOURS)]}"><title>shard {k}: {hi - lo} prompts</title></rect>'
        for lo, hi, k in runs
    )
    label = (f'<text x="{MARGIN - 4}" y="{y + 13}" font-size="9" text-anchor="end">shard</text>')
    return f"<g>{rects}{label}</g>"


def _costs(facts: PlanFacts) -> str:
    """Cost with and without sharing, the shards, and the rows left out of the picture."""
    (prefill_without, prefill_with), (kv_without, kv_with) = facts.prefill_tokens, facts.peak_kv_tokens
    saved = 1 - prefill_with / prefill_without if prefill_without else 0.0
    shards = "".join(
        f'<span style="background:{SHARD_COLOURS[k % len(SHARD_COLOURS)]};color:#fff;padding:0 6px;margin-right:4px">'
        f"shard {k}</span>" for k in range(facts.num_shards)
    ) if facts.num_shards > 1 else "one shard (one process)"
    errors = ", ".join(f"{code}: {n:,}" for code, n in facts.error_rows.items()) or "none"
    return (
        "<table><tr><th></th><th>without sharing</th><th>with sharing</th></tr>"
        f"<tr><td>prefill tokens</td><td>{prefill_without:,}</td><td>{prefill_with:,} ({saved:.0%} fewer)</td></tr>"
        f"<tr><td>peak KV tokens per group</td><td>{kv_without:,}</td><td>{kv_with:,}</td></tr></table>"
        f"<p>Shards: {shards}. Error rows (not in the picture: they never reach the plan): {html.escape(errors)}.</p>"
    )


def _summary(stats: TreeStats) -> str:
    return (
        f"{stats.num_requests:,} prompts, {stats.num_prompt_tokens:,} prompt tokens, "
        f"{stats.num_unique_tokens:,} unique (sharing ratio {stats.sharing_ratio:.1%}), "
        f"{stats.num_nodes:,} tree nodes"
    )


def _prefix_row(prefix) -> str:
    text = html.escape((prefix.text or "").replace("\n", "⏎ ")[:160])
    return (
        f"<tr><td>{prefix.num_requests:,}</td><td>{prefix.num_segment_tokens:,}</td>"
        f"<td>{prefix.num_tokens:,}</td><td>{prefix.num_tokens_saved:,}</td><td><code>{text}</code></td></tr>"
    )


_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;margin:20px;color:#222}} td,th{{padding:2px 8px;text-align:left}}
code{{font-size:11px}} svg text{{fill:#111;pointer-events:none}}</style></head>
<body><h2>{title}</h2><p>{summary}</p>
{costs}
<p>Width: share of the prompts under a prefix-tree node. Height: the node's tokens, placed at
its token depth (axis, in tokens). Darker: more tokens saved by computing the node once
(legend). Under it, when the plan is cut into shards: the shard each prompt runs in.</p>
<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">
{axis}
{shapes}
</svg>
<h3>Top shared prefixes</h3>
<table><tr><th>requests</th><th>segment tokens</th><th>prefix tokens</th><th>tokens saved</th><th>segment text</th></tr>
{rows}
</table></body></html>
"""
