"""prefixbatch: offline batch LLM inference over Parquet that plans shared prefixes up front.

The public surface is the CLI (`prefixbatch run job.yaml`) and these names:

- `load_job`, `validate`, `plan`, `run`: the Python API (`prefixbatch.jobs.api`);
- `JobSpec`: a validated job spec; `RunSummary`: what a run did;
- `PrefixbatchError`, `UserError`: every error a user can cause is a `UserError`.

The API is imported on first use, so `import prefixbatch` stays light.
"""

from prefixbatch.errors import PrefixbatchError, UserError

__version__ = "0.1.0"

_LAZY = {
    "load_job": "prefixbatch.jobs.api",
    "validate": "prefixbatch.jobs.api",
    "plan": "prefixbatch.jobs.api",
    "run": "prefixbatch.jobs.api",
    "JobSpec": "prefixbatch.jobs.spec",
    "RunSummary": "prefixbatch.jobs.run",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'prefixbatch' has no attribute {name!r}")


__all__ = ["JobSpec", "PrefixbatchError", "RunSummary", "UserError", "__version__", "load_job", "plan", "run", "validate"]
