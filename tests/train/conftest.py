"""Tiny Llama configs and pre-tokenized data for the trainer's tests (no tokenizer, no download)."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig

VOCAB = 128


def write_tiny(folder: Path, layers: int = 2) -> Path:
    """A tiny Llama config.json (tied embeddings, GQA) in `folder`; returns its path."""
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    return folder / "config.json"


def write_tokens(path: Path, n_tokens: int = 8192) -> Path:
    """A learnable token stream: shifted copies of one random 64-token pattern."""
    generator = torch.Generator().manual_seed(0)
    pattern = torch.randint(0, VOCAB, (64,), generator=generator)
    shifts = torch.randint(0, 64, (n_tokens // 64,), generator=generator)
    ids = torch.cat([torch.roll(pattern, int(s)) for s in shifts])
    save_file({"input_ids": ids}, str(path))
    return path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> tuple[Path, Path]:
    """(config.json, tokens.safetensors) shared by the session's tests."""
    folder = tmp_path_factory.mktemp("tiny")
    return write_tiny(folder / "model"), write_tokens(folder / "tokens.safetensors")
