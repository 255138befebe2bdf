"""Tokenize a document stream the GPTQ way, caching the token ids of built-in sets.

Protocol (the one GPTQ, AWQ and most perplexity tables use): join the documents with "\n\n" and
tokenize the whole text at once, without special tokens (no BOS). Tokenizing documents or chunks
separately can give different ids at the seams (byte-level BPE pre-tokenizers group whitespace
with its neighbours), so the whole text goes through the tokenizer in one call.

With SmolLM2's 49k-token BPE that call takes about 4.5 s for the 4.4 MB wiki calibration text
and 16 s for the 10 MB stdlib calibration text (one CPU core; the tokenizers library does not
parallelize a single text), so the ids of built-in sets are cached under `data_dir()/tokens`,
keyed by the documents' fingerprint and a hash of the tokenizer's full definition
(`backend_tokenizer.to_str()`: normalizer, pre-tokenizer, vocab and merges). User data is not
cached: it changes, and each run would leave a copy of it behind.
"""

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from memtool.atomic import atomic_file, clean_stale_temporaries, file_lock
from memtool.data.documents import Documents
from memtool.paths import data_dir, locks_dir

SEPARATOR = "\n\n"
# Bump when the protocol or the file layout changes, so old cache entries are not read.
CACHE_FORMAT = 1


def tokens_dir() -> Path:
    return data_dir() / "tokens"


def tokenize_text(text: str, tokenizer: Any) -> torch.Tensor:
    """Token ids (int64, 1-D) of `text` as one sequence, without special tokens.

    `verbose=False` silences transformers' "sequence longer than the model's maximum" warning:
    the stream is cut into windows of a length the caller chose, never fed whole to a model.
    """
    encoded = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)
    return torch.tensor(encoded["input_ids"], dtype=torch.int64)


def tokenizer_hash(tokenizer: Any) -> str | None:
    """sha256 of the tokenizer's full definition, or None for a tokenizer without a fast backend."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    definition = f"{type(tokenizer).__name__}\n{backend.to_str()}"
    return hashlib.sha256(definition.encode("utf-8")).hexdigest()


def _cache_path(documents: Documents, tokenizer: Any) -> Path | None:
    if not documents.spec.is_builtin:
        return None
    identity = tokenizer_hash(tokenizer)
    if identity is None:
        return None
    key = json.dumps(
        {"format": CACHE_FORMAT, "texts": documents.fingerprint, "tokenizer": identity},
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:24]
    return tokens_dir() / f"{documents.spec.kind}-{documents.split}-{digest}.pt"


def tokenize_documents(documents: Documents, tokenizer: Any) -> torch.Tensor:
    """Token ids (int64, 1-D) of the documents joined by "\\n\\n"; cached for built-in sets."""
    cache = _cache_path(documents, tokenizer)
    if cache is None:
        return tokenize_text(SEPARATOR.join(documents.texts), tokenizer)
    if cache.exists():
        return torch.load(cache, weights_only=True).to(torch.int64)
    with file_lock(locks_dir() / f"{cache.name}.lock"):
        if cache.exists():  # another process tokenized it while we waited
            return torch.load(cache, weights_only=True).to(torch.int64)
        clean_stale_temporaries(cache.parent, cache.name)
        ids = tokenize_text(SEPARATOR.join(documents.texts), tokenizer)
        # int32 halves the file; every real vocabulary fits, and the check keeps that honest.
        stored = ids.to(torch.int32) if ids.numel() == 0 or ids.max() < 2**31 else ids
        with atomic_file(cache) as tmp:
            torch.save(stored, tmp)
    return ids
