"""OpenAI Batch API files: request lines in (`input.format: openai`), response lines out
(`output.format: openai`), every request exactly once, unsupported ones as error lines."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from prefixbatch.jobs.cli import main
from tests.output_helpers import finished_output

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}


def chat(custom_id: str, content: str, **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}], **body}}


REQUESTS = [
    chat("plain", "Tell me about trains.", max_tokens=4),
    chat("samples", "Name a river.", max_completion_tokens=3, n=2, temperature=0.8, seed=7),
    chat("logprobs", "Say yes.", max_tokens=3, logprobs=True, top_logprobs=2),
    chat("json", "Is it ok?", max_tokens=24, response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": SCHEMA}}),
    chat("parts", "ignored", max_tokens=2) | {"body": {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}], "max_tokens": 2}},
    {"custom_id": "completions", "method": "POST", "url": "/v1/completions", "body": {"prompt": "Hello"}},
    chat("tools", "Call a tool.", tools=[{"type": "function", "function": {"name": "f"}}]),
    chat("image", "x") | {"body": {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}},
    chat("bad-temperature", "x", temperature="hot"),
    chat("negative-temperature", "x", temperature=-1),
    chat("biased", "Tell me about trains.", max_tokens=4, logit_bias={"17": 100}),
    chat("bias-list", "x", logit_bias=[17, 100]),
    chat("bias-vocab", "x", logit_bias={"99999": 1}),
]


def write_job(tmp_path: Path, model: Path, lines: list[str]) -> Path:
    (tmp_path / "batch.jsonl").write_text("\n".join(lines) + "\n")
    path = tmp_path / "job.json"
    path.write_text(json.dumps({"name": "batch", "input": {"path": "batch.jsonl", "format": "openai"},
                                "output": {"path": "out", "format": "openai"}, "model": {"path": str(model)},
                                "sampling": {"max_tokens": 8}}))
    return path


def test_every_request_answered_once_in_order(tmp_path: Path, tiny_llama: Path) -> None:
    path = write_job(tmp_path, tiny_llama, [json.dumps(r) for r in REQUESTS])
    assert main(["run", str(path), "--no-progress"]) == 0
    lines = [json.loads(line) for line in (tmp_path / "out" / "_openai_batch_output.jsonl").read_text().splitlines()]
    assert [line["custom_id"] for line in lines] == [r["custom_id"] for r in REQUESTS]
    by_id = {line["custom_id"]: line for line in lines}
    plain = by_id["plain"]["response"]
    assert plain["status_code"] == 200 and by_id["plain"]["error"] is None
    body = plain["body"]
    assert body["object"] == "chat.completion" and body["model"] == tiny_llama.name
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    assert 1 <= body["usage"]["completion_tokens"] <= 4 and body["choices"][0]["message"]["role"] == "assistant"
    samples = by_id["samples"]["response"]["body"]["choices"]
    assert [c["index"] for c in samples] == [0, 1] and all(c["finish_reason"] in ("stop", "length") for c in samples)
    content = by_id["logprobs"]["response"]["body"]["choices"][0]["logprobs"]["content"]
    assert content and all(len(t["top_logprobs"]) == 2 and t["logprob"] <= 0 for t in content)
    answer = by_id["json"]["response"]["body"]["choices"][0]
    assert answer["finish_reason"] == "stop"
    jsonschema.validate(json.loads(answer["message"]["content"]), SCHEMA)
    assert by_id["parts"]["response"]["status_code"] == 200
    for custom_id, words in [("completions", "only /v1/chat/completions"), ("tools", "body.tools is not supported"),
                             ("image", "only text content parts"), ("bad-temperature", "body.temperature must be a number")]:
        assert by_id[custom_id]["response"] is None, custom_id
        assert by_id[custom_id]["error"]["code"] == "unsupported_request" and words in by_id[custom_id]["error"]["message"]
    assert by_id["negative-temperature"]["error"]["code"] == "invalid_sampling"
    biased = by_id["biased"]["response"]["body"]["choices"][0]["message"]["content"]
    assert by_id["biased"]["response"]["body"]["usage"]["completion_tokens"] == 4  # token 17, four times
    assert biased != by_id["plain"]["response"]["body"]["choices"][0]["message"]["content"]
    assert "body.logit_bias must be an object" in by_id["bias-list"]["error"]["message"]
    assert by_id["bias-vocab"]["error"]["code"] == "invalid_logit_bias"
    parquet = finished_output(str(tmp_path / "out"))
    assert sorted({r["custom_id"] for r in parquet}) == sorted(r["custom_id"] for r in REQUESTS)


def test_a_malformed_request_file_is_one_message_naming_the_lines(tmp_path: Path, tiny_llama: Path, capsys) -> None:
    lines = [json.dumps(REQUESTS[0]), "{not json", json.dumps({"method": "POST"}), json.dumps(REQUESTS[0])]
    path = write_job(tmp_path, tiny_llama, lines)
    assert main(["run", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "is not a valid OpenAI Batch request file" in err or "is not a readable OpenAI Batch request file" in err
    assert "line 2: not valid JSON" in err and "line 3: a request must be a JSON object with a string custom_id" in err
    assert "line 4: custom_id 'plain' repeats an earlier line's" in err


def test_openai_input_reads_its_own_columns(tmp_path: Path, tiny_llama: Path, capsys) -> None:
    path = write_job(tmp_path, tiny_llama, [json.dumps(REQUESTS[0])])
    spec = json.loads(path.read_text())
    spec["input"]["prompt_column"] = "prompt"
    path.write_text(json.dumps(spec))
    assert main(["run", str(path), "--no-progress"]) == 2
    assert "input.format 'openai' reads its own columns: leave prompt_column unset" in capsys.readouterr().err


@pytest.mark.parametrize("resume", [False, True])
def test_the_response_file_is_rewritten_on_overwrite_and_resume(tmp_path: Path, tiny_llama: Path, resume: bool) -> None:
    path = write_job(tmp_path, tiny_llama, [json.dumps(r) for r in REQUESTS[:2]])
    assert main(["run", str(path), "--no-progress"]) == 0
    first = (tmp_path / "out" / "_openai_batch_output.jsonl").read_text()
    assert main(["run", str(path), "--no-progress", "--resume" if resume else "--overwrite"]) == 0
    again = (tmp_path / "out" / "_openai_batch_output.jsonl").read_text()
    assert [json.loads(x)["custom_id"] for x in again.splitlines()] == ["plain", "samples"]
    assert [json.loads(x)["response"]["body"]["choices"] for x in again.splitlines()] == [
        json.loads(x)["response"]["body"]["choices"] for x in first.splitlines()]


LINE_SCHEMA = {  # the Batch API's output line, as its documentation gives it
    "type": "object",
    "required": ["id", "custom_id", "response", "error"],
    "properties": {
        "id": {"type": "string"}, "custom_id": {"type": "string"},
        "response": {"oneOf": [{"type": "null"}, {"type": "object", "required": ["status_code", "request_id", "body"],
                                                   "properties": {"status_code": {"type": "integer"}}}]},
        "error": {"oneOf": [{"type": "null"}, {"type": "object", "required": ["code", "message"]}]},
    },
}


def test_response_lines_parse_as_the_openai_packages_types(tmp_path: Path, tiny_llama: Path) -> None:
    path = write_job(tmp_path, tiny_llama, [json.dumps(r) for r in REQUESTS])
    assert main(["run", str(path), "--no-progress"]) == 0
    lines = [json.loads(x) for x in (tmp_path / "out" / "_openai_batch_output.jsonl").read_text().splitlines()]
    for line in lines:
        jsonschema.validate(line, LINE_SCHEMA)
        assert (line["response"] is None) != (line["error"] is None)
    openai_types = pytest.importorskip("openai.types")
    from openai.types.chat import ChatCompletion

    for line in lines:
        if line["response"] is not None:
            completion = ChatCompletion.model_validate(line["response"]["body"], strict=True)
            assert completion.usage.completion_tokens == sum(
                len(c.logprobs.content) if c.logprobs else 0 for c in completion.choices
            ) or not any(c.logprobs for c in completion.choices)
        else:
            openai_types.BatchError.model_validate({"code": line["error"]["code"], "message": line["error"]["message"]})
