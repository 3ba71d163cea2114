"""`executor.kind: native`: our engine behind the executor contract.

Loads the checkpoint with our own model code (safetensors only), plans the requests it is
given with the global prefix tree unless a plan comes with them, and runs the plan with
`Engine`. The tokenizer is loaded only to decode outputs and match stop strings.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from prefixbatch.executors.config import ExecutorSpec, ModelSpec
from prefixbatch.executors.device import resolve_device, resolve_dtype
from prefixbatch.executors.model_folder import eos_token_ids
from prefixbatch.executors.base import ExecutorStats
from prefixbatch.executors.native.engine import Engine
from prefixbatch.executors.native.weights import load_model, read_model_config
from prefixbatch.faults import fault_point
from prefixbatch.prefix_tree import build_plan
from prefixbatch.prefix_tree.requests import prompt_arrays
from prefixbatch.types import Completion, Request

DEFAULT_CPU_KV_BUDGET = 131_072  # tokens


class NativeExecutor:
    """Our engine: tree KV, each shared prefix computed once, shared-prefix attention."""

    def __init__(self, model: ModelSpec, executor: ExecutorSpec) -> None:
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        read_model_config(model.path)  # an unsupported architecture: ModelError naming `hf`
        self.device = resolve_device(executor.device)
        self.dtype = resolve_dtype(model.dtype, self.device)
        self.spec = executor
        self.kv_budget_tokens = executor.kv_budget_tokens or DEFAULT_CPU_KV_BUDGET
        hf_logging.disable_progress_bar()
        self.tokenizer = AutoTokenizer.from_pretrained(model.path, trust_remote_code=model.trust_remote_code)
        self.model = load_model(model.path, dtype=self.dtype, device=self.device)
        self.engine = Engine(
            self.model,
            eos_token_ids=eos_token_ids(model.path) or _tokenizer_eos(self.tokenizer),
            decode=lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True),
            max_step_tokens=executor.max_batch_tokens,
            kv_budget_tokens=self.kv_budget_tokens,
        )

    @property
    def stats(self) -> ExecutorStats:
        return self.engine.stats

    def generate(self, requests: Sequence[Request]) -> Iterator[Completion]:
        """One completion per request, group by group in the plan's order."""
        tokens, offsets, max_tokens = prompt_arrays(requests)
        # Groups of half the budget: the next group's prefill can run beside this one's decode.
        plan = build_plan(
            tokens,
            offsets,
            max_tokens,
            kv_budget_tokens=max(self.kv_budget_tokens // 2, 1),
            share=self.spec.prefix_sharing,
        )
        fault_point("planned")
        yield from self.engine.run(requests, plan, tokens)


def _tokenizer_eos(tokenizer: object) -> tuple[int, ...]:
    eos = getattr(tokenizer, "eos_token_id", None)
    return () if eos is None else (eos,)
