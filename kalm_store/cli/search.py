"""``kalm-store search``: first stage in LanceDB, rerank with KaLM from the stored matrices, print hits."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from typing import Any

MODES = ("vector", "fts", "hybrid")  # kalm_store.query.MODES (not imported: keeps --help cheap)


def register(sub: argparse._SubParsersAction, name: str) -> None:
    p = sub.add_parser(
        name,
        help="search a kalm-store table and rerank the candidates with KaLM",
        description="Run a vector, full-text or hybrid LanceDB search for QUERY, rerank its candidates with "
                    "KaLM-Reranker-V1 from their stored pooled matrices (no passage is re-encoded) and print "
                    "the best K.",
    )
    p.add_argument("query", help="the query text")
    p.add_argument("--db", required=True, help="LanceDB database URI (folder, s3://...) (required)")
    p.add_argument("--table", required=True, help="table name (required)")
    p.add_argument("--model", required=True, help="hub id or folder of the model that built the table (required)")
    p.add_argument("-k", type=int, default=10, help="hits to print (default: 10)")
    p.add_argument("--candidates", type=int, default=100,
                   help="first-stage rows to rerank; in hybrid mode each leg (vector, FTS) fetches this many and "
                        "their union, up to twice as many, is reranked (default: 100)")
    p.add_argument("--mode", choices=MODES, default=None,
                   help="first stage (default: what the table supports: hybrid when it has vectors (an embedder, "
                        "or --query-vector) and a full-text index, else vector or fts)")
    p.add_argument("--instruction", default=None, help="task instruction (default: the model's)")
    p.add_argument("--ratio", type=int, default=None,
                   help="stored MEP ratio to score with (default: the smallest the table stores)")
    p.add_argument("--query-vector", default=None,
                   help="query embedding as comma-separated floats, for tables with brought vectors")
    p.add_argument("--where", default=None, metavar="SQL",
                   help="filter on the table's columns before the first stage's limit, e.g. "
                        "\"url LIKE 'https://docs/%%'\" (default: none)")
    p.add_argument("--field", action="append", dest="fields", default=[], metavar="COLUMN",
                   help="another column of the table to print with each hit; repeat for several (default: none)")
    p.add_argument("--batch-size", type=int, default=32, help="candidates per decoder pass (default: 32)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1... (default: CUDA when available)")
    p.add_argument("--skip-stale", action="store_true",
                   help="leave out candidates whose text was changed after their matrices were stored (a LanceDB "
                        "update that bypassed kalm-store), naming them in a warning on stderr (default: refuse "
                        "the query, naming them)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    from kalm_store.dtypes import add_dtype_argument

    add_dtype_argument(p, "decoder")  # any table scores in either: storage is float16
    from kalm_store.storage import add_storage_arguments  # --storage-option KEY=VALUE for --db s3://...

    add_storage_arguments(p)
    p.set_defaults(run=run)


def _parse_vector(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--query-vector must be comma-separated floats, got {text!r:.80}") from None


def format_hits(query: str, hits: list[dict[str, Any]], width: int = 100) -> str:
    """Readable ranked output: rank, score, id, a one-line text snippet."""
    lines = [f"query: {query}", f"{'rank':>4}  {'score':>8}  {'id':<28}  text"]
    for h in hits:
        snippet = " ".join(str(h["text"]).split())
        snippet = snippet if len(snippet) <= width else snippet[: width - 3] + "..."
        extra = "".join(f"[{k}={v}] " for k, v in h.items() if k not in ("rank", "score", "id", "text"))
        lines.append(f"{h['rank']:>4}  {h['score']:>8.4f}  {str(h['id']):<28.28}  {extra}{snippet}")
    if not hits:
        lines.append("  (no results)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from kalm_store.query import check_search_args

    vector = _parse_vector(args.query_vector)
    check_search_args(args.query, args.k, args.candidates, args.mode, args.ratio, vector, args.where,
                      args.fields)  # before any loading
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be a positive int, got {args.batch_size}")

    from kalm_store.dtypes import resolve_dtype
    from kalm_store.query import search
    from kalm_store.storage import options_from_args

    from kalm_store.plugins.lancedb import StaleCandidatesWarning

    # search() opens the table before it loads the model: a wrong --db/--table fails in a second
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", StaleCandidatesWarning)
        hits = search(args.db, args.table, args.query, model=args.model, device=args.device, k=args.k,
                      candidates=args.candidates, mode=args.mode, instruction=args.instruction, ratio=args.ratio,
                      query_vector=vector, where=args.where, fields=args.fields, batch_size=args.batch_size,
                      storage_options=options_from_args(args), on_stale="skip" if args.skip_stale else "raise",
                      dtype=resolve_dtype(args.dtype, args.device))
    for w in caught:  # one plain line each, not Python's file:line warning format
        if issubclass(w.category, StaleCandidatesWarning):
            print(f"kalm-store search: warning: {w.message}", file=sys.stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    if args.json:
        json.dump({"query": args.query, "results": hits}, sys.stdout, ensure_ascii=False)
        sys.stdout.write("\n")
    else:
        print(format_hits(args.query, hits))
    return 0
