"""`executor.kind: native`: our engine behind the executor contract.

Loads the checkpoint with our own model code (safetensors only) and runs the plan it is
handed with `Engine`, whose KV store holds the plan's `kv_budget_tokens`. The tokenizer is
loaded only to decode outputs and match stop strings.
"""

from __future__ import annotations

from collections.abc import Iterator

from prefixbatch.config import ModelSpec
from prefixbatch.errors import UserError
from prefixbatch.executors.base import ExecutorStats, StopFlag
from prefixbatch.executors.config import INVARIANT_CPU_ONLY, ExecutorSpec
from prefixbatch.executors.device import placement
from prefixbatch.executors.grammar import LazyConstraints
from prefixbatch.executors.native import pointwise
from prefixbatch.executors.native.dense import packing_available
from prefixbatch.executors.native.engine import Engine
from prefixbatch.executors.native.span_kernel import load_span_kernel
from prefixbatch.executors.native.weights import load_model, read_model_config
from prefixbatch.executors.registry import ResolvedExecutor, resolve_executor
from prefixbatch.executors.sampling import TokenTexts
from prefixbatch.faults import fault_point
from prefixbatch.model_folder import eos_token_ids
from prefixbatch.prefix_tree import PlannedRequests
from prefixbatch.types import Completion


class NativeExecutor:
    """Our engine: tree KV, each shared prefix computed once, shared-prefix attention."""

    kind = "native"

    def __init__(self, model: ModelSpec, executor: ExecutorSpec, resolved: ResolvedExecutor | None = None) -> None:
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        read_model_config(model.path)  # an unsupported architecture: ModelError naming `hf`
        self.device, self.dtype = placement(resolved or resolve_executor(model, executor, kind=self.kind))
        if executor.native.batch_invariant and self.device.type != "cpu":
            raise UserError(INVARIANT_CPU_ONLY)  # `device: auto` found a GPU
        hf_logging.disable_progress_bar()
        self.tokenizer = AutoTokenizer.from_pretrained(model.path, trust_remote_code=model.trust_remote_code)
        self.model = load_model(model.path, dtype=self.dtype, device=self.device)
        if packing_available(self.device, self.dtype) and not executor.native.batch_invariant:
            self.model.pack()  # oneDNN's GEMMs: 2-3x MKL's on some CPUs (`dense`)
            load_span_kernel()  # built (once per machine, ~1 s) at start-up, not in the first step
        elif self.device.type == "cuda":
            self.model.use_pointwise(pointwise.compiled())  # one kernel per norm and rope (`pointwise`)
        self.engine = Engine(
            self.model,
            eos_token_ids=eos_token_ids(model.path, self.tokenizer),
            decode=lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True),
            token_texts=TokenTexts(self.tokenizer),
            constraints=LazyConstraints(self.tokenizer, self.model.config.vocab_size),
            max_step_tokens=executor.native.max_step_tokens
            or executor.native.default_step_tokens(self.device.type),
            batch_invariant=executor.native.batch_invariant,
        )

    @property
    def stats(self) -> ExecutorStats:
        return self.engine.stats

    def generate(self, work: PlannedRequests, *, stop: StopFlag | None = None) -> Iterator[Completion]:
        """One completion per request, group by group in the plan's order."""
        fault_point("planned")
        yield from self.engine.run(work.requests, work.plan, work.tokens, stop=stop)
        if stop is None or not stop.is_set():
            self.engine.stats.num_groups += work.plan.num_groups

    def in_flight(self) -> dict[tuple[int, int], tuple[int, ...]]:
        """(row, sample) → tokens generated so far, of the generations under way."""
        return self.engine.in_flight()

