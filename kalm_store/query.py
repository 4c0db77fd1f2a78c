"""``kalm_store.search`` (defined here, in ``kalm_store.query``): from a query to reranked hits.

The first stage (vector, full-text or hybrid) fetches ``candidates`` rows and selects the stored
matrix column with them (the fastest way for the reranker to get the matrices); the
:class:`~kalm_store.plugins.lancedb.KaLMReranker` scores them; the best ``k`` come back.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ._hints import option
from .pooling import check_ratio
from .schema import DIGEST_COLUMN, decode_metadata, ratio_of_column

if TYPE_CHECKING:  # pragma: no cover
    from .model import KaLMModel
    from .plugins.lancedb import KaLMReranker, OnStale

Mode = Literal["vector", "fts", "hybrid"]
MODES: tuple[str, ...] = ("vector", "fts", "hybrid")


def check_search_args(query: object, k: object, candidates: object, mode: object, ratio: object,
                      query_vector: object = None, where: object = None, fields: object = ()) -> None:
    """Validate search arguments (``ValueError``/``TypeError`` naming the bad value and the allowed ones)."""
    if where is not None and (not isinstance(where, str) or not where.strip()):
        raise ValueError(f"where must be a non-empty SQL filter string or None, got {where!r}")
    if isinstance(fields, str) or not isinstance(fields, Sequence) or not all(isinstance(f, str) for f in fields):
        raise TypeError(f"fields must be a list of column names, got {fields!r}")
    if not isinstance(query, str) or not query.strip():
        raise ValueError(f"query must be a non-empty string, got {query!r}")
    for name, value in (("k", k), ("candidates", candidates)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if mode is not None and mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)} or None (what the table supports), got {mode!r}")
    if ratio is not None:
        check_ratio(ratio)
    if query_vector is not None and (isinstance(query_vector, (str, bytes)) or not isinstance(query_vector, Sequence)
                                     and not hasattr(query_vector, "__array__")):
        raise TypeError(f"query_vector must be a sequence of floats or None, got {type(query_vector).__name__}")


def check_first_stage(tbl: Any, mode: Mode, query_vector: Sequence[float] | None = None) -> None:
    """Refuse a first stage the table cannot run: vectors it lacks, a query vector of another width, or
    none where the table has no embedding function to compute it."""
    meta = decode_metadata(tbl.schema.metadata)
    fts = option("mode='fts'", "--mode fts")
    if mode != "fts":
        if meta.get("vector_dim") is None:
            raise ValueError(f"table {tbl.name!r} has no vector column, so mode={mode!r} cannot run; use {fts} "
                             "or build the table with vectors")
        if query_vector is not None and len(query_vector) != meta["vector_dim"]:
            raise ValueError(f"{option('query_vector', '--query-vector')} has {len(query_vector)} values; table "
                             f"{tbl.name!r} holds {meta['vector_dim']}-d vectors")
        if query_vector is None and not meta.get("embedder"):
            raise ValueError(f"table {tbl.name!r} holds brought vectors (no embedding function recorded): pass "
                             f"{option('query_vector=', '--query-vector')} for mode={mode!r}, or use {fts}")


def check_fields(tbl: Any, fields: Sequence[str]) -> None:
    """Refuse ``fields`` that are not columns of the table, or that a hit cannot carry."""
    missing = [f for f in fields if f not in tbl.schema.names]
    if missing:
        raise ValueError(f"fields {missing} are not columns of table {tbl.name!r} (it has {tbl.schema.names})")
    internal = [f for f in fields if f in ("rank", "score", DIGEST_COLUMN) or ratio_of_column(f) is not None]
    if internal:
        raise ValueError(f"fields {internal} cannot be returned: rank and score are the hit's own keys, and the "
                         "stored matrices and text digests stay in the table")


def check_against_table(tbl: Any, *, mode: Mode, ratio: int | None, query_vector: Sequence[float] | None = None,
                        fields: Sequence[str] = (), where: str | None = None) -> None:
    """Everything about a search that the table alone can refuse, checked before a model is loaded (a
    mistake costs a second): the ratio (stored?), the first stage (vectors, query vector width, the
    full-text index), the ``fields`` and the ``where`` filter (parsed and planned by Lance, not run)."""
    from .store import check_ratio_stored

    if ratio is not None:
        check_ratio_stored(decode_metadata(tbl.schema.metadata), ratio, what=f"table {tbl.name!r}")
    check_first_stage(tbl, mode, query_vector)
    check_fields(tbl, fields)
    if mode != "vector" and not any(list(ix.columns) == ["text"] and "fts" in str(ix.index_type).lower()
                                    for ix in tbl.list_indices()):
        how = option("`tbl.create_index('text', config=lancedb.index.FTS())`",
                     f"`kalm-store optimize --db URI --table {tbl.name}`")
        raise ValueError(f"mode={mode!r} needs a full-text index on 'text' of table {tbl.name!r}: create it "
                         f"with {how}")
    if where is not None:
        import re

        try:
            tbl.to_lance().scanner(filter=where, columns=["id"], limit=1).explain_plan()
        except ValueError as e:  # Lance: "Invalid user input: Schema error: No field named x ..., <file.rs:line>"
            reason = re.sub(r",\s*\S+\.rs:\d+:\d+\s*$", "", str(e)).removeprefix("Invalid user input: ")
            raise ValueError(f"where {where!r} is not a filter table {tbl.name!r} can run: {reason}") from None


def first_stage(tbl: Any, query: str, *, mode: Mode, candidates: int, query_vector: Sequence[float] | None = None,
                columns: list[str] | None = None, where: str | None = None) -> Any:
    """The LanceDB query builder of the first stage (not executed), with ``columns`` selected and the
    SQL filter ``where`` applied before the ``candidates`` limit (LanceDB's prefilter).

    Vectors are computed from ``query`` by the table's registered embedding function when it has one;
    tables with brought vectors need ``query_vector`` for "vector" and "hybrid" modes.
    """
    check_first_stage(tbl, mode, query_vector)
    if mode == "fts":
        q = tbl.search(query, query_type="fts")
    elif mode == "vector":
        q = tbl.search(list(query_vector) if query_vector is not None else query, query_type="vector")
    elif query_vector is not None:
        q = tbl.search(query_type="hybrid").vector(list(query_vector)).text(query)
    else:
        q = tbl.search(query, query_type="hybrid")
    if columns is not None:
        # Lance adds the first-stage score anyway, and warns on every query when it is not asked for
        # (hybrid can ask for neither: LanceDB gives both legs one select; the CLI quiets that warning)
        score = {"fts": "_score", "vector": "_distance"}.get(mode)
        if score is not None and score not in columns:
            columns = [*columns, score]
        q = q.select(columns)
    if where is not None:
        q = q.where(where)  # prefilter: the candidates are the best rows that match, not a filtered top-N
    return q.limit(candidates)


def default_mode(tbl: Any, query_vector: Sequence[float] | None = None) -> Mode:
    """The first stage a table supports: "hybrid" with usable vectors (an embedding function recorded,
    or ``query_vector`` given) and a full-text index on ``text``; "vector" or "fts" with one of them."""
    meta = decode_metadata(tbl.schema.metadata)
    vectors = meta.get("vector_dim") is not None and (bool(meta.get("embedder")) or query_vector is not None)
    text_index = any(list(ix.columns) == ["text"] and "fts" in str(ix.index_type).lower()
                     for ix in tbl.list_indices())
    if vectors and text_index:
        return "hybrid"
    if vectors:
        return "vector"
    if text_index:
        return "fts"
    brought = meta.get("vector_dim") is not None
    raise ValueError(f"table {tbl.name!r} has no full-text index on 'text' and "
                     + ("holds brought vectors: pass " + option("query_vector=", "--query-vector") if brought
                        else "no vector column") + " (a build makes the full-text index unless --no-fts-index)")


def search(
    db_uri: str,
    table: str,
    query: str,
    *,
    model: KaLMModel | str | Path,
    k: int = 10,
    candidates: int = 100,
    mode: Mode | None = None,
    instruction: str | None = None,
    ratio: int | None = None,
    query_vector: Sequence[float] | None = None,
    where: str | None = None,
    fields: Sequence[str] = (),
    batch_size: int = 32,
    storage_options: dict[str, str] | None = None,
    device: str | None = None,
    dtype: str | None = None,
    on_stale: OnStale = "raise",
) -> list[dict[str, Any]]:
    """Search a kalm-store table and rerank the candidates with KaLM from their stored matrices.

    Parameters
    ----------
    db_uri : str
        LanceDB database URI.
    table : str
        Table name (a kalm-store passage store).
    query : str
        The query text (also the full-text query in "fts" and "hybrid" modes).
    model : KaLMModel or str or Path
        The model that built the table, or its hub id / folder (loaded after the arguments are checked).
    k : int, default 10
        Hits returned (fewer when the first stage finds fewer).
    candidates : int, default 100
        Rows the first stage hands to the reranker. In "hybrid" mode each leg (vector and FTS) fetches
        this many and the reranker scores their union (up to twice as many rows), as LanceDB's hybrid
        query does for every reranker.
    mode : {"vector", "fts", "hybrid"}, optional
        First stage. "fts" needs a full-text index on ``text``; "vector"/"hybrid" need the table's
        embedding function or ``query_vector``. Default ``None``: what the table supports, "hybrid"
        when it has both (see :func:`default_mode`).
    instruction : str, optional
        Task instruction; default ``None`` uses the model's default.
    ratio : int, optional
        Stored MEP ratio to score with; default ``None`` uses the smallest (most faithful) stored ratio.
    query_vector : sequence of float, optional
        Query embedding for tables with brought vectors.
    where : str, optional
        SQL filter on the table's columns (e.g. ``"url LIKE 'https://docs/%'"``), applied in the first
        stage before its limit; default ``None`` filters nothing.
    fields : sequence of str, default ()
        Other columns of the table to return in each hit (e.g. ones added with ``tbl.add_columns``).
    batch_size : int, default 32
        Candidates per decoder pass.
    storage_options : dict, optional
        Object-store options for ``lancedb.connect``.
    device : str, optional
        Device of a model loaded here from a hub id or folder; default ``None`` picks CUDA when available.
    dtype : {"float32", "bfloat16"}, optional
        Compute dtype of a model loaded here (any table scores in either: storage is float16); default
        ``None``: bfloat16 on CUDA, float32 on CPU. ``"auto"`` is resolved by :func:`kalm_store.dtypes.resolve_dtype`.
    on_stale : {"raise", "skip"}, default "raise"
        A candidate whose text changed after its matrices were stored: "raise" refuses the query
        (``StaleMatrixError``), "skip" leaves it out and names it in a ``StaleCandidatesWarning``.

    Returns
    -------
    list of dict
        ``{"rank": 1.., "id": ..., "score": P(yes), "text": ..., **fields}``, best first.

    Examples
    --------
    >>> from kalm_store import search
    >>> search("./db", "docs", "how do I parse json?", model="KaLM-Embedding/KaLM-Reranker-V1-Nano",
    ...        k=5, mode="fts")  # doctest: +SKIP
    [{'rank': 1, 'id': 'json.loads', 'score': 0.97, 'text': '...'}, ...]
    """
    check_search_args(query, k, candidates, mode, ratio, query_vector, where, fields)
    from .model import KaLMModel
    from .plugins.lancedb import KaLMReranker
    from .store import PassageStore

    tbl = PassageStore.open(db_uri, table, storage_options=storage_options).table  # before loading a model
    if mode is None:
        mode = default_mode(tbl, query_vector)
    if on_stale not in ("raise", "skip"):  # before loading a model (KaLMReranker checks it too)
        raise ValueError(f"on_stale must be one of ['raise', 'skip'], got {on_stale!r}")
    check_against_table(tbl, mode=mode, ratio=ratio, query_vector=query_vector, fields=fields, where=where)
    if not isinstance(model, KaLMModel):
        model = KaLMModel.from_pretrained(model, device=device, dtype=dtype)
    rr = KaLMReranker(model, table=tbl, ratio=ratio, instruction=instruction, batch_size=batch_size,
                      on_stale=on_stale)
    return run_search(tbl, rr, query, k=k, candidates=candidates, mode=mode, query_vector=query_vector,
                      where=where, fields=fields)


def run_search(tbl: Any, reranker: KaLMReranker, query: str, *, k: int = 10, candidates: int = 100,
               mode: Mode | None = None, query_vector: Sequence[float] | None = None, where: str | None = None,
               fields: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Like :func:`search` with an open table and a ready reranker (no re-loading between queries)."""
    check_search_args(query, k, candidates, mode, reranker.ratio, query_vector, where, fields)
    if mode is None:
        mode = default_mode(tbl, query_vector)
    fields = list(dict.fromkeys(fields))  # a column asked for twice is returned once
    check_fields(tbl, fields)
    extra = [f for f in fields if f not in ["text"] + reranker.columns]
    q = first_stage(tbl, query, mode=mode, candidates=candidates, query_vector=query_vector,
                    columns=["text"] + reranker.columns + extra, where=where)
    if mode == "vector":
        q = q.rerank(reranker, query_string=query)
    else:
        q = q.rerank(reranker)
    from ._quiet import no_weight_bars

    try:
        with no_weight_bars():  # the table's embedding function may load its model here, on the first query
            hits = q.to_arrow()
    except Exception as e:
        # Classified by the table, not by the message: Lance's messages carry Rust source paths
        # (".../index.crates.io-.../"), so "index" appears in a division by zero in `where` too.
        if mode != "vector" and _has_fts_index(tbl) is False:
            raise ValueError(f"mode={mode!r} needs a full-text index on 'text' of table {tbl.name!r}: create it "
                             f"with `kalm-store optimize --db URI --table {tbl.name}` ({type(e).__name__}: {e})") from e
        raise
    rows = hits.slice(0, k).to_pylist()
    return [{"rank": i + 1, "id": r["id"], "score": float(r["_relevance_score"]), "text": r["text"]}
            | {f: r[f] for f in fields} for i, r in enumerate(rows)]


def _has_fts_index(tbl: Any) -> bool | None:
    """Whether ``tbl`` has a full-text (inverted) index on ``text``; ``None`` when its indices cannot be listed
    (a damaged table: the caller's own error says more than a guess would)."""
    try:
        indices = tbl.list_indices()
    except Exception:  # noqa: BLE001 - only asked to explain another error, which is raised instead
        return None
    return any(str(ix.index_type).upper() in ("FTS", "INVERTED") and "text" in list(ix.columns) for ix in indices)


__all__ = ["search", "run_search", "first_stage", "check_against_table", "default_mode", "MODES", "Mode"]
