"""The OpenAI Batch API's file formats: request lines in, response lines out.

Input (`input.format: openai`): a JSON Lines file, one request per line —
`{"custom_id", "method": "POST", "url": "/v1/chat/completions", "body": {"messages", ...}}`
— becomes a table the job reads like any other: `custom_id` (the id), `messages`, and one
column per sampling field the body sets (`max_tokens` / `max_completion_tokens`,
`temperature`, `top_p`, `seed`, `stop`, `n`, `presence_penalty`, `frequency_penalty`,
`logprobs` + `top_logprobs`, `response_format` as `json_schema`). A request prefixbatch
cannot run as asked (another endpoint, tools, images, streaming, a field of the wrong type)
keeps its line and gets its reason in `UNSUPPORTED`: it becomes an `unsupported_request`
error row, never a dropped one. A line that is not a JSON object with a unique string
`custom_id` is a job error naming the line.

Output (`output.format: openai`): once every row is committed, `commits.OPENAI_OUTPUT` in the output
folder holds one line per request in input order, built from the committed parts alone (so
each request is there exactly once, resumes included): a chat completion (`choices` = the
row's `n` samples, `usage`, logprobs when asked) under `response.body`, or `error`.

in → out: request lines → Arrow table; committed rows → response lines.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from prefixbatch.errors import InputError

__all__ = ["UNSUPPORTED", "requests_table", "response_lines"]

UNSUPPORTED = "_unsupported"  # column: why a request cannot run as asked (null: it can)
CHAT_URL = "/v1/chat/completions"
MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])

def _NUMBER(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _INTEGER(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# body field → (column, Arrow type, accepts the JSON value)
_FIELDS: dict[str, tuple[str, pa.DataType, Any]] = {
    "max_tokens": ("max_tokens", pa.int64(), _INTEGER),
    "max_completion_tokens": ("max_tokens", pa.int64(), _INTEGER),
    "temperature": ("temperature", pa.float64(), _NUMBER),
    "top_p": ("top_p", pa.float64(), _NUMBER),
    "seed": ("seed", pa.int64(), _INTEGER),
    "n": ("n", pa.int64(), _INTEGER),
    "presence_penalty": ("presence_penalty", pa.float64(), _NUMBER),
    "frequency_penalty": ("frequency_penalty", pa.float64(), _NUMBER),
}
# Body fields that change nothing here (the model is the job's; the rest is bookkeeping).
_IGNORED = {"model", "user", "store", "metadata", "service_tier", "stream_options", "logprobs", "top_logprobs",
            "response_format", "stop", "messages", "parallel_tool_calls", "reasoning_effort"}
COLUMNS = ["custom_id", "messages", "max_tokens", "temperature", "top_p", "seed", "n", "presence_penalty",
           "frequency_penalty", "stop", "logprobs", "json_schema", "logit_bias", UNSUPPORTED]


def requests_table(text: str, url: str) -> pa.Table:
    """A request file's lines as a job's input table (see the module docstring)."""
    rows: list[dict[str, Any]] = []
    problems: list[str] = []
    seen: set[str] = set()
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            request = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"line {number}: not valid JSON ({exc})")
            continue
        custom_id = request.get("custom_id") if isinstance(request, dict) else None
        if not isinstance(custom_id, str) or not custom_id:
            problems.append(f"line {number}: a request must be a JSON object with a string custom_id")
            continue
        if custom_id in seen:
            problems.append(f"line {number}: custom_id {custom_id!r} repeats an earlier line's")
            continue
        seen.add(custom_id)
        rows.append(_row(request))
    if problems:
        shown = problems[:5] + ([f"... ({len(problems) - 5} more)"] if len(problems) > 5 else [])
        raise InputError("\n  - ".join([f"file {url} is not a valid OpenAI Batch request file:", *shown]))
    types = {"custom_id": pa.string(), "messages": pa.list_(MESSAGE), "stop": pa.list_(pa.string()),
             "logprobs": pa.int64(), "json_schema": pa.string(), "logit_bias": pa.string(), UNSUPPORTED: pa.string()}
    types.update({column: kind for column, kind, _ in _FIELDS.values()})
    return pa.table({name: pa.array([row.get(name) for row in rows], types[name]) for name in COLUMNS})


def _row(request: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {"custom_id": request["custom_id"]}
    problem = _check_request(request)
    body = request.get("body") if isinstance(request.get("body"), dict) else {}
    messages = _messages(body.get("messages")) if problem is None else None
    if isinstance(messages, str):
        problem, messages = messages, None
    row["messages"] = messages
    for key, value in body.items():
        if problem is not None:
            break
        if key in _FIELDS and value is not None:
            column, _, accepts = _FIELDS[key]
            if not accepts(value):
                problem = f"body.{key} must be a {'whole number' if accepts is _INTEGER else 'number'}, got {value!r}"
            else:
                row[column] = value
        elif key == "logit_bias" and value is not None:  # checked as `sampling.logit_bias` (its JSON text)
            if not isinstance(value, dict):
                problem = f"body.logit_bias must be an object of token ids to biases, got {value!r}"
            else:
                row["logit_bias"] = json.dumps(value)
        elif key == "stream" and value:
            problem = "body.stream: streaming is not a batch request"
        elif key not in _FIELDS and key not in _IGNORED and key not in ("stream", "logit_bias"):
            problem = f"body.{key} is not supported"
    if problem is None:
        problem = _sampling(body, row)
    row[UNSUPPORTED] = problem
    return row


def _check_request(request: dict[str, Any]) -> str | None:
    if request.get("method", "POST") != "POST":
        return f"method {request.get('method')!r}: only POST requests are run"
    if request.get("url") != CHAT_URL:
        return f"url {request.get('url')!r}: only {CHAT_URL} requests are run (a job reads one kind)"
    if not isinstance(request.get("body"), dict):
        return "body must be a JSON object"
    return None


def _messages(value: Any) -> list[dict[str, str]] | str:
    """The messages as {role, content} with text content; or why they cannot be."""
    if not isinstance(value, list) or not value:
        return "body.messages must be a non-empty list"
    out = []
    for position, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            return f"body.messages[{position}] must be an object with a string role"
        content = message.get("content")
        if isinstance(content, list):  # content parts: text only
            if any(not isinstance(p, dict) or p.get("type") != "text" for p in content):
                return f"body.messages[{position}]: only text content parts are supported"
            content = "".join(str(p.get("text", "")) for p in content)
        if not isinstance(content, str):
            return f"body.messages[{position}].content must be a string or text parts"
        out.append({"role": message["role"], "content": content})
    return out


def _sampling(body: dict[str, Any], row: dict[str, Any]) -> str | None:
    """stop, logprobs / top_logprobs and response_format into their columns; or the problem."""
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            return "body.stop must be a string or a list of strings"
        row["stop"] = stop
    if body.get("logprobs"):
        top = body.get("top_logprobs", 0)
        if not _INTEGER(top):
            return f"body.top_logprobs must be a whole number, got {top!r}"
        row["logprobs"] = top
    fmt = body.get("response_format")
    if fmt is not None:
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind == "json_object":
            row["json_schema"] = json.dumps({"type": "object"})
        elif kind == "json_schema":
            schema = (fmt.get("json_schema") or {}).get("schema") if isinstance(fmt.get("json_schema"), dict) else None
            if not isinstance(schema, dict):
                return "body.response_format.json_schema.schema must be a JSON schema object"
            row["json_schema"] = json.dumps(schema)  # properties in the order given: the output's order
        elif kind != "text":
            return f"body.response_format: type {kind!r} is not supported (text, json_object, json_schema)"
    return None


def response_lines(rows: Sequence[dict[str, Any]], *, model: str, order: dict[Any, int]) -> list[str]:
    """One response line per request (custom_id), in input order, from the committed output
    rows (each request's samples grouped as its choices; an error row as `error`)."""
    by_id: dict[Any, list[dict[str, Any]]] = {}
    for row in rows:
        by_id.setdefault(row["custom_id"], []).append(row)
    created = int(time.time())
    lines = []
    for custom_id in sorted(by_id, key=lambda i: order[i]):
        samples = sorted(by_id[custom_id], key=lambda r: r["sample_index"])
        request_id = "batch_req_" + hashlib.sha1(str(custom_id).encode()).hexdigest()[:24]
        first = samples[0]
        if first["finish_reason"] == "error":
            code, _, message = (first["error"] or "error: ").partition(": ")
            line = {"id": request_id, "custom_id": custom_id, "response": None,
                    "error": {"code": code, "message": message}}
        else:
            completion_tokens = sum(r["num_output_tokens"] for r in samples)
            body = {
                "id": "chatcmpl-" + request_id[len("batch_req_"):],
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [_choice(r) for r in samples],
                "usage": {"prompt_tokens": first["num_prompt_tokens"], "completion_tokens": completion_tokens,
                          "total_tokens": first["num_prompt_tokens"] + completion_tokens},
            }
            line = {"id": request_id, "custom_id": custom_id,
                    "response": {"status_code": 200, "request_id": request_id, "body": body}, "error": None}
        lines.append(json.dumps(line, ensure_ascii=False))
    return lines


def _choice(row: dict[str, Any]) -> dict[str, Any]:
    logprobs = None
    if row.get("logprobs") is not None:
        logprobs = {"content": [
            {"token": t["token"], "logprob": t["logprob"], "bytes": list(t["token"].encode()),
             "top_logprobs": [{"token": a["token"], "logprob": a["logprob"], "bytes": list(a["token"].encode())}
                              for a in t["top_logprobs"]]}
            for t in row["logprobs"]
        ]}
    return {"index": row["sample_index"], "message": {"role": "assistant", "content": row["output_text"]},
            "logprobs": logprobs, "finish_reason": row["finish_reason"]}
