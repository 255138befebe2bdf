"""Human sizes on the command line ("300MB", "1.5GiB", "123456") parsed in one place."""

import re

from memtool.errors import MemtoolError

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
    "K": 10**3,
    "M": 10**6,
    "G": 10**9,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*$")


def parse_size(text: str | int) -> int:
    """Parse a byte size. Decimal units (KB, MB, GB) are powers of 10, binary ones (KiB, MiB,
    GiB) powers of 2; a bare number is bytes.

    Raises:
        MemtoolError: the text is not a positive size.
    """
    if isinstance(text, int):
        value = text
    else:
        match = _SIZE_RE.match(text)
        unit = match.group(2).upper() if match else None
        if match is None or unit not in _UNITS:
            raise MemtoolError(
                f"malformed size {text!r}: use a number with an optional unit "
                "(B, KB, MB, GB, KiB, MiB, GiB), for example 300MB or 1.5GiB"
            )
        value = round(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise MemtoolError(f"size {text!r} must be positive")
    return value


def format_size(num_bytes: int | float) -> str:
    """Render bytes with a decimal unit, 3 significant digits ("269 MB", "1.47 GB")."""
    value = float(num_bytes)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(value) < 1000 or unit == "TB":
            if unit == "B":
                return f"{int(value)} B"
            return f"{value:.3g} {unit}"
        value /= 1000
    raise AssertionError("unreachable")
