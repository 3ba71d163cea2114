"""Loads a Hugging Face safetensors checkpoint (one file or sharded) into a native `CausalLM`.

Each checkpoint tensor has exactly one destination: a whole parameter, or a row band of a
fused one (q/k/v → `qkv_proj`, gate/up → `gate_up_proj`). The loader builds that map from
the model's own parameters, then streams the files and copies each tensor into its place,
converting dtype and device on the way. It is strict both ways, because a silently missing
or ignored tensor gives wrong numbers, not an error:
- a tensor with no destination (say a bias the config does not announce) is a `ModelError`;
- a destination left unfilled (say a missing lm_head on an untied model) is a `ModelError`.
The only tensors skipped on purpose: `lm_head.weight` when tied to the embedding (some
checkpoints save the copy) and old checkpoints' `rotary_emb.inv_freq` buffers (recomputed).

Only safetensors are read: pickle checkpoints (`*.bin`, `*.pt`) can run code when loaded.

in → out: model folder → `CausalLM` on (dtype, device), every parameter set.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from prefixbatch.errors import ModelError
from prefixbatch.executors.native.config import ModelConfig, model_config_from_hf
from prefixbatch.executors.native.model import CausalLM
from prefixbatch.model_folder import check_model_folder

__all__ = ["load_model", "read_model_config", "safetensors_files"]

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Fused parameter → the checkpoint projections it concatenates, in row order.
FUSED = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}


def read_model_config(path: str | Path) -> ModelConfig:
    """The folder's `ModelConfig`, after checking it holds safetensors weights."""
    config = check_model_folder(str(path))
    return model_config_from_hf(config, source=f"model.path {path}: config.json")


def load_model(path: str | Path, *, dtype: torch.dtype, device: torch.device | str) -> CausalLM:
    """The checkpoint in `path` as a native model, weights in `dtype` on `device`."""
    config = read_model_config(path)
    model = CausalLM(config, dtype=dtype, device=device)
    load_weights(model, Path(path))
    return model.eval()


def load_weights(model: CausalLM, folder: Path) -> None:
    """Fills every parameter of `model` from the folder's safetensors files."""
    targets = _checkpoint_targets(model)
    filled: set[str] = set()
    for name, tensor in _read_tensors(folder):
        if _is_skipped(name, model.config):
            continue
        target = targets.get(name)
        if target is None:
            raise ModelError(
                f"model.path {folder}: tensor {name!r} has no place in a {model.config.model_type} model with this config.json"
            )
        if target.shape != tensor.shape:
            raise ModelError(
                f"model.path {folder}: tensor {name!r} has shape {tuple(tensor.shape)}, config.json implies {tuple(target.shape)}"
            )
        with torch.no_grad():
            target.copy_(tensor)  # converts dtype, moves to the model's device
        filled.add(name)
    missing = sorted(set(targets) - filled)
    if missing:
        shown = ", ".join(missing[:5]) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        raise ModelError(
            f"model.path {folder}: the checkpoint lacks {len(missing)} tensors the model needs: {shown}"
        )


def _checkpoint_targets(model: CausalLM) -> dict[str, torch.Tensor]:
    """Checkpoint tensor name → the view of our parameter it must be copied into."""
    targets = {}
    # named_parameters lists a tied lm_head once, as the embedding.
    for name, param in model.named_parameters():
        module_name, _, kind = name.rpartition(".")  # kind: weight | bias
        fused = next((f for f in FUSED if module_name.endswith(f)), None)
        if fused is None:
            targets[_checkpoint_name(name)] = param.data
            continue
        prefix = module_name[: -len(fused)]
        parts = FUSED[fused]
        sizes = _fused_sizes(model.config, fused)
        for part, rows in zip(parts, param.data.split(sizes, dim=0)):
            targets[_checkpoint_name(f"{prefix}{part}.{kind}")] = rows
    return targets


def _fused_sizes(config: ModelConfig, fused: str) -> list[int]:
    if fused == "mlp.gate_up_proj":
        return [config.intermediate_size] * 2
    kv_size = config.num_kv_heads * config.head_dim
    return [config.num_heads * config.head_dim, kv_size, kv_size]


def _checkpoint_name(name: str) -> str:
    # Our modules mirror the checkpoint's, minus the `model.` wrapper around the decoder.
    if name == "embed_tokens":
        return "model.embed_tokens.weight"
    return name if name.startswith("lm_head.") else f"model.{name}"


def _is_skipped(name: str, config: ModelConfig) -> bool:
    if name.endswith("rotary_emb.inv_freq"):
        return True
    return config.tie_word_embeddings and name == "lm_head.weight"


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files of the folder: those its index lists, else `model.safetensors`."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelError(
                f"model.path {folder}: {INDEX_FILE} is not a readable index: {exc}"
            ) from None
        return [folder / name for name in sorted(set(weight_map.values()))]
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    found = sorted(p.name for p in folder.glob("*.safetensors"))
    if len(found) == 1:
        return [folder / found[0]]
    raise ModelError(f"model.path {folder}: expected {SINGLE_FILE} or {INDEX_FILE}, found {found}")


def _read_tensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    for file in safetensors_files(folder):
        if not file.is_file():
            raise ModelError(
                f"model.path {folder}: {INDEX_FILE} lists {file.name}, which is missing"
            )
        try:
            with safe_open(file, framework="pt", device="cpu") as weights:
                for name in weights.keys():  # noqa: SIM118 (safe_open is not iterable)
                    yield name, weights.get_tensor(name)
        except (OSError, RuntimeError, ValueError, SafetensorError) as exc:
            # A corrupt header or a truncated file (an interrupted download).
            raise ModelError(f"model.path {folder}: cannot read {file.name}: {exc}") from exc
