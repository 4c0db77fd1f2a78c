"""What insert-if-absent commits cost a build: plain append against kalm-store's commit, side by side.

Until issue 14 a build appended each chunk (``table.add``); now each chunk is a Lance merge-insert on
``id`` that inserts only absent ids (``kalm_store.commit.commit_rows``), so two builds into one table
never store an id twice. The merge joins the chunk with the table's ``id`` column, a cost that grows with
the table. Here two tables holding the same ``--prefill`` rows receive the same chunks (``--chunk``
rows with r=4-sized matrix values, ``--value-kb`` each), alternating which goes first, one commit per
chunk: the medians of the commit times are compared, and set against the encoder time of such a
chunk at the builder's measured rate (``benchmarks/results/bench_build.json``).

Run:  python benchmarks/bench_commit.py [--prefill 50000] [--chunks 16] [--chunk 128]
Writes benchmarks/results/commit.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]


def rows_table(schema: pa.Schema, start: int, n: int, value_bytes: int, rng: np.random.Generator) -> pa.Table:
    ids = [f"doc-{i:09d}" for i in range(start, start + n)]
    cols = {"id": pa.array(ids), "text": pa.array([f"passage {i}" for i in ids]),
            "n_tokens": pa.array(np.full(n, 200, np.int32)),
            "text_digest": pa.array([os.urandom(8) for _ in ids], pa.binary(8)),
            "kalm_r4": pa.array([rng.bytes(value_bytes) for _ in ids], pa.large_binary())}
    return pa.table({f.name: cols[f.name] for f in schema}, schema=schema)


def main(argv: list[str] | None = None) -> int:
    import lancedb

    from kalm_store import schema as kschema
    from kalm_store.commit import commit_rows

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prefill", type=int, default=50_000, help="rows each table holds before (default: 50000)")
    p.add_argument("--chunks", type=int, default=16, help="chunks committed to each table (default: 16)")
    p.add_argument("--chunk", type=int, default=128, help="rows per chunk, as bench_build's (default: 128)")
    p.add_argument("--value-kb", type=float, default=52.0,
                   help="bytes of each row's matrix value, KB (default: 52, a d=640 r=4 passage of ~230 tokens)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "commit"))
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    arrow_schema = kschema.arrow_schema([4], None, {})
    times: dict[str, list[float]] = {"append": [], "insert_if_absent": []}
    with tempfile.TemporaryDirectory() as tmp:
        db = lancedb.connect(tmp)
        tables = {name: db.create_table(name, schema=arrow_schema) for name in times}
        for start in range(0, args.prefill, 10_000):  # small values: only the id column matters to the join
            chunk = rows_table(arrow_schema, start, min(10_000, args.prefill - start), 16, rng)
            for t in tables.values():
                t.add(chunk)
        for k in range(args.chunks):
            chunk = rows_table(arrow_schema, args.prefill + k * args.chunk, args.chunk, int(args.value_kb * 1024), rng)
            order = list(times) if k % 2 == 0 else list(times)[::-1]  # alternate who goes first
            for name in order:
                t0 = time.perf_counter()
                if name == "append":
                    tables[name].add(chunk)
                else:
                    commit_rows(tables[name], chunk)
                times[name].append(time.perf_counter() - t0)
        counts = {name: t.count_rows() for name, t in tables.items()}
    med = {name: statistics.median(v) for name, v in times.items()}
    build_json = ROOT / "benchmarks" / "results" / "bench_build.json"
    rate = None
    if build_json.exists():
        data = json.loads(build_json.read_text())
        rate = data.get("throughput", {}).get("build_passages_per_s") or data.get("build_passages_per_s")
    extra = med["insert_if_absent"] - med["append"]
    result = {
        "command": ("python benchmarks/bench_commit.py " + " ".join(argv or sys.argv[1:])).strip(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}; shared with other "
                   "engineers' jobs (medians of alternating runs)",
        "prefill_rows": args.prefill, "chunks": args.chunks, "chunk_rows": args.chunk, "value_kb": args.value_kb,
        "rows_after": counts, "commit_seconds_median": med, "commit_seconds": times,
        "extra_seconds_per_chunk": extra, "ratio": med["insert_if_absent"] / med["append"],
        "build_passages_per_s": rate,
        "extra_vs_encoding_chunk": extra / (args.chunk / rate) if rate else None,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    share = (f"; against encoding a chunk at the builder's {rate:.1f} passages/s "
             f"(bench_build.json): {100 * result['extra_vs_encoding_chunk']:+.2f}% of build time") if rate else ""
    lines = ["# Commit cost: append vs insert-if-absent", "", f"Command: `{result['command']}`  ",
             f"Machine: {result['machine']}", "",
             f"Tables of {args.prefill:,} rows, {args.chunks} chunks of {args.chunk} rows ({args.value_kb:g} KB "
             "values) each, alternating order:", "",
             "| commit | median s per chunk |", "|---|---|",
             f"| `table.add` (append, before) | {med['append']:.3f} |",
             f"| `commit_rows` (merge-insert, insert if absent) | {med['insert_if_absent']:.3f} |", "",
             f"- ratio **{result['ratio']:.2f}x**, {extra * 1000:+.0f} ms per chunk{share}",
             f"- rows afterwards: {counts} (equal: no row lost or duplicated)"]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
