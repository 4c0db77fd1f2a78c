"""``kalm-store info --db URI --table NAME [--json]``: rows, ratios, bytes on disk, fingerprint."""

from __future__ import annotations

import argparse
import json

from kalm_store._text import format_bytes  # the units of `kalm-store plan`


def register(sub: argparse._SubParsersAction, name: str) -> None:
    p = sub.add_parser(name, help="describe a passage store: rows, ratios, bytes per column and passage",
                       description="Print a passage store's rows, ratios, bytes on disk per column and per "
                                   "passage (vs raw float16 for kalm_r* columns), indices and model fingerprint.")
    p.add_argument("--db", required=True, help="LanceDB database URI (required)")
    p.add_argument("--table", required=True, help="table name (required)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text (default: text)")
    from kalm_store.storage import add_storage_arguments  # --storage-option KEY=VALUE for --db s3://...

    add_storage_arguments(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from kalm_store.storage import options_from_args
    from kalm_store.store import PassageStore

    info = PassageStore.open(args.db, args.table, storage_options=options_from_args(args)).info()
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    meta = info["metadata"]
    checked = "text digests checked on read" if "text_digest" in info["columns"] else "no text digests (version 1)"
    print(f"table        {info['table']} ({args.db}), version {info['version']}, kalm-store schema "
          f"v{meta.get('schema_version')} ({checked})")
    print(f"rows         {info['rows']}  ({info['tokens']} encoder tokens)")
    revision = f" rev {meta['model_revision']}" if meta.get("model_revision") else " (local folder)"
    print(f"model        {meta.get('model_id')}{revision}, d={info['dim']}, "
          f"max_length={meta.get('max_length')}, template {meta.get('template_version')}")
    print(f"fingerprint  {info['fingerprint']}")
    dtypes = meta.get("compute_dtypes")  # absent: a table of a kalm-store that did not record it
    print(f"built in     {' + '.join(dtypes) if dtypes else 'unknown'} compute dtype (stored as float16)")
    emb, dim = meta.get("embedder"), meta.get("vector_dim")
    if dim is None:
        vectors = "none"
    elif emb:
        vectors = f"{dim}-d, computed by {emb.get('name')} ({emb.get('model')})"
    else:
        vectors = f"{dim}-d, brought with the input"
    print(f"ratios       {info['ratios']}   vectors: {vectors}")
    print(f"stored       {format_bytes(info['stored_bytes'])} on disk, {format_bytes(info['bytes_per_passage'])} per passage")
    print(f"{'column':<12} {'on disk':>10} {'per passage':>12} {'raw fp16/psg':>13} {'vs raw':>7}")
    for col, c in info["columns"].items():
        raw = c.get("raw_float16_bytes_per_passage")
        ratio = c.get("stored_vs_raw")
        print(f"{col:<12} {format_bytes(c['stored_bytes']):>10} {format_bytes(c['bytes_per_passage']):>12} "
              f"{format_bytes(raw) if raw is not None else '':>13} {f'{ratio:.3f}' if ratio else '':>7}")
    print("indices      " + (", ".join(f"{ix['name']} ({ix['type']} on {','.join(ix['columns'])})"
                                       for ix in info["indices"]) or "none"))
    return 0
