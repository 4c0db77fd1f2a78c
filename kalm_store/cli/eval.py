"""``kalm-store eval DATA_DIR --model M``: nDCG@10, MRR@10, Recall@10/100 of first stage and of KaLM per r."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

MODES = ("vector", "fts", "hybrid")  # kalm_store.query.MODES (not imported: keeps --help cheap)
EMBEDDERS = ("sentence-transformers",)  # kalm_store.build.EMBEDDERS


@dataclass(frozen=True)
class EvalOptions:
    """Parsed and validated ``eval`` flags."""

    data_dir: Path
    model: str
    db: str | None
    table: str
    split: str
    mode: str | None
    candidates: int
    ratios: list[int]
    embedder: str | None
    embedder_model: str | None
    embedder_device: str
    instruction: str | None
    joint_sample: int
    out: Path
    max_queries: int | None
    batch_size: int
    build_batch_size: int
    device: str | None
    json: bool
    plot: bool


def register(sub: argparse._SubParsersAction, name: str) -> None:
    p = sub.add_parser(
        name,
        help="evaluate retrieval quality per ratio on a BEIR-format collection (nDCG@10, MRR@10, Recall@10/100)",
        description="Build a store from DATA_DIR/corpus.jsonl (once: resumable, reused afterwards; title and text "
                    "joined as mteb does for KaLM), run the first stage for every judged query of "
                    "DATA_DIR/queries.jsonl, rerank the same candidates with KaLM at each --ratios entry (coarser "
                    "ratios derived exactly from a finer stored one, as `repool` does), and report nDCG@10, MRR@10, "
                    "Recall@10 and Recall@100 (pytrec_eval, every judged query counted, 0 when nothing is "
                    "retrieved) for the first stage and for each r. Writes per_query.tsv, runs/*.trec, "
                    "report.json and eval.png into --out.",
    )
    p.add_argument("data_dir", type=Path, metavar="DATA_DIR",
                   help="BEIR folder: corpus.jsonl {_id, title, text}, queries.jsonl {_id, text[, instruction]}, "
                        "qrels/SPLIT.tsv with a header (query-id, corpus-id, score)")
    p.add_argument("--model", required=True, help="hub id or folder of the KaLM checkpoint")
    p.add_argument("--db", help="LanceDB URI of the store (default: OUT/db); reused when it holds --table")
    p.add_argument("--table", default="corpus", help="table name (default: corpus)")
    p.add_argument("--split", default="test", help="qrels/SPLIT.tsv to evaluate (default: test)")
    p.add_argument("--mode", choices=MODES, default=None,
                   help="first stage (default: vector when the table has an embedding function, else fts: BM25 "
                        "on LanceDB's full-text index; hybrid: LanceDB's RRF fusion of both, cut at --candidates)")
    p.add_argument("--candidates", type=int, default=100, help="first-stage passages reranked per query (default: 100)")
    from kalm_store.cli._args import add_ratios_argument

    add_ratios_argument(p, "MEP ratios to rerank at, e.g. --ratios 1,4,8 or --ratio 1 --ratio 4 (default: 4); a new "
                           "table stores the finest, the others are derived from it")
    p.add_argument("--embedder", choices=EMBEDDERS, default=None,
                   help="embedding function computing the vectors of a new table (with --embedder-model); default: "
                        "none, a text-only store searched with fts")
    p.add_argument("--embedder-model", default=None, help="model name or folder of --embedder, e.g. all-MiniLM-L6-v2")
    p.add_argument("--embedder-device", default="cpu",
                   help="device of --embedder, recorded in a new table: queries are embedded there too (default: cpu)")
    p.add_argument("--instruction", default=None,
                   help="task instruction for every query (default: a query's own 'instruction' field, else the "
                        "model's default)")
    p.add_argument("--joint-sample", type=int, default=0, metavar="N",
                   help="also score the first N queries with the model's joint forward (passages re-encoded, "
                        "unpooled) and show how far each r is from it (default: 0)")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for per_query.tsv, runs/, report.json, eval.png (default: ./kalm-eval-<DATA_DIR name>)")
    p.add_argument("--max-queries", type=int, default=None, help="evaluate only the first N judged queries")
    p.add_argument("--batch-size", type=int, default=32, help="candidates per decoder pass (default: 32)")
    p.add_argument("--build-batch-size", type=int, default=16, help="passages per encoder pass when building (default: 16)")
    p.add_argument("--device", help="cpu, cuda, cuda:1... (default: CUDA when available)")
    p.add_argument("--no-plot", dest="plot", action="store_false", help="do not write eval.png")
    p.add_argument("--json", action="store_true",
                   help='print one JSON object: {"first_stage": {"ndcg@10": ..., "mrr@10": ..., "recall@10": ..., '
                        '"recall@100": ...}, "r4": {...}, ...}')
    from kalm_store.storage import add_storage_arguments  # --storage-option KEY=VALUE for --db s3://...

    add_storage_arguments(p)
    p.set_defaults(run=run)


def parse_options(args: argparse.Namespace) -> EvalOptions:
    """Validate every flag before any file or model is opened."""
    from kalm_store.evaluate import check_eval_args

    ratios = args.ratios or [4]
    ratios = check_eval_args(ratios, args.mode, args.candidates, args.joint_sample, args.batch_size, args.max_queries)
    if args.build_batch_size < 1:
        raise ValueError(f"--build-batch-size must be >= 1, got {args.build_batch_size}")
    if (args.embedder is None) != (args.embedder_model is None):
        raise ValueError("--embedder and --embedder-model go together (e.g. --embedder sentence-transformers "
                         "--embedder-model all-MiniLM-L6-v2)")
    out = args.out if args.out is not None else Path(f"kalm-eval-{args.data_dir.resolve().name}")
    return EvalOptions(data_dir=args.data_dir, model=args.model, db=args.db, table=args.table, split=args.split,
                       mode=args.mode, candidates=args.candidates, ratios=ratios, embedder=args.embedder,
                       embedder_model=args.embedder_model, embedder_device=args.embedder_device,
                       instruction=args.instruction, joint_sample=args.joint_sample,
                       out=out, max_queries=args.max_queries, batch_size=args.batch_size,
                       build_batch_size=args.build_batch_size, device=args.device, json=args.json, plot=args.plot)


def run(args: argparse.Namespace) -> int:
    opts = parse_options(args)
    from kalm_store.eval_report import format_table
    from kalm_store.evaluate import evaluate
    from kalm_store.storage import storage_options

    db = opts.db
    rep = evaluate(opts.data_dir, model=opts.model, db=db, table=opts.table, split=opts.split,
                   mode=opts.mode, candidates=opts.candidates, ratios=opts.ratios,  # type: ignore[arg-type]
                   embedder=opts.embedder, embedder_model=opts.embedder_model,
                   embedder_device=opts.embedder_device, instruction=opts.instruction,
                   joint_sample=opts.joint_sample, out=opts.out, max_queries=opts.max_queries,
                   batch_size=opts.batch_size, build_batch_size=opts.build_batch_size, device=opts.device,
                   storage_options=storage_options(db, args.storage_option) if db else None, plot=opts.plot,
                   progress=sys.stderr.isatty() and not opts.json)
    if opts.json:
        print(json.dumps(rep.to_json(), indent=2))
    else:
        print(format_table(rep))
        print(f"per-query results, runs, report and plot in {opts.out}")
    return 0
