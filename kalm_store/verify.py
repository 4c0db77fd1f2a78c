"""Checking a whole passage store: every stored matrix decodes, every text matches its digest, no id is
stored twice, and every index the table lists can be read.

Every read already checks the rows it fetches (``decode_rows``), so a damaged or stale row is refused
when a query meets it. ``verify_store`` runs the same checks over the whole table, streaming, so that
such rows are found before a query does: after a crash of the storage layer, a copy between buckets,
or writes that bypassed kalm-store (a LanceDB ``update`` of ``text``, an appender unaware of a
repooled ratio). It only reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pyarrow as pa

from . import schema
from .codec import CorruptMatrixError
from .maintenance import IndexProblem, check_indices, missing_indices
from .store import check_ratio_stored, decode_rows, stale_ids

if TYPE_CHECKING:  # pragma: no cover
    from .store import PassageStore


@dataclass
class ColumnReport:
    """What the check found in one column (``kalm_r{r}``, or ``text`` for the digests)."""

    ok: int = 0
    bad: int = 0
    examples: list[tuple[str, str]] = field(default_factory=list)  # (id, reason), the first few


@dataclass
class VerifyReport:
    """What :func:`verify_store` returns; ``ok`` is False when any row failed a check."""

    table: str
    rows: int
    ratios: list[int]
    columns: dict[str, ColumnReport]
    digests: bool  # False for schema-version-1 tables, which keep no text digest
    duplicate_ids: int = 0  # extra copies of ids stored more than once (searches return each hit twice)
    duplicate_examples: list[tuple[str, int]] = field(default_factory=list)  # (id, copies), the first few
    index_problems: list[IndexProblem] = field(default_factory=list)  # listed indices that cannot be read
    missing_indices: list[str] = field(default_factory=list)  # of `text` (full-text) and `id`: not a failure

    @property
    def ok(self) -> bool:
        return not any(c.bad for c in self.columns.values()) and not self.duplicate_ids and not self.index_problems


def verify_store(store: PassageStore, *, ratios: Sequence[int] | None = None, batch_rows: int = 1024,
                 examples: int = 10, progress: bool = False) -> VerifyReport:
    """Decode every stored matrix at ``ratios`` (default: all stored) and check every text's digest.

    Parameters
    ----------
    store : PassageStore
        The open store (no model needed).
    ratios : sequence of int, optional
        Stored ratios to check; default ``None`` checks all of them.
    batch_rows : int, default 1024
        Rows read per batch (memory: one batch of matrices).
    examples : int, default 10
        Failing ids (with the reason) kept per column.
    progress : bool, default False
        A tqdm bar on stderr.

    Returns
    -------
    VerifyReport
    """
    what = f"table {store.table.name!r}"
    ratios = sorted({check_ratio_stored(store.metadata, r, what=what) for r in (ratios or store.ratios)})
    if isinstance(batch_rows, bool) or not isinstance(batch_rows, int) or batch_rows < 1:
        raise ValueError(f"batch_rows must be a positive int, got {batch_rows!r}")
    digests = store.has_digests
    report = VerifyReport(table=store.table.name, rows=0, ratios=ratios,
                          columns={schema.column_name(r): ColumnReport() for r in ratios}, digests=digests)
    if digests:
        report.columns["text"] = ColumnReport()
    cols = ["id", "n_tokens"] + (["text", schema.DIGEST_COLUMN] if digests else []) + \
        [schema.column_name(r) for r in ratios]
    from tqdm.auto import tqdm

    ds = store.table.to_lance()
    seen: set[str] = set()  # memory: one id string per row, as a build holds
    copies: dict[str, int] = {}
    with tqdm(total=ds.count_rows(), unit="row", desc="verify", disable=not progress) as bar:
        for batch in ds.to_batches(columns=cols, batch_size=batch_rows):
            rows = pa.Table.from_batches([batch])
            report.rows += rows.num_rows
            for pid in rows.column("id").to_pylist():
                if pid in seen:
                    copies[pid] = copies.get(pid, 1) + 1
                seen.add(pid)
            if digests:
                stale = stale_ids(rows.column("id").to_pylist(), rows.column("text").to_pylist(),
                                  rows.column(schema.DIGEST_COLUMN).to_pylist())
                _count(report.columns["text"], rows.num_rows,
                       [(i, "text changed after its matrices were stored") for i in stale], examples)
            for r in ratios:
                _count(report.columns[schema.column_name(r)], rows.num_rows,
                       _damaged(rows.select(["id", "n_tokens", schema.column_name(r)]), r, store), examples)
            bar.update(rows.num_rows)
    report.duplicate_ids = sum(n - 1 for n in copies.values())
    report.duplicate_examples = list(copies.items())[:examples]
    report.index_problems = check_indices(store)
    report.missing_indices = missing_indices(store)
    return report


def _damaged(rows: pa.Table, ratio: int, store: PassageStore) -> list[tuple[str, str]]:
    """(id, reason) of the rows whose value at ``ratio`` does not decode; a clean batch decodes at once."""
    dim, max_length = store.dim, store.metadata.get("max_length")
    try:
        decode_rows(rows, ratio, dim, max_length)
        return []
    except CorruptMatrixError:
        pass  # some row is damaged: find every one of them, row by row
    bad = []
    for k in range(rows.num_rows):
        try:
            decode_rows(rows.slice(k, 1), ratio, dim, max_length)
        except CorruptMatrixError as e:
            bad.append((rows.column("id")[k].as_py(), str(e)))
    return bad


def _count(col: ColumnReport, rows: int, bad: list[tuple[str, str]], examples: int) -> None:
    col.bad += len(bad)
    col.ok += rows - len(bad)
    col.examples.extend(bad[: max(examples - len(col.examples), 0)])


__all__ = ["verify_store", "VerifyReport", "ColumnReport"]
