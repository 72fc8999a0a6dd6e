"""Log sequence numbers: PostgreSQL's 64-bit WAL positions, written ``X/Y`` in hex.

An LSN is a plain ``int`` at run time (the hot path compares and stores millions of them);
``Lsn`` names the meaning for readers and mypy.
"""

from __future__ import annotations

from typing import NewType

Lsn = NewType("Lsn", int)

ZERO = Lsn(0)


def parse_lsn(text: str) -> Lsn:
    """``'16/B374D848'`` -> ``0x16B374D848``. Raises ValueError on anything else."""
    hi, sep, lo = text.strip().partition("/")
    if not sep or not hi or not lo or len(hi) > 8 or len(lo) > 8:
        raise ValueError(f"invalid LSN {text!r}: expected two hex numbers like '0/16B3748'")
    try:
        return Lsn((int(hi, 16) << 32) | int(lo, 16))
    except ValueError:
        raise ValueError(
            f"invalid LSN {text!r}: expected two hex numbers like '0/16B3748'"
        ) from None


def format_lsn(lsn: int) -> str:
    """``0x16B374D848`` -> ``'16/B374D848'`` (the form PostgreSQL prints)."""
    if lsn < 0 or lsn >= 1 << 64:
        raise ValueError(f"LSN out of range: {lsn}")
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"
