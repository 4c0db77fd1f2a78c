"""Issue 8, optional item: does a cache of projected cross keys/values pay? Measured on a Zipf workload.

Run:  .venv/bin/python benchmarks/bench_kv_cache.py [--corpus 10000] [--queries 8] [--warmup 200]
      [--candidates 100] [--n 512] [--ratio 4] [--zipf 1.0] [--cache-mib 512 2048 8192]
      [--batch-size 32] [--threads N] [--quick] [--output PREFIX]
Writes PREFIX.md and PREFIX.json (default benchmarks/results/kv_cache_cpu; with --quick a temp file).

The decoder reads a stored passage only through its cross keys/values: ``decoder.project_states`` turns
the passage's ``(m, d)`` matrix into one ``(m, layers, 2, KV, hd)`` tensor, and a cache keyed by passage
id could keep that tensor for passages fetched often, so a hit skips the projection. This benchmark
scores one workload with no cache and with an LRU cache of each size, query by query (paired, order
alternating), with the same ``decoder.margins`` call, and reports hit rate, time and memory.

Workload: N stored matrices of the Nano shape (``ceil(n/r)`` random float16 rows each: speed does not
depend on the values); each query's C candidates are drawn without replacement with P(passage i)
proportional to 1 / i^s (Zipf). Real candidate sets come from a first stage and depend on the query;
Zipf over a small corpus models popular passages generously, so the hit rates here are optimistic for
a corpus of millions. The caches are first warmed on ``--warmup`` queries' ids: an LRU's content
depends on the id sequence alone, so the warm-up replays ids and projects only the passages left
resident (untimed).
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scoring import NANO, TINY, _machine, loadavg, random_model, write_results  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PROFILES = {
    "full": dict(shape=NANO, corpus=10_000, queries=8, warmup=200, candidates=100, n=512, ratio=4,
                 cache_mib=[512.0, 2048.0, 8192.0], batch_size=32, prompt_len=60),
    "quick": dict(shape=TINY, corpus=200, queries=3, warmup=10, candidates=8, n=64, ratio=4,
                  cache_mib=[0.1, 0.5], batch_size=4, prompt_len=20),
}
HEADER = "| cache | passages held | hit rate | ms / query | speed-up vs no cache | max abs margin diff |"


def _log(msg: str) -> None:
    print(f"[bench_kv_cache {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class LRU:
    """Projected cross keys/values by passage id, least recently used evicted beyond ``capacity`` bytes."""

    def __init__(self, capacity: int, item_bytes: int) -> None:
        self.capacity, self.item_bytes = capacity, item_bytes
        self.items: OrderedDict[int, Any] = OrderedDict()
        self.hits = self.lookups = 0

    def get(self, key: int) -> Any:
        self.lookups += 1
        value = self.items.get(key)
        if value is not None:
            self.items.move_to_end(key)
            self.hits += 1
        return value

    def put(self, key: int, value: Any) -> None:
        self.items[key] = value
        self.items.move_to_end(key)
        while len(self.items) * self.item_bytes > self.capacity:
            self.items.popitem(last=False)

    def replay(self, keys: list[int]) -> None:
        """Warm-up: the LRU order that ``keys`` would leave, without values (filled by the caller)."""
        for key in keys:
            self.put(key, True)


def run(args: argparse.Namespace) -> dict[str, object]:
    import numpy as np
    import torch

    from kalm_store import decoder

    torch.set_num_threads(args.threads)
    load_before = loadavg()
    prompt: list[int] = []
    hf_model, tokenizer, model = random_model(args.shape, prompt, "random")
    dec = model._decoder
    g = torch.Generator().manual_seed(0)
    vocab = hf_model.config.decoder.vocab_size
    prompt.extend([tokenizer.bos_token_id] + torch.randint(10, vocab, (args.prompt_len - 1,), generator=g).tolist())
    with torch.inference_mode():
        prepared = decoder.prepare(dec, torch.tensor(prompt), torch.float32)
    rows = -(-args.n // args.ratio)
    d = args.shape["hidden_size"]
    corpus = torch.randn(args.corpus, rows, d, generator=g).to(torch.float16)  # (N, m, d) stored matrices
    item_bytes = rows * len(dec.layers) * 2 * dec.n_kv * dec.head_dim * 4  # one passage's float32 cross K/V
    _log(f"corpus {args.corpus} x ({rows}, {d}) float16 = {corpus.numel() * 2 / 2**20:.0f} MiB; "
         f"one cached passage = {item_bytes / 2**20:.2f} MiB")

    rng = np.random.default_rng(0)
    p = 1.0 / np.arange(1, args.corpus + 1) ** args.zipf
    p /= p.sum()

    def draw() -> list[int]:
        return rng.choice(args.corpus, size=args.candidates, replace=False, p=p).tolist()

    def states(ids: list[int]) -> torch.Tensor:
        return corpus[ids].to(torch.float32)  # (B, m, d) upcast, as KaLMModel.score does

    mask = torch.ones(args.batch_size, rows, dtype=torch.bool)

    @torch.inference_mode()
    def no_cache(ids: list[int]) -> torch.Tensor:
        out = []
        for s in range(0, len(ids), args.batch_size):
            batch = ids[s:s + args.batch_size]
            out.append(decoder.margins(dec, prepared, states(batch), mask[: len(batch)]))
        return torch.cat(out)

    @torch.inference_mode()
    def cached(cache: LRU, ids: list[int]) -> torch.Tensor:
        out = []
        for s in range(0, len(ids), args.batch_size):
            batch = ids[s:s + args.batch_size]
            found = {i: v for i in batch if (v := cache.get(i)) is not None}  # before inserting this batch's misses
            misses = [i for i in batch if i not in found]
            if misses:
                projected = decoder.project_states(dec, states(misses))  # (b, m, layers, 2, KV, hd)
                for i, value in zip(misses, projected):
                    found[i] = value.clone()  # own storage: the batch tensor is freed after this batch
                    cache.put(i, found[i])
            cross = torch.stack([found[i] for i in batch])
            out.append(decoder.margins(dec, prepared, None, mask[: len(batch)], cross=cross))
        return torch.cat(out)

    warm_ids = [i for _ in range(args.warmup) for i in draw()]
    caches = {mib: LRU(int(mib * 2**20), item_bytes) for mib in args.cache_mib}
    with torch.inference_mode():
        for mib, cache in caches.items():
            cache.replay(warm_ids)
            keys = list(cache.items)
            for s in range(0, len(keys), args.batch_size):
                part = keys[s:s + args.batch_size]
                for i, value in zip(part, decoder.project_states(dec, states(part))):
                    cache.items[i] = value.clone()  # keeps the replayed LRU order
            cache.hits = cache.lookups = 0
            _log(f"cache {mib:g} MiB warmed: {len(cache.items)} passages")
    no_cache(draw()[: args.batch_size])  # warm-up of the code path

    times: dict[str, list[float]] = {"none": [], **{f"{mib:g}": [] for mib in caches}}
    proj_ms: list[float] = []
    max_diff = 0.0
    for q in range(args.queries):
        ids = draw()
        order = ["none", *caches] if q % 2 == 0 else [*caches, "none"]
        results = {}
        for which in order:
            t = time.perf_counter()
            margins = no_cache(ids) if which == "none" else cached(caches[which], ids)
            elapsed = time.perf_counter() - t
            times["none" if which == "none" else f"{which:g}"].append(elapsed)
            results[which] = margins
        reference = results["none"]
        for mib in caches:
            max_diff = max(max_diff, float((results[mib] - reference).abs().max()))
        with torch.inference_mode():
            t = time.perf_counter()
            for s in range(0, len(ids), args.batch_size):
                decoder.project_states(dec, states(ids[s:s + args.batch_size]))
            proj_ms.append(1000 * (time.perf_counter() - t))
        _log(f"query {q + 1}/{args.queries}: " + ", ".join(f"{k} {1000 * v[-1]:.0f} ms" for k, v in times.items()))

    base = statistics.median(times["none"])
    rows_out = [{"cache_mib": None, "passages_held": 0, "hit_rate": 0.0, "ms_per_query": 1000 * base,
                 "speedup": 1.0}]
    for mib, cache in caches.items():
        ms = statistics.median(times[f"{mib:g}"])
        paired = statistics.median(b / c for b, c in zip(times["none"], times[f"{mib:g}"]))
        rows_out.append({"cache_mib": mib, "passages_held": len(cache.items),
                         "hit_rate": cache.hits / max(cache.lookups, 1), "ms_per_query": 1000 * ms,
                         "speedup": paired})
    share = statistics.median(proj_ms) / (1000 * base)
    return {
        "benchmark": "bench_kv_cache", "command": args.command, "machine": _machine(args.threads),
        "load_average_before": load_before, "load_average_after": loadavg(),
        "shape": args.shape, "corpus": args.corpus, "queries": args.queries, "warmup": args.warmup,
        "candidates": args.candidates, "n": args.n, "ratio": args.ratio, "rows": rows, "zipf": args.zipf,
        "batch_size": args.batch_size, "prompt_len": args.prompt_len,
        "cached_passage_bytes": item_bytes, "stored_passage_bytes_raw": rows * d * 2,
        "projection_share": share, "speedup_bound_all_hits": 1 / (1 - share),
        "max_abs_margin_diff": max_diff, "times_s": times, "results": rows_out,
    }


def to_markdown(res: dict) -> str:
    m = res["machine"]
    lines = [
        "# Cache of projected cross keys/values: Zipf workload (CPU, float32)",
        "",
        f"Command: `{res['command']}`",
        "",
        f"Machine: {m['processor']}, {m['cpu_count']} CPUs ({m['torch_threads']} torch threads), {m['platform']}; "
        f"torch {m['torch']}. Load average before/after: {res['load_average_before']} / {res['load_average_after']}.",
        "",
        f"Workload: {res['corpus']} stored passages of {res['n']} tokens at r = {res['ratio']} ({res['rows']} rows), "
        f"{res['candidates']} candidates per query drawn with Zipf s = {res['zipf']}, {res['queries']} timed queries "
        f"after {res['warmup']} warm-up queries; batches of {res['batch_size']}, {res['prompt_len']}-token prompt; "
        "medians, speed-up = median of per-query paired ratios.",
        "",
        HEADER,
        "|---|---|---|---|---|---|",
    ]
    for row in res["results"]:
        name = "none" if row["cache_mib"] is None else f"{row['cache_mib']:g} MiB"
        diff = "" if row["cache_mib"] is None else f"{res['max_abs_margin_diff']:.1e}"
        lines.append(f"| {name} | {row['passages_held']} | {100 * row['hit_rate']:.0f}% | {row['ms_per_query']:.0f} | "
                     f"{row['speedup']:.2f}x | {diff} |")
    lines += [
        "",
        f"One cached passage: {res['cached_passage_bytes'] / 2**20:.2f} MiB of float32 keys/values, "
        f"{res['cached_passage_bytes'] / res['stored_passage_bytes_raw']:.0f}x its stored float16 matrix "
        f"({res['stored_passage_bytes_raw'] / 2**10:.0f} KiB raw).",
        f"The projection is {100 * res['projection_share']:.0f}% of the uncached scoring time, so even a cache "
        f"that always hits gains at most {res['speedup_bound_all_hits']:.2f}x here.",
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", type=int, default=None, help="stored passages (default 10000; quick 200)")
    p.add_argument("--queries", type=int, default=None, help="timed queries (default 8; quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="queries replayed to warm the caches (default 200)")
    p.add_argument("--candidates", type=int, default=None, help="candidates per query (default 100; quick 8)")
    p.add_argument("--n", type=int, default=None, help="passage tokens before pooling (default 512; quick 64)")
    p.add_argument("--ratio", type=int, default=None, help="MEP ratio of the stored matrices (default 4)")
    p.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent s of passage popularity (default 1.0)")
    p.add_argument("--cache-mib", type=float, nargs="+", default=None,
                   help="LRU cache sizes in MiB (default 512 2048 8192; quick 0.1 0.5)")
    p.add_argument("--batch-size", type=int, default=None, help="candidates per decoder pass (default 32)")
    p.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 60; quick 20)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: os.cpu_count())")
    p.add_argument("--quick", action="store_true", help="tiny model and sizes: a smoke run in seconds")
    p.add_argument("--output", default=None, help="output prefix for .md/.json (default: "
                   "benchmarks/results/kv_cache_cpu; with --quick a temp file)")
    args = p.parse_args(argv)
    profile = PROFILES["quick" if args.quick else "full"]
    for key in ("corpus", "queries", "warmup", "candidates", "n", "ratio", "cache_mib", "batch_size", "prompt_len"):
        if getattr(args, key) is None:
            setattr(args, key, profile[key])
    args.shape = profile["shape"]
    from kalm_store.pooling import check_ratio

    check_ratio(args.ratio)
    if args.candidates > args.corpus:
        p.error(f"--candidates {args.candidates} exceeds --corpus {args.corpus}")
    for name in ("corpus", "queries", "candidates", "n", "batch_size", "prompt_len", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0 or any(c <= 0 for c in args.cache_mib):
        p.error("--warmup must be >= 0 and every --cache-mib > 0")
    args.command = "python benchmarks/bench_kv_cache.py" + "".join(f" {shlex.quote(a)}" for a in (argv or sys.argv[1:]))
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    res = run(args)
    prefix = Path(args.output) if args.output else (
        Path(tempfile.mkdtemp()) / "kv_cache_quick" if args.quick else RESULTS / "kv_cache_cpu")
    write_results(prefix, to_markdown(res), res)


if __name__ == "__main__":
    main()
