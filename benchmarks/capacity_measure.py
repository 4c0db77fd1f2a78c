"""The rates a capacity plan needs at the real shape that no other benchmark measures (issue 22, item 4).

One bounded run, Nano shape (18+18 layers, d = 640, vocabulary 262,144; random weights: speed, memory
and bytes do not depend on their values), passages of 256 encoder tokens, float32 on the CPU:

* **build rate**: ``PassageStore.add`` of K passages into a fresh table storing r = 4 and r = 8 (tokenize,
  encode, pool both ratios, compress, commit), median of ``--builds`` tables after a warm-up encode, as
  passages per CPU-second of the process (every thread: the core-seconds it used, what core-hours
  count, and much less sensitive to a shared host than wall time) and per wall-clock second;
* **bytes on disk per passage** of every column (Lance's own statistics, ``PassageStore.info``) and of
  each index (the files under ``_indices/``): full-text on ``text``, BTREE on ``id`` and ``text_digest``
  (what ``kalm-store build`` makes) and IVF_PQ on ``vector`` (what a large first stage needs);
* **query path at 100 candidates**: first stage (vector search selecting the stored columns) and
  decoding the fetched matrices, then decoder scoring (``KaLMModel.score``, a 60-token prompt as in
  ``bench_perf.py``, CPU and wall time) at r = 4 and r = 8, median of ``--queries`` queries after a warm-up;
* **memory**: peak resident set (``ru_maxrss``) of the measuring process, a fresh child that loads the
  checkpoint from its folder as a build worker or a serving replica does: after the build (a worker),
  and after the queries (a replica).

The host may be shared: the load average before and after is recorded. Results:
``benchmarks/results/capacity_rates.{md,json}``; ``capacity_plan.py`` turns them into the plan.

    python benchmarks/capacity_measure.py             # Nano shape, 1 thread: about 10 minutes on a shared 2-core host
    python benchmarks/capacity_measure.py --quick     # tiny shape, seconds; writes to the temp folder
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scoring import NANO, TINY, loadavg, write_results  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
RATIOS = (4, 8)


def _log(msg: str) -> None:
    print(f"[capacity_measure {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _rss_mib() -> float | None:
    """Resident memory now (``VmRSS``): the steady state, where the peak may be a transient of loading."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def passages_of(model: Any, k: int, tokens: int) -> list[str]:
    """``k`` distinct passages of English prose (stdlib docstrings) cut to at most ``tokens`` encoder tokens.

    The word count is found by bisection on the model's own passage tokenizer (template included),
    so each text is the longest prefix of its word stream that fits: the text column holds what a
    corpus of ``tokens``-token passages would hold, not a longer text truncated at encoding.
    """
    from kalm_store.corpus import stdlib_passages

    words = " ".join(p["text"] for p in stdlib_passages(400, max_words=400)).split()
    out = []
    for i in range(k):
        stream = words[(i * 997) % len(words):] + words  # a different start per passage
        lo, hi = 1, tokens * 2  # a word is at least one token: 2x tokens words are always too many
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if len(model.tokenize_passages([" ".join(stream[:mid])])[0]) <= tokens:
                lo = mid
            else:
                hi = mid - 1
        out.append(" ".join(stream[:lo]))
    return out


def index_bytes(db: str, table: str) -> dict[str, int]:
    """Bytes of each index's files on disk (``_indices/<uuid>``), by indexed column."""
    import lance

    ds = lance.dataset(f"{db}/{table}.lance")
    out: dict[str, int] = {}
    for ix in ds.list_indices():
        folder = Path(db) / f"{table}.lance" / "_indices" / ix["uuid"]
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        col = ds.schema.field(ix["fields"][0]).name if isinstance(ix["fields"][0], int) else ix["fields"][0]
        out[col] = out.get(col, 0) + size
    return out


def _other_columns_table(texts: list[str], rows: int, vector_dim: int, seed: int) -> Any:
    """The columns beside the matrices, ``rows`` rows: distinct texts from the measured ones, random vectors."""
    import numpy as np
    import pyarrow as pa

    from kalm_store.store import text_digest

    rng = np.random.default_rng(seed)
    body = [f"{texts[i % len(texts)]} {i}" for i in range(rows)]  # distinct texts, the measured vocabulary
    vec = rng.normal(size=(rows, vector_dim)).astype(np.float32)
    return pa.table({"id": pa.array([f"{i:012d}" for i in range(rows)]), "text": pa.array(body),
                     "n_tokens": pa.array(rng.integers(1, 257, rows), pa.int32()),
                     "text_digest": pa.array([text_digest(t) for t in body], pa.binary(8)),
                     "vector": pa.FixedSizeListArray.from_arrays(pa.array(vec.reshape(-1)), vector_dim)})


def measure_other_columns(db: str, texts: list[str], rows: int, vector_dim: int) -> dict[str, Any]:
    """Bytes per row of the non-matrix columns and of every index, from tables of ``rows // 4`` and ``rows`` rows.

    A small table's bytes hold fixed costs (page headers, the IVF centroids and PQ codebook, index
    footers) that a billion rows spread to nothing: the per-row figure is the slope between the two
    sizes, and the fixed part is reported beside it. Both tables use the same IVF_PQ settings
    (partitions fixed, 16 dimensions per PQ code byte: LanceDB's default), so the fixed part cancels.
    """
    import lancedb
    from lancedb.index import FTS, BTree, IvfPq

    from kalm_store.store import _bytes_on_disk

    conn = lancedb.connect(db)
    sub = max(1, vector_dim // 16)
    parts = 16
    sizes = sorted({max(rows // 4, 64), rows})
    measured: dict[int, dict[str, float]] = {}
    for i, n in enumerate(sizes):
        name = f"other{n}"
        tbl = conn.create_table(name, _other_columns_table(texts, n, vector_dim, seed=i))
        tbl.create_index("text", config=FTS())
        tbl.create_index("id", config=BTree())
        tbl.create_index("text_digest", config=BTree())
        tbl.create_index("vector", config=IvfPq(num_partitions=parts, num_sub_vectors=sub))
        cols = {f"{k} (data)": float(v) for k, v in _bytes_on_disk(tbl.to_lance()).items()}
        measured[n] = cols | {f"{k} (index)": float(v) for k, v in index_bytes(db, name).items()}
    small, large = sizes[0], sizes[-1]
    slope = {k: (measured[large][k] - measured[small][k]) / max(large - small, 1) for k in measured[large]}
    return {"rows": sizes, "vector_dim": vector_dim, "ivf_pq": {"num_partitions": parts, "num_sub_vectors": sub},
            "bytes": {str(n): v for n, v in measured.items()}, "bytes_per_row": slope,
            "fixed_bytes": {k: measured[large][k] - slope[k] * large for k in slope}}


def child(args: argparse.Namespace) -> dict[str, Any]:
    """The measurement itself, in a fresh process (its peak RSS is the worker's and the replica's)."""
    import numpy as np
    import torch

    from kalm_store import KaLMModel, PassageStore
    from kalm_store.plugins.lancedb import KaLMReranker
    from kalm_store.query import first_stage
    from kalm_store.store import decode_rows

    torch.set_num_threads(args.threads)
    prompt: list[int] = []

    class FixedPrompt(KaLMModel):
        """A fixed-length prompt: the test tokenizer is not Gemma's, so its template length is not the real one."""

        def prompt_ids(self, query: str, instruction: str | None = None) -> list[int]:
            return list(prompt)

    t = time.perf_counter()
    model = FixedPrompt.from_pretrained(args.folder)
    load_s = time.perf_counter() - t
    rss_loaded, now_loaded = _peak_rss_mib(), _rss_mib()
    rng = np.random.default_rng(0)
    prompt.extend([model.tokenizer.bos_token_id] + rng.integers(10, 1000, args.prompt_len - 1).tolist())
    texts = passages_of(model, args.passages, args.tokens)
    n_tokens = [len(x) for x in model.tokenize_passages(texts)]
    _log(f"model loaded in {load_s:.1f} s; {len(texts)} passages, {statistics.mean(n_tokens):.1f} tokens on "
         f"average, {statistics.mean(len(x) for x in texts):.0f} characters; threads {args.threads}")
    model.encode_ratios(texts[:2], list(RATIOS), batch_size=args.batch_size)  # warm-up (first-call costs)

    db = str(Path(args.work) / "db")
    records = [{"id": f"{i:012d}", "text": x, "vector": rng.normal(size=args.vector_dim).astype(np.float32).tolist()}
               for i, x in enumerate(texts)]
    build_s, build_cpu_s = [], []
    for b in range(args.builds):
        store = PassageStore.create(db, f"build{b}", model, ratios=list(RATIOS), vector_dim=args.vector_dim)
        t, c = time.perf_counter(), time.process_time()
        written = store.add(records, batch_size=args.batch_size)
        build_s.append(time.perf_counter() - t)
        build_cpu_s.append(time.process_time() - c)
        assert written == len(records), (written, len(records))
        _log(f"build {b + 1}/{args.builds}: {len(records)} passages in {build_s[-1]:.1f} s wall, "
             f"{build_cpu_s[-1]:.1f} s CPU")
    rss_build, now_build = _peak_rss_mib(), _rss_mib()
    info = PassageStore.open(db, "build0").info()
    columns = {name: c["bytes_per_passage"] for name, c in info["columns"].items()}

    # The query table: the measured rows repeated under new ids up to --fetch-rows (kalm_r* values are
    # stored uncompressed by Lance, so a repeated value costs its full size to read), indices as a build makes.
    rows = store.table.to_lance().to_table()
    reps = -(-args.fetch_rows // rows.num_rows)
    import pyarrow as pa

    tiled = pa.concat_tables([rows] * reps).slice(0, args.fetch_rows)
    ids = pa.array([f"{i:012d}" for i in range(tiled.num_rows)])
    vec = rng.normal(size=(tiled.num_rows, args.vector_dim)).astype(np.float32)
    tiled = tiled.set_column(tiled.schema.get_field_index("id"), "id", ids)
    tiled = tiled.set_column(tiled.schema.get_field_index("vector"), "vector",
                             pa.FixedSizeListArray.from_arrays(pa.array(vec.reshape(-1)), args.vector_dim))
    serve = PassageStore.create(db, "serve", model, ratios=list(RATIOS), vector_dim=args.vector_dim)
    serve.write(tiled.cast(serve.table.schema))
    serve.update_indices()
    tbl = serve.table
    rerankers = {r: KaLMReranker(model, table=tbl, ratio=r) for r in RATIOS}
    timings: dict[str, list[float]] = {}
    for qi in range(args.queries + 1):
        qvec = rng.normal(size=args.vector_dim).tolist()
        for r in (RATIOS if qi % 2 == 0 else RATIOS[::-1]):  # alternate: the same load on both ratios
            cols = ["text"] + rerankers[r].columns
            t = time.perf_counter()
            plain = first_stage(tbl, "q", mode="vector", candidates=args.candidates, query_vector=qvec,
                                columns=["id", "text"]).to_arrow()
            first_ms = (time.perf_counter() - t) * 1e3
            t = time.perf_counter()
            sel = first_stage(tbl, "q", mode="vector", candidates=args.candidates, query_vector=qvec,
                              columns=cols).to_arrow()
            mats = decode_rows(sel.select(cols), r, model.dim)
            select_ms = (time.perf_counter() - t) * 1e3
            assert len(mats) == args.candidates == plain.num_rows
            t, c = time.perf_counter(), time.process_time()
            model.score("q", mats, batch_size=args.score_batch)
            score_ms = (time.perf_counter() - t) * 1e3
            score_cpu_ms = (time.process_time() - c) * 1e3
            if qi > 0:  # the first query is the warm-up
                for k, v in (("first_stage_ms", first_ms), (f"first_stage_fetch_decode_r{r}_ms", select_ms),
                             (f"score_r{r}_ms", score_ms), (f"score_r{r}_cpu_ms", score_cpu_ms)):
                    timings.setdefault(k, []).append(v)
            _log(f"query {qi}{' (warm-up)' if qi == 0 else ''} r={r}: first stage {first_ms:.1f} ms, "
                 f"with the stored column selected and decoded {select_ms:.1f} ms, scoring {score_ms:.0f} ms "
                 f"({score_cpu_ms:.0f} ms CPU)")
    rss_serve, now_serve = _peak_rss_mib(), _rss_mib()
    others = measure_other_columns(str(Path(args.work) / "other"), texts, args.index_rows, args.vector_dim)
    med = {k: statistics.median(v) for k, v in timings.items()}
    return {
        "load_s": load_s, "passages": len(texts), "tokens_mean": statistics.mean(n_tokens),
        "tokens_max": max(n_tokens), "text_chars_mean": statistics.mean(len(x) for x in texts),
        "build_seconds": build_s, "build_cpu_seconds": build_cpu_s,
        "build_passages_per_s": len(texts) / statistics.median(build_s),
        "build_passages_per_s_per_thread": len(texts) / statistics.median(build_s) / args.threads,
        # CPU time of the whole process (every thread: torch, Lance's IO and commit threads): core-seconds used
        "build_passages_per_cpu_s": len(texts) / statistics.median(build_cpu_s),
        "column_bytes_per_passage": columns, "stored_vs_raw": {
            str(r): info["columns"][f"kalm_r{r}"]["stored_vs_raw"] for r in RATIOS},
        "fetch_rows": tbl.count_rows(), "query_timings_ms": timings, "query_ms_median": med,
        "other_columns": others,
        "peak_rss_mib": {"loaded": rss_loaded, "after_build": rss_build, "after_queries": rss_serve},
        "rss_mib": {"loaded": now_loaded, "after_build": now_build, "after_queries": now_serve},
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    from kalm_store.testing import TinyShape, make_test_model

    shape = dict(TINY if args.quick else NANO)
    work = Path(tempfile.mkdtemp(prefix="kalm-capacity-"))
    t = time.perf_counter()
    folder = make_test_model(work / "model", TinyShape(**shape))  # written here: the child only loads it
    _log(f"wrote the random {'tiny' if args.quick else 'Nano'}-shape checkpoint in {time.perf_counter() - t:.0f} s")
    load_before = loadavg()
    cmd = [sys.executable, __file__, "--child", "--folder", str(folder), "--work", str(work / "child"),
           *args.argv]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    if proc.returncode != 0:
        raise SystemExit(f"the measuring child failed (exit {proc.returncode}): {shlex.join(cmd)}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    import torch

    return {
        "command": "python benchmarks/capacity_measure.py" + "".join(f" {shlex.quote(a)}" for a in args.argv),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "torch_threads": args.threads, "compute_dtype": "float32", "storage_dtype": "float16"},
        "load_average_before": load_before, "load_average_after": loadavg(),
        "shape": shape, "shape_name": "tiny" if args.quick else "nano", "ratios": list(RATIOS),
        "target_tokens": args.tokens, "vector_dim": args.vector_dim, "prompt_len": args.prompt_len,
        "candidates": args.candidates, "batch_size": args.batch_size, "score_batch": args.score_batch,
        "builds": args.builds, "queries": args.queries, **res,
    }


def to_markdown(res: dict[str, Any]) -> str:
    m, q, c = res["machine"], res["query_ms_median"], res["column_bytes_per_passage"]
    lines = [
        f"# Capacity rates: {res['shape_name']} shape, {res['target_tokens']}-token passages, r = 4 and 8 (issue 22)", "",
        f"Command: `{res['command']}`", "",
        f"Machine: {m['platform']}, {m['cpu_count']} cores, torch {m['torch']}, {m['torch_threads']} torch "
        f"thread(s), float32 compute, float16 storage; load average before {res['load_average_before']}, after "
        f"{res['load_average_after']} (a shared host: other jobs slow these timings).", "",
        f"Random-weight T5Gemma2 of the {res['shape_name']} shape (d = {res['shape']['hidden_size']}, "
        f"{res['shape']['num_layers']}+{res['shape']['num_layers']} layers, vocabulary {res['shape']['vocab_size']:,}), "
        f"loaded from its folder by a fresh process. {res['passages']} passages of {res['tokens_mean']:.1f} encoder "
        f"tokens on average ({res['text_chars_mean']:.0f} characters of English prose, test tokenizer), "
        f"{res['vector_dim']}-d float32 vectors.", "",
        "| rate | measured | how |", "|---|---|---|",
        f"| build, passages per CPU-second (core-seconds the process used, all its threads) | "
        f"{res['build_passages_per_cpu_s']:.3f} | `PassageStore.add` of {res['passages']} passages at r = 4 and 8 "
        f"(tokenize, encode, pool, compress, commit), median of {res['builds']} tables: "
        f"{', '.join(f'{s:.1f}' for s in res['build_cpu_seconds'])} s CPU |",
        f"| build, passages/s wall-clock per torch thread | {res['build_passages_per_s_per_thread']:.3f} | the same "
        f"builds: {', '.join(f'{s:.1f}' for s in res['build_seconds'])} s wall (slowed by the host's other jobs) |",
    ]
    for r in res["ratios"]:
        lines.append(f"| scoring r = {r}, CPU ms per {res['candidates']} candidates | {q[f'score_r{r}_cpu_ms']:.0f} | "
                     f"`KaLMModel.score`, {res['prompt_len']}-token prompt, batches of {res['score_batch']}, median "
                     f"of {res['queries']} queries; wall-clock {q[f'score_r{r}_ms']:.0f} ms |")
    lines.append(f"| first stage, ms | {q['first_stage_ms']:.1f} | vector search (flat, {res['fetch_rows']:,} rows), "
                 f"{res['candidates']} candidates, id + text |")
    for r in res["ratios"]:
        lines.append(f"| first stage + fetch + decode r = {r}, ms | {q[f'first_stage_fetch_decode_r{r}_ms']:.1f} | "
                     "the same search selecting the stored columns, then `decode_rows` (digests checked) |")
    lines += [f"| peak RSS, MiB: loaded / after build / after queries | {res['peak_rss_mib']['loaded']:.0f} / "
              f"{res['peak_rss_mib']['after_build']:.0f} / {res['peak_rss_mib']['after_queries']:.0f} | "
              "`ru_maxrss` of the measuring process |",
              f"| resident now, MiB: loaded / after build / after queries | "
              + " / ".join("n/a" if v is None else f"{v:.0f}" for v in res["rss_mib"].values())
              + " | `VmRSS`: the steady state; a peak above it is a transient (loading the checkpoint) |", "",
              "Bytes on disk per passage, by column, of the first built table (Lance's data statistics). The plan "
              "reads the matrix columns and `text` (distinct passages, no cross-row compression: an upper bound) "
              "from here; the fixed-width columns' page overhead is amortised in the next table:", "",
              "| column | bytes per passage |", "|---|---|"]
    lines += [f"| {name} | {b:,.1f} |" for name, b in c.items()]
    ix = res["other_columns"]
    lines += ["", f"The other columns and the indices per row: the slope between tables of {ix['rows'][0]:,} and "
              f"{ix['rows'][-1]:,} rows of the same texts (distinct copies) and {ix['vector_dim']}-d vectors, with "
              "full-text (`text`), BTREE (`id`, `text_digest`) and IVF_PQ (`vector`: "
              f"{ix['ivf_pq']['num_partitions']} partitions, {ix['ivf_pq']['num_sub_vectors']} sub-vectors) indices; "
              "the fixed part is what the larger table holds beyond rows x slope. Its texts repeat the measured ones, so "
              "its `text (data)` row understates a real corpus's (not used by the plan):", "",
              "| what | bytes per row | fixed bytes |", "|---|---|---|"]
    lines += [f"| {k} | {b:,.1f} | {ix['fixed_bytes'][k]:,.0f} |" for k, b in ix["bytes_per_row"].items()]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny shape, few passages: a smoke run to the temp folder")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: 1, so rates are per core)")
    p.add_argument("--tokens", type=int, default=256, help="encoder tokens per passage (default: 256)")
    p.add_argument("--passages", type=int, default=None, help="distinct passages built (default: 16; quick 4)")
    p.add_argument("--builds", type=int, default=None, help="timed builds, median kept (default: 2; quick 1)")
    p.add_argument("--queries", type=int, default=None, help="timed queries per ratio after a warm-up (default: 3; quick 1)")
    p.add_argument("--candidates", type=int, default=100, help="candidates per query (default: 100)")
    p.add_argument("--fetch-rows", type=int, default=None, help="rows of the query table (default: 1000; quick 120)")
    p.add_argument("--index-rows", type=int, default=None,
                   help="rows of the larger other-columns/index table (default: 8192; quick 512)")
    p.add_argument("--vector-dim", type=int, default=768, help="retrieval vector width (default: 768)")
    p.add_argument("--prompt-len", type=int, default=60, help="decoder prompt tokens (default: 60, as bench_perf)")
    p.add_argument("--batch-size", type=int, default=8, help="passages per encoder pass (default: 8)")
    p.add_argument("--score-batch", type=int, default=32, help="candidates per decoder pass (default: 32)")
    p.add_argument("--out", type=Path, default=None, help="output prefix (default: results/capacity_rates)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    raw = list(sys.argv[1:] if argv is None else argv)
    args.argv = [a for i, a in enumerate(raw) if a not in ("--child", "--folder", "--work")
                 and (i == 0 or raw[i - 1] not in ("--folder", "--work"))]
    q = args.quick
    args.passages = args.passages or (4 if q else 16)
    args.builds = args.builds or (1 if q else 2)
    args.queries = args.queries or (1 if q else 3)
    args.fetch_rows = args.fetch_rows or (120 if q else 1000)
    args.index_rows = args.index_rows or (512 if q else 8192)
    for name in ("threads", "tokens", "passages", "builds", "queries", "candidates", "vector_dim", "prompt_len"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.candidates > args.fetch_rows:
        p.error(f"--candidates ({args.candidates}) must not exceed --fetch-rows ({args.fetch_rows})")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    res = run(args)
    out = args.out or (Path(tempfile.gettempdir()) / "capacity_rates_quick" if args.quick else RESULTS / "capacity_rates")
    write_results(out, to_markdown(res), res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
