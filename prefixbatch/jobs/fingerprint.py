"""A job's fingerprint: what decides its output, stored with the output so a resume can check it.

Two runs with equal fingerprints produce the same rows (greedy: the same tokens; sampled:
the same seeds), so a resume may keep the first run's commits. Every field is compared on
its own, and a refusal names each field that differs, with its old and new value.

- `model`: config files and every weight file hashed (SHA-256; a weight file's digest is
  cached by path, size and mtime, so a large checkpoint is read once, not on every run —
  `file_digests`), the dtype, the Hub revision.
- `tokenizer`: every tokenizer and chat-template file hashed, and the spec's chat_template mode.
- `input`: each input file's URL, size and modification tag (ETag or mtime), and every input
  setting that changes a row (columns, format, truncation, limits) — never the storage
  options, which may hold credentials.
- `executor`: what changes the numbers a row is computed with: the executor kind and device,
  batch invariance, vLLM's context length.
- `sampling`: the spec's sampling defaults.
- `prefixbatch`: the version.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import prefixbatch
from prefixbatch.file_digests import file_sha256
from prefixbatch.jobs.spec import JobSpec
from prefixbatch.model_folder import gguf_source
from prefixbatch.pipeline.reader import InputFile

CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)


# Input settings that never change a row: where the files are (the files themselves are in
# the fingerprint), how to reach them (may hold secrets), and whether unreadable ones are skipped.
_INPUT_NOT_ROWS = {"path", "storage_options", "ignore_corrupt_files"}


def job_fingerprint(spec: JobSpec, files: list[InputFile]) -> dict[str, Any]:
    folder = Path(spec.model.path)
    return {
        "model": {
            **_hashes(folder, CONFIG_FILES),
            "weights": _weights(folder),
            "dtype": spec.model.dtype,
            "revision": spec.model.revision,  # the Hub commit a Hub id resolved to
        },
        "task": spec.task,
        "tokenizer": {**_hashes(folder, TOKENIZER_FILES), "chat_template": spec.model.chat_template},
        "input": {
            "files": [{"url": f.url, "size": f.size, "modified": f.modified} for f in files],
            **spec.input.model_dump(mode="json", exclude=_INPUT_NOT_ROWS),
        },
        "executor": {
            "kind": spec.executor.kind,
            "device": spec.executor.device,
            "native.batch_invariant": spec.executor.native.batch_invariant,
            "vllm.max_model_len": spec.executor.vllm.max_model_len,
        },
        "sampling": spec.sampling.model_dump(mode="json"),
        "prefixbatch": prefixbatch.__version__,
    }


def _weights(folder: Path) -> dict[str, str]:
    """Each weight file's SHA-256; for a folder made from a GGUF file, that file's (its weights
    are made from it, and `validate` sees the folder before they are)."""
    gguf = gguf_source(str(folder))
    if gguf is not None:
        return {Path(gguf["file"]).name: gguf["sha256"]}
    return {p.name: file_sha256(p) for p in sorted(folder.glob("*.safetensors"))}


def _hashes(folder: Path, names: tuple[str, ...]) -> dict[str, str]:
    return {
        name: hashlib.sha256((folder / name).read_bytes()).hexdigest()
        for name in names
        if (folder / name).is_file()
    }


__all__ = ["job_fingerprint"]
