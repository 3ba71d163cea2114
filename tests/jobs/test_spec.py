"""The job spec: formats, overrides, path resolution, and the messages for every mistake."""

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from prefixbatch.errors import SpecError
from prefixbatch.jobs.spec import JobSpec, load_spec

BASE = {
    "name": "t",
    "input": {"path": "data/*.parquet", "prompt_column": "prompt"},
    "output": {"path": "out"},
    "model": {"path": "model"},
}


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_yaml_toml_json_give_the_same_spec(tmp_path):
    yaml_spec = load_spec(
        write(tmp_path, "a.yaml", "name: t\ninput: {path: data/*.parquet, prompt_column: prompt}\n"
              "output: {path: out}\nmodel: {path: model}\n")
    )
    toml_spec = load_spec(
        write(tmp_path, "a.toml", 'name = "t"\n[input]\npath = "data/*.parquet"\nprompt_column = "prompt"\n'
              '[output]\npath = "out"\n[model]\npath = "model"\n')
    )
    json_spec = load_spec(write(tmp_path, "a.json", json.dumps(BASE)))
    assert yaml_spec == toml_spec == json_spec
    assert yaml_spec.sampling.max_tokens == 256 and yaml_spec.executor.kind == "auto"


def test_relative_paths_resolve_against_the_spec_folder(tmp_path):
    spec = load_spec(write(tmp_path, "job.json", json.dumps({**BASE, "input": {
        "path": ["a.parquet", "s3://bucket/b.parquet", "/abs/c.parquet"], "prompt_column": "p"}})))
    assert spec.input.paths == (str(tmp_path / "a.parquet"), "s3://bucket/b.parquet", "/abs/c.parquet")
    assert spec.output.path == str(tmp_path / "out")
    assert spec.model.path == str(tmp_path / "model")


def test_set_overrides_are_typed_and_nested(tmp_path):
    spec = load_spec(
        write(tmp_path, "job.json", json.dumps(BASE)),
        ["sampling.max_tokens=32", "sampling.stop=[a, b]", "output.path=memory://x", "sampling.temperature=0.5"],
    )
    assert spec.sampling.max_tokens == 32
    assert spec.sampling.stop == ("a", "b")
    assert spec.sampling.temperature == 0.5
    assert spec.output.path == "memory://x"


def test_single_stop_string_is_a_list_of_one(tmp_path):
    spec = load_spec(write(tmp_path, "job.json", json.dumps({**BASE, "sampling": {"stop": "\n"}})))
    assert spec.sampling.stop == ("\n",)


def test_a_moved_field_says_where_it_went(tmp_path):
    path = write(tmp_path, "job.json", json.dumps({**BASE, "executor": {"max_batch_tokens": 64}}))
    with pytest.raises(SpecError) as e:
        load_spec(path)
    assert "executor.max_batch_tokens: this setting moved to executor.hf.max_batch_tokens (hf) or" in str(e.value)
    assert "executor.native.max_step_tokens (native)" in str(e.value)


def test_spec_is_frozen(tmp_path):
    spec = load_spec(write(tmp_path, "job.json", json.dumps(BASE)))
    with pytest.raises(ValidationError, match="frozen"):
        spec.sampling.max_tokens = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"sampling": {"temprature": 1}}, "sampling.temprature: unknown field (did you mean 'temperature'?)"),
        ({"extra": 1}, "extra: unknown field; allowed here: name, task, input, output, model, sampling, executor"),
        ({"sampling": {"max_tokens": "many"}}, "sampling.max_tokens: Input should be a valid integer"),
        ({"sampling": {"max_tokens": 0}}, "sampling.max_tokens: Input should be greater than or equal to 1 (got 0)"),
        ({"sampling": {"top_p": 1.5}}, "sampling.top_p: Input should be less than or equal to 1"),
        ({"executor": {"kind": "magic"}}, "executor.kind: Input should be 'auto', 'native', 'hf' or 'vllm' (got 'magic')"),
        ({"executor": {"vllm": {"kv_cache_tokens": 5}}},
         "executor.vllm.kv_cache_tokens must hold at least one block of 32 tokens, got 5"),
        ({"output": {"path": "o", "mode": "append"}}, "output.mode: Input should be 'error', 'overwrite' or 'resume'"),
        ({"input": {"path": "x", "prompt_column": "p", "messages_column": "m"}},
         "input: exactly one of `prompt_column` and `messages_column` must be set"),
        ({"input": {"path": "x"}}, "input: exactly one of `prompt_column` and `messages_column` must be set"),
        ({"model": {}}, "model.path: required field is missing"),
        ({"input": {"path": "x", "messages_column": "m"}, "model": {"path": "m", "chat_template": "never"}},
         "model.chat_template is 'never', but input.messages_column needs a chat template"),
    ],
)
def test_invalid_values_name_the_field(tmp_path, change, expected):
    path = write(tmp_path, "job.json", json.dumps({**BASE, **change}))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(info.value).startswith(f"{path}: invalid job spec")
    assert expected in str(info.value)


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("job.yaml", "name: [unclosed", "not valid YAML"),
        ("job.toml", "name = ", "not valid TOML"),
        ("job.json", "{", "not valid JSON"),
        ("job.yaml", "- a\n- b\n", "a spec must be a mapping of sections"),
        ("job.txt", "name: x", "spec files must end in one of"),
    ],
)
def test_unparsable_files(tmp_path, name, text, expected):
    with pytest.raises(SpecError, match=expected):
        load_spec(write(tmp_path, name, text))


def test_missing_spec_file(tmp_path):
    with pytest.raises(SpecError, match="spec file not found"):
        load_spec(tmp_path / "nope.yaml")


def test_bad_override_syntax(tmp_path):
    with pytest.raises(SpecError, match="expected section.field=value"):
        load_spec(write(tmp_path, "job.json", json.dumps(BASE)), ["sampling.max_tokens"])


def test_every_spec_field_is_documented_in_the_spec_reference():
    reference = (Path(__file__).parents[2] / "docs" / "spec.md").read_text()

    def paths(model, prefix=""):
        for name, field in model.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
                yield from paths(annotation, f"{prefix}{name}.")
            else:
                assert field.description, f"{prefix}{name} has no docstring"
                yield f"{prefix}{name}"

    missing = [p for p in paths(JobSpec) if f"### `{p}`" not in reference]
    assert not missing


def test_an_error_an_override_caused_names_the_override_and_dumps_no_section(tmp_path):
    path = write(tmp_path, "job.json", json.dumps(BASE))
    with pytest.raises(SpecError) as info:
        load_spec(path, ["sampling.temperature=-1", "sampling.top_p=0.5"])
    assert "sampling.temperature: Input should be greater than or equal to 0 (got -1) [from --set sampling.temperature=-1]" in str(info.value)
    assert "top_p" not in str(info.value)
    with pytest.raises(SpecError) as info:
        load_spec(path, ["input.messages_column=chat"])
    message = str(info.value)
    assert "input: exactly one of `prompt_column` and `messages_column` must be set [from --set input.messages_column=chat]" in message
    assert "{" not in message  # the section's contents are not dumped
    with pytest.raises(SpecError) as info:
        load_spec(write(tmp_path, "bad.json", json.dumps({**BASE, "sampling": {"temperature": -2}})), ["sampling.top_p=0.5"])
    assert "[from --set" not in str(info.value)  # the file's own mistake
