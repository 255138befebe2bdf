import json
import re
import sys
import types

import pytest

from memtool.data import load_documents
from memtool.data.documents import fingerprint_texts
from memtool.errors import MemtoolError


def _write_jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


@pytest.mark.parametrize("split", ["calibration", "evaluation"])
def test_text_file_is_one_document_and_not_split(tmp_path, split):
    text = "First paragraph.\n\nSecond paragraph.\n"
    (tmp_path / "a.txt").write_text(text)
    documents = load_documents(str(tmp_path / "a.txt"), split)
    assert documents.texts == [text]
    assert documents.split == "all"
    assert documents.fingerprint == fingerprint_texts([text])


def test_fingerprint_follows_the_text(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("one text")
    before = load_documents(str(path), "evaluation").fingerprint
    path.write_text("another text")
    assert load_documents(str(path), "evaluation").fingerprint != before
    # Document boundaries are part of the identity, not only the concatenated characters.
    assert fingerprint_texts(["ab", "c"]) != fingerprint_texts(["a", "bc"])


def test_jsonl_reads_the_field_in_order_skipping_blank_lines(tmp_path):
    path = _write_jsonl(
        tmp_path / "d.jsonl",
        [json.dumps({"text": "one", "body": "uno"}), "", json.dumps({"text": "two", "body": ""})],
    )
    assert load_documents(str(path), "calibration").texts == ["one", "two"]
    # Empty texts carry nothing to tokenize, so they are dropped rather than joined as "\n\n".
    assert load_documents(f"{path}:body", "calibration").texts == ["uno"]


def test_jsonl_line_that_is_not_json_is_named(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", ['{"text": "ok"}', "{not json"])
    with pytest.raises(MemtoolError, match=rf"{re.escape(str(path))}:2 is not valid JSON"):
        load_documents(str(path), "evaluation")


def test_jsonl_line_without_the_field_is_named(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", ['{"text": "ok"}', '{"text": "ok"}', '{"body": "x"}'])
    with pytest.raises(
        MemtoolError, match=rf"{re.escape(str(path))}:3 has no field 'text'.*:FIELD"
    ):
        load_documents(str(path), "evaluation")


def test_jsonl_field_that_is_not_text(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", ['{"text": 3}'])
    with pytest.raises(
        MemtoolError, match=rf"{re.escape(str(path))}:1 field 'text' is int, not a string"
    ):
        load_documents(str(path), "evaluation")


def test_jsonl_without_any_text(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", ['{"text": ""}', ""])
    with pytest.raises(MemtoolError, match="no non-empty 'text' texts"):
        load_documents(str(path), "evaluation")


def test_empty_text_file(tmp_path):
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(MemtoolError, match=r"empty\.txt is empty"):
        load_documents(str(tmp_path / "empty.txt"), "evaluation")


def test_text_file_that_is_not_utf8(tmp_path):
    (tmp_path / "latin.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(MemtoolError, match=r"latin\.txt is not UTF-8"):
        load_documents(str(tmp_path / "latin.txt"), "evaluation")


def test_directory_reads_matching_files_in_sorted_order(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.txt").write_text("from b/z")
    (tmp_path / "a.txt").write_text("from a")
    (tmp_path / "c.txt").write_text("")  # empty: skipped, not an error
    (tmp_path / "notes.md").write_text("markdown")
    assert load_documents(str(tmp_path), "evaluation").texts == ["from a", "from b/z"]
    assert load_documents(f"{tmp_path}:*.md", "evaluation").texts == ["markdown"]


def test_directory_glob_matching_nothing(tmp_path):
    (tmp_path / "a.txt").write_text("text")
    with pytest.raises(MemtoolError, match=r"no files in .* match '\*\*/\*.rst'"):
        load_documents(f"{tmp_path}:**/*.rst", "evaluation")


def test_directory_with_only_empty_files(tmp_path):
    (tmp_path / "a.txt").write_text("")
    with pytest.raises(MemtoolError, match=r"all 1 files .* are empty"):
        load_documents(str(tmp_path), "evaluation")


def test_path_removed_after_parsing(tmp_path):
    from memtool.data import parse_data_spec

    path = tmp_path / "a.txt"
    path.write_text("text")
    spec = parse_data_spec(str(path))
    path.unlink()
    with pytest.raises(MemtoolError, match="no such file or directory"):
        load_documents(spec, "evaluation")


# --- Hugging Face datasets (the optional dependency is replaced by a stand-in module) ---


def _fake_datasets(monkeypatch, load_dataset):
    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset
    module.exceptions = types.SimpleNamespace(DatasetsError=type("DatasetsError", (Exception,), {}))
    monkeypatch.setitem(sys.modules, "datasets", module)


class _Rows:
    def __init__(self, columns):
        self._columns = columns
        self.column_names = list(columns)

    def __getitem__(self, name):
        return self._columns[name]


def test_hf_without_datasets_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(MemtoolError, match=r"pip install 'memtool\[datasets\]'"):
        load_documents("hf:wikitext:wikitext-2-raw-v1:test", "evaluation")


def test_hf_unreachable_hub_names_the_problem(monkeypatch):
    def load_dataset(name, config, split):
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (LocalEntryNotFoundError)\nmore")

    _fake_datasets(monkeypatch, load_dataset)
    with pytest.raises(MemtoolError) as error:
        load_documents("hf:wikitext:wikitext-2-raw-v1", "evaluation")
    message = str(error.value)
    assert "wikitext (wikitext-2-raw-v1) split test" in message
    assert "Couldn't reach 'wikitext' on the Hub" in message
    assert "\n" not in message


def test_hf_splits_and_field(monkeypatch):
    asked = []

    def load_dataset(name, config, split):
        asked.append((name, config, split))
        return _Rows({"text": ["", f"{split} row", " \n"], "body": [f"{split} body", "", ""]})

    _fake_datasets(monkeypatch, load_dataset)
    calibration = load_documents("hf:org/ds", "calibration")
    evaluation = load_documents("hf:org/ds", "evaluation")
    assert (calibration.texts, calibration.split) == (["train row"], "calibration")
    assert (evaluation.texts, evaluation.split) == (["test row"], "evaluation")
    pinned = load_documents("hf:org/ds:cfg:validation#body", "calibration")
    assert (pinned.texts, pinned.split) == (["validation body"], "all")
    assert asked == [
        ("org/ds", None, "train"),
        ("org/ds", None, "test"),
        ("org/ds", "cfg", "validation"),
    ]
    with pytest.raises(MemtoolError, match=r"no column 'content' \(columns: text, body\)"):
        load_documents("hf:org/ds#content", "evaluation")
