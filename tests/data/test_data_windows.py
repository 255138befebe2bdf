import logging

import pytest
import torch
import transformers

import memtool.data.builtin
import memtool.data.tokens
from memtool.data import calibration_windows, evaluation_windows, load_documents
from memtool.errors import MemtoolError

SEQ_LEN = 16


@pytest.fixture
def corpus(tmp_path):
    """A directory of three documents, so the "\\n\\n" joins matter."""
    texts = [
        "Perplexity measures how surprised a model is by text it did not see in training. " * 6,
        "def window(ids, n):\n    return [ids[i : i + n] for i in range(0, len(ids), n)]\n" * 4,
        "Calibration data should look like the text the model will be used on. " * 6,
    ]
    for number, text in enumerate(texts):
        (tmp_path / f"doc{number}.txt").write_text(text)
    return tmp_path, "\n\n".join(texts)


def _direct_ids(tokenizer, text):
    return torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def test_evaluation_windows_are_the_whole_text_cut_from_the_start(tokenizer, corpus):
    folder, joined = corpus
    ids = _direct_ids(tokenizer, joined)
    windows = evaluation_windows(str(folder), tokenizer, seq_len=SEQ_LEN, max_windows=None)
    n = len(ids) // SEQ_LEN
    assert windows.input_ids.dtype == torch.int64
    assert torch.equal(windows.input_ids, ids[: n * SEQ_LEN].view(n, SEQ_LEN))
    assert windows.available_tokens == len(ids)
    assert windows.split == "all"  # user data is not split


def test_max_windows_keeps_the_first_ones(tokenizer, corpus):
    folder, _ = corpus
    every = evaluation_windows(str(folder), tokenizer, seq_len=SEQ_LEN, max_windows=None)
    first = evaluation_windows(str(folder), tokenizer, seq_len=SEQ_LEN, max_windows=3)
    assert torch.equal(first.input_ids, every.input_ids[:3])
    more_than_there_are = evaluation_windows(str(folder), tokenizer, SEQ_LEN, max_windows=10**6)
    assert torch.equal(more_than_there_are.input_ids, every.input_ids)


def test_no_bos_is_added(tokenizer, corpus):
    folder, _ = corpus
    bos = tokenizer.bos_token_id
    assert tokenizer("x")["input_ids"][0] == bos  # the fixture's tokenizer would add one
    windows = evaluation_windows(str(folder), tokenizer, seq_len=SEQ_LEN, max_windows=None)
    assert bos not in windows.input_ids


def test_long_text_gives_no_max_length_warning(fresh_tokenizer, corpus, caplog):
    # A fresh tokenizer: transformers warns once per tokenizer object, so a shared one could
    # hide the warning behind an earlier test's call.
    folder, joined = corpus
    assert len(_direct_ids(fresh_tokenizer, joined)) > fresh_tokenizer.model_max_length
    transformers.logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            evaluation_windows(str(folder), fresh_tokenizer, seq_len=SEQ_LEN, max_windows=None)
    finally:
        transformers.logging.disable_propagation()
    assert "longer than the specified maximum" not in caplog.text


def test_to_dict_summarizes_without_the_tensor(tokenizer, corpus):
    folder, joined = corpus
    windows = evaluation_windows(str(folder), tokenizer, seq_len=SEQ_LEN, max_windows=2)
    assert windows.to_dict() == {
        "data": f"dir:{folder}#**/*.txt",
        "split": "all",
        "seq_len": SEQ_LEN,
        "n_windows": 2,
        "tokens": 2 * SEQ_LEN,
        "available_tokens": len(_direct_ids(tokenizer, joined)),
        "fingerprint": load_documents(str(folder), "evaluation").fingerprint,
        "seed": None,
    }


def test_text_shorter_than_one_window(tokenizer, tmp_path):
    (tmp_path / "short.txt").write_text("tiny text")
    n_tokens = len(_direct_ids(tokenizer, "tiny text"))
    with pytest.raises(
        MemtoolError, match=f"has {n_tokens} tokens, fewer than one window of seq_len=512"
    ):
        evaluation_windows(str(tmp_path / "short.txt"), tokenizer, seq_len=512, max_windows=None)
    with pytest.raises(MemtoolError, match="fewer than one window"):
        calibration_windows(str(tmp_path / "short.txt"), tokenizer, n_samples=1, seq_len=512)


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda s, t: evaluation_windows(s, t, seq_len=0, max_windows=None), "seq_len"),
        (lambda s, t: evaluation_windows(s, t, seq_len=8, max_windows=0), "max_windows"),
        (lambda s, t: calibration_windows(s, t, n_samples=-1, seq_len=8), "n_samples"),
        (lambda s, t: calibration_windows(s, t, n_samples=1, seq_len=-8), "seq_len"),
    ],
)
def test_non_positive_sizes(tokenizer, corpus, call, name):
    folder, _ = corpus
    with pytest.raises(MemtoolError, match=f"{name} must be a positive number"):
        call(str(folder), tokenizer)


def test_calibration_draws_distinct_aligned_windows_per_seed(tokenizer, corpus):
    folder, joined = corpus
    ids = _direct_ids(tokenizer, joined)
    grid = ids[: len(ids) // SEQ_LEN * SEQ_LEN].view(-1, SEQ_LEN)
    first = calibration_windows(str(folder), tokenizer, n_samples=6, seq_len=SEQ_LEN, seed=0)
    again = calibration_windows(str(folder), tokenizer, n_samples=6, seq_len=SEQ_LEN, seed=0)
    other = calibration_windows(str(folder), tokenizer, n_samples=6, seq_len=SEQ_LEN, seed=1)
    assert torch.equal(first.input_ids, again.input_ids)
    assert not torch.equal(first.input_ids, other.input_ids)
    assert (first.seed, other.seed) == (0, 1)
    # Every sample is one of the aligned windows, and none is drawn twice (no overlap).
    positions = [_row_index(grid, row) for row in first.input_ids]
    assert len(set(positions)) == 6
    assert positions != sorted(positions)  # random, not the first six


def _row_index(grid, row):
    matches = (grid == row).all(dim=1).nonzero().flatten().tolist()
    assert matches, "window is not an aligned window of the stream"
    return matches[0]


def test_calibration_asking_more_than_the_text_holds(tokenizer, corpus):
    folder, joined = corpus
    holds = len(_direct_ids(tokenizer, joined)) // SEQ_LEN
    with pytest.raises(MemtoolError, match=f"holds {holds} windows of seq_len={SEQ_LEN}"):
        calibration_windows(str(folder), tokenizer, n_samples=holds + 1, seq_len=SEQ_LEN)
    assert calibration_windows(str(folder), tokenizer, holds, SEQ_LEN).input_ids.shape[0] == holds


def test_mixed_evaluation_alternates_wiki_and_code(tokenizer):
    wiki = evaluation_windows("wiki", tokenizer, seq_len=64, max_windows=None)
    code = evaluation_windows("code", tokenizer, seq_len=64, max_windows=None)
    mixed = evaluation_windows("mixed", tokenizer, seq_len=64, max_windows=6)
    assert torch.equal(mixed.input_ids[0::2], wiki.input_ids[:3])
    assert torch.equal(mixed.input_ids[1::2], code.input_ids[:3])
    assert mixed.available_tokens == wiki.available_tokens + code.available_tokens
    assert mixed.fingerprint == load_documents("mixed", "evaluation").fingerprint
    assert mixed.fingerprint not in (wiki.fingerprint, code.fingerprint)


def test_mixed_calibration_takes_half_from_each(tokenizer, monkeypatch):
    # Small stand-ins for the built-in texts: the mechanics do not need 15 MB of tokenizing.
    prose = ["The river runs through the old city. " * 20, "Mountains rise to the north. " * 20]
    source = ["import os\nprint(os.getcwd())\n" * 20, "class A:\n    pass\n" * 20]
    monkeypatch.setattr(memtool.data.builtin, "wiki_texts", lambda split: prose)
    monkeypatch.setattr(memtool.data.builtin, "code_texts", lambda split: source)
    wiki_grid = _direct_ids(tokenizer, "\n\n".join(prose))
    code_grid = _direct_ids(tokenizer, "\n\n".join(source))
    wiki_grid = wiki_grid[: len(wiki_grid) // SEQ_LEN * SEQ_LEN].view(-1, SEQ_LEN)
    code_grid = code_grid[: len(code_grid) // SEQ_LEN * SEQ_LEN].view(-1, SEQ_LEN)

    mixed = calibration_windows("mixed", tokenizer, n_samples=5, seq_len=SEQ_LEN, seed=3)
    assert mixed.input_ids.shape == (5, SEQ_LEN)
    for row in mixed.input_ids[0::2]:  # three from wiki (it takes the odd one)
        _row_index(wiki_grid, row)
    for row in mixed.input_ids[1::2]:  # two from code
        _row_index(code_grid, row)
    too_many = 2 * code_grid.shape[0] + 2
    with pytest.raises(MemtoolError, match=r"its code:python3\.\d+ part.*its share of"):
        calibration_windows("mixed", tokenizer, n_samples=too_many, seq_len=SEQ_LEN)


def test_builtin_token_ids_are_cached_per_tokenizer(
    tokenizer, other_tokenizer, private_token_cache, monkeypatch
):
    first = evaluation_windows("wiki", tokenizer, seq_len=64, max_windows=None)
    assert len(list(private_token_cache.glob("wiki-evaluation-*.pt"))) == 1

    def no_tokenizing(text, tok):
        raise AssertionError("tokenized again despite the cache")

    monkeypatch.setattr(memtool.data.tokens, "tokenize_text", no_tokenizing)
    cached = evaluation_windows("wiki", tokenizer, seq_len=64, max_windows=None)
    assert torch.equal(cached.input_ids, first.input_ids)
    # Another vocabulary is another cache entry, never a hit on the first one.
    with pytest.raises(AssertionError, match="tokenized again"):
        evaluation_windows("wiki", other_tokenizer, seq_len=64, max_windows=None)


def test_user_data_is_not_cached(tokenizer, corpus, private_token_cache):
    folder, _ = corpus
    evaluation_windows(str(folder), tokenizer, seq_len=SEQ_LEN, max_windows=None)
    assert not private_token_cache.exists()
