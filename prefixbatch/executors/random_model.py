"""Random-weight Hugging Face checkpoints for tests, the demo and benchmarks (`make-test-model`).

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
  which every Python installation ships; the model's vocabulary is exactly the tokenizer's
  (but for the benchmark sizes with real checkpoints' shapes, `REAL_SHAPES`), and
  AutoTokenizer loads the same tokenizer for every arch.
- Special tokens, ids 0..4: <|bos|> <|eos|> <|pad|> <|im_start|> <|im_end|>. Encoding with
  special tokens prepends <|bos|>; the chat template starts with <|bos|> itself. Generation
  stops at <|eos|> or <|im_end|> (generation_config.eos_token_id is both).

in → out: (directory, arch, size, seed) → the directory, holding a loadable checkpoint.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal, get_args

import torch
from tokenizers import (
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)
from transformers.models.qwen2.tokenization_qwen2 import (
    PRETOKENIZE_REGEX as QWEN2_PRETOKENIZE_REGEX,
)
from transformers.utils import logging as hf_logging

from prefixbatch.errors import ModelError

__all__ = ["BOS", "EOS", "IM_END", "IM_START", "PAD", "Arch", "Size", "make_test_model"]

Arch = Literal["llama", "qwen2", "qwen3"]
Size = Literal["tiny", "small", "qwen2.5-0.5b", "llama-3.2-1b", "kv-heavy"]

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
    "tiny": {
        "vocab_size": 4096,
        "hidden_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "intermediate_size": 384,
        "max_position_embeddings": 2048,
    },
    "small": {
        "vocab_size": 8192,
        "hidden_size": 512,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 64,
        "intermediate_size": 1408,
        "max_position_embeddings": 4096,
    },
}

# Benchmark sizes with the shapes of real checkpoints (random weights; never in the test
# suite): what dominates at real shapes (a 128K–152K vocabulary, 16–24 layers, GQA with 2–8
# KV heads) is what the engine must be fast at. Each fixes its architecture; the tokenizer
# is trained to `vocab_size` as for the others, and the embedding and lm_head have the real
# checkpoint's `model_vocab_size` rows (ids past the tokenizer's are never in a prompt).
REAL_SHAPES: dict[str, dict] = {
    "qwen2.5-0.5b": {  # Qwen/Qwen2.5-0.5B-Instruct
        "arch": "qwen2",
        "model_vocab_size": 151_936,
        "tie_word_embeddings": True,
        "shape": {"vocab_size": 8192, "hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14,
                  "num_key_value_heads": 2, "head_dim": 64, "intermediate_size": 4864,
                  "max_position_embeddings": 32768},
    },
    "llama-3.2-1b": {  # meta-llama/Llama-3.2-1B-Instruct
        "arch": "llama",
        "model_vocab_size": 128_256,
        "tie_word_embeddings": True,
        "shape": {"vocab_size": 8192, "hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32,
                  "num_key_value_heads": 8, "head_dim": 64, "intermediate_size": 8192,
                  "max_position_embeddings": 131072},
    },
}
SIZES.update({name: real["shape"] for name, real in REAL_SHAPES.items()})
# A benchmark size for jobs over a cache's capacity: the KV bytes per token of Llama-3.1-8B
# (128 KiB in bf16: 16 layers × 16 KV heads × 128 here, 32 × 8 × 128 there) with everything
# else tiny, so that documents filling a CPU engine's ~20 GiB cache are computed in minutes.
SIZES["kv-heavy"] = {
    "vocab_size": 8192,
    "hidden_size": 64,
    "num_hidden_layers": 16,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "head_dim": 128,
    "intermediate_size": 128,
    "max_position_embeddings": 4096,
}



def arch_for(size: str, arch: str) -> str:
    """The architecture a model of `size` gets: a real checkpoint's shape fixes its own."""
    return REAL_SHAPES[size]["arch"] if size in REAL_SHAPES else arch


CONFIG_CLASSES: dict[str, type[PretrainedConfig]] = {
    "llama": LlamaConfig,
    "qwen2": Qwen2Config,
    "qwen3": Qwen3Config,
}

# Llama checkpoints keep a separate lm_head; the small Qwen2/Qwen3 checkpoints tie it to the
# embedding. Covering both keeps the loaders of the executors honest.
TIE_WORD_EMBEDDINGS = {"llama": False, "qwen2": True, "qwen3": True}

# Init scales, chosen by measuring greedy decoding on 20 prompts x 32 steps for every arch
# (see `randomize_parameters` for why each one exists).
LOGIT_STD = 8.0  # std of a logit on a unit-RMS final hidden state
QK_GAIN = 2.0  # attention scores of std ~QK_GAIN**2: sharp, so outputs depend on context
OUT_GAIN = 3.0  # o_proj / down_proj: residual updates outgrow the (tied) embedding
BIAS_STD = 0.5
NORM_WEIGHT_RANGE = (0.5, 1.5)


def make_test_model(
    directory: str | Path, *, arch: Arch = "llama", size: Size = "tiny", seed: int = 0
) -> Path:
    """Writes config.json, generation_config.json, model.safetensors, tokenizer files (with chat template) into directory; returns it."""
    _check_choice("arch", arch, Arch)
    _check_choice("size", size, Size)
    arch = arch_for(size, arch)
    directory = Path(directory)
    _check_new_folder(directory)
    directory.mkdir(parents=True, exist_ok=True)

    shape = SIZES[size]
    tokenizer = train_tokenizer(
        vocab_size=shape["vocab_size"], model_max_length=shape["max_position_embeddings"]
    )
    config = build_config(arch, size, tokenizer)
    model = build_model(config, seed=seed)
    model.generation_config = build_generation_config(tokenizer)

    hf_logging.disable_progress_bar()  # a test model is written in a second: no bar needed
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def _check_new_folder(directory: Path) -> None:
    """Refuse a folder that holds anything: pointed at a real checkpoint by mistake, writing
    here would overwrite its config, weights and tokenizer (and leave a sharded one broken)."""
    if directory.exists() and not directory.is_dir():
        raise ModelError(f"{directory} is a file; make-test-model writes a new model folder there")
    entries = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
    if entries:
        shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
        msg = (
            f"{directory} is not empty ({shown}); make-test-model writes a random-weight model"
            " only into a new or empty folder, so nothing was written. Choose another folder"
        )
        raise ModelError(msg)


def _check_choice(name: str, value: str, choices: object) -> None:
    allowed = get_args(choices)
    if value not in allowed:
        msg = f"`{name}` must be one of {allowed}, got {value!r}"
        raise ValueError(msg)


def train_tokenizer(*, vocab_size: int, model_max_length: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on the stdlib's documentation topics, with a chat template."""
    from pydoc_data.topics import topics

    bpe = Tokenizer(models.BPE())
    _set_qwen2_pipeline(bpe)
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
        # Saved as an explicit null: otherwise Qwen2Tokenizer adds its default unk
        # <|endoftext|>, one token past the model's vocabulary.
        unk_token=None,
        extra_special_tokens=[IM_START, IM_END],
        chat_template=CHAT_TEMPLATE,
        model_max_length=model_max_length,
    )


def _set_qwen2_pipeline(bpe: Tokenizer) -> None:
    """Normaliser, pre-tokenizer and decoder exactly as transformers' Qwen2Tokenizer builds them.

    AutoTokenizer loads any `model_type: qwen2` folder as Qwen2Tokenizer, which keeps the
    vocabulary, merges and post-processor of tokenizer.json but rebuilds this pipeline. Using
    the same pipeline for every arch makes all three load to identical tokenizers (a
    GPT-4-style split then byte-level BPE, as Llama 3 and Qwen use).
    """
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()


def build_config(arch: str, size: str, tokenizer: PreTrainedTokenizerFast) -> PretrainedConfig:
    real = REAL_SHAPES.get(size, {})
    shape = dict(SIZES[size], vocab_size=real.get("model_vocab_size", len(tokenizer)))
    return CONFIG_CLASSES[arch](
        **shape,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=real.get("tie_word_embeddings", TIE_WORD_EMBEDDINGS[arch]),
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
    """Overwrites every parameter, from the global RNG, with scales an exact oracle can use.

    - Linear weights: fan-in init (std gain/sqrt(fan_in)), so activations stay O(1) through
      the layers and nothing overflows in float16.
    - Embedding and lm_head: std LOGIT_STD/sqrt(hidden), so logits have std LOGIT_STD.
      The default 0.02 init gives logits of std ~0.2, where the top two are near ties.
    - q/k projections (Qwen3: q/k norm weights) get QK_GAIN: sharp attention, so the next
      token depends on the whole context and not only on the last token.
    - o_proj/down_proj get OUT_GAIN: with a tied lm_head, a residual stream dominated by
      the input embedding makes each token predict itself, and greedy output repeats one
      token forever; larger layer outputs drown that self-match out.
    - Biases and norm weights are random, not 0 and 1, so an implementation that drops a
      bias or a norm weight cannot agree with the oracle by luck.
    """
    # named_parameters lists a tied weight once, always in the same order.
    for name, param in model.named_parameters():
        param.copy_(_random_like(name, param, config.hidden_size))


def _random_like(name: str, param: torch.Tensor, hidden_size: int) -> torch.Tensor:
    if name.endswith("norm.weight"):
        low, high = NORM_WEIGHT_RANGE
        gain = QK_GAIN if name.endswith(("q_norm.weight", "k_norm.weight")) else 1.0
        return torch.empty_like(param).uniform_(low * gain, high * gain)
    if name.endswith(".bias"):
        return torch.randn_like(param) * BIAS_STD
    if "embed_tokens" in name or name.startswith("lm_head"):
        return torch.randn_like(param) * (LOGIT_STD / math.sqrt(hidden_size))
    return torch.randn_like(param) * (_linear_gain(name) / math.sqrt(param.shape[1]))


def _linear_gain(name: str) -> float:
    # nn.Linear weights are [out_features, in_features]; the caller divides by sqrt(in).
    if name.endswith(("q_proj.weight", "k_proj.weight")):
        return QK_GAIN
    if name.endswith(("o_proj.weight", "down_proj.weight")):
        return OUT_GAIN
    return 1.0
