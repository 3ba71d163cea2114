"""The LocalCluster a run starts for itself (`cluster.local_workers`), and the GPUs it sees.

`local_workers: N` starts N worker processes alike. `local_workers: gpus` starts one worker
per visible CUDA device, each pinned to it (`CUDA_VISIBLE_DEVICES` set to that one device
in the worker's environment, so it sees it as `cuda:0`) and holding one `GPU` resource, so
shards go to GPUs as they go to workers. The devices are `visible_gpus()`: the entries of an
existing `CUDA_VISIBLE_DEVICES` (indices or UUIDs, pinned as given), else `0..n-1`.

in: a `ClusterSpec` → out: a started `LocalCluster` (the caller closes it).
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from prefixbatch.errors import UserError

if TYPE_CHECKING:
    from prefixbatch.cluster.config import ClusterSpec


def visible_gpus() -> list[str]:
    """The CUDA devices this process may use, each as a `CUDA_VISIBLE_DEVICES` entry."""
    import torch

    count = torch.cuda.device_count()  # honours CUDA_VISIBLE_DEVICES; 0 on a CPU build
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return [str(k) for k in range(count)]
    # CUDA stops at the first entry it cannot use: the first `count` are the visible ones.
    return [entry.strip() for entry in listed.split(",") if entry.strip()][:count]


def local_worker_count(spec: ClusterSpec) -> int:
    """Workers the run's LocalCluster has: `local_workers`, or one per visible GPU."""
    return len(visible_gpus()) if spec.local_workers == "gpus" else int(spec.local_workers or 0)


def start_local_cluster(spec: ClusterSpec) -> Any:
    """A LocalCluster of worker processes for one run, its workers up."""
    from distributed import LocalCluster

    common = dict(
        threads_per_worker=spec.threads_per_worker,
        processes=True,
        dashboard_address=None,
        # The driver reports every failure itself (one message); the workers' own logs
        # would repeat it with their tracebacks on the user's terminal.
        silence_logs=logging.CRITICAL,
    )
    if spec.local_workers != "gpus":
        return LocalCluster(n_workers=spec.local_workers, resources=spec.resources or None, **common)
    return _one_worker_per_gpu(visible_gpus(), common, spec.worker_wait_s)


def _one_worker_per_gpu(devices: list[str], common: dict[str, Any], wait_s: float) -> Any:
    """A LocalCluster whose k-th worker sees only `devices[k]`. LocalCluster gives every
    worker the same options, so each worker's spec (a Nanny's, with its own `env`) is
    written here; Dask's usual host-memory share per worker is kept."""
    from distributed import LocalCluster
    from distributed.exceptions import WorkerStartTimeoutError
    from distributed.worker_memory import parse_memory_limit

    memory = parse_memory_limit("auto", 1, len(devices), logger=logging.getLogger(__name__))
    cluster = LocalCluster(n_workers=0, memory_limit=memory, **common)
    try:
        template = cluster.new_spec  # the worker spec LocalCluster would use: a Nanny's
        for device in devices:
            options = {**template["options"], "resources": {"GPU": 1}, "env": {"CUDA_VISIBLE_DEVICES": device}}
            cluster.worker_spec[f"gpu-{device}"] = {**template, "options": options}
        cluster.scale(len(devices))  # starts the specs written above (none is added)
        cluster.wait_for_workers(len(devices), timeout=wait_s)
    except WorkerStartTimeoutError as exc:
        cluster.close()
        msg = f"cluster.local_workers gpus: the workers of GPUs {', '.join(devices)} did not all start within {wait_s:g} s (cluster.worker_wait_s)"
        raise UserError(msg) from exc
    except BaseException:
        cluster.close()
        raise
    return cluster


__all__ = ["local_worker_count", "start_local_cluster", "visible_gpus"]
