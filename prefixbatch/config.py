"""The base of every spec section: frozen, unknown fields refused, attribute docstrings as help.

Each component owns the section it consumes (`pipeline.config`, `executors.config`,
`cluster.config`); `jobs.spec.JobSpec` only composes them, so no component imports the job
layer. `ModelSpec` lives here, at the bottom: the tokenizer (`pipeline`) and the executors
both read the model folder it names. The field docstrings are the spec's reference: `prefixbatch
spec-reference` renders them into docs/spec.md and `validate --explain` prints one.
"""

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict


@dataclass(frozen=True)
class ShownAs:
    """`Annotated[..., ShownAs("...")]`: the type the spec reference names for a field whose
    validator accepts more than its annotation says (a schema object kept as JSON text), and
    the values it allows where its validator, not the annotation, sets them. Only the
    reference reads it; validation ignores it."""

    type: str
    allowed: str = ""  # "": what the annotation's choices and bounds say


class StrictModel(BaseModel):
    """Frozen, `extra="forbid"`; the docstring under each field becomes its description."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)


class ModelSpec(StrictModel):
    """The Hugging Face model folder to run."""

    path: str
    """Folder of a Hugging Face checkpoint (config.json, safetensors weights, tokenizer files),
    or a Hugging Face Hub id (`org/name`, e.g. `Qwen/Qwen2.5-0.5B-Instruct`): downloaded into
    the Hub cache (`HF_HOME`; config, tokenizer and safetensors files only) when the network
    allows, used from the cache offline (`HF_HUB_OFFLINE=1`). A relative path is resolved
    against the spec file's folder; a folder that exists wins over a Hub id of the same name.
    On Dask, workers use the folder the driver resolved (a shared cache or filesystem)."""

    gguf_file: str | None = None
    """A GGUF file (llama.cpp's format, as Ollama and LM Studio store models) inside the `path`
    folder to load; or name the `.gguf` file in `path` itself. Dequantized once to fp32
    safetensors in a cached Hugging Face folder (in the Hub cache, keyed by the file's SHA-256)
    that every executor reads; `validate` and `plan` read only its config and tokenizer. The
    job's fingerprint (`_job.json`) records the file's SHA-256."""

    revision: str | None = None
    """Hub ids only: the branch, tag or commit to use (null: `main`). The commit it resolves
    to is recorded in the job's fingerprint (`_job.json`), so a resume against another
    revision is refused."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights and activations dtype. `auto`: float32 on the CPU, bfloat16 on CUDA.
    `bfloat16` on the CPU: `native` keeps weights, activations and KV in bf16 and sums in
    fp32 (faster than fp32; outputs equal transformers' bf16 up to near-ties)."""

    chat_template: Literal["auto", "always", "never"] = "auto"
    """`auto`: messages rows go through the tokenizer's chat template, prompt rows are used as
    raw text. `always`: prompt rows are also wrapped as one user message and templated.
    `never`: no template (only valid with `input.prompt_column`)."""

    trust_remote_code: bool = False
    """Allow code shipped inside the model folder to run. Off unless you trust the folder."""
