import pytest

from memtool.errors import MemtoolError
from memtool.sizes import format_size, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("300MB", 300_000_000),
        ("1.5GiB", 1.5 * 2**30),
        ("123456", 123456),
        ("2kib", 2048),
        ("10 MB", 10_000_000),
        ("0.5GB", 500_000_000),
        (4096, 4096),
    ],
)
def test_parse_size_accepts_human_forms(text, expected):
    assert parse_size(text) == int(expected)


@pytest.mark.parametrize("text", ["12XB", "MB", "", "-5MB", "1.2.3GB", "ten"])
def test_parse_size_rejects_malformed(text):
    with pytest.raises(MemtoolError, match="size"):
        parse_size(text)


@pytest.mark.parametrize("text", ["0", "0MB"])
def test_parse_size_rejects_zero(text):
    with pytest.raises(MemtoolError, match="positive"):
        parse_size(text)


def test_format_size_is_readable():
    assert format_size(269_060_552) == "269 MB"
    assert format_size(512) == "512 B"
    assert format_size(1_470_000_000) == "1.47 GB"
