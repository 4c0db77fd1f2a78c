"""KaLMReranker: the LanceDB query hook that scores candidates from their stored pooled matrices.

For the candidate rows of a vector, full-text or hybrid search the reranker gets each row's stored
``kalm_r{r}`` matrix (from the search's own ``select`` when it is there, else by ``_rowid`` through
the table handle), decodes it, and scores all candidates of the query with batched decoder passes.
No passage is re-encoded online.

Every rerank path (vector, FTS, hybrid; ``return_score`` "relevance" or "all"; empty input) ends in
one helper, :func:`finish_results`, so they share one output contract: the input columns minus the
stored matrices (unless ``keep_matrices``) and, for "relevance", minus ``_distance``/``_score``;
plus a float32 ``_relevance_score``; sorted by it, descending.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np
import pyarrow as pa
from lancedb.rerankers import Reranker

from kalm_store import schema
from kalm_store.pooling import check_ratio
from kalm_store.store import (MissingRowError, StoreMismatchError, check_compatible, check_layout_file,
                              check_ratio_stored, decode_rows, sql_in)

if TYPE_CHECKING:  # pragma: no cover
    from kalm_store.model import KaLMModel

ReturnScore = Literal["relevance", "all"]
RETURN_SCORES = ("relevance", "all")
OnStale = Literal["raise", "skip"]
ON_STALE = ("raise", "skip")
SCORE_COLUMN = "_relevance_score"
_FIRST_STAGE_SCORES = ("_distance", "_score")


class StaleCandidatesWarning(UserWarning):
    """Stale candidates (text changed after their matrices were stored) were left out of the results."""


def finish_results(results: pa.Table, scores: np.ndarray, *, return_score: ReturnScore,
                   keep_matrices: bool = False) -> pa.Table:
    """The one output contract of every rerank path.

    Drops the stored ``kalm_r*`` and ``text_digest`` columns (unless ``keep_matrices``) and, for
    ``return_score="relevance"``, the first-stage ``_distance``/``_score``; appends ``scores`` as
    float32 ``_relevance_score``; sorts by it, descending (ties keep first-stage order).

    Parameters
    ----------
    results : pyarrow.Table
        Candidate rows as LanceDB returned them (possibly empty).
    scores : numpy.ndarray
        One score per row of ``results``.
    return_score : {"relevance", "all"}
        "all" keeps the first-stage score columns.
    keep_matrices : bool, default False
        Keep the stored matrix (and text digest) columns in the output.

    Returns
    -------
    pyarrow.Table
    """
    if len(scores) != results.num_rows:
        raise AssertionError(f"{len(scores)} scores for {results.num_rows} rows")  # internal invariant
    drop = [c for c in results.column_names
            if (not keep_matrices and (schema.ratio_of_column(c) is not None or c == schema.DIGEST_COLUMN))
            or (return_score == "relevance" and c in _FIRST_STAGE_SCORES)
            or c == SCORE_COLUMN]
    out = results.drop_columns(drop).append_column(SCORE_COLUMN, pa.array(scores, type=pa.float32()))
    if out.num_rows == 0:
        return out
    order = np.argsort(-np.asarray(scores, dtype=np.float32), kind="stable")
    return out.take(pa.array(order))


class _Handle:
    """Sync view of a LanceDB ``Table`` or ``AsyncTable``: metadata, version, take by row id / id.

    An ``AsyncTable``'s coroutines run on LanceDB's own background event loop, so the reranker (which
    LanceDB calls synchronously, also from async queries) never touches the caller's loop.
    """

    def __init__(self, table: Any) -> None:
        self.table = getattr(table, "table", table)  # a PassageStore gives its table
        self.is_async = type(self.table).__name__ == "AsyncTable"
        if not (hasattr(self.table, "schema") and hasattr(self.table, "take_row_ids")):
            raise TypeError(f"table must be a LanceDB Table, AsyncTable or PassageStore, got {type(table).__name__}")

    def _run(self, value: Any) -> Any:
        if not self.is_async:
            return value
        from lancedb.background_loop import LOOP

        return LOOP.run(value)

    @property
    def name(self) -> str:
        return str(self.table.name)

    def schema(self) -> pa.Schema:
        return self._run(self.table.schema()) if self.is_async else self.table.schema

    def version(self) -> int:
        return int(self._run(self.table.version()) if self.is_async else self.table.version)

    def take_row_ids(self, row_ids: list[int], columns: list[str]) -> pa.Table:
        query = self.table.take_row_ids(row_ids).select(columns).with_row_id()
        return self._run(query.to_arrow())

    def take_ids(self, ids: list[str], columns: list[str]) -> pa.Table:
        query = self.table.query() if self.is_async else self.table.search()
        query = query.where(sql_in("id", ids)).select(columns).limit(len(ids))
        return self._run(query.to_arrow())

    def take_where(self, where: str, columns: list[str]) -> pa.Table:
        """Every row matching the filter ``where`` (no limit)."""
        if self.is_async:  # an async plain query has no limit
            return self._run(self.table.query().where(where).select(columns).to_arrow())
        return self.table.search().where(where).select(columns).limit(None).to_arrow()


class KaLMReranker(Reranker):
    """Rerank LanceDB search results with KaLM-Reranker-V1 from the stored pooled matrices.

    Parameters
    ----------
    model : KaLMModel
        The model that built the table (its fingerprint is checked against the table's metadata).
        Scoring runs on the model's device and dtype.
    table : lancedb Table, AsyncTable or PassageStore
        The searched table: its metadata is checked once here (and again when its version changes),
        and rows whose matrix is not in the search results are fetched through it by ``_rowid``.
    ratio : int, optional
        Stored MEP ratio to score with; default ``None`` uses the smallest (most faithful) ratio the
        table stores. A ratio the table does not store is refused.
    instruction : str, optional
        Task instruction; default ``None`` uses the model's default instruction.
    batch_size : int, default 32
        Candidates per decoder pass (the scores do not depend on it).
    return_score : {"relevance", "all"}, default "relevance"
        "all" keeps the first-stage ``_distance``/``_score`` columns beside ``_relevance_score``.
    keep_matrices : bool, default False
        Keep the stored ``kalm_r*`` columns in the output (they are dropped by default).
    on_stale : {"raise", "skip"}, default "raise"
        What to do with a candidate whose text was changed after its matrices were stored (LanceDB's
        own ``update`` or a ``merge_insert`` of ``text``): "raise" refuses the whole query with
        :class:`~kalm_store.store.StaleMatrixError` naming it; "skip" leaves such candidates out of the
        reranked results and names them in a :class:`StaleCandidatesWarning`.

    Notes
    -----
    Fastest usage: select the stored columns in the search itself (``select(["text"] + rr.columns)``);
    the reranker then reads the matrices from the results. Without them it fetches the rows through
    ``table`` by ``_rowid`` (``.with_row_id(True)`` on vector and FTS searches; hybrid searches always
    carry it), else by ``id``, else (a search that selected only ``text``) by the text's digest. The
    fetched rows must be the results' own: their ``id`` and ``text`` are compared with the results'
    where the results carry them, so results of another table are refused, not scored.

    Examples
    --------
    >>> import lancedb
    >>> from kalm_store import KaLMModel
    >>> from kalm_store.plugins.lancedb import KaLMReranker
    >>> tbl = lancedb.connect("./db").open_table("docs")  # doctest: +SKIP
    >>> rr = KaLMReranker(KaLMModel.from_pretrained("KaLM-Embedding/KaLM-Reranker-V1-Nano"), table=tbl)  # doctest: +SKIP
    >>> hits = (tbl.search("how do I parse json?", query_type="hybrid").select(["text"] + rr.columns)
    ...         .limit(100).rerank(rr).limit(10).to_list())  # doctest: +SKIP
    """

    def __init__(
        self,
        model: KaLMModel,
        *,
        table: Any,
        ratio: int | None = None,
        instruction: str | None = None,
        batch_size: int = 32,
        return_score: ReturnScore = "relevance",
        keep_matrices: bool = False,
        on_stale: OnStale = "raise",
    ) -> None:
        from kalm_store.model import KaLMModel, _check_batch_size

        # validate every argument before touching the table
        if not isinstance(model, KaLMModel):
            raise TypeError(f"model must be a kalm_store.KaLMModel, got {type(model).__name__}")
        if return_score not in RETURN_SCORES:
            raise ValueError(f"return_score must be one of {list(RETURN_SCORES)}, got {return_score!r}")
        if ratio is not None:
            check_ratio(ratio)
        if instruction is not None and not isinstance(instruction, str):
            raise TypeError(f"instruction must be a str or None, got {type(instruction).__name__}")
        _check_batch_size(batch_size)
        if not isinstance(keep_matrices, bool):
            raise TypeError(f"keep_matrices must be a bool, got {type(keep_matrices).__name__}")
        if on_stale not in ON_STALE:
            raise ValueError(f"on_stale must be one of {list(ON_STALE)}, got {on_stale!r}")
        if table is None:
            raise ValueError("table is required: pass the LanceDB table (or AsyncTable) being searched")
        handle = _Handle(table)
        super().__init__(return_score)
        self.model = model
        self.instruction = instruction
        self.batch_size = batch_size
        self.keep_matrices = keep_matrices
        self.on_stale: OnStale = on_stale
        self._handle = handle
        self._requested_ratio = ratio
        self._version = -1
        self.ratio: int = 0
        self._digests = False  # does the table keep text_digest (schema version 2 on)?
        self._check_table()

    # ------------------------------------------------------------------ table checks
    def _check_table(self) -> None:
        """Check fingerprint and ratio against the table's metadata, once per table version."""
        version = self._handle.version()
        if version == self._version:
            return
        table_schema = self._handle.schema()
        meta = schema.decode_metadata(table_schema.metadata)
        what = f"table {self._handle.name!r}"
        check_compatible(meta, self.model, what=what)
        check_layout_file(table_schema, what=what)
        stored = sorted(meta.get("ratios") or [])
        if self._requested_ratio is None:
            if not stored:
                raise StoreMismatchError(f"{what} stores no ratio columns")
            self.ratio = stored[0]
        else:
            self.ratio = check_ratio_stored(meta, self._requested_ratio, what=what)
        self._digests = schema.DIGEST_COLUMN in table_schema.names
        self._version = version

    @property
    def column(self) -> str:
        """Name of the stored matrix column scored: ``kalm_r{ratio}``."""
        return schema.column_name(self.ratio)

    @property
    def columns(self) -> list[str]:
        """Stored columns to ``select`` in a search, beside ``text``, so the reranker reads the matrices
        from the results (fastest): ``id``, ``n_tokens``, ``text_digest`` (tables of schema version 2 on)
        and ``kalm_r{ratio}``, as in ``.select(["text"] + rr.columns)``.

        ``text`` is not in the list because searches select it anyway; the reranker reads it too, to
        check it against ``text_digest`` (a matrix whose text was changed behind kalm-store's back is
        refused), and fetches it with the matrices when the results lack it.
        """
        return ["id", "n_tokens"] + ([schema.DIGEST_COLUMN] if self._digests else []) + [self.column]

    @property
    def _read(self) -> list[str]:
        """What the reranker reads per candidate: :attr:`columns`, plus ``text`` for the digest check."""
        return self.columns + (["text"] if self._digests else [])

    def __str__(self) -> str:
        return f"KaLMReranker(model={self.model.name_or_path}, ratio={self.ratio})"

    # ------------------------------------------------------------------ matrices of the candidates
    def _rows(self, results: pa.Table) -> pa.Table:
        """The stored columns :attr:`_read` of the result rows, in row order: from the results when they
        carry them, else fetched through the table (by ``_rowid``, ``id`` or text digest) and checked to
        be the results' own rows."""
        names = results.column_names
        if all(c in names for c in self._read):
            # the matrices are the results' own; LanceDB hands over the searched table's schema metadata,
            # so matrices of a table built by another model are refused too, not scored
            meta = schema.decode_metadata(results.schema.metadata)
            if meta.get("fingerprint") not in (None, self.model.fingerprint):
                check_compatible(meta, self.model, what="the table of these search results")
            return results.select(self._read)
        if "_rowid" in names or "id" in names:
            key: Literal["_rowid", "id", "text"] = "_rowid" if "_rowid" in names else "id"
        elif "text" in names and self._digests:
            key = "text"
        else:
            by_text = " or 'text'" if self._digests else ""
            raise ValueError(
                f"the search results carry neither the stored matrices {self.columns}, nor '_rowid', nor 'id'"
                f"{by_text} (columns: {names}); select the stored columns in the search "
                f"(`.select([..., {', '.join(repr(c) for c in ['text', *self.columns])}])`, fastest) or add "
                "`.with_row_id(True)` to the search")
        if all(c in names for c in self.columns):  # matrices selected, text not: fetch the text alone
            return results.select(self.columns).append_column("text", self._fetch(results, key, ["id", "text"])
                                                              .column("text"))
        return self._fetch(results, key, self._read)

    def _fetch(self, results: pa.Table, key: Literal["_rowid", "id", "text"], columns: list[str]) -> pa.Table:
        """``columns`` of the result rows, fetched through the table by ``key``, in row order."""
        names = results.column_names
        if key == "text":
            from kalm_store.store import text_digest

            texts = results.column("text").to_pylist()
            if any(t is None for t in texts):
                raise ValueError("a search result has a null text: it cannot be looked up by its digest; select "
                                 "'id' or add `.with_row_id(True)` to the search")
            keys: list[Any] = [text_digest(t) for t in texts]
            fetch = list(dict.fromkeys(columns + ["text", schema.DIGEST_COLUMN]))
            unique = list(dict.fromkeys(keys))
            fetched = self._handle.take_where(
                f"{schema.DIGEST_COLUMN} IN (" + ", ".join(f"X'{d.hex()}'" for d in unique) + ")", fetch)
            pos: dict[Any, int] = {}
            for i, d in enumerate(fetched.column(schema.DIGEST_COLUMN).to_pylist()):
                pos.setdefault(d, i)  # equal texts under several ids: any of them holds this text's matrix
            lost = list(dict.fromkeys(t for t, d in zip(texts, keys) if d not in pos))
            if lost:  # no digest matches: a text changed behind kalm-store's back? find the row by its text
                extra = self._handle.take_where(sql_in("text", lost), fetch)
                for j, t in enumerate(extra.column("text").to_pylist()):
                    pos.setdefault(text_digest(t), fetched.num_rows + j)  # its stored digest differs: stale
                fetched = pa.concat_tables([fetched, extra])
        else:
            keys = results.column(key).to_pylist()
            fetch = list(dict.fromkeys(columns + [c for c in ("id", "text") if c in names]))
            fetched = (self._handle.take_row_ids(keys, fetch) if key == "_rowid"
                       else self._handle.take_ids(keys, fetch))
            pos = {k: i for i, k in enumerate(fetched.column(key).to_pylist())}
        missing = [i for i, k in enumerate(keys) if k not in pos]
        if missing:
            shown = results.column("id").to_pylist() if "id" in names else keys
            if key == "text":
                shown = [str(t)[:60] for t in results.column("text").to_pylist()]
            raise MissingRowError(f"no stored row for candidate(s) {[shown[i] for i in missing[:10]]} in table "
                                  f"{self._handle.name!r} (deleted or compacted since the search?)")
        rows = fetched.take(pa.array([pos[k] for k in keys]))
        self._check_same_rows(results, rows, key)
        return rows.select(columns)

    def _check_same_rows(self, results: pa.Table, rows: pa.Table, key: str) -> None:
        """Refuse rows fetched through the table that are not the results' rows: a reranker built with
        ``table=A`` and handed results of table B would otherwise score A's passages under B's rows."""
        for col in ("id", "text"):
            if col not in results.column_names:
                continue
            want, got = results.column(col).to_pylist(), rows.column(col).to_pylist()
            bad = [i for i, (w, g) in enumerate(zip(want, got)) if w != g]
            if bad:
                i = bad[0]
                what = f"id {want[i]!r}" if col == "id" else f"text {str(want[i])[:60]!r}"
                has = f"id {got[i]!r}" if col == "id" else f"text {str(got[i])[:60]!r}"
                raise StoreMismatchError(
                    f"the rows fetched by {key} from table {self._handle.name!r} are not the search results' rows "
                    f"({len(bad)} of {len(want)} differ; result {what}, fetched row {has}): the reranker is bound "
                    f"to table {self._handle.name!r} (its table=), so rerank searches of that table only, or build "
                    "a KaLMReranker with table= the searched table")
        if key == "_rowid" and "id" not in results.column_names and "text" not in results.column_names:
            raise ValueError(
                "the search results carry only '_rowid' of the reranker's columns: select 'id' or 'text' as well, so "
                "that the reranker can check the rows it fetches are these results' rows (or select the stored "
                f"columns {['text', *self.columns]})")

    def _matrices(self, results: pa.Table) -> tuple[list[np.ndarray], np.ndarray | None]:
        """Stored matrices of the result rows, in row order, and (``on_stale="skip"``) which rows they are
        of: ``None`` when every row is kept, else a boolean mask over ``results``."""
        rows = self._rows(results)
        keep = None
        if self.on_stale == "skip" and schema.DIGEST_COLUMN in rows.column_names:
            from kalm_store.store import stale_ids

            ids = rows.column("id").to_pylist()
            stale = set(stale_ids(ids, rows.column("text").to_pylist(),
                                  rows.column(schema.DIGEST_COLUMN).to_pylist()))
            if stale:
                keep = np.array([i not in stale for i in ids], dtype=bool)
                rows = rows.filter(pa.array(keep))
                named = sorted(stale)
                warnings.warn(
                    f"left out {len(named)} stale candidate{'s' if len(named) != 1 else ''} of table "
                    f"{self._handle.name!r}: passage id{'s' if len(named) != 1 else ''} {named[:10]}"
                    f"{' ...' if len(named) > 10 else ''} (text changed after the matrices were stored; re-encode "
                    "with `kalm-store build --update`)", StaleCandidatesWarning, stacklevel=2)
        return decode_rows(rows, self.ratio, self.model.dim, self.model.max_length), keep

    # ------------------------------------------------------------------ scoring
    def score_results(self, query: str, results: pa.Table, *, instruction: str | None = None,
                      batch_size: int | None = None) -> np.ndarray:
        """Scores (float32 ``P(yes)``) of the candidate rows in ``results``, in row order.

        Parameters
        ----------
        query : str
            The query text.
        results : pyarrow.Table
            Candidate rows (see the class notes for the columns they need).
        instruction : str, optional
            Instruction for this call only; default ``None`` uses the reranker's.
        batch_size : int, optional
            Batch size for this call only; default ``None`` uses the reranker's.

        Returns
        -------
        numpy.ndarray
            One score per row; with ``on_stale="skip"`` a stale row's score is NaN (and it is named in a
            :class:`StaleCandidatesWarning`).
        """
        scores, keep = self._score(query, results, instruction, batch_size)
        if keep is None:
            return scores
        out = np.full(results.num_rows, np.nan, dtype=np.float32)
        out[keep] = scores
        return out

    def _score(self, query: str, results: pa.Table, instruction: str | None,
               batch_size: int | None) -> tuple[np.ndarray, np.ndarray | None]:
        """Scores of the kept rows, and the mask of kept rows (``None``: all of them)."""
        if not isinstance(query, str):
            raise TypeError(f"the rerank query must be a str, got {type(query).__name__}; for a vector search "
                            "pass `.rerank(reranker, query_string=...)`")
        self._check_table()
        if results.num_rows == 0:
            return np.zeros(0, dtype=np.float32), None
        mats, keep = self._matrices(results)
        if not mats:
            return np.zeros(0, dtype=np.float32), keep
        with warnings.catch_warnings():
            # decoded matrices are read-only views of the fetched bytes; the model only reads them
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            scores = self.model.score(query, mats, self.instruction if instruction is None else instruction,
                                      batch_size=self.batch_size if batch_size is None else batch_size)
        return scores, keep

    def rerank_table(self, query: str, results: pa.Table, *, instruction: str | None = None,
                     batch_size: int | None = None) -> pa.Table:
        """Score ``results`` and return them under the output contract (see :func:`finish_results`);
        with ``on_stale="skip"`` stale rows are left out.

        Per-call ``instruction``/``batch_size`` apply to this call only; the reranker is not changed.
        """
        scores, keep = self._score(query, results, instruction, batch_size)
        if keep is not None:
            results = results.filter(pa.array(keep))
        return finish_results(results, scores, return_score=cast(ReturnScore, self.score),  # checked in __init__
                              keep_matrices=self.keep_matrices)

    def rerank_vector(self, query: str, vector_results: pa.Table) -> pa.Table:
        """Rerank the rows of a vector search."""
        return self.rerank_table(query, vector_results)

    def rerank_fts(self, query: str, fts_results: pa.Table) -> pa.Table:
        """Rerank the rows of a full-text search."""
        return self.rerank_table(query, fts_results)

    def rerank_hybrid(self, query: str, vector_results: pa.Table, fts_results: pa.Table) -> pa.Table:
        """Rerank the union (deduplicated by ``_rowid``) of a hybrid search's two result sets."""
        return self.rerank_table(query, self.merge_results(vector_results, fts_results))


__all__ = ["KaLMReranker", "StaleCandidatesWarning", "finish_results", "SCORE_COLUMN", "ON_STALE", "OnStale"]
