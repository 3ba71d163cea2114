"""The base of every spec section: frozen, unknown fields refused, attribute docstrings as help.

Each component owns the section it consumes (`pipeline.config`, `executors.config`);
`jobs.spec.JobSpec` only composes them, so no component imports the job layer.
"""

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """Frozen, `extra="forbid"`; the docstring under each field becomes its description."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)
