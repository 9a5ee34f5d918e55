"""Byte sizes as people write them: 24GiB, 24GB, 70GiB, 24000MiB, 512MB."""

from __future__ import annotations

import re

from sliceserve.errors import SliceserveError

UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]+)\s*$")


def parse_size(text: str, *, allow_zero: bool = False) -> int:
    """Bytes in `text`: a number and a unit (GB = 10^9 bytes, GiB = 2^30 bytes; case ignored)."""
    if allow_zero and str(text).strip() == "0":
        return 0
    match = SIZE.match(str(text))
    unit = UNITS.get(match.group(2).lower()) if match else None
    if unit is None:
        raise SliceserveError(f"the size {text!r} needs a number and a unit, as 24GiB, 24GB or 24000MiB")
    size = int(float(match.group(1)) * unit)
    if size <= 0 and not allow_zero:
        raise SliceserveError(f"the size {text!r} must be more than zero")
    return size


def format_size(size: int) -> str:
    """A size in GiB (or MiB below one GiB), two decimals."""
    if abs(size) >= 2**30:
        return f"{size / 2**30:.2f} GiB"
    return f"{size / 2**20:.1f} MiB"
