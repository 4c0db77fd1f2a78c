"""``kalm-store verify --db URI --table NAME``: check every stored matrix and text digest; exit 1 on damage."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from kalm_store.cli._args import add_ratios_argument

PROBLEMS_FOUND = 3  # exit status when rows fail; 1 stays "could not run", as for every command

_EPILOG = """\
What is checked, row by row, without a model: every kalm_r* value decodes (n_tokens within
1..max_length, zstd frame of the declared size, checksum, finite float16 values, not null), and every
text still has the digest written with its matrices (tables of schema version 2 on). These are the
checks each query makes for its own candidates; verify runs them over the whole table, reading only.

Exit status: 0 when every row passes, 3 when any fails (the report names them), 1 when the check could
not run (a wrong --db, --table or --ratio, as for every command), so a cron job can tell them apart.

Also checked: no id is stored twice (two builds racing before kalm-store stored ids only if absent),
and every index the table lists answers a query that reads it (a removed or truncated index folder
fails). A missing full-text or id index is reported, not failed (a build with --no-fts-index).

Repairs: a stale text is re-encoded by `kalm-store build INPUT --update` with the current corpus. A
damaged value is not (its text is unchanged): delete those rows (tbl.delete("id IN (...)")) and run
the build again, which stores them anew. Duplicate ids: `kalm-store optimize --db URI --table NAME
--dedupe` (the first committed copy stays). A damaged or missing index: `kalm-store optimize --db URI
--table NAME` creates it anew. A null value at a repooled ratio comes from a writer unaware
of that ratio (an append, or an update during an unfinished repool): run the same
`kalm-store repool --from R --to R2` again, which re-derives exactly those rows.
"""


def register(sub: argparse._SubParsersAction, name: str) -> None:
    p = sub.add_parser(name, help="check every stored matrix and text digest of a passage store",
                       description="Decode every stored pooled matrix and check every text against its "
                                   "digest, streaming over the table; report the rows that fail.",
                       epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--db", required=True, help="LanceDB database URI (required)")
    p.add_argument("--table", required=True, help="table name (required)")
    add_ratios_argument(p, "stored ratio to check; repeat or give a comma list for several (default: every "
                           "stored ratio)")
    p.add_argument("--examples", type=int, default=10, help="failing ids listed per column (default: 10)")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar (default: a bar on stderr when it is a terminal)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text (default: text)")
    from kalm_store.storage import add_storage_arguments  # --storage-option KEY=VALUE for --db s3://...

    add_storage_arguments(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from kalm_store.storage import options_from_args
    from kalm_store.store import PassageStore
    from kalm_store.verify import verify_store

    if args.examples < 0:
        raise ValueError(f"--examples must be >= 0, got {args.examples}")
    store = PassageStore.open(args.db, args.table, storage_options=options_from_args(args))
    report = verify_store(store, ratios=args.ratios, examples=args.examples,
                          progress=args.progress and sys.stderr.isatty())
    if args.json:
        print(json.dumps(asdict(report) | {"ok": report.ok}))
        return 0 if report.ok else PROBLEMS_FOUND
    print(f"verify {report.table} ({args.db}): {report.rows} rows, ratios {report.ratios}"
          + ("" if report.digests else "; no text digests (schema version 1): texts not checked"))
    for name, col in report.columns.items():
        kind = "stale" if name == "text" else "damaged"
        print(f"  {name:<10} ok {col.ok}, {kind} {col.bad}")
        for pid, reason in col.examples:
            print(f"      {pid}: {reason}")
    repair = f"kalm-store optimize --db {args.db} --table {args.table}"
    print(f"  {'id':<10} duplicated {report.duplicate_ids}"
          + (f" (repair: `{repair} --dedupe` keeps the first committed copy)" if report.duplicate_ids else ""))
    for pid, n in report.duplicate_examples:
        print(f"      {pid}: stored {n} times")
    for problem in report.index_problems:
        print(f"  index {problem.name} on {problem.columns} cannot be read: {problem.error} (repair: `{repair}` "
              "creates it anew)")
    if report.missing_indices:
        print(f"  no index on {report.missing_indices} (searches needing it refuse; `{repair}` creates it)")
    print("all rows pass" if report.ok else "problems found: see `kalm-store verify --help` for repairs")
    return 0 if report.ok else PROBLEMS_FOUND
