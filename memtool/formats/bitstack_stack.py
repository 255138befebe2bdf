"""The BitStack stack on disk: any prefix of it is a model, and its bytes are known in advance.

A stack folder holds
- `config.json` and the tokenizer: the model as Hugging Face describes it (no quantization
  config: the decomposed linears are rebuilt from `bitstack.json`);
- `base.safetensors`: everything that is not decomposed (embeddings, norms, biases, output
  head), in the checkpoint's 16-bit dtype, plus the explicit input scales
  (`<linear>.bitstack_input_scale`) where a scale could not be folded upstream;
- `stack.safetensors`: one uint8 tensor per residual block, `block.000000`, `block.000001`, ...
  in stack order. All tensors share one dtype, so safetensors lays them out by name, i.e. in
  stack order: the blocks of any budget are one contiguous prefix of the data. A block is its
  packed signs `[out, ceil(in/8)]`, then `u` `[out, rank]` and `v` `[in, rank]` in float16;
- `bitstack.json`: the linears (shape, rank, scale), the stack (`[linear, block, bytes, crc32]`
  per entry), and `weight_bytes[k]`: every weight byte a model loaded with the first
  `min_blocks + k` blocks holds (base included), which is what budgets are checked against.

The first `min_blocks` entries are every linear's first block: a linear with no block would
output zeros, so that is the smallest model the stack makes.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from memtool.atomic import atomic_dir
from memtool.errors import MemtoolError
from memtool.formats.bitstack_pack import packed_width
from memtool.formats.checksums import tensor_crc32
from memtool.models.safetensors_check import check_safetensors
from memtool.sizes import format_size

FORMAT = "memtool-bitstack"
VERSION = 1
META_FILE = "bitstack.json"
BASE_FILE = "base.safetensors"
STACK_FILE = "stack.safetensors"
INPUT_SCALE = "bitstack_input_scale"
FACTOR_DTYPE = torch.float16


@dataclass(frozen=True)
class LinearSpec:
    """A decomposed linear as the stack describes it."""

    name: str
    out_features: int
    in_features: int
    rank: int
    blocks: int
    input_scale: bool

    @property
    def block_bytes(self) -> int:
        sign_bytes = self.out_features * packed_width(self.in_features)
        return sign_bytes + 2 * self.rank * (self.out_features + self.in_features)


def block_name(index: int) -> str:
    return f"block.{index:06d}"


def encode_block(signs: Tensor, u: Tensor, v: Tensor) -> Tensor:
    """One block as the flat uint8 tensor stored in `stack.safetensors`."""
    parts = [signs.contiguous().view(torch.uint8).reshape(-1)]
    parts += [t.to(FACTOR_DTYPE).contiguous().view(torch.uint8).reshape(-1) for t in (u, v)]
    return torch.cat(parts)


def decode_block(data: Tensor, spec: LinearSpec) -> tuple[Tensor, Tensor, Tensor]:
    """(signs, u, v) of one stored block of `spec`'s linear."""
    if data.numel() != spec.block_bytes:
        raise MemtoolError(
            f"a block of {spec.name} has {data.numel()} bytes; its shape needs {spec.block_bytes}"
        )
    m, n, k = spec.out_features, spec.in_features, spec.rank
    sign_bytes = m * packed_width(n)
    signs = data[:sign_bytes].reshape(m, packed_width(n))
    u = data[sign_bytes : sign_bytes + 2 * m * k].view(FACTOR_DTYPE).reshape(m, k)
    v = data[sign_bytes + 2 * m * k :].view(FACTOR_DTYPE).reshape(n, k)
    return signs, u, v


def write_stack(
    output: Path,
    config: dict,
    tokenizer,
    base: dict[str, Tensor],
    linears: list[LinearSpec],
    stack: list[tuple[int, int, Tensor]],
    extra: dict,
) -> dict:
    """Write a stack folder atomically; returns its `bitstack.json` content.

    Args:
        output: the folder to create (the caller has checked it, `prepare_output`).
        config: the model's config as a dict.
        tokenizer: saved beside it.
        base: every stored tensor that is not a block (16-bit floats), by state-dict name.
        linears: the decomposed linears; `stack` refers to them by index.
        stack: `(linear index, block index, encoded block)` in stack order, every linear's
            first block first.
        extra: recorded in `bitstack.json` as is (settings, calibration, scaling).
    """
    base_bytes = sum(t.numel() * t.element_size() for t in base.values())
    entries, blocks, total = [], {}, base_bytes
    weight_bytes = []
    for position, (linear, block, data) in enumerate(stack):
        blocks[block_name(position)] = data
        entries.append([linear, block, data.numel(), tensor_crc32(data)])
        total += data.numel()
        if position + 1 >= len(linears):
            weight_bytes.append(total)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "linears": [vars(spec) for spec in linears],
        "min_blocks": len(linears),
        "base_bytes": base_bytes,
        "weight_bytes": weight_bytes,
        "stack": entries,
        **extra,
    }
    with atomic_dir(output) as tmp:
        save_file(base, str(tmp / BASE_FILE), metadata={"format": "pt"})
        save_file(blocks, str(tmp / STACK_FILE), metadata={"format": FORMAT})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
        tokenizer.save_pretrained(tmp)
    return meta


def is_bitstack_folder(folder: Path) -> bool:
    return (folder / META_FILE).is_file()


class StackFile:
    """A stack folder's metadata and its blocks, read on demand and checked as they are read."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        try:
            meta = json.loads((folder / META_FILE).read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise MemtoolError(f"{folder}/{META_FILE} is unreadable: {exc}") from exc
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise MemtoolError(
                f"{folder}/{META_FILE} is not a {FORMAT} v{VERSION} stack (format "
                f"{meta.get('format')!r}, version {meta.get('version')!r})"
            )
        self.meta = meta
        self.linears = [LinearSpec(**item) for item in meta["linears"]]
        self.stack = [tuple(entry) for entry in meta["stack"]]
        self.min_blocks = int(meta["min_blocks"])
        self.weight_bytes = [int(b) for b in meta["weight_bytes"]]
        header = check_safetensors(folder / STACK_FILE)  # truncation shows here
        for position, (linear, _, nbytes, _) in enumerate(self.stack):
            info = header.get(block_name(position))
            if info is None or info["data_offsets"][1] - info["data_offsets"][0] != nbytes:
                raise MemtoolError(
                    f"{folder}/{STACK_FILE} does not match {META_FILE} at block {position}: "
                    "the stack is damaged; compress the model again"
                )
            if nbytes != self.linears[linear].block_bytes:
                raise MemtoolError(f"{folder}/{META_FILE}: block {position} has a wrong size")

    @property
    def min_bytes(self) -> int:
        return self.weight_bytes[0]

    @property
    def max_bytes(self) -> int:
        return self.weight_bytes[-1]

    def blocks_for_budget(self, budget_bytes: int | None) -> int:
        """How many leading blocks fit `budget_bytes` (None: all of them)."""
        if budget_bytes is None:
            return len(self.stack)
        if budget_bytes < self.min_bytes:
            raise MemtoolError(
                f"budget {format_size(budget_bytes)} is below this stack's minimum of "
                f"{format_size(self.min_bytes)} ({self.min_bytes} bytes: the 16-bit base plus "
                "every linear's first block)"
            )
        if budget_bytes > self.max_bytes:
            raise MemtoolError(
                f"budget {format_size(budget_bytes)} is above the full stack "
                f"({format_size(self.max_bytes)}, {self.max_bytes} bytes); ask for at most "
                "that, or give no budget to load every block"
            )
        fitting = sum(1 for total in self.weight_bytes if total <= budget_bytes)
        return self.min_blocks + fitting - 1

    def read(self, start: int, stop: int) -> list[tuple[int, Tensor, Tensor, Tensor]]:
        """Blocks `start .. stop-1` as `(linear index, signs, u, v)`, each checksum verified."""
        out = []
        with safe_open(str(self.folder / STACK_FILE), framework="pt") as handle:
            for position in range(start, stop):
                linear, _, _, checksum = self.stack[position]
                data = handle.get_tensor(block_name(position))
                if tensor_crc32(data) != checksum:
                    raise MemtoolError(
                        f"{self.folder}/{STACK_FILE}: block {position} fails its checksum; the "
                        "stack is corrupted: compress the model again"
                    )
                out.append((linear, *decode_block(data, self.linears[linear])))
        return out

    def counts(self, n_blocks: int) -> list[int]:
        """Blocks of each linear among the first `n_blocks` of the stack."""
        counts = [0] * len(self.linears)
        for linear, *_ in self.stack[:n_blocks]:
            counts[linear] += 1
        return counts
