"""A corpus of bad inputs: each bad row becomes an error row with its code and the job goes on;
each job-level mistake is refused before any model work, with one message and exit code 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prefixbatch.jobs.cli import main
from tests.output_helpers import finished_output

LONG = "lorem ipsum dolor " * 1200  # several thousand tokens: more than the 2,048 context


def invalid_utf8_strings(values: list[bytes]) -> pa.Array:
    """A string array holding the bytes as they are: Arrow does not validate on construction."""
    binary = pa.array(values, pa.binary())
    return pa.Array.from_buffers(pa.string(), len(values), binary.buffers())


ROWS = [  # (id, prompt bytes or None, per-row overrides, expected error code or None)
    ("good-1", b"Tell me about trains.", {}, None),
    ("null", None, {}, "null_prompt"),
    ("empty", b"   ", {}, "empty_prompt"),
    ("too-long", LONG.encode(), {}, "prompt_too_long"),
    ("bad-utf8", b"caf\xc3 au lait \xff", {}, "invalid_utf8"),
    ("huge", b"x" * 40_000, {}, "prompt_too_large"),
    ("neg-temperature", b"hello", {"temperature": -1.0}, "invalid_sampling"),
    ("zero-top-p", b"hello", {"top_p": 0.0}, "invalid_sampling"),
    ("big-top-p", b"hello", {"top_p": 1.5}, "invalid_sampling"),
    ("zero-max-tokens", b"hello", {"max_tokens": 0}, "invalid_sampling"),
    ("zero-n", b"hello", {"n": 0}, "invalid_sampling"),
    ("good-2", b"What is a sea shanty?", {"max_tokens": 3}, None),
    ("big-logprobs", b"hello", {"logprobs": 21}, "invalid_sampling"),
    ("zero-repetition", b"hello", {"repetition_penalty": 0.0}, "invalid_sampling"),
    ("big-presence", b"hello", {"presence_penalty": 2.5}, "invalid_sampling"),
    ("min-over-max", b"hello", {"min_tokens": 9}, "invalid_sampling"),
    ("good-options", b"Name three rivers.", {"logprobs": 2, "repetition_penalty": 1.3, "presence_penalty": 0.5,
                                             "frequency_penalty": -0.5, "min_tokens": 2, "min_p": 0.1,
                                             "logit_bias": '{"15": -100, "16": 2.5}'}, None),
    ("big-min-p", b"hello", {"min_p": 1.5}, "invalid_sampling"),
    ("bias-not-json", b"hello", {"logit_bias": "{15: -100"}, "invalid_sampling"),
    ("bias-key", b"hello", {"logit_bias": '{"the": 5}'}, "invalid_sampling"),
    ("bias-range", b"hello", {"logit_bias": '{"15": 101}'}, "invalid_sampling"),
    ("bias-vocab", b"hello", {"logit_bias": '{"99999": 1}'}, "invalid_logit_bias"),
]
OVERRIDE_TYPES = {"temperature": pa.float64(), "top_p": pa.float64(), "max_tokens": pa.int64(), "n": pa.int64(),
                  "logprobs": pa.int64(), "repetition_penalty": pa.float64(), "presence_penalty": pa.float64(),
                  "frequency_penalty": pa.float64(), "min_tokens": pa.int64(), "min_p": pa.float64(),
                  "logit_bias": pa.string()}


@pytest.fixture
def corpus(tmp_path, tiny_llama) -> dict:
    columns = {
        "id": pa.array([r[0] for r in ROWS]),
        "prompt": invalid_utf8_strings([r[1] for r in ROWS]),
    }
    for name, kind in OVERRIDE_TYPES.items():
        columns[name] = pa.array([r[2].get(name) for r in ROWS], kind)
    pq.write_table(pa.table(columns), tmp_path / "in.parquet")
    return {
        "name": "bad-rows",
        "input": {"path": "in.parquet", "prompt_column": "prompt", "max_prompt_chars": 30_000},
        "output": {"path": "out"},
        "model": {"path": str(tiny_llama)},
        "sampling": {"max_tokens": 4},
        # 'too-long' is truncated to 2,044 tokens under input.truncate; small steps keep it cheap.
        "executor": {"kind": "native", "native": {"max_step_tokens": 512}},
    }


def run(tmp_path: Path, spec: dict, *extra: str) -> tuple[int, dict[str, dict], dict]:
    path = tmp_path / "job.json"
    path.write_text(json.dumps(spec))
    code = main(["run", str(path), "--no-progress", "--overwrite", *extra])
    rows = {r["id"]: r for r in finished_output(str(tmp_path / "out"))}
    summary = json.loads((tmp_path / "out" / "_summary.json").read_text())
    return code, rows, summary


def test_every_bad_row_becomes_an_error_row_and_the_others_complete(tmp_path, corpus, capsys):
    code, rows, summary = run(tmp_path, corpus)
    assert code == 0 and set(rows) == {r[0] for r in ROWS}
    for row_id, _, _, error in ROWS:
        row = rows[row_id]
        if error is None:
            assert row["finish_reason"] in ("stop", "length") and row["error"] is None
            assert row["output_token_ids"] is not None
        else:
            assert row["finish_reason"] == "error" and row["error"].startswith(f"{error}: "), (row_id, row["error"])
            assert row["output_text"] is None and row["output_token_ids"] is None
    assert rows["too-long"]["error"].endswith("the model's context is 2048")
    assert "input.max_prompt_chars is 30000" in rows["huge"]["error"]
    assert "top_p" in rows["big-top-p"]["error"] and "n:" in rows["zero-n"]["error"]
    assert "logprobs: " in rows["big-logprobs"]["error"] and "less than or equal to 20" in rows["big-logprobs"]["error"]
    assert "repetition_penalty: " in rows["zero-repetition"]["error"]
    assert "presence_penalty: " in rows["big-presence"]["error"]
    assert "min_tokens (9) must not exceed max_tokens (4)" in rows["min-over-max"]["error"]
    good = rows["good-options"]
    assert len(good["logprobs"]) == good["num_output_tokens"] >= 2
    assert [t["token_id"] for t in good["logprobs"]] == good["output_token_ids"]
    assert all(len(t["top_logprobs"]) == 2 and t["logprob"] <= 0 for t in good["logprobs"])
    assert rows["good-1"]["logprobs"] is None
    expected_counts: dict[str, int] = {}
    for *_, error in ROWS:
        if error:
            expected_counts[error] = expected_counts.get(error, 0) + 1
    assert summary["errors_by_code"] == expected_counts
    assert summary["error_rows"] == sum(expected_counts.values())
    assert "error rows by code: " in capsys.readouterr().err


@pytest.mark.parametrize("side", ["left", "right"])
def test_truncation_makes_an_overlong_prompt_fit(tmp_path, corpus, side):
    corpus["input"]["truncate"] = side
    code, rows, summary = run(tmp_path, corpus)
    assert code == 0
    row = rows["too-long"]
    assert row["error"] is None and row["num_prompt_tokens"] == 2048 - 4  # room for max_tokens
    assert row["num_output_tokens"] >= 1
    assert summary["rows_with_truncated_prompt"] == 1


@pytest.mark.slow
def test_max_tokens_over_the_context_is_clamped_or_refused(tmp_path, corpus):
    corpus["sampling"]["max_tokens"] = 2_040  # every prompt but the shortest leaves less room
    corpus["input"]["max_tokens_overflow"] = "error"
    code, rows, summary = run(tmp_path, corpus)
    assert code == 0
    assert rows["good-1"]["error"].startswith("max_tokens_over_context: the prompt has ")
    assert "(input.max_tokens_overflow: error)" in rows["good-1"]["error"]
    assert rows["good-2"]["error"] is None  # its own max_tokens (3) fits
    assert summary["rows_with_clamped_max_tokens"] == 0


def test_too_many_error_rows_exit_3_after_writing_every_row(tmp_path, corpus, capsys):
    code, rows, summary = run(tmp_path, corpus, "--set", "max_error_fraction=0.5")
    err = capsys.readouterr().err
    assert code == 3 and len(rows) == len(ROWS)
    bad = sum(1 for *_, error in ROWS if error)
    share = f"{bad / len(ROWS):.1%}"
    assert f"{bad} of {len(ROWS)} input rows ({share}) are error rows, above max_error_fraction 0.5" in err
    assert "Traceback" not in err


# --- job-level mistakes: refused before any model work ----------------------------------------


@pytest.fixture
def job(tmp_path, tiny_llama) -> dict:
    pq.write_table(pa.table({"id": ["a", "b"], "prompt": ["hello there", "general kenobi"]}), tmp_path / "a.parquet")
    return {
        "name": "job-errors",
        "input": {"path": "*.parquet", "prompt_column": "prompt"},
        "output": {"path": "out"},
        "model": {"path": str(tiny_llama)},
        "sampling": {"max_tokens": 2},
    }


def refused(tmp_path: Path, spec: dict, capsys) -> str:
    path = tmp_path / "job.json"
    path.write_text(json.dumps(spec))
    code = main(["run", str(path), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()  # nothing claimed, nothing written
    return err


def test_null_and_duplicate_ids_are_listed_with_file_and_row(tmp_path, job, capsys):
    pq.write_table(pa.table({"id": ["c", None, "a"], "prompt": ["x", "y", "z"]}), tmp_path / "b.parquet")
    err = refused(tmp_path, job, capsys)
    assert f"null id at {tmp_path}/b.parquet row 1" in err
    assert "'a'" in err and f"{tmp_path}/a.parquet row 0" in err and f"{tmp_path}/b.parquet row 2" in err


def test_every_corrupt_or_empty_file_is_listed_then_skipped_on_request(tmp_path, job, capsys):
    (tmp_path / "b.parquet").write_bytes(b"PAR1 this is not parquet")
    (tmp_path / "c.parquet").write_bytes(b"")
    err = refused(tmp_path, job, capsys)
    assert f"file {tmp_path}/b.parquet is not a readable Parquet file" in err
    assert f"file {tmp_path}/c.parquet is not a readable Parquet file" in err
    assert "input.ignore_corrupt_files: true" in err

    job["input"]["ignore_corrupt_files"] = True
    (tmp_path / "job.json").write_text(json.dumps(job))
    assert main(["run", str(tmp_path / "job.json"), "--no-progress"]) == 0
    assert {r["id"] for r in finished_output(str(tmp_path / "out"))} == {"a", "b"}
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    skipped = manifest["skipped_input_files"]
    assert len(skipped) == 2 and f"{tmp_path}/b.parquet" in skipped[0] and f"{tmp_path}/c.parquet" in skipped[1]


def test_wrong_column_type(tmp_path, job, capsys):
    pq.write_table(pa.table({"id": ["c"], "prompt": ["x"], "max_tokens": ["ten"]}), tmp_path / "b.parquet")
    err = refused(tmp_path, job, capsys)
    assert f"column 'max_tokens' in {tmp_path}/b.parquet must be" in err
    assert "ignore_corrupt_files" not in err  # the file is readable: skipping it would drop its rows


def test_a_missing_column_suggests_the_closest_name(tmp_path, job, capsys):
    pq.write_table(pa.table({"id": ["c"], "prompts": ["x"]}), tmp_path / "b.parquet")
    err = refused(tmp_path, job, capsys)
    assert f"file {tmp_path}/b.parquet has no column 'prompt' (did you mean 'prompts'? columns: id, prompts)" in err
    assert "ignore_corrupt_files" not in err


def test_invalid_spec_value(tmp_path, job, capsys):
    job["sampling"]["temperature"] = -0.5
    err = refused(tmp_path, job, capsys)
    assert "sampling.temperature" in err and "greater than or equal to 0" in err


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("logprobs", 21, "less than or equal to 20"),
        ("logprobs", -1, "greater than or equal to 0"),
        ("repetition_penalty", 0, "greater than 0"),
        ("presence_penalty", -3, "greater than or equal to -2"),
        ("frequency_penalty", 2.5, "less than or equal to 2"),
        ("min_tokens", -1, "greater than or equal to 0"),
        ("min_tokens", 5, "min_tokens (5) must not exceed max_tokens (2)"),
        ("min_p", -0.1, "greater than or equal to 0"),
        ("logit_bias", {"x": 1}, "keys are token ids (integers), got 'x'"),
        ("logit_bias", {5: -200}, "token 5: a bias is from -100 to 100, got -200"),
    ],
)
def test_invalid_sampling_option_in_the_spec(tmp_path, job, capsys, field, value, message):
    job["sampling"][field] = value
    err = refused(tmp_path, job, capsys)
    assert message in err and (f"sampling.{field}" in err or "sampling" in err and field in message), err


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / "config.json").unlink(), "config.json"),
        (lambda d: (d / "config.json").write_text("{ not json"), "config.json"),
        (lambda d: (d / "tokenizer.json").write_text("garbage"), "tokenizer"),
    ],
    ids=["no-config", "bad-config", "bad-tokenizer"],
)
def test_unreadable_model_folder(tmp_path, job, capsys, tiny_llama, damage, message):
    broken = tmp_path / "model"
    shutil.copytree(tiny_llama, broken)
    damage(broken)
    job["model"]["path"] = str(broken)
    err = refused(tmp_path, job, capsys)
    assert f"model.path {broken}" in err and message in err


def test_a_spec_is_never_evaluated_as_code(tmp_path, capsys):
    marker = tmp_path / "ran"
    (tmp_path / "job.yaml").write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\n")
    code = main(["validate", str(tmp_path / "job.yaml")])
    err = capsys.readouterr().err
    assert code == 2 and "not valid YAML" in err and "Traceback" not in err
    assert not marker.exists()


def test_a_device_this_machine_lacks_is_refused_before_anything_is_written(tmp_path, job, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    job["executor"] = {"device": "cuda"}
    err = refused(tmp_path, job, capsys)  # run: exit 2, no output folder
    assert "executor.device is 'cuda' but no CUDA device is visible" in err
    path = tmp_path / "job.json"
    assert main(["validate", str(path)]) == 2
    assert "no CUDA device is visible" in capsys.readouterr().err
    job["executor"] = {"device": "cpu"}
    path.write_text(json.dumps(job))
    assert main(["run", str(path), "--no-progress"]) == 0  # the corrected run needs no --resume


def test_validate_names_the_error_rows_the_override_columns_and_the_clamped_rows(tmp_path, corpus, capsys):
    corpus["sampling"]["max_tokens"] = 1_000_000  # more than any prompt leaves room for: clamped
    path = tmp_path / "job.json"
    path.write_text(json.dumps(corpus))
    errors_file = tmp_path / "errors.jsonl"
    assert main(["validate", str(path), "--errors", str(errors_file)]) == 0
    out = capsys.readouterr().out
    # min_tokens 9 fits under the larger max_tokens: that row is valid here
    bad = [(row_id, error) for row_id, _, _, error in ROWS if error and row_id != "min-over-max"]
    assert f"{len(ROWS)} rows, " in out and f"{len(bad)} would be error rows" in out
    assert "1 error row(s) prompt_too_large: ids 'huge'" in out
    assert "error row(s) invalid_sampling: ids 'neg-temperature', 'zero-top-p', 'big-top-p', ..." in out
    assert "per-row sampling from input columns: max_tokens, temperature, top_p, n, repetition_penalty, " in out
    assert "row(s) get max_tokens clamped to fit the model's context" in out
    written = [json.loads(line) for line in errors_file.read_text().splitlines()]
    assert sorted((w["id"], w["code"]) for w in written) == sorted(bad)
    assert not (tmp_path / "out").exists()
