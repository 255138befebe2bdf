"""Token windows for perplexity (evaluation) and for calibrating compression methods.

Both follow the GPTQ lineage (Frantar et al., 2022, and the perplexity code it took from
earlier quantization work): the split's documents are joined by "\\n\\n" and tokenized as one
stream without BOS (see `memtool.data.tokens`), then

- evaluation cuts the stream into non-overlapping windows of `seq_len` from the start, drops the
  remainder and keeps the first `max_windows`, so two runs with the same tokenizer score exactly
  the same tokens;
- calibration cuts the stream the same way and draws `n_samples` of those windows at random
  (a `torch.Generator` seeded with `seed`). GPTQ draws random start offsets, which lets samples
  overlap; aligned windows never repeat a token, and the count they can give is known up front.

`mixed` gives both kinds of text in equal shares. Each of `wiki` and `code` is tokenized as its own
stream (so no window straddles the two), then windows alternate wiki, code, wiki, ...:
calibration draws `n_samples // 2` code windows and the rest from wiki; evaluation keeps the first
`max_windows` of the alternation, which is half from each while both last (the stdlib has more
evaluation text than wiki, so with `max_windows=None` the code windows run on after wiki's end).
"""

from dataclasses import dataclass
from typing import Any

import torch

from memtool.data.documents import Documents, fingerprint_texts, interleave, load_documents
from memtool.data.spec import DataSpec, Split, parse_data_spec
from memtool.data.tokens import tokenize_documents
from memtool.errors import MemtoolError


@dataclass
class TokenWindows:
    """Token windows cut from a data spec's text.

    Attributes:
        input_ids: int64 tensor [n_windows, seq_len].
        data: The spec's canonical text (`DataSpec.describe()`).
        split: "calibration", "evaluation", or "all" for user data (not split).
        seq_len: Tokens per window.
        available_tokens: Tokens in the whole tokenized text before cutting into windows.
        fingerprint: Fingerprint of the documents' text (`Documents.fingerprint`); it does not
            depend on the tokenizer, so runs of different models on the same text share it.
        seed: The seed that drew calibration windows; None for evaluation windows.
    """

    input_ids: torch.Tensor
    data: str
    split: str
    seq_len: int
    available_tokens: int
    fingerprint: str
    seed: int | None = None

    @property
    def n_windows(self) -> int:
        return self.input_ids.shape[0]

    def to_dict(self) -> dict:
        """A JSON-friendly summary (everything but the tensor)."""
        return {
            "data": self.data,
            "split": self.split,
            "seq_len": self.seq_len,
            "n_windows": self.n_windows,
            "tokens": self.n_windows * self.seq_len,
            "available_tokens": self.available_tokens,
            "fingerprint": self.fingerprint,
            "seed": self.seed,
        }


@dataclass
class _Stream:
    documents: Documents
    ids: torch.Tensor

    def grid(self, seq_len: int, what: str) -> torch.Tensor:
        """All aligned windows [n, seq_len]; raises if the text holds none."""
        n = self.ids.numel() // seq_len
        if n == 0:
            raise MemtoolError(
                f"{what} has {self.ids.numel()} tokens, fewer than one window of "
                f"seq_len={seq_len}; use more text or a smaller seq_len"
            )
        return self.ids[: n * seq_len].view(n, seq_len)


def _positive(name: str, value: int) -> None:
    if value <= 0:
        raise MemtoolError(f"{name} must be a positive number, got {value}")


def _streams(spec: DataSpec, split: Split, tokenizer: Any) -> list[_Stream]:
    kinds = [DataSpec("wiki"), DataSpec("code")] if spec.kind == "mixed" else [spec]
    streams = []
    for part in kinds:
        documents = load_documents(part, split)
        streams.append(_Stream(documents, tokenize_documents(documents, tokenizer)))
    return streams


def _label(spec: DataSpec, stream: _Stream) -> str:
    part = stream.documents.spec.describe()
    where = part if part == spec.describe() else f"{spec.describe()} (its {part} part)"
    return f"data {where}, split {stream.documents.split},"


def _result(
    spec: DataSpec,
    streams: list[_Stream],
    input_ids: torch.Tensor,
    seq_len: int,
    seed: int | None = None,
) -> TokenWindows:
    if len(streams) == 1:
        fingerprint = streams[0].documents.fingerprint
    else:  # the same text and order as load_documents("mixed")
        fingerprint = fingerprint_texts(interleave(*(s.documents.texts for s in streams)))
    return TokenWindows(
        input_ids=input_ids,
        data=spec.describe(),
        split=streams[0].documents.split,
        seq_len=seq_len,
        available_tokens=sum(s.ids.numel() for s in streams),
        fingerprint=fingerprint,
        seed=seed,
    )


def evaluation_windows(
    spec: str | DataSpec, tokenizer: Any, seq_len: int, max_windows: int | None
) -> TokenWindows:
    """The first non-overlapping `seq_len` windows of the evaluation text (module docstring).

    Args:
        spec: A data spec string or `DataSpec`; user data is not split (split "all").
        tokenizer: A Hugging Face tokenizer (called as `tokenizer(text, add_special_tokens=False)`).
        seq_len: Tokens per window.
        max_windows: Keep at most this many windows; None keeps all.

    Returns:
        The windows, in stream order.

    Raises:
        MemtoolError: Bad spec or data, non-positive sizes, or text shorter than one window.
    """
    _positive("seq_len", seq_len)
    if max_windows is not None:
        _positive("max_windows", max_windows)
    spec = parse_data_spec(spec) if isinstance(spec, str) else spec
    streams = _streams(spec, "evaluation", tokenizer)
    grids = [stream.grid(seq_len, _label(spec, stream)) for stream in streams]
    if len(grids) == 1:
        # clone: the windows should not keep the whole token stream alive
        input_ids = grids[0][:max_windows].clone()
    else:
        input_ids = torch.stack(interleave(list(grids[0]), list(grids[1]))[:max_windows])
    return _result(spec, streams, input_ids, seq_len)


def calibration_windows(
    spec: str | DataSpec, tokenizer: Any, n_samples: int, seq_len: int, seed: int = 0
) -> TokenWindows:
    """`n_samples` random non-overlapping `seq_len` windows of the calibration text.

    The same seed gives the same windows; different seeds give different ones.

    Args:
        spec: A data spec string or `DataSpec`; user data is not split (split "all").
        tokenizer: A Hugging Face tokenizer (called as `tokenizer(text, add_special_tokens=False)`).
        n_samples: Number of windows.
        seq_len: Tokens per window.
        seed: Seeds the `torch.Generator` that draws the windows.

    Returns:
        The windows, in the order drawn (for `mixed`: wiki, code, wiki, ...).

    Raises:
        MemtoolError: Bad spec or data, non-positive sizes, or fewer windows in the text than
            `n_samples` (the message says how many it holds).
    """
    _positive("n_samples", n_samples)
    _positive("seq_len", seq_len)
    spec = parse_data_spec(spec) if isinstance(spec, str) else spec
    streams = _streams(spec, "calibration", tokenizer)
    # mixed: n_samples // 2 from code, the rest (the odd one out) from wiki
    halves = [n_samples - n_samples // 2, n_samples // 2]
    counts = [n_samples] if len(streams) == 1 else halves
    drawn = []
    for stream, count in zip(streams, counts, strict=True):
        grid = stream.grid(seq_len, _label(spec, stream))
        if count > grid.shape[0]:
            share = "" if len(streams) == 1 else f" (its share of {n_samples})"
            raise MemtoolError(
                f"{_label(spec, stream)} holds {grid.shape[0]} windows of seq_len={seq_len} "
                f"({stream.ids.numel()} tokens), fewer than the {count} samples asked{share}; "
                "ask for fewer samples, use a smaller seq_len, or use more text"
            )
        # One generator per stream: each part's windows depend only on the seed and that part.
        generator = torch.Generator().manual_seed(seed)
        drawn.append(grid[torch.randperm(grid.shape[0], generator=generator)[:count]])
    if len(drawn) == 1:
        input_ids = drawn[0]
    else:
        input_ids = torch.stack(interleave(list(drawn[0]), list(drawn[1])))
    return _result(spec, streams, input_ids, seq_len, seed=seed)


def training_windows(spec: str | DataSpec, tokenizer: Any, seq_len: int) -> TokenWindows:
    """Every aligned `seq_len` window of the calibration (training) text, in stream order.

    For `mixed`, wiki and code windows alternate while both last. The trainer shuffles them
    itself, per epoch, so a resumed run can recompute which windows any step used.

    Raises:
        MemtoolError: Bad spec or data, non-positive `seq_len`, or text shorter than one window.
    """
    _positive("seq_len", seq_len)
    spec = parse_data_spec(spec) if isinstance(spec, str) else spec
    streams = _streams(spec, "calibration", tokenizer)
    grids = [stream.grid(seq_len, _label(spec, stream)) for stream in streams]
    if len(grids) == 1:
        input_ids = grids[0].clone()
    else:
        input_ids = torch.stack(interleave(list(grids[0]), list(grids[1])))
    return _result(spec, streams, input_ids, seq_len)
