"""Input rows → requests or error rows, on a real tokenizer and real Parquet files."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from prefixbatch.errors import InputError, ModelError
from prefixbatch.pipeline.config import InputSpec, SamplingSpec
from prefixbatch.pipeline.prepare import input_columns, prepare_input
from prefixbatch.pipeline.reader import scan_inputs
from prefixbatch.pipeline.requests import row_seed
from prefixbatch.pipeline.tokenize import PromptTokenizer

MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


EIGHT_TOKENS = SamplingSpec(max_tokens=8)


def prepare(tmp_path, table: pa.Table, model, *, sampling=EIGHT_TOKENS, template="auto", **spec):
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


def test_a_row_with_n_samples_becomes_n_requests_with_their_own_seeds(tmp_path, tiny_llama):
    table = pa.table({
        "id": ["a", "b", "c", "d", "e", "f"],
        "prompt": ["one prompt", "another", "and a third", "a fourth", "fifth", "word " * 3000],
        "n": pa.array([3, None, 2, 0, -1, 3], pa.int64()),
        "seed": [None, None, 11, None, None, None],
    })
    sampling = SamplingSpec(max_tokens=8, temperature=0.9, seed=5, n=2)
    prepared = prepare(tmp_path, table, tiny_llama, prompt_column="prompt", sampling=sampling)
    assert prepared.num_rows == 6 and prepared.num_output_rows == 3 + 2 + 2 + 1 + 1 + 1
    by_row: dict[int, list] = {}
    for request in prepared.requests:
        by_row.setdefault(request.row_index, []).append(request)
    assert sorted(by_row) == [0, 1, 2]
    a = by_row[0]
    assert [r.sample_index for r in a] == [0, 1, 2]
    assert len({r.token_ids for r in a}) == 1 and len({r.sampling.max_tokens for r in a}) == 1
    # Sample 0 keeps the row's seed; sample k gets row_seed(row's seed, k).
    base = row_seed(5, "a")
    assert [r.sampling.seed for r in a] == [base, row_seed(base, 1), row_seed(base, 2)]
    assert len({r.sampling.seed for r in a}) == 3
    assert [r.sample_index for r in by_row[1]] == [0, 1]  # the spec's n
    assert [r.sampling.seed for r in by_row[2]] == [11, row_seed(11, 1)]  # the seed column's
    errors = errors_by_row(prepared)
    assert errors[3] == "invalid_sampling: n: Input should be greater than or equal to 1 (got 0)"
    assert errors[4] == "invalid_sampling: n: Input should be greater than or equal to 1 (got -1)"
    assert errors[5].startswith("prompt_too_long: ")  # one error row, however many samples
    assert sorted(c.row_index for c in prepared.errors) == [3, 4, 5]
    assert all(c.sample_index == 0 for c in prepared.errors)


def test_a_non_integer_n_column_is_a_job_level_error(tmp_path, tiny_llama):
    table = pa.table({"id": [1], "prompt": ["hi"], "n": ["x"]})
    expected = r"column 'n' in .*in.parquet must be an integer, found string"
    with pytest.raises(InputError, match=expected):
        prepare(tmp_path, table, tiny_llama, prompt_column="prompt")


def test_n_one_keeps_the_row_seed_and_sample_index_zero(tmp_path, tiny_llama):
    n = pa.array([1, None], pa.int32())
    table = pa.table({"id": [1, 2], "prompt": ["hi", "there"], "n": n})
    prepared = prepare(tmp_path, table, tiny_llama, prompt_column="prompt")
    assert [(r.row_index, r.sample_index, r.sampling.seed) for r in prepared.requests] == [
        (0, 0, row_seed(0, 1)),
        (1, 0, row_seed(0, 2)),
    ]
