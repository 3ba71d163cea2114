"""Structured output: a row's JSON schema, regex or choice list as a token mask, with xgrammar.

xgrammar (the grammar engine of vLLM and SGLang) compiles a constraint against the model's
vocabulary once; each constrained sequence gets a `GrammarMatcher` that, before every token,
fills a bitmask of the tokens that keep the output inside the grammar, and then advances by
the token picked. Once the grammar is complete only the end-of-sequence tokens remain, so an
output that ends by EOS is whole and valid; one that reaches `max_tokens` first is cut
(finish reason `length`). Rows without a constraint pay nothing.

Both executors call the same `Constraints` (native in its sampling step, hf through
`GrammarMasker`), after penalties and before temperature/top-k/top-p, so at temperature 0
they pick the same tokens. A constraint that does not compile is the row's error
(`constraint_error`), or the job's when the spec set it (`check_spec_constraint`).

in → out: `SamplingParams` constraints → compiled grammars (cached) → per-step masks on logits.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import torch
from transformers import LogitsProcessor

from prefixbatch.types import SamplingParams

__all__ = ["Constraints", "GrammarMasker", "LazyConstraints", "Matcher", "check_spec_constraint", "choice_grammar"]


def choice_grammar(choices: Sequence[str]) -> str:
    """An EBNF grammar whose language is exactly the choices (JSON string literals escape them)."""
    return "root ::= " + " | ".join(json.dumps(choice) for choice in choices)


def _describe(params: SamplingParams) -> tuple[str, str] | None:
    """(field, the text compiled) of the request's constraint; None when it has none."""
    if params.json_schema is not None:
        return "json_schema", params.json_schema
    if params.regex is not None:
        return "regex", params.regex
    if params.choice is not None:
        return "choice", choice_grammar(params.choice)
    return None


def _first_line(exc: Exception) -> str:
    # xgrammar prefixes its messages with a timestamp and the C++ source position.
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text.split(": ", 1)[-1] if text.startswith("[") else text


class Matcher:
    """One sequence's place in its grammar."""

    def __init__(self, matcher: Any) -> None:
        self.matcher = matcher

    def accept(self, token: int) -> None:
        if not self.matcher.is_terminated():
            self.matcher.accept_token(token)


class Constraints:
    """The model's vocabulary as xgrammar sees it, and every constraint compiled once."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        import xgrammar  # imported once a job has a tokenizer (its C++ library is large)

        self.xgr = xgrammar
        self.info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self.compiler = xgrammar.GrammarCompiler(self.info)
        self._compiled: dict[tuple[str, str], Any] = {}
        self._bitmask = None

    def compile(self, params: SamplingParams) -> Any | str | None:
        """The request's compiled grammar; the problem as a message when it does not compile;
        None without a constraint."""
        described = _describe(params)
        if described is None:
            return None
        if described not in self._compiled:
            field, text = described
            try:
                if field == "json_schema":
                    compiled = self.compiler.compile_json_schema(text, any_whitespace=False, separators=(",", ":"))
                elif field == "regex":
                    compiled = self.compiler.compile_regex(text)
                else:
                    compiled = self.compiler.compile_grammar(text)
            except Exception as exc:  # xgrammar raises RuntimeError with the parser's message
                compiled = f"{field} does not compile: {_first_line(exc)}"
            self._compiled[described] = compiled
        return self._compiled[described]

    def matcher(self, params: SamplingParams) -> Matcher | str | None:
        """A fresh matcher for one sequence (or the compile error, or None: unconstrained)."""
        compiled = self.compile(params)
        if compiled is None or isinstance(compiled, str):
            return compiled
        return Matcher(self.xgr.GrammarMatcher(compiled))

    def mask(self, logits: torch.Tensor, matchers: Sequence[Matcher]) -> None:
        """-inf, in place, on every token that row i's matcher does not allow next.
        logits: [S, V] fp32 on the CPU or a GPU."""
        rows = len(matchers)
        if self._bitmask is None or self._bitmask.shape[0] < rows:
            self._bitmask = self.xgr.allocate_token_bitmask(max(rows, 8), self.info.vocab_size)
        bitmask = self._bitmask[:rows]
        for row, matcher in enumerate(matchers):
            matcher.matcher.fill_next_token_bitmask(bitmask, row)
        self.xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device))


class LazyConstraints:
    """`Constraints` for a tokenizer, built (xgrammar imported) at the first constrained row."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self._built: Constraints | None = None

    def get(self) -> Constraints:
        if self._built is None:
            self._built = Constraints(self.tokenizer, self.vocab_size)
        return self._built


class GrammarMasker(LogitsProcessor):
    """`Constraints` inside transformers `generate`: each constrained row's matcher advanced by
    the token its row got last step, then its mask applied; after `Penalizer`, before the draw."""

    def __init__(
        self,
        matchers: Sequence[Matcher | None],
        constraints: Constraints | None,
        prompt_len: int,
        finished: Sequence[object | None],
    ) -> None:
        self.matchers = list(matchers)
        self.constraints = constraints
        self.prompt_len = prompt_len
        self.finished = finished  # the stopping criterion's per-row finishes: None while running
        self.rows = [row for row, m in enumerate(self.matchers) if m is not None]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        rows = [row for row in self.rows if self.finished[row] is None]  # ended rows get pad tokens
        if not rows:
            return scores
        if input_ids.shape[1] > self.prompt_len:
            last = input_ids[:, -1].tolist()
            for row in rows:
                self.matchers[row].accept(last[row])
        masked = scores[rows]
        self.constraints.mask(masked, [self.matchers[row] for row in rows])
        out = scores.clone()
        out[rows] = masked
        return out


def check_spec_constraint(sampling: SamplingParams, tokenizer: Any, vocab_size: int) -> str | None:
    """The problem with the spec's own constraint (a job error), or None."""
    if _describe(sampling) is None:
        return None
    compiled = Constraints(tokenizer, vocab_size).compile(sampling)
    return compiled if isinstance(compiled, str) else None
