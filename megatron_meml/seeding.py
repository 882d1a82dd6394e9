"""Seeds derived from values, stable across processes, Python hash randomisation and rank layouts."""
from __future__ import annotations

import hashlib
from typing import Any


def stable_seed(*parts: Any) -> int:
    """A 31-bit seed from any values (independent of Python's hash randomisation and of rank layout)."""
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & 0x7FFFFFFF
