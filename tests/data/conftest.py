"""Fixtures for memtool.data: a tiny byte-level BPE tokenizer built offline, and a private token
cache so tests never write into the user's cache (the wiki text itself does come from it)."""

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

import memtool.data.tokens

_PROSE = """\
The quick brown fox jumps over the lazy dog. A language model assigns a probability to every
sequence of words; perplexity is the exponential of the average negative log-likelihood per token.
Quantization stores each weight in fewer bits, and calibration data decides which errors matter.
In 1969 the first crewed landing on the Moon took place; the Apollo program ended in 1972.
Rivers, mountains and cities: geography describes the places where people live and work.
"""


def _train_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<s>", "</s>"],
        show_progress=False,
    )
    corpus = [_PROSE] * 4 + [Path(json.__file__).read_text(encoding="utf-8")]
    backend.train_from_iterator(corpus, trainer)
    # A BOS post-processor, like Llama-family tokenizers, so tests can see it is not applied.
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", backend.token_to_id("<s>"))]
    )
    # A small model_max_length: every text here is longer, which would trigger transformers'
    # "sequence longer than the maximum" warning if the resolver did not silence it.
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", model_max_length=64
    )


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return _train_tokenizer(vocab_size=400)


@pytest.fixture
def fresh_tokenizer() -> PreTrainedTokenizerFast:
    return _train_tokenizer(vocab_size=400)


@pytest.fixture(scope="session")
def other_tokenizer() -> PreTrainedTokenizerFast:
    return _train_tokenizer(vocab_size=300)


@pytest.fixture(autouse=True)
def private_token_cache(tmp_path, monkeypatch):
    tokens = tmp_path / "tokens"
    monkeypatch.setattr(memtool.data.tokens, "tokens_dir", lambda: tokens)
    monkeypatch.setattr(memtool.data.tokens, "locks_dir", lambda: tmp_path / "locks")
    return tokens
