"""On-disk weight formats, packed bit-exactly as the tools that read them expect."""

from memtool.formats.gptq_pack import (
    SUPPORTED_BITS,
    check_gptq_tensors,
    pack_gptq,
    unpack_gptq,
)

__all__ = ["SUPPORTED_BITS", "check_gptq_tensors", "pack_gptq", "unpack_gptq"]
