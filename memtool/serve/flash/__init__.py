"""Serving a model larger than its memory budget by streaming FFN neurons from a flash store.

After Alizadeh et al., "LLM in a flash" (arXiv 2312.11514): `build` writes the store with its
neuron predictors, `sparsity` chooses neurons, `io` reads them (O_DIRECT, coalesced, parallel),
`window` keeps those of the last tokens, `ffn` computes a layer's FFN from them, `engine`
assembles the model within a budget and serves it, and `reference` is the masked dense FFN
that the streamed one must equal.
"""
