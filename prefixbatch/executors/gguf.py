"""GGUF files (llama.cpp, Ollama, LM Studio) as a model source: dequantized once into a cached
Hugging Face folder that every executor reads like a downloaded checkpoint.

A `.gguf` file holds a model's config, tokenizer, chat template and (mostly quantized)
weights. `gguf_model_folder(file)` makes `<Hub cache>/prefixbatch-gguf--<stem>--<sha256[:16]>`:
first its metadata part (config.json, generation_config.json, tokenizer files, chat template
and `prefixbatch_gguf.json`, which says where it came from), read from the file's metadata in
seconds; then, only when asked (`weights=True`: a run, never `validate` or `plan`), its
weights, dequantized to fp32 through transformers' GGUF loader and written as
`model.safetensors` (a tied embedding once). Each part appears whole or not at all (written
aside, then renamed), so a killed dequantization leaves nothing half-made, and the key is
the file's content, so an edited file is a new folder.

Invariants: the folder depends only on the file's bytes and the transformers version that
read it; `describe_gguf` reads the header alone (memory-mapped: no weights are read).

in → out: a `.gguf` path → `GgufInfo` (describe) / a Hugging Face model folder.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from prefixbatch.errors import ModelError
from prefixbatch.file_digests import file_sha256
from prefixbatch.model_folder import GGUF_MARKER

__all__ = ["GgufInfo", "describe_gguf", "gguf_model_folder", "is_gguf_path"]

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"


@dataclass(frozen=True)
class GgufInfo:
    """What a GGUF file holds, from its header."""

    file: str
    sha256: str
    architecture: str  # general.architecture: llama, qwen2, ...
    quantization: dict[str, int]  # tensor type → number of tensors, e.g. {"Q4_1": 210, "F32": 61}
    num_parameters: int
    dequantized_bytes: int  # the fp32 safetensors `run` writes

    def summary(self) -> str:
        types = ", ".join(f"{name} ×{count}" for name, count in sorted(self.quantization.items(), key=lambda kv: -kv[1]))
        return (
            f"GGUF {Path(self.file).name}: {self.architecture}, {self.num_parameters / 1e6:.0f}M parameters,"
            f" tensors {types}; dequantized once to fp32 safetensors ({self.dequantized_bytes / 2**20:.0f} MiB)"
        )


def is_gguf_path(path: str) -> bool:
    return path.lower().endswith(".gguf")


def describe_gguf(file: str | Path) -> GgufInfo:
    """The file's architecture, tensor types and sizes; a `ModelError` where it is not a GGUF
    file transformers can dequantize (truncated, another format, an architecture or tensor
    type it does not know)."""
    file = Path(file)
    if not file.is_file():
        raise ModelError(f"model.path {file}: no such GGUF file")
    reader = _reader(file)
    architecture = _field(reader, "general.architecture")
    if not isinstance(architecture, str):
        raise ModelError(f"model.path {file}: the GGUF file names no architecture (general.architecture)")
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    if architecture not in GGUF_SUPPORTED_ARCHITECTURES:
        msg = (
            f"model.path {file}: GGUF architecture {architecture!r} is not one transformers can load;"
            f" supported: {', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))}"
        )
        raise ModelError(msg)
    types = Counter(tensor.tensor_type.name for tensor in reader.tensors)
    unknown = sorted(set(types) - _dequantizable())
    if unknown:
        raise ModelError(f"model.path {file}: GGUF tensor types {', '.join(unknown)} cannot be dequantized here")
    num_parameters = sum(int(tensor.n_elements) for tensor in reader.tensors)
    return GgufInfo(str(file), file_sha256(file), architecture, dict(types), num_parameters, 4 * num_parameters)


def gguf_model_folder(file: str | Path, *, weights: bool) -> Path:
    """The cached Hugging Face folder made from `file`: its metadata part always, its weights
    too when `weights` (dequantized the first time: seconds to minutes, said in the log)."""
    info = describe_gguf(file)
    folder = _cache_root() / f"prefixbatch-gguf--{Path(info.file).stem}--{info.sha256[:16]}"
    if not (folder / GGUF_MARKER).is_file():
        _make_aside(folder, lambda scratch: _write_metadata(info, scratch))
    if weights and not (folder / WEIGHTS).is_file():
        log.warning("dequantizing %s once into %s", info.file, folder)
        _write_weights(info, folder)
    return folder


def _reader(file: Path):
    try:
        import gguf
    except ImportError:
        raise ModelError(f"model.path {file}: reading GGUF files needs the `gguf` package (pip install gguf)") from None
    try:
        return gguf.GGUFReader(str(file))
    except Exception as error:  # a truncated file, another format: gguf raises ValueError and friends
        raise ModelError(f"model.path {file}: not a readable GGUF file ({type(error).__name__}: {error})") from None


def _field(reader, name: str):
    field = reader.fields.get(name)
    if field is None or not field.data:
        return None
    value = field.parts[field.data[0]]
    return bytes(value).decode() if field.types and field.types[0].name == "STRING" else value.tolist()


def _dequantizable() -> set[str]:
    """Tensor types the gguf package turns back into floats (plain ones, and its quantizations)."""
    from gguf.quants import _type_traits

    return {kind.name for kind in _type_traits} | {"F32", "F16", "BF16", "F64", "I8", "I16", "I32", "I64"}


def _cache_root() -> Path:
    from huggingface_hub import constants  # the same cache as Hub downloads

    return Path(constants.HF_HUB_CACHE)


def _make_aside(folder: Path, fill) -> None:
    """Fill a scratch folder beside `folder`, then rename it into place (whole or not at all)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        fill(scratch)
        os.replace(scratch, folder)
    except OSError:
        if not (folder / GGUF_MARKER).is_file():  # not another process's copy, made meanwhile
            raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _write_metadata(info: GgufInfo, scratch: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    parent, name = str(Path(info.file).parent), Path(info.file).name
    try:
        config = AutoConfig.from_pretrained(parent, gguf_file=name)
        tokenizer = AutoTokenizer.from_pretrained(parent, gguf_file=name)
    except Exception as error:  # transformers' own message says what it could not read
        raise ModelError(f"model.path {info.file}: transformers cannot read this GGUF file: {error}") from None
    config.save_pretrained(scratch)
    _drop_quantization(scratch / "config.json")
    tokenizer.save_pretrained(scratch)
    GenerationConfig.from_model_config(config).save_pretrained(scratch)
    (scratch / GGUF_MARKER).write_text(json.dumps(asdict(info), indent=2) + "\n")


def _drop_quantization(config_file: Path) -> None:
    """The folder holds dequantized weights: no quantization entry may say otherwise."""
    config = json.loads(config_file.read_text())
    config.pop("quantization_config", None)
    config["dtype"] = "float32"
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _write_weights(info: GgufInfo, folder: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    parent, name = str(Path(info.file).parent), Path(info.file).name
    model = AutoModelForCausalLM.from_pretrained(parent, gguf_file=name, dtype=torch.float32)
    state = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # one tensor, as the checkpoint on the Hub holds it
    scratch = folder / f".{WEIGHTS}.{os.getpid()}.tmp"
    save_file({key: value.contiguous() for key, value in state.items()}, str(scratch), metadata={"format": "pt"})
    os.replace(scratch, folder / WEIGHTS)
