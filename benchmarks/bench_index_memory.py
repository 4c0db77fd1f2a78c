"""Peak memory of Lance's index builds alone, against the rows indexed (issue 22: what grows at the end
of a build).

Run:  python benchmarks/bench_index_memory.py [--rows 1000000 10000000 30000000] [--columns text_digest id text]
Writes benchmarks/results/index_memory.md and .json (machine and exact command included).

Writes one Lance table per size shaped like a scale build's (``id``, an 8-word ``text``, its 8-byte
``text_digest``; 100k rows per fragment, one append each), then, in a fresh process per (size, column,
pool), creates that one index through LanceDB as ``PassageStore.update_indices`` does and reports the
process's peak resident memory (``VmHWM``) before and after: what the index build adds. Pools: Lance's
default (``LANCE_MEM_POOL_SIZE`` unset: 150 MiB for the BTREE sort) and kalm-store's bound
(:data:`kalm_store.index_memory.INDEX_POOL_BYTES`, which the builder sets); the FTS index has its own
per-worker limit (``LANCE_FTS_PARTITION_SIZE``) and is measured with the default only. kalm-store's
bound is the index call inside :func:`kalm_store.index_memory.bounded_index_memory`, as the builder
makes it: the pool and glibc's mmap threshold fixed at 32 KiB.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
WORDS = ("the quick brown fox jumps over lazy dog python json file data vector store passage query encoded "
         "once and stored reranker scores each candidate open read lines return number items").split()


def write_table(path: Path, n: int) -> None:
    import lance
    import pyarrow as pa

    rng = random.Random(0)
    schema = pa.schema([("id", pa.string(), False), ("text", pa.string(), False),
                        ("text_digest", pa.binary(8), False)])
    for start in range(0, n, 100_000):
        ids = [f"passage-{i:010d}" for i in range(start, min(n, start + 100_000))]
        texts = [" ".join(rng.choices(WORDS, k=8)) for _ in ids]
        digests = [hashlib.blake2b(t.encode(), digest_size=8).digest() for t in texts]
        lance.write_dataset(pa.table([ids, texts, pa.array(digests, pa.binary(8))], schema=schema), path,
                            mode="append" if start else "create")


def run_child(spec: dict[str, Any]) -> int:
    """Create one index on a copy of spec["table"]; print the peaks as JSON."""
    import time

    import lancedb
    from lancedb.index import FTS, BTree

    def hwm() -> float:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024

    from contextlib import nullcontext

    from kalm_store.index_memory import bounded_index_memory

    table = lancedb.connect(spec["db"]).open_table("t")
    before = hwm()
    t = time.perf_counter()
    with bounded_index_memory() if spec.get("bounded") else nullcontext():  # the pool is in the env already
        table.create_index(spec["column"], config=FTS() if spec["column"] == "text" else BTree(), replace=True)
    print(json.dumps({"peak_before_mib": before, "peak_after_mib": hwm(), "seconds": time.perf_counter() - t}))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000, 30_000_000])
    p.add_argument("--columns", nargs="+", choices=["text_digest", "id", "text"], default=["text_digest", "id", "text"])
    p.add_argument("--out", default=str(RESULTS / "index_memory"))
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is not None:
        return run_child(json.loads(args.child))
    from kalm_store.index_memory import ENV, INDEX_POOL_BYTES

    work = Path(tempfile.mkdtemp(prefix="kalm-index-mem-"))
    runs = []
    try:
        for n in args.rows:
            src = work / f"src{n}.lance"
            write_table(src, n)
            for column in args.columns:
                for pool in ([None] if column == "text" else [None, INDEX_POOL_BYTES]):
                    db = work / "db"
                    shutil.rmtree(db, ignore_errors=True)
                    shutil.copytree(src, db / "t.lance")
                    env = {k: v for k, v in os.environ.items() if k != ENV}
                    if pool is not None:
                        env[ENV] = str(pool)
                    cmd = [sys.executable, str(Path(__file__).resolve()), "--child",
                           json.dumps({"db": str(db), "column": column, "bounded": pool is not None})]
                    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
                    if out.returncode != 0:
                        raise RuntimeError(f"{shlex.join(cmd)} failed: {out.stderr[-2000:]}")
                    r = json.loads(out.stdout.strip().splitlines()[-1])
                    runs.append({"rows": n, "column": column, "pool_bytes": pool, **r,
                                 "added_mib": r["peak_after_mib"] - r["peak_before_mib"]})
                    print(f"{n:,} rows, {column}, pool {'default' if pool is None else pool >> 20}: "
                          f"+{runs[-1]['added_mib']:.0f} MiB, {r['seconds']:.1f} s", flush=True)
            shutil.rmtree(src)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    command = "python benchmarks/bench_index_memory.py" + "".join(f" {shlex.quote(a)}" for a in (argv or sys.argv[1:]))
    res = {"benchmark": "bench_index_memory", "command": command,
           "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
           "load_average": os.getloadavg(), "runs": runs}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    out.with_suffix(".md").write_text(to_markdown(res))
    print(to_markdown(res))
    return 0


def to_markdown(res: dict[str, Any]) -> str:
    lines = ["# Memory an index build adds, by rows indexed (Lance, index created alone on an existing table)", "",
             f"Command: `{res['command']}`  ", f"Machine: {res['machine']}; shared with other engineers' jobs "
             f"(load average at the end {', '.join(f'{x:.1f}' for x in res['load_average'])})  ",
             "Tables shaped like a scale build's (8-word texts, 8-byte digests, 100k rows per fragment); one fresh "
             "process per cell; *added* is its peak resident memory (VmHWM) after `create_index` minus before. "
             "One run each: repeated runs differ by up to ~50 MiB.", "",
             "| index | Lance sort pool | " + " | ".join(f"{n:,} rows: added MiB (s)" for n in
                                                        dict.fromkeys(r["rows"] for r in res["runs"])) + " |",
             "|---|---|" + "---|" * len({r["rows"] for r in res["runs"]})]
    keys = dict.fromkeys((r["column"], r["pool_bytes"]) for r in res["runs"])
    for column, pool in keys:
        cells = [f"+{r['added_mib']:.0f} ({r['seconds']:.1f})" for r in res["runs"]
                 if r["column"] == column and r["pool_bytes"] == pool]
        name = "FTS on text" if column == "text" else f"BTREE on {column}"
        how = ("Lance's FTS default (own per-worker limit)" if column == "text" else
               "default (150 MiB)" if pool is None else
               f"{pool >> 20} MiB, glibc mmap threshold 32 KiB (kalm-store's bound)")
        lines.append(f"| {name} | {how} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
