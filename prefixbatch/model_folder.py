"""A Hugging Face model folder, read without torch: checks, config, and memory arithmetic.

At the bottom of the layers so that the tokenizer (`pipeline`), the planner's KV sizing
(`jobs.planning`) and the executors all read the folder the same way. Checks run before
anything slow so that a wrong `model.path` fails in a second with a message that
says what is missing. Weights must be safetensors: pickle checkpoints can run code on load.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from prefixbatch.errors import ModelError

# `org/name` as the Hub spells repository ids: one slash, no leading dot or slash.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
# What a checkpoint needs; never pickled weights (*.bin, *.pt), which are refused anyway.
_HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


def is_hub_id(path: str) -> bool:
    """Whether `path` reads as a Hugging Face Hub id (`org/name`) rather than a folder path."""
    return bool(_HUB_ID.match(path)) and ".." not in path


def resolve_model_path(path: str, revision: str | None = None) -> tuple[str, str | None]:
    """(a local folder holding the model, the Hub commit it came from or None).

    A folder that exists is used as it is. A Hub id is fetched with `huggingface_hub` into its
    cache (only config, tokenizer and safetensors files), or found there when offline
    (`HF_HUB_OFFLINE=1`) or when the Hub cannot be reached; else a `ModelError` says where it
    looked and how to download it.
    """
    if Path(path).is_dir() or not is_hub_id(path):
        return path, None
    from huggingface_hub import constants, snapshot_download  # only for Hub ids

    wanted = f"{path}" + (f" (revision {revision})" if revision else "")
    reasons = []
    for local_only in ([True] if constants.HF_HUB_OFFLINE else [False, True]):
        try:
            folder = snapshot_download(path, revision=revision, allow_patterns=_HUB_FILES, local_files_only=local_only)
        except Exception as exc:  # network errors, unknown repos, gated models, missing cache entries
            reasons.append(f"{'cache' if local_only else 'download'}: {type(exc).__name__}: {str(exc).splitlines()[0]}")
            continue
        return folder, Path(folder).name
    offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
    msg = (
        f"model.path {path}: no such folder, and the Hugging Face Hub model {wanted} could not be"
        f" found in the cache {constants.HF_HUB_CACHE} or downloaded{offline} — {'; '.join(reasons)}."
        f" Download it where the network allows (`huggingface-cli download {path}`, same HF_HOME),"
        " or set model.path to a local model folder"
    )
    raise ModelError(msg)


def model_name(path: str) -> str:
    """The name a model folder goes by: its Hub id when it is a snapshot in the Hub's cache
    (`models--org--name/snapshots/<commit>`, what `resolve_model_path` returns), else the
    folder's own name."""
    folder = Path(path)
    repo = folder.parent.parent.name
    if folder.parent.name == "snapshots" and repo.startswith("models--"):
        return repo[len("models--") :].replace("--", "/")
    return folder.name


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


# Written into a folder made from a GGUF file (`executors.gguf`): which file, its SHA-256,
# architecture and tensor types. Its weights are written only when a run needs them.
GGUF_MARKER = "prefixbatch_gguf.json"


def gguf_source(path: str) -> dict | None:
    """The GGUF file a folder was made from (`executors.gguf.GgufInfo` as a dict), or None."""
    marker = Path(path) / GGUF_MARKER
    try:
        return json.loads(marker.read_text(encoding="utf-8")) if marker.is_file() else None
    except (OSError, ValueError):
        return None


def check_model_folder(path: str) -> dict:
    """The folder's config, after checking that safetensors weights are present (or, for a
    folder made from a GGUF file, that they will be: dequantized when a run needs them)."""
    config = read_config(path)
    folder = Path(path)
    if not any(folder.glob("*.safetensors")) and gguf_source(path) is None:
        pickled = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
        found = f"; found only {', '.join(pickled)} (pickle, refused for safety)" if pickled else ""
        raise ModelError(f"model.path {path}: no *.safetensors weights in this folder{found}")
    return config


def eos_token_ids(path: str, tokenizer: object = None) -> tuple[int, ...]:
    """The ids that end generation: generation_config.json's eos (one id or a list), else
    config.json's, else the tokenizer's (when one is given)."""
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
    eos = getattr(tokenizer, "eos_token_id", None)
    return () if eos is None else (eos,)


def kv_bytes_per_token(config: dict, dtype_bytes: int) -> int:
    """Bytes of KV cache one token takes: keys and values, every layer, every KV head."""
    config = config.get("text_config", config)
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    kv_heads = config.get("num_key_value_heads") or heads
    return 2 * config["num_hidden_layers"] * kv_heads * head_dim * dtype_bytes


def weights_bytes(path: str, config: dict, dtype_bytes: int) -> int:
    """Bytes the weights take in `dtype_bytes` per value, from the safetensors headers (no weights read)."""
    count = 0
    for file in sorted(Path(path).glob("*.safetensors")):
        with open(file, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        for name, tensor in header.items():
            if name != "__metadata__":
                count += math.prod(tensor["shape"])
    return count * dtype_bytes


def kv_budget_for_memory(*, free_bytes: int, weights_bytes: int, bytes_per_token: int, reserve: float = 0.1) -> int:
    """KV tokens that fit in device memory once the weights are in, keeping `reserve` of what
    is left for activations and logits."""
    left = (free_bytes - weights_bytes) * (1.0 - reserve)
    tokens = int(left // bytes_per_token)
    if tokens < 1:
        msg = (
            f"the device has {free_bytes / 2**30:.1f} GiB free and the weights take"
            f" {weights_bytes / 2**30:.1f} GiB: no room for a KV cache; use a smaller dtype, a"
            " larger device, or set executor.kv_budget_tokens"
        )
        raise ModelError(msg)
    return tokens
