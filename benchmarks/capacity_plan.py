"""Capacity plan from measured rates only (issue 22, item 4): 1M, 100M and 1B passages of 256 tokens, r = 4 and 8.

Reads the results files under ``benchmarks/results/`` and computes, per corpus size N and ratio r:

* bytes on disk = N x (matrix column at r + text + id + n_tokens + text_digest + vector + indices), every
  per-passage figure measured at 256 tokens by ``capacity_measure.py`` (``capacity_rates.json``);
* build core-hours (CPU, float32) = N / (build passages/s per thread) / 3600; bfloat16 from the encoder
  speed-up ``bench_bf16.py`` measured on the Nano shape (``bf16_cpu.json``), where present;
* GPU-hours only from a measured GPU encoder rate: none exists yet, and none is invented;
* memory: a build worker's and a serving replica's peak RSS (measured, independent of N); the driver's
  peak grows with N by the measured bytes per passage (``memory_scale.json`` when present, else
  ``memory_build.json``);
* queries per second per serving replica at 100 candidates = 1000 / (first stage + fetch + decode ms
  + scoring ms at r), all measured; on object storage with the fetch figure of ``query_s3_s3rver.json`` (else ``query_s3.json``) when
  present; through HTTP as ``bench_serve.py`` measured it (``serve_*.json``) for the Nano shape, when present.

Every figure names its source file; a source that is missing (or whose keys are not understood) is
named with the fallback used. Run ``capacity_measure.py`` first (``--measure`` does), then:

    python benchmarks/capacity_plan.py                  # writes benchmarks/results/capacity_plan.{md,json}
    python benchmarks/capacity_plan.py --measure        # measure the rates first (about 10 minutes on a shared 2-core host)
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
SIZES = (10**6, 10**8, 10**9)
RATIOS = (4, 8)
CANDIDATES = 100
MIB = 2**20


def _load(results: Path, name: str) -> dict[str, Any] | None:
    path = results / name
    return json.loads(path.read_text("utf-8")) if path.is_file() else None


def _dict_rows(obj: Any) -> list[dict[str, Any]]:
    """Every dict inside ``obj`` (lists and dicts walked), the outer ones first."""
    out, todo = [], [obj]
    while todo:
        x = todo.pop(0)
        if isinstance(x, dict):
            out.append(x)
            todo.extend(x.values())
        elif isinstance(x, list):
            todo.extend(x)
    return out


def _number(row: dict[str, Any], pattern: str) -> float | None:
    """The first numeric value of ``row`` whose key matches ``pattern`` (case-insensitive regex)."""
    for k, v in row.items():
        if re.search(pattern, k, re.I) and isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    return None


# ---------------------------------------------------------------------------------------------- sources
def memory_source(results: Path) -> dict[str, Any]:
    """Driver memory against N: peak RSS at the largest measured size and the growth per passage after it."""
    for name in ("memory_scale.json", "memory_build.json"):
        data = _load(results, name)
        if data is None:
            continue
        engines: dict[str, list[tuple[float, float]]] = {}
        for row in _dict_rows(data):
            # bench_memory.py --scale names the driver's own peak driver_peak_rss_mib; memory_build.json peak_rss_mib
            n = _number(row, r"^passages$")
            peak = _number(row, r"^driver_peak_rss_mib$")
            peak = peak if peak is not None else _number(row, r"^peak_rss_mib$")
            if n and peak:
                engine = str(row.get("engine") or row.get("mode") or "local")
                engines.setdefault(engine, []).append((n, peak))
        fits = {}
        for engine, pts in engines.items():
            pts = sorted(set(pts))
            if len(pts) < 2:
                continue
            (n1, p1), (n2, p2) = pts[-2], pts[-1]
            growth = max(0.0, (p2 - p1) * MIB / (n2 - n1))  # bytes per added passage, the last interval
            fits[engine] = {"largest_passages": n2, "peak_mib": p2, "growth_bytes_per_passage": growth,
                            "points": pts}
        if fits:
            return {"file": name, "engines": fits, "note": None if name == "memory_scale.json" else
                    "memory_scale.json (bounded-memory build at 1M/10M, local and Ray) is absent: the growth is "
                    "today's builder, which keeps every id for the duplicate-id rule; the Ray driver is not measured"}
        note = f"{name} present, but no rows with 'passages' and a peak RSS in MiB were found"
        return {"file": None, "engines": {}, "note": note}
    return {"file": None, "engines": {}, "note": "neither memory_scale.json nor memory_build.json is present"}


def _stage_ms(row: dict[str, Any], pattern: str) -> list[tuple[str, float]]:
    """(key, ms) of every stage of ``row`` whose key matches ``pattern``: ``{"fetch_rowid_ms": 5.0}`` or
    ``{"fetch_rowid": {"ms": 5.0, ...}}`` (the layout of ``bench_query.py --s3``)."""
    out = []
    for k, v in row.items():
        if not re.search(pattern, k, re.I):
            continue
        if isinstance(v, dict) and isinstance(v.get("ms"), (int, float)):
            out.append((k, float(v["ms"])))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and k.endswith("ms"):
            out.append((k, float(v)))
    return out


S3_FILES = ("query_s3_s3rver.json", "query_s3.json")  # s3rver spends about a third of moto's time per request


def s3_source(results: Path) -> dict[str, Any]:
    """First stage and fetch of 100 candidates on object storage at 20 ms per request, if measured: from
    the s3rver run when present (its server time is the smaller part of each fetch), else moto's."""
    name = next((n for n in S3_FILES if (results / n).exists()), S3_FILES[-1])
    data = _load(results, name)
    if data is None:
        return {"file": None, "note": f"{' and '.join(S3_FILES)} are absent: no object-storage query figure"}
    for row in _dict_rows(data):
        if _number(row, r"^latency(_ms)?$") != 20:
            continue
        for stages in ([row["median"]] if isinstance(row.get("median"), dict) else []) + [row]:
            fetch = _stage_ms(stages, r"^fetch")
            first = _stage_ms(stages, r"^first_stage(_ms)?$")
            if fetch and first:
                method, fetch_ms = min(fetch, key=lambda kv: kv[1])
                width = (data.get("model_shape") or {}).get("hidden_size")
                return {"file": name, "latency_ms": 20.0, "first_stage_ms": first[0][1],
                        "fetch_ms": fetch_ms, "fetch_method": method, "matrix_bytes_mean": data.get("matrix_bytes_mean"),
                        "hidden_size": width,
                        "note": f"{name}: the fastest fetch ({method}) at 20 ms per request"
                                + (f", measured with d = {width} matrices ({data['matrix_bytes_mean']:,.0f} B each): "
                                   "Nano's d = 640 reads more bytes per candidate" if width and width != 640
                                   and data.get("matrix_bytes_mean") else "")}
    keys = sorted({k for row in _dict_rows(data) for k in row})[:30]
    return {"file": None, "note": f"{name} present, but no row at latency 20 ms with first-stage and fetch "
                                  f"ms keys was understood (keys: {keys}): no object-storage figure"}


def serve_source(results: Path) -> dict[str, Any]:
    """Requests/s through HTTP at 100 candidates for the Nano shape (d = 640), from any serve_*.json."""
    best = None
    for path in sorted(results.glob("serve_*.json")):
        data = json.loads(path.read_text("utf-8"))
        width = (data.get("model_shape") or {}).get("hidden_size") if isinstance(data, dict) else None
        if width != 640 or data.get("candidates") != CANDIDATES:
            continue
        for row in _dict_rows(data.get("results", [])):
            rps = _number(row, r"^requests_per_s$")
            if rps and row.get("documents", "store") == "store" and (best is None or rps > best["requests_per_s"]):
                best = {"file": path.name, "requests_per_s": rps, "concurrency": row.get("concurrency"),
                        "batching": row.get("batching"), "threads": (data.get("machine") or {}).get("threads")}
    if best is None:
        return {"file": None, "note": "no serve_*.json of the Nano shape (d = 640) at 100 candidates: "
                                      "the HTTP figure is not measured (serve_tiny.json is the tiny model)"}
    return best


def bf16_source(results: Path) -> dict[str, Any]:
    """bfloat16/float32 speed-ups of the encoder and of scoring per r, measured side by side on the Nano shape.

    Two layouts of ``bench_bf16.py`` are read: ``encode_passages_per_s`` / ``score_ms_per_100[dtype][r]``
    (one passage length), and ``encode[dtype].passages_per_s`` / ``score["n/r"][dtype].ms_per_100`` (several
    lengths n: the one closest to 256 tokens is used).
    """
    data = _load(results, "bf16_cpu.json")
    if data is None or (data.get("shape") or {}).get("hidden_size") != 640:
        return {"file": None, "note": "no bf16_cpu.json of the Nano shape: no bfloat16 figure"}
    try:
        if "encode_passages_per_s" in data:
            enc = data["encode_passages_per_s"]
            enc_speedup, enc_tokens = enc["bfloat16"] / enc["float32"], data.get("tokens_per_passage")
            score = data["score_ms_per_100"]
            score_speedup = {int(r): score["float32"][r] / score["bfloat16"][r] for r in score["float32"]}
            score_n = enc_tokens
        else:
            enc = data["encode"]
            enc_speedup = enc["bfloat16"]["passages_per_s"] / enc["float32"]["passages_per_s"]
            enc_tokens = enc.get("tokens_mean")
            cells = list(data["score"].values())
            score_n = min({c["n"] for c in cells}, key=lambda n: abs(n - 256))
            score_speedup = {int(c["r"]): c["float32"]["ms_per_100"] / c["bfloat16"]["ms_per_100"]
                             for c in cells if c["n"] == score_n}
    except (KeyError, TypeError, ZeroDivisionError) as e:
        return {"file": None, "note": f"bf16_cpu.json present, but its layout was not understood ({e!r}): "
                                      "no bfloat16 figure"}
    return {"file": "bf16_cpu.json", "tokens_per_passage": enc_tokens, "score_n": score_n,
            "encoder_speedup": enc_speedup, "score_speedup": score_speedup, "load_before": data.get("load_before")}


def threads_source(results: Path) -> dict[str, Any]:
    """Scoring speed-up of 2 torch threads over 1, Nano shape (the two runs of bench_scoring.py)."""
    one, two = _load(results, "threads_cpu_t1.json"), _load(results, "threads_cpu_t2.json")
    if not one or not two:
        return {"file": None, "note": "threads_cpu_t1/t2.json absent: no 2-core replica figure"}
    return {"file": "threads_cpu_t1.json, threads_cpu_t2.json",
            "speedup_2_over_1": one["results"][0]["fbnl_ms"] / two["results"][0]["fbnl_ms"]}


def gpu_source(results: Path) -> dict[str, Any]:
    """A measured GPU encoder rate (passages/s), if any gpu_*.json holds one; none does so far."""
    for path in sorted(results.glob("gpu_*.json")):
        data = json.loads(path.read_text("utf-8"))
        for row in _dict_rows(data):
            pps = _number(row, r"encode.*passages_per_s")
            if pps:
                return {"file": path.name, "encode_passages_per_s": pps, "device": data.get("device")}
    return {"file": None, "note": "no GPU encoder rate has been measured (no gpu_*.json with one): no GPU-hours"}


# ---------------------------------------------------------------------------------------------- the plan
def plan(rates: dict[str, Any], memory: dict[str, Any], s3: dict[str, Any], serve: dict[str, Any],
         bf16: dict[str, Any], threads: dict[str, Any], gpu: dict[str, Any],
         sizes: tuple[int, ...] = SIZES) -> dict[str, Any]:
    """The computed totals, from the measured rates (pure arithmetic: every step is in the returned dict)."""
    cols = rates["column_bytes_per_passage"]
    other = rates["other_columns"]["bytes_per_row"]
    per_passage_common = {
        "text": cols["text"],  # distinct passages of the build table: no cross-row compression
        "id": other["id (data)"], "n_tokens": other["n_tokens (data)"],
        "text_digest": other["text_digest (data)"], "vector": other["vector (data)"],
        "index: full-text on text": other["text (index)"], "index: BTREE on id": other["id (index)"],
        "index: BTREE on text_digest": other["text_digest (index)"],
        "index: IVF_PQ on vector": other["vector (index)"],
    }
    common = sum(per_passage_common.values())
    q = rates["query_ms_median"]
    per_core = rates["build_passages_per_cpu_s"]  # core-seconds the build used, all its threads
    worker_mib = rates["peak_rss_mib"]["after_build"]
    replica_mib = rates["peak_rss_mib"]["after_queries"]
    steady = rates.get("rss_mib") or {}
    local = memory["engines"].get("local")
    ray = memory["engines"].get("ray")
    rows = []
    for n in sizes:
        for r in RATIOS:
            bpp = cols[f"kalm_r{r}"] + common
            core_h = n / per_core / 3600
            fetch_ms, score_ms = q[f"first_stage_fetch_decode_r{r}_ms"], q[f"score_r{r}_cpu_ms"]
            query_ms = fetch_ms + score_ms
            row = {
                "passages": n, "ratio": r,
                "bytes_per_passage": bpp, "matrix_bytes_per_passage": cols[f"kalm_r{r}"],
                "bytes_on_disk": n * bpp, "matrix_bytes_on_disk": n * cols[f"kalm_r{r}"],
                "build_core_hours_float32": core_h,
                "build_core_hours_bfloat16": core_h / bf16["encoder_speedup"] if bf16.get("file") else None,
                "gpu_hours": n / gpu["encode_passages_per_s"] / 3600 if gpu.get("file") else None,
                "worker_peak_mib": worker_mib, "worker_steady_mib": steady.get("after_build"),
                # the local engine is driver and worker in one process: the model's footprint plus the growth
                "local_build_peak_mib": worker_mib + local["growth_bytes_per_passage"] * n / MIB if local else None,
                "ray_driver_peak_mib": (ray["peak_mib"] + ray["growth_bytes_per_passage"]
                                        * max(0.0, n - ray["largest_passages"]) / MIB) if ray else None,
                "replica_peak_mib": replica_mib, "replica_steady_mib": steady.get("after_queries"),
                "query_ms_1_thread": query_ms,
                # scoring at its CPU time: what one dedicated core takes (the shared host's wall time beside it)
                "qps_per_replica_1_thread": 1000 / query_ms,
                "qps_per_replica_1_thread_wall_shared_host": 1000 / (fetch_ms + q[f"score_r{r}_ms"]),
                "qps_per_replica_2_threads": (1000 / (fetch_ms + score_ms / threads["speedup_2_over_1"])
                                              if threads.get("file") else None),
                "qps_per_replica_1_thread_bfloat16": (1000 / (fetch_ms + score_ms / bf16["score_speedup"][r])
                                                      if bf16.get("file") and r in bf16["score_speedup"] else None),
                "qps_per_replica_1_thread_s3": (1000 / (s3["first_stage_ms"] + s3["fetch_ms"] + score_ms)
                                                if s3.get("file") else None),
            }
            rows.append(row)
    return {"per_passage_common_bytes": per_passage_common, "common_bytes_per_passage": common, "rows": rows}


def _tb(b: float) -> str:
    return f"{b / 1e12:,.2f} TB" if b >= 1e12 else f"{b / 1e9:,.1f} GB"


def _mem(mib: float | None) -> str:
    if mib is None:
        return "not measured"
    return f"{mib / 1024:,.1f} GiB" if mib >= 1024 else f"{mib:,.0f} MiB"


def _opt(x: float | None, fmt: str, missing: str = "not measured") -> str:
    return missing if x is None else format(x, fmt)


def to_markdown(res: dict[str, Any]) -> str:
    rates, src, p = res["rates"], res["sources"], res["plan"]
    q, shape = rates["query_ms_median"], rates["shape"]
    bf16, s3, serve, thr, mem, gpu = (src[k] for k in ("bf16", "s3", "serve", "threads", "memory", "gpu"))
    local, ray = mem["engines"].get("local"), mem["engines"].get("ray")
    lines = [
        f"# Capacity plan: {', '.join(f'{n:,}' for n in res['sizes'])} passages of {rates['target_tokens']} tokens, "
        "r = 4 and 8 (issue 22)", "",
        f"Command: `{res['command']}`", "",
        f"Every total below is computed (the arithmetic is listed under the tables) from rates measured on one "
        f"{rates['machine']['cpu_count']}-core x86_64 host ({rates['machine']['platform']}, torch "
        f"{rates['machine']['torch']}, float32 compute, float16 storage, {rates['machine']['torch_threads']} torch "
        f"thread), with a random-weight T5Gemma2 of the real {rates['shape_name']} shape (d = {shape['hidden_size']}, "
        f"{shape['num_layers']}+{shape['num_layers']} layers, vocabulary {shape['vocab_size']:,}; speed, memory and "
        "bytes do not depend on the weights' values). The host was shared with other engineers' jobs "
        f"(load average {rates['load_average_before']} before the rates run, {rates['load_average_after']} after), "
        "so the CPU rates are pessimistic. No GPU has measured an encoder rate: there is no GPU-hours figure.", "",
        "## Measured rates and where each comes from", "",
        "| rate | value | source |", "|---|---|---|",
        f"| build (tokenize, encode, pool r = 4 and 8, compress, commit), passages per CPU core-second | "
        f"{rates['build_passages_per_cpu_s']:.3f} (wall-clock on the shared host: "
        f"{rates['build_passages_per_s_per_thread']:.3f}/s) | capacity_rates.json (`{rates['command']}`) |",
        f"| matrix bytes per passage, r = 4 / r = 8 (Lance data statistics, {rates['tokens_mean']:.1f} tokens) | "
        f"{rates['column_bytes_per_passage']['kalm_r4']:,.0f} / {rates['column_bytes_per_passage']['kalm_r8']:,.0f} "
        "| capacity_rates.json |",
        f"| other columns and indices, bytes per passage | {p['common_bytes_per_passage']:,.0f} | capacity_rates.json "
        "(itemised below) |",
    ]
    for r in RATIOS:
        lines.append(f"| scoring {CANDIDATES} candidates, r = {r}, CPU ms (1 thread, {rates['prompt_len']}-token prompt; "
                     f"wall-clock {q[f'score_r{r}_ms']:,.0f} ms) | {q[f'score_r{r}_cpu_ms']:,.0f} | capacity_rates.json |")
    for r in RATIOS:
        lines.append(f"| first stage + fetch + decode of {CANDIDATES} candidates, r = {r}, ms (local disk, "
                     f"{rates['fetch_rows']:,}-row table) | {q[f'first_stage_fetch_decode_r{r}_ms']:.1f} | capacity_rates.json |")
    lines += [
        f"| peak RSS of a build worker / of a serving replica ({rates['shape_name']} shape, float32) | "
        f"{rates['peak_rss_mib']['after_build']:,.0f} / {rates['peak_rss_mib']['after_queries']:,.0f} MiB | "
        "capacity_rates.json |",
    ]
    if rates.get("rss_mib"):
        lines.append(f"| resident memory after the build / after the queries (steady state: the peak is loading's "
                     f"transient) | {rates['rss_mib']['after_build']:,.0f} / {rates['rss_mib']['after_queries']:,.0f} MiB "
                     "| capacity_rates.json |")
    for engine, fit in mem["engines"].items():
        lines.append(f"| {engine} build driver: peak RSS at {fit['largest_passages']:,.0f} passages; growth per "
                     f"added passage | {fit['peak_mib']:,.0f} MiB; {fit['growth_bytes_per_passage']:,.0f} B | {mem['file']} |")
    if thr.get("file"):
        lines.append(f"| scoring speed-up, 2 threads over 1 (r = 4, n = 512) | {thr['speedup_2_over_1']:.2f}x | "
                     f"{thr['file']} |")
    if bf16.get("file"):
        lines.append(f"| bfloat16 / float32 speed-up: encoder ({bf16['tokens_per_passage']:.0f}-token passages); "
                     f"scoring at r = {', '.join(str(r) for r in bf16['score_speedup'])} (n = {bf16['score_n']:.0f}; "
                     f"load average {bf16['load_before']}) | {bf16['encoder_speedup']:.2f}x; "
                     f"{', '.join(f'{v:.2f}x' for v in bf16['score_speedup'].values())} | {bf16['file']} |")
    if s3.get("file"):
        lines.append(f"| object storage at 20 ms per request: first stage; fetch of {CANDIDATES} candidates, ms | "
                     f"{s3['first_stage_ms']:.1f}; {s3['fetch_ms']:.1f} | {s3['file']} |")
    if serve.get("file"):
        lines.append(f"| HTTP server, Nano shape, {CANDIDATES} candidates: requests/s (concurrency "
                     f"{serve['concurrency']}, threads {serve['threads']}) | {serve['requests_per_s']:.3f} | {serve['file']} |")
    missing = [s["note"] for s in src.values() if s.get("note")]
    lines += ["", "Sources: what was used with a caveat, and what is missing:", ""] + [f"- {m}" for m in missing]

    lines += ["", "## Storage and build", "",
              "| passages | r | bytes per passage | on disk | of which matrices | build core-hours, CPU float32 | "
              "CPU bfloat16 | GPU-hours |", "|---|---|---|---|---|---|---|---|"]
    for row in p["rows"]:
        lines.append(f"| {row['passages']:,} | {row['ratio']} | {row['bytes_per_passage']:,.0f} | "
                     f"{_tb(row['bytes_on_disk'])} | {_tb(row['matrix_bytes_on_disk'])} | "
                     f"{row['build_core_hours_float32']:,.0f} | {_opt(row['build_core_hours_bfloat16'], ',.0f')} | "
                     f"{_opt(row['gpu_hours'], ',.1f', 'none measured')} |")
    lines += ["", "## Memory and serving", "",
              "| passages | r | build worker, peak | local build (driver + worker), peak | Ray driver, peak | "
              "serving replica, peak | "
              f"QPS per replica at {CANDIDATES} candidates: 1 core | 1 core, wall-clock on the shared host | 2 cores | "
              "1 core, bfloat16 | 1 core, object storage |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in p["rows"]:
        lines.append(f"| {row['passages']:,} | {row['ratio']} | {_mem(row['worker_peak_mib'])} | "
                     f"{_mem(row['local_build_peak_mib'])} | {_mem(row['ray_driver_peak_mib'])} | "
                     f"{_mem(row['replica_peak_mib'])} | {row['qps_per_replica_1_thread']:.3f} | "
                     f"{row['qps_per_replica_1_thread_wall_shared_host']:.3f} | "
                     f"{_opt(row['qps_per_replica_2_threads'], '.3f')} | "
                     f"{_opt(row['qps_per_replica_1_thread_bfloat16'], '.3f')} | "
                     f"{_opt(row['qps_per_replica_1_thread_s3'], '.3f')} |")
    lines += ["", "## The arithmetic", "",
              "Bytes per passage beside the matrix column (the same at r = 4 and r = 8):", "",
              "| part | bytes per passage |", "|---|---|"]
    lines += [f"| {k} | {v:,.1f} |" for k, v in p["per_passage_common_bytes"].items()]
    ex = p["rows"][-2]  # 1B at r = 4
    common = p["per_passage_common_bytes"]
    text_share = (common["text"] + common["index: full-text on text"]) / ex["bytes_per_passage"]
    qms = ex["query_ms_1_thread"]
    lines += [
        "",
        f"- bytes on disk = N x (kalm_r{{r}} + {p['common_bytes_per_passage']:,.0f}); e.g. 1B at r = 4: 1e9 x "
        f"{ex['bytes_per_passage']:,.0f} B = {_tb(ex['bytes_on_disk'])}. `text` is the build table's (distinct "
        "passages, no cross-row compression: an upper bound); the fixed-width columns and the indices are the "
        f"slope between tables of {rates['other_columns']['rows'][0]:,} and {rates['other_columns']['rows'][-1]:,} "
        f"rows ({rates['vector_dim']}-d float32 vectors; IVF_PQ with {rates['other_columns']['ivf_pq']['num_sub_vectors']} "
        "sub-vectors; kalm-store build makes the full-text and BTREE indices, the vector index is the first "
        "stage's choice). Old versions and unindexed appends add to this until `kalm-store optimize`.",
        f"- `text` and its full-text index hold {rates['text_chars_mean']:.0f} characters per passage: the test "
        f"tokenizer packs {rates['text_chars_mean'] / rates['tokens_mean']:.2f} characters per token. Gemma's "
        "tokenizer packs more characters into a token of English, so a real corpus of 256-token passages holds "
        "more text per passage; how much more was not measured here (no Gemma tokenizer offline). Text and "
        f"its index are {100 * text_share:.1f}% "
        "of the bytes at r = 4.",
        f"- build core-hours = N / {rates['build_passages_per_cpu_s']:.3f} passages per CPU core-second / 3600; e.g. "
        f"1B: {ex['build_core_hours_float32']:,.0f}. The rate counts the CPU time the build process used (all its "
        "threads): on a dedicated core the wall time is about the same; on the shared host it was longer "
        "(the wall-clock rate above). Index creation and reading the input are not in the rate. "
        "One encoder pass serves both ratios: the rate was measured writing r = 4 and r = 8 together, so it is an "
        "upper bound for either alone."
        + (f" bfloat16: the float32 figure / {bf16['encoder_speedup']:.2f} (the encoder speed-up measured in "
           f"{bf16['file']}, wall-clock, load average {bf16['load_before']})." if bf16.get("file") else ""),
        f"- build worker and serving replica memory: peak RSS of the measuring process (its steady resident "
        "memory is listed with the rates; the peak is what a machine must hold; it loaded the checkpoint "
        f"from its folder; float32 weights with the {shape['vocab_size']:,}-word embedding), independent of N. A replica's Lance "
        "caches and the first stage's index at 1B rows are not in it.",
    ]
    if local:
        lines.append(f"- local build = worker peak + N x {local['growth_bytes_per_passage']:,.0f} B ({mem['file']}, "
                     f"the growth per passage between its two largest runs); e.g. 1B: {_mem(ex['local_build_peak_mib'])}."
                     + (" " + mem["note"] + "." if mem.get("note") else ""))
    if ray:
        lines.append(f"- Ray driver = {ray['peak_mib']:,.0f} MiB at {ray['largest_passages']:,.0f} passages + "
                     f"(N - that) x {ray['growth_bytes_per_passage']:,.0f} B ({mem['file']}).")
    lines.append(f"- QPS per replica = 1000 / (first stage + fetch + decode ms + scoring CPU ms); e.g. r = 4, 1 core: "
                 f"1000 / ({q['first_stage_fetch_decode_r4_ms']:.1f} + {q['score_r4_cpu_ms']:,.0f}) = "
                 f"{1000 / qms:.3f}. One query at a time per replica: CPU scoring keeps its cores busy. The first "
                 f"stage was a flat vector search over {rates['fetch_rows']:,} rows; at 100M-1B rows it is an ANN index "
                 "query whose latency is not measured here (milliseconds against seconds of CPU scoring).")
    if thr.get("file"):
        lines.append(f"- 2 cores: scoring ms / {thr['speedup_2_over_1']:.2f} ({thr['file']}, r = 4 at n = 512, applied "
                     "at both r); replicas scale out by adding machines, each with its own cores.")
    if bf16.get("file"):
        lines.append(f"- bfloat16 QPS: scoring ms / the scoring speed-up {bf16['file']} measured at that r "
                     f"(n = {bf16['score_n']:.0f}; a ratio it did not measure has no bfloat16 figure here).")
    if s3.get("file"):
        lines.append(f"- object storage: first stage and fetch from {s3['file']} at 20 ms per request, scoring as above.")
    if gpu.get("file"):
        lines.append(f"- GPU-hours = N / {gpu['encode_passages_per_s']:.1f} passages/s / 3600 ({gpu['file']}).")
    ray_est = res.get("ray_build_estimate")
    if ray_est:
        lines.append(f"- Cross-check: `ray_build.md` estimated {ray_est:,.0f} CPU core-hours for 100M Nano passages "
                     "from a FLOP count and a small model's measured FLOP rate; the measured Nano-shape rate above "
                     f"gives {next(r['build_core_hours_float32'] for r in p['rows'] if r['passages'] == 10**8):,.0f}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", type=Path, default=RESULTS, help="results folder to read (default: benchmarks/results)")
    ap.add_argument("--rates", type=Path, default=None,
                    help="the capacity_measure.py output to use (default: RESULTS/capacity_rates.json)")
    ap.add_argument("--measure", action="store_true",
                    help="run capacity_measure.py first (about 10 minutes on a shared 2-core host)")
    ap.add_argument("--measure-args", default="", help="arguments for capacity_measure.py, one string")
    ap.add_argument("--out", type=Path, default=None, help="output prefix (default: RESULTS/capacity_plan)")
    args = ap.parse_args(argv)
    raw = list(sys.argv[1:] if argv is None else argv)
    rates_path = args.rates or args.results / "capacity_rates.json"
    if args.measure:
        extra = shlex.split(args.measure_args)
        if "--out" not in extra:  # the rates land where this run reads them
            extra += ["--out", str(rates_path.with_suffix(""))]
        cmd = [sys.executable, str(Path(__file__).with_name("capacity_measure.py")), *extra]
        if subprocess.run(cmd).returncode != 0:
            raise SystemExit(f"{shlex.join(cmd)} failed")
        if "--out" in shlex.split(args.measure_args):
            rates_path = Path(shlex.split(args.measure_args)[shlex.split(args.measure_args).index("--out") + 1]
                              + ".json")
    if not rates_path.is_file():
        raise SystemExit(f"{rates_path} does not exist: run `python benchmarks/capacity_measure.py` first "
                         "(or this script with --measure)")
    rates = json.loads(rates_path.read_text("utf-8"))
    sources = {"memory": memory_source(args.results), "s3": s3_source(args.results),
               "serve": serve_source(args.results), "bf16": bf16_source(args.results),
               "threads": threads_source(args.results), "gpu": gpu_source(args.results),
               "rates": {"file": rates_path.name}}
    res = {"command": "python benchmarks/capacity_plan.py" + "".join(f" {shlex.quote(a)}" for a in raw),
           "sizes": list(SIZES), "ratios": list(RATIOS), "candidates": CANDIDATES, "rates": rates,
           "sources": sources, "plan": plan(rates, **{k: v for k, v in sources.items() if k != "rates"})}
    ray_build = _load(args.results, "ray_build.json")
    if ray_build and rates.get("shape_name") == "nano":
        res["ray_build_estimate"] = ray_build["estimate_100m"]["Nano"]["cpu_core_hours_at_measured_rate"]
    out = args.out or args.results / "capacity_plan"
    out.parent.mkdir(parents=True, exist_ok=True)
    md = to_markdown(res)
    Path(f"{out}.md").write_text(md, "utf-8")
    Path(f"{out}.json").write_text(json.dumps(res, indent=2) + "\n", "utf-8")
    print(md)
    print(f"wrote {out}.md and {out}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
