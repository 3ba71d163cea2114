"""Prompts in memory → a table of completions: the same pipeline as `run`, without files.

For notebooks and scripts: `Engine` loads a model once and answers `generate` and `score`
calls, each a whole job — the prompts tokenized and checked row by row as a job's input
rows are (bad rows become error rows), planned over one prefix tree, run on the executor,
and returned as a pyarrow Table with the output folder's columns, in input order. The
module-level `generate` is one call with a fresh `Engine`.

Prompts: a list of strings (raw prompts), a list of message lists (`{role, content}` dicts,
through the chat template), or a table (pyarrow, pandas or polars) with a `prompt` or
`messages` column (`prompt_column=` / `messages_column=` name another); its `id` column is
kept (else ids are the row numbers), columns named like sampling fields override them per
row, and every other column is carried to the output. Nothing is written to disk: the rows
pass through fsspec's in-memory filesystem on their way into the job's reader.
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import ValidationError

from prefixbatch.errors import InputError, SpecError
from prefixbatch.executors.config import ExecutorSpec, ModelSpec
from prefixbatch.executors.registry import create_executor
from prefixbatch.jobs.inputs import read_job_input
from prefixbatch.jobs.planning import plan_job, resolve_job_executor, with_loaded_cache
from prefixbatch.jobs.progress import JobProgress
from prefixbatch.jobs.spec import JobSpec, format_validation_error, with_local_model
from prefixbatch.model_folder import check_model_folder
from prefixbatch.pipeline.config import SAMPLING_FIELDS, InputSpec, SamplingSpec
from prefixbatch.pipeline.tokenize import PromptTokenizer, prompt_tokenizer
from prefixbatch.pipeline.writer import completions_to_table, output_schema

__all__ = ["Engine", "generate"]

Prompts = Sequence[str] | Sequence[Sequence[Mapping[str, str]]] | Any  # or a pyarrow/pandas/polars table


class Engine:
    """A model loaded once (`model`: a folder, a Hub id, or a `model` section as a dict) on an
    executor (`executor`: an `executor` section as a dict); `generate` and `score` run jobs on it."""

    def __init__(self, model: str | Mapping[str, Any] | ModelSpec, *, executor: Mapping[str, Any] | ExecutorSpec | None = None) -> None:
        model_spec = model if isinstance(model, ModelSpec) else ModelSpec.model_validate(
            {"path": model} if isinstance(model, str) else dict(model)
        )
        executor_spec = executor if isinstance(executor, ExecutorSpec) else ExecutorSpec.model_validate(dict(executor or {}))
        probe = with_local_model(_job(model_spec, executor_spec, InputSpec(path="memory://x", prompt_column="p")))
        self.model, self.executor_spec = probe.model, probe.executor
        check_model_folder(self.model.path)
        resolved = resolve_job_executor(probe)  # once: every call's job runs on this executor
        self.executor = create_executor(self.model, self.executor_spec, resolved)
        self.resolved = with_loaded_cache(resolved, probe, self.executor)
        self._tokenizers: dict[bool, PromptTokenizer] = {}

    def generate(
        self,
        prompts: Prompts,
        *,
        sampling: Mapping[str, Any] | None = None,
        progress: bool = False,
        prompt_column: str | None = None,
        messages_column: str | None = None,
        **sampling_fields: Any,
    ) -> pa.Table:
        """Completions of `prompts`, one row per sample (`n`) or error row, in input order.
        Sampling: `sampling={...}` and/or keyword fields (`max_tokens=64, temperature=0.7`)."""
        settings = {**(sampling or {}), **sampling_fields}
        return self._run(prompts, settings, progress, prompt_column, messages_column, None)

    def score(
        self,
        prompts: Prompts,
        continuations: Sequence[Sequence[str]] | str,
        *,
        progress: bool = False,
        prompt_column: str | None = None,
        messages_column: str | None = None,
        prompt_logprobs: int | None = None,
    ) -> pa.Table:
        """`task: score`: each prompt's continuations scored (`continuation_logprob`,
        `continuation_is_greedy`), one row per continuation. `continuations`: a list per prompt,
        or the name of the table's column that holds them."""
        settings = {} if prompt_logprobs is None else {"prompt_logprobs": prompt_logprobs}
        return self._run(prompts, settings, progress, prompt_column, messages_column, continuations)

    def _run(self, prompts, settings, progress, prompt_column, messages_column, continuations) -> pa.Table:
        table, input_spec = _as_input(prompts, prompt_column, messages_column, continuations)
        try:
            sampling = SamplingSpec.model_validate(settings)
        except ValidationError as exc:
            raise SpecError(format_validation_error(exc, "sampling settings").replace("\n  ", "\n  sampling.")) from None
        spec = _job(self.model, self.executor_spec, input_spec, sampling,
                    task="generate" if continuations is None else "score")
        fs = fsspec.filesystem("memory")
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        fs.pipe_file(input_spec.path, buffer.getvalue())
        try:  # the checks and tokenizing of a job's input, with this engine's tokenizer
            prepared = read_job_input(spec, tokenizer=self._tokenizer(spec.input.messages_column is not None))
        finally:
            fs.rm(input_spec.path)
        work = plan_job(spec, self.resolved, prepared.requests)
        completions = list(prepared.errors)
        plan = work.plan
        stream = None if progress else io.StringIO()  # progress off: nothing printed
        with JobProgress(len(prepared.requests) + len(prepared.errors), live=progress or None, stream=stream,
                         work=(plan.num_prefill_tokens, plan.num_decode_tokens)) as bar:
            bar.advance(len(prepared.errors), 0)
            for completion in self.executor.generate(work):
                completions.append(completion)
                bar.advance(1, completion.num_output_tokens)
        completions.sort(key=lambda c: (c.row_index, c.sample_index))
        rows = pa.array([c.row_index for c in completions], pa.int64())
        schema = output_schema(prepared.ids.type, list(prepared.carry.schema), id_column=spec.input.id_column)
        carry = prepared.carry.take(rows) if prepared.carry.num_columns else None
        return completions_to_table(completions, ids=prepared.ids.take(rows), carry=carry, schema=schema)

    def _tokenizer(self, messages: bool) -> PromptTokenizer:
        if messages not in self._tokenizers:
            self._tokenizers[messages] = prompt_tokenizer(self.model, messages=messages)
        return self._tokenizers[messages]


def generate(
    prompts: Prompts,
    *,
    model: str | Mapping[str, Any] | ModelSpec,
    executor: Mapping[str, Any] | ExecutorSpec | None = None,
    sampling: Mapping[str, Any] | None = None,
    progress: bool = False,
    **sampling_fields: Any,
) -> pa.Table:
    """One call: load `model`, complete `prompts` (see `Engine.generate`), return the table."""
    return Engine(model, executor=executor).generate(prompts, sampling=sampling, progress=progress, **sampling_fields)


def _job(model: ModelSpec, executor: ExecutorSpec, input_spec: InputSpec, sampling: SamplingSpec | None = None,
         task: str = "generate") -> JobSpec:
    return JobSpec(name="in-memory", task=task, input=input_spec, output={"path": "memory://prefixbatch-unused"},
                   model=model, sampling=sampling or SamplingSpec(), executor=executor)


def _as_input(prompts: Prompts, prompt_column: str | None, messages_column: str | None,
              continuations: Sequence[Sequence[str]] | str | None) -> tuple[pa.Table, InputSpec]:
    """The prompts as an Arrow table, and the input section that reads it."""
    table = _as_table(prompts)
    if prompt_column is None and messages_column is None:
        if "prompt" in table.column_names:
            prompt_column = "prompt"
        elif "messages" in table.column_names:
            messages_column = "messages"
        else:
            raise InputError(
                f"the prompts table needs a 'prompt' or 'messages' column (or prompt_column= / messages_column=);"
                f" it has {table.column_names}"
            )
    if "id" not in table.column_names:
        table = table.append_column("id", pa.array(range(table.num_rows), pa.int64()))
    continuations_column = None
    if isinstance(continuations, str):
        continuations_column = continuations
    elif continuations is not None:
        if len(continuations) != table.num_rows:
            raise InputError(f"{len(continuations)} continuation lists for {table.num_rows} prompts")
        continuations_column = "continuations"
        table = table.append_column(continuations_column, pa.array([list(c) for c in continuations], pa.list_(pa.string())))
    used = {"id", prompt_column, messages_column, continuations_column, *SAMPLING_FIELDS}
    carry = tuple(name for name in table.column_names if name not in used)
    path = f"memory://prefixbatch-inmemory/{uuid.uuid4().hex}.parquet"
    return table, InputSpec(path=path, prompt_column=prompt_column, messages_column=messages_column,
                            carry_columns=carry, continuations_column=continuations_column)


def _as_table(prompts: Prompts) -> pa.Table:
    if isinstance(prompts, pa.Table):
        return prompts
    if hasattr(prompts, "to_arrow"):  # polars
        return prompts.to_arrow()
    if hasattr(prompts, "to_dict") and hasattr(prompts, "columns"):  # pandas
        return pa.Table.from_pandas(prompts, preserve_index=False)
    items = list(prompts)
    if not items:
        raise InputError("no prompts given")
    if all(isinstance(p, str) for p in items):
        return pa.table({"prompt": pa.array(items, pa.string())})
    if all(isinstance(p, Sequence) and not isinstance(p, str) for p in items):
        messages = [[{"role": m["role"], "content": m["content"]} for m in p] for p in items]
        return pa.table({"messages": pa.array(messages, pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())])))})
    raise InputError("prompts must be strings, message lists ({role, content} dicts), or a table")
