"""``kalm-store plan INPUT --model M``: bytes and measured fidelity per MEP ratio, and a recommendation."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from kalm_store.cli._args import add_ratios_argument
from kalm_store.pooling import RATIOS


@dataclass(frozen=True)
class PlanOptions:
    """Parsed and validated ``plan`` flags."""

    input: str | None
    db: str | None
    table: str | None
    model: str | None
    budget: int | None
    passages: int | None
    sample: int
    ratios: list[int]
    queries: Path | None
    qrels: Path | None
    max_queries: int
    json: bool
    plot: Path | None
    max_length: int | None
    batch_size: int
    device: str | None
    seed: int
    id_field: str
    text_field: str
    format: str


def register(sub: argparse._SubParsersAction, name: str) -> None:
    p = sub.add_parser(
        name,
        help="plan storage: bytes and measured fidelity per MEP ratio, and the ratio to pick",
        description="Token-length statistics from the tokenizer alone, then for each ratio r: pooled rows per "
                    "passage, bytes per passage (raw float16 and stored, zstd measured on an encoded sample), "
                    "the column's total for the corpus (what `kalm-store info` will report after a build) and "
                    "for --passages N, the bytes fetched per 100-candidate query; with --queries, fidelity "
                    "against r=1 measured on a sample of your passages (with --qrels also nDCG@10 and "
                    "ROC-AUC). Recommends the finest ratio that fits --budget (r=4 without a budget).",
    )
    p.add_argument("input", nargs="?", help="corpus file (.jsonl, .parquet, .csv) with id and text fields; "
                                            "or use --db/--table for an existing store")
    p.add_argument("--db", help="LanceDB URI of an existing store (instead of INPUT)")
    p.add_argument("--table", help="table name of the existing store (with --db)")
    p.add_argument("--model", help="hub id or folder of the KaLM checkpoint (default with --db: the one that "
                                   "built the table)")
    p.add_argument("--budget", help="storage budget for the kalm_r* column, e.g. 50GB, 500MiB, 1.5TB, or bytes")
    p.add_argument("--passages", type=int, help="also cost N passages of the same length distribution")
    p.add_argument("--sample", type=int, default=64,
                   help="passages to encode for the compression (and fidelity) measurement; 0: raw float16 "
                        "sizes, no encoder run (default: 64)")
    add_ratios_argument(p, "ratios to cost: a comma list (--ratios 1,4), or repeated (--ratio 1 --ratio 4) "
                           "(default: 1,2,4,8,16,32)")
    p.add_argument("--queries", type=Path, help="queries .jsonl, one {\"id\": ..., \"text\": ...} per line (\"query\" "
                                                "for \"text\" and no id also work): measure fidelity per ratio")
    p.add_argument("--qrels", type=Path,
                   help="relevance judgements, adds nDCG@10 and ROC-AUC per ratio: .jsonl lines {\"query_id\", "
                        "\"passage_id\" (or \"corpus_id\"), \"relevance\" (or \"score\")}; or a .tsv of query id, "
                        "passage id, relevance (BEIR's qrels/test.tsv, its header line skipped); or TREC qrels "
                        "lines 'qid 0 pid rel'")
    p.add_argument("--max-queries", type=int, default=50, help="queries scored at most (default: 50)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--plot", type=Path, help="write a PNG of bytes and fidelity against r (needs kalm-store[plot])")
    p.add_argument("--max-length", type=int, help="encoder truncation in tokens (default: 1024, or the table's)")
    p.add_argument("--batch-size", type=int, default=16, help="passages per encoder pass (default: 16)")
    p.add_argument("--device", help="cpu, cuda, cuda:1... (default: CUDA when available)")
    from kalm_store.dtypes import add_dtype_argument

    add_dtype_argument(p, "encoder and decoder")
    p.add_argument("--compare-dtypes", action="store_true",
                   help="with --queries: also measure bfloat16 against float32 on the sample at the recommended "
                        "ratio (max and mean |dP|, Kendall tau, top-10 overlap; loads the model twice)")
    p.add_argument("--seed", type=int, default=0, help="seed of the passage sample (default: 0)")
    p.add_argument("--id-field", default="id", help="input field holding the passage id (default: id)")
    p.add_argument("--text-field", default="text", help="input field holding the passage text (default: text)")
    p.add_argument("--format", default="auto", choices=["auto", "jsonl", "parquet", "csv"],
                   help="input format (default: from the suffix)")
    from kalm_store.storage import add_storage_arguments  # --storage-option KEY=VALUE for --db s3://...

    add_storage_arguments(p)
    p.set_defaults(run=run)


def parse_options(args: argparse.Namespace) -> PlanOptions:
    """Validate every flag before any file or model is opened."""
    from kalm_store.plan import parse_size
    from kalm_store.pooling import check_ratio

    if (args.input is None) == (args.db is None):
        raise ValueError("give either INPUT (a corpus file) or --db URI --table NAME (an existing store)")
    if args.db is not None and not args.table:
        raise ValueError("--db needs --table NAME")
    if args.input is not None and args.model is None:
        raise ValueError("--model is required with INPUT (hub id or folder of the KaLM checkpoint)")
    given = list(RATIOS) if args.ratios is None else args.ratios
    try:
        ratios = sorted({check_ratio(r, "--ratios entry") for r in given})
    except ValueError as e:
        raise ValueError(f"--ratios must be a comma list of {list(RATIOS)}, got {','.join(map(str, given))} ({e})") from None
    if not ratios:
        raise ValueError(f"--ratios is empty; give some of {list(RATIOS)}")
    if args.sample < 0:
        raise ValueError(f"--sample must be >= 0, got {args.sample}")
    if args.passages is not None and args.passages < 1:
        raise ValueError(f"--passages must be a positive number of passages, got {args.passages}")
    if args.queries is not None:
        if args.sample == 0:
            raise ValueError("--queries needs encoded passages to score: give --sample > 0")
        if 1 not in ratios:
            raise ValueError("--queries measures fidelity against r=1: keep 1 in --ratios")
        if not args.queries.is_file():
            raise ValueError(f"--queries {args.queries} is not a file")
    if args.compare_dtypes and args.queries is None:
        raise ValueError("--compare-dtypes needs --queries (the queries to score in both dtypes)")
    if args.qrels is not None:
        if args.queries is None:
            raise ValueError("--qrels needs --queries")
        if not args.qrels.is_file():
            raise ValueError(f"--qrels {args.qrels} is not a file")
    if args.max_queries < 1:
        raise ValueError(f"--max-queries must be >= 1, got {args.max_queries}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_length is not None and args.max_length < 1:
        raise ValueError(f"--max-length must be >= 1, got {args.max_length}")
    if args.plot is not None:
        if args.plot.suffix.lower() != ".png":
            raise ValueError(f"--plot writes a PNG: give a file name ending in .png, got {args.plot}")
        from kalm_store._deps import require

        require("matplotlib", "plot")  # fail now, not after the encoder ran
    return PlanOptions(
        input=args.input, db=args.db, table=args.table, model=args.model,
        budget=None if args.budget is None else parse_size(args.budget), passages=args.passages,
        sample=args.sample, ratios=ratios, queries=args.queries, qrels=args.qrels, max_queries=args.max_queries,
        json=args.json, plot=args.plot, max_length=args.max_length, batch_size=args.batch_size, device=args.device,
        seed=args.seed, id_field=args.id_field, text_field=args.text_field, format=args.format,
    )


def _read_corpus(opts: PlanOptions) -> tuple[list[str], list[str]]:
    """Ids and texts of the input file, first occurrence of an id wins (as `kalm-store build` stores)."""
    from kalm_store.records import Fields, read_records, validate_record

    fields = Fields(id=opts.id_field, text=opts.text_field, keep=())  # other fields: not read at all
    ids, texts, seen = [], [], set()
    assert opts.input is not None
    for where, raw in read_records(opts.input, opts.format, fields=fields):  # type: ignore[arg-type]
        rec = validate_record(raw, where, fields=fields)
        if rec.id in seen:
            continue
        seen.add(rec.id)
        ids.append(rec.id)
        texts.append(rec.text)
    if not ids:
        raise ValueError(f"{opts.input} holds no records")
    return ids, texts


def run(args: argparse.Namespace) -> int:
    opts = parse_options(args)
    import numpy as np

    from kalm_store import KaLMModel
    from kalm_store.fidelity import load_qrels, load_queries
    from kalm_store.plan import format_plan, make_plan, plot_plan, sample_positions, token_counts

    queries = load_queries(opts.queries)[: opts.max_queries] if opts.queries is not None else None
    qrels = load_qrels(opts.qrels) if opts.qrels is not None else None
    progress = sys.stderr.isatty() and not opts.json
    store = None
    model_name = opts.model
    max_length = opts.max_length
    if opts.db is not None:
        from kalm_store.storage import storage_options
        from kalm_store.store import PassageStore

        store = PassageStore.open(opts.db, opts.table,  # type: ignore[arg-type]
                                  storage_options=storage_options(opts.db, args.storage_option))
        meta = store.metadata
        model_name = model_name or meta.get("model_id")
        max_length = max_length or meta.get("max_length")
    else:  # the whole input is read and checked before the model loads: a bad file costs a second
        ids, texts = _read_corpus(opts)
    kwargs = {} if max_length is None else {"max_length": int(max_length)}
    from kalm_store.dtypes import resolve_dtype, torch_dtype

    model = KaLMModel.from_pretrained(model_name, device=opts.device,  # type: ignore[arg-type]
                                      dtype=resolve_dtype(args.dtype, opts.device), **kwargs)

    if store is not None:
        from kalm_store.store import check_compatible

        check_compatible(store.metadata, model, what=f"table {opts.table!r}")
        ds = store.table.to_lance()
        meta_rows = ds.to_table(columns=["id", "n_tokens"])
        ids = meta_rows.column("id").to_pylist()
        counts = meta_rows.column("n_tokens").to_numpy().astype(np.int64)
        texts = None
    else:
        counts = token_counts(model, texts, show_progress=progress)

    must: list[int] = []
    if qrels is not None and queries is not None:  # judged passages of the scored queries join the sample
        pos = {pid: i for i, pid in enumerate(ids)}
        must = [pos[p] for q in queries for p in qrels.get(q.id, {}) if p in pos]
    index = sample_positions(len(ids), opts.sample, seed=opts.seed, must=must) if opts.sample else []
    if texts is not None:
        sample_texts = [texts[i] for i in index]
    elif index:
        sample_texts = ds.take(index, columns=["text"]).column("text").to_pylist()
    else:
        sample_texts = []
    plan = make_plan(model, counts, sample_texts=sample_texts, sample_index=index,
                     sample_ids=[ids[i] for i in index], ratios=opts.ratios, budget=opts.budget,
                     passages=opts.passages, queries=queries, qrels=qrels, batch_size=opts.batch_size,
                     show_progress=progress)
    dtype_rows = None
    if args.compare_dtypes:  # queries and a sample are guaranteed by parse_options
        from kalm_store.dtype_fidelity import compare_dtypes

        load = {"device": opts.device, **kwargs}
        f32 = model if model.dtype == torch_dtype("float32") else KaLMModel.from_pretrained(
            model_name, dtype="float32", **load)  # type: ignore[arg-type]
        bf16 = model if model.dtype == torch_dtype("bfloat16") else KaLMModel.from_pretrained(
            model_name, dtype="bfloat16", **load)  # type: ignore[arg-type]
        dtype_rows = compare_dtypes(f32, bf16, queries or [], sample_texts,
                                    ratio=plan.recommended or min(opts.ratios), batch_size=opts.batch_size)
    if opts.plot is not None:
        plot_plan(plan, opts.plot)
    if opts.json:
        out = plan.to_dict()
        if dtype_rows is not None:
            out["dtype_fidelity"] = [r.to_dict() for r in dtype_rows]
        print(json.dumps(out, indent=2))
    else:
        print(format_plan(plan))
        if dtype_rows is not None:
            from kalm_store.dtype_fidelity import format_dtype_fidelity

            print(format_dtype_fidelity(dtype_rows))
        if opts.plot is not None:
            print(f"plot written to {opts.plot}")
    return 0
