"""Every figure README.md quotes is one BENCHMARKS.md holds: a ratio (`2.02×`), a share
(`5%`) or a time in seconds (`114–182 s`) in README must appear, as written, in
BENCHMARKS.md — so a re-measured table that changes a figure fails here until README says
the same. (How long `make test` takes is not a benchmark: minutes are not checked.)"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# 2.02×, 0.25–0.45×, 5%, 114–182 s
FIGURE = re.compile(r"\d[\d.,]*(?:–\d[\d.,]*)?(?:×|%| s\b)")


def figures(text: str) -> set[str]:
    return set(FIGURE.findall(text))


def test_readme_quotes_only_figures_that_benchmarks_holds():
    benchmarks = (ROOT / "BENCHMARKS.md").read_text(encoding="utf-8")
    quoted = figures((ROOT / "README.md").read_text(encoding="utf-8"))
    assert quoted, "README quotes no figure at all: the pattern no longer matches its style"
    missing = sorted(f for f in quoted if f not in benchmarks)
    assert not missing, f"README quotes figures BENCHMARKS.md does not hold: {missing}"


def test_the_figure_pattern():
    text = "native is 2.02× faster, 0.25–0.45× of it, costs 5%, ends in 5–22 s, tests take 15 minutes"
    assert figures(text) == {"2.02×", "0.25–0.45×", "5%", "5–22 s"}
