"""`task: score` end to end: a few-shot multiple-choice job through `prefixbatch run`.

Each row is a few-shot block + a question and four choices; every choice becomes an output
row with its summed logprob and greediness, checked against a direct transformers forward
over the same tokens (lm-evaluation-harness' tokenization: context and continuation apart,
the context's trailing space moved to the continuation). The native executor must compute
exactly the prefix tree's unique tokens: each few-shot block and each question once.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from prefixbatch.jobs.cli import main
from tests.output_helpers import finished_output

SHOTS = {
    "geography": "Q: The capital of France? A: Paris\nQ: The longest river? A: the Nile\n",
    "arithmetic": "Q: 2 + 2? A: 4\nQ: 3 * 5? A: 15\nQ: 10 - 7? A: 3\n",
}
CHOICES = [" yes", " no", "maybe", " forty two"]


def rows() -> list[dict]:
    out = []
    for subject, shots in SHOTS.items():
        for q in range(4):
            out.append({"id": f"{subject}-{q}", "prompt": f"{shots}Q: question {q} of {subject}? A: ",
                        "choices": CHOICES[q % 2:] + CHOICES[: q % 2]})
    out += [
        {"id": "null-choices", "prompt": "Q: x? A:", "choices": None},
        {"id": "no-choices", "prompt": "Q: x? A:", "choices": []},
        {"id": "empty-choice", "prompt": "Q: x? A:", "choices": [" a", ""]},
    ]
    return out


def write_job(tmp_path: Path, model: Path, kind: str, **sampling) -> Path:
    table = pa.table({
        "id": [r["id"] for r in rows()],
        "prompt": [r["prompt"] for r in rows()],
        "choices": pa.array([r["choices"] for r in rows()], pa.list_(pa.string())),
    })
    pq.write_table(table, tmp_path / "questions.parquet")
    spec = {
        "name": "mc-eval", "task": "score",
        "input": {"path": "questions.parquet", "prompt_column": "prompt", "continuations_column": "choices"},
        "output": {"path": "out"}, "model": {"path": str(model)}, "sampling": sampling,
        "executor": {"kind": kind},
    }
    path = tmp_path / "job.json"
    path.write_text(json.dumps(spec))
    return path


def unique_tokens(sequences: list[list[int]]) -> int:
    """Tokens of the prefix tree over `sequences`: its distinct non-empty prefixes."""
    return len({tuple(s[:i]) for s in sequences for i in range(1, len(s) + 1)})


@pytest.mark.parametrize("kind", ["native", "hf"])
def test_scores_equal_a_transformers_forward(tmp_path: Path, calm_llama: Path, kind: str) -> None:
    tiny_llama = calm_llama  # trained-like logits: scores within 1e-4 (see conftest)
    assert main(["run", str(write_job(tmp_path, tiny_llama, kind)), "--no-progress"]) == 0
    out = {(r["id"], r["sample_index"]): r for r in finished_output(str(tmp_path / "out"))}
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    sequences = []
    for row in rows()[:-3]:
        context = tokenizer(row["prompt"].rstrip())["input_ids"]  # "A: " → "A:" + " " + choice
        for index, choice in enumerate(row["choices"]):
            continuation = tokenizer(" " + choice, add_special_tokens=False)["input_ids"]
            tokens = context + continuation
            sequences.append(tokens)
            with torch.inference_mode():
                logp = torch.log_softmax(model(torch.tensor([tokens])).logits[0].float(), dim=-1)
            positions = range(len(context) - 1, len(tokens) - 1)
            got = out[row["id"], index]
            assert got["finish_reason"] == "scored" and got["error"] is None
            assert got["output_token_ids"] == continuation and got["output_text"] == tokenizer.decode(continuation)
            assert got["num_output_tokens"] == len(continuation) and got["num_prompt_tokens"] == len(tokens)
            expected = sum(logp[p, tokens[p + 1]].item() for p in positions)
            assert got["continuation_logprob"] == pytest.approx(expected, abs=1e-4)
            assert got["continuation_is_greedy"] is all(int(logp[p].argmax()) == tokens[p + 1] for p in positions)
    for bad in ("null-choices", "no-choices", "empty-choice"):
        assert out[bad, 0]["error"].startswith("invalid_continuations: "), out[bad, 0]["error"]
    assert len(out) == len(sequences) + 3
    summary = json.loads((tmp_path / "out" / "_summary.json").read_text())
    if kind == "native":
        assert summary["prefill_tokens_computed"] == unique_tokens(sequences)
    else:
        assert summary["prefill_tokens_computed"] == sum(len(s) for s in sequences)


def test_scoring_with_prompt_logprobs_per_row(tmp_path: Path, tiny_llama: Path) -> None:
    job = write_job(tmp_path, tiny_llama, "native", prompt_logprobs=2)
    assert main(["run", str(job), "--no-progress"]) == 0
    out = {(r["id"], r["sample_index"]): r for r in finished_output(str(tmp_path / "out"))}
    row = out["geography-0", 1]
    assert [t["token_id"] for t in row["prompt_logprobs"]][-row["num_output_tokens"]:] == row["output_token_ids"]
    assert len(row["prompt_logprobs"]) == row["num_prompt_tokens"] - 1
    tail = row["prompt_logprobs"][-row["num_output_tokens"]:]
    assert sum(t["logprob"] for t in tail) == pytest.approx(row["continuation_logprob"], abs=1e-4)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s.pop("task"), "input.continuations_column is only read by task: score"),
        (lambda s: s["input"].pop("continuations_column"), "task 'score' needs input.continuations_column"),
    ],
)
def test_scoring_spec_mistakes_are_refused(tmp_path: Path, tiny_llama: Path, capsys, change, message) -> None:
    path = write_job(tmp_path, tiny_llama, "native")
    spec = json.loads(path.read_text())
    change(spec)
    path.write_text(json.dumps(spec))
    assert main(["run", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_continuations_column_of_the_wrong_type_is_refused(tmp_path: Path, tiny_llama: Path, capsys) -> None:
    path = write_job(tmp_path, tiny_llama, "native")
    pq.write_table(pa.table({"id": ["a"], "prompt": ["Q?"], "choices": ["yes"]}), tmp_path / "questions.parquet")
    assert main(["run", str(path), "--no-progress"]) == 2
    assert "column 'choices'" in capsys.readouterr().err
