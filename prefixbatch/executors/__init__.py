"""Executors run a plan on a model: `native` (our engine) and `hf` (transformers, the reference).

Each is handed a `PlannedRequests` (the job's plan, or one shard's part of it) and yields a
`Completion` per request as it finishes (`base`); `registry` names them and loads the chosen
one. Only this package touches tensors, and its modules are imported lazily by the layers
above, so planning and validation never pay for importing torch.
"""
