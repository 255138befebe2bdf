"""The flash store: FFN neurons bundled for streaming from SSD, as in "LLM in a flash".

Alizadeh et al., "LLM in a flash: Efficient Large Language Model Inference with Limited
Memory" (arXiv 2312.11514), store what one FFN neuron needs side by side ("row-column
bundling"), so that a neuron predicted active costs one contiguous read. A store folder holds
- `resident.safetensors`: every tensor that is not in a bundle (embeddings, attention, norms,
  the down/fc2 bias, lm_head when untied; gate_proj too with `gate_resident=True`), floating
  tensors in the store dtype. A tied tensor is stored once; the json lists its aliases;
- `ffn.bin`: per decoder layer, `n_neurons` bundles of `stride_bytes` each. SwiGLU (Llama):
  bundle i is gate row i, up row i, down column i (`3*H` values; `2*H` with `gate_resident`).
  ReLU (OPT): fc1 row i, fc2 column i, then fc1's bias i (fc2 column i alone with
  `gate_resident`, which keeps fc1 and its bias resident). Row biases of gate/up (Llama's
  `mlp_bias`) go at the tail of the bundle too; column biases are not per neuron and stay
  resident;
- `config.json`: the model's config (the architecture to rebuild around the store);
- `flash_store.json`: version, kind, dtype, hidden size, per layer offset / n_neurons /
  stride / CRC32 and the bundle layout (part name, element count, byte offset), CRC32 of
  `resident.safetensors`, total sizes and the model fingerprint.

Alignment: each layer region starts at a multiple of 4096 bytes (page and 4Kn sector size) and
each bundle is padded to a multiple of 512 bytes, the logical block size O_DIRECT requires on
most NVMe drives, so a bundle-granular O_DIRECT read needs no bounce buffer. 4096-byte bundles
would waste up to 4 KiB per neuron at small hidden sizes; on 4Kn drives a reader rounds out to
4096 instead. SwiGLU bundles at real sizes (H a multiple of 256) need no padding; a ReLU bundle
pays up to 510 bytes for its bias (about 3% at H=4096 in fp16). Parts sit at the front so the
big vectors stay 2H-aligned; biases go last.

This module is only the format, its writer and a plain buffered reader; predicting, caching
and streaming neurons is `memtool.serve.flash`.
"""

import hashlib
import json
import os
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from memtool.atomic import atomic_dir
from memtool.errors import MemtoolError
from memtool.formats.checksums import file_crc32, tensor_crc32
from memtool.models.layers import decoder_layers

FORMAT = "memtool-flash-store"
VERSION = 1
META_FILE = "flash_store.json"
RESIDENT_FILE = "resident.safetensors"
FFN_FILE = "ffn.bin"
LAYER_ALIGN_BYTES = 4096
BUNDLE_ALIGN_BYTES = 512
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class FlashStoreInfo:
    """What `write_flash_store` wrote."""

    folder: Path
    kind: str
    dtype: torch.dtype
    n_layers: int
    ffn_bytes: int
    resident_bytes: int
    fingerprint: str


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def model_fingerprint(model: nn.Module) -> str:
    """sha256 over the model's config and every state_dict tensor's name, shape, dtype and CRC32.

    The config is `config.to_dict()` without `transformers_version` and private keys such as
    `_name_or_path`, serialized with sorted keys, so the same weights loaded from another
    folder or with another transformers release keep their fingerprint. Tensors are hashed as
    the model holds them: the fingerprint of an fp32 model differs from its fp16 copy.
    """
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        cfg = {k: v for k, v in config.to_dict().items() if not k.startswith("_")}
        cfg.pop("transformers_version", None)
        digest.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, tensor in model.state_dict().items():
        entry = f"\n{name}|{tuple(tensor.shape)}|{tensor.dtype}|{tensor_crc32(tensor):08x}"
        digest.update(entry.encode())
    return digest.hexdigest()


def _mlp_parts(layer: nn.Module, index: int, gate_resident: bool) -> tuple[str, list]:
    """The layer's kind and bundle parts: (part name, linear, 'row' | 'col' | 'bias')."""
    mlp = getattr(layer, "mlp", None)
    names = ("gate_proj", "up_proj", "down_proj")
    if mlp is not None and all(isinstance(getattr(mlp, n, None), nn.Linear) for n in names):
        gate, up, down = (getattr(mlp, n) for n in names)
        if gate.weight.shape == up.weight.shape == down.weight.T.shape:
            rows = [("up", up)] if gate_resident else [("gate", gate), ("up", up)]
            parts = [(n, m, "row") for n, m in rows] + [("down", down, "col")]
            parts += [(f"{n}_bias", m, "bias") for n, m in rows if m.bias is not None]
            return "swiglu", parts
    fc1, fc2 = getattr(layer, "fc1", None), getattr(layer, "fc2", None)
    linears = isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear)
    if linears and fc1.weight.shape == fc2.weight.T.shape:
        if gate_resident:  # fc1 (and its bias) stay resident: exact ReLU selection
            return "relu", [("fc2", fc2, "col")]
        parts = [("fc1", fc1, "row"), ("fc2", fc2, "col")]
        if fc1.bias is not None:
            parts.append(("fc1_bias", fc1, "bias"))
        return "relu", parts
    raise MemtoolError(
        f"decoder layer {index} ({type(layer).__name__}) has an MLP the flash store cannot "
        "bundle: supported are SwiGLU (mlp.gate_proj/up_proj [I,H], mlp.down_proj [H,I]) and "
        "ReLU (fc1 [I,H], fc2 [H,I])"
    )


def _shape(parts: list) -> tuple[int, int]:
    """(neurons, hidden size) of a layer's bundle parts, read off its first part."""
    _, linear, how = parts[0]
    rows, cols = linear.weight.shape
    return (rows, cols) if how == "row" else (cols, rows)


def _bundles(parts: list, dtype: torch.dtype, stride_elems: int) -> Tensor:
    """One layer's region as a [n_neurons, stride_elems] tensor, padding zeroed."""
    region = torch.zeros(_shape(parts)[0], stride_elems, dtype=dtype)
    start = 0
    for _, linear, how in parts:
        weight = linear.weight.detach()
        value = {"row": weight, "col": weight.T}.get(how)
        value = linear.bias.detach()[:, None] if how == "bias" else value
        region[:, start : start + value.shape[1]] = value.cpu().to(dtype)
        start += value.shape[1]
    return region


def _store_dtype(model: nn.Module, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is None:
        first = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
        dtype = first if first in (torch.float16, torch.bfloat16) else torch.float16
    if dtype not in _DTYPES.values():
        raise MemtoolError(f"flash store dtype {dtype} unsupported: use float16 or bfloat16")
    return dtype


def write_flash_store(
    model: nn.Module,
    folder: Path,
    *,
    gate_resident: bool = False,
    dtype: torch.dtype | None = None,
    source: str | None = None,
    extra: Callable[[Path], None] | None = None,
) -> FlashStoreInfo:
    """Write `model` as a flash store in `folder`, atomically (absent or complete).

    Args:
        model: a decoder-only causal LM with SwiGLU or ReLU (fc1/fc2) MLPs.
        folder: the store folder; must not exist yet.
        gate_resident: keep the layer's first projection resident: SwiGLU gate_proj (bundles
            hold the up row and down column), ReLU fc1 and its bias (bundles hold the fc2
            column), so the engine selects neurons exactly instead of by a predictor.
        dtype: store dtype; default the model's 16-bit dtype, float16 for fp32 models.
        source: what the model was loaded from, recorded for reports.
        extra: called with the temporary folder before it is renamed into place, to add files
            that must appear together with the store (predictors, config, tokenizer).

    Raises:
        MemtoolError: `folder` exists, or a layer's MLP is of a shape the store cannot bundle.
    """
    folder = Path(folder)
    if folder.exists():
        raise MemtoolError(f"{folder} already exists: remove it or choose another folder")
    dtype = _store_dtype(model, dtype)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    module_names = {id(m): n for n, m in model.named_modules()}
    layers = [_mlp_parts(layer, i, gate_resident) for i, layer in enumerate(decoder_layers(model))]
    kinds = {kind for kind, _ in layers}
    if len(kinds) != 1:
        raise MemtoolError(f"flash store needs one MLP kind across layers, found {sorted(kinds)}")
    bundled = set()
    meta_layers, offset = [], 0
    for _kind, parts in layers:
        layout, start = [], 0
        for name, linear, how in parts:
            prefix = module_names[id(linear)]
            tensor = f"{prefix}.bias" if how == "bias" else f"{prefix}.weight"
            numel = 1 if how == "bias" else linear.weight.shape[1 if how == "row" else 0]
            layout.append(
                {"name": name, "numel": numel, "offset_bytes": start * itemsize, "source": tensor}
            )
            bundled.add(tensor)
            start += numel
        stride = _round_up(start * itemsize, BUNDLE_ALIGN_BYTES)
        n_neurons = _shape(parts)[0]
        bundle_bytes = start * itemsize
        meta_layers.append(
            dict(offset=offset, n_neurons=n_neurons, bundle_bytes=bundle_bytes, stride_bytes=stride)
        )
        meta_layers[-1]["layout"] = layout
        offset = _round_up(offset + n_neurons * stride, LAYER_ALIGN_BYTES)
    resident, aliases, seen = {}, {}, {}
    for name, tensor in model.state_dict().items():
        if name in bundled:
            continue
        key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride())
        if tensor.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        value = tensor.detach().cpu()
        resident[name] = (value.to(dtype) if value.is_floating_point() else value).contiguous()
    with atomic_dir(folder) as tmp:
        save_file(resident, str(tmp / RESIDENT_FILE))
        with open(tmp / FFN_FILE, "wb") as handle:
            for entry, (_, parts) in zip(meta_layers, layers, strict=True):
                handle.seek(entry["offset"])  # the gap before it reads as zeros
                region = _bundles(parts, dtype, entry["stride_bytes"] // itemsize)
                raw = region.view(torch.uint8).numpy()
                entry["crc32"] = zlib.crc32(raw)
                handle.write(raw)
        ffn_bytes = (tmp / FFN_FILE).stat().st_size
        resident_bytes = (tmp / RESIDENT_FILE).stat().st_size
        fingerprint = model_fingerprint(model)
        meta = dict(format=FORMAT, version=VERSION, kind=kinds.pop(), gate_resident=gate_resident)
        meta["dtype"] = str(dtype).removeprefix("torch.")
        meta["hidden_size"] = _shape(layers[0][1])[1]
        meta.update(layers=meta_layers, aliases=aliases, model_fingerprint=fingerprint)
        meta.update(ffn_bytes=ffn_bytes, resident_bytes=resident_bytes)
        meta["resident_crc32"] = file_crc32(tmp / RESIDENT_FILE)
        meta["source"] = source
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "save_pretrained"):
            config.save_pretrained(tmp)  # the architecture, so the store alone rebuilds the model
        if extra is not None:
            extra(tmp)
    return FlashStoreInfo(
        folder, meta["kind"], dtype, len(meta_layers), ffn_bytes, resident_bytes, fingerprint
    )


class FlashStore:
    """An open flash store: resident tensors on demand, FFN neurons by buffered `os.pread`."""

    def __init__(self, folder: Path, meta: dict):
        self._fd = -1
        self.folder = folder
        self.meta = meta
        self.kind: str = meta["kind"]
        self.dtype: torch.dtype = _DTYPES[meta["dtype"]]
        self.hidden_size: int = meta["hidden_size"]
        self.layers: list[dict] = meta["layers"]
        self._fd = os.open(folder / FFN_FILE, os.O_RDONLY)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "FlashStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    def resident_state_dict(self, verify: bool = False) -> dict[str, Tensor]:
        """Every non-bundled tensor by its model name; tied names share one tensor.

        With `verify`, the file's CRC32 is checked first (MemtoolError when damaged)."""
        path = self.folder / RESIDENT_FILE
        if verify and file_crc32(path) != self.meta["resident_crc32"]:
            raise MemtoolError(f"{path} fails its CRC32: damaged; rebuild the store")
        state = load_file(str(path))
        for alias, source in self.meta["aliases"].items():
            state[alias] = state[source]
        return state

    def read_neurons(self, layer: int, neuron_ids: Sequence[int]) -> dict[str, Tensor]:
        """The bundle parts of `neuron_ids` in layer `layer`, in the order asked (repeats kept).

        Row parts come back as [k, H], column parts as [H, k], biases as [k]. Ids are sorted and
        deduplicated first and each run of consecutive ids is one `os.pread`, so a dense set
        costs a few large reads rather than one per neuron.

        Raises:
            MemtoolError: a layer or neuron id out of range, or a short read.
        """
        if not 0 <= layer < len(self.layers):
            raise MemtoolError(f"layer {layer} out of range: the store has {len(self.layers)}")
        meta = self.layers[layer]
        ids = torch.as_tensor(list(neuron_ids), dtype=torch.long)
        if ids.numel() and (ids.min() < 0 or ids.max() >= meta["n_neurons"]):
            raise MemtoolError(f"neuron ids must lie in [0, {meta['n_neurons']}) for layer {layer}")
        unique, inverse = torch.unique(ids, sorted=True, return_inverse=True)
        stride = meta["stride_bytes"]
        chunks, values = [], unique.tolist()
        start = 0
        for end in range(1, len(values) + 1):
            if end == len(values) or values[end] != values[end - 1] + 1:
                length = (end - start) * stride
                data = os.pread(self._fd, length, meta["offset"] + values[start] * stride)
                if len(data) != length:
                    raise MemtoolError(f"short read from {self.folder / FFN_FILE}: truncated?")
                chunks.append(data)
                start = end
        raw = bytearray(b"".join(chunks))
        itemsize = torch.empty(0, dtype=self.dtype).element_size()
        bundles = (
            torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
        )
        bundles = bundles.view(self.dtype).view(len(values), stride // itemsize)[inverse]
        out = {}
        for part in meta["layout"]:
            first = part["offset_bytes"] // itemsize
            value = bundles[:, first : first + part["numel"]]
            if part["name"].endswith("_bias"):
                value = value[:, 0]
            elif part["name"] in ("down", "fc2"):
                value = value.T
            out[part["name"]] = value.contiguous()
        return out


def open_flash_store(
    folder: Path, model_fingerprint: str | None = None, verify: bool = True
) -> FlashStore:
    """Open the store in `folder`, checking version, file sizes and (with `verify`) CRCs.

    Args:
        folder: a folder written by `write_flash_store`.
        model_fingerprint: when given, the store must have been built from that model.
        verify: read every byte once to check the CRC32s (sizes are always checked).

    Raises:
        MemtoolError: missing or unknown metadata, a truncated or damaged file, or a store
            built from a different model.
    """
    folder = Path(folder)
    meta_path = folder / META_FILE
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise MemtoolError(f"{meta_path} missing or unreadable: not a flash store") from exc
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise MemtoolError(
            f"{meta_path}: format {meta.get('format')} v{meta.get('version')} is not "
            f"{FORMAT} v{VERSION}; rebuild the store with this memtool"
        )
    for name, key in ((FFN_FILE, "ffn_bytes"), (RESIDENT_FILE, "resident_bytes")):
        path = folder / name
        size = path.stat().st_size if path.exists() else None
        if size != meta[key]:
            raise MemtoolError(
                f"{path} is {size} bytes, expected {meta[key]}: truncated or damaged; rebuild"
            )
    if model_fingerprint is not None and model_fingerprint != meta["model_fingerprint"]:
        raise MemtoolError(
            f"{folder}: store was built from a different model (fingerprint "
            f"{meta['model_fingerprint'][:12]}, model {model_fingerprint[:12]}); rebuild it"
        )
    if verify:
        if file_crc32(folder / RESIDENT_FILE) != meta["resident_crc32"]:
            raise MemtoolError(f"{folder / RESIDENT_FILE} fails its CRC32: damaged; rebuild")
        for i, layer in enumerate(meta["layers"]):
            length = layer["n_neurons"] * layer["stride_bytes"]
            if file_crc32(folder / FFN_FILE, layer["offset"], length) != layer["crc32"]:
                raise MemtoolError(f"{folder / FFN_FILE} layer {i} fails its CRC32: damaged")
    return FlashStore(folder, meta)
