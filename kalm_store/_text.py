"""Small wording helpers for messages shown to users."""

from __future__ import annotations


def plural(n: int, word: str, many: str | None = None) -> str:
    """``"1 commit"``, ``"2 commits"``, ``"1,024 passages"``: the count and the word in its number."""
    return f"{n:,} {word if n == 1 else (many or word + 's')}"
