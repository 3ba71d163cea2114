"""Loading checkpoints: refusals with messages a user can act on, and strictness both ways."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from prefixbatch.errors import ModelError
from prefixbatch.executors.native.weights import load_model, read_model_config


def copy_with_config(source: Path, target: Path, **changes: object) -> Path:
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps(config | changes))
    return target


def rewrite_weights(folder: Path, edit) -> None:
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize(
    ("changes", "found"),
    [
        ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "got model_type 'gpt2'"),
        (
            {"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"]},
            "got model_type 'qwen3_moe'",
        ),
        ({"architectures": ["LlamaForSequenceClassification"]}, "LlamaForSequenceClassification"),
        ({"hidden_act": "gelu"}, "hidden_act must be 'silu'"),
        (
            {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}},
            "got 'yarn'",
        ),
    ],
)
def test_unsupported_models_name_the_hf_fallback(tiny_llama, tmp_path, changes, found):
    folder = copy_with_config(tiny_llama, tmp_path / "model", **changes)
    with pytest.raises(ModelError, match="executor.kind: hf") as error:
        load_model(folder, dtype=torch.float32, device="cpu")
    assert found in str(error.value) and str(folder) in str(error.value)


def test_pickle_weights_are_refused(tiny_llama, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(tiny_llama / "config.json", folder)
    (folder / "pytorch_model.bin").write_bytes(b"not loaded, ever")
    with pytest.raises(ModelError, match=r"found only pytorch_model.bin \(pickle, refused"):
        load_model(folder, dtype=torch.float32, device="cpu")


def test_a_missing_tensor_is_an_error(tiny_llama, tmp_path):
    folder = copy_with_config(tiny_llama, tmp_path / "model")
    rewrite_weights(folder, lambda tensors: tensors.pop("lm_head.weight"))
    with pytest.raises(ModelError, match=r"lacks 1 tensors the model needs: lm_head.weight"):
        load_model(folder, dtype=torch.float32, device="cpu")


def test_a_tensor_the_config_does_not_announce_is_an_error(tiny_llama, tmp_path):
    folder = copy_with_config(tiny_llama, tmp_path / "model")
    rewrite_weights(
        folder, lambda t: t.update({"model.layers.0.self_attn.o_proj.bias": torch.zeros(128)})
    )
    with pytest.raises(ModelError, match=r"'model.layers.0.self_attn.o_proj.bias' has no place"):
        load_model(folder, dtype=torch.float32, device="cpu")


def test_a_tensor_of_the_wrong_shape_is_an_error(tiny_llama, tmp_path):
    folder = copy_with_config(tiny_llama, tmp_path / "model", intermediate_size=256)
    with pytest.raises(
        ModelError,
        match=r"'model.layers.0.mlp.\w+_proj.weight' has shape \(\d+, \d+\), config.json implies",
    ):
        load_model(folder, dtype=torch.float32, device="cpu")


def test_tied_checkpoint_saving_lm_head_too_loads_tied(tiny_qwen2, tmp_path):
    folder = copy_with_config(tiny_qwen2, tmp_path / "model")
    rewrite_weights(
        folder,
        lambda t: t.update({"lm_head.weight": torch.zeros_like(t["model.embed_tokens.weight"])}),
    )
    model = load_model(folder, dtype=torch.float32, device="cpu")
    assert model.lm_head.weight is model.embed_tokens and model.embed_tokens.abs().sum() > 0


def test_index_listing_a_missing_shard_is_an_error(tiny_llama, tmp_path):
    folder = copy_with_config(tiny_llama, tmp_path / "model")
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(
        ModelError, match="lists model-00002-of-00002.safetensors, which is missing"
    ):
        load_model(folder, dtype=torch.float32, device="cpu")


def test_a_truncated_weights_file_is_an_error_naming_it(tiny_llama, tmp_path):
    folder = copy_with_config(tiny_llama, tmp_path / "m")
    with open(folder / "model.safetensors", "r+b") as weights:
        weights.truncate(1000)  # an interrupted download
    with pytest.raises(ModelError, match=r"model.path .*/m: cannot read model.safetensors: .*header"):
        load_model(folder, dtype=torch.float32, device="cpu")


def test_read_model_config_of_the_tiny_checkpoints(tiny_llama, tiny_qwen2, tiny_qwen3):
    llama, qwen2, qwen3 = (read_model_config(f) for f in (tiny_llama, tiny_qwen2, tiny_qwen3))
    assert (llama.num_heads, llama.num_kv_heads, llama.head_dim, llama.num_layers) == (4, 2, 32, 4)
    assert not llama.tie_word_embeddings and not llama.qkv_bias and not llama.qk_norm
    assert qwen2.tie_word_embeddings and qwen2.qkv_bias and not qwen2.o_bias
    assert qwen3.tie_word_embeddings and qwen3.qk_norm and not qwen3.qkv_bias
