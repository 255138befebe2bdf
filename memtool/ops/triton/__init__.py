"""Triton kernels, one module per op, each tested against its twin in `memtool.ops.reference`.

Nothing here imports triton at package import: `memtool.ops` imports a kernel module only when
it has chosen the Triton backend, so memtool works where triton is not installed.
"""
