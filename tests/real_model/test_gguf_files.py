"""A `.gguf` file as `model.path`, as a user points prefixbatch at one: `validate` and `plan`
read its metadata only (no weights written), `run` works on every executor with the same
answers, `_job.json` names the file by SHA-256, and a bad file is one clear message."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from prefixbatch.jobs.cli import main
from prefixbatch.jobs.trained_model import GGUF_SHA256
from tests.output_helpers import finished_output
from tests.vllm_import import import_vllm

QUESTIONS = ["What is the capital of France?", "Name three primary colors."]


def write_job(folder: Path, model: Path, **executor) -> Path:
    messages = [[{"role": "user", "content": q}] for q in QUESTIONS]
    pq.write_table(pa.table({"id": ["a", "b"], "messages": messages}), folder / "in.parquet")
    spec = {
        "name": "gguf",
        "input": {"path": "in.parquet", "messages_column": "messages"},
        "output": {"path": "out"},
        "model": {"path": str(model)},
        "sampling": {"max_tokens": 16},
        "executor": {"device": "cpu", **executor},
    }
    (folder / "job.json").write_text(json.dumps(spec))
    return folder / "job.json"


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prefixbatch", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


def test_validate_and_plan_read_no_weights(tmp_path, smollm2_gguf):
    cache = tmp_path / "hub"
    spec = write_job(tmp_path, smollm2_gguf)
    validated = cli("validate", str(spec), env={"HF_HUB_CACHE": str(cache)})
    assert validated.returncode == 0, validated.stderr[-2000:]
    assert ("model: GGUF SmolLM2-135M-Instruct.Q4_1.gguf: llama, 135M parameters, tensors Q4_1 ×210, F32 ×61,"
            " Q8_0 ×1; dequantized once to fp32 safetensors (513 MiB)") in validated.stdout
    planned = cli("plan", str(spec), "--json", env={"HF_HUB_CACHE": str(cache)})
    assert planned.returncode == 0 and json.loads(planned.stdout)["rows"] == 2, planned.stderr[-2000:]
    (folder,) = cache.glob("prefixbatch-gguf--*")
    assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()
    assert not list(folder.glob("*.safetensors"))  # nothing dequantized
    assert not (tmp_path / "out").exists()


def test_run_on_a_gguf_path_gives_the_same_answers_on_every_executor(tmp_path, smollm2_gguf, smollm2):
    import_vllm()
    outputs = {}
    for kind in ("native", "hf", "vllm"):
        folder = tmp_path / kind
        folder.mkdir()
        vllm = {"vllm": {"cpu_kv_cache_gib": 1, "cpu_threads_bind": "nobind"}} if kind == "vllm" else {}
        assert main(["run", str(write_job(folder, smollm2_gguf, kind=kind, **vllm)), "--no-progress"]) == 0
        outputs[kind] = {row["id"]: row["output_token_ids"] for row in finished_output(str(folder / "out"))}
        job = json.loads((folder / "out" / "_job.json").read_text())
        assert job["model"]["weights"] == {"SmolLM2-135M-Instruct.Q4_1.gguf": GGUF_SHA256}
    assert outputs["native"] == outputs["hf"] == outputs["vllm"]
    texts = [row["output_text"] for row in sorted(finished_output(str(tmp_path / "native" / "out")), key=lambda r: r["id"])]
    assert "Paris" in texts[0]


def test_a_bad_gguf_file_is_one_clear_message(tmp_path, smollm2_gguf, capsys):
    truncated = tmp_path / "truncated.gguf"
    with open(smollm2_gguf, "rb") as source:
        truncated.write_bytes(source.read(1 << 20))
    other = tmp_path / "rwkv.gguf"  # a valid GGUF file of an architecture transformers cannot load
    writer = gguf.GGUFWriter(str(other), "rwkv6")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    for file, expected in [
        (truncated, f"model.path {truncated}: not a readable GGUF file"),
        (other, f"model.path {other}: GGUF architecture 'rwkv6' is not one transformers can load; supported:"),
        (tmp_path / "missing.gguf", f"model.path {tmp_path / 'missing.gguf'}: no such GGUF file"),
    ]:
        assert main(["validate", str(write_job(tmp_path, file))]) == 2
        err = capsys.readouterr().err
        assert expected in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
