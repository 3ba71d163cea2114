"""Attention for the native engine: the plan of a step, its backends, and the choice between them.

Read in this order: `plan` (which rows of a step attend to which slot ranges: plain data),
`spans` (the contract every backend meets, and the one exact merge), `backends` (the table
that picks a backend by device, dtype and head size), `tree` (the model's attention callback:
stores k, v, runs the chosen backend). The backends, one file each: `reference` (plain
PyTorch, the oracle), `c_kernel` (our C kernel, CPU), `torch_spans` (PyTorch's kernels, CPU),
`flash_varlen` (FlashAttention-2, CUDA), `triton_span` (Triton, CUDA); `invariant` is the
batch-invariant mode's own attention. `parts` holds attention over one segment and the
two-part merge, which the others build on.
"""
