"""``bench_query.py --s3``: the online path with the store on object storage, at several network latencies.

The store is built locally (``--passages`` rows in ``--fragments`` commits, FTS + BTREE indices), copied
into a bucket of a local S3-compatible server on 127.0.0.1 (``--s3-server moto`` or ``s3rver``) and opened
through :class:`kalm_store.latency_proxy.LatencyProxy`, which adds ``--latency-ms`` to every request and
records it. Server and proxy each run in a process of their own (:mod:`kalm_store.local_s3`), bounded by
``--s3-max-seconds``: as threads of this process they shared its GIL with torch and Lance's callbacks,
and their time, not the latency, filled the table. Per stage and latency the table gives the median time, the requests and the sequential round trips
(:func:`kalm_store.latency_proxy.round_trips`) that the stage issued:

- first stage: the hybrid search returning ``id``, ``text`` and ``_rowid`` of the candidates;
- fetch, select: what selecting the stored columns in the search adds (the path of ``kalm_store.search``);
- fetch, _rowid: the reranker's take by ``_rowid`` (LanceDB ``take_row_ids``), plus decoding;
- fetch, by id: ``PassageStore.matrices`` (and the server's ``/rerank`` by id or text), on the store's
  dataset kept per version; "fetch, by id (reopen)" is the same read on a dataset opened anew for the
  call (``table.to_lance()``), which is what ``matrices`` did before;
- scoring: the decoder on the candidates' matrices (no I/O).

Beside them, the take by ``_rowid`` straight to the server (no proxy) shows what the proxy itself costs,
so that the gap between a fetch and its round trips x latency can be split into server, proxy and latency.

Run from bench_query.py: ``python benchmarks/bench_query.py --s3 [--s3-server s3rver] --latency-ms 0 5 20 50``.
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


def run_s3(args: argparse.Namespace, load_model: Callable[[argparse.Namespace, Path], tuple[Any, dict[str, int]]]) -> int:
    """The benchmark; ``load_model(args, work)`` is bench_query.py's (the model and its shape)."""
    import torch

    from kalm_store import PassageStore
    from kalm_store.corpus import stdlib_passages
    from kalm_store.latency_proxy import round_trips
    from kalm_store.local_s3 import CREDENTIALS, mark_listable, s3_storage_options, s3rver_command, start_proxy, start_server
    from kalm_store.plugins.lancedb import KaLMReranker
    from kalm_store.query import first_stage
    from kalm_store.store import decode_rows, sql_in

    n_rows = args.passages
    if args.candidates > n_rows:
        raise SystemExit(f"--candidates ({args.candidates}) must not exceed --passages ({n_rows})")
    if args.fragments < 1 or args.fragments > n_rows:
        raise SystemExit(f"--fragments must be in 1..--passages ({n_rows}), got {args.fragments}")
    if any(lat < 0 for lat in args.latency_ms):
        raise SystemExit(f"--latency-ms must be >= 0, got {args.latency_ms}")
    if args.s3_max_seconds <= 0:
        raise SystemExit(f"--s3-max-seconds must be > 0, got {args.s3_max_seconds}")
    try:
        import boto3  # uploads the local build into the bucket
        if args.s3_server == "s3rver":
            s3rver_command()
    except (ImportError, RuntimeError) as e:
        raise SystemExit(f"--s3 --s3-server {args.s3_server}: {e}" + (
            '; pip install "kalm-store[s3]"' if isinstance(e, ImportError) else "")) from e
    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="kalm-bench-s3-"))
    model, shape = load_model(args, work)

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

    # server and proxy in processes of their own, both bounded in time even if this one is killed
    server = start_server(args.s3_server, max_seconds=args.s3_max_seconds, directory=work / "bucket")
    proxy_proc = None
    try:
        key, secret = CREDENTIALS[args.s3_server]
        s3 = boto3.client("s3", endpoint_url=server.url, region_name="us-east-1", aws_access_key_id=key,
                          aws_secret_access_key=secret)
        s3.create_bucket(Bucket=BUCKET)
        for path in sorted(local.rglob("*")):
            if path.is_file():
                s3.upload_file(str(path), BUCKET, "db/" + path.relative_to(local).as_posix())
        if args.s3_server == "s3rver":
            mark_listable(s3, BUCKET, "db/docs.lance")  # else its LIST hides the table from LanceDB
        proxy_proc, proxy = start_proxy(server.url, max_seconds=args.s3_max_seconds)
        s3_store = PassageStore.open(f"s3://{BUCKET}/db", "docs", model=model,
                                     storage_options=s3_storage_options(args.s3_server, proxy.url))
        tbl = s3_store.table
        rr = KaLMReranker(model, table=tbl, ratio=args.ratio, batch_size=args.batch_size)
        # the same table straight to the server: what the proxy adds to a take (one process more on 2 cores)
        direct_store = PassageStore.open(f"s3://{BUCKET}/db", "docs", model=model,
                                         storage_options=s3_storage_options(args.s3_server, server.url))
        rr_direct = KaLMReranker(model, table=direct_store.table, ratio=args.ratio, batch_size=args.batch_size)
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
                           connections=len({r.connection for r in reqs}),
                           # arrival at the proxy to the server's answer, less the latency the proxy added
                           server_ms=float(np.median([r.ms for r in reqs])) - proxy_lat if reqs else 0.0)
                first = first if best is not None else run
                if best is None or run["ms"] < best["ms"]:
                    best = run
            # the first run too: on the session's first query it is the cold one (metadata not yet read)
            return out, best | {f"first_{k}": first[k] for k in ("ms", "requests", "round_trips")}

        words = ["json", "file", "parse", "return", "data", "string", "compress", "time", "list", "object"]
        passes = []
        cold: dict[str, Any] | None = None
        for lat in args.latency_ms:
            proxy.latency_ms = proxy_lat = lat
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
                _, direct_rowid = measure(lambda: rr_direct._matrices(plain)[0])  # the proxy sees none of it
                ids = plain.column("id").to_pylist()
                by_id, fetch_id = measure(lambda: s3_store.matrices(ids, args.ratio))
                again, fetch_id_reopen = measure(lambda: reopened(ids))
                assert len(mats) == len(by_id) == len(ids) and all(
                    np.array_equal(a, b) for a, b in zip(mats, by_id)), "the fetch paths disagree"
                _, scoring = measure(lambda: model.score(query, mats, batch_size=args.batch_size))
                row = dict(query=query, latency_ms=lat, candidates=len(ids), first_stage=first,
                           fetch_select=fetch_select, fetch_rowid=fetch_rowid, fetch_id=fetch_id,
                           fetch_id_reopen=fetch_id_reopen, scoring=scoring, rowid_no_proxy=direct_rowid)
                if cold is None:
                    cold = row  # its stages' first runs (first_*) were the cold ones
                label = "warm-up" if qi == 0 else f"q{qi}"
                print(f"{lat:g} ms {label}: " + " | ".join(
                    f"{s} {row[s]['ms']:.0f} ms/{row[s]['requests']:.0f} req/{row[s]['round_trips']:.0f} rt"
                    for s in STAGES), flush=True)
                if qi > 0:
                    rows.append(row)
            med = {s: {k: float(statistics.median(r[s].get(k, 0.0) for r in rows))
                       for k in ("ms", "requests", "round_trips", "bytes", "server_ms", "connections")}
                   for s in STAGES}
            # kept out of "median": its key does not start with "fetch", so capacity_plan.py never takes it
            # for a fetch over the network
            rig = dict(rowid_no_proxy_ms=float(statistics.median(r["rowid_no_proxy"]["ms"] for r in rows)))
            passes.append(dict(latency_ms=lat, queries=rows, median=med, rig=rig))
        upstream_connections = proxy.upstream_connections
    finally:
        if proxy_proc is not None:
            proxy_proc.stop()
        server.stop()

    load = os.getloadavg()
    machine = dict(platform=platform.platform(), python=platform.python_version(), cpus=os.cpu_count(),
                   torch=torch.__version__, torch_threads=torch.get_num_threads(), device=str(model.device),
                   load_average=load, lance_io_threads=os.environ.get("LANCE_IO_THREADS"))
    command = " ".join([Path(sys.executable).name, *sys.argv])
    by_lat = {p["latency_ms"]: p["median"] for p in passes}
    rig = {p["latency_ms"]: p["rig"] for p in passes}
    base_lat = min(by_lat)
    base = by_lat[base_lat]
    verdict = {}
    for lat, med in by_lat.items():
        target = 3 * lat  # the issue's bound: 3 round trips' worth of time
        verdict[f"{lat:g}"] = dict(
            select_ms=med["fetch_select"]["ms"], select_round_trips=med["fetch_select"]["round_trips"],
            rowid_ms=med["fetch_rowid"]["ms"], rowid_round_trips=med["fetch_rowid"]["round_trips"],
            id_ms=med["fetch_id"]["ms"], id_round_trips=med["fetch_id"]["round_trips"],
            reopen_round_trips=med["fetch_id_reopen"]["round_trips"],
            target_ms=target, rowid_met=bool(lat > 0 and med["fetch_rowid"]["ms"] <= target),
            id_met=bool(lat > 0 and med["fetch_id"]["ms"] <= target),
            # the split of the take's wall time, each part measured: the take with nothing added (server,
            # client and proxy), and what the added latency put on top of it; beside it round trips x latency
            rowid_at_base_ms=base["fetch_rowid"]["ms"], rowid_no_proxy_ms=rig[lat]["rowid_no_proxy_ms"],
            rowid_added_by_latency_ms=med["fetch_rowid"]["ms"] - base["fetch_rowid"]["ms"],
            rowid_latency_share_ms=med["fetch_rowid"]["round_trips"] * lat,
            reopen_latency_share_ms=med["fetch_id_reopen"]["round_trips"] * lat)
    result = dict(command=command, machine=machine, load_average_before=load_before, s3_server=args.s3_server,
                  shape=args.shape, model_shape=shape, passages=n_rows,
                  fragments=frags, data_bytes=data_bytes, mean_tokens=float(n_tokens.mean()),
                  matrix_bytes_mean=blob_bytes, ratio=args.ratio, candidates=args.candidates,
                  latencies_ms=args.latency_ms, cold_first_query=cold, passes=passes, verdict=verdict,
                  upstream_connections=upstream_connections)

    lat_cols = [f"{p['latency_ms']:g} ms" for p in passes]
    server_name = {"moto": "moto (`python -m moto.server`)", "s3rver": "s3rver 3.7.1 (Node)"}[args.s3_server]
    at20 = verdict.get("20")
    lines = [
        f"# Query benchmark on S3 ({args.s3_server} behind a latency proxy): {args.candidates} candidates, "
        f"r = {args.ratio}",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine['platform']}, {machine['cpus']} CPUs (shared with other jobs: load average "
        f"{load_before[0]:.1f} / {load_before[1]:.1f} / {load_before[2]:.1f} at the start, "
        f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} at the end), torch {machine['torch']} "
        f"({machine['torch_threads']} threads), device {machine['device']}, LANCE_IO_THREADS "
        f"{machine['lance_io_threads'] or 'unset (Lance default)'}  ",
        f"Rig: {server_name} and `python -m kalm_store.latency_proxy`, each a process of its own on 127.0.0.1 "
        "(`kalm_store.local_s3`), the benchmark a third.  ",
        f"Layout: {n_rows} passages in {len(frags)} fragments ({', '.join(map(str, sorted(set(frags))))} rows each), "
        f"{data_bytes / 2**20:.0f} MiB of data files; mean {n_tokens.mean():.0f} encoder tokens, "
        f"{blob_bytes / 1024:.1f} KiB per stored r = {args.ratio} matrix (d = {shape['hidden_size']}); "
        "FTS index on text, BTREE on id and text_digest. Model: random T5Gemma2 "
        f"{args.shape} shape {shape}. First stage: LanceDB hybrid (FTS + brought 16-d vectors), "
        f"{args.candidates} candidates. Medians of {args.queries} queries per latency (each stage the fastest of "
        f"{args.repeats} runs), after a warm-up query.",
        "",
        "Each cell: median wall ms / requests / sequential round trips (the longest chain of requests each issued "
        "after the previous one's answer, counted by the proxy).",
        "",
        "| per query | " + " | ".join(lat_cols) + " |",
        "|---|" + "---|" * len(lat_cols),
        *[f"| {LABELS[s]} | " + " | ".join(
            f"{p['median'][s]['ms']:.0f} / {p['median'][s]['requests']:.0f} / {p['median'][s]['round_trips']:.0f}"
            for p in passes) + " |" for s in STAGES],
        "",
        f"The fetch of {args.candidates} candidates against the target (<= 3 round trips' worth of wall time: "
        "3 x the added latency), and what its wall time is made of, each part measured: the same take with "
        f"{base_lat:g} ms added (server, client and proxy time), the same take straight to the server "
        "(no proxy), and what the added latency put on top (wall minus wall at "
        f"{base_lat:g} ms), beside round trips x latency:",
        "",
        "| added latency | target | take by _rowid: ms / rt | met | by id (kept): ms / rt | met | take at "
        f"{base_lat:g} ms added | take, no proxy | added by the latency | round trips x latency |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *[f"| {lat} ms | {v['target_ms']:.0f} ms | {v['rowid_ms']:.0f} / {v['rowid_round_trips']:.0f} | "
          f"{'yes' if v['rowid_met'] else 'no'} | {v['id_ms']:.0f} / {v['id_round_trips']:.0f} | "
          f"{'yes' if v['id_met'] else 'no'} | {v['rowid_at_base_ms']:.0f} ms | {v['rowid_no_proxy_ms']:.0f} ms | "
          f"{v['rowid_added_by_latency_ms']:.0f} ms | {v['rowid_latency_share_ms']:.0f} ms |"
          for lat, v in verdict.items()],
        "",
        *([f"- At 20 ms per request: the take by _rowid {at20['rowid_ms']:.0f} ms in {at20['rowid_round_trips']:.0f} "
           f"round trips, by id {at20['id_ms']:.0f} ms: the <= 60 ms target is "
           + ("met" if at20["rowid_met"] or at20["id_met"] else "not met")
           + f" in wall time with {args.s3_server}; of the take, {at20['rowid_at_base_ms']:.0f} ms are there "
           f"with nothing added (the server's, the client's and the proxy's time on this {machine['cpus']}-core "
           f"host) and {at20['rowid_added_by_latency_ms']:.0f} ms came on top with the latency added "
           f"(round trips x latency: {at20['rowid_latency_share_ms']:.0f} ms; the rest of that difference is "
           "the shared host's noise)."] if at20 else []),
        f"- The server's time per request during a take (median, arrival at the proxy to the server's answer, "
        f"less the added latency, at {base_lat:g} ms): {base['fetch_rowid']['server_ms']:.0f} ms; a take's "
        f"{base['fetch_rowid']['requests']:.0f} requests come on {base['fetch_rowid']['connections']:.0f} client "
        f"connections (Lance sends them together); the proxy opens one upstream connection per client "
        f"connection and reuses it for every request on it: {upstream_connections} in the whole run (Lance's "
        "pool reuses idle connections and opens more for each burst).",
        f"- Cold first query of the session (at {passes[0]['latency_ms']:g} ms): " + "; ".join(
            f"{LABELS[s]} {cold[s]['first_ms']:.0f} ms / {cold[s]['first_requests']:.0f} req / "
            f"{cold[s]['first_round_trips']:.0f} rt"
            for s in STAGES if s != "scoring") + " (file footers, column metadata and indices are read once per "
        "dataset, then kept in its session).",
        "",
    ]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "query_s3" if args.s3_server == "moto" else f"query_s3_{args.s3_server}"
    (out / f"{name}.md").write_text("\n".join(lines))
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))
    print("\n".join(lines))
    print(f"wrote {out / f'{name}.md'} and .json")
    return 0
