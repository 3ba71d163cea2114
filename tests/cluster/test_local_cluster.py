"""`cluster.local_workers`: a number of workers or `gpus`, the GPUs visible to the driver
(faked: this machine has none), and the spec errors a user can meet. The cluster itself is
started in test_dask.py."""

from __future__ import annotations

import pytest

from prefixbatch.cluster import local_cluster
from prefixbatch.cluster.config import ClusterSpec
from prefixbatch.cluster.dask_run import count_shards
from prefixbatch.errors import SpecError
from prefixbatch.jobs.spec import spec_from_dict


@pytest.mark.parametrize(
    ("listed", "count", "visible"),
    [
        (None, 2, ["0", "1"]),  # no list: the first `count` devices
        ("3,5", 2, ["3", "5"]),  # a list: its own entries, not 0..n-1
        ("GPU-8f2a, 7", 2, ["GPU-8f2a", "7"]),  # UUIDs pass through as given
        ("3,5,9", 2, ["3", "5"]),  # CUDA stopped at an entry it could not use
        ("", 0, []),
    ],
)
def test_visible_gpus_are_the_cuda_visible_devices_entries(monkeypatch, listed, count, visible):
    import torch

    if listed is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", listed)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    assert local_cluster.visible_gpus() == visible


def test_gpus_counts_a_worker_per_visible_gpu_and_asks_one_gpu_per_shard(monkeypatch):
    monkeypatch.setattr(local_cluster, "visible_gpus", lambda: ["3", "5", "6"])
    spec = ClusterSpec(kind="dask", local_workers="gpus", shards_per_worker=2)
    assert spec.resources == {"GPU": 1} and count_shards(spec) == 3 * 2
    mine = ClusterSpec(kind="dask", local_workers="gpus", resources={"GPU": 1, "slot": 1})
    assert mine.resources == {"GPU": 1, "slot": 1}  # given resources are kept
    assert ClusterSpec(kind="dask", local_workers=3).resources == {}


def job(cluster: dict) -> dict:
    return {
        "name": "gpus",
        "input": {"path": "in.parquet", "prompt_column": "prompt"},
        "output": {"path": "out"},
        "model": {"path": "model"},
        "cluster": {"kind": "dask", **cluster},
    }


def test_gpus_without_a_visible_gpu_is_a_spec_error_naming_the_field(monkeypatch, tmp_path):
    monkeypatch.setattr(local_cluster, "visible_gpus", lambda: [])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    message = r"cluster.local_workers: no CUDA device is visible \(CUDA_VISIBLE_DEVICES=''\); give a number of workers"
    with pytest.raises(SpecError, match=message):
        spec_from_dict(job({"local_workers": "gpus"}), base_dir=tmp_path, source="job.yaml")


@pytest.mark.parametrize("value", [0, "cpus", True, 1.5])
def test_local_workers_is_a_number_of_workers_or_gpus(tmp_path, value):
    message = r"cluster.local_workers: must be a number of worker processes \(≥ 1\) or `gpus`"
    with pytest.raises(SpecError, match=message):
        spec_from_dict(job({"local_workers": value}), base_dir=tmp_path, source="job.yaml")
