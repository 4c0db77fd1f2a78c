"""Throughput and latency of `kalm-store serve` under closed-loop clients, beside bare KaLMModel.score.

Run:  .venv/bin/python benchmarks/bench_serve.py [--shape tiny|small|nano] [--quick] [--candidates 100] ...
Writes benchmarks/results/serve_<shape>.md and .json (machine and exact command included).

A `kalm-store serve` process (127.0.0.1, a free port) serves a table of stdlib-docstring passages at
r = 4; this process runs C client threads (C = 1, 4, 16), each posting one `/v2/rerank` request of
100 passage texts at a time and waiting for the answer (closed loop), for a bounded number of
requests per level. Measured per level: requests/s, candidates/s, p50 and p99 latency, mean
candidates and queries per decoder pass (from the server's `/info`); with batching across requests
on, and off (`--no-batching`, a second server process, running at the same time and measured right
after the first at each level); with documents found in the store (by text digest) and with texts
the table does not hold (encoded online). In the same run, bare `KaLMModel.score` on the same
candidates (the stored matrices) gives the throughput a server could at best reach. First, a sweep
of the CPU cost per candidate of packed passes by row budget (thread CPU time) shows what the
server's CPU default budget rests on.

The model is a random-weight T5Gemma2 of the chosen shape (scores are meaningless, arithmetic is real).
The machine may be shared with other work: compare the ratios measured side by side in one run, not
absolute numbers across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

SHAPES = {
    "tiny": dict(hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=1, head_dim=32, intermediate_size=128,
                 sliding_window=16, sliding_window_pattern=3),
    "small": dict(hidden_size=256, num_layers=6, num_heads=4, num_kv_heads=1, head_dim=64, intermediate_size=1024,
                  sliding_window=512, sliding_window_pattern=6),
    # the Nano decoder's shape (benchmarks/bench_query.py): realistic scoring cost, slow on a shared CPU
    "nano": dict(hidden_size=640, num_layers=18, num_heads=4, num_kv_heads=1, head_dim=256, intermediate_size=2048,
                 sliding_window=512, sliding_window_pattern=6),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A `kalm-store serve` subprocess on 127.0.0.1, stopped (SIGTERM, then kill) on exit."""

    def __init__(self, db: Path, model: Path, *extra: str) -> None:
        import httpx

        self.url = f"http://127.0.0.1:{free_port()}"
        port = self.url.rsplit(":", 1)[1]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kalm_store", "serve", "--db", str(db), "--table", "docs", "--model", str(model),
             "--host", "127.0.0.1", "--port", port, "--device", "cpu", "--log-level", "warning",
             "--max-pending", "256", *extra], stderr=subprocess.PIPE, text=True)
        end = time.monotonic() + 300
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise SystemExit(f"server failed: {self.proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.close()
        raise SystemExit("server did not start in 300 s")

    def batcher(self) -> dict:
        import httpx

        return httpx.get(f"{self.url}/info", timeout=60).json()["batcher"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)


def closed_loop(url: str, bodies: list[dict], concurrency: int, max_seconds: float) -> dict:
    """C threads post ``bodies`` in order, one request in flight each; stop issuing after ``max_seconds``."""
    import httpx

    lock = threading.Lock()
    nxt = [0]
    latencies: list[float] = []
    failures = [0]
    start = time.perf_counter()

    def client() -> None:
        with httpx.Client(timeout=600) as c:
            while True:
                with lock:
                    i = nxt[0]
                    if i >= len(bodies) or time.perf_counter() - start > max_seconds:
                        return
                    nxt[0] += 1
                t0 = time.perf_counter()
                r = c.post(f"{url}/v2/rerank", json=bodies[i])
                dt = time.perf_counter() - t0
                with lock:
                    if r.status_code == 200:
                        latencies.append(dt)
                    else:
                        failures[0] += 1

    with ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(client) for _ in range(concurrency)]:
            f.result()
    wall = time.perf_counter() - start
    lat = np.array(latencies)
    n = len(latencies)
    cands = sum(len(b["documents"]) for b in bodies[:n])
    return {"requests": n, "failures": failures[0], "wall_s": wall, "requests_per_s": n / wall,
            "latency_sum_s": float(lat.sum()),
            "candidates_per_s": cands / wall, "p50_ms": float(np.percentile(lat, 50) * 1000) if n else None,
            "p99_ms": float(np.percentile(lat, 99) * 1000) if n else None}


def pass_sweep(model, mats: list, queries: list[str], budgets: list[int], candidates: int) -> list[dict]:
    """CPU seconds of ``score_many`` for 4 queries x ``candidates`` packed, at each row budget per pass.

    Thread CPU time, not wall time: on a shared machine it measures the work, not the waiting for a
    core. Best of 2. This is what the server's CPU default row budget rests on.
    """
    sets = [[mats[(i * candidates + j) % len(mats)] for j in range(candidates)] for i in range(4)]  # (wraps around)

    def cpu(f) -> float:
        best = float("inf")
        for _ in range(2):
            t0 = time.thread_time()
            f()
            best = min(best, time.thread_time() - t0)
        return best

    out = [{"setting": "KaLMModel.score, one query at a time (batch_size 32)",
            "cpu_candidates_per_s": 4 * candidates / cpu(lambda: [model.score(q, m) for q, m in zip(queries, sets)])}]
    for rows in budgets:
        s = cpu(lambda: model.score_many(queries[:4], sets, batch_size=4 * candidates, max_rows=rows))
        out.append({"setting": f"score_many, 4 queries packed, {rows} rows per pass", "max_rows": rows,
                    "cpu_candidates_per_s": 4 * candidates / s})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="small", help="model shape (default: small)")
    p.add_argument("--passages", type=int, default=300, help="rows in the table (default: 300)")
    p.add_argument("--max-words", type=int, default=60, help="words per passage at most (default: 60)")
    p.add_argument("--candidates", type=int, default=100, help="documents per request (default: 100)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16], help="client threads (default: 1 4 16)")
    p.add_argument("--rounds", type=int, default=1,
                   help="requests per client thread at each level, at least 4 requests a level (default: 1)")
    p.add_argument("--max-seconds", type=float, default=60, help="stop issuing requests at a level after (default: 60)")
    p.add_argument("--bare-requests", type=int, default=4,
                   help="bare KaLMModel.score calls timed beside each level (default: 4)")
    p.add_argument("--max-batch-rows", type=int, default=None,
                   help="server's padded rows per decoder pass (default: the server's, 1024 on the CPU)")
    p.add_argument("--sweep", type=int, nargs="*", default=[512, 1024, 2048, 4096, 8192],
                   help="row budgets whose CPU cost per candidate is measured first (default: 512 ... 8192; "
                        "none: skip)")
    p.add_argument("--no-online", action="store_true", help="skip the texts-encoded-online levels")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of this process and of the server (default: 1; steadier on a shared machine)")
    p.add_argument("--quick", action="store_true", help="tiny shape, 120 passages, 20 candidates, C = 1 and 4")
    p.add_argument("--output", default=None, help="results path prefix (default: benchmarks/results/serve_<shape>)")
    args = p.parse_args(argv)
    if args.quick:
        args.shape, args.passages, args.candidates, args.concurrency, args.rounds = "tiny", 120, 20, [1, 4], 1
        args.bare_requests, args.sweep = 2, [1024]
    if args.candidates > args.passages:
        raise SystemExit(f"--candidates ({args.candidates}) must not exceed --passages ({args.passages})")

    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the server processes
    import torch

    torch.set_num_threads(args.threads)
    from kalm_store import KaLMModel, PassageStore
    from kalm_store.corpus import stdlib_passages
    from kalm_store.testing import TinyShape, make_test_model

    load_start = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="kalm-bench-serve-"))
    folder = make_test_model(work / "model", TinyShape(**SHAPES[args.shape], vocab_size=1024))
    model = KaLMModel.from_pretrained(folder, device="cpu")
    docs = stdlib_passages(args.passages, max_words=args.max_words)
    store = PassageStore.create(str(work / "db"), "docs", model, ratios=[4])
    store.add(docs)
    store.update_indices()
    texts = [d["text"] for d in docs]
    ids = [d["id"] for d in docs]
    rng = np.random.default_rng(0)
    levels = list(args.concurrency)
    n_bodies = max(max(4, c * args.rounds) for c in levels)
    picks = [rng.choice(len(docs), args.candidates, replace=False).tolist() for _ in range(n_bodies)]
    queries = [f"how do I use {ids[int(p[0])].split('.')[0]} to read a file? ({i})" for i, p in enumerate(picks)]

    def stored_bodies() -> list[dict]:
        return [{"query": queries[i], "documents": [texts[j] for j in picks[i]], "picks": picks[i]}
                for i in range(n_bodies)]

    def online_bodies(tag: str) -> list[dict]:  # texts the table does not hold: each request's are new
        return [{"query": queries[i], "documents": [f"{texts[j]} ({tag} {i})" for j in picks[i]], "picks": picks[i]}
                for i in range(n_bodies)]

    def strip(bodies: list[dict]) -> list[dict]:
        return [{k: v for k, v in b.items() if k != "picks"} for b in bodies]

    mats_all = dict(zip(ids, store.matrices(ids, 4)))

    def bare(bodies: list[dict]) -> dict:
        """Bare KaLMModel.score (its defaults) of (up to ``--bare-requests`` of) the bodies' stored candidates,
        timed now: beside each level, so that both see the same load on a shared machine."""
        sets = [(b["query"], [mats_all[ids[j]] for j in b["picks"]]) for b in bodies[:args.bare_requests]]
        t0, c0 = time.perf_counter(), time.thread_time()
        for q, mats in sets:
            model.score(q, mats)
        s = (time.perf_counter() - t0) / len(sets)
        cpu = (time.thread_time() - c0) / len(sets)
        return {"seconds_per_request": s, "candidates_per_s": args.candidates / s,
                "cpu_candidates_per_s": args.candidates / cpu}

    def mean_bare(a: dict, b: dict) -> dict:
        return {k: (a[k] + b[k]) / 2 for k in a}

    model.score(queries[0], [mats_all[i] for i in ids[:args.candidates]])  # warm-up
    sweep = pass_sweep(model, [mats_all[i] for i in ids], queries, args.sweep, args.candidates) if args.sweep else []
    for row in sweep:
        print(json.dumps(row), flush=True)

    # Both servers run at once, and each level is measured on one right after the other (bare first):
    # the batched/unbatched ratio compares runs seconds apart, under the same load.
    extra = ["--max-batch-rows", str(args.max_batch_rows)] if args.max_batch_rows else []
    servers = {True: Server(work / "db", folder, *extra), False: Server(work / "db", folder, *extra, "--no-batching")}
    rows = []
    try:
        for server in servers.values():
            closed_loop(server.url, strip(stored_bodies()[:2]), 1, args.max_seconds)  # warm-up
        max_batch_rows = httpx_info(servers[True].url)["max_batch_rows"]
        runs = [(b, "store", c) for c in levels for b in (True, False)]
        if not args.no_online:
            runs += [(True, "online", levels[0]), (True, "online", levels[-1])]
        level_rows: list[dict] = []
        for n, (batching, source, c) in enumerate(runs):
            server = servers[batching]
            bodies = stored_bodies() if source == "store" else online_bodies(f"c{c}")
            bodies = bodies[:max(4, c * args.rounds)]
            if batching:  # once per level, before it: the unbatched run right after shares it
                before_bare, level_rows = bare(bodies), []
            before = server.batcher()
            res = closed_loop(server.url, strip(bodies), c, args.max_seconds)
            after = server.batcher()
            passes = after["decoder_passes"] - before["decoder_passes"]
            scoring = after["score_seconds"] - before["score_seconds"]
            cands = after["candidates"] - before["candidates"]
            res |= {"batching": batching, "documents": source, "concurrency": c,
                    "worker_cpu_candidates_per_s": cands / (after["score_cpu_seconds"] - before["score_cpu_seconds"]),
                    "mean_candidates_per_pass": cands / passes if passes else 0,
                    "mean_queries_per_pass": ((after["mean_queries_per_pass"] * after["decoder_passes"]
                                               - before["mean_queries_per_pass"] * before["decoder_passes"]) / passes
                                              if passes else 0),
                    "load_average_1m": os.getloadavg()[0],
                    # the clients' summed waiting time that the scoring worker did not spend scoring
                    "outside_scoring_share": 1 - scoring / res["latency_sum_s"] if c == 1 else None}
            rows.append(res)
            level_rows.append(res)
            last_of_level = n + 1 == len(runs) or runs[n + 1][0]  # the next run opens a new level
            if last_of_level:  # bare again after the level: its mean with the one before brackets the load
                base = mean_bare(before_bare, bare(bodies))
                for r in level_rows:
                    r |= {"bare_candidates_per_s": base["candidates_per_s"],
                          "bare_cpu_candidates_per_s": base["cpu_candidates_per_s"],
                          "vs_bare": r["candidates_per_s"] / base["candidates_per_s"],
                          # scoring work per candidate, server worker vs bare (thread CPU time: load-blind)
                          "worker_cpu_vs_bare": r["worker_cpu_candidates_per_s"] / base["cpu_candidates_per_s"]}
                    print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}),
                          flush=True)
    finally:
        for server in servers.values():
            server.close()
    load_end = os.getloadavg()

    def find(batching: bool, source: str, c: int) -> dict | None:
        return next((r for r in rows if r["batching"] == batching and r["documents"] == source
                     and r["concurrency"] == c), None)

    top, low = levels[-1], levels[0]
    batched_top, unbatched_top, single = find(True, "store", top), find(False, "store", top), find(True, "store", low)
    summary = {
        f"throughput_c{top}_vs_bare": batched_top["vs_bare"],
        f"batched_vs_unbatched_c{top}": batched_top["candidates_per_s"] / unbatched_top["candidates_per_s"],
        f"throughput_c{top}_vs_bare_cpu": batched_top["worker_cpu_vs_bare"],
        f"batched_vs_unbatched_cpu_c{top}": (batched_top["worker_cpu_candidates_per_s"]
                                              / unbatched_top["worker_cpu_candidates_per_s"]),
        # at C = 1 a request's time is its scoring + what HTTP, JSON, digest lookup and fetching add
        f"overhead_share_c{low}": single["outside_scoring_share"],
    }
    command = "python benchmarks/bench_serve.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    machine = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
               "threads": torch.get_num_threads(), "shared": True, "load_average_start": load_start,
               "load_average_end": load_end}
    out = {"command": command, "machine": machine, "shape": args.shape, "model_shape": SHAPES[args.shape],
           "candidates": args.candidates, "passages": args.passages, "max_batch_rows": max_batch_rows,
           "pass_sweep": sweep, "results": rows, "summary": summary}
    prefix = Path(args.output) if args.output else Path(__file__).parent / "results" / f"serve_{args.shape}"
    prefix.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{prefix}.json").write_text(json.dumps(out, indent=2))
    shape_words = ", ".join(f"{k}={v}" for k, v in SHAPES[args.shape].items() if k in
                            ("hidden_size", "num_layers", "head_dim", "intermediate_size"))
    lines = [f"# Serve benchmark: shape {args.shape} ({shape_words}; random weights), {args.candidates} candidates "
             "per request, r = 4", "",
             f"Command: `{command}`  ",
             f"Machine: {machine['platform']}, {machine['cpu_count']} CPUs, torch {machine['torch']} "
             f"({machine['threads']} threads), device cpu; **shared with other engineers' jobs while it ran**: load "
             f"average (1 min) {load_start[0]:.1f} at the start, {load_end[0]:.1f} at the end (per level in the "
             "table) on 2 cores: compare the ratios of this run, not absolute numbers.  ",
             f"Server: default settings, {max_batch_rows} padded stored rows per decoder pass, no candidate cap. "
             "'bare' is `KaLMModel.score` (its defaults) of the same candidates' stored matrices in this process, "
             "timed just before and just after each level (the mean of both); in between, the batched and the "
             "unbatched server (both running) are measured one right after the other. 'vs bare' = server "
             "candidates/s / bare candidates/s (wall time: what the targets ask). 'CPU vs bare' = candidates per "
             "CPU second of the server's scoring thread / of bare scoring (thread CPU time, which other jobs' load "
             "does not change: how efficient the server's passes are).", ""]
    if sweep:
        lines += ["## CPU cost per candidate by pass size", "",
                  f"Thread CPU seconds (not wall time: the machine is shared) of 4 queries x {args.candidates} "
                  "candidates, best of 2; what the CPU default row budget per pass rests on.", "",
                  "| setting | candidates per CPU second |", "|---|---|"]
        lines += [f"| {r['setting']} | {r['cpu_candidates_per_s']:.0f} |" for r in sweep]
        lines += ["", "## Server under closed-loop clients", ""]
    lines += ["| batching | documents | clients | requests | req/s | candidates/s | bare cand/s | vs bare | CPU vs bare | "
              "p50 ms | p99 ms | candidates per pass | queries per pass | load avg |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {'on' if r['batching'] else 'off'} | {r['documents']} | {r['concurrency']} | {r['requests']} | "
                     f"{r['requests_per_s']:.2f} | {r['candidates_per_s']:.0f} | {r['bare_candidates_per_s']:.0f} | "
                     f"{r['vs_bare']:.2f} | {r['worker_cpu_vs_bare']:.2f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['mean_candidates_per_pass']:.1f} | "
                     f"{r['mean_queries_per_pass']:.2f} | {r['load_average_1m']:.1f} |")
    lines += ["", f"- at {top} clients, server throughput / bare scoring = {summary[f'throughput_c{top}_vs_bare']:.2f} "
                  f"(target >= 0.85); per CPU second of scoring: {batched_top['worker_cpu_vs_bare']:.2f}",
              f"- at {top} clients, batched / unbatched server = {summary[f'batched_vs_unbatched_c{top}']:.2f} (target >= 1); "
              f"per CPU second of scoring: {summary[f'batched_vs_unbatched_cpu_c{top}']:.2f}",
              f"- at {low} client, share of a request's time outside scoring (HTTP, JSON, digest lookup, fetch) = "
              f"{summary[f'overhead_share_c{low}']:.1%} (target <= 5%; the clients' summed latency minus the worker's "
              "scoring time, over the latency)", ""]
    Path(f"{prefix}.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


def httpx_info(url: str) -> dict:
    import httpx

    return httpx.get(f"{url}/info", timeout=60).json()


if __name__ == "__main__":
    sys.exit(main())
