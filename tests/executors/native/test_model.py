"""The native model against transformers: logits and greedy tokens, fp32 on the CPU.

The tiny checkpoints (Llama, Qwen2, Qwen3) come from the session fixtures; the other
variants (rope scaling, MQA, biases, Mistral, derived head_dim) are small configs built
here with random weights at the test-model scales, saved and loaded like any checkpoint.
"""

from __future__ import annotations

import shutil
from functools import cache
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
)
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from prefixbatch.executors.native import pointwise
from prefixbatch.executors.native.attention.plan import QueryRun, SegmentKV, plan_attention
from prefixbatch.executors.native.attention.tree import TreeAttention
from prefixbatch.executors.native.config import model_config_from_hf
from prefixbatch.executors.native.dense import packing_available
from prefixbatch.executors.native.kv import KVStore
from prefixbatch.executors.native.model import MLP, Linear, RMSNorm
from prefixbatch.executors.native.rope import inverse_frequencies
from prefixbatch.executors.native.weights import load_model
from prefixbatch.executors.random_model import randomize_parameters
from tests.executors.native.helpers import ContiguousKV, greedy

# Logits have std ~8 and reach ~40 (test_model.LOGIT_STD). Measured: ours and transformers
# each differ from a float64 run by up to ~1.5e-4, from each other by up to ~1e-4 (fp32
# rounding in a different op order); the margin absorbs other BLAS builds.
LOGITS_TOL = 2e-4
ARCHS = ["tiny_llama", "tiny_qwen2", "tiny_qwen3"]
TEXTS = [
    "def",
    "The with statement is used to wrap the execution of a block",
    "import os\nimport sys\n\nfor name in sys.argv:\n    print(name)",
    "Return the value of the named attribute of object.",
]
NUM_STEPS = 10


@cache
def hf_model(folder: Path):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@cache
def native_model(folder: Path, packed: bool = False):
    model = load_model(folder, dtype=torch.float32, device="cpu")
    if packed:
        model.pack()  # the executor's path on CPU fp32 (`dense`)
    return model


# Dense layers through F.linear (the loaded model) and through oneDNN's packed weights.
PACKED = [False, pytest.param(True, marks=pytest.mark.skipif(
    not packing_available(torch.device("cpu"), torch.float32), reason="needs our dense kernel or oneDNN"))]


@cache
def prompts(folder: Path) -> list[list[int]]:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return [tokenizer(text)["input_ids"] for text in TEXTS]


@torch.inference_mode()
def hf_generate(
    folder: Path, prompt: list[int], num_steps: int
) -> tuple[torch.Tensor, list[int], tuple]:
    """(prompt logits [P, V], greedy ids, logits of each step) from transformers."""
    model = hf_model(folder)
    ids = torch.tensor([prompt])
    prompt_logits = model(ids).logits[0]
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=num_steps,
        output_logits=True,
        return_dict_in_generate=True,
    )
    # generate stops at an eos id: compare that many tokens.
    return prompt_logits, out.sequences[0, len(prompt) :].tolist(), out.logits


def assert_matches_transformers(
    folder: Path, prompt: list[int], num_steps: int = NUM_STEPS, *, packed: bool = False
) -> None:
    prompt_logits, ids, step_logits = greedy(native_model(folder, packed), prompt, num_steps)
    hf_prompt_logits, hf_ids, hf_step_logits = hf_generate(folder, prompt, num_steps)
    torch.testing.assert_close(prompt_logits, hf_prompt_logits, atol=LOGITS_TOL, rtol=0)
    assert ids[: len(hf_ids)] == hf_ids
    for ours, theirs in zip(step_logits, hf_step_logits):
        torch.testing.assert_close(ours, theirs[0], atol=LOGITS_TOL, rtol=0)


@pytest.mark.parametrize("packed", PACKED)
@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_checkpoints_match_transformers(arch, packed, request):
    folder = request.getfixturevalue(arch)
    for prompt in prompts(folder):
        assert_matches_transformers(folder, prompt, packed=packed)


def test_greedy_continuations_are_context_dependent(tiny_llama):
    # Guards the test above: identical continuations for every prompt would prove little.
    continuations = {tuple(greedy(native_model(tiny_llama), p, 5)[1]) for p in prompts(tiny_llama)}
    assert len(continuations) == len(TEXTS)


@pytest.mark.parametrize("packed", PACKED)
@torch.inference_mode()
def test_logits_rows_project_only_the_rows_asked(tiny_llama, packed):
    # The last layer's attention, o_proj and MLP run for the asked rows alone (in any order,
    # one asked twice); every row's k, v of that layer is stored all the same.
    model = native_model(tiny_llama, packed)
    prompt = torch.tensor(prompts(tiny_llama)[2])
    positions = torch.arange(len(prompt))
    every_kv = ContiguousKV(model.config.attention_scale)
    every_row = model(prompt, positions, every_kv)
    for rows in ([len(prompt) - 1, 0, 5, 0], []):
        rows = torch.tensor(rows, dtype=torch.long)
        asked_kv = ContiguousKV(model.config.attention_scale)
        asked = model(prompt, positions, asked_kv, logits_rows=rows)
        assert asked.shape == (len(rows), model.config.vocab_size) and asked.dtype == torch.float32
        # Same math; a different matmul shape may round differently.
        torch.testing.assert_close(asked, every_row[rows], atol=LOGITS_TOL, rtol=0)
        for ours, theirs in ((asked_kv.keys, every_kv.keys), (asked_kv.values, every_kv.values)):
            assert ours.keys() == theirs.keys()
            for layer in ours:
                torch.testing.assert_close(ours[layer], theirs[layer], atol=0, rtol=0)


SMALL = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
}
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # Short, so that a 100-token prompt spans every band: kept, blended and stretched.
    "original_max_position_embeddings": 32,
}
CONFIGS = {
    "llama3_rope": lambda: LlamaConfig(**SMALL, rope_scaling=LLAMA3_ROPE),
    "linear_rope": lambda: LlamaConfig(
        **SMALL, rope_scaling={"rope_type": "linear", "factor": 4.0}
    ),
    "llama_mqa": lambda: LlamaConfig(**SMALL | {"num_key_value_heads": 1}),
    "llama_biases": lambda: LlamaConfig(**SMALL, attention_bias=True, mlp_bias=True),
    "mistral": lambda: MistralConfig(**SMALL, sliding_window=4096),
    "qwen2_mqa_derived_head_dim": lambda: Qwen2Config(
        **{k: v for k, v in SMALL.items() if k != "head_dim"}
        | {"num_key_value_heads": 1, "tie_word_embeddings": True}
    ),
    "qwen3_head_dim_24_bias": lambda: Qwen3Config(**SMALL | {"head_dim": 24}, attention_bias=True),
}


def save_checkpoint(config: PretrainedConfig, folder: Path) -> Path:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomize_parameters(model, config)
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("packed", PACKED)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_config_variants_match_transformers(name, packed, tmp_path):
    folder = save_checkpoint(CONFIGS[name](), tmp_path)
    prompt = torch.randint(
        0, SMALL["vocab_size"], (100,), generator=torch.Generator().manual_seed(1)
    ).tolist()
    assert_matches_transformers(folder, prompt, num_steps=6, packed=packed)


def test_packing_replaces_each_dense_weight_and_keeps_the_tied_embedding(tiny_qwen2):
    model = native_model(tiny_qwen2, True)
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert model.is_packed and linears and all(m.packed is not None and m.weight is None for m in linears)
    mlps = [m for m in model.modules() if isinstance(m, MLP)]  # gate and up apart, fused activation
    assert mlps and all(m.gate is not None and m.up is not None and m.gate_up_proj is None for m in mlps)
    assert model.config.tie_word_embeddings and model.embed_tokens is not None  # still embeds
    # With a C compiler, the layers add their outputs in and norm in one pass (`add_rms_norm`):
    # the equality tests above run through it.
    norms = [m for m in model.modules() if isinstance(m, RMSNorm)]
    assert all(m.pointwise is not pointwise.EAGER for m in norms) or not any(shutil.which(cc) for cc in ("cc", "gcc"))


def test_variant_configs_are_read_as_intended():
    read = {name: model_config_from_hf(make().to_dict()) for name, make in CONFIGS.items()}
    assert read["llama3_rope"].rope.rope_type == "llama3"
    assert read["linear_rope"].rope.factor == 4.0
    assert read["llama_mqa"].num_kv_heads == 1
    biases = read["llama_biases"]
    assert biases.qkv_bias and biases.o_bias and biases.mlp_bias
    assert read["mistral"].max_context_tokens == 512  # the window (4096) is beyond the context
    qwen2, qwen3 = read["qwen2_mqa_derived_head_dim"], read["qwen3_head_dim_24_bias"]
    assert qwen2.head_dim == 16 and qwen2.qkv_bias and not qwen2.o_bias
    assert qwen3.head_dim == 24 and qwen3.qk_norm and qwen3.qkv_bias and qwen3.o_bias


@pytest.mark.parametrize("name", ["llama3_rope", "linear_rope"])
def test_scaled_rope_frequencies_equal_transformers(name):
    config = CONFIGS[name]()
    ours = inverse_frequencies(model_config_from_hf(config.to_dict()).rope, 16, torch.device("cpu"))
    theirs, attention_factor = ROPE_INIT_FUNCTIONS[config.rope_parameters["rope_type"]](
        config, "cpu"
    )
    torch.testing.assert_close(ours, theirs, atol=0, rtol=1e-6)
    assert attention_factor == 1.0
    default = inverse_frequencies(
        model_config_from_hf(LlamaConfig(**SMALL).to_dict()).rope, 16, torch.device("cpu")
    )
    assert not torch.allclose(ours, default)  # the scaling is in effect


def test_sharded_checkpoint_loads_like_a_single_file(tiny_llama, tmp_path):
    hf_model(tiny_llama).save_pretrained(tmp_path, max_shard_size="2MB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    sharded = load_model(tmp_path, dtype=torch.float32, device="cpu")
    prompt = prompts(tiny_llama)[2]
    for ours, theirs in zip(
        greedy(sharded, prompt, 3)[2], greedy(native_model(tiny_llama), prompt, 3)[2]
    ):
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_is_as_close_to_fp32_as_transformers_is(tiny_qwen3, dtype):
    model = load_model(tiny_qwen3, dtype=dtype, device="cpu")
    assert all(p.dtype == dtype for p in model.parameters())
    prompt = prompts(tiny_qwen3)[1]
    exact = greedy(native_model(tiny_qwen3), prompt, 1)[0]
    ours = greedy(model, prompt, 1)[0]
    hf = AutoModelForCausalLM.from_pretrained(tiny_qwen3, dtype=dtype).eval()
    with torch.inference_mode():
        theirs = hf(torch.tensor([prompt])).logits[0].float()
    # Rounding error is inherent (bf16 keeps 8 mantissa bits): ours must be of the same order
    # as the reference implementation's own, measured on the same prompt.
    our_error, their_error = (ours - exact).abs().max(), (theirs - exact).abs().max()
    assert our_error <= 1.5 * their_error, (our_error, their_error)


class OneLevelTree:
    """Segment 0 is a shared prefix; segments 1.. are each one sequence's suffix + output."""

    def __init__(self, model, capacities: list[int]) -> None:
        self.model = model
        self.store = KVStore.for_model(
            model.config, capacity_tokens=sum(capacities), dtype=torch.float32, device="cpu"
        )
        self.slots = [self.store.allocate(i, n) for i, n in enumerate(capacities)]
        self.num_stored = [0] * len(capacities)

    def step(self, chunks: list[tuple[int, list[int]]]) -> torch.Tensor:
        """(segment, token ids appended to it), in row order → logits of every row [T, V]."""
        runs, token_ids = [], []
        for segment, ids in chunks:
            runs.append(QueryRun(segment, len(token_ids), self.num_stored[segment], len(ids)))
            token_ids += ids
            self.num_stored[segment] += len(ids)
        segments = [
            SegmentKV(i, None if i == 0 else 0, slots.start, num_stored)
            for i, (slots, num_stored) in enumerate(zip(self.slots, self.num_stored))
        ]
        plan = plan_attention(segments, runs)
        attention = TreeAttention(self.store, plan, scale=self.model.config.attention_scale)
        return self.model(torch.tensor(token_ids), torch.tensor(plan.positions), attention)


@torch.inference_mode()
def test_shared_prefix_through_the_kv_store_matches_transformers(tiny_qwen2):
    """Two prompts sharing a prefix: the prefix chunked over two steps, both suffixes riding
    with its last chunk, then both sequences decoding together; each equals its own HF run."""
    folder, num_steps = tiny_qwen2, 6
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prefix = tokenizer(TEXTS[1])["input_ids"]
    suffixes = [
        tokenizer(text)["input_ids"][1:] for text in [" of code.", " with a context manager"]
    ]
    tree = OneLevelTree(
        native_model(folder), [len(prefix)] + [len(s) + num_steps for s in suffixes]
    )

    cut = len(prefix) // 2
    first = tree.step([(0, prefix[:cut])])
    second = tree.step([(0, prefix[cut:]), (1, suffixes[0]), (2, suffixes[1])])
    prefix_logits = torch.cat([first, second[: len(prefix) - cut]])
    suffix_logits = second[len(prefix) - cut :].split([len(s) for s in suffixes])

    logits = torch.stack([rows[-1] for rows in suffix_logits])  # [2, V]
    generated, step_logits = [[], []], []
    for t in range(num_steps):
        step_logits.append(logits)
        for ids, row in zip(generated, logits):
            ids.append(int(row.argmax()))
        if t + 1 < num_steps:
            logits = tree.step([(1, generated[0][-1:]), (2, generated[1][-1:])])

    for i, suffix in enumerate(suffixes):
        hf_logits, hf_ids, hf_step_logits = hf_generate(folder, prefix + suffix, num_steps)
        torch.testing.assert_close(prefix_logits, hf_logits[: len(prefix)], atol=LOGITS_TOL, rtol=0)
        torch.testing.assert_close(
            suffix_logits[i], hf_logits[len(prefix) :], atol=LOGITS_TOL, rtol=0
        )
        assert generated[i][: len(hf_ids)] == hf_ids
        for ours, theirs in zip(step_logits, hf_step_logits):
            torch.testing.assert_close(ours[i], theirs[0], atol=LOGITS_TOL, rtol=0)
