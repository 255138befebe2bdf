"""Perplexity-vs-bytes pictures."""

import sys

import pytest

from memtool.errors import MemtoolError
from memtool.plots import plot_perplexity_vs_bytes


def test_plot_writes_a_png(tmp_path):
    path = plot_perplexity_vs_bytes(
        {"a": [(2_000_000, 30.0), (1_000_000, 90.0)], "b": [(1_500_000, 40.0)]},
        tmp_path / "p.png",
        "title",
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["p.png"]  # no temporary left behind


def test_plot_refuses_other_suffixes_and_says_how_to_get_matplotlib(tmp_path, monkeypatch):
    with pytest.raises(MemtoolError, match=r"give a \.png file name"):
        plot_perplexity_vs_bytes({}, tmp_path / "p.jpg", "t")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    with pytest.raises(MemtoolError, match=r"pip install 'memtool\[plot\]'"):
        plot_perplexity_vs_bytes({}, tmp_path / "p.png", "t")
    assert not (tmp_path / "p.png").exists()
