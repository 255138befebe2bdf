"""bitsandbytes NF4/FP4 (Dettmers et al., QLoRA, 2023) and LLM.int8() (Dettmers et al., 2022).

No calibration: bitsandbytes quantizes each weight when transformers loads the model with a
`BitsAndBytesConfig`, and `save_pretrained` writes exactly the checkpoint transformers reads
back (packed uint8/int8 weights plus `absmax`/`quant_map`/`SCB` tensors and a
`quantization_config` with quant_method "bitsandbytes"). memtool drives that path rather than
re-implementing the format, so what it writes is what the ecosystem loads by construction. Runs
on CPU with bitsandbytes >= 0.45; LLM.int8() computes in float16 there.
"""

from dataclasses import dataclass
from pathlib import Path

import torch

from memtool.atomic import atomic_dir
from memtool.errors import MemtoolError
from memtool.formats.gptq_checkpoint import prepare_output
from memtool.models import LoadedModel

BNB_TYPES = ("nf4", "fp4", "int8")


@dataclass(frozen=True)
class BnbConfig:
    """bitsandbytes quantization: `nf4`/`fp4` (4-bit, blocks of 64) or `int8` (LLM.int8())."""

    quant_type: str = "nf4"
    double_quant: bool = False  # 4-bit only: quantize the absmax scales too (QLoRA)

    @property
    def method(self) -> str:
        return self.quant_type

    @property
    def bits(self) -> int:
        return 8 if self.quant_type == "int8" else 4

    def validate(self) -> None:
        if self.quant_type not in BNB_TYPES:
            raise MemtoolError(f"unknown bitsandbytes type {self.quant_type!r}: use nf4, fp4, int8")
        if self.double_quant and self.quant_type == "int8":
            raise MemtoolError("double quantization applies to nf4/fp4 only")

    def transformers_config(self):
        from transformers import BitsAndBytesConfig

        if self.quant_type == "int8":
            return BitsAndBytesConfig(load_in_8bit=True)
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.quant_type,
            bnb_4bit_compute_dtype=torch.float32,
            bnb_4bit_use_double_quant=self.double_quant,
        )


def bnb_quantize(source: LoadedModel, config: BnbConfig) -> torch.nn.Module:
    """Load `source`'s checkpoint again through bitsandbytes; returns the quantized model."""
    from transformers import AutoModelForCausalLM

    if source.path is None or not source.path.is_dir():
        raise MemtoolError(
            f"bitsandbytes quantizes a safetensors model folder; {source.source!r} is not one "
            "(load it and save it as a folder first)"
        )
    model = AutoModelForCausalLM.from_pretrained(
        source.path,
        quantization_config=config.transformers_config(),
        dtype=torch.float32,
        device_map="cpu",
    )
    return model.eval()


def save_bnb_checkpoint(model: torch.nn.Module, tokenizer, output: Path, overwrite: bool) -> None:
    """`save_pretrained` into a temporary folder renamed into place (no partial output)."""
    prepare_output(output, overwrite)
    with atomic_dir(output) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
