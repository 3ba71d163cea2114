"""A job's fingerprint: what decides its output, stored with the output so a resume can check it.

Two runs with equal fingerprints produce the same rows (greedy: the same tokens; sampled:
the same seeds), so a resume may keep the first run's commits. Each section is compared
on its own, and a refusal names the sections that differ.

- `model`: config files hashed; weight files by name and size (hashing gigabytes of
  safetensors on every run would cost minutes); the dtype.
- `tokenizer`: every tokenizer and chat-template file hashed, and the spec's chat_template mode.
- `input`: each input file's URL, size and modification tag (ETag or mtime), and the
  columns read.
- `sampling`: the spec's sampling defaults.
- `prefixbatch`: the version.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import prefixbatch
from prefixbatch.jobs.spec import JobSpec
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


def job_fingerprint(spec: JobSpec, files: list[InputFile]) -> dict[str, Any]:
    folder = Path(spec.model.path)
    return {
        "model": {
            **_hashes(folder, CONFIG_FILES),
            "weights": {p.name: p.stat().st_size for p in sorted(folder.glob("*.safetensors"))},
            "dtype": spec.model.dtype,
            "revision": spec.model.revision,  # the Hub commit a Hub id resolved to
        },
        "task": spec.task,
        "tokenizer": {**_hashes(folder, TOKENIZER_FILES), "chat_template": spec.model.chat_template},
        "input": {
            "files": [{"url": f.url, "size": f.size, "modified": f.modified} for f in files],
            "id_column": spec.input.id_column,
            "text_column": spec.input.text_column,
            "carry_columns": list(spec.input.carry_columns),
            "continuations_column": spec.input.continuations_column,
        },
        "sampling": spec.sampling.model_dump(mode="json"),
        "prefixbatch": prefixbatch.__version__,
    }


def _hashes(folder: Path, names: tuple[str, ...]) -> dict[str, str]:
    return {
        name: hashlib.sha256((folder / name).read_bytes()).hexdigest()
        for name in names
        if (folder / name).is_file()
    }


__all__ = ["job_fingerprint"]
