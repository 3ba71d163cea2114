"""`model.path` as a Hugging Face Hub id, resolved through `huggingface_hub`'s cache offline.

A real cache layout (`models--org--name/refs/main`, `snapshots/<commit>/`) is built from a
tiny checkpoint; with `HF_HUB_OFFLINE=1` the id resolves to that snapshot, the run records
the commit in its fingerprint, and an id that is in no cache is one clear message.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prefixbatch.jobs.cli import main
from prefixbatch.model_folder import is_hub_id, model_name
from tests.output_helpers import finished_output

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path: Path, tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hub"
    repo = cache / "models--acme--tiny-chat"
    shutil.copytree(tiny_llama, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def write_job(tmp_path: Path, model: str) -> Path:
    pq.write_table(pa.table({"id": [1, 2], "prompt": ["hello", "hello there"]}), tmp_path / "in.parquet")
    path = tmp_path / "job.json"
    path.write_text(json.dumps({"name": "hub", "input": {"path": "in.parquet", "prompt_column": "prompt"},
                                "output": {"path": "out"}, "model": {"path": model}, "sampling": {"max_tokens": 3}}))
    return path


def test_a_hub_id_runs_from_the_cache_offline(tmp_path: Path, hub_cache: Path, capsys) -> None:
    path = write_job(tmp_path, "acme/tiny-chat")
    assert main(["validate", str(path)]) == 0
    assert main(["run", str(path), "--no-progress"]) == 0
    assert len(finished_output(str(tmp_path / "out"))) == 2
    fingerprint = json.loads((tmp_path / "out" / "_job.json").read_text())
    assert COMMIT in json.dumps(fingerprint)


def test_a_local_folder_of_the_same_name_wins(tmp_path: Path, hub_cache: Path, tiny_llama: Path) -> None:
    shutil.copytree(tiny_llama, tmp_path / "acme" / "tiny-chat")
    path = write_job(tmp_path, "acme/tiny-chat")
    assert main(["run", str(path), "--no-progress"]) == 0
    fingerprint = json.loads((tmp_path / "out" / "_job.json").read_text())
    assert COMMIT not in json.dumps(fingerprint)


def test_an_id_in_no_cache_is_one_clear_message(tmp_path: Path, hub_cache: Path, capsys) -> None:
    path = write_job(tmp_path, "acme/not-downloaded")
    assert main(["run", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "model.path acme/not-downloaded: no such folder, and the Hugging Face Hub model acme/not-downloaded" in err
    assert str(hub_cache) in err and "HF_HUB_OFFLINE is set" in err and "huggingface-cli download acme/not-downloaded" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("path", "expected"),
    [("Qwen/Qwen2.5-0.5B-Instruct", True), ("meta-llama/Llama-3.2-1B", True), ("./models/x", False),
     ("/abs/path", False), ("models/x/y", False), ("../up/x", False), ("just-a-folder", False)],
)
def test_what_reads_as_a_hub_id(path: str, expected: bool) -> None:
    assert is_hub_id(path) is expected


def test_a_cache_snapshot_is_named_by_its_hub_id(tmp_path):
    snapshot = tmp_path / "models--acme--tiny-chat" / "snapshots" / "0123abcd"
    assert model_name(str(snapshot)) == "acme/tiny-chat"  # what OpenAI output lines call it
    assert model_name(str(tmp_path / "my-model")) == "my-model"
    assert model_name(str(tmp_path / "snapshots" / "x")) == "x"  # not a Hub cache layout
