"""The test-model factory: real, loadable, deterministic checkpoints fit to be an exact oracle."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from prefixbatch.executors.random_model import (
    BOS,
    EOS,
    IM_END,
    IM_START,
    PAD,
    build_config,
    make_test_model,
    train_tokenizer,
)

ARCHS = ["tiny_llama", "tiny_qwen2", "tiny_qwen3"]
PROMPTS = [
    "The with statement is used to wrap the execution of a block",
    "import os\nimport sys\n\ndef main():\n",
    "Return the value of the named attribute of object.",
    "for i in range(10):\n    print(i)",
]
TEXT = "Hello,   world!\n\tdef f(x):\n        return x ** 2  # ünïcödé, 😀, 中文"


@cache
def load(folder: Path) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return tokenizer, model


@cache
def greedy(folder: Path, prompt: str) -> tuple[list[int], torch.Tensor]:
    """32 greedy tokens (no eos stop) and the top-1 minus top-2 logit gap at each step."""
    tokenizer, model = load(folder)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=32,
            eos_token_id=None,  # random weights: an early eos would only shorten the checks
            output_logits=True,
            return_dict_in_generate=True,
        )
    top2 = torch.cat(out.logits).topk(2, dim=-1).values  # [steps, 2]
    return out.sequences[0, ids.shape[1] :].tolist(), top2[:, 0] - top2[:, 1]


@pytest.fixture(params=ARCHS)
def folder(request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue(request.param)


def test_folder_holds_safetensors_and_no_pickles(folder: Path) -> None:
    names = {path.name for path in folder.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= names
    assert not [name for name in names if name.endswith((".bin", ".pt", ".pth"))]


@pytest.mark.parametrize(
    ("fixture", "model_type"),
    [("tiny_llama", "llama"), ("tiny_qwen2", "qwen2"), ("tiny_qwen3", "qwen3")],
)
def test_plain_auto_classes_load_it(
    request: pytest.FixtureRequest, fixture: str, model_type: str
) -> None:
    folder = request.getfixturevalue(fixture)
    tokenizer, model = load(folder)
    config = AutoConfig.from_pretrained(folder)
    assert model.config.model_type == config.model_type == model_type
    assert model.dtype == torch.float32
    assert len(tokenizer) == config.vocab_size


def test_arch_specific_features(tiny_llama: Path, tiny_qwen2: Path, tiny_qwen3: Path) -> None:
    llama, qwen2, qwen3 = (load(folder)[1] for folder in (tiny_llama, tiny_qwen2, tiny_qwen3))
    assert llama.config.num_key_value_heads < llama.config.num_attention_heads
    assert llama.lm_head.weight.data_ptr() != llama.model.embed_tokens.weight.data_ptr()
    for model in (qwen2, qwen3):
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    attention = qwen2.model.layers[0].self_attn
    assert all(proj.bias.abs().sum() > 0 for proj in (attention.q_proj, attention.k_proj))
    assert hasattr(qwen3.model.layers[0].self_attn, "q_norm")
    assert qwen3.config.head_dim == 32


def test_every_arch_loads_the_same_tokenizer(tiny_llama: Path, folder: Path) -> None:
    # AutoTokenizer picks Qwen2Tokenizer for qwen2 folders, which rebuilds the pipeline:
    # it must still encode exactly as the tokenizer.json that was trained.
    raw = Tokenizer.from_file(str(tiny_llama / "tokenizer.json"))
    tokenizer, _ = load(folder)
    for text in [TEXT, *PROMPTS]:
        assert tokenizer(text).input_ids == raw.encode(text).ids


def test_tokenizer_round_trips_text_and_prepends_bos(folder: Path) -> None:
    tokenizer, _ = load(folder)
    ids = tokenizer(TEXT).input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids[1:]) == TEXT
    assert tokenizer.decode(tokenizer(TEXT, add_special_tokens=False).input_ids) == TEXT


def test_special_token_ids(folder: Path) -> None:
    tokenizer, model = load(folder)
    ids = tokenizer.convert_tokens_to_ids([BOS, EOS, PAD, IM_START, IM_END])
    assert ids == [0, 1, 2, 3, 4]
    for config in (model.config, model.generation_config):
        assert (config.bos_token_id, config.pad_token_id) == (0, 2)
    assert model.config.eos_token_id == 1
    assert model.generation_config.eos_token_id == [1, 4]  # <|eos|> and <|im_end|>
    assert tokenizer.model_max_length == model.config.max_position_embeddings


def test_chat_template_adds_the_generation_prompt(folder: Path) -> None:
    tokenizer, _ = load(folder)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What does the with statement do?"},
    ]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|bos|><|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nWhat does the with statement do?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
    assert ids["input_ids"] == tokenizer(text, add_special_tokens=False).input_ids
    assert ids["input_ids"].count(tokenizer.bos_token_id) == 1


def test_different_prompts_give_different_greedy_outputs(folder: Path) -> None:
    outputs = {tuple(greedy(folder, prompt)[0][:16]) for prompt in PROMPTS}
    assert len(outputs) == len(PROMPTS)


def test_greedy_output_is_not_one_token_repeated(folder: Path) -> None:
    for prompt in PROMPTS:
        assert len(set(greedy(folder, prompt)[0])) > 1


def test_top_two_logits_are_never_near_a_tie(folder: Path) -> None:
    # The oracle property: fp32 rounding differences between two implementations must not
    # flip a greedy choice. Measured 1st percentile gap is ~0.01-0.07 with std-8 logits.
    gaps = torch.cat([greedy(folder, prompt)[1] for prompt in PROMPTS])
    assert gaps.min() > 1e-4
    assert gaps.median() > 0.3


def test_same_context_tail_different_history_changes_the_next_token(folder: Path) -> None:
    # Attention must matter: otherwise an engine with a broken KV cache could still agree.
    tokenizer, model = load(folder)
    tail = tokenizer(" and the value is returned", add_special_tokens=False).input_ids
    nexts = set()
    with torch.inference_mode():
        for prompt in PROMPTS:
            ids = torch.tensor([tokenizer(prompt).input_ids + tail])
            nexts.add(model(ids).logits[0, -1].argmax().item())
    assert len(nexts) >= 3


def test_half_precision_forward_is_finite(tiny_qwen2: Path) -> None:
    tokenizer, _ = load(tiny_qwen2)
    ids = tokenizer(PROMPTS[1] * 20, return_tensors="pt").input_ids
    for dtype in (torch.bfloat16, torch.float16):
        model = AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=dtype).eval()
        with torch.inference_mode():
            out = model(ids, output_hidden_states=True)
        assert torch.isfinite(out.logits).all()
        assert max(h.abs().max().item() for h in out.hidden_states) < 1000


def test_same_seed_gives_identical_files(tmp_path: Path, tiny_llama: Path) -> None:
    again = make_test_model(tmp_path / "again", arch="llama", seed=0)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (tiny_llama / name).read_bytes()
    other = make_test_model(tmp_path / "other", arch="llama", seed=1)
    assert (other / "model.safetensors").read_bytes() != (
        tiny_llama / "model.safetensors"
    ).read_bytes()


def test_tiny_parameter_counts(folder: Path) -> None:
    _, model = load(folder)
    assert 1_000_000 <= model.num_parameters() <= 5_000_000


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_small_parameter_counts(arch: str) -> None:
    tokenizer = train_tokenizer(vocab_size=8192, model_max_length=4096)
    config = build_config(arch, "small", tokenizer)
    assert config.vocab_size == 8192
    with torch.device("meta"):  # shapes only: no memory, no init
        model = AutoModelForCausalLM.from_config(config)
    assert 20_000_000 <= model.num_parameters() <= 60_000_000


def test_config_names_its_dtype_and_rope(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    assert config["dtype"] == "float32"
    assert config["rope_parameters"]["rope_theta"] == 10000.0


def test_unknown_arch_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"`arch` must be one of .*got 'gpt2'"):
        make_test_model(tmp_path, arch="gpt2")  # type: ignore[arg-type]


@pytest.mark.parametrize(("size", "arch", "layers", "vocab"), [("qwen2.5-0.5b", "qwen2", 24, 151_936),
                                                               ("llama-3.2-1b", "llama", 16, 128_256)])
def test_real_shapes_have_the_checkpoints_shapes(size, arch, layers, vocab):
    """The benchmark sizes: the real checkpoint's config (no weights built here)."""
    from prefixbatch.executors.native.config import model_config_from_hf
    from prefixbatch.executors.random_model import REAL_SHAPES, SIZES, build_config, train_tokenizer

    tokenizer = train_tokenizer(vocab_size=SIZES[size]["vocab_size"], model_max_length=4096)
    config = build_config(REAL_SHAPES[size]["arch"], size, tokenizer)
    assert (config.model_type, config.num_hidden_layers, config.vocab_size) == (arch, layers, vocab)
    assert config.tie_word_embeddings and len(tokenizer) < vocab  # prompt ids stay in the tokenizer's range
    native = model_config_from_hf(config.to_dict())  # our engine runs it
    assert native.num_kv_heads == SIZES[size]["num_key_value_heads"] and native.head_dim == 64
