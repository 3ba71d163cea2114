"""vLLM for the tests that run it: skipped where it is not installed (`make test-fast`, a
developer without it), a failure where it must be there (`make test` sets
PREFIXBATCH_REQUIRE_VLLM=1 after installing it): a broken `import vllm` never turns the
suite green by skipping what it names."""

from __future__ import annotations

import importlib
import os

import pytest

REQUIRE_ENV = "PREFIXBATCH_REQUIRE_VLLM"


def import_vllm():
    """`vllm`, imported; else skip this module, or fail it when vLLM is required."""
    try:
        return importlib.import_module("vllm")
    except Exception as error:  # ImportError, or whatever a broken install raises on import
        reason = f"vLLM cannot be imported ({type(error).__name__}: {error})"
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{reason}, yet {REQUIRE_ENV}=1 (make test) requires it; run `make install-vllm`", pytrace=False)
        pytest.skip(reason, allow_module_level=True)
