"""The `input`, `output` and `sampling` sections of a job spec.

`sampling` holds the job's defaults; an input column of the same name overrides a field
per row (see `pipeline.requests`). `SamplingSpec` is the one list of sampling fields: the
override columns and their types (`columns`), the per-request params (`requests`) and the
spec reference (docs/spec.md) are derived from it, so a new option is one field here plus its use.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from prefixbatch.config import ShownAs, StrictModel


class InputSpec(StrictModel):
    """Where the prompts are and which columns hold what."""

    path: str | tuple[str, ...]
    """Input files: a local path, a glob (`data/*.parquet`) or an fsspec URL
    (`s3://bucket/prompts/*.parquet`, `memory://x.parquet`), or a list of them. A relative
    local path is resolved against the spec file's folder. Parquet (streamed by row group),
    or by name `.csv` (CSV with a header row) and `.jsonl` / `.ndjson` / `.json` (JSON Lines:
    one object per line; lists and objects become list and struct columns), read whole."""

    id_column: str = "id"
    """Column that identifies each row (string or integer, unique, never null). Copied to the output."""

    prompt_column: str | None = None
    """Column of prompt strings. Exactly one of `prompt_column` and `messages_column` is set."""

    messages_column: str | None = None
    """Column of chat conversations: a list of `{role, content}` structs per row, rendered
    with the model's chat template."""

    carry_columns: tuple[str, ...] = ()
    """Input columns copied unchanged to the output rows."""

    continuations_column: str | None = None
    """`task: score` only: column of continuations to score after each row's prompt (a list of
    strings per row). Each continuation becomes an output row (`sample_index` = its position
    in the list) with its summed logprob and whether it is the greedy continuation."""

    storage_options: dict[str, Any] = Field(default_factory=dict)
    """Passed to fsspec for the input filesystem (e.g. `{endpoint_url: ..., key: ..., secret: ...}` for S3)."""

    truncate: Literal["none", "left", "right"] = "none"
    """A prompt that leaves no room for `max_tokens` in the model's context: `none` keeps it
    whole (`max_tokens` is clamped to the room left, and a prompt that fills the context is a
    `prompt_too_long` error row); `left` drops tokens from its start, `right` from its end,
    until `max_tokens` fits (at least one prompt token stays). The summary counts such rows."""

    max_tokens_overflow: Literal["clamp", "error"] = "clamp"
    """When prompt + `max_tokens` exceeds the model's context (after any truncation): `clamp`
    lowers the row's `max_tokens` to fit and counts the row in the summary; `error` makes
    the row a `max_tokens_over_context` error row."""

    max_prompt_chars: int = Field(1_000_000, ge=1)
    """Longest prompt accepted, in characters (for messages: all contents together). A longer
    row becomes a `prompt_too_large` error row before it is tokenized."""

    ignore_corrupt_files: bool = False
    """Skip input files that are not readable Parquet (listed in `_manifest.json` and the
    summary) instead of refusing the job."""

    format: Literal["auto", "openai"] = "auto"
    """`auto`: by file name (Parquet, `.csv`, `.jsonl`). `openai`: JSON Lines files of OpenAI
    Batch API requests (`custom_id`, `method`, `url`, `body`); the id is `custom_id`, the
    messages and sampling fields come from each body, and a request that cannot run as
    asked is an `unsupported_request` error row. Leave the column settings unset."""

    @model_validator(mode="before")
    @classmethod
    def _openai_columns(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("format") == "openai":
            given = [k for k in ("prompt_column", "messages_column", "id_column", "continuations_column") if data.get(k)]
            if given:
                raise ValueError(f"input.format 'openai' reads its own columns: leave {', '.join(given)} unset")
            data = {**data, "id_column": "custom_id", "messages_column": "messages"}
        return data

    @model_validator(mode="after")
    def _one_text_column(self) -> InputSpec:
        if (self.prompt_column is None) == (self.messages_column is None):
            msg = "exactly one of `prompt_column` and `messages_column` must be set"
            raise ValueError(msg)
        return self

    @property
    def paths(self) -> tuple[str, ...]:
        return (self.path,) if isinstance(self.path, str) else self.path

    @property
    def text_column(self) -> str:
        return self.prompt_column or self.messages_column  # type: ignore[return-value]


class OutputSpec(StrictModel):
    """Where the completions go."""

    path: str
    """Output folder: a local path or an fsspec URL (`s3://bucket/run1/`). Part files
    `part-*.parquet`, their commit records `_commits/`, `_job.json`, `_manifest.json`,
    `_summary.json` and, once every input row is in, `_SUCCESS` are written inside it."""

    mode: Literal["error", "overwrite", "resume"] = "error"
    """`error`: refuse a folder that is not empty. `overwrite`: remove what an earlier
    prefixbatch job wrote there (`_job.json`, `_commits/`, `part-*.parquet`, `_manifest.json`,
    `_summary.json`, `_SUCCESS`, temporaries of interrupted writes), then start fresh; a folder
    holding anything else, or without `_job.json`, is refused and nothing is deleted.
    `resume`: keep the rows an earlier run of the same job committed and run only the rest
    (an empty folder starts fresh; a folder written by a different job is refused).
    `run --overwrite` / `--resume` set it too."""

    rows_per_part: int = Field(10_000, ge=1)
    """Rows per output part file."""

    checkpoint_seconds: float | None = Field(60.0, gt=0)
    """Seconds between checkpoints of the generations in flight (also written on Ctrl-C /
    SIGTERM): a killed run resumed with `--resume` continues each row from its checkpoint
    instead of from its prompt (`native`; on `vllm` only greedy rows without logprobs or
    presence/frequency penalties; `hf` restarts every row). Null: no checkpoints (a kill
    loses all work in flight)."""

    storage_options: dict[str, Any] = Field(default_factory=dict)
    """Passed to fsspec for the output filesystem."""

    format: Literal["parquet", "openai"] = "parquet"
    """`openai`: besides the Parquet parts, `_openai_batch_output.jsonl` in the folder once every
    row is in: one OpenAI Batch API response line per request (`custom_id`, `response.body` a
    chat completion with `usage`, or `error`), in input order, each request exactly once."""


class SamplingSpec(StrictModel):
    """Decoding defaults; an input column of the same name overrides a field per row."""

    max_tokens: int = Field(256, ge=1)
    """Most tokens generated per row (clamped so prompt + output fits the model's context)."""

    temperature: float = Field(0.0, ge=0.0)
    """0 is greedy; larger is more random."""

    top_p: float = Field(1.0, gt=0.0, le=1.0)
    """Nucleus sampling: keep the smallest set of tokens whose probability adds up to this."""

    top_k: int | None = Field(None, ge=1)
    """Keep only the k most likely tokens (null: no cut)."""

    seed: int = 0
    """Job seed. Each row's generator is seeded from it and the row's id, so a row's random
    draws do not depend on its batch mates, sharding or resumes; with
    `executor.native.batch_invariant` its sample is then the same to the last token in any run
    (without it, fp32 rounding that varies with the batch flips a draw about once in ten
    thousand tokens). A `seed` column sets it per row. With `n > 1`, sample 0 uses the row's
    seed and sample k a seed derived from it and k."""

    stop: Annotated[tuple[str, ...], ShownAs("string or list of strings")] = ()
    """Stop strings: the output is cut before the first one that appears (one string or a
    list)."""

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop_string(cls, value: Any) -> Any:
        # `stop: "\n"` is what people write for a single stop string.
        return (value,) if isinstance(value, str) else value

    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end generation (besides the model's end-of-sequence tokens)."""

    n: int = Field(1, ge=1)
    """Completions per prompt: a row becomes n output rows (`sample_index` 0..n-1), each sampled
    with its own seed (see `seed`), so samples differ under temperature > 0 and are the same
    in every run. The samples share the prompt's KV in the native engine. An `n` column sets
    it per row."""

    repetition_penalty: float = Field(1.0, gt=0.0)
    """transformers' repetition penalty over the prompt's and the output's tokens: a token seen
    before has its logit divided by this when positive, multiplied when negative (1: none;
    above 1 discourages repeats)."""

    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    """OpenAI's presence penalty: subtracted from the logit of every token already in the
    output (0: none; positive discourages repeats)."""

    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    """OpenAI's frequency penalty: subtracted from a token's logit once per time it is already
    in the output (0: none)."""

    min_tokens: int = Field(0, ge=0)
    """Output tokens before the output may stop on a token: until then the end-of-sequence and
    `stop_token_ids` tokens are masked (stop strings still apply). At most `max_tokens`;
    lowered with `max_tokens` when that is clamped to the context."""

    min_p: float = Field(0.0, ge=0.0, le=1.0)
    """Keep only tokens at least this likely relative to the most likely one (after
    temperature, top-k and top-p: a token of probability p stays when p ≥ min_p · the top
    token's); 0: no cut. Sampled rows only (greedy picks the top token anyway)."""

    logit_bias: Annotated[
        tuple[tuple[int, float], ...], ShownAs("mapping of token id to a bias from -100 to 100")
    ] = ()
    """Added to the given tokens' logits before anything else (OpenAI's `logit_bias`): -100
    bans a token, 100 all but forces it; greedy rows too. In a spec a mapping (`{15: -100}`),
    in a column a JSON object (`{"15": -100}`). Ids must be in the model's vocabulary (a row
    whose are not is an error row)."""

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _bias_pairs(cls, value: Any) -> Any:
        # A mapping (YAML keys may come as strings, JSON's always do) → sorted (id, bias) pairs.
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"not valid JSON: {exc}") from None
        if value is None:
            return ()
        if isinstance(value, dict):
            pairs = []
            for key, bias in value.items():
                try:
                    token = int(key)
                except (TypeError, ValueError):
                    raise ValueError(f"keys are token ids (integers), got {key!r}") from None
                pairs.append((token, bias))
            return tuple(sorted(pairs))
        return value

    @field_validator("logit_bias")
    @classmethod
    def _bias_range(cls, value: tuple[tuple[int, float], ...]) -> tuple[tuple[int, float], ...]:
        for token, bias in value:
            if token < 0:
                raise ValueError(f"token ids are ≥ 0, got {token}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"token {token}: a bias is from -100 to 100, got {bias}")
        return value

    logprobs: int | None = Field(None, ge=0, le=20)
    """Log-probabilities in the output (`logprobs` column): for every output token its own and
    the k most likely tokens' (0–20; null: no column values). From the model's distribution
    (fp32 log-softmax of the raw logits), before penalties, temperature and top-k/top-p. A row
    that asks for them is not checkpointed mid-generation: a resumed run generates it again
    from its prompt (to the same output)."""

    prompt_logprobs: int | None = Field(None, ge=0, le=20)
    """Log-probabilities of the prompt's tokens (`prompt_logprobs` column): for every prompt
    token after the first its own and the k most likely tokens' (0–20; null: none). A prefix
    that rows share is scored once for all of them (`native`; `vllm` computes each request's
    own)."""

    json_schema: Annotated[str | None, ShownAs("JSON schema (an object, or its JSON text) or null")] = None
    """Structured output: the output must be JSON valid against this schema (a schema object
    in the spec; per row, a column of JSON strings), written compact (no free whitespace, `,`
    and `:` separators). Enforced token by token with xgrammar; an output that ends by
    end-of-sequence is valid, one cut by `max_tokens` is not (finish reason `length`, counted
    in the summary). A schema that does not compile is a job error (the spec's) or an
    `invalid_constraint` error row (a row's)."""

    regex: str | None = None
    """Structured output: the output must match this regular expression (xgrammar's syntax)."""

    choice: tuple[str, ...] | None = None
    """Structured output: the output must be exactly one of these strings (labelling). At most
    one of `json_schema`, `regex` and `choice` is set; a row's own (an input column) replaces
    the spec's."""

    @field_validator("json_schema", mode="before")
    @classmethod
    def _schema_as_text(cls, value: Any) -> Any:
        # A schema object in YAML/JSON specs; a JSON string in a column: kept as compact text, its
        # keys in the order written (the grammar generates `properties` in that order, as OpenAI's
        # structured outputs do: sorting them would reorder every output object).
        if isinstance(value, dict | bool):
            return json.dumps(value)
        if isinstance(value, str):
            try:
                parsed = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"not valid JSON: {exc}") from None
            if not isinstance(parsed, dict | bool):
                raise ValueError(f"a JSON schema is an object, got {type(parsed).__name__}")
            return json.dumps(parsed)
        return value

    @field_validator("choice")
    @classmethod
    def _choices_given(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is not None and (not value or not all(value)):
            raise ValueError("must be a non-empty list of non-empty strings")
        return value

    @model_validator(mode="after")
    def _one_constraint(self) -> SamplingSpec:
        given = [name for name in ("json_schema", "regex", "choice") if getattr(self, name) is not None]
        if len(given) > 1:
            raise ValueError(f"at most one of json_schema, regex and choice may be set, got {' and '.join(given)}")
        return self

    @model_validator(mode="after")
    def _min_within_max(self) -> SamplingSpec:
        if self.min_tokens > self.max_tokens:
            msg = f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})"
            raise ValueError(msg)
        return self


# Per-row override columns: an input column named like a sampling field overrides it.
SAMPLING_FIELDS: tuple[str, ...] = tuple(SamplingSpec.model_fields)
