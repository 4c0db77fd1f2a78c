"""``bench_query.py --s3``: the online path with the store on object storage, at several network latencies.

The store is built locally (``--passages`` rows in ``--fragments`` commits, FTS + BTREE indices), copied
into a bucket of a moto S3 server on 127.0.0.1 and opened through
:class:`kalm_store.latency_proxy.LatencyProxy`, which adds ``--latency-ms`` to every request and records
it. Per stage and latency the table gives the median time, the requests and the sequential round trips
(:func:`kalm_store.latency_proxy.round_trips`) that the stage issued:

- first stage: the hybrid search returning ``id``, ``text`` and ``_rowid`` of the candidates;
- fetch, select: what selecting the stored columns in the search adds (the path of ``kalm_store.search``);
- fetch, _rowid: the reranker's take by ``_rowid`` (LanceDB ``take_row_ids``), plus decoding;
- fetch, by id: ``PassageStore.matrices`` (and the server's ``/rerank`` by id or text), on the store's
  dataset kept per version; "fetch, by id (reopen)" is the same read on a dataset opened anew for the
  call (``table.to_lance()``), which is what ``matrices`` did before;
- scoring: the decoder on the candidates' matrices (no I/O).

Run from bench_query.py: ``python benchmarks/bench_query.py --s3 --latency-ms 0 5 20 50``.
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
from typing import Any, Callable

import numpy as np

BUCKET = "kalm-bench"
STAGES = ["first_stage", "fetch_select", "fetch_rowid", "fetch_id", "fetch_id_reopen", "scoring"]
LABELS = {"first_stage": "first stage (ids, text, _rowid)", "fetch_select": "fetch, select in the search",
          "fetch_rowid": "fetch, take by _rowid", "fetch_id": "fetch, by id (dataset kept per version)",
          "fetch_id_reopen": "fetch, by id (dataset reopened per call: before)", "scoring": "scoring"}


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000.0


def _range_bytes(header: str | None) -> int:
    if not header or not header.startswith("bytes="):
        return 0
    a, _, b = header[6:].partition("-")
    return int(b) - int(a) + 1 if a and b else 0


def run_s3(args: argparse.Namespace, shapes: dict[str, dict[str, Any]]) -> int:
    import boto3
    import torch
    from moto.server import ThreadedMotoServer

    from kalm_store import KaLMModel, PassageStore
    from kalm_store.corpus import stdlib_passages
    from kalm_store.latency_proxy import LatencyProxy, round_trips
    from kalm_store.plugins.lancedb import KaLMReranker
    from kalm_store.query import first_stage
    from kalm_store.store import decode_rows, sql_in
    from kalm_store.testing import TinyShape, make_test_model

    n_rows = args.passages
    if args.candidates > n_rows:
        raise SystemExit(f"--candidates ({args.candidates}) must not exceed --passages ({n_rows})")
    if args.fragments < 1 or args.fragments > n_rows:
        raise SystemExit(f"--fragments must be in 1..--passages ({n_rows}), got {args.fragments}")
    if any(lat < 0 for lat in args.latency_ms):
        raise SystemExit(f"--latency-ms must be >= 0, got {args.latency_ms}")
    shape = dict(shapes[args.shape])
    if args.hidden_size:
        shape["hidden_size"] = args.hidden_size
    work = Path(tempfile.mkdtemp(prefix="kalm-bench-s3-"))
    t0 = time.perf_counter()
    model = KaLMModel.from_pretrained(make_test_model(work / "model", TinyShape(**shape, vocab_size=1024)))
    print(f"model {args.shape} {shape} on {model.device}/{model.dtype}: {_ms(t0) / 1000:.1f} s", flush=True)

    # a few thousand rows: the stdlib docstrings, repeated with a suffix when more are asked for
    base = stdlib_passages(n_rows, max_words=args.max_words)
    rng = np.random.default_rng(0)
    docs = [{"id": f"p{i}",
             "text": base[i % len(base)]["text"] + (f" (part {i // len(base)})" if i >= len(base) else ""),
             "vector": rng.normal(size=16).astype(np.float32).tolist()} for i in range(n_rows)]
    t0 = time.perf_counter()
    local = work / "db"
    store = PassageStore.create(str(local), "docs", model, ratios=[args.ratio], vector_dim=16)
    step = -(-n_rows // args.fragments)
    for start in range(0, n_rows, step):  # one commit each: one fragment (data file) each
        store.add(docs[start:start + step], batch_size=32)
    store.update_indices(fts=True, id_index=True)
    ds_local = store.table.to_lance()
    frags = [f.count_rows() for f in ds_local.get_fragments()]
    n_tokens = ds_local.to_table(columns=["n_tokens"]).column(0).to_numpy()
    blob = ds_local.to_table(columns=[f"kalm_r{args.ratio}"]).column(0)
    blob_bytes = float(np.mean([len(b.as_buffer()) for b in blob]))
    data_bytes = sum(p.stat().st_size for p in (local / "docs.lance" / "data").iterdir())
    print(f"built {n_rows} passages in {len(frags)} fragments (mean {n_tokens.mean():.0f} tokens, "
          f"{blob_bytes / 1024:.1f} KiB per stored matrix) in {_ms(t0) / 1000:.1f} s", flush=True)

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                      aws_secret_access_key="testing")
    s3.create_bucket(Bucket=BUCKET)
    for path in sorted(local.rglob("*")):
        if path.is_file():
            s3.upload_file(str(path), BUCKET, "db/" + path.relative_to(local).as_posix())
    proxy = LatencyProxy(endpoint).start()
    try:
        opts = {"endpoint": proxy.url, "region": "us-east-1", "aws_access_key_id": "testing",
                "aws_secret_access_key": "testing", "allow_http": "true"}
        s3_store = PassageStore.open(f"s3://{BUCKET}/db", "docs", model=model, storage_options=opts)
        tbl = s3_store.table
        rr = KaLMReranker(model, table=tbl, ratio=args.ratio, batch_size=args.batch_size)
        col = f"kalm_r{args.ratio}"
        checked = ["text", "text_digest"] if s3_store.has_digests else []

        def reopened(ids: list[str]) -> list[np.ndarray]:
            """PassageStore.matrices as it was: a dataset opened for the call."""
            rows = tbl.to_lance().to_table(columns=["id", "n_tokens", *checked, col], filter=sql_in("id", ids))
            return decode_rows(rows, args.ratio, model.dim)

        def measure(fn: Callable[[], Any]) -> tuple[Any, dict[str, float]]:
            """``fn()``'s result and the fastest of ``--repeats`` runs: ms, requests, round trips, bytes (a
            shared machine adds noise to every run; the fastest is the closest to the stage's own cost)."""
            best: dict[str, float] | None = None
            first: dict[str, float] = {}
            for _ in range(args.repeats):
                proxy.reset()
                t = time.perf_counter()
                out = fn()
                ms = _ms(t)
                reqs = proxy.snapshot()
                run = dict(ms=ms, requests=len(reqs), round_trips=round_trips(reqs),
                           bytes=sum(_range_bytes(r.range) for r in reqs),
                           server_ms=float(np.median([r.ms for r in reqs])) if reqs else 0.0)
                first = first if best is not None else run
                if best is None or run["ms"] < best["ms"]:
                    best = run
            # the first run too: on the session's first query it is the cold one (metadata not yet read)
            return out, best | {f"first_{k}": first[k] for k in ("ms", "requests", "round_trips")}

        words = ["json", "file", "parse", "return", "data", "string", "compress", "time", "list", "object"]
        passes = []
        cold: dict[str, Any] | None = None
        for lat in args.latency_ms:
            proxy.latency_ms = lat
            rows = []
            for qi in range(args.queries + 1):  # one warm-up per latency
                i = len(passes) * 7 + qi
                query = f"how do I {words[i % 10]} the {words[(3 * i + 1) % 10]} {words[(7 * i + 2) % 10]}?"
                qvec = rng.normal(size=16).tolist()
                plain, first = measure(lambda: first_stage(
                    tbl, query, mode="hybrid", candidates=args.candidates, query_vector=qvec,
                    columns=["id", "text"]).with_row_id(True).to_arrow())
                sel, with_sel = measure(lambda: decode_rows(first_stage(
                    tbl, query, mode="hybrid", candidates=args.candidates, query_vector=qvec,
                    columns=list(dict.fromkeys(["id", "text", *rr.columns]))).to_arrow(), args.ratio, model.dim))
                fetch_select = {k: max(with_sel[k] - first[k], 0.0) for k in (
                    "ms", "requests", "round_trips", "bytes", "first_ms", "first_requests", "first_round_trips")}
                fetch_select["server_ms"] = with_sel["server_ms"]
                mats, fetch_rowid = measure(lambda: rr._matrices(plain)[0])
                ids = plain.column("id").to_pylist()
                by_id, fetch_id = measure(lambda: s3_store.matrices(ids, args.ratio))
                again, fetch_id_reopen = measure(lambda: reopened(ids))
                assert len(mats) == len(by_id) == len(ids) and all(
                    np.array_equal(a, b) for a, b in zip(mats, by_id)), "the fetch paths disagree"
                _, scoring = measure(lambda: model.score(query, mats, batch_size=args.batch_size))
                row = dict(query=query, latency_ms=lat, candidates=len(ids), first_stage=first,
                           fetch_select=fetch_select, fetch_rowid=fetch_rowid, fetch_id=fetch_id,
                           fetch_id_reopen=fetch_id_reopen, scoring=scoring)
                if cold is None:
                    cold = row  # its stages' first runs (first_*) were the cold ones
                label = "warm-up" if qi == 0 else f"q{qi}"
                print(f"{lat:g} ms {label}: " + " | ".join(
                    f"{s} {row[s]['ms']:.0f} ms/{row[s]['requests']:.0f} req/{row[s]['round_trips']:.0f} rt"
                    for s in STAGES), flush=True)
                if qi > 0:
                    rows.append(row)
            med = {s: {k: float(statistics.median(r[s][k] for r in rows))
                       for k in ("ms", "requests", "round_trips", "bytes", "server_ms")} for s in STAGES}
            passes.append(dict(latency_ms=lat, queries=rows, median=med))
    finally:
        proxy.stop()
        server.stop()

    load = os.getloadavg()
    machine = dict(platform=platform.platform(), python=platform.python_version(), cpus=os.cpu_count(),
                   torch=torch.__version__, torch_threads=torch.get_num_threads(), device=str(model.device),
                   load_average=load)
    command = " ".join([Path(sys.executable).name, *sys.argv])
    by_lat = {p["latency_ms"]: p["median"] for p in passes}
    base_lat = min(by_lat)
    verdict = {}
    for lat, med in by_lat.items():
        verdict[f"{lat:g}"] = dict(
            select_ms=med["fetch_select"]["ms"], select_round_trips=med["fetch_select"]["round_trips"],
            rowid_ms=med["fetch_rowid"]["ms"], rowid_round_trips=med["fetch_rowid"]["round_trips"],
            id_ms=med["fetch_id"]["ms"], id_round_trips=med["fetch_id"]["round_trips"],
            reopen_round_trips=med["fetch_id_reopen"]["round_trips"],
            # what the added latency costs the fetch by _rowid, from its counted round trips
            rowid_latency_share_ms=med["fetch_rowid"]["round_trips"] * lat,
            reopen_latency_share_ms=med["fetch_id_reopen"]["round_trips"] * lat)
    result = dict(command=command, machine=machine, shape=args.shape, model_shape=shape, passages=n_rows,
                  fragments=frags, data_bytes=data_bytes, mean_tokens=float(n_tokens.mean()),
                  matrix_bytes_mean=blob_bytes, ratio=args.ratio, candidates=args.candidates,
                  latencies_ms=args.latency_ms, cold_first_query=cold, passes=passes, verdict=verdict)

    lat_cols = [f"{p['latency_ms']:g} ms" for p in passes]
    lines = [
        f"# Query benchmark on S3 (moto behind a latency proxy): {args.candidates} candidates, r = {args.ratio}",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine['platform']}, {machine['cpus']} CPUs (shared with other jobs: load average "
        f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} at the end), torch {machine['torch']} "
        f"({machine['torch_threads']} threads), device {machine['device']}  ",
        f"Layout: {n_rows} passages in {len(frags)} fragments ({', '.join(map(str, sorted(set(frags))))} rows each), "
        f"{data_bytes / 2**20:.0f} MiB of data files; mean {n_tokens.mean():.0f} encoder tokens, "
        f"{blob_bytes / 1024:.1f} KiB per stored r = {args.ratio} matrix (d = {shape['hidden_size']}); "
        "FTS index on text, BTREE on id and text_digest. Model: random T5Gemma2 "
        f"{args.shape} shape {shape}. First stage: LanceDB hybrid (FTS + brought 16-d vectors), "
        f"{args.candidates} candidates. Medians of {args.queries} queries per latency (each stage the fastest of "
        f"{args.repeats} runs), after a warm-up query.",
        "",
        "Each cell: median ms / requests / sequential round trips (the longest chain of requests each issued "
        "after the previous one's answer, counted by the proxy).",
        "",
        "| per query | " + " | ".join(lat_cols) + " |",
        "|---|" + "---|" * len(lat_cols),
        *[f"| {LABELS[s]} | " + " | ".join(
            f"{p['median'][s]['ms']:.0f} / {p['median'][s]['requests']:.0f} / {p['median'][s]['round_trips']:.0f}"
            for p in passes) + " |" for s in STAGES],
        "",
        "Round trips of the fetch of 100 candidates (target: <= 3), and what the added latency costs at that "
        "count (round trips x latency; the rest of each fetch time above is the server's and the CPU's):",
        "",
        "| added latency | select in the search (extra round trips) | take by _rowid | by id, kept dataset | "
        "by id, reopened (before) | latency share, _rowid | latency share, reopened |",
        "|---|---|---|---|---|---|---|",
        *[f"| {lat} ms | {v['select_round_trips']:.0f} | {v['rowid_round_trips']:.0f} | {v['id_round_trips']:.0f} | "
          f"{v['reopen_round_trips']:.0f} | {v['rowid_latency_share_ms']:.0f} ms | "
          f"{v['reopen_latency_share_ms']:.0f} ms |"
          for lat, v in verdict.items()],
        "",
        f"- Cold first query of the session (at {passes[0]['latency_ms']:g} ms): " + "; ".join(
            f"{LABELS[s]} {cold[s]['first_ms']:.0f} ms / {cold[s]['first_requests']:.0f} req / "
            f"{cold[s]['first_round_trips']:.0f} rt"
            for s in STAGES if s != "scoring") + " (file footers, column metadata and indices are read once per "
        "dataset, then kept in its session).",
        f"- The server's own time per request (median, at {base_lat:g} ms added): "
        f"{by_lat[base_lat]['fetch_rowid']['server_ms']:.0f} ms during a take. moto copies the whole object "
        "under a per-object lock for every ranged GET and runs in this Python process, so it answers the "
        "take's ~1 request per candidate largely one after another; that, not the added latency, is most of "
        "every fetch time here. An S3 endpoint serves the parallel requests in parallel: the round-trip "
        "count is what carries over.",
        "",
    ]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "query_s3.md").write_text("\n".join(lines))
    (out / "query_s3.json").write_text(json.dumps(result, indent=2))
    print("\n".join(lines))
    print(f"wrote {out / 'query_s3.md'} and .json")
    return 0
