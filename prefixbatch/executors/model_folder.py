"""Checks on a Hugging Face model folder that need no torch: config, weights, and their format.

Run before anything slow so that a wrong `model.path` fails in a second with a message that
says what is missing. Weights must be safetensors: pickle checkpoints can run code on load.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefixbatch.errors import ModelError


def read_config(path: str) -> dict:
    """The folder's config.json as a dict."""
    folder = Path(path)
    if not folder.is_dir():
        raise ModelError(f"model.path {path}: no such folder")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelError(f"model.path {path}: no config.json in this folder (is it a Hugging Face model folder?)")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"model.path {path}: config.json is not readable JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ModelError(f"model.path {path}: config.json must hold a JSON object")
    return config


def context_length(config: dict) -> int | None:
    """The longest sequence the model supports, if its config says."""
    config = config.get("text_config", config)
    value = config.get("max_position_embeddings")
    return value if isinstance(value, int) and value > 0 else None


def check_model_folder(path: str) -> dict:
    """The folder's config, after checking that safetensors weights are present."""
    config = read_config(path)
    folder = Path(path)
    if not any(folder.glob("*.safetensors")):
        pickled = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
        found = f"; found only {', '.join(pickled)} (pickle, refused for safety)" if pickled else ""
        raise ModelError(f"model.path {path}: no *.safetensors weights in this folder{found}")
    return config


def eos_token_ids(path: str) -> tuple[int, ...]:
    """The ids that end generation: generation_config.json's eos (one id or a list), else config.json's."""
    for name in ("generation_config.json", "config.json"):
        file = Path(path) / name
        if not file.is_file():
            continue
        try:
            eos = json.loads(file.read_text(encoding="utf-8")).get("eos_token_id")
        except (OSError, ValueError):
            continue
        if eos is not None:
            return tuple(eos) if isinstance(eos, list) else (int(eos),)
    return ()
