"""`prefixbatch plan` on the demo job: statistics, shards, and the sharing picture."""

from __future__ import annotations

import itertools
import json
import re

import pyarrow as pa
import pyarrow.parquet as pq

from prefixbatch.jobs.cli import main
from prefixbatch.jobs.demo import SPEC

TOPICS = ("tea", "bread", "a flat tyre", "poetry", "maps", "rice", "chains", "history", "soup", "brakes")
QUESTIONS = ("What should I know first about {}?", "Can you explain {} to a ten year old?",
             "What is the most common mistake with {}?", "Where do I start with {} if I have one hour?",
             "Give me three facts about {}.", "How has {} changed in the last century?",
             "Which tools do I need for {}?", "What is a good question to ask about {}?",
             "Why do people get {} wrong?", "Summarise {} in two sentences.")
SYSTEM_PROMPTS = (
    "You are a careful assistant for a public library. Answer in one short paragraph, "
    "cite the shelf section when you can, and never invent a book that is not in the catalogue.",
    "You are a support agent for a bicycle shop. Be friendly and concrete: name the part, "
    "the tool needed and the time the repair takes.",
    "You translate cooking questions into step by step instructions for a beginner. "
    "Use metric units and warn about anything hot or sharp.",
)


def plan_prompts() -> pa.Table:
    """300 conversations: 3 shared system prompts × 10 topics × 10 questions."""
    rows = []
    for system, topic, question in itertools.product(SYSTEM_PROMPTS, TOPICS, QUESTIONS):
        messages = [{"role": "system", "content": system}, {"role": "user", "content": question.format(topic)}]
        rows.append({"id": f"q{len(rows):04d}", "messages": messages, "question": question.format(topic)})
    return pa.Table.from_pylist(rows)


def demo_job(tmp_path, model) -> str:
    pq.write_table(plan_prompts(), tmp_path / "prompts.parquet")
    (tmp_path / "job.yaml").write_text(SPEC.format(model=model, max_tokens=24))
    return str(tmp_path / "job.yaml")


def test_plan_prints_sharing_statistics(tmp_path, tiny_llama, capsys):
    spec = demo_job(tmp_path, tiny_llama)
    assert main(["plan", spec]) == 0
    out = capsys.readouterr().out
    assert "Job demo: 300 rows, 300 to generate, 0 error rows" in out
    assert re.search(r"Prompt tokens: [\d,]+ total, [\d,]+ unique \(sharing ratio \d+\.\d%\)", out)
    assert re.search(r"Prefill cost: [\d,]+ tokens with sharing vs [\d,]+ without", out)
    assert re.search(r"Peak KV per group: [\d,]+ tokens with sharing vs [\d,]+ without", out)
    assert "careful assistant for a public library" in out  # a top shared prefix, decoded


def test_plan_json_has_costs_groups_and_shards(tmp_path, tiny_llama, capsys):
    spec = demo_job(tmp_path, tiny_llama)
    assert main(["plan", spec, "--json", "--shards", "3", "--kv-budget", "4000"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rows"] == 300 and report["requests"] == 300
    prefill = report["prefill_tokens"]
    assert prefill["with_sharing"] < prefill["without_sharing"] / 3
    assert report["unique_prompt_tokens"] <= prefill["with_sharing"]
    assert report["prompt_tokens"] == prefill["without_sharing"]
    kv = report["peak_kv_tokens_per_group"]
    assert kv["with_sharing"] <= 4000 < kv["without_sharing"] or report["groups_over_budget"]
    assert len(report["shards"]) == 3
    assert sum(s["requests"] for s in report["shards"]) == 300
    # The three system prompts are the top shared prefixes, 100 requests each.
    top = report["top_prefixes"][:3]
    assert [p["requests"] for p in top] == [100, 100, 100]
    for system in SYSTEM_PROMPTS:  # each segment is a system prompt's text after the shared head
        assert sum(p["text"].strip()[:30] in system for p in top) == 1


def test_report_shows_the_system_prompts_as_the_widest_blocks(tmp_path, tiny_llama, capsys):
    spec = demo_job(tmp_path, tiny_llama)
    report = tmp_path / "sharing.html"
    assert main(["plan", spec, "--report", str(report)]) == 0
    assert f"wrote {report}" in capsys.readouterr().err
    page = report.read_text()
    rects = [
        (title, float(w), float(h), float(y))
        for title, y, w, h in re.findall(
            r'<title>([^<]*)</title><rect x="[\d.]+" y="([\d.]+)" width="([\d.]+)" height="([\d.]+)"', page
        )
    ]
    assert rects
    systems = [r for r in rects if "careful assistant" in r[0] or "bicycle shop" in r[0] or "cooking" in r[0]]
    assert len(systems) == 3
    total = max(r[1] for r in rects)  # the chat template's header spans every prompt
    for _, width, height, _ in systems:
        assert abs(width - total / 3) < 1.0  # each system prompt: a third of all prompts
        assert height > 20  # and tall: dozens of shared tokens
    # Apart from the template's few header tokens above them, no node is wider or larger.
    below = [r for r in rects if r not in systems and r[3] >= max(s[3] for s in systems)]
    assert all(r[1] <= total / 3 + 1e-6 for r in below)
    assert max(r[1] * r[2] for r in rects if r not in systems) < min(s[1] * s[2] for s in systems)


def test_report_shows_shards_costs_errors_units_and_a_legend(tmp_path, tiny_llama, capsys):
    spec = demo_job(tmp_path, tiny_llama)
    report = tmp_path / "sharing.html"
    assert main(["plan", spec, "--shards", "3", "--report", str(report), "--json"]) == 0
    numbers = json.loads(capsys.readouterr().out)
    page = report.read_text()
    strips = re.findall(r'width="([\d.]+)" height="18" fill="(#[0-9a-f]{6})"><title>shard (\d+): (\d+) prompts', page)
    assert {int(k) for *_, k, _ in strips} == {0, 1, 2}
    assert sum(int(n) for *_, n in strips) == 300  # every prompt under its shard
    without, with_sharing = numbers["prefill_tokens"]["without_sharing"], numbers["prefill_tokens"]["with_sharing"]
    assert f"<td>prefill tokens</td><td>{without:,}</td><td>{with_sharing:,} (" in page
    assert "peak KV tokens per group" in page and "Error rows (not in the picture" in page
    assert "token depth (tokens)" in page and "prompts (300, in prefix order)" in page and "tokens saved" in page
