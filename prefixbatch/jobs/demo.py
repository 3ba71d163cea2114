"""`prefixbatch demo`: a real job on a tiny model made on the spot.

Writes a random-weight test model, a few hundred chat prompts that share system prompts
(the kind of job prefixbatch is built for), and a spec file, then runs the job and shows
some output rows. The outputs are gibberish (random weights) but real and deterministic.
"""

from __future__ import annotations

import itertools
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SYSTEM_PROMPTS = (
    "You are a careful assistant for a public library. Answer in one short paragraph, "
    "cite the shelf section when you can, and never invent a book that is not in the catalogue.",
    "You are a support agent for a bicycle shop. Be friendly and concrete: name the part, "
    "the tool needed and the time the repair takes.",
    "You translate cooking questions into step by step instructions for a beginner. "
    "Use metric units and warn about anything hot or sharp.",
)
TOPICS = ("tea", "bread", "a flat tyre", "poetry", "maps", "rice", "chains", "history", "soup", "brakes")
QUESTIONS = (
    "What should I know first about {}?",
    "Can you explain {} to a ten year old?",
    "What is the most common mistake with {}?",
    "Where do I start with {} if I have one hour?",
    "Give me three facts about {}.",
    "How has {} changed in the last century?",
    "Which tools do I need for {}?",
    "What is a good question to ask about {}?",
    "Why do people get {} wrong?",
    "Summarise {} in two sentences.",
)

SPEC = """\
# A prefixbatch job: chat prompts in, completions out.
name: demo
input:
  path: prompts.parquet
  id_column: id
  messages_column: messages
  carry_columns: [topic]
output:
  path: output
  mode: overwrite
model:
  path: model
sampling:
  max_tokens: 24
  temperature: 0.0
executor:
  kind: native   # our engine; `hf` runs the same job with transformers generate
"""


def demo_prompts() -> pa.Table:
    """300 conversations: 3 shared system prompts × 10 topics × 10 questions."""
    rows = []
    for system, topic, question in itertools.product(SYSTEM_PROMPTS, TOPICS, QUESTIONS):
        rows.append(
            {
                "id": f"q{len(rows):04d}",
                "messages": [
                    {"role": "system", "content": system},
                    {"role": "user", "content": question.format(topic)},
                ],
                "topic": topic,
            }
        )
    return pa.Table.from_pylist(rows)


def run_demo(directory: str | Path, *, log: Callable[[str], None] = print) -> Path:
    from prefixbatch.executors.random_model import make_test_model
    from prefixbatch.jobs.run import run_job
    from prefixbatch.jobs.spec import load_spec

    folder = Path(directory).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "model" / "config.json").is_file():
        log(f"making a tiny test model in {folder / 'model'}")
        make_test_model(folder / "model", arch="llama", size="tiny", seed=0)
    # Written once: a later demo run keeps what the user changed in them (the job it runs is theirs).
    prompts, spec_file = folder / "prompts.parquet", folder / "job.yaml"
    for path, write, what in (
        (prompts, lambda p: pq.write_table(demo_prompts(), p), "300 chat prompts"),
        (spec_file, lambda p: p.write_text(SPEC, encoding="utf-8"), "the job spec"),
    ):
        if path.exists():
            log(f"kept {path} (written by an earlier demo run, or yours)")
        else:
            write(path)
            log(f"wrote {path} ({what})")
    summary = run_job(load_spec(spec_file), log=log)
    output = pa.concat_tables(pq.read_table(part) for part in summary.parts)
    log(f"\noutput: {summary.output_path} ({output.num_rows} rows, {len(summary.parts)} part file(s))")
    for row in output.sort_by("id").slice(0, 3).to_pylist():
        log(f"  {row['id']} [{row.get('topic', '')}] {row['finish_reason']}: {(row['output_text'] or '')[:70]!r}")
    log(
        "\nthe model has random weights (made here, offline), so its outputs are gibberish on purpose;"
        " point model.path in job.yaml at a real Hugging Face checkpoint folder for real text"
    )
    log(f"run it yourself:  {_command()} run {shlex.quote(str(spec_file))} --overwrite")
    return folder


def _command() -> str:
    """How to call `prefixbatch` from this shell as it is: the script beside this Python
    (a venv that is not activated has it there, not on PATH), else `python -m prefixbatch`."""
    script = Path(sys.executable).parent / "prefixbatch"
    if script.is_file():
        return shlex.quote(str(script))
    return f"{shlex.quote(sys.executable)} -m prefixbatch"
