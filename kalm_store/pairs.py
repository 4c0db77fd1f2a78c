"""Training and evaluation pairs for ``kalm-store finetune``: one JSON object per line, checked line by line.

A line is ``{"query", "id" | "text", "label": 0|1 | "score": P(yes) in [0, 1], "instruction"?}``:
``id`` names a stored passage, ``text`` brings one that is not in the table (encoded once by the
frozen encoder). ``label`` trains with the yes/no cross-entropy (Eq. 6), ``score`` (a teacher's
P(yes)) with distillation (Eq. 10); a line may carry both.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

KEYS = ("query", "id", "text", "label", "score", "instruction")


class PairsError(ValueError):
    """A pairs file line is malformed; the message names the file and line."""


@dataclass(frozen=True)
class Pair:
    """One (query, passage) pair with a hard label, a teacher score, or both."""

    line: int  # 1-based line in its file, for error messages
    query: str
    instruction: str | None
    id: str | None  # a stored passage ...
    text: str | None  # ... or a passage brought as text
    label: int | None  # 0 or 1
    score: float | None  # teacher P(yes) in [0, 1]

    @property
    def group(self) -> tuple[str, str | None]:
        """The query group (query, instruction) the pair is ranked in for nDCG."""
        return (self.query, self.instruction)


def _parse_line(obj: object, where: str) -> dict:
    if not isinstance(obj, dict):
        raise PairsError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(KEYS))
    if unknown:
        raise PairsError(f"{where}: unknown key(s) {unknown}; a line has {list(KEYS)}")
    query = obj.get("query")
    if not isinstance(query, str) or not query.strip():
        raise PairsError(f"{where}: 'query' must be a non-empty string, got {query!r:.80}")
    pid, text = obj.get("id"), obj.get("text")
    if (pid is None) == (text is None):
        raise PairsError(f"{where}: give exactly one of 'id' (a stored passage) or 'text' (a new passage)")
    if pid is not None and (not isinstance(pid, str) or not pid):
        raise PairsError(f"{where}: 'id' must be a non-empty string, got {pid!r:.80}")
    if text is not None and (not isinstance(text, str) or not text):
        raise PairsError(f"{where}: 'text' must be a non-empty string, got {text!r:.80}")
    label, score = obj.get("label"), obj.get("score")
    if label is None and score is None:
        raise PairsError(f"{where}: give 'label' (0 or 1) or 'score' (a teacher's P(yes) in [0, 1])")
    if label is not None and (isinstance(label, bool) or label not in (0, 1)):
        raise PairsError(f"{where}: 'label' must be 0 or 1, got {label!r:.80}")
    if score is not None:
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score) \
                or not 0.0 <= score <= 1.0:
            raise PairsError(f"{where}: 'score' must be a number in [0, 1] (a teacher's P(yes)), got {score!r:.80}")
    instruction = obj.get("instruction")
    if instruction is not None and not isinstance(instruction, str):
        raise PairsError(f"{where}: 'instruction' must be a string, got {type(instruction).__name__}")
    return obj


def read_pairs(path: str | Path) -> list[Pair]:
    """Read and check a pairs file; the first bad line stops it with a :class:`PairsError` naming it.

    Blank lines are skipped. A file with no pair at all is refused.

    Examples
    --------
    >>> read_pairs("train.jsonl")[0]  # doctest: +SKIP
    Pair(line=1, query='what is json?', instruction=None, id='p7', text=None, label=1, score=None)
    """
    path = Path(path)
    if not path.is_file():
        raise PairsError(f"pairs file {str(path)!r} does not exist")
    pairs: list[Pair] = []
    with open(path, encoding="utf-8") as f:
        for n, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f"{path} line {n}"
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as e:
                raise PairsError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            obj = _parse_line(obj, where)
            pairs.append(Pair(line=n, query=obj["query"], instruction=obj.get("instruction"), id=obj.get("id"),
                              text=obj.get("text"), label=obj.get("label"),
                              score=None if obj.get("score") is None else float(obj["score"])))
    if not pairs:
        raise PairsError(f"pairs file {str(path)!r} holds no pairs (it is empty)")
    return pairs


def check_ids(pairs: Sequence[Pair], stored: set[str], path: str | Path, table: str) -> None:
    """Refuse the first pair whose ``id`` is not in ``stored``, naming its line."""
    for p in pairs:
        if p.id is not None and p.id not in stored:
            raise PairsError(f"{path} line {p.line}: id {p.id!r} is not in table {table!r} "
                             "(give the passage as 'text' to encode it, or fix the id)")


def split_groups(pairs: Sequence[Pair], fraction: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """Hold out about ``fraction`` of the query groups (whole groups, so no query is in both halves)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {fraction!r}")
    groups = sorted({p.group for p in pairs}, key=repr)
    if len(groups) < 2:
        raise ValueError("the training pairs hold a single query group: nothing can be held out for evaluation; "
                         "give evaluation pairs (--eval)")
    rng = np.random.default_rng(seed)
    n_eval = min(len(groups) - 1, max(1, round(fraction * len(groups))))
    held = {groups[i] for i in rng.permutation(len(groups))[:n_eval]}
    return [p for p in pairs if p.group not in held], [p for p in pairs if p.group in held]


__all__ = ["Pair", "PairsError", "read_pairs", "check_ids", "split_groups"]
