"""Session-wide fixtures: tiny real checkpoints, built once per test session.

Each fixture returns a folder that `AutoTokenizer.from_pretrained` and
`AutoModelForCausalLM.from_pretrained` load as they would a downloaded model (see
`prefixbatch.executors.random_model`). Tests must not write into these folders; copy one
first (`shutil.copytree`) to make a broken variant.
"""

from __future__ import annotations

import os
from pathlib import Path

# Tiny models gain nothing from a second thread, and on a shared 2-core machine torch's
# thread pool contending with other processes makes each step tens of times slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest


def _make(tmp_path_factory: pytest.TempPathFactory, arch: str) -> Path:
    # Imported here so that collecting tests that need no model never imports torch.
    from prefixbatch.executors.random_model import make_test_model

    return make_test_model(tmp_path_factory.mktemp(f"tiny_{arch}"), arch=arch, size="tiny")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Llama, GQA (4 heads, 2 kv heads), untied lm_head, ~1.8 M parameters."""
    return _make(tmp_path_factory, "llama")


@pytest.fixture(scope="session")
def calm_llama(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tiny_llama` with its final norm scaled by 0.2: logits with a trained model's spread
    (std ~1.6, not ~8), where fp32 rounding moves a logprob by well under 1e-4."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path_factory.mktemp("calm_llama")
    shutil.copytree(tiny_llama, folder, dirs_exist_ok=True)
    weights = load_file(folder / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"] * 0.2
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Qwen2, q/k/v biases, lm_head tied to the embedding, ~1.3 M parameters."""
    return _make(tmp_path_factory, "qwen2")


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Qwen3, q/k RMSNorm, explicit head_dim, lm_head tied, ~1.3 M parameters."""
    return _make(tmp_path_factory, "qwen3")


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto) on 127.0.0.1; `create_bucket()` gives a test its own bucket."""
    from tests.s3server import running_s3_server

    with running_s3_server() as server:
        yield server
