"""Model loading: built-in models, local folders, GGUF files and hub ids."""

from memtool.models.builtin import BUILTIN_MODELS, DEFAULT_MODEL, ensure_builtin
from memtool.models.loader import (
    DTYPES,
    LoadedModel,
    load_model,
    load_tokenizer,
    resolve_dtype,
)

__all__ = [
    "BUILTIN_MODELS",
    "DEFAULT_MODEL",
    "DTYPES",
    "LoadedModel",
    "ensure_builtin",
    "load_model",
    "load_tokenizer",
    "resolve_dtype",
]
