"""Resolving the executor a job runs on: `auto`'s choice by device (the CUDA path unmeasured),
the dtype that goes with the device, and a Dask worker's own device. CUDA is faked: the
device resolution answers `cuda`, and vLLM is found or hidden through `find_spec`."""

from __future__ import annotations

import importlib.util
import json
import logging

import pytest
import torch

from prefixbatch.errors import UserError
from prefixbatch.executors import device as devices
from prefixbatch.executors import registry
from prefixbatch.executors.config import ExecutorSpec, ModelSpec
from prefixbatch.executors.registry import EXECUTORS, ResolvedExecutor, resolve_executor


def fake_cuda(monkeypatch, *, measured: bool = False) -> None:
    """A machine whose device resolution finds a GPU; `measured`: a GPU check is recorded."""
    monkeypatch.setattr(devices, "resolve_device", lambda device: torch.device("cuda" if device != "cpu" else "cpu"))
    monkeypatch.setattr(registry, "CUDA_PATH_MEASURED", measured)


def vllm_installed(monkeypatch, installed: bool) -> None:
    real = importlib.util.find_spec
    found = real("json")  # any spec stands for vLLM's
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: (found if installed else None) if name == "vllm" else real(name, *a)
    )


def test_auto_on_cuda_picks_vllm_when_it_is_installed(tiny_llama, monkeypatch, caplog):
    fake_cuda(monkeypatch)
    vllm_installed(monkeypatch, True)
    with caplog.at_level(logging.WARNING):
        resolved = resolve_executor(ModelSpec(path=str(tiny_llama)), ExecutorSpec())
    assert resolved == ResolvedExecutor(EXECUTORS["vllm"], "cuda", "bfloat16")
    assert not caplog.records


def test_auto_on_cuda_keeps_native_when_a_native_only_setting_is_asked_for(tiny_llama, monkeypatch):
    # vLLM would ignore batch-invariant numerics: native is chosen, and says itself where it runs.
    fake_cuda(monkeypatch)
    vllm_installed(monkeypatch, True)
    resolved = resolve_executor(ModelSpec(path=str(tiny_llama)), ExecutorSpec(native={"batch_invariant": True}))
    assert resolved.name == "native"


def test_auto_on_cuda_without_vllm_picks_native_and_says_its_cuda_path_is_unmeasured(tiny_llama, monkeypatch, caplog):
    fake_cuda(monkeypatch)
    vllm_installed(monkeypatch, False)
    with caplog.at_level(logging.WARNING):
        resolved = resolve_executor(ModelSpec(path=str(tiny_llama)), ExecutorSpec())
    assert resolved == ResolvedExecutor(EXECUTORS["native"], "cuda", "bfloat16")
    [record] = caplog.records
    assert "native on CUDA" in record.getMessage() and "unmeasured (no GPU check has run yet)" in record.getMessage()


def test_once_the_cuda_path_is_measured_auto_on_cuda_is_native_again(tiny_llama, monkeypatch, caplog):
    fake_cuda(monkeypatch, measured=True)
    vllm_installed(monkeypatch, True)
    with caplog.at_level(logging.WARNING):
        assert resolve_executor(ModelSpec(path=str(tiny_llama)), ExecutorSpec()).name == "native"
    assert not caplog.records


def test_a_kind_named_on_cuda_is_kept(tiny_llama, monkeypatch, caplog):
    fake_cuda(monkeypatch)
    vllm_installed(monkeypatch, True)
    with caplog.at_level(logging.WARNING):
        resolved = resolve_executor(ModelSpec(path=str(tiny_llama)), ExecutorSpec(kind="native"))
    assert resolved.name == "native" and not caplog.records


@pytest.mark.parametrize("installed", [True, False])
def test_auto_on_the_cpu_is_native_for_a_model_it_implements_else_hf(tiny_llama, tmp_path, monkeypatch, caplog, installed):
    vllm_installed(monkeypatch, installed)
    with caplog.at_level(logging.WARNING):
        resolved = resolve_executor(ModelSpec(path=str(tiny_llama)), ExecutorSpec(device="auto"))
    assert resolved == ResolvedExecutor(EXECUTORS["native"], "cpu", "float32")
    other = tmp_path / "gpt2"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    assert resolve_executor(ModelSpec(path=str(other)), ExecutorSpec(device="cpu")).name == "hf"
    assert not caplog.records


def test_cuda_this_machine_lacks_is_refused_here_and_left_to_the_workers_on_dask(tiny_llama):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    model, spec = ModelSpec(path=str(tiny_llama)), ExecutorSpec(device="cuda", kind="native")
    with pytest.raises(UserError, match="no CUDA device is visible"):
        resolve_executor(model, spec)
    driver = resolve_executor(model, spec, on_workers=True)
    assert (driver.device, driver.dtype) == ("cuda", "bfloat16")
    with pytest.raises(UserError, match="no CUDA device is visible"):
        driver.on_worker(model, spec)  # a worker without one


def test_a_dask_worker_resolves_auto_to_its_own_device_and_keeps_the_kind_and_budget(tiny_llama, monkeypatch):
    model, spec = ModelSpec(path=str(tiny_llama)), ExecutorSpec(device="auto", kind="native")
    with monkeypatch.context() as patched:
        fake_cuda(patched)  # the driver sees a GPU
        driver = resolve_executor(model, spec, on_workers=True)
    driver = ResolvedExecutor(driver.kind, driver.device, driver.dtype, kv_budget_tokens=512)
    assert (driver.device, driver.dtype) == ("cuda", "bfloat16")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert driver.on_worker(model, spec) == ResolvedExecutor(
        EXECUTORS["native"], expected, devices.dtype_name("auto", expected), kv_budget_tokens=512
    )
