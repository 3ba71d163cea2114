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
from pathlib import Path

import numpy as np

from prefixbatch.prefix_tree import PrefixTree, TreeStats

WIDTH, HEIGHT, MARGIN = 1200, 560, 40
MIN_PIXELS = 0.6  # narrower nodes are not drawn: they would be invisible anyway
MAX_NODES = 6000  # keeps the file small for a million-prompt job
SNIPPET_TOKENS = 24


def write_report(
    path: str | Path,
    tree: PrefixTree,
    stats: TreeStats,
    *,
    title: str,
    decode: Callable[[np.ndarray], str],
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
    page = _PAGE.format(
        title=html.escape(title),
        summary=html.escape(_summary(stats)),
        width=WIDTH + 2 * MARGIN,
        height=HEIGHT + 2 * MARGIN,
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
<p>Width: share of the prompts under a prefix-tree node. Height: the node's tokens, placed at
its token depth (axis). Darker: more tokens saved by computing the node once.</p>
<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">
{axis}
{shapes}
</svg>
<h3>Top shared prefixes</h3>
<table><tr><th>requests</th><th>segment tokens</th><th>prefix tokens</th><th>tokens saved</th><th>segment text</th></tr>
{rows}
</table></body></html>
"""
