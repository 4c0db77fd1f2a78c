"""Small wording helpers for messages shown to users."""

from __future__ import annotations


def plural(n: int, word: str, many: str | None = None) -> str:
    """``"1 commit"``, ``"2 commits"``, ``"1,024 passages"``: the count and the word in its number."""
    return f"{n:,} {word if n == 1 else (many or word + 's')}"


def format_bytes(n: float) -> str:
    """``1234567`` -> ``"1.23 MB"`` (decimal units, as disks are sold): what ``plan`` and ``info`` print."""
    for unit, scale in (("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"
