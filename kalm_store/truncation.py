"""Tokenize only as much of a text as ``max_length`` tokens need.

A tokenizer reads the whole text before truncation cuts it: a 10.8 MB passage cut at 1024 tokens took
38 s and 2.8 GB (Gemma's tokenizer has no pre-tokenizer, so its BPE sees the whole text as one word).
:func:`token_ids` tokenizes a prefix instead, long enough for ``max_length`` tokens, and returns the
same ids as full tokenization then truncation:

* the prefix is cut at ``max_length * 8`` characters (plus a margin) and doubled while it holds too few
  tokens; texts shorter than the first cut are tokenized whole, exactly as before;
* tokens that end within ``_MARGIN_CHARS`` of the cut are not used: only they can differ from the full
  text's (the cut splits the word they belong to), since tokenizers merge within words;
* the ids are confirmed against a second, longer prefix; if the two disagree (a merge reaching further
  back than the margin, never seen on real text) the whole text is tokenized, so the result stays exact.

``tests/test_malformed_input.py`` checks the equality on fixed and generated (hypothesis) texts.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from typing import Any

_CHARS_PER_TOKEN = 8  # first prefix: max_length * this many characters (English averages ~4 per token)
_MARGIN_CHARS = 64  # tokens ending this close to the cut may differ from the full text's; never used


def token_ids(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """``tokenizer(texts, add_special_tokens=False, truncation=True, max_length=max_length)`` ids, computed
    from bounded prefixes of long texts (work and memory bounded by ``max_length``, not the text)."""
    first_cut = max_length * _CHARS_PER_TOKEN + _MARGIN_CHARS
    out: list[list[int] | None] = [None] * len(texts)
    short = [i for i, t in enumerate(texts) if len(t) <= first_cut or not getattr(tokenizer, "is_fast", False)]
    if short:
        enc = tokenizer([texts[i] for i in short], add_special_tokens=False, truncation=True, max_length=max_length)
        for i, ids in zip(short, enc["input_ids"]):
            out[i] = list(ids)
    for i, text in enumerate(texts):
        if out[i] is None:
            out[i] = _prefix_ids(tokenizer, text, max_length, first_cut)
    return out  # type: ignore[return-value]


def _stable_ids(tokenizer: Any, text: str, cut: int) -> list[int]:
    """Ids of ``text[:cut]`` whose tokens end at least ``_MARGIN_CHARS`` before the cut."""
    enc = tokenizer(text[:cut], add_special_tokens=False, return_offsets_mapping=True)
    ends = [end for _, end in enc["offset_mapping"]]  # non-decreasing character offsets
    return list(enc["input_ids"][: bisect_right(ends, cut - _MARGIN_CHARS)])


def _prefix_ids(tokenizer: Any, text: str, max_length: int, cut: int) -> list[int]:
    while cut < len(text):
        ids = _stable_ids(tokenizer, text, cut)
        if len(ids) >= max_length:
            longer = cut + cut // 2
            check = _stable_ids(tokenizer, text, longer) if longer < len(text) else _full(tokenizer, text, max_length)
            if check[:max_length] == ids[:max_length]:
                return ids[:max_length]
            break  # the cut changed earlier tokens: tokenize the whole text (exact, unbounded)
        cut *= 2
    return _full(tokenizer, text, max_length)


def _full(tokenizer: Any, text: str, max_length: int) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"])


__all__ = ["token_ids"]
