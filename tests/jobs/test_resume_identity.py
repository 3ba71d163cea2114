"""A resume keeps an earlier run's rows only when that run was the same job: same weights (by
content), same settings that change a row. Every refusal names the fields that differ, with
their old and new values, and changes nothing in the folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file

from prefixbatch.jobs.cli import main
from prefixbatch.jobs.fingerprint import job_fingerprint
from prefixbatch.jobs.spec import spec_from_dict
from prefixbatch.pipeline.commits import OutputFolder
from prefixbatch.pipeline.reader import InputFile


@pytest.fixture
def finished(tmp_path, tiny_llama, monkeypatch, capsys):
    """A finished run in tmp_path/out, its model a copy in tmp_path/model; (spec file, folder contents)."""
    monkeypatch.setenv("PREFIXBATCH_CACHE", str(tmp_path / "cache"))
    shutil.copytree(tiny_llama, tmp_path / "model")
    messages = [[{"role": "user", "content": text}] for text in ("hello there", "general kenobi")]
    pq.write_table(pa.table({"id": ["a", "b"], "prompt": ["hello there", "general kenobi"], "messages": messages}),
                   tmp_path / "in.parquet")
    spec = {
        "name": "identity",
        "input": {"path": "in.parquet", "prompt_column": "prompt"},
        "output": {"path": "out"},
        "model": {"path": "model"},
        "sampling": {"max_tokens": 3},
    }
    (tmp_path / "job.json").write_text(json.dumps(spec))
    assert main(["run", str(tmp_path / "job.json"), "--no-progress"]) == 0
    capsys.readouterr()
    return tmp_path / "job.json", contents(tmp_path / "out")


def contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def refused(spec: Path, capsys, *overrides: str) -> str:
    sets = [arg for o in overrides for arg in ("--set", o)]
    assert main(["run", str(spec), "--resume", "--no-progress", *sets]) == 2
    err = capsys.readouterr().err
    assert "holds the output of a different job, so it cannot be resumed" in err and "Traceback" not in err
    return err


def test_same_shape_other_weights_are_refused_naming_the_weights(finished, tmp_path, capsys):
    spec, before = finished
    weights = load_file(tmp_path / "model" / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"] + 0.01  # a fine-tune of the same shape
    save_file(weights, tmp_path / "model" / "model.safetensors", metadata={"format": "pt"})
    err = refused(spec, capsys)
    assert "model.weights.model.safetensors was '" in err
    assert contents(tmp_path / "out") == before
    assert main(["run", str(spec), "--resume", "--no-progress", "--set", "model.path=" + str(Path(spec).parent / "model")]) == 2


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["input.truncate=left"], "input.truncate was 'none', now 'left'"),
        (["input.max_tokens_overflow=error"], "input.max_tokens_overflow was 'clamp', now 'error'"),
        (["input.max_prompt_chars=5000"], "input.max_prompt_chars was 1000000, now 5000"),
        (["input.prompt_column=null", "input.messages_column=messages"],
         "input.messages_column was None, now 'messages'; input.prompt_column was 'prompt', now None"),
        (["executor.kind=hf"], "executor.kind was 'auto', now 'hf'"),
        (["executor.native.batch_invariant=true"], "executor.native.batch_invariant was False, now True"),
        (["executor.vllm.max_model_len=256"], "executor.vllm.max_model_len was None, now 256"),
        (["model.dtype=bfloat16"], "model.dtype was 'auto', now 'bfloat16'"),
    ],
)
def test_each_setting_that_changes_a_row_is_refused_naming_the_field(finished, tmp_path, capsys, overrides, named):
    spec, before = finished
    assert named in refused(spec, capsys, *overrides)
    assert contents(tmp_path / "out") == before


def test_the_input_format_is_in_the_fingerprint(tmp_path, tiny_llama, monkeypatch):
    # The same file read as plain JSON Lines or as OpenAI Batch requests: other rows.
    monkeypatch.setenv("PREFIXBATCH_CACHE", str(tmp_path / "cache"))
    files = [InputFile(str(tmp_path / "in.jsonl"), 10, "1", 1, 0, pa.schema([]))]
    base = {"name": "f", "output": {"path": str(tmp_path / "out")}, "model": {"path": str(tiny_llama)}}
    openai = spec_from_dict({**base, "input": {"path": "in.jsonl", "format": "openai"}}, base_dir=tmp_path, source="t")
    plain = spec_from_dict({**base, "input": {"path": "in.jsonl", "messages_column": "messages", "id_column": "custom_id"}},
                           base_dir=tmp_path, source="t")
    OutputFolder(str(tmp_path / "out"), mode="error").open(job_fingerprint(openai, files))
    with pytest.raises(Exception, match="input.format was 'openai', now 'auto'"):
        OutputFolder(str(tmp_path / "out"), mode="resume").check(job_fingerprint(plain, files))


def test_the_fingerprint_holds_no_credentials(tmp_path, tiny_llama, monkeypatch):
    monkeypatch.setenv("PREFIXBATCH_CACHE", str(tmp_path / "cache"))
    spec = spec_from_dict(
        {"name": "s", "output": {"path": "out"}, "model": {"path": str(tiny_llama)},
         "input": {"path": "s3://b/x.parquet", "prompt_column": "p", "storage_options": {"secret": "hunter2"}}},
        base_dir=tmp_path, source="t",
    )
    assert "hunter2" not in json.dumps(job_fingerprint(spec, []))
    assert torch  # the weights are hashed by content: a real safetensors file of the tiny model
    assert len(job_fingerprint(spec, [])["model"]["weights"]["model.safetensors"]) == 64
