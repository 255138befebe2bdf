"""Training: ZeRO-style sharding and offload on torch.distributed, activation swapping."""
