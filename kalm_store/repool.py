"""Re-pooling a stored ratio into a coarser one, without re-encoding anything.

A ``kalm_r{k*r}`` row is the token-count-weighted mean of ``k`` consecutive ``kalm_r{r}`` rows
(:func:`kalm_store.pooling.repool`), so a coarser column is derived exactly (up to float16 rounding)
from the stored finer one and ``n_tokens``. The new column is written with Lance ``add_columns``:
only the new column's data files are written, the vectors, text, other ratios and the vector index
stay as they are, and the column becomes visible in one commit (an interrupted run leaves nothing
half-written). A concurrent append makes that commit fail with Lance's retryable
``CommitConflictError``; the column is then derived again from the latest version (appended rows
included), up to ``CONFLICT_RETRIES`` times. Rows appended after the winning commit by a writer that
does not know the new ratio hold null in it (so do rows such a writer replaces); running the same
command again re-derives exactly those rows (:func:`fill_nulls`). ``kalm-store build`` resumes on
such a table only when given every ratio its metadata lists (and then writes them all). The table
metadata ``ratios`` is updated in a second commit; a run interrupted between the two is finished by
running the same command again, and so is a ``drop_source`` run killed between its metadata commit
and the column drop. A finished run, run again, writes nothing (``nothing_to_do``).

A finer ratio can never be recovered from a coarser one: that is refused, with the reason.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from . import schema
from .codec import CorruptMatrixError, decode_matrix, encode_matrix, to_float16
from .pooling import check_ratio, pooled_rows, repool

if TYPE_CHECKING:  # pragma: no cover
    from .store import PassageStore


CONFLICT_RETRIES = 8  # re-derivations after a retryable commit conflict with a concurrent writer


class RepoolError(ValueError):
    """A re-pooling request that cannot be carried out (finer target, not a multiple, ...)."""


@dataclass(frozen=True)
class RepoolResult:
    """What :func:`repool_store` did."""

    from_ratio: int
    to_ratio: int
    rows: int  # rows re-pooled (0 when only the metadata of an interrupted run was completed)
    ratios: list[int]  # ratios the table stores afterwards
    dropped: int | None  # the dropped source ratio, if any
    version: int  # table version afterwards
    conflicts: int = 0  # commit races lost to concurrent writers (each one re-derived from the latest version)
    filled: int = 0  # rows that held null at the target ratio, re-derived (see fill_nulls)
    nothing_to_do: bool = False  # the same run had finished before: nothing was written


def check_repool(stored: list[int], from_ratio: object, to_ratio: object, *, columns: list[str] | None = None,
                 drop_source: bool = False) -> tuple[int, int]:
    """Validate a request to derive ``to_ratio`` from ``from_ratio`` for a table storing ``stored``.

    Raises :class:`RepoolError` naming the reason: the target finer than the source, not a multiple of
    it, the source not stored, the target already stored, or dropping the only stored ratio.
    """
    f = check_ratio(from_ratio, "from_ratio")
    t = check_ratio(to_ratio, "to_ratio")
    check_direction(f, t)
    if f not in stored:
        raise RepoolError(f"the table stores ratios {stored}, not the source r={f}; re-pool from one of them")
    if columns is not None and schema.column_name(f) not in columns:
        raise RepoolError(f"the table metadata lists r={f} but the column {schema.column_name(f)} is missing")
    if t in stored:
        raise RepoolError(f"the table already stores r={t} (ratios {stored}); nothing to do")
    return f, t


def check_direction(from_ratio: int, to_ratio: int) -> None:
    """Refuse a finer or non-multiple target (before anything is opened)."""
    if to_ratio < from_ratio:
        raise RepoolError(
            f"cannot re-pool from r={from_ratio} to the finer r={to_ratio}: each stored row is already a mean "
            f"of {from_ratio} tokens and the individual token states are gone, so a finer ratio can never be "
            f"recovered; encode the passages again into a new table with `kalm-store build ... --table NEW "
            f"--ratio {to_ratio}` (a table keeps the ratio set it was built with)")
    if to_ratio == from_ratio:
        raise RepoolError(f"from and to are both r={from_ratio}; nothing to do")
    if to_ratio % from_ratio:
        raise RepoolError(
            f"cannot re-pool from r={from_ratio} to r={to_ratio}: {to_ratio} is not a multiple of {from_ratio}, "
            f"so the groups of {to_ratio} tokens do not consist of whole groups of {from_ratio}; re-pool from "
            f"r=1 or from a ratio dividing {to_ratio}")


def set_ratios(table: Any, ratios: list[int]) -> None:
    """Record ``ratios`` in the table metadata (one commit; other keys untouched).

    store.py has no metadata update yet, so this works on the LanceDB table through its Lance dataset.
    """
    table.to_lance().update_schema_metadata(schema.encode_metadata({"ratios": sorted(ratios)}))
    table.checkout_latest()


def repool_store(
    store: PassageStore,
    from_ratio: int,
    to_ratio: int,
    *,
    drop_source: bool = False,
    batch_size: int = 256,
    show_progress: bool = False,
) -> RepoolResult:
    """Add the ``kalm_r{to_ratio}`` column derived from ``kalm_r{from_ratio}``; no re-encoding.

    Parameters
    ----------
    store : PassageStore
        An opened store (no model needed).
    from_ratio : int
        A stored ratio.
    to_ratio : int
        The new ratio: a multiple of ``from_ratio``, not stored yet.
    drop_source : bool, default False
        Drop ``kalm_r{from_ratio}`` afterwards (the new ratio remains, so the table always keeps one).
    batch_size : int, default 256
        Rows read and re-pooled at a time.
    show_progress : bool, default False
        Show a tqdm bar over rows.

    Returns
    -------
    RepoolResult

    Examples
    --------
    >>> store = PassageStore.open("./db", "docs")  # doctest: +SKIP
    >>> repool_store(store, 4, 8).ratios  # doctest: +SKIP
    [4, 8]
    """
    import lance
    from lance.commit import CommitConflictError

    f, t = check_ratio(from_ratio, "from_ratio"), check_ratio(to_ratio, "to_ratio")
    check_direction(f, t)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    table = store.table
    table.checkout_latest()
    ds = table.to_lance()
    columns = ds.schema.names
    stored = store.ratios
    src, dst = schema.column_name(f), schema.column_name(t)
    if dst in columns and f in stored and src in columns:
        if t not in stored:  # add_columns committed but the metadata update did not: finish the interrupted run
            set_ratios(table, stored + [t])
        elif not _has_nulls(store, f, t) and not drop_source:  # a finished run, run again
            return _finish(store, f, t, 0, False, nothing_to_do=True)
        return _finish(store, f, t, 0, drop_source, filled=fill_nulls(store, f, t, batch_size=batch_size))
    if drop_source and t in stored and f not in stored and dst in columns:
        # a --drop-source run whose metadata commit no longer lists r=f: finish the drop, or it was finished
        if src in columns:  # killed between that commit and the column drop
            table.to_lance().drop_columns([src])
            table.checkout_latest()
            return _finish(store, f, t, 0, False, dropped=f)
        return _finish(store, f, t, 0, False, nothing_to_do=True)
    check_repool(stored, f, t, columns=columns)
    if dst in columns:
        raise RepoolError(f"column {dst} exists although the metadata does not list r={t}; "
                          "inspect the table before re-pooling")
    dim = store.dim
    field = schema.ratio_field(t)  # carries lance-encoding:compression none, like every kalm_r* column
    out_schema = pa.schema([field])
    rows = ds.count_rows()
    bar = None
    if show_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=rows, desc=f"repool r={f}->{t}", unit="row")

    damaged: list[CorruptMatrixError] = []

    @lance.batch_udf(output_schema=out_schema)
    def derive(batch: pa.RecordBatch) -> pa.RecordBatch:
        try:
            out = repool_batch(batch, f, t, dim)
        except CorruptMatrixError as e:
            damaged.append(e)  # Lance hands what a UDF raises back as OSError: keep ours to raise it as it is
            raise
        if bar is not None:
            bar.update(batch.num_rows)
        return out

    attempt = 0
    try:
        for attempt in range(CONFLICT_RETRIES + 1):
            try:
                try:
                    ds.add_columns(derive, read_columns=["id", "n_tokens", src], batch_size=batch_size)
                except OSError:
                    if damaged:
                        raise damaged[0] from None
                    raise
                break
            except CommitConflictError as e:
                # a concurrent commit (e.g. a build appending rows) won: re-read the latest version, whose
                # rows include the appended ones, and derive the column again
                if attempt == CONFLICT_RETRIES:
                    raise RepoolError(f"adding {dst} lost {attempt + 1} commit races to concurrent writers; "
                                      "pause the writers (or retry later) and run the same command again") from e
                time.sleep(min(0.05 * 2**attempt, 2.0))
                table.checkout_latest()
                ds = table.to_lance()
                rows = ds.count_rows()
                if bar is not None:
                    bar.reset(total=rows)
    finally:
        if bar is not None:
            bar.close()
    table.checkout_latest()
    set_ratios(table, stored + [t])
    return _finish(store, f, t, rows, drop_source, conflicts=attempt)


def _finish(store: PassageStore, f: int, t: int, rows: int, drop_source: bool, conflicts: int = 0,
            filled: int = 0, dropped: int | None = None, nothing_to_do: bool = False) -> RepoolResult:
    if drop_source:
        dropped = drop_ratio(store, f)
    return RepoolResult(from_ratio=f, to_ratio=t, rows=rows, ratios=store.ratios, dropped=dropped,
                        version=store.table.version, conflicts=conflicts, filled=filled, nothing_to_do=nothing_to_do)


def _missing_filter(from_ratio: int, to_ratio: int) -> str:
    return f"{schema.column_name(to_ratio)} IS NULL AND {schema.column_name(from_ratio)} IS NOT NULL"


def _has_nulls(store: PassageStore, from_ratio: int, to_ratio: int) -> bool:
    return store.table.count_rows(_missing_filter(from_ratio, to_ratio)) > 0


def fill_nulls(store: PassageStore, from_ratio: int, to_ratio: int, *, batch_size: int = 256) -> int:
    """Re-derive the rows that hold null at ``kalm_r{to}`` but a value at ``kalm_r{from}``; returns how many.

    Such rows come from writers unaware of ``to``: an append, or an update during an unfinished
    repool. A conditional merge-insert writes that one column, and only where the row's text digest
    is still the one read: a row replaced meanwhile keeps its null, and the next run derives it from
    its new matrix. (Version-1 tables keep no digest: there the write is unconditional.)
    """
    src, dst = schema.column_name(from_ratio), schema.column_name(to_ratio)
    store.table.checkout_latest()
    keys = ["id"] + ([schema.DIGEST_COLUMN] if store.has_digests else [])
    missing = store.table.to_lance().to_table(columns=keys + ["n_tokens", src],
                                              filter=_missing_filter(from_ratio, to_ratio))
    if missing.num_rows == 0:
        return 0
    derived = [repool_batch(b, from_ratio, to_ratio, store.dim).column(0)
               for b in missing.to_batches(max_chunksize=batch_size)]
    rows = missing.select(keys).append_column(schema.ratio_field(to_ratio), pa.chunked_array(derived))
    merge = store.table.merge_insert("id")
    if store.has_digests:
        # use_index(False): with a scalar index on `id`, a conditional merge-insert of some columns panics in
        # Lance (pylance 14.0.2: "Incorrect number of arrays for StructArray fields"); a join scan of the id
        # column is fine for a repair of a few rows
        merge = merge.use_index(False).when_matched_update_all(
            where=f"target.{schema.DIGEST_COLUMN} = source.{schema.DIGEST_COLUMN}")
    else:
        merge = merge.when_matched_update_all()
    return int(merge.execute(rows).num_updated_rows)


def drop_ratio(store: PassageStore, ratio: int) -> int:
    """Drop the ``kalm_r{ratio}`` column and its metadata entry; refuses to drop the last ratio.

    The metadata is updated first, so an interrupted drop leaves an unlisted (harmless) column, never a
    listed ratio without its column.
    """
    ratio = check_ratio(ratio)
    table = store.table
    table.checkout_latest()
    stored = store.ratios
    if ratio not in stored:
        raise RepoolError(f"the table stores ratios {stored}, not r={ratio}")
    if len(stored) == 1:
        raise RepoolError(f"r={ratio} is the only ratio the table stores; dropping it would leave nothing to rerank from")
    set_ratios(table, [r for r in stored if r != ratio])
    table.to_lance().drop_columns([schema.column_name(ratio)])
    table.checkout_latest()
    return ratio


__all__ = ["RepoolError", "RepoolResult", "check_direction", "check_repool", "repool_store", "drop_ratio",
           "set_ratios"]


def repool_batch(batch: pa.RecordBatch, from_ratio: int, to_ratio: int, dim: int) -> pa.RecordBatch:
    """``id``, ``n_tokens``, ``kalm_r{from}`` rows -> one ``kalm_r{to}`` column (decode, re-pool, encode).

    The one transform behind every repool engine (local ``add_columns`` and Ray). A null source
    value gives a null; a value that does not decode raises an error naming its id and column.
    """
    src, dst = schema.column_name(from_ratio), schema.column_name(to_ratio)
    out_schema = pa.schema([schema.ratio_field(to_ratio)])
    counts = batch.column("n_tokens").to_pylist()
    ids = batch.column("id").to_pylist()
    blobs = batch.column(src)
    values: list[bytes | None] = []
    for i, n in enumerate(counts):
        if not blobs[i].is_valid:
            values.append(None)
            continue
        mat = decode_matrix(blobs[i].as_buffer(), pooled_rows(n, from_ratio), dim,
                            what=f"passage id {ids[i]!r}, column {src}")
        coarse = repool(mat, n, from_ratio, to_ratio)  # (ceil(n/to), d), computed in float32, back to float16
        values.append(encode_matrix(to_float16(coarse, what=f"re-pooled row of {dst}")))
    return pa.RecordBatch.from_arrays([pa.array(values, pa.large_binary())], schema=out_schema)
