"""A BEIR-layout test collection, read strictly: every problem names its file and line.

The layout (https://github.com/beir-cellar/beir, what mteb and most retrieval papers use)::

    DATA_DIR/corpus.jsonl      {"_id": ..., "title": ..., "text": ...}   one passage per line
    DATA_DIR/queries.jsonl     {"_id": ..., "text": ...}                 one query per line
    DATA_DIR/qrels/SPLIT.tsv   query-id <TAB> corpus-id <TAB> score      with a header line

A passage is ``title`` and ``text`` joined the way the released model's evaluation joins them:
mteb (``mteb/_create_dataloaders.py``, ``_corpus_to_dict``, which feeds ``batch["text"]`` to
``KaLMRerankerWrapper.predict`` in ``mteb/models/model_implementations/kalm_reranker.py``) uses
``(title + " " + text).strip()`` when the title is non-empty and ``text.strip()`` otherwise; the
wrapper then prefixes ``<Document>: `` (as :meth:`KaLMModel.tokenize_passages` does). Read in
embeddings-benchmark/mteb at commit a905523d0111f999360b312bd4a601a0a97a0e1c.

Rules (errors are :class:`CollectionError`, one line naming ``file:line``):

* a missing file or folder, a line that is not a JSON object, a missing or non-string field: error;
* a duplicate ``_id`` in ``corpus.jsonl`` or ``queries.jsonl``: error naming both lines;
* a qrels row naming a query not in ``queries.jsonl``: error (the qrels belong to other queries);
* a qrels row naming a passage not in ``corpus.jsonl``: counted warning (the judgment is kept, so
  recall counts that passage as relevant and never retrieved, as trec_eval would);
* a qrels row repeating a (query, passage) pair: error when the scores differ, counted otherwise;
* a query without judgments is skipped and counted, as BEIR does; a query whose judgments hold no
  relevant passage (score > 0) is kept and counted: it scores 0 on every measure, as in ``trec_eval -c``.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CORPUS = "corpus.jsonl"
QUERIES = "queries.jsonl"
QRELS_DIR = "qrels"
MAX_NAMED = 5  # warnings keep the first few file:line locations


class CollectionError(ValueError):
    """A BEIR-layout file that cannot be used; the message names the file and line."""


def join_passage(title: str | None, text: str) -> str:
    """``title`` and ``text`` as one passage, exactly as mteb builds it for the KaLM reranker.

    Examples
    --------
    >>> join_passage("Lance", "  a columnar format ")
    'Lance   a columnar format'
    >>> join_passage("", " only text ")
    'only text'
    """
    if title:
        return (title + " " + text).strip()
    return text.strip()


@dataclass
class Warnings:
    """Counted problems that do not stop an evaluation, with where the first ones are."""

    counts: dict[str, int] = field(default_factory=dict)
    where: dict[str, list[str]] = field(default_factory=dict)

    def add(self, kind: str, where: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        named = self.where.setdefault(kind, [])
        if len(named) < MAX_NAMED:
            named.append(where)

    def lines(self) -> list[str]:
        """One readable line per kind: ``3 qrels rows name unknown passages (qrels/test.tsv:4, ...)``."""
        out = []
        for kind, n in self.counts.items():
            more = ", ..." if n > len(self.where[kind]) else ""
            out.append(f"{n} {kind} ({', '.join(self.where[kind])}{more})")
        return out


@dataclass
class Collection:
    """The queries and judgments of one split, and where the corpus is (streamed by :func:`iter_corpus`)."""

    root: Path
    split: str
    corpus_path: Path
    corpus_ids: set[str]
    queries: dict[str, str]  # judged queries only (at least one qrels row), in file order: id -> text
    instructions: dict[str, str]  # per-query "instruction" field, when queries.jsonl carries one
    qrels: dict[str, dict[str, int]]  # query id -> passage id -> graded relevance
    skipped_unjudged: int = 0  # queries.jsonl entries without any qrels row
    no_relevant: int = 0  # of the judged queries: those whose qrels rows all have score <= 0 (they score 0)
    warnings: Warnings = field(default_factory=Warnings)

    @property
    def qrels_path(self) -> Path:
        return self.root / QRELS_DIR / f"{self.split}.tsv"


def _need_file(path: Path) -> None:
    if not path.is_file():
        raise CollectionError(f"{path}: no such file (a BEIR folder holds {CORPUS}, {QUERIES} and "
                              f"{QRELS_DIR}/SPLIT.tsv)")


def _json_lines(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(file:line, object)`` for every non-blank line; anything but a JSON object is an error."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CollectionError(f"{where}: not valid JSON ({e})") from None
            if not isinstance(obj, dict):
                raise CollectionError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            yield where, obj


def _id_of(obj: dict[str, Any], where: str) -> str:
    pid = obj.get("_id")
    if isinstance(pid, int) and not isinstance(pid, bool):
        pid = str(pid)  # some BEIR exports write numeric ids; qrels hold them as text
    if not isinstance(pid, str) or not pid:
        raise CollectionError(f"{where}: '_id' must be a non-empty string, got {pid!r:.60}")
    return pid


def _text_of(obj: dict[str, Any], key: str, where: str, *, optional: bool = False) -> str:
    value = obj.get(key)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise CollectionError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    return value


def iter_corpus(path: str | Path) -> Iterator[tuple[str, str, str]]:
    """Stream ``(file:line, id, joined passage)`` from ``corpus.jsonl``; a repeated ``_id`` is an error
    naming both lines."""
    path = Path(path)
    _need_file(path)
    first: dict[str, str] = {}
    for where, obj in _json_lines(path):
        pid = _id_of(obj, where)
        if pid in first:
            raise CollectionError(f"{where}: duplicate _id {pid!r} (first at {first[pid]})")
        first[pid] = where
        yield where, pid, join_passage(_text_of(obj, "title", where, optional=True), _text_of(obj, "text", where))


def load_queries(path: str | Path) -> tuple[dict[str, str], dict[str, str]]:
    """``({id: text}, {id: instruction})`` from ``queries.jsonl``; a repeated ``_id`` is an error."""
    path = Path(path)
    _need_file(path)
    texts: dict[str, str] = {}
    instructions: dict[str, str] = {}
    first: dict[str, str] = {}
    for where, obj in _json_lines(path):
        qid = _id_of(obj, where)
        if qid in first:
            raise CollectionError(f"{where}: duplicate _id {qid!r} (first at {first[qid]})")
        first[qid] = where
        texts[qid] = _text_of(obj, "text", where)
        if not texts[qid].strip():
            raise CollectionError(f"{where}: query {qid!r} has an empty 'text'")
        if obj.get("instruction") is not None:
            instructions[qid] = _text_of(obj, "instruction", where)
    if not texts:
        raise CollectionError(f"{path}: holds no queries")
    return texts, instructions


def load_qrels(path: str | Path, queries: set[str], corpus: set[str], warnings: Warnings) -> dict[str, dict[str, int]]:
    """``{query id: {passage id: score}}`` from a BEIR qrels TSV (header line first)."""
    path = Path(path)
    _need_file(path)
    out: dict[str, dict[str, int]] = {}
    seen: dict[tuple[str, str], str] = {}
    with open(path, encoding="utf-8", newline="") as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        for lineno, row in enumerate(rows, start=1):
            where = f"{path}:{lineno}"
            if not row or not "".join(row).strip():
                continue
            if lineno == 1:
                if [c.strip() for c in row[:3]] != ["query-id", "corpus-id", "score"]:
                    raise CollectionError(f"{where}: expected the BEIR header 'query-id<TAB>corpus-id<TAB>score', "
                                          f"got {row!r:.120}")
                continue
            if len(row) != 3:
                raise CollectionError(f"{where}: expected 3 tab-separated columns (query-id, corpus-id, score), "
                                      f"got {len(row)}: {row!r:.120}")
            qid, pid, score_text = (c.strip() for c in row)
            try:
                score = int(score_text)
            except ValueError:
                raise CollectionError(f"{where}: score {score_text!r} is not an integer relevance grade") from None
            if qid not in queries:
                raise CollectionError(f"{where}: query-id {qid!r} is not in {QUERIES}")
            if pid not in corpus:
                warnings.add("qrels rows name passages not in corpus.jsonl (kept: relevant, never retrieved)", where)
            judged = out.setdefault(qid, {})
            if (qid, pid) in seen:
                if judged[pid] != score:
                    raise CollectionError(f"{where}: ({qid!r}, {pid!r}) judged {score} here and {judged[pid]} at "
                                          f"{seen[(qid, pid)]}")
                warnings.add("qrels rows repeat a (query-id, corpus-id) pair with the same score", where)
                continue
            seen[(qid, pid)] = where
            judged[pid] = score
    if not out:
        raise CollectionError(f"{path}: holds no judgments")
    return out


def load_collection(root: str | Path, split: str = "test") -> Collection:
    """Read and check a BEIR-layout folder: queries, qrels of ``split``, and the corpus ids.

    The corpus is read once here for its ids (duplicates, unknown qrels passages); its texts are
    streamed again by :func:`iter_corpus` when a store is built.

    Parameters
    ----------
    root : str or Path
        The folder holding ``corpus.jsonl``, ``queries.jsonl`` and ``qrels/``.
    split : str, default "test"
        Which ``qrels/{split}.tsv`` to read.

    Returns
    -------
    Collection

    Examples
    --------
    >>> c = load_collection("scifact")  # doctest: +SKIP
    >>> len(c.queries), c.skipped_unjudged  # doctest: +SKIP
    (300, 809)
    """
    root = Path(root)
    if not root.is_dir():
        raise CollectionError(f"{root}: no such folder (give a BEIR folder with {CORPUS}, {QUERIES}, {QRELS_DIR}/)")
    if not split or "/" in split or "\\" in split:
        raise CollectionError(f"split must be a file name under {QRELS_DIR}/ such as 'test', got {split!r}")
    corpus_path, qrels_path = root / CORPUS, root / QRELS_DIR / f"{split}.tsv"
    for p in (corpus_path, root / QUERIES, qrels_path):
        _need_file(p)  # every missing file named before the corpus is read
    corpus_ids = {pid for _, pid, _ in iter_corpus(corpus_path)}
    if not corpus_ids:
        raise CollectionError(f"{corpus_path}: holds no passages")
    texts, instructions = load_queries(root / QUERIES)
    warnings = Warnings()
    qrels = load_qrels(qrels_path, set(texts), corpus_ids, warnings)
    judged = {q: texts[q] for q in texts if q in qrels}
    no_relevant = sum(1 for q in judged if not any(s > 0 for s in qrels[q].values()))
    if no_relevant == len(judged):
        raise CollectionError(f"{qrels_path}: no query has a relevant passage (score > 0)")
    return Collection(root=root, split=split, corpus_path=corpus_path, corpus_ids=corpus_ids, queries=judged,
                      instructions={q: i for q, i in instructions.items() if q in judged},
                      qrels={q: qrels[q] for q in judged}, skipped_unjudged=len(texts) - len(qrels),
                      no_relevant=no_relevant, warnings=warnings)


__all__ = ["Collection", "CollectionError", "Warnings", "join_passage", "iter_corpus", "load_queries", "load_qrels",
           "load_collection"]
