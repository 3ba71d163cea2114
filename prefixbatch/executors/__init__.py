"""Executors run a plan on a model: `native` (our engine) and `hf` (transformers, the reference).

Each is handed a `PlannedRequests` (the job's plan, or one shard's part of it) and yields a
`Completion` per request as it finishes (`base`); `registry` names them, resolves the one a
job runs on and loads it; `loop` is the one generate loop every run calls. Only this package
touches tensors, and its modules are imported lazily by the layers above, so planning and
validation never pay for importing torch.
"""
