"""The `cluster` section of a job spec, and what the cluster code is handed by the job layer.

`ClusterJob` bundles the sub-specs the cluster code reads and `Progress` is the interface it
reports through: the cluster never sees the whole job spec nor the job layer's objects.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Protocol

from pydantic import Field, ValidationInfo, field_validator, model_validator

from prefixbatch.config import ModelSpec, ShownAs, StrictModel
from prefixbatch.executors.config import ExecutorSpec
from prefixbatch.pipeline.config import InputSpec, OutputSpec, SamplingSpec


class ClusterSpec(StrictModel):
    """One process (`local`, the default) or a Dask cluster (`dask`)."""

    kind: Literal["local", "dask"] = "local"
    """`local`: generate in this process. `dask`: cut the plan into shards along prefix-tree
    subtrees and run them on Dask workers (an existing cluster at `address`, or a
    LocalCluster of `local_workers` worker processes started for this run)."""

    address: str | None = None
    """Scheduler address of a running Dask cluster, e.g. `tcp://10.0.0.5:8786`."""

    local_workers: Annotated[int | Literal["gpus"] | None, ShownAs("integer, `gpus` or null", "≥ 1, or `gpus`")] = None
    """Start a LocalCluster of this many worker processes for the run (when no `address`).
    `gpus`: one worker per visible CUDA device (`CUDA_VISIBLE_DEVICES` where it is set), each
    pinned to its device and holding one `GPU` resource (`resources` defaults to `{GPU: 1}`)."""

    threads_per_worker: int = Field(1, ge=1)
    """Threads per LocalCluster worker (each worker runs one shard at a time)."""

    resources: dict[str, float] = Field(default_factory=dict)
    """Resources each shard task needs, e.g. `{GPU: 1}`: workers must be started with them
    (with `local_workers: gpus`, `{GPU: 1}` unless given)."""

    shards_per_worker: int = Field(4, ge=1)
    """Shards per worker: more, smaller shards make a slow or lost worker cost less."""

    connect_timeout_s: float = Field(30.0, gt=0)
    """How long to try reaching the scheduler at `address` before the run stops with an error."""

    plan_on: Literal["driver", "workers"] = "driver"
    """`driver`: the driver reads, tokenizes and plans every prompt (one exact tree).
    `workers`: for inputs too large for the driver: the workers tokenize the input files, the
    driver range-partitions the prompts by their leading tokens, and each partition is planned
    on the worker that runs it; the driver holds ids and a few leading tokens per prompt."""

    max_attempts: int = Field(3, ge=1)
    """Worker deaths a shard may cause before it is split to find the row that kills workers."""

    worker_wait_s: float = Field(120.0, gt=0)
    """How long the run waits while no worker can take a shard (all dead, restarting or gone)
    before it stops with an error; what was committed is kept for `--resume`."""

    @model_validator(mode="before")
    @classmethod
    def _one_gpu_per_shard(cls, data: Any) -> Any:
        # One shard per GPU worker at a time, whatever its threads: said once, here.
        if isinstance(data, dict) and data.get("local_workers") == "gpus" and "resources" not in data:
            return {**data, "resources": {"GPU": 1}}
        return data

    @field_validator("local_workers", mode="before")
    @classmethod
    def _workers_or_gpus(cls, value: Any) -> Any:
        is_count = isinstance(value, int) and not isinstance(value, bool) and value >= 1
        if value is None or value == "gpus" or is_count:
            return value
        raise ValueError("must be a number of worker processes (≥ 1) or `gpus` (one worker per visible GPU)")

    @field_validator("local_workers")
    @classmethod
    def _gpus_visible(cls, value: Any, info: ValidationInfo) -> Any:
        # Checked with the spec (validate, plan and run alike), not when the workers start.
        if value != "gpus" or info.data.get("kind") != "dask":
            return value
        from prefixbatch.cluster.local_cluster import visible_gpus

        if not visible_gpus():
            listed = os.environ.get("CUDA_VISIBLE_DEVICES")
            where = f" (CUDA_VISIBLE_DEVICES={listed!r})" if listed is not None else ""
            raise ValueError(f"no CUDA device is visible{where}; give a number of workers")
        return value

    @model_validator(mode="after")
    def _where(self) -> ClusterSpec:
        if self.kind == "dask" and (self.address is None) == (self.local_workers is None):
            raise ValueError("cluster.kind dask needs exactly one of `address` and `local_workers`")
        return self


@dataclass(frozen=True)
class ClusterJob:
    """The sections of a job spec that the cluster code reads."""

    cluster: ClusterSpec
    model: ModelSpec  # what each worker loads
    executor: ExecutorSpec
    input: InputSpec  # `plan_on: workers`: the workers read and tokenize the input
    sampling: SamplingSpec
    output: OutputSpec  # where the workers write their parts

    @classmethod
    def of(cls, spec: Any) -> ClusterJob:
        """The sections of a `JobSpec` (taken by name: this layer does not import the job's)."""
        return cls(spec.cluster, spec.model, spec.executor, spec.input, spec.sampling, spec.output)


class Progress(Protocol):
    """What a run's progress display takes from the cluster."""

    def advance(
        self, rows: int, tokens: int, *, settles: Any = None, prefill_tokens: int = 0, unused_tokens: int = 0
    ) -> None: ...

    def running(self, key: Any, rows: int, tokens: int, prefill_tokens: int = 0) -> None: ...

    def settle(self, key: Any) -> None: ...

    def set_workers(self, num_workers: int) -> None: ...
