"""Input rows → requests or error rows, on a real tokenizer and real Parquet files."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from prefixbatch.errors import ModelError
from prefixbatch.pipeline.config import InputSpec, SamplingSpec
from prefixbatch.pipeline.prepare import input_columns, prepare_input
from prefixbatch.pipeline.reader import scan_inputs
from prefixbatch.pipeline.requests import row_seed
from prefixbatch.pipeline.tokenize import PromptTokenizer

MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


def prepare(tmp_path, table: pa.Table, model, *, sampling=SamplingSpec(max_tokens=8), template="auto", **spec):
    pq.write_table(table, tmp_path / "in.parquet")
    input_spec = InputSpec(path=str(tmp_path / "in.parquet"), **spec)
    kind = "messages" if input_spec.messages_column else "prompt"
    tokenizer = PromptTokenizer(str(model), text_kind=kind, chat_template=template)
    files = scan_inputs(input_spec.paths, input_columns(input_spec))
    return prepare_input(files, input_spec, sampling, tokenizer)


def errors_by_row(prepared) -> dict[int, str]:
    return {c.row_index: c.error for c in prepared.errors}


def test_prompt_rows_become_requests_or_error_rows(tmp_path, tiny_llama):
    long_prompt = "word " * 3000  # more tokens than the 2048-token context
    prompts = ["hello world", None, "   ", long_prompt, "fine again"]
    table = pa.table({
        "id": [1, 2, 3, 4, 5],
        "prompt": prompts,
        "temperature": [0.5, None, None, None, -1.0],
        "max_tokens": [3, None, None, None, None],
        "stop": ["x", None, None, None, None],
    })
    prepared = prepare(tmp_path, table, tiny_llama, prompt_column="prompt")
    assert prepared.num_rows == 5
    assert len(prepared.requests) + len(prepared.errors) == 5
    errors = errors_by_row(prepared)
    assert errors[1].startswith("null_prompt: ")
    assert errors[2].startswith("empty_prompt: ")
    assert errors[3].startswith("prompt_too_long: the prompt has ") and "context is 2048" in errors[3]
    assert errors[4].startswith("invalid_sampling: temperature: Input should be greater than or equal to 0")
    (request,) = prepared.requests
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    assert list(request.token_ids) == tokenizer("hello world")["input_ids"]
    assert request.sampling.temperature == 0.5 and request.sampling.max_tokens == 3
    assert request.sampling.stop == ("x",)
    assert request.sampling.seed == row_seed(0, 1)
    assert prepared.ids.to_pylist() == [1, 2, 3, 4, 5]


def test_messages_rows_use_the_chat_template(tmp_path, tiny_llama):
    conversations = [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}],
        [],
        None,
    ]
    table = pa.table({"id": ["a", "b", "c"], "messages": pa.array(conversations, MESSAGES), "seed": [7, None, None]})
    prepared = prepare(tmp_path, table, tiny_llama, messages_column="messages")
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    text = tokenizer.apply_chat_template(conversations[0], tokenize=False, add_generation_prompt=True)
    (request,) = prepared.requests
    assert list(request.token_ids) == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert request.sampling.seed == 7  # a seed column wins over the derived seed
    errors = errors_by_row(prepared)
    assert errors[1].startswith("invalid_messages: ") and errors[2].startswith("null_messages: ")


def test_chat_template_always_wraps_prompts(tmp_path, tiny_llama):
    table = pa.table({"id": [1], "prompt": ["Tell me a story."]})
    prepared = prepare(tmp_path, table, tiny_llama, prompt_column="prompt", template="always")
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Tell me a story."}], tokenize=False, add_generation_prompt=True
    )
    assert list(prepared.requests[0].token_ids) == tokenizer(text, add_special_tokens=False)["input_ids"]


def test_max_tokens_is_clamped_to_the_context(tmp_path, tiny_llama):
    table = pa.table({"id": [1, 2], "prompt": ["word " * 1000, "short"]})
    prepared = prepare(tmp_path, table, tiny_llama, prompt_column="prompt", sampling=SamplingSpec(max_tokens=1500))
    by_row = {r.row_index: r for r in prepared.requests}
    assert by_row[0].num_prompt_tokens + by_row[0].sampling.max_tokens == 2048
    assert by_row[1].sampling.max_tokens == 1500
    assert prepared.num_clamped == 1


def test_seeds_are_per_row_and_stable():
    assert row_seed(0, "a") == row_seed(0, "a")
    assert len({row_seed(0, "a"), row_seed(0, "b"), row_seed(1, "a"), row_seed(0, 1)}) == 4
    assert 0 <= row_seed(5, "x") < 2**63


def test_a_model_folder_without_chat_template_is_refused_for_messages(tmp_path, tiny_llama):
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(tiny_llama, folder)
    for name in ("chat_template.jinja",):
        (folder / name).unlink(missing_ok=True)
    config = (folder / "tokenizer_config.json").read_text()
    import json

    data = json.loads(config)
    data.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(data))
    with pytest.raises(ModelError, match="has no chat template"):
        PromptTokenizer(str(folder), text_kind="messages", chat_template="auto")
