"""One model loader for every command.

Sources, in the order they are recognised:
- a built-in name (`smollm2-135m`, the default): fetched and converted once into the cache;
- a `.gguf` file: dequantized by transformers' GGUF reader;
- a local Hugging Face folder: safetensors only, unless `allow_pickle=True` (pickle checkpoints
  run code on load);
- a hub id (`org/name`): from the local Hugging Face cache, else the hub; when the hub cannot be
  reached we fail within seconds instead of sitting through the hub client's retries.
"""

import json
import os
import re
import socket
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import torch

from memtool.errors import MemtoolError
from memtool.formats.awq_checkpoint import is_awq_config, load_awq_model
from memtool.formats.bitstack_model import BitStackState, load_bitstack_model
from memtool.formats.bitstack_stack import is_bitstack_folder
from memtool.formats.gptq_checkpoint import is_gptq_config, load_gptq_model
from memtool.models.builtin import BUILTIN_MODELS, DEFAULT_MODEL, ensure_builtin
from memtool.models.safetensors_check import check_safetensors

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")


@dataclass
class LoadedModel:
    """A model ready to run, with where it came from (results report it)."""

    model: torch.nn.Module
    tokenizer: object
    source: str  # what the user asked for
    kind: str  # "builtin" | "hf-folder" | "gguf" | "hub"
    path: Path | None  # local folder or file, when there is one
    weight_files: list[Path] = field(default_factory=list)
    bitstack: BitStackState | None = None  # set for BitStack stacks, which can be resized

    def set_budget(self, budget: int | str | None) -> int:
        """Grow or shrink a BitStack model in place to fit `budget` (bytes or "300MB"; None =
        every block); returns the blocks now loaded. Other models cannot be resized."""
        if self.bitstack is None:
            raise MemtoolError(f"{self.source} is not a BitStack stack: it has no budget to set")
        return self.bitstack.set_budget(budget)

    @property
    def bytes_on_disk(self) -> int:
        return sum(f.stat().st_size for f in self.weight_files)

    @property
    def max_context(self) -> int | None:
        config = self.model.config
        return getattr(config, "max_position_embeddings", None)


def resolve_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise MemtoolError(f"unknown dtype {name!r}: use one of {', '.join(DTYPES)}") from None


def load_model(
    source: str | os.PathLike | None = None,
    *,
    dtype: str = "float32",
    allow_pickle: bool = False,
    budget: int | str | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer on CPU.

    Args:
        source: built-in name, local folder, `.gguf` file or hub id; None means the default
            built-in model (`smollm2-135m`).
        dtype: compute dtype of the loaded weights (`float32`, `bfloat16`, `float16`), or
            `stored`: the dtype the checkpoint's safetensors hold when they all hold one of
            those (float32 otherwise, and for GGUF and hub sources).
        allow_pickle: permit `pytorch_model.bin` checkpoints (unsafe: pickle runs code).
        budget: for a BitStack stack, the weight bytes to load (int or "300MB"); None loads
            the whole stack. The result's `set_budget` resizes it in place later.

    Raises:
        MemtoolError: the source does not exist, is not a model, or is damaged.
    """
    torch_dtype = None if dtype == "stored" else resolve_dtype(dtype)
    text = str(source) if source is not None else DEFAULT_MODEL
    if budget is not None and not is_bitstack_folder(Path(text).expanduser()):
        raise MemtoolError(
            f"a budget applies to BitStack stacks (memtool compress --method bitstack); {text} "
            "is not one"
        )
    if text in BUILTIN_MODELS:
        folder = ensure_builtin(text)
        loaded = _load_folder(folder, torch_dtype, allow_pickle=False)
        loaded.source, loaded.kind = text, "builtin"
        return loaded
    path = Path(text).expanduser()
    if path.exists():
        if path.is_file() and path.suffix == ".gguf":
            return _load_gguf(path, torch_dtype or torch.float32)
        if path.is_dir():
            loaded = _load_folder(path, torch_dtype, allow_pickle, budget)
            loaded.source = text
            return loaded
        raise MemtoolError(f"{path} is neither a model folder (with config.json) nor a .gguf file")
    if _HUB_ID.match(text) and not text.startswith((".", "~")):
        return _load_hub(text, torch_dtype or torch.float32, allow_pickle)
    names = ", ".join(BUILTIN_MODELS)
    raise MemtoolError(
        f"model {text!r} not found: no such file or folder, and not a built-in name ({names}) "
        "or a hub id (org/name)"
    )


def load_tokenizer(source: str | os.PathLike | None = None):
    """The tokenizer `load_model(source)` would give, without loading the weights."""
    text = str(source) if source is not None else DEFAULT_MODEL
    if text in BUILTIN_MODELS:
        return _load_tokenizer(str(ensure_builtin(text)))
    path = Path(text).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _load_tokenizer(str(path.parent), gguf_file=path.name)
    if path.is_dir():
        return _load_tokenizer(str(path))
    return load_model(text).tokenizer  # a hub id: the loader's offline handling applies


def _weight_files(folder: Path, allow_pickle: bool) -> list[Path]:
    safetensors = sorted(folder.glob("*.safetensors"))
    if safetensors:
        for file in safetensors:
            check_safetensors(file)
        return safetensors
    pickles = sorted(folder.glob("pytorch_model*.bin"))
    if pickles:
        if not allow_pickle:
            raise MemtoolError(
                f"{folder} holds only pickle weights ({pickles[0].name}), which can run code when "
                "loaded; convert them to safetensors or pass --allow-pickle if you trust the source"
            )
        return pickles
    raise MemtoolError(f"{folder} has config.json but no weights (*.safetensors)")


def stored_dtype(files: list[Path]) -> torch.dtype:
    """The one floating dtype of `files`' tensors (safetensors headers), or float32 when they
    mix dtypes, hold another one, or are not safetensors."""
    found = set()
    for file in files:
        if file.suffix != ".safetensors":
            return torch.float32
        header = check_safetensors(file)
        found |= {e["dtype"] for k, e in header.items() if k != "__metadata__"}
    floating = found & {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
    named = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    if len(floating) == 1 and floating <= named.keys():
        return named[floating.pop()]
    return torch.float32


def _load_folder(
    folder: Path, dtype: torch.dtype | None, allow_pickle: bool, budget: int | str | None = None
) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    if not (folder / "config.json").is_file():
        raise MemtoolError(
            f"{folder} is not a model folder: config.json is missing (expected a Hugging Face "
            "folder with config.json and *.safetensors)"
        )
    files = _weight_files(folder, allow_pickle)
    dtype = dtype or stored_dtype(files)
    tokenizer = _load_tokenizer(str(folder))
    try:
        config = json.loads((folder / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MemtoolError(f"{folder}/config.json is not valid JSON: {exc}") from exc
    state = None
    try:
        if is_bitstack_folder(folder):
            model, state = load_bitstack_model(folder, dtype, budget)
        elif is_gptq_config(config):
            model = load_gptq_model(folder, files, dtype)
        elif is_awq_config(config):
            model = load_awq_model(folder, files, dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                folder, dtype=dtype, use_safetensors=not allow_pickle or None
            )
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise MemtoolError(f"could not load the model in {folder}: {_first_line(exc)}") from exc
    model.eval()
    loaded = LoadedModel(model, tokenizer, str(folder), "hf-folder", folder, files, state)
    if state is not None:
        model.set_budget = loaded.set_budget  # the resizing handle, on the model itself too
    return loaded


def _load_gguf(path: Path, dtype: torch.dtype) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    folder, name = str(path.parent), path.name
    try:
        tokenizer = _load_tokenizer(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise MemtoolError(f"could not read GGUF file {path}: {_first_line(exc)}") from exc
    model.eval()
    return LoadedModel(model, tokenizer, str(path), "gguf", path, [path])


def _hub_reachable(timeout_s: float = 5.0) -> tuple[bool, str]:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = urllib.parse.urlparse(endpoint).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout_s):
            return True, host
    except OSError as exc:
        return False, f"{host} ({exc.strerror or exc})"


def _load_hub(repo_id: str, dtype: torch.dtype, allow_pickle: bool) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": dtype, "use_safetensors": not allow_pickle or None}
    try:  # the local Hugging Face cache first: works offline and costs no request
        model = AutoModelForCausalLM.from_pretrained(repo_id, local_files_only=True, **kwargs)
        tokenizer = _load_tokenizer(repo_id, local_files_only=True)
    except OSError:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
        reachable, where = (False, "HF_HUB_OFFLINE is set") if offline else _hub_reachable()
        if not reachable:
            raise MemtoolError(
                f"cannot fetch {repo_id!r}: the Hugging Face hub is unreachable ({where}) and the "
                "model is not in the local cache; pass a local folder or .gguf file, or use the "
                f"built-in {DEFAULT_MODEL}"
            ) from None
        try:
            model = AutoModelForCausalLM.from_pretrained(repo_id, **kwargs)
            tokenizer = _load_tokenizer(repo_id)
        except OSError as exc:
            raise MemtoolError(
                f"could not load {repo_id!r} from the hub: {_first_line(exc)}"
            ) from exc
    model.eval()
    return LoadedModel(model, tokenizer, repo_id, "hub", None, _hub_weight_files(model))


def _hub_weight_files(model: torch.nn.Module) -> list[Path]:
    folder = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", "")
    path = Path(folder)
    return sorted(path.glob("*.safetensors")) if path.is_dir() else []


# Any of these makes a folder worth handing to AutoTokenizer (fast, config, SentencePiece, BPE).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                   "spiece.model", "vocab.txt")  # fmt: skip


def _load_tokenizer(where: str, **kwargs):
    from transformers import AutoTokenizer

    folder = Path(where)
    gguf = kwargs.get("gguf_file")
    if folder.is_dir() and not gguf and not any((folder / n).is_file() for n in TOKENIZER_FILES):
        # transformers would say "Couldn't instantiate the backend tokenizer from one of: ..."
        raise MemtoolError(
            f"{where} has no tokenizer ({', '.join(TOKENIZER_FILES[:2])}): memtool needs one to "
            "read text; copy in the tokenizer of the model it comes from (a model trained from "
            "a config on a token file has none)"
        )
    try:
        return AutoTokenizer.from_pretrained(where, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise MemtoolError(f"could not load a tokenizer from {where}: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
