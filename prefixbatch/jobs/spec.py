"""The job spec: one file (YAML, TOML or JSON) that says what to read, run and write.

`load_spec(file, overrides)` is the only way in: it parses the file, applies `--set
section.field=value` overrides, resolves relative local paths against the file's folder and
validates. Every problem becomes one `SpecError` whose message names the file and the field.
"""

from __future__ import annotations

import difflib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from prefixbatch.cluster.config import ClusterSpec
from prefixbatch.config import StrictModel
from prefixbatch.errors import SpecError
from prefixbatch.executors.config import ExecutorSpec, ModelSpec
from prefixbatch.model_folder import is_hub_id, resolve_model_path
from prefixbatch.pipeline.config import InputSpec, OutputSpec, SamplingSpec

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class JobSpec(StrictModel):
    """A whole job: input rows, the model, decoding defaults, the executor, the output folder."""

    name: str
    """Job name, recorded in the output's metadata and summary."""

    task: Literal["generate", "score"] = "generate"
    """`generate`: complete each prompt. `score`: generate nothing; score each of the row's
    continuations (`input.continuations_column`) after its prompt — the sum of the
    continuation tokens' logprobs and whether each token is the model's argmax (the
    `loglikelihood` request of lm-evaluation-harness)."""

    input: InputSpec
    """Where the prompts are (Parquet, CSV, JSON Lines or OpenAI Batch files) and which columns
    hold the id, the prompt or messages, and what to copy to the output."""

    output: OutputSpec
    """The output folder: Parquet part files, their commit records, `_job.json`,
    `_manifest.json`, `_summary.json` and `_SUCCESS`; how a folder that is not empty is treated."""

    model: ModelSpec
    """The model to run: a Hugging Face checkpoint folder, a Hub id or a GGUF file."""

    sampling: SamplingSpec = SamplingSpec()
    """Decoding defaults for every row; an input column named like a field (`max_tokens`,
    `temperature`, `seed`, `n`, `stop`, `json_schema`, ...) overrides it for its row where it
    is not null, and a value out of range makes that row an `invalid_sampling` error row."""

    executor: ExecutorSpec = ExecutorSpec()
    """Which engine runs the plan (`native`, `hf`, `vllm`), on which device, with how much KV
    memory; each engine's own settings in its sub-section."""

    cluster: ClusterSpec = ClusterSpec()
    """One process (the default) or a Dask cluster that runs the plan's shards."""

    max_error_fraction: float = Field(1.0, ge=0.0, le=1.0)
    """Highest share of input rows that may end as error rows. Above it the run still writes
    every row, then exits with code 3 so a pipeline notices (1.0: never)."""

    @model_validator(mode="after")
    def _continuations_for_scoring(self) -> JobSpec:
        if (self.task == "score") != (self.input.continuations_column is not None):
            msg = (
                "task 'score' needs input.continuations_column (a list of strings per row)"
                if self.task == "score"
                else "input.continuations_column is only read by task: score"
            )
            raise ValueError(msg)
        return self

    @model_validator(mode="after")
    def _template_for_messages(self) -> JobSpec:
        if self.input.messages_column is not None and self.model.chat_template == "never":
            msg = "model.chat_template is 'never', but input.messages_column needs a chat template"
            raise ValueError(msg)
        return self


SPEC_SUFFIXES = {".yaml": "yaml", ".yml": "yaml", ".toml": "toml", ".json": "json"}


def load_spec(file: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> JobSpec:
    """Read, override, resolve and validate a spec file."""
    path = Path(file)
    raw = _parse_file(path)
    for override in overrides:
        _apply_override(raw, override)
    return spec_from_dict(raw, base_dir=path.resolve().parent, source=str(path), overrides=overrides)


def spec_from_dict(
    raw: dict[str, Any], *, base_dir: Path, source: str, overrides: Sequence[str] = ()
) -> JobSpec:
    """Validate a parsed spec; relative local paths are taken relative to `base_dir`.
    `overrides`: the `--set` arguments applied to `raw`, named in the errors they cause."""
    try:
        spec = JobSpec.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(format_validation_error(exc, source, overrides)) from exc
    return resolve_paths(spec, base_dir)


def _parse_file(path: Path) -> dict[str, Any]:
    kind = SPEC_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        msg = f"{path}: spec files must end in one of {sorted(SPEC_SUFFIXES)}, got {path.suffix!r}"
        raise SpecError(msg)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"{path}: spec file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"{path}: cannot read spec file: {exc}") from None
    try:
        data = _PARSERS[kind](text)
    except (yaml.YAMLError, tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise SpecError(f"{path}: not valid {kind.upper()}: {exc}") from None
    if not isinstance(data, dict):
        msg = f"{path}: a spec must be a mapping of sections (name, input, output, model, ...), got {type(data).__name__}"
        raise SpecError(msg)
    return data


_PARSERS = {"yaml": yaml.safe_load, "toml": tomllib.loads, "json": json.loads}


def _apply_override(raw: dict[str, Any], override: str) -> None:
    """`section.field=value`; the value is read as a YAML scalar/flow (so `32` is an int, `[a, b]` a list)."""
    key, sep, value_text = override.partition("=")
    if not sep or not key.strip():
        raise SpecError(f"--set {override!r}: expected section.field=value")
    try:
        value = yaml.safe_load(value_text) if value_text.strip() else ""
    except yaml.YAMLError:
        value = value_text
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise SpecError(f"--set {override!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def format_validation_error(exc: ValidationError, source: str, overrides: Sequence[str] = ()) -> str:
    """One line per problem: `file: field.path: what is wrong (got ...)`, and which `--set`
    override set the field (or a field of the section) it is about."""
    lines = [f"{source}: invalid job spec"]
    for error in exc.errors():
        loc = ".".join(str(part) for part in error["loc"])
        blamed = [o for o in overrides if loc and (o.partition("=")[0].strip() + ".").startswith(loc + ".")]
        blame = f" [from --set {', --set '.join(blamed)}]" if blamed else ""
        lines.append(f"  {_describe(error)}{blame}")
    return "\n".join(lines)


# Fields that moved: where each went (a spec written for an earlier version gets told).
MOVED = {
    "executor.max_batch_size": "executor.hf.max_batch_size",
    "executor.max_batch_tokens": "executor.hf.max_batch_tokens (hf) or executor.native.max_step_tokens (native)",
}


def _describe(error: dict[str, Any]) -> str:
    loc = ".".join(str(part) for part in error["loc"]) or "(top level)"
    kind = error["type"]
    if kind == "extra_forbidden" and loc in MOVED:
        return f"{loc}: this setting moved to {MOVED[loc]}"
    if kind == "extra_forbidden":
        allowed = _allowed_fields(error["loc"])
        guess = difflib.get_close_matches(str(error["loc"][-1]), allowed, n=1, cutoff=0.8)
        hint = f" (did you mean {guess[0]!r}?)" if guess else ""
        return f"{loc}: unknown field{hint}; allowed here: {', '.join(allowed)}"
    if kind == "missing":
        return f"{loc}: required field is missing"
    message = error["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    if isinstance(error.get("input"), dict):  # a check across a whole section: its message names the values
        return f"{loc}: {message}"
    return f"{loc}: {message} (got {error.get('input')!r})"


def _allowed_fields(loc: tuple[Any, ...]) -> list[str]:
    model: type[StrictModel] = JobSpec
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, StrictModel)):
            break
        model = annotation
    return list(model.model_fields)


def is_local_path(path: str) -> bool:
    return "://" not in path


def _resolve(path: str, base_dir: Path) -> str:
    if not is_local_path(path):
        return path
    expanded = Path(path).expanduser()
    return str(expanded if expanded.is_absolute() else base_dir / expanded)


def _model_path(path: str, base_dir: Path) -> str:
    """A local folder as `_resolve` makes it; a Hub id (`org/name`) stays one unless a folder
    of that name exists beside the spec (the folder wins)."""
    if is_hub_id(path) and not (base_dir / path).is_dir():
        return path
    return _resolve(path, base_dir)


def with_local_model(spec: JobSpec, *, weights: bool = True) -> JobSpec:
    """The spec with `model.path` a local folder: a Hub id fetched or found in the cache
    (`model.revision` then the commit it resolved to), a GGUF file made into its cached folder
    (with its dequantized weights only when `weights`: `validate` and `plan` read no weights);
    a local folder's spec is returned as it is."""
    gguf = gguf_file(spec.model)
    if gguf is not None:
        from prefixbatch.executors.gguf import gguf_model_folder

        folder = str(gguf_model_folder(gguf, weights=weights))
        return spec.model_copy(update={"model": spec.model.model_copy(update={"path": folder, "gguf_file": None})})
    folder, commit = resolve_model_path(spec.model.path, spec.model.revision)
    if commit is None:
        return spec
    return spec.model_copy(update={"model": spec.model.model_copy(update={"path": folder, "revision": commit})})


def gguf_file(model: ModelSpec) -> str | None:
    """The GGUF file the model section names (`path` a `.gguf` file, or a folder + `gguf_file`), or None."""
    if model.gguf_file is not None:
        return str(Path(model.path) / model.gguf_file)
    return model.path if model.path.lower().endswith(".gguf") else None


def resolve_paths(spec: JobSpec, base_dir: Path) -> JobSpec:
    """Relative local paths in input, output and model become absolute, against `base_dir`."""
    input_path = spec.input.path
    resolved_input = (
        _resolve(input_path, base_dir)
        if isinstance(input_path, str)
        else tuple(_resolve(p, base_dir) for p in input_path)
    )
    return spec.model_copy(
        update={
            "input": spec.input.model_copy(update={"path": resolved_input}),
            "output": spec.output.model_copy(update={"path": _resolve(spec.output.path, base_dir)}),
            "model": spec.model.model_copy(update={"path": _model_path(spec.model.path, base_dir)}),
        }
    )
