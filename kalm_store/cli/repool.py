"""``kalm-store repool --db URI --table NAME --from 4 --to 8``: derive a coarser ratio without re-encoding."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass

from kalm_store.cli import COMPACT_HINT, compact_hint


@dataclass(frozen=True)
class RepoolOptions:
    """Parsed and validated ``repool`` flags."""

    db: str
    table: str
    from_ratio: int
    to_ratio: int
    drop_source: bool
    batch_size: int
    json: bool




def register(sub: argparse._SubParsersAction, name: str) -> None:
    p = sub.add_parser(
        name,
        help="add a coarser ratio column derived exactly from a stored one (no re-encoding)",
        description="Derive kalm_r{TO} from the stored kalm_r{FROM} (TO a multiple of FROM) as the token-count-"
                    "weighted mean of FROM groups: exact up to float16 rounding, from the stored matrices alone (no model "
                    "is loaded). Only the new "
                    "column is written (Lance add_columns): vectors, text, other ratios and indices stay as they "
                    "are; the table metadata then lists the new ratio. A finer ratio can never be derived.",
    )
    p.add_argument("--db", required=True, help="LanceDB URI of the store (required)")
    p.add_argument("--table", required=True, help="table name (required)")
    p.add_argument("--from", dest="from_ratio", type=int, required=True, help="stored source ratio (required)")
    p.add_argument("--to", dest="to_ratio", type=int, required=True,
                   help="new ratio, a multiple of --from (required)")
    p.add_argument("--drop-source", action="store_true",
                   help="drop the source column afterwards; like every Lance column drop this only changes the "
                        f"table's metadata: its {COMPACT_HINT}")
    p.add_argument("--batch-size", type=int, default=256, help="rows re-pooled at a time (default: 256)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    from kalm_store.plugins.ray import add_ray_arguments  # --engine ray: one add_columns task per fragment

    add_ray_arguments(p, "repool")
    from kalm_store.storage import add_storage_arguments  # --storage-option KEY=VALUE for --db s3://...

    add_storage_arguments(p)
    p.set_defaults(run=run)


def parse_options(args: argparse.Namespace) -> RepoolOptions:
    """Validate the flags (ratios, direction, multiple) before the table is opened."""
    from kalm_store.pooling import check_ratio
    from kalm_store.repool import check_direction

    f = check_ratio(args.from_ratio, "--from")
    t = check_ratio(args.to_ratio, "--to")
    check_direction(f, t)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    return RepoolOptions(db=args.db, table=args.table, from_ratio=f, to_ratio=t, drop_source=args.drop_source,
                         batch_size=args.batch_size, json=args.json)


def run(args: argparse.Namespace) -> int:
    opts = parse_options(args)
    from kalm_store.repool import repool_store
    from kalm_store.storage import options_from_args
    from kalm_store.store import PassageStore

    storage = options_from_args(args)
    store = PassageStore.open(opts.db, opts.table, storage_options=storage)
    if getattr(args, "engine", "local") == "ray":
        from kalm_store.plugins.ray import ray_options_from_args, repool_on_ray

        if opts.drop_source:
            raise ValueError("--drop-source is not supported with --engine ray; drop it with a local repool run")
        result = repool_on_ray(store, opts.from_ratio, opts.to_ratio, ray_options_from_args(args),
                               storage_options=storage, batch_size=opts.batch_size)
    else:
        result = repool_store(store, opts.from_ratio, opts.to_ratio, drop_source=opts.drop_source,
                              batch_size=opts.batch_size, show_progress=sys.stderr.isatty() and not opts.json)
    if opts.json:
        print(json.dumps(asdict(result)))
        return 0
    if result.nothing_to_do:
        print(f"nothing to do: table {opts.table!r} stores r={result.to_ratio} for every row (ratios "
              f"{result.ratios}, version {result.version})")
        return 0
    if result.rows:
        done = f"re-pooled {result.rows:,} rows from r={result.from_ratio} to r={result.to_ratio}"
    elif result.filled:
        done = (f"re-derived {result.filled:,} rows that held null at r={result.to_ratio} (written by a writer "
                f"unaware of it) from r={result.from_ratio}")
    else:  # an interrupted run: its metadata commit, or (with --drop-source) its column drop, was missing
        done = f"completed an interrupted re-pool to r={result.to_ratio}"
    dropped = f"; dropped r={result.dropped} (its {compact_hint(opts.db, opts.table)})" if result.dropped is not None else ""
    print(f"{done}{dropped}; table {opts.table!r} stores ratios {result.ratios} (version {result.version})")
    return 0
