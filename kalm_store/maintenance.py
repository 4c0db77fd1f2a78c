"""Maintenance of a passage store: index health, duplicate ids, compaction and old-version clean-up.

``kalm-store verify`` reports what :func:`check_indices` and :func:`kalm_store.commit.duplicate_ids`
find; ``kalm-store optimize`` repairs it with :func:`optimize_store`. Everything here is safe while other
processes write the table: each commit retries Lance's retryable conflicts, and the clean-up keeps
files no version references yet (a write in flight), as Lance does unless told otherwise.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from . import schema

if TYPE_CHECKING:  # pragma: no cover
    from .store import PassageStore

OPTIMIZE_HINT = "kalm-store optimize --db {db} --table {table}"


@dataclass(frozen=True)
class IndexProblem:
    """An index the table lists that cannot answer the query it exists for."""

    name: str
    columns: list[str]
    error: str  # first line of what Lance said


def _index_list(table: Any) -> list[tuple[str, list[str], str]]:
    """(name, columns, type) of every index the table's latest version lists."""
    return [(ix.name, list(ix.columns), str(ix.index_type)) for ix in table.list_indices()]


def check_indices(store: PassageStore) -> list[IndexProblem]:
    """Probe every listed index with one query that must read it; return those that fail.

    A scalar index is asked for the first stored value of its column and must find as many rows as a
    scan does; a full-text index is searched for the first word of the first text; a vector index for
    the nearest neighbour of a zero vector. A removed or truncated index folder fails these (Lance
    reports the missing or short file), as every search through that index would.
    """
    table = store.table
    if table.count_rows() == 0:
        return []
    ds = table.to_lance()
    problems = []
    for name, columns, kind in _index_list(table):
        col = columns[0]
        try:
            _probe(ds, col, kind)
        except Exception as e:  # noqa: BLE001 - any failure to read an index is what we report, by name
            problems.append(IndexProblem(name=name, columns=columns, error=_first_line(e)))
    return problems


def _first_line(error: BaseException) -> str:
    """Lance's message without the Rust source locations it appends (``, /path/file.rs:12:5``)."""
    text = re.sub(r",\s*/[^,]*\.rs:\d+:\d+", "", str(error).splitlines()[0] if str(error) else type(error).__name__)
    return text[:300]


def _probe(ds: Any, column: str, kind: str) -> None:
    first = ds.to_table(columns=[column], limit=1).column(0)[0].as_py()
    if "FTS" in kind.upper() or "INVERTED" in kind.upper():
        words = str(first or "").split()
        ds.to_table(columns=["id"], full_text_query={"query": words[0] if words else "a", "columns": [column]},
                    limit=1, disable_scoring_autoprojection=True)  # no deprecation warning about `_score`
    elif "IVF" in kind.upper() or "HNSW" in kind.upper() or "VECTOR" in kind.upper():
        import numpy as np

        ds.to_table(columns=["id"], nearest={"column": column, "q": np.zeros(len(first), np.float32), "k": 1})
    else:  # a scalar index (BTREE, BITMAP, ...): an indexed lookup must agree with a scan
        from .store import sql_in

        if isinstance(first, str):
            where = sql_in(column, [first])
        elif isinstance(first, bytes):  # text_digest: a hex literal (a Python bytes repr makes Lance panic)
            where = f"{column} = X'{first.hex()}'"
        else:
            where = f"{column} = {first!r}"
        indexed = ds.count_rows(filter=where)
        scanned = ds.to_table(columns=[column], filter=where, use_scalar_index=False).num_rows
        if indexed != scanned:
            raise ValueError(f"the index finds {indexed} rows where {where}, a scan {scanned}")


def missing_indices(store: PassageStore) -> list[str]:
    """The kalm-store indices (``text`` full-text; ``id`` and, with digests, ``text_digest`` BTREE) the
    table lacks."""
    have = {tuple(c) for _, c, _ in _index_list(store.table)}
    ours = ("text", "id") + ((schema.DIGEST_COLUMN,) if store.has_digests else ())
    return [col for col in ours if (col,) not in have]


@dataclass
class OptimizeResult:
    """What :func:`optimize_store` did."""

    table: str
    duplicates_found: int = 0  # extra copies of ids stored more than once
    duplicates_removed: int = 0  # of which deleted (``dedupe=True``)
    indices_rebuilt: list[str] = field(default_factory=list)  # damaged indices created anew
    indices_created: list[str] = field(default_factory=list)  # missing kalm-store indices created
    fragments_before: int = 0
    fragments_after: int = 0
    old_versions_removed: int = 0
    bytes_removed: int = 0
    rows: int = 0
    version: int = 0


def optimize_store(store: PassageStore, *, dedupe: bool = False, fts: bool = True, id_index: bool = True,
                   cleanup_older_than: timedelta | None = timedelta(0)) -> OptimizeResult:
    """Repair and compact a passage store.

    In order: delete extra copies of duplicated ids (``dedupe``; the first committed copy stays), create
    anew every index that fails :func:`check_indices`, create the missing full-text (``fts``) and id
    (``id_index``) indices, then compact the data files, add unindexed rows to the indices and remove the
    versions older than ``cleanup_older_than`` with the files only they reference (LanceDB's
    ``Table.optimize``). ``None`` keeps every version.

    Parameters
    ----------
    store : PassageStore
        The open store (no model needed).
    dedupe : bool, default False
        Delete the extra copies of ids stored more than once; without it they are counted only.
    fts : bool, default True
        Create the full-text index on ``text`` if missing.
    id_index : bool, default True
        Create the BTREE index on ``id`` if missing.
    cleanup_older_than : datetime.timedelta or None, default timedelta(0)
        Age of the versions to remove; ``timedelta(0)`` keeps only the latest one.

    Returns
    -------
    OptimizeResult
    """
    from .index_memory import bounded_index_memory

    with bounded_index_memory():  # index builds and updates sort in a bounded pool (kalm_store.index_memory)
        return _optimize_store(store, dedupe=dedupe, fts=fts, id_index=id_index,
                               cleanup_older_than=cleanup_older_than)


def _optimize_store(store: PassageStore, *, dedupe: bool, fts: bool, id_index: bool,
                    cleanup_older_than: timedelta | None) -> OptimizeResult:
    from lancedb.index import FTS, BTree

    from .commit import duplicate_ids, remove_duplicates, retry_conflicts

    table = store.table
    table.checkout_latest()
    result = OptimizeResult(table=table.name, fragments_before=len(table.to_lance().get_fragments()))
    result.duplicates_found = sum(len(r) - 1 for r in duplicate_ids(table).values())
    if dedupe and result.duplicates_found:
        result.duplicates_removed = remove_duplicates(table)
    kinds = {name: (columns, kind) for name, columns, kind in _index_list(table)}
    for problem in check_indices(store):
        columns, kind = kinds[problem.name]
        config = FTS() if "FTS" in kind.upper() or "INVERTED" in kind.upper() else BTree() \
            if "BTREE" in kind.upper() else None
        if config is None:  # a vector index: its parameters are the user's, we cannot rebuild it blindly
            raise ValueError(f"index {problem.name!r} on {columns} of table {table.name!r} is damaged "
                             f"({problem.error}); drop it (tbl.drop_index({problem.name!r})) and create it again "
                             "with the parameters it was made with")
        retry_conflicts(lambda c=columns[0], cfg=config, n=problem.name: table.create_index(
            c, config=cfg, replace=True, name=n), f"rebuilding index {problem.name!r}", before_retry=table.checkout_latest)
        result.indices_rebuilt.append(problem.name)
    wanted = [c for c, on in (("text", fts), ("id", id_index), (schema.DIGEST_COLUMN, id_index)) if on]
    for col in missing_indices(store):
        if col in wanted and table.count_rows():
            retry_conflicts(lambda c=col: table.create_index(c, config=FTS() if c == "text" else BTree(), replace=True),
                            f"creating the {col} index", before_retry=table.checkout_latest)
            result.indices_created.append(f"{col}_idx")
    # compaction, then the rows it moved (and any unindexed ones) into the indices, then the clean-up:
    # LanceDB's Table.optimize does the same three, through Lance, but reports nothing
    retry_conflicts(lambda: table.to_lance().optimize.compact_files(), f"compacting table {table.name!r}",
                    before_retry=table.checkout_latest)
    table.checkout_latest()
    if kinds or result.indices_created:
        retry_conflicts(lambda: table.to_lance().optimize.optimize_indices(), f"updating the indices of {table.name!r}",
                        before_retry=table.checkout_latest)
        table.checkout_latest()
    if cleanup_older_than is not None:
        # files that no version references yet (a write in flight) are kept: delete_unverified stays off
        stats = table.to_lance().cleanup_old_versions(older_than=cleanup_older_than)
        result.old_versions_removed, result.bytes_removed = int(stats.old_versions), int(stats.bytes_removed)
    table.checkout_latest()
    result.fragments_after = len(table.to_lance().get_fragments())
    result.rows = table.count_rows()
    result.version = table.version
    return result


__all__ = ["IndexProblem", "OptimizeResult", "OPTIMIZE_HINT", "check_indices", "missing_indices", "optimize_store"]
