"""The index fetcher against a local PEP 691 index on loopback."""

import hashlib
import http.server
import io
import json
import threading
import urllib.request
import zipfile
from pathlib import Path

import pytest

from memtool.errors import MemtoolError
from memtool.fetch import WheelAsset, fetch_member

PAYLOAD = b"memtool test payload\n" * 5000


def _wheel_bytes() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("pkg/data/payload.bin", PAYLOAD)
        archive.writestr("pkg/__init__.py", "")
    return buffer.getvalue()


class _Index(http.server.BaseHTTPRequestHandler):
    wheel = _wheel_bytes()
    requests: list[str] = []  # noqa: RUF012 (shared log, reset per test)
    truncate = False

    def do_GET(self):
        _Index.requests.append(self.path)
        if self.path == "/simple/pkg/":
            body = json.dumps(
                {
                    "files": [
                        {
                            "filename": "pkg-1.0-py3-none-any.whl",
                            "url": "/files/pkg-1.0-py3-none-any.whl",
                        }
                    ]
                }
            ).encode()
            self._reply(body, "application/vnd.pypi.simple.v1+json")
        elif self.path == "/files/pkg-1.0-py3-none-any.whl":
            body = self.wheel
            if _Index.truncate:  # announce the full length, send half, drop the connection
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.connection.shutdown(2)
                return
            self._reply(body, "application/octet-stream")
        else:
            self.send_error(404)

    def _reply(self, body: bytes, content_type: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def index(monkeypatch, tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Index)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Index.requests = []
    _Index.truncate = False
    monkeypatch.setenv("MEMTOOL_INDEX_URL", f"http://127.0.0.1:{server.server_port}/simple")
    monkeypatch.setenv("MEMTOOL_HOME", str(tmp_path / "home"))
    yield server
    server.shutdown()


def _asset(sha256: str | None = None) -> WheelAsset:
    return WheelAsset(
        project="pkg",
        filename="pkg-1.0-py3-none-any.whl",
        sha256=sha256 or hashlib.sha256(_Index.wheel).hexdigest(),
        member="pkg/data/payload.bin",
    )


def _leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(".tmp-")]


def test_fetch_extracts_member_and_second_run_needs_no_network(index, tmp_path, monkeypatch):
    dest = tmp_path / "home" / "data" / "payload.bin"
    assert fetch_member(_asset(), dest).read_bytes() == PAYLOAD
    assert len(_Index.requests) == 2  # index page + wheel

    def no_network(*args, **kwargs):
        raise AssertionError("network touched on a cached run")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    assert fetch_member(_asset(), dest).read_bytes() == PAYLOAD
    assert not _leftovers(tmp_path / "home")


def test_fetch_rejects_wrong_hash_and_leaves_nothing(index, tmp_path):
    dest = tmp_path / "home" / "data" / "payload.bin"
    with pytest.raises(MemtoolError, match="sha256"):
        fetch_member(_asset(sha256="0" * 64), dest)
    assert not dest.exists()
    assert not (tmp_path / "home" / "downloads" / "pkg-1.0-py3-none-any.whl").exists()
    assert not _leftovers(tmp_path / "home")


def test_interrupted_download_leaves_no_cache_entry(index, tmp_path):
    _Index.truncate = True
    dest = tmp_path / "home" / "data" / "payload.bin"
    with pytest.raises(MemtoolError, match=r"broke off|sha256"):
        fetch_member(_asset(), dest)
    assert not dest.exists()
    assert not _leftovers(tmp_path / "home")
    _Index.truncate = False  # the next run recovers
    assert fetch_member(_asset(), dest).read_bytes() == PAYLOAD


def test_concurrent_first_runs_download_once(index, tmp_path):
    dest = tmp_path / "home" / "data" / "payload.bin"
    results, errors = [], []

    def worker():
        try:
            results.append(fetch_member(_asset(), dest).read_bytes())
        except Exception as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert results == [PAYLOAD] * 4
    assert _Index.requests.count("/files/pkg-1.0-py3-none-any.whl") == 1


def test_a_run_that_waited_on_another_does_not_download_again(index, tmp_path, monkeypatch):
    import memtool.fetch as fetch

    dest = tmp_path / "home" / "data" / "payload.bin"
    real, guard, calls = fetch.download_wheel, threading.Lock(), []
    first_done, start = threading.Event(), threading.Barrier(4)

    def download(asset):
        # Every caller but the first waits until one run has finished (extracted the member
        # and deleted the wheel): a run that had found no member must then find it.
        with guard:
            calls.append(asset)
            first = len(calls) == 1
        if not first:
            first_done.wait(timeout=10)
        return real(asset)

    monkeypatch.setattr(fetch, "download_wheel", download)
    results = []

    def worker():
        start.wait()
        results.append(fetch_member(_asset(), dest).read_bytes())
        first_done.set()

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [PAYLOAD] * 4
    assert _Index.requests.count("/files/pkg-1.0-py3-none-any.whl") == 1


def test_unreachable_index_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("MEMTOOL_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MEMTOOL_INDEX_URL", "http://127.0.0.1:9/simple")  # discard port: closed
    with pytest.raises(MemtoolError, match="could not reach the package index"):
        fetch_member(_asset(), tmp_path / "home" / "data" / "payload.bin")
