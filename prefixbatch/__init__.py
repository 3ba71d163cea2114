"""prefixbatch: offline batch LLM inference over Parquet that plans shared prefixes up front.

The public surface is the CLI (`prefixbatch run job.yaml`) and these names:

- `load_job`, `validate`, `plan`, `run`: the Python API (`prefixbatch.jobs.api`);
- `generate`, `Engine`: prompts in memory → a table of completions (`prefixbatch.jobs.inmemory`);
- `JobSpec`: a validated job spec; `RunSummary`: what a run did;
- `PrefixbatchError`, `UserError`: every error a user can cause is a `UserError`.

The API is imported on first use, so `import prefixbatch` stays light.
"""

import os

from prefixbatch.errors import PrefixbatchError, UserError

# OpenMP threads (PyTorch's, oneDNN's, MKL's) spin this many times at a barrier before they
# sleep (GNU OpenMP's default: 300,000). A spinning thread holds a core others could use: the
# straggler it waits for on a busy machine, and the native engine's own pool between PyTorch's
# ops. When the dense layers ran on oneDNN, a one-core CPU hog beside a 2-thread run cost ~2.8x
# the quiet time by default and ~1.9x with 1,000, at no cost when quiet (BENCHMARKS.md, "Under
# contention"). Read when the OpenMP runtime loads, i.e. before torch is imported; a user's own
# GOMP_SPINCOUNT or OMP_WAIT_POLICY wins.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "1000")

__version__ = "0.1.0"

_LAZY = {
    "load_job": "prefixbatch.jobs.api",
    "validate": "prefixbatch.jobs.api",
    "plan": "prefixbatch.jobs.api",
    "run": "prefixbatch.jobs.api",
    "JobSpec": "prefixbatch.jobs.spec",
    "RunSummary": "prefixbatch.jobs.run",
    "Engine": "prefixbatch.jobs.inmemory",
    "generate": "prefixbatch.jobs.inmemory",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'prefixbatch' has no attribute {name!r}")


__all__ = [
    "Engine", "JobSpec", "PrefixbatchError", "RunSummary", "UserError", "__version__", "generate", "load_job", "plan",
    "run", "validate",
]
