"""Committing rows to a passage store while other processes write it too.

Two rules hold for every chunk a writer commits, whoever else commits meanwhile:

* **No id is stored twice.** Rows are inserted only where their id is absent (a Lance merge-insert on
  ``id`` whose not-matched rows are inserted), checked against the version the merge reads. Lance
  does not detect two concurrent inserts of one key (pylance 14: both commit), so when other commits
  landed between the version read and ours, the ids just written are counted again and any extra copy
  is deleted: the copy with the lowest ``_rowid`` (the first committed) stays, so every writer that
  checks keeps the same one. A writer killed between its commit and that check can leave a duplicate:
  ``kalm-store verify`` names it and ``kalm-store optimize --dedupe`` removes it.

  The merge joins the rows against the whole ``id`` column, so its cost grows with the table (at 6M
  rows: 0.5 s and +130 MB per 100k-row chunk, against 0.02 s for an append). A builder that knows every
  id stored at some version (its :class:`~kalm_store.idset.IdSet`) passes that version: while the table
  is still at it (no other writer committed since), its new rows are appended instead, pinned to that
  version, and the check above runs as after a merge. Once another commit lands, it merges again.
* **A replaced row never keeps another text's matrix.** A merge-insert keeps the old value of every
  column the new rows lack. The rows are therefore completed with null for every ``kalm_r*`` column of
  the very version the merge reads (pinned), and Lance's own retry, which would run the same rows
  against a newer version whose ``repool`` added a column, is off: a conflict re-reads the latest
  version, completes the rows for its columns, and merges again. Where Lance instead rebases our
  commit over a column added meanwhile, the new rows' fragments lack that column, which reads as null.
  Null is what reads and ``verify`` name and what ``repool`` re-derives.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import pyarrow as pa

from . import schema

CONFLICT_RETRIES = 16  # merges re-run (from the latest version) after a retryable commit conflict

T = TypeVar("T")


def is_retryable_conflict(error: BaseException) -> bool:
    """True for Lance's retryable commit conflict: another writer committed first, try again.

    Lance raises it as ``lance.commit.CommitConflictError`` from some calls and as an ``OSError`` whose
    text says so from others (merge-insert with its own retries off, index creation through LanceDB).
    """
    from lance.commit import CommitConflictError

    if isinstance(error, CommitConflictError):
        return True
    text = str(error)
    return isinstance(error, (OSError, RuntimeError, ValueError)) and (
        "Retryable commit conflict" in text or "etryable" in text and "conflict" in text.lower()
        or "Too many concurrent writers" in text)


def retry_conflicts(action: Callable[[], T], what: str, *, retries: int = CONFLICT_RETRIES,
                    before_retry: Callable[[], None] | None = None) -> T:
    """Run ``action``; after a retryable commit conflict, back off and run it again (``retries`` times).

    ``before_retry`` (for example ``table.checkout_latest``) runs before each new attempt. The last
    conflict is raised as a ``RuntimeError`` naming ``what`` and saying to run the command again.
    """
    for attempt in range(retries + 1):
        try:
            return action()
        except Exception as e:  # noqa: BLE001 - only retryable conflicts are caught, the rest re-raised
            if not is_retryable_conflict(e):
                raise
            if attempt == retries:
                raise RuntimeError(f"{what} lost {attempt + 1} commit races to concurrent writers; run the same "
                                   "command again once they have finished") from e
            time.sleep(min(0.02 * 2**attempt, 1.0))
            if before_retry is not None:
                before_retry()
    raise AssertionError("unreachable")  # pragma: no cover


@dataclass(frozen=True)
class CommitResult:
    """What :func:`commit_rows` did."""

    inserted: int  # rows whose id was absent, inserted (and kept: not an extra copy deleted after a race)
    replaced: int  # stored rows replaced (``replace=True`` only)
    skipped: int  # rows whose id was stored by the time of the commit, or committed first by another writer
    duplicates_removed: int  # extra copies of our ids, committed concurrently by another writer, deleted
    version: int  # table version after the commit (and any clean-up)
    read_version: int = -1  # the version the commit was made against
    committed_version: int = -1  # the version this commit made


def next_known_version(known: int | None, result: CommitResult) -> int | None:
    """The version at which a writer still knows every stored id after ``result``: the one its commit
    made when nobody else committed since ``known`` (``None``: unknown from now on)."""
    uncontested = known is not None and result.read_version == known and result.committed_version == known + 1
    return result.committed_version if uncontested else None


def commit_rows(table: Any, rows: pa.Table, *, replace: bool = False, known_version: int | None = None) -> CommitResult:
    """Commit ``rows`` to the LanceDB ``table`` in one Lance commit, under the rules of this module.

    Parameters
    ----------
    table : lancedb.table.LanceTable
        The passage store's table; it is checked out at the latest version afterwards.
    rows : pyarrow.Table
        Rows of the table's schema (:meth:`PassageStore.rows_table`), ids distinct. Columns they lack
        hold null in inserted rows; in replaced rows user columns keep their values and every
        ``kalm_r*`` column they lack holds null.
    replace : bool, default False
        Also replace the stored rows of the same ids; otherwise rows whose id is stored are skipped.
    known_version : int, optional
        A version at which the caller knows that none of the rows' ids was stored, having seen every
        commit up to it (:func:`next_known_version`). While it is the latest version, the rows are
        appended without the id join (``replace=False`` only). Default ``None``: always merge.

    Returns
    -------
    CommitResult
    """
    ids = rows.column("id").to_pylist()

    def attempt() -> tuple[dict[str, Any], int, int]:  # stats, version read, version committed
        table.checkout_latest()
        ds = table.to_lance()  # pinned: the merge reads exactly this version
        full = complete_rows(table, ds.schema, rows, replace=replace)
        if not replace and known_version is not None and ds.version == known_version:
            stats, committed = _append(ds, full)
            return stats, known_version, committed
        merge = ds.merge_insert("id")
        if replace:
            merge = merge.when_matched_update_all()
        # Lance's own retry would re-run these rows on a newer version (whose repool may have added a
        # column they lack); on a conflict, retry_conflicts runs attempt() again and completes them anew
        merge = merge.when_not_matched_insert_all().conflict_retries(0)
        read_version = ds.version
        stats = merge.execute(full)  # moves ds to the version it committed
        return stats, read_version, ds.version

    stats, read_version, committed = retry_conflicts(attempt, f"a commit to table {table.name!r}")
    inserted, replaced = int(stats["num_inserted_rows"]), int(stats["num_updated_rows"])
    removed = 0
    table.checkout_latest()
    if committed != read_version + 1:  # other commits landed in between: one may hold our ids as well
        deleted = _remove_duplicate_rows(table, ids)
        removed = len(deleted)
        # a copy of ours deleted (the other writer's came first) was not stored by us after all
        lost = _rows_committed_by(table, committed, deleted)
        inserted -= lost
    return CommitResult(inserted=inserted, replaced=replaced, skipped=len(ids) - inserted - replaced,
                        duplicates_removed=removed, version=table.version, read_version=read_version,
                        committed_version=committed)


def _append(ds: Any, rows: pa.Table) -> tuple[dict[str, Any], int]:
    """Append ``rows`` to the pinned Lance dataset ``ds``, committed against its version (so a race
    shows as a version gap); columns the rows lack hold null, as in a merge's inserted rows. Returns
    merge-like stats and the version committed."""
    import lance

    target = ds.schema
    for f in target:
        if f.name not in rows.column_names:
            rows = rows.append_column(f, pa.nulls(rows.num_rows, f.type))
    rows = rows.select(target.names).cast(target)
    committed = lance.write_dataset(rows, ds, mode="append")
    return {"num_inserted_rows": rows.num_rows, "num_updated_rows": 0}, committed.version


def complete_rows(table: Any, target: pa.Schema, rows: pa.Table, *, replace: bool) -> pa.Table:
    """``rows`` with the columns a merge into ``target`` needs: vectors an embedding function computes,
    and (``replace=True``) null at each ``kalm_r*`` column of ``target`` the rows lack."""
    rows = _with_embeddings(table, target, rows)
    if replace:
        for f in target:
            if schema.ratio_of_column(f.name) is not None and f.name not in rows.column_names:
                rows = rows.append_column(f, pa.nulls(rows.num_rows, f.type))
    return rows


def _with_embeddings(table: Any, target: pa.Schema, rows: pa.Table) -> pa.Table:
    """Compute the vector columns of the table's LanceDB embedding functions that ``rows`` lack.

    LanceDB does this inside its own ``add`` / ``merge_insert``; a merge pinned to one version goes to
    Lance directly, so it is done here, with the function the table records (as LanceDB would).
    """
    from lancedb.embeddings import EmbeddingFunctionRegistry

    functions = EmbeddingFunctionRegistry.get_instance().parse_functions(target.metadata)
    for column, conf in functions.items():
        if column in rows.column_names or column not in target.names:
            continue
        field = target.field(column)
        vectors = conf.function.compute_source_embeddings_with_retry(rows.column(conf.source_column))
        rows = rows.append_column(field, pa.array([list(v) for v in vectors], type=field.type))
    return rows


def duplicate_ids(table: Any, ids: Sequence[str] | None = None) -> dict[str, list[int]]:
    """Ids stored more than once (among ``ids``, default every stored id) -> their ``_rowid`` values, sorted."""
    from .store import sql_in

    ds = table.to_lance()
    seen: dict[str, list[int]] = {}
    chunks = [None] if ids is None else [list(ids)[i:i + 1000] for i in range(0, len(ids), 1000)]
    for part in chunks:
        scanner = ds.to_batches(columns=["id"], with_row_id=True,
                                filter=None if part is None else sql_in("id", part))
        for batch in scanner:
            for pid, rowid in zip(batch.column("id").to_pylist(), batch.column("_rowid").to_pylist()):
                seen.setdefault(pid, []).append(rowid)
    return {pid: sorted(r) for pid, r in seen.items() if len(r) > 1}


def remove_duplicates(table: Any, ids: Sequence[str] | None = None) -> int:
    """Delete every copy but the first committed (lowest ``_rowid``) of ids stored more than once.

    Returns the copies deleted. Every writer keeps the same copy, so two of them removing the same
    duplicates at once delete the same rows (Lance retries the losing delete).
    """
    return len(_remove_duplicate_rows(table, ids))


def _rows_committed_by(table: Any, version: int, rowids: Sequence[int]) -> int:
    """How many of ``rowids`` lie in the fragments that the commit making ``version`` added."""
    return len(rows_added_by(table, version, rowids))


def rows_added_by(table: Any, version: int, rowids: Sequence[int]) -> list[int]:
    """Those of ``rowids`` that lie in the fragments the commit making ``version`` added (a row id is
    its fragment's id << 32 | its offset: the table has no stable row ids)."""
    if not rowids:
        return []
    ds = table.to_lance()
    before = {f.fragment_id for f in ds.checkout_version(version - 1).get_fragments()}
    added = {f.fragment_id for f in ds.checkout_version(version).get_fragments()} - before
    return [r for r in rowids if (r >> 32) in added]


def remove_duplicates_of(table: Any, ids: Sequence[str], version: int) -> list[int]:
    """:func:`remove_duplicates` among ``ids`` after the commit that made ``version`` raced another
    writer; returns the deleted copies that this commit had added (the other writer's came first)."""
    return rows_added_by(table, version, _remove_duplicate_rows(table, ids))


def _remove_duplicate_rows(table: Any, ids: Sequence[str] | None = None) -> list[int]:
    """:func:`remove_duplicates`, returning the ``_rowid`` values of the copies deleted."""
    dups = duplicate_ids(table, ids)
    extra = [r for rowids in dups.values() for r in rowids[1:]]
    for i in range(0, len(extra), 1000):
        where = f"_rowid IN ({', '.join(map(str, extra[i:i + 1000]))})"
        retry_conflicts(lambda w=where: table.to_lance().delete(w), f"removing duplicate ids from table {table.name!r}",
                        before_retry=table.checkout_latest)
    table.checkout_latest()
    return extra


__all__ = ["CommitResult", "commit_rows", "duplicate_ids", "is_retryable_conflict", "next_known_version",
           "remove_duplicates", "remove_duplicates_of", "retry_conflicts", "rows_added_by"]
