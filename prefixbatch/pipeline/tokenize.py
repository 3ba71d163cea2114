"""Prompt rows → token ids, with the model folder's own fast tokenizer and chat template.

Rows are encoded in batches. A row that cannot become a prompt (null, empty after
templating, malformed messages, a template that raises) becomes a `RowError`, never a job
failure. Only the tokenizer files are read: no weights are loaded here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from prefixbatch.config import ModelSpec
from prefixbatch.errors import ModelError
from prefixbatch.model_folder import context_length, read_config

TextKind = Literal["prompt", "messages"]


@dataclass(frozen=True)
class RowError:
    """Why one row produced no request; becomes an error row `"code: message"`."""

    code: str
    message: str


class PromptTokenizer:
    """Encodes prompt strings or chat conversations of one job into token ids."""

    def __init__(
        self,
        model_path: str,
        *,
        text_kind: TextKind,
        chat_template: Literal["auto", "always", "never"],
        trust_remote_code: bool = False,
    ) -> None:
        self.tokenizer = load_tokenizer(model_path, trust_remote_code=trust_remote_code)
        config = read_config(model_path)
        self.context_length = context_length(config)
        # Token ids a row may name (`logit_bias`): the model's embedding rows, else the tokenizer's.
        self.vocab_size = int(config.get("vocab_size") or len(self.tokenizer))
        self.use_template = text_kind == "messages" or chat_template == "always"
        self.text_kind = text_kind
        if self.use_template and not self.tokenizer.chat_template:
            msg = (
                f"model folder {model_path} has no chat template, which "
                + ("input.messages_column" if text_kind == "messages" else "model.chat_template: always")
                + " needs (add one to tokenizer_config.json, or use a prompt_column with chat_template: never)"
            )
            raise ModelError(msg)

    def encode(self, values: list[Any]) -> list[list[int] | RowError]:
        """One result per value, in order."""
        texts: list[str | RowError] = [self._render(value) for value in values]
        ok = [i for i, text in enumerate(texts) if isinstance(text, str)]
        # The template already carries bos and friends; raw prompts get the tokenizer's own.
        encoded = self.tokenizer(
            [texts[i] for i in ok], add_special_tokens=not self.use_template
        )["input_ids"] if ok else []
        results: list[list[int] | RowError] = list(texts)  # type: ignore[arg-type]
        for i, ids in zip(ok, encoded):
            results[i] = ids if ids else RowError("empty_prompt", "the prompt has no tokens")
        return results

    def _render(self, value: Any) -> str | RowError:
        if value is None:
            return RowError(f"null_{self.text_kind}", f"the {self.text_kind} is null")
        if self.text_kind == "messages":
            problem = _check_messages(value)
            if problem:
                return RowError("invalid_messages", problem)
        elif not self.use_template:
            return value if value.strip() else RowError("empty_prompt", "the prompt is empty")
        conversation = value if self.text_kind == "messages" else [{"role": "user", "content": value}]
        try:
            return self.tokenizer.apply_chat_template(
                conversation, tokenize=False, add_generation_prompt=True
            )
        except Exception as exc:  # a template may raise anything (jinja's raise_exception)
            return RowError("chat_template", f"the chat template failed on this row: {exc}")

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)


def _check_messages(value: Any) -> str | None:
    if not isinstance(value, list) or not value:
        return "messages must be a non-empty list of {role, content}"
    for position, message in enumerate(value):
        if not isinstance(message, dict):
            return f"message {position} is not a {{role, content}} struct"
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                return f"message {position} has no string `{key}`"
    return None


def load_tokenizer(model_path: str, *, trust_remote_code: bool = False) -> Any:
    """The folder's tokenizer via transformers, or a `ModelError` that says what is wrong."""
    folder = Path(model_path)
    if not folder.is_dir():
        raise ModelError(f"model.path {model_path}: no such folder")
    from transformers import AutoTokenizer  # heavy import, only when a job really starts

    try:
        return AutoTokenizer.from_pretrained(
            model_path, trust_remote_code=trust_remote_code, use_fast=True
        )
    except Exception as exc:
        msg = f"model.path {model_path}: cannot load a tokenizer from this folder: {exc}"
        raise ModelError(msg) from exc


def prompt_tokenizer(model: ModelSpec, *, messages: bool) -> PromptTokenizer:
    """The job's tokenizer: the model folder's, for a messages column or a prompt column."""
    return PromptTokenizer(
        model.path,
        text_kind="messages" if messages else "prompt",
        chat_template=model.chat_template,
        trust_remote_code=model.trust_remote_code,
    )
