"""Builds small, real Hugging Face checkpoints with random weights, for tests and the demo.

No machine here can download weights, yet the executors must load a model exactly as they
would load a downloaded one. `make_test_model` writes a folder that plain
`AutoTokenizer.from_pretrained(dir)` and `AutoModelForCausalLM.from_pretrained(dir)` load:
`config.json`, `generation_config.json`, `model.safetensors` and the tokenizer files with a
ChatML-like chat template.

Invariants:
- Deterministic: the same (arch, size, seed) gives byte-identical weights and tokenizer.
- The model is an exact oracle: its weights are scaled so that greedy decoding is
  context-dependent and the top two logits are rarely near a tie (the default 0.02 init
  gives near-uniform logits, where fp32 rounding differences between two implementations
  flip the argmax). Every parameter is non-trivial (biases non-zero, norm weights not all
  one), so an implementation that drops one of them cannot agree with the oracle by luck.
- The tokenizer is a byte-level BPE trained offline on the stdlib's `pydoc_data` topics,
  which every Python installation ships; the model's vocabulary is exactly the tokenizer's.

in → out: (directory, arch, size, seed) → the directory, holding a loadable checkpoint.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal, get_args

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

__all__ = ["Arch", "Size", "make_test_model", "BOS", "EOS", "PAD", "IM_START", "IM_END"]

Arch = Literal["llama", "qwen2", "qwen3"]
Size = Literal["tiny", "small"]

BOS = "<|bos|>"
EOS = "<|eos|>"
PAD = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
# Trained first, so they take ids 0..4 in this order.
SPECIAL_TOKENS = [BOS, EOS, PAD, IM_START, IM_END]

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Shapes shared by every arch of one size. head_dim is explicit so that Qwen3 (which
# requires it) and the others agree.
SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(
        vocab_size=4096,
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        intermediate_size=384,
        max_position_embeddings=2048,
    ),
    "small": dict(
        vocab_size=8192,
        hidden_size=512,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
        intermediate_size=1408,
        max_position_embeddings=4096,
    ),
}

CONFIG_CLASSES: dict[str, type[PretrainedConfig]] = {
    "llama": LlamaConfig,
    "qwen2": Qwen2Config,
    "qwen3": Qwen3Config,
}

# Llama checkpoints keep a separate lm_head; the small Qwen2/Qwen3 checkpoints tie it to the
# embedding. Covering both keeps the loaders of the executors honest.
TIE_WORD_EMBEDDINGS = {"llama": False, "qwen2": True, "qwen3": True}

# Init scales (see `randomize_parameters`). Chosen by measurement, see the tests.
LOGIT_STD = 4.0  # std of an untied lm_head's logits on a unit-RMS hidden state
QK_GAIN = 2.0  # sharper attention than fan-in init, so outputs depend on the context
OUT_GAIN = 1.0  # per-layer residual updates about as large as the embedding
BIAS_STD = 0.5
NORM_WEIGHT_RANGE = (0.5, 1.5)


def make_test_model(
    directory: str | Path, *, arch: Arch = "llama", size: Size = "tiny", seed: int = 0
) -> Path:
    """Writes config.json, generation_config.json, model.safetensors, tokenizer files (with chat template) into directory; returns it."""
    _check_choice("arch", arch, Arch)
    _check_choice("size", size, Size)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)

    tokenizer = train_tokenizer(vocab_size=SIZES[size]["vocab_size"])
    config = build_config(arch, size, tokenizer)
    model = build_model(config, seed=seed)
    model.generation_config = build_generation_config(tokenizer)

    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def _check_choice(name: str, value: str, choices: object) -> None:
    allowed = get_args(choices)
    if value not in allowed:
        msg = f"`{name}` must be one of {allowed}, got {value!r}"
        raise ValueError(msg)


def train_tokenizer(*, vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on the stdlib's documentation topics, with a chat template."""
    from pydoc_data.topics import topics

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        # Every byte gets a token, so any text encodes and round-trips.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Sorted keys: the corpus order must not depend on the dict's history.
    bpe.train_from_iterator([topics[key] for key in sorted(topics)], trainer=trainer)
    bpe.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A {BOS}:1 $B:1",
        special_tokens=[(BOS, bpe.token_to_id(BOS))],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[IM_START, IM_END],
        chat_template=CHAT_TEMPLATE,
    )


def build_config(arch: str, size: str, tokenizer: PreTrainedTokenizerFast) -> PretrainedConfig:
    shape = dict(SIZES[size], vocab_size=len(tokenizer))
    return CONFIG_CLASSES[arch](
        **shape,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=TIE_WORD_EMBEDDINGS[arch],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )


def build_generation_config(tokenizer: PreTrainedTokenizerFast) -> GenerationConfig:
    # Generation stops at <|eos|> (plain text) and at <|im_end|> (end of a chat turn), as
    # the generation configs of chat checkpoints list both.
    im_end_id = tokenizer.convert_tokens_to_ids(IM_END)
    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, im_end_id],
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )


def build_model(config: PretrainedConfig, *, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomize_parameters(model, config)
    return model.eval()


@torch.no_grad()
def randomize_parameters(model: torch.nn.Module, config: PretrainedConfig) -> None:
    """Overwrites every parameter, from the global RNG, with scales an oracle can use.

    Linear layers get fan-in init (std gain/sqrt(fan_in)) so activations stay O(1) through
    the layers (no fp16 overflow), the embedding gets std 1, and an untied lm_head gives
    logits of std LOGIT_STD: wide enough that the top two logits rarely tie. A tied lm_head
    is the std-1 embedding, giving logits of std sqrt(hidden_size).
    """
    # named_parameters lists a tied weight once and always in the same order.
    for name, param in model.named_parameters():
        param.copy_(_random_like(name, param, config))


def _random_like(name: str, param: torch.Tensor, config: PretrainedConfig) -> torch.Tensor:
    if name.endswith("norm.weight"):
        low, high = NORM_WEIGHT_RANGE
        return torch.empty_like(param).uniform_(low, high)
    if name.endswith(".bias"):
        return torch.randn_like(param) * BIAS_STD
    if "embed_tokens" in name or name.startswith("lm_head"):
        return torch.randn_like(param) * (LOGIT_STD / math.sqrt(config.hidden_size))
    gain = QK_GAIN if name.endswith(("q_proj.weight", "k_proj.weight")) else 1.0
    if name.endswith(("o_proj.weight", "down_proj.weight")):
        gain = OUT_GAIN
    fan_in = param.shape[1]  # nn.Linear weight: [out_features, in_features]
    return torch.randn_like(param) * (gain / math.sqrt(fan_in))
