"""Shared fixtures: a tiny tokenizer and tiny random models built from configs (no hub).

Mechanics tests run on these in seconds; tests marked `real` use the built-in smollm2-135m.
"""

import random
from pathlib import Path

import pytest
import torch

WORDS = [
    *"the of and to in is was for on that with as by at from his her an were which are".split(),
    *"this be has had it not or also their its first new two after time who they been".split(),
    *"one city river music world war state people year school film team game model".split(),
    *"memory quantized weights layer budget stream flash token window calibration".split(),
    *"perplexity compression".split(),
]


def make_text(n_words: int, seed: int = 0) -> str:
    """Deterministic pseudo-English: sentences of common words."""
    rng = random.Random(seed)
    sentences, count = [], 0
    while count < n_words:
        length = rng.randint(5, 14)
        words = [rng.choice(WORDS) for _ in range(length)]
        sentences.append(" ".join(words).capitalize() + ".")
        count += length
    return " ".join(sentences)


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator([make_text(4000, seed=s) for s in range(4)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>")


def _save(model, tokenizer, folder: Path) -> Path:
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tiny_tokenizer),
        hidden_size=64,  # every linear dimension a multiple of 32, as the GPTQ layout needs
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=1,
    )
    model = LlamaForCausalLM(config).eval()
    return _save(model, tiny_tokenizer, tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_opt_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(1)
    config = OPTConfig(
        vocab_size=len(tiny_tokenizer),
        hidden_size=32,
        ffn_dim=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        word_embed_proj_dim=32,
        activation_function="relu",
        do_layer_norm_before=True,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    model = OPTForCausalLM(config).eval()
    return _save(model, tiny_tokenizer, tmp_path_factory.mktemp("tiny-opt"))


@pytest.fixture(scope="session")
def held_out_text_file(tmp_path_factory) -> Path:
    """Text of the same kind as `text_file` but other words (held out from calibration)."""
    path = tmp_path_factory.mktemp("held-out") / "held_out.txt"
    path.write_text(make_text(2000, seed=11))
    return path


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "eval.txt"
    path.write_text(make_text(3000, seed=7))
    return path
