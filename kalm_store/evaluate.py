"""``kalm_store.evaluate(...)``: retrieval quality per MEP ratio on a BEIR-layout collection, end to end.

The pipeline, per judged query::

    corpus.jsonl --(title + text, as mteb joins them)--> kalm-store build (once, resumable) --> table
    query --first stage (vector | fts | hybrid, kalm_store.query.first_stage, top `candidates`)--> C rows
      --decode kalm_r{s} once--> for each requested r: the stored matrices, or (r a multiple of a stored
        s) the same ones re-pooled exactly as `kalm-store repool` does --> KaLMModel.score --> ranking
      (--joint-sample N: the same C passages re-encoded through the model's joint forward)
    rankings + qrels --pytrec_eval--> nDCG@10, MRR@10, Recall@10, Recall@100 per query and averaged

Every ratio reranks the very same candidate rows, so differences between rows of the table come from
the ratio alone. ``evaluate`` is also reachable as ``kalm_store.evaluate(...)``: this module is
made callable (see the end of the file), because the package attribute ``kalm_store.evaluate``
becomes this module as soon as it is imported.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import types
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .beir import Collection, iter_corpus, load_collection
from .eval_report import EvalReport, SystemResult, write_outputs
from .pooling import RATIOS, check_ratio, repool
from .query import MODES

if TYPE_CHECKING:  # pragma: no cover
    from .model import KaLMModel
    from .store import PassageStore

EvalMode = Literal["vector", "fts", "hybrid"]
DEFAULT_TABLE = "corpus"


def check_eval_args(ratios: object, mode: object, candidates: object, joint_sample: object, batch_size: object,
                    max_queries: object) -> list[int]:
    """Validate the arguments of :func:`evaluate` (before any file or model is opened); returns the ratios."""
    if isinstance(ratios, (str, bytes)) or not isinstance(ratios, Sequence) or not ratios:
        raise ValueError(f"ratios must be a non-empty list of {list(RATIOS)}, got {ratios!r}")
    rs = sorted({check_ratio(r, "ratios entry") for r in ratios})
    if mode is not None and mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)} or None (vector when the table has vectors, else "
                         f"fts), got {mode!r}")
    for name, value, low in (("candidates", candidates, 1), ("joint_sample", joint_sample, 0),
                             ("batch_size", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if max_queries is not None and (isinstance(max_queries, bool) or not isinstance(max_queries, int)
                                    or max_queries < 1):
        raise ValueError(f"max_queries must be a positive int or None, got {max_queries!r}")
    return rs


def sources(stored: Sequence[int], ratios: Sequence[int], what: str = "the table") -> dict[int, int]:
    """For each requested ratio, the stored ratio it is scored from: itself, or the finest stored ratio
    that divides it (re-pooled exactly, as ``kalm-store repool`` would; the finest source adds the least
    float16 rounding). A ratio no stored ratio divides cannot be derived: refused, naming the stored ratios."""
    out = {}
    for r in ratios:
        divisors = [s for s in stored if s <= r and r % s == 0]
        if not divisors:
            raise ValueError(f"{what} stores ratios {sorted(stored)}: r={r} cannot be derived from them (a finer "
                             "ratio can never be recovered from a coarser one); drop it from the ratios or evaluate "
                             f"a table built with `--ratio {r}` or finer")
        out[r] = r if r in stored else min(divisors)
    return out


# ---------------------------------------------------------------------------------------------- the store
def _write_passages(coll: Collection, folder: Path) -> Path:
    """The corpus as the builder's input: ``{"id", "text"}`` lines, text = title and text joined."""
    path = folder / "passages.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for _, pid, text in iter_corpus(coll.corpus_path):
            f.write(json.dumps({"id": pid, "text": text}, ensure_ascii=False) + "\n")
    return path


def ensure_store(coll: Collection, model: KaLMModel, *, db: str, table: str, ratios: Sequence[int],
                 embedder: str | None, embedder_model: str | None, work_dir: Path | None,
                 mode: EvalMode | None = None, embedder_device: str = "cpu", storage_options: dict[str, str] | None = None,
                 build_batch_size: int = 16, chunk_size: int = 1024,
                 progress: bool = False) -> tuple[PassageStore, str | None]:
    """Open the table, building it (or finishing an interrupted build) from ``corpus.jsonl`` first.

    A new table stores the finest requested ratio only (the others are derived from it at evaluation
    time) and the vectors of ``embedder`` when given. An existing table that lacks some corpus ids is
    resumed with its own ratios and embedder; a complete one is used as it is. Before anything is
    encoded, a table that cannot serve ``ratios`` or ``mode`` is refused. Returns the store and the
    builder's summary line (``None`` when nothing was built).
    """
    from .build import BuildOptions, build
    from .storage import connect
    from .store import PassageStore, StoreMismatchError, _table_names

    exists = table in _table_names(connect(db, storage_options))
    if exists:
        store = PassageStore.open(db, table, model=model, storage_options=storage_options)
        meta = store.metadata
        table_emb = meta.get("embedder")
        if embedder is not None:
            from .build import embedder_identity

            alias, emb_model = embedder_identity(embedder, embedder_model or "")  # type: ignore[arg-type]
            want = {"name": alias, "model": emb_model}
            if table_emb != want:
                raise StoreMismatchError(f"table {table!r} in {db} was embedded by {table_emb!r}, not {want!r}; "
                                         "drop --embedder to use the table's, or evaluate into another --table")
        sources(store.ratios, ratios, what=f"table {table!r}")
        _check_mode(mode, meta, table)
        missing = len(coll.corpus_ids - store.all_ids())
        if not missing:
            return store, None
        emb_name = table_emb.get("name") if table_emb else None
        emb_model = table_emb.get("model") if table_emb else None
        build_ratios = store.ratios
    else:
        _check_mode(mode, {"embedder": embedder}, table)
        emb_name, emb_model, build_ratios = embedder, embedder_model, [min(ratios)]
    folder = Path(tempfile.mkdtemp(prefix="kalm-eval-", dir=work_dir))
    try:
        options = BuildOptions(input=str(_write_passages(coll, folder)), db=db, table=table, model=model.name_or_path,
                               ratios=list(build_ratios), embedder=emb_name, embedder_model=emb_model,  # type: ignore[arg-type]
                               embedder_device=embedder_device,
                               batch_size=build_batch_size, chunk_size=chunk_size, max_length=model.max_length,
                               progress=progress, storage_options=storage_options)
        summary = build(options, model=model)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return PassageStore.open(db, table, model=model, storage_options=storage_options), summary.line()


def _precheck(db: str, table: str, ratios: Sequence[int], mode: EvalMode | None, embedder: str | None,
              storage_options: dict[str, str] | None) -> None:
    """What can be refused from the table's metadata alone: ratios it cannot give, modes it cannot run."""
    from .storage import connect
    from .store import PassageStore, _table_names

    if table in _table_names(connect(db, storage_options)):
        store = PassageStore.open(db, table, storage_options=storage_options)
        sources(store.ratios, ratios, what=f"table {table!r}")
        _check_mode(mode, store.metadata, table)
    else:
        _check_mode(mode, {"embedder": embedder}, table)


def _check_mode(mode: EvalMode | None, meta: dict[str, Any], table: str) -> None:
    """vector and hybrid first stages embed the query with the table's own embedding function."""
    if mode in (None, "fts") or meta.get("embedder"):
        return
    why = "holds brought vectors (eval embeds queries with the table's own function)" \
        if meta.get("vector_dim") else "has no vectors"
    raise ValueError(f"mode={mode!r} needs a table with an embedding function, and table {table!r} {why}; "
                     "build one with --embedder, or use mode='fts'")


def _bytes_per_passage(store: PassageStore, ratios: Sequence[int]) -> dict[int, dict[str, float | None]]:
    """Per ratio: bare float16 bytes per passage (exact, from ``n_tokens``) and, for stored ratios, the
    column's on-disk bytes per passage (Lance's statistics, as ``kalm-store info`` reports them)."""
    from . import schema
    from .store import _bytes_on_disk

    ds = store.table.to_lance()
    counts = ds.to_table(columns=["n_tokens"]).column(0).to_numpy().astype(np.int64)
    rows = max(int(counts.size), 1)
    on_disk = _bytes_on_disk(ds)
    out: dict[int, dict[str, float | None]] = {}
    for r in ratios:
        raw = float((-(-counts // r)).sum()) * store.dim * 2 / rows
        col = schema.column_name(r)
        stored = on_disk[col] / rows if r in store.ratios and col in on_disk else None
        out[r] = {"raw_float16": raw, "stored": stored}
    return out


# ---------------------------------------------------------------------------------------------- evaluate
def _first_stage(tbl: Any, text: str, mode: EvalMode, candidates: int, columns: list[str]) -> Any:
    from .query import first_stage

    try:
        return first_stage(tbl, text, mode=mode, candidates=candidates, columns=columns).to_arrow()
    except Exception as e:  # LanceDB reports a missing FTS index in several exception classes
        if mode != "vector" and "index" in str(e).lower():
            raise ValueError(f"mode={mode!r} needs a full-text index on 'text' of table {tbl.name!r} (`kalm-store "
                             f"build` creates it): {type(e).__name__}: {e}") from e
        raise


def evaluate(
    data_dir: str | Path,
    *,
    model: KaLMModel | str | Path,
    db: str | None = None,
    table: str = DEFAULT_TABLE,
    split: str = "test",
    mode: EvalMode | None = None,
    candidates: int = 100,
    ratios: Sequence[int] = (4,),
    embedder: str | None = None,
    embedder_model: str | None = None,
    embedder_device: str = "cpu",
    instruction: str | None = None,
    joint_sample: int = 0,
    out: str | Path | None = None,
    max_queries: int | None = None,
    batch_size: int = 32,
    build_batch_size: int = 16,
    device: str | None = None,
    storage_options: dict[str, str] | None = None,
    plot: bool = True,
    progress: bool = False,
) -> EvalReport:
    """Evaluate first stage and KaLM reranking at each ratio on a BEIR-layout collection.

    Parameters
    ----------
    data_dir : str or Path
        Folder with ``corpus.jsonl``, ``queries.jsonl`` and ``qrels/{split}.tsv``.
    model : KaLMModel or str or Path
        The model (or its hub id / folder, loaded after the collection is checked).
    db : str, optional
        LanceDB URI of the store; default ``None`` uses ``{out}/db`` (a temporary folder without ``out``).
    table : str, default "corpus"
        Table name; built from ``corpus.jsonl`` when missing (or incomplete), reused otherwise.
    split : str, default "test"
        The qrels file ``qrels/{split}.tsv``.
    mode : {"vector", "fts", "hybrid"}, optional
        First stage; default ``None`` is "vector" when the table has an embedding function, else "fts"
        (BM25 on LanceDB's full-text index). "hybrid" is LanceDB's RRF fusion of both, cut at
        ``candidates``.
    candidates : int, default 100
        First-stage rows reranked per query (the paper's protocol: 100).
    ratios : list of int, default (4,)
        Ratios to rerank at. A new table stores the finest; coarser ones are derived from the finest
        stored divisor, exactly (up to float16 rounding) as ``kalm-store repool`` derives them.
    embedder, embedder_model : str, optional
        LanceDB embedding function for a new table (``"sentence-transformers"`` and a model name or
        folder), as ``kalm-store build --embedder``; default ``None`` builds a text-only (FTS) store.
    embedder_device : str, default "cpu"
        Device of the embedding function of a new table (recorded in it: queries are embedded there too).
    instruction : str, optional
        Task instruction for every query; default ``None`` uses a query's own ``instruction`` field in
        ``queries.jsonl`` when present, else the model's default.
    joint_sample : int, default 0
        Also score the first N judged queries' candidates with the model's own joint forward (passages
        re-encoded, no pooling), and compare every ratio with it on those queries.
    out : str or Path, optional
        Folder for ``per_query.tsv``, ``runs/*.trec``, ``report.json`` and ``eval.png``; default
        ``None`` writes nothing.
    max_queries : int, optional
        Evaluate only the first N judged queries (file order); default ``None``: all.
    batch_size : int, default 32
        Candidates per decoder pass.
    build_batch_size : int, default 16
        Passages per encoder pass when building.
    device : str, optional
        Device of a model loaded here; default ``None`` picks CUDA when available.
    storage_options : dict, optional
        Object-store options for ``db``.
    plot : bool, default True
        Write ``eval.png`` into ``out`` (needs matplotlib, ``kalm-store[plot]``).
    progress : bool, default False
        Show progress bars.

    Returns
    -------
    EvalReport
        ``.to_json()`` is the ``{"first_stage": {...}, "r4": {...}}`` object ``kalm-store eval --json`` prints.

    Examples
    --------
    >>> import kalm_store
    >>> rep = kalm_store.evaluate("scifact", model="KaLM-Embedding/KaLM-Reranker-V1-Nano", ratios=[1, 4, 8],
    ...                           embedder="sentence-transformers", embedder_model="all-MiniLM-L6-v2")  # doctest: +SKIP
    >>> rep.to_json()["r4"]["ndcg@10"]  # doctest: +SKIP
    0.71
    """
    from ._deps import require

    rs = check_eval_args(ratios, mode, candidates, joint_sample, batch_size, max_queries)
    if instruction is not None and not isinstance(instruction, str):
        raise TypeError(f"instruction must be a str or None, got {type(instruction).__name__}")
    if (embedder is None) != (embedder_model is None):
        raise ValueError("give embedder and embedder_model together (e.g. 'sentence-transformers', 'all-MiniLM-L6-v2')")
    require("pytrec_eval", "eval")  # fail now, not after the store is built
    if plot and out is not None:
        require("matplotlib", "plot")
    coll = load_collection(data_dir, split)
    qids = list(coll.queries)[:max_queries]

    from . import schema
    from .fidelity import kendall_tau, top_k_overlap
    from .joint import joint_scores
    from .metrics import mean, per_query
    from .model import KaLMModel
    from .store import decode_rows

    out_dir = Path(out) if out is not None else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    scratch = None
    if db is None:
        if out_dir is None:
            scratch = Path(tempfile.mkdtemp(prefix="kalm-eval-db-"))
            db = str(scratch)
        else:
            db = str(out_dir / "db")
    try:
        _precheck(db, table, rs, mode, embedder, storage_options)  # before a model is loaded
        if not isinstance(model, KaLMModel):
            model = KaLMModel.from_pretrained(model, device=device)
        store, built = ensure_store(coll, model, db=db, table=table, ratios=rs, embedder=embedder,
                                    embedder_model=embedder_model, work_dir=out_dir, mode=mode,
                                    embedder_device=embedder_device,
                                    storage_options=storage_options, build_batch_size=build_batch_size,
                                    progress=progress)
        source = sources(store.ratios, rs, what=f"table {table!r}")
        meta = store.metadata
        used_mode: EvalMode = mode or ("vector" if meta.get("embedder") else "fts")  # type: ignore[assignment]
        _check_mode(used_mode, meta, table)
        tbl = store.table
        digests = schema.DIGEST_COLUMN in tbl.schema.names
        stored_needed = sorted(set(source.values()))
        columns = ["id", "n_tokens", "text"] + ([schema.DIGEST_COLUMN] if digests else []) + \
                  [schema.column_name(s) for s in stored_needed]
        sample = set(qids[:joint_sample])
        systems = ["first_stage"] + [f"r{r}" for r in rs]
        rankings: dict[str, dict[str, list[str]]] = {s: {} for s in systems + (["joint"] if sample else [])}
        scores: dict[str, dict[str, np.ndarray]] = {s: {} for s in systems[1:] + (["joint"] if sample else [])}
        iterator: Any = qids
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(qids, desc="eval", unit="query")
        for qid in iterator:
            text = coll.queries[qid]
            instr = instruction if instruction is not None else coll.instructions.get(qid)
            hits = _first_stage(tbl, text, used_mode, candidates, columns)
            ids = hits.column("id").to_pylist()
            rankings["first_stage"][qid] = ids
            if not ids:  # nothing retrieved: every system scores 0 on this query
                for name in rankings:
                    if name != "first_stage":
                        rankings[name][qid] = []
                continue
            counts = hits.column("n_tokens").to_pylist()
            decoded = {s: decode_rows(hits, s, store.dim, meta.get("max_length")) for s in stored_needed}
            for r in rs:
                src = source[r]
                mats = decoded[src] if src == r else [repool(m, n, src, r) for m, n in zip(decoded[src], counts)]
                with warnings.catch_warnings():  # decoded matrices are read-only views; the model only reads them
                    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                    sc = model.score(text, mats, instr, batch_size=batch_size)
                scores[f"r{r}"][qid] = sc
                rankings[f"r{r}"][qid] = [ids[i] for i in np.argsort(-sc, kind="stable")]  # ties: first-stage order
            if qid in sample:
                sc = joint_scores(model, text, hits.column("text").to_pylist(), instr)
                scores["joint"][qid] = sc
                rankings["joint"][qid] = [ids[i] for i in np.argsort(-sc, kind="stable")]
        results = {}
        for name in rankings:
            pq = per_query({q: coll.qrels[q] for q in qids}, rankings[name])
            over = [q for q in qids if q in sample] if name == "joint" else qids
            results[name] = SystemResult(name=name, mean=mean(pq, over), per_query={q: pq[q] for q in over},
                                         rankings=rankings[name])
        fidelity = None
        if sample:
            ordered = [q for q in qids if q in sample]
            fidelity = {"queries": len(ordered), "joint": mean(results["joint"].per_query, ordered),
                        "first_stage": mean(results["first_stage"].per_query, ordered)}
            for r in rs:
                key = f"r{r}"
                pairs = [(scores[key][q], scores["joint"][q]) for q in ordered if q in scores["joint"]]
                fidelity[key] = mean(results[key].per_query, ordered) | {
                    "mean_abs_dp": float(np.mean(np.concatenate([np.abs(a - b) for a, b in pairs]))) if pairs else None,
                    "kendall_tau": _nanmean([kendall_tau(a, b) for a, b in pairs]),
                    "top10_overlap": _nanmean([top_k_overlap(a, b) for a, b in pairs]),
                }
        report = EvalReport(
            data_dir=str(coll.root), split=split, db=db if scratch is None else None, table=table, mode=used_mode,
            candidates=candidates, ratios=rs, sources=source, stored_ratios=store.ratios, model=model.name_or_path,
            instruction=instruction, queries=len(qids), skipped_unjudged=coll.skipped_unjudged,
            no_relevant=sum(1 for q in qids if not any(g > 0 for g in coll.qrels[q].values())), not_evaluated=len(coll.queries) - len(qids),
            warnings=coll.warnings.lines() + _extra_rows(store, coll), built=built,
            bytes_per_passage=_bytes_per_passage(store, rs), systems=results, joint_sample=fidelity,
            scores=scores, qrels={q: coll.qrels[q] for q in qids},
        )
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    if out_dir is not None:
        write_outputs(report, out_dir, plot=plot)
    return report


def _extra_rows(store: PassageStore, coll: Collection) -> list[str]:
    """A warning when the table holds passages the corpus does not (they can be retrieved, never relevant)."""
    extra = len(store.all_ids() - coll.corpus_ids)
    return [f"{extra} table rows have ids not in {coll.corpus_path} (retrievable, judged non-relevant)"] if extra else []


def _nanmean(values: Sequence[float]) -> float | None:
    arr = np.asarray(values, np.float64)
    arr = arr[~np.isnan(arr)]
    return float(arr.mean()) if arr.size else None


__all__ = ["evaluate", "ensure_store", "sources", "check_eval_args", "EvalReport", "SystemResult", "DEFAULT_TABLE"]


class _CallableModule(types.ModuleType):
    """``kalm_store.evaluate(...)`` calls :func:`evaluate` whether the package attribute is this module
    (after ``import kalm_store.evaluate``) or the function (the package's lazy attribute)."""

    def __call__(self, *args: Any, **kwargs: Any) -> EvalReport:
        return evaluate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
