"""``kalm-store optimize --db URI --table NAME [--dedupe]``: compact, clean up old versions, repair indices."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from datetime import timedelta

_EPILOG = """\
In order:
  1. with --dedupe, delete the extra copies of ids stored more than once (the first committed copy
     stays); without it they are only counted (`kalm-store verify` names them);
  2. create anew every index that cannot be read (a removed or truncated index folder), and create
     the full-text index on `text` and the BTREE index on `id` if missing (a build stopped by an error
     commits its rows but not its indices);
  3. compact the data files (rewriting away deleted rows: Lance deletes and column drops only mark
     them), and add the rows not indexed yet to every index;
  4. remove the versions older than --cleanup-older-than (default 0: all but the latest) and the files
     only they reference; files that no version references yet (another writer's commit in flight) stay.

Safe while other processes read or write the table: each step is its own commit and retries Lance's
retryable commit conflicts. A reader pinned to a removed old version (time travel) loses it; keep
versions with --cleanup-older-than or --no-cleanup.
"""


def register(sub: argparse._SubParsersAction, name: str) -> None:
    p = sub.add_parser(name, help="compact a passage store, remove old versions, repair its indices (and "
                                  "duplicate ids with --dedupe)",
                       description="Maintenance of a passage store: compaction with old-version clean-up, "
                                   "and the full-text and id indices created anew where missing or damaged.",
                       epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--db", required=True, help="LanceDB database URI (required)")
    p.add_argument("--table", required=True, help="table name (required)")
    p.add_argument("--dedupe", action="store_true",
                   help="delete extra copies of ids stored more than once, keeping the first committed "
                        "(default: count them only)")
    p.add_argument("--cleanup-older-than", type=float, default=0.0, metavar="HOURS",
                   help="remove versions older than this many hours (default: 0, every version but the latest)")
    p.add_argument("--no-cleanup", dest="cleanup", action="store_false", help="keep every old version")
    p.add_argument("--no-fts-index", dest="fts_index", action="store_false",
                   help="do not create a missing full-text index on text (default: create it)")
    p.add_argument("--no-id-index", dest="id_index", action="store_false",
                   help="do not create a missing BTREE index on id (default: create it)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text (default: text)")
    from kalm_store.storage import add_storage_arguments  # --storage-option KEY=VALUE for --db s3://...

    add_storage_arguments(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.cleanup_older_than < 0:
        raise ValueError(f"--cleanup-older-than must be >= 0 hours, got {args.cleanup_older_than}")
    from kalm_store.maintenance import optimize_store
    from kalm_store.storage import options_from_args
    from kalm_store.store import PassageStore

    store = PassageStore.open(args.db, args.table, storage_options=options_from_args(args))
    result = optimize_store(store, dedupe=args.dedupe, fts=args.fts_index, id_index=args.id_index,
                            cleanup_older_than=timedelta(hours=args.cleanup_older_than) if args.cleanup else None)
    if args.json:
        print(json.dumps(asdict(result)))
        return 0
    dup = ""
    if result.duplicates_found:
        dup = (f"; removed {result.duplicates_removed} duplicate-id copies" if args.dedupe else
               f"; {result.duplicates_found} duplicate-id copies kept (run again with --dedupe to remove them)")
    fixed = result.indices_rebuilt + result.indices_created
    print(f"optimized {result.table!r}: {result.fragments_before} -> {result.fragments_after} fragments, "
          f"{result.old_versions_removed} old versions removed ({result.bytes_removed:,} bytes)"
          f"{dup}{'; indices created: ' + ', '.join(fixed) if fixed else ''}; {result.rows} rows, "
          f"version {result.version}")
    return 0
