"""Executors turn requests (token ids + sampling) into completions: `hf` (transformers) and, later, `native`.

Only this package touches tensors. Modules are imported lazily by `jobs/` so that planning
and validation never pay for importing torch.
"""
