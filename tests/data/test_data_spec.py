import pytest

from memtool.data import DataSpec, parse_data_spec
from memtool.data.spec import PYTHON_TAG
from memtool.errors import MemtoolError


@pytest.fixture
def files(tmp_path, monkeypatch):
    """A working directory holding one file or directory of each kind."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("some notes\n")
    (tmp_path / "d.jsonl").write_text('{"text": "a", "content": "b"}\n')
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.py").write_text("x = 1\n")
    return tmp_path


@pytest.mark.parametrize("name", ["wiki", "code", "mixed"])
def test_builtin_names(name):
    spec = parse_data_spec(name)
    assert spec == DataSpec(name)
    assert spec.is_builtin


def test_stdlib_specs_name_the_python_version():
    assert parse_data_spec("wiki").describe() == "wiki"
    assert parse_data_spec("code").describe() == f"code:{PYTHON_TAG}"
    assert parse_data_spec("mixed").describe() == f"mixed:{PYTHON_TAG}"
    assert parse_data_spec(f"code:{PYTHON_TAG}") == DataSpec("code")


def test_stdlib_spec_of_another_python_is_refused():
    with pytest.raises(MemtoolError, match=f"python2.7.*memtool runs on {PYTHON_TAG}"):
        parse_data_spec("code:python2.7")


def test_text_file_relative_path_is_made_absolute(files):
    spec = parse_data_spec("notes.txt")
    assert spec == DataSpec("text", path=files / "notes.txt")
    assert spec.path.is_absolute()
    assert spec.describe() == f"text:{files / 'notes.txt'}"


def test_jsonl_default_field_and_chosen_field(files):
    assert parse_data_spec("d.jsonl") == DataSpec("jsonl", path=files / "d.jsonl", field="text")
    spec = parse_data_spec("d.jsonl:content")
    assert spec == DataSpec("jsonl", path=files / "d.jsonl", field="content")
    assert spec.describe() == f"jsonl:{files / 'd.jsonl'}#content"


def test_directory_default_glob_and_chosen_glob(files):
    assert parse_data_spec("src") == DataSpec("dir", path=files / "src", glob="**/*.txt")
    # The glob itself contains no ':', but the split is on the LAST ':' anyway.
    assert parse_data_spec("src:**/*.py").glob == "**/*.py"
    assert parse_data_spec(f"{files}/src:*.py") == DataSpec("dir", path=files / "src", glob="*.py")


def test_existing_path_containing_a_colon_wins(files):
    (files / "a:b.txt").write_text("colon in the name\n")
    assert parse_data_spec("a:b.txt") == DataSpec("text", path=files / "a:b.txt")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("hf:wikitext", DataSpec("hf", name="wikitext", field="text")),
        (
            "hf:wikitext:wikitext-2-raw-v1:test",
            DataSpec(
                "hf", name="wikitext", config="wikitext-2-raw-v1", hf_split="test", field="text"
            ),
        ),
        (
            "hf:org/ds::validation",
            DataSpec("hf", name="org/ds", hf_split="validation", field="text"),
        ),
        ("hf:org/ds:en#content", DataSpec("hf", name="org/ds", config="en", field="content")),
    ],
)
def test_hf_forms(text, expected):
    assert parse_data_spec(text) == expected


@pytest.mark.parametrize(
    "text", ["wiki", "code", "mixed", "notes.txt", "d.jsonl:content", "src:**/*.py", "src",
             "hf:wikitext", "hf:org/ds::test", "hf:w:c:s#body"],
)  # fmt: skip
def test_describe_reads_back_to_the_same_spec(files, text):
    spec = parse_data_spec(text)
    assert parse_data_spec(spec.describe()) == spec


def test_unknown_spec_lists_the_accepted_forms():
    with pytest.raises(MemtoolError, match="unknown data spec 'wikipedia'") as error:
        parse_data_spec("wikipedia")
    for form in ("wiki", "code", "mixed", "hf:NAME", ".jsonl", "directory"):
        assert form in str(error.value)


@pytest.mark.parametrize("text", ["missing.txt", "missing.jsonl:content", "./nowhere"])
def test_missing_path_is_named(files, text):
    missing = files / text.split(":")[0]
    with pytest.raises(MemtoolError, match="no such file or directory") as error:
        parse_data_spec(text)
    assert str(missing) in str(error.value)


def test_canonical_form_of_a_missing_path(files):
    with pytest.raises(MemtoolError, match=r"no such file or directory: /gone/d\.jsonl"):
        parse_data_spec("jsonl:/gone/d.jsonl#text")


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty data spec"),
        ("  ", "empty data spec"),
        ("d.jsonl:", "ends with ':'"),
        ("notes.txt:body", "read as plain text and takes no ':body'"),
        ("hf:", "expected hf:NAME"),
        ("hf:a:b:c:d", "expected hf:NAME"),
    ],
)
def test_malformed_specs(files, text, message):
    with pytest.raises(MemtoolError, match=message):
        parse_data_spec(text)


def test_canonical_kind_must_match_the_path(files):
    with pytest.raises(MemtoolError, match=r"says text but .* is read as dir"):
        parse_data_spec(f"text:{files / 'src'}")
