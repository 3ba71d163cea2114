"""The CLI's answers to a user's mistakes: exit code 2, one message, no traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prefixbatch.jobs.cli import main


@pytest.fixture
def job(tmp_path, tiny_llama) -> dict:
    pq.write_table(pa.table({"id": ["a", "b"], "prompt": ["hello there", "general kenobi"]}), tmp_path / "in.parquet")
    return {
        "name": "cli",
        "input": {"path": "in.parquet", "prompt_column": "prompt"},
        "output": {"path": "out"},
        "model": {"path": str(tiny_llama)},
        "sampling": {"max_tokens": 4},
    }


def spec_file(folder: Path, spec: dict) -> Path:
    path = folder / "job.json"
    path.write_text(json.dumps(spec))
    return path


def run_cli(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def test_unknown_field(tmp_path, job, capsys):
    spec = spec_file(tmp_path, {**job, "sampling": {"max_tokens": 4, "temprature": 0.5}})
    code, err = run_cli(capsys, "run", str(spec))
    assert code == 2
    assert f"error: {spec}: invalid job spec" in err
    assert "sampling.temprature: unknown field (did you mean 'temperature'?)" in err


def test_wrong_type(tmp_path, job, capsys):
    spec = spec_file(tmp_path, {**job, "sampling": {"max_tokens": "lots"}})
    code, err = run_cli(capsys, "validate", str(spec))
    assert code == 2
    assert "sampling.max_tokens: Input should be a valid integer" in err and "'lots'" in err


def test_missing_input_file(tmp_path, job, capsys):
    spec = spec_file(tmp_path, {**job, "input": {"path": "nope.parquet", "prompt_column": "prompt"}})
    code, err = run_cli(capsys, "run", str(spec))
    assert code == 2
    assert str(tmp_path / "nope.parquet") in err
    assert not (tmp_path / "out").exists()  # nothing written for a job that cannot start


def test_missing_column(tmp_path, job, capsys):
    spec = spec_file(tmp_path, {**job, "input": {"path": "in.parquet", "prompt_column": "question"}})
    code, err = run_cli(capsys, "run", str(spec))
    assert code == 2
    assert str(tmp_path / "in.parquet") in err and "'question'" in err


def test_missing_model_folder(tmp_path, job, capsys):
    spec = spec_file(tmp_path, {**job, "model": {"path": "no-such-model"}})
    code, err = run_cli(capsys, "run", str(spec))
    assert code == 2
    assert f"model.path {tmp_path / 'no-such-model'}: no such folder" in err


def test_model_folder_without_safetensors(tmp_path, job, capsys):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"")
    spec = spec_file(tmp_path, {**job, "model": {"path": "m"}})
    code, err = run_cli(capsys, "run", str(spec))
    assert code == 2
    assert "no *.safetensors weights" in err and "pytorch_model.bin" in err


def test_non_empty_output_is_refused_then_overwritten(tmp_path, job, capsys):
    spec = spec_file(tmp_path, job)
    assert run_cli(capsys, "run", str(spec), "--no-progress")[0] == 0
    code, err = run_cli(capsys, "run", str(spec), "--no-progress")
    assert code == 2 and str(tmp_path / "out") in err and "overwrite" in err
    assert run_cli(capsys, "run", str(spec), "--no-progress", "--overwrite")[0] == 0


def test_overwrite_never_deletes_files_prefixbatch_did_not_write(tmp_path, job, capsys):
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    (out / "sub" / "important.csv").write_text("a,b")
    spec = spec_file(tmp_path, job)
    code, err = run_cli(capsys, "run", str(spec), "--no-progress")
    assert code == 2 and "is not empty; choose an empty folder or a new one" in err
    assert "--overwrite" not in err and "mode: overwrite" not in err  # following our advice must never delete a user's file
    code, err = run_cli(capsys, "run", str(spec), "--no-progress", "--overwrite")
    assert code == 2 and "has no _job.json, so no prefixbatch job wrote it (notes.txt, sub/)" in err
    assert "nothing was deleted" in err
    assert sorted(p.name for p in out.rglob("*")) == ["important.csv", "notes.txt", "sub"]

    (out / "notes.txt").unlink()
    (out / "sub" / "important.csv").unlink()
    (out / "sub").rmdir()
    assert run_cli(capsys, "run", str(spec), "--no-progress")[0] == 0
    (out / "notes.txt").write_text("added after the job")
    code, err = run_cli(capsys, "run", str(spec), "--no-progress", "--overwrite")
    assert code == 2 and "holds files that prefixbatch did not write (notes.txt)" in err
    assert (out / "notes.txt").read_text() == "added after the job" and (out / "_SUCCESS").exists()
    (out / "notes.txt").unlink()
    assert run_cli(capsys, "run", str(spec), "--no-progress", "--overwrite")[0] == 0


def test_a_job_never_writes_over_its_own_input(tmp_path, job, capsys):
    # The first job's output read back as the next job's input, written to the same folder.
    assert run_cli(capsys, "run", str(spec_file(tmp_path, job)), "--no-progress")[0] == 0
    out = tmp_path / "out"
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    again = {**job, "input": {"path": "out/part-*.parquet", "prompt_column": "output_text"}}
    spec = spec_file(tmp_path, again)
    for flags in (["--overwrite"], ["--resume"], []):
        code, err = run_cli(capsys, "run", str(spec), "--no-progress", *flags)
        assert code == 2, flags
        assert f"is inside the output folder {out}: the run would overwrite or delete its own input" in err
        assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert run_cli(capsys, "validate", str(spec))[0] == 2
    # Through a link to the folder, too.
    (tmp_path / "link").symlink_to(out)
    linked = spec_file(tmp_path, {**again, "input": {**again["input"], "path": "link/part-*.parquet"}})
    assert run_cli(capsys, "run", str(linked), "--no-progress", "--overwrite")[0] == 2
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # A glob from outside that matches a file inside: refused once the files are listed.
    (out / "prompts.parquet").write_bytes((tmp_path / "in.parquet").read_bytes())
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    wide = spec_file(tmp_path, {**job, "input": {**job["input"], "path": "*/prompts.parquet"}})
    code, err = run_cli(capsys, "run", str(wide), "--no-progress", "--resume")
    assert code == 2 and f"input file {out}/prompts.parquet is inside the output folder {out}" in err
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_validate_and_plan_load_no_weights(tmp_path, job, capsys):
    spec = spec_file(tmp_path, job)
    assert main(["validate", str(spec)]) == 0
    assert "2 rows" in capsys.readouterr().out
    assert main(["plan", str(spec), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rows"] == 2 and report["prompt_tokens"] > 0 and report["longest_prompt_tokens"] > 0


def test_the_installed_command_exits_2_without_traceback(tmp_path, job):
    spec = spec_file(tmp_path, {**job, "bogus": 1})
    result = subprocess.run(
        [sys.executable, "-m", "prefixbatch", "run", str(spec)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert "bogus: unknown field" in result.stderr and "Traceback" not in result.stderr
    debug = subprocess.run(
        [sys.executable, "-m", "prefixbatch", "--debug", "run", str(spec)], capture_output=True, text=True, timeout=120
    )
    assert debug.returncode == 2 and "Traceback" in debug.stderr


def test_make_test_model_command_writes_a_loadable_checkpoint(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert main(["make-test-model", str(tmp_path / "m"), "--arch", "qwen2", "--seed", "3"]) == 0
    assert "wrote a tiny qwen2 test model" in capsys.readouterr().out
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert model.config.model_type == "qwen2" and tokenizer.chat_template
    outputs = []
    for prompt in ("The library opens at nine.", "Bicycles need oil on the chain."):
        ids = tokenizer(prompt, return_tensors="pt")
        outputs.append(model.generate(**ids, do_sample=False, max_new_tokens=8)[0, ids["input_ids"].shape[1]:].tolist())
    assert outputs[0] != outputs[1]


def test_make_test_model_never_writes_into_a_folder_that_holds_anything(tmp_path, capsys, tiny_llama):
    # A real checkpoint folder named by mistake: every file stays as it was, byte for byte.
    real = tmp_path / "my-finetune"
    real.mkdir()
    for name in ("config.json", "tokenizer.json", "model-00001-of-00002.safetensors"):
        (real / name).write_bytes((tiny_llama / name).read_bytes() if (tiny_llama / name).exists() else b"shard")
    before = {p.name: p.read_bytes() for p in real.iterdir()}
    code, err = run_cli(capsys, "make-test-model", str(real))
    assert code == 2
    assert f"{real} is not empty (config.json, model-00001-of-00002.safetensors, tokenizer.json)" in err
    assert "nothing was written" in err
    assert {p.name: p.read_bytes() for p in real.iterdir()} == before
    (tmp_path / "a-file").write_text("mine")
    code, err = run_cli(capsys, "make-test-model", str(tmp_path / "a-file"))
    assert code == 2 and "is a file" in err and (tmp_path / "a-file").read_text() == "mine"
    (tmp_path / "empty").mkdir()
    assert run_cli(capsys, "make-test-model", str(tmp_path / "empty"))[0] == 0


def test_make_test_model_rejects_an_unknown_arch(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["make-test-model", str(tmp_path / "m"), "--arch", "gpt2"])
    assert info.value.code == 2
    assert "invalid choice: 'gpt2'" in capsys.readouterr().err


@pytest.mark.parametrize("address", ["tcp://127.0.0.1:9", "not an address"])
def test_unreachable_dask_scheduler(tmp_path, job, capsys, address):
    cluster = {"kind": "dask", "address": address, "connect_timeout_s": 2}
    spec = spec_file(tmp_path, {**job, "cluster": cluster})
    code, err = run_cli(capsys, "run", str(spec))
    assert code == 2
    assert f"error: cluster.address {address}: cannot reach the Dask scheduler" in err
