"""The `hf` executor: transformers `generate` on left-padded batches, the reference engine.

It is the oracle the native engine is tested against and the baseline it is benchmarked
against, so it stays plain transformers: `AutoModelForCausalLM.generate` with
`do_sample=False`, our logits processors (`LogprobRecorder`: the logprobs rows ask for, from
the raw logits; `Penalizer`: per-row penalties and `min_tokens`; `SeededSampler`: per-row
seeded sampling, greedy rows untouched) and one stopping criterion (`RowStopper`: per-row max_tokens, stop ids,
stop strings). Greedy rows are therefore exactly transformers' greedy decoding.

Order and batches: the plan's groups run in the plan's order (it cannot share a prefix's KV,
so its plan is made without sharing and predicts exactly the prefill it computes); within a
group, requests sorted by prompt length (stable), cut by `executor.hf.max_batch_size` and
`max_batch_tokens` (padded size × (longest prompt + largest max_tokens)); a request over the
token limit runs alone. Each batch is left-padded with the tokenizer's pad id and masked.

The checkpoint's generation config keeps only its special ids (bos, eos, pad): its sampling
defaults (temperature, top_p, repetition_penalty, ...) never apply; the job's
`SamplingParams` decide.

in → out: a plan's requests (token ids + sampling) → one `Completion` per request, batch by batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.utils import logging as hf_logging

from prefixbatch.config import ModelSpec
from prefixbatch.errors import ModelError
from prefixbatch.executors.base import ExecutorStats, StopFlag
from prefixbatch.executors.config import ExecutorSpec
from prefixbatch.executors.device import placement
from prefixbatch.executors.grammar import GrammarMasker, LazyConstraints
from prefixbatch.executors.registry import ResolvedExecutor, resolve_executor
from prefixbatch.executors.sampling import (
    LogprobRecorder,
    Penalizer,
    RawLogprob,
    SeededSampler,
    TokenTexts,
    prompt_results,
    records_k,
    token_logprobs,
)
from prefixbatch.executors.stopping import RowFinish, RowStopper, StopRule, cut_at_stop
from prefixbatch.model_folder import check_model_folder
from prefixbatch.prefix_tree import PlannedRequests
from prefixbatch.types import Completion, Request, error_completion

__all__ = ["HfExecutor", "plan_batches"]

T = TypeVar("T")


class HfExecutor:
    """Loads a Hugging Face checkpoint once; `generate` completes a plan batch by batch."""

    kind = "hf"

    def __init__(self, model: ModelSpec, executor: ExecutorSpec, resolved: ResolvedExecutor | None = None) -> None:
        self.spec = executor.hf
        self.stats = ExecutorStats()
        self.device, self.dtype = placement(resolved or resolve_executor(model, executor, kind=self.kind))
        check_model_folder(model.path)  # a missing folder, config or weights: a clear ModelError
        hf_logging.disable_progress_bar()  # our own progress bar is the one the user reads
        folder = Path(model.path)
        remote = model.trust_remote_code
        self.tokenizer = _load(
            "tokenizer",
            folder,
            lambda: AutoTokenizer.from_pretrained(folder, trust_remote_code=remote),
        )
        self.model = _load(
            "model",
            folder,
            lambda: AutoModelForCausalLM.from_pretrained(
                folder, dtype=self.dtype, use_safetensors=True, trust_remote_code=remote
            ),
        )
        self.model.to(self.device).eval()
        self.token_texts = TokenTexts(self.tokenizer)
        self.constraints = LazyConstraints(self.tokenizer, self.model.config.get_text_config().vocab_size)
        checkpoint_config = self.model.generation_config
        self.eos_token_ids = _eos_token_ids(checkpoint_config, self.tokenizer)
        self.pad_token_id = _pad_token_id(checkpoint_config, self.tokenizer, self.eos_token_ids)
        self.special_ids = dict(
            bos_token_id=checkpoint_config.bos_token_id,
            eos_token_id=list(self.eos_token_ids) or None,
            pad_token_id=self.pad_token_id,
        )
        # generate() fills every unset field from the model's config: keep nothing else there.
        self.model.generation_config = GenerationConfig(**self.special_ids, do_sample=False)

    def generate(self, work: PlannedRequests, *, stop: StopFlag | None = None) -> Iterator[Completion]:
        """One completion per request, group by group in the plan's order; (row_index,
        sample_index) names each. Once `stop` is set, the batch under way ends at its next
        token and its rows are dropped (not completed)."""
        for group in work.groups():
            yield from self._run_group(group, stop)
            if stop is not None and stop.is_set():
                return
            self.stats.num_groups += 1

    def _run_group(self, requests: Sequence[Request], stop: StopFlag | None) -> Iterator[Completion]:
        scoring = plan_batches(
            [r for r in requests if r.sampling.max_tokens < 1],
            max_batch_size=self.spec.max_batch_size,
            max_batch_tokens=self.spec.max_batch_tokens,
        )
        for batch in scoring:  # nothing to generate: one forward pass over each batch
            if stop is not None and stop.is_set():
                return
            records = self._prompt_records(batch)
            self.stats.num_prefill_tokens += sum(r.num_prompt_tokens for r in batch)
            for row, request in enumerate(batch):
                yield self._scored(request, records[row])
        runnable = []
        for request in (r for r in requests if r.sampling.max_tokens >= 1):
            problem = self.constraints.get().compile(request.sampling) if request.sampling.is_constrained else None
            if isinstance(problem, str):  # a constraint that does not compile: the row's error
                yield error_completion(
                    request.row_index, "invalid_constraint", problem, request.num_prompt_tokens, request.sample_index
                )
            else:
                runnable.append(request)
        batches = plan_batches(
            runnable,
            max_batch_size=self.spec.max_batch_size,
            max_batch_tokens=self.spec.max_batch_tokens,
        )
        for batch in batches:
            if stop is not None and stop.is_set():
                return
            completions = self._run_batch(batch, stop)
            if stop is not None and stop.is_set():
                return  # cut short: its rows are not done
            yield from completions

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def _run_batch(self, batch: list[Request], stop: StopFlag | None = None) -> list[Completion]:
        input_ids, attention_mask = self._left_pad([r.token_ids for r in batch])  # [B, P]
        prompt_len = input_ids.shape[1]
        params = [r.sampling for r in batch]
        rules = [StopRule.of(p, self.eos_token_ids) for p in params]
        stopper = RowStopper(rules, prompt_len, self.decode)
        config = GenerationConfig(
            **self.special_ids, do_sample=False, max_new_tokens=max(p.max_tokens for p in params)
        )
        prompt_records = self._prompt_records(batch)
        # Raw logits → logprobs recorded; penalties and min_tokens; the row's draw (or greedy).
        recorder = LogprobRecorder(params)
        stop_ids = [sorted(rule.stop_token_ids) for rule in rules]
        penalizer = Penalizer(params, [r.token_ids for r in batch], stop_ids, prompt_len)
        matchers = [self.constraints.get().matcher(p) if p.is_constrained else None for p in params]
        masker = GrammarMasker(matchers, self.constraints.get() if any(matchers) else None, prompt_len, stopper.finishes)
        processors = [recorder, penalizer, masker, SeededSampler(params, self.device)]
        with torch.inference_mode():
            output = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                generation_config=config,
                logits_processor=LogitsProcessorList(processors),
                stopping_criteria=StoppingCriteriaList([stopper, _StopWhenSet(stop)]),
            )  # [B, P + num_steps]
            recorder.finish(output[:, -1].tolist())
        generated = output[:, prompt_len:].tolist()  # finished rows continue with pad ids
        self.stats.num_prefill_tokens += sum(r.num_prompt_tokens for r in batch)
        self.stats.num_decode_tokens += len(batch) * (output.shape[1] - prompt_len)
        self.stats.num_steps += output.shape[1] - prompt_len
        return [
            self._completion(request, rule, row_ids, finish, recorder.found.get(row), prompt_records.get(row))
            for row, (request, rule, row_ids, finish) in enumerate(zip(batch, rules, generated, stopper.finishes))
        ]

    def _prompt_records(self, batch: list[Request]) -> dict[int, list[RawLogprob]]:
        """Batch row → the records of its prompt positions from `logprobs_from` on (rows that
        ask): one padded forward pass per slice of the batch, logits for every position."""
        wanted = [row for row, r in enumerate(batch) if r.logprobs_from is not None]
        found: dict[int, list[RawLogprob]] = {}
        vocab = self.model.config.get_text_config().vocab_size
        while wanted:  # slices whose logits stay under ~256 MB
            longest = max(batch[row].num_prompt_tokens for row in wanted)
            take = max(1, min(len(wanted), (64 << 20) // max(longest * vocab, 1)))
            rows, wanted = wanted[:take], wanted[take:]
            input_ids, attention_mask = self._left_pad([batch[row].token_ids for row in rows])
            positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # as generate numbers them
            with torch.inference_mode():
                logits = self.model(
                    input_ids=input_ids, attention_mask=attention_mask, position_ids=positions
                ).logits  # [b, L, V]
            for i, row in enumerate(rows):
                request = batch[row]
                prompt_len, first = request.num_prompt_tokens, request.logprobs_from - 1
                pad = input_ids.shape[1] - prompt_len
                nexts = list(request.token_ids[first + 1 : prompt_len])
                found[row] = token_logprobs(
                    logits[i, pad + first : pad + prompt_len - 1], nexts, [records_k(request)] * len(nexts)
                )
        return found

    def _scored(self, request: Request, records: list[RawLogprob]) -> Completion:
        """A scoring request's completion: its continuation, summed and checked (no generation)."""
        continuation = request.continuation
        return Completion(
            row_index=request.row_index,
            token_ids=continuation,
            text=self.decode(continuation),
            finish_reason="scored",
            num_prompt_tokens=request.num_prompt_tokens,
            sample_index=request.sample_index,
            **prompt_results(request, records, self.token_texts),
        )

    def _completion(
        self,
        request: Request,
        rule: StopRule,
        row_ids: list[int],
        finish: RowFinish | None,
        logprobs: list[RawLogprob] | None,
        prompt_records: list[RawLogprob] | None,
    ) -> Completion:
        # Every row ends by its rule before generate stops; the fallback is defensive.
        finish = finish or RowFinish(min(len(row_ids), rule.max_tokens), "length")
        token_ids = tuple(row_ids[: finish.num_tokens])
        return Completion(
            row_index=request.row_index,
            token_ids=token_ids,
            text=cut_at_stop(self.decode(token_ids), rule.stop),
            finish_reason=finish.reason,
            num_prompt_tokens=request.num_prompt_tokens,
            sample_index=request.sample_index,
            logprobs=None if logprobs is None else self.token_texts.named(logprobs[: len(token_ids)]),
            constrained=request.sampling.is_constrained,
            **({} if prompt_records is None else prompt_results(request, prompt_records, self.token_texts)),
        )

    def _left_pad(self, prompts: list[tuple[int, ...]]) -> tuple[torch.Tensor, torch.Tensor]:
        longest = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), longest), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), longest), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            input_ids[row, longest - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            attention_mask[row, longest - len(prompt) :] = 1
        return input_ids.to(self.device), attention_mask.to(self.device)


class _StopWhenSet(StoppingCriteria):
    """Ends `generate` at the next token once the run's stop flag is set."""

    def __init__(self, stop: StopFlag | None) -> None:
        self.stop = stop

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        done = self.stop is not None and self.stop.is_set()
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


def plan_batches(
    requests: Iterable[Request], *, max_batch_size: int, max_batch_tokens: int
) -> Iterator[list[Request]]:
    """Requests sorted by prompt length (stable), cut so that each batch holds at most
    `max_batch_size` requests and `size × (longest prompt + largest max_tokens)` padded tokens
    at most `max_batch_tokens`; a request over the token limit gets a batch of its own."""
    batch: list[Request] = []
    longest_prompt = largest_max_tokens = 0
    for request in sorted(requests, key=lambda r: r.num_prompt_tokens):
        prompt = max(longest_prompt, request.num_prompt_tokens)
        max_tokens = max(largest_max_tokens, request.sampling.max_tokens)
        size = len(batch) + 1
        if batch and (size > max_batch_size or size * (prompt + max_tokens) > max_batch_tokens):
            yield batch
            batch = []
            prompt, max_tokens = request.num_prompt_tokens, request.sampling.max_tokens
        batch.append(request)
        longest_prompt, largest_max_tokens = prompt, max_tokens
    if batch:
        yield batch


def _load(what: str, folder: Path, load: Callable[[], T]) -> T:
    # Whatever the folder holds is the user's to fix: a message, not a traceback.
    try:
        return load()
    except Exception as exc:
        raise ModelError(f"cannot load the {what} from {folder}: {exc}") from exc


def _eos_token_ids(generation_config: GenerationConfig, tokenizer: object) -> tuple[int, ...]:
    eos = generation_config.eos_token_id
    if eos is None:
        eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)


def _pad_token_id(
    generation_config: GenerationConfig, tokenizer: object, eos_token_ids: tuple[int, ...]
) -> int:
    # Padded positions are masked out: any valid id will do when the checkpoint names none.
    for candidate in (getattr(tokenizer, "pad_token_id", None), generation_config.pad_token_id):
        if candidate is not None:
            return candidate
    return eos_token_ids[0] if eos_token_ids else 0
