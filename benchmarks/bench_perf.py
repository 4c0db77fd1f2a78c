"""Decoder performance suite (issue 8): FBNL vs joint at n = 512 and 4096, r = 1..32, against the FLOP model
and against the machine's measured fp32 matmul rate, with peak memory.

Run:  .venv/bin/python benchmarks/bench_perf.py [--candidates 100] [--ns 512 4096] [--ratios 1 2 4 8 16 32]
      [--repeats 2] [--joint-candidates 100 10] [--batch-size 32] [--prompt-len 60] [--threads N]
      [--quick] [--output PREFIX]
Writes PREFIX.md, PREFIX.json and PREFIX.png (default prefix benchmarks/results/perf_cpu; with --quick a
temp file, so a smoke run never overwrites real numbers), with the machine and the exact command.

What is timed, for one query (``--prompt-len`` fixed ids) and C candidates (float32 compute on the CPU):

* FBNL at ratio r: ``KaLMModel.score(query, matrices)`` over C stored float16 matrices of ``ceil(n/r)``
  rows (the public path: pad + upcast, the scoring decoder, batching by a row budget). The matrices are
  random float16 rows: the model is random-weight anyway and the cost does not depend on the values.
* joint: ``hf_model.model(input_ids=passages, decoder_input_ids=prompt)`` (encoder over every passage,
  then the decoder over all n states, only the [yes, no] rows used). Joint is slow at n = 4096 (the
  encoder alone runs over C * 4096 tokens), so it is timed on ``--joint-candidates`` of the C candidates
  per n (default 100 at n = 512, 10 at n = 4096) and scaled linearly to C: candidates are independent,
  batches of equal shape, so its time is linear in C. The table says when a number is scaled.
* matmul rate: a 2048 x 2048 @ 2048 x 2048 sgemm and a decoder-shaped one, (C * L) x d @ d x F, timed in
  every round beside the scorers; the median of the better of the two is "the machine's rate".
* decoder GFLOP/s = the FLOP model's FBNL FLOPs (``bench_scoring.flop_model``) x C / measured FBNL time.
* peak memory: the process's peak resident set (VmHWM) during each call, reset before it through
  /proc/self/clear_refs (Linux); reported as the increase over the resident set before the call.
* K/V projection: the time of ``decoder.project_states`` over the same C candidates (round 1 only): the
  part of FBNL a cache of projected passages would skip, so ``FBNL / (FBNL - proj)`` bounds its speed-up.

Rounds are paired: every round times joint, every ratio and the matmuls back to back, order alternating
between rounds, so a shared machine's load hits all alike; tables show medians over rounds.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scoring import NANO, TINY, flop_model, loadavg, random_model, write_results  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PROFILES = {
    "full": dict(shape=NANO, candidates=100, ns=[512, 4096], ratios=[1, 2, 4, 8, 16, 32], repeats=2,
                 joint_candidates=[100, 10], batch_size=32, prompt_len=60),
    "quick": dict(shape=TINY, candidates=8, ns=[64, 256], ratios=[1, 4], repeats=1, joint_candidates=[8, 4],
                  batch_size=4, prompt_len=20),
}
JOINT_ROWS = 8192  # joint batch: at most this many passage tokens per forward pass (bounded memory)
HEADER = ("| n | r | rows | FBNL ms | joint ms | measured speed-up | FLOP-model speed-up | decoder GFLOP/s | "
          "% of matmul rate | FBNL peak MiB | K/V proj ms |")


def _log(msg: str) -> None:
    print(f"[bench_perf {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:  # pragma: no cover - not Linux
        return None
    return None


def _measure(fn) -> tuple[float, float | None]:
    """Seconds of ``fn()`` and its peak resident-set increase in MiB (None where it cannot be measured)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
        before = _status_kib("VmRSS")
    except OSError:
        before = None
    t = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t
    peak = _status_kib("VmHWM")
    return seconds, (peak - before) / 1024 if before is not None and peak is not None else None


def run(args: argparse.Namespace) -> dict[str, object]:
    import numpy as np
    import torch

    from kalm_store import decoder

    torch.set_num_threads(args.threads)
    load_before = loadavg()
    shape = dict(args.shape)
    t0 = time.perf_counter()
    prompt: list[int] = []
    hf_model, tokenizer, model = random_model(shape, prompt, "random")
    build_s = time.perf_counter() - t0
    layer_types = list(hf_model.config.decoder.layer_types)
    d, vocab, c = shape["hidden_size"], hf_model.config.decoder.vocab_size, args.candidates
    g = torch.Generator().manual_seed(0)
    prompt.extend([tokenizer.bos_token_id] + torch.randint(10, vocab, (args.prompt_len - 1,), generator=g).tolist())
    prompt_t = torch.tensor([prompt])  # (1, L)
    head = hf_model.get_output_embeddings().weight[[model.yes_id, model.no_id]].detach()  # (2, d)
    _log(f"built the model in {build_s:.1f} s; C={c}, n={args.ns}, r={args.ratios}, threads {args.threads}")

    @torch.inference_mode()
    def joint(ids: torch.Tensor) -> None:
        bs = max(1, min(args.batch_size, JOINT_ROWS // ids.shape[1]))
        for start in range(0, ids.shape[0], bs):
            x = ids[start:start + bs]  # (B, n)
            out = hf_model.model(input_ids=x, attention_mask=torch.ones_like(x),
                                 decoder_input_ids=prompt_t.expand(x.shape[0], -1), use_cache=False)
            out.last_hidden_state[:, -1] @ head.T  # (B, 2): [z_yes, z_no]

    @torch.inference_mode()
    def project(mats: list[np.ndarray]) -> None:
        for start in range(0, len(mats), args.batch_size):
            states, _ = model._pad(mats[start:start + args.batch_size])  # (B, m, d)
            decoder.project_states(model._decoder, states)  # (B, m, layers, 2, KV, hd)

    sq = torch.randn(2048, 2048, generator=g)
    dec_a = torch.randn(c * args.prompt_len, d, generator=g)  # (C*L, d)
    dec_b = torch.randn(d, shape["intermediate_size"], generator=g)  # (d, F)
    matmuls = {"2048^3": (lambda: sq @ sq, 2 * 2048 ** 3),
               f"{c * args.prompt_len}x{d}@{d}x{shape['intermediate_size']}":
                   (lambda: dec_a @ dec_b, 2 * dec_a.shape[0] * d * shape["intermediate_size"])}

    work = {}  # (n, key) -> (callable, candidates timed)
    for n, jc in zip(args.ns, args.joint_candidates):
        ids = torch.randint(10, vocab, (min(jc, c), n), generator=g)  # (C_joint, n) passage ids
        work[(n, "joint")] = (lambda ids=ids: joint(ids), ids.shape[0])
        for r in args.ratios:
            rows = math.ceil(n / r)
            mats = [torch.randn(rows, d, generator=g).to(torch.float16).numpy() for _ in range(c)]  # stored
            work[(n, r)] = (lambda mats=mats: model.score("query", mats, batch_size=args.batch_size), c)
            work[(n, r, "proj")] = (lambda mats=mats: project(mats), c)

    # Warm-up: each scorer once on a small slice of its work (first-call allocations, thread pools).
    for n in args.ns:
        joint(torch.randint(10, vocab, (1, n), generator=g))
        for r in args.ratios:
            model.score("query", [np.zeros((math.ceil(n / r), d), np.float16)], batch_size=args.batch_size)
    for fn, _ in matmuls.values():
        fn()
    _log("warm-up done")

    times: dict[str, list[float]] = {}
    peaks: dict[str, float | None] = {}
    for i in range(args.repeats):
        keys = [k for k in work if len(k) == 2] + list(matmuls)
        if i == 0:
            keys += [k for k in work if len(k) == 3]
        for key in keys if i % 2 == 0 else keys[::-1]:
            fn = matmuls[key][0] if key in matmuls else work[key][0]
            seconds, peak = _measure(fn)
            times.setdefault(str(key), []).append(seconds)
            if i == 0:
                peaks[str(key)] = peak
            _log(f"round {i + 1}/{args.repeats} {key}: {seconds:.2f} s, peak +{peak or 0:.0f} MiB")

    rates = {name: statistics.median(flops / t for t in times[name]) / 1e9 for name, (_, flops) in matmuls.items()}
    machine_rate = max(rates.values())
    rows = []
    for n, jc in zip(args.ns, args.joint_candidates):
        joint_timed = work[(n, "joint")][1]
        joint_s = statistics.median(times[str((n, "joint"))]) * c / joint_timed  # scaled to C candidates
        for r in args.ratios:
            fbnl_s = statistics.median(times[str((n, r))])
            flops = flop_model(shape, layer_types, n, args.prompt_len, r)
            gflops = flops["fbnl_flops"] * c / fbnl_s / 1e9
            proj = times.get(str((n, r, "proj")), [None])[0]
            rows.append({
                "n": n, "r": r, "rows_per_candidate": math.ceil(n / r),
                "fbnl_ms": fbnl_s * 1e3, "joint_ms": joint_s * 1e3, "joint_candidates_timed": joint_timed,
                "speedup": joint_s / fbnl_s, "flop_speedup": flops["ratio"],
                "decoder_gflops": gflops, "fraction_of_matmul_rate": gflops / machine_rate,
                "fbnl_peak_mib": peaks.get(str((n, r))), "joint_peak_mib": peaks.get(str((n, "joint"))),
                "kv_projection_ms": proj * 1e3 if proj is not None else None,
                "fbnl_ms_all": [t * 1e3 for t in times[str((n, r))]],
                "joint_ms_all_timed": [t * 1e3 for t in times[str((n, "joint"))]],
                "fbnl_flops_per_candidate": flops["fbnl_flops"], "joint_flops_per_candidate": flops["joint_flops"],
            })
    return {
        "command": args.command,
        "machine": {"processor": platform.processor() or platform.machine(), "platform": platform.platform(),
                    "cpu_count": os.cpu_count(), "torch_threads": args.threads, "python": platform.python_version(),
                    "torch": torch.__version__},
        "load_average_before": load_before, "load_average_after": loadavg(),
        "shape": shape, "layer_types": layer_types, "candidates": c, "prompt_len": args.prompt_len,
        "batch_size": args.batch_size, "repeats": args.repeats, "compute_dtype": "float32",
        "storage_dtype": "float16", "build_s": build_s,
        "matmul_gflops": rates, "matmul_gflops_all": {k: [matmuls[k][1] / t / 1e9 for t in times[k]] for k in matmuls},
        "machine_matmul_gflops": machine_rate,
        "results": rows,
    }


def to_markdown(res: dict) -> str:
    m, s = res["machine"], res["shape"]
    lines = [
        "# Decoder performance: FBNL vs joint, FLOP model, matmul rate, memory (CPU, float32)",
        "",
        f"Command: `{res['command']}`",
        "",
        f"Machine: {m['processor']}, {m['cpu_count']} CPUs ({m['torch_threads']} torch threads), {m['platform']}; "
        f"Python {m['python']}, torch {m['torch']}. Load average before/after: {res['load_average_before']} / "
        f"{res['load_average_after']} (this run's own threads count toward it; a load well above the CPU count means the machine was shared and every number is slower).",
        "",
        f"Model: random-weight T5Gemma2, {s['num_layers']}+{s['num_layers']} layers, hidden {s['hidden_size']}, "
        f"{s['num_heads']} heads / {s['num_kv_heads']} KV, head_dim {s['head_dim']}, FFN {s['intermediate_size']}; "
        f"one query ({res['prompt_len']}-token prompt) x {res['candidates']} candidates, float16 storage, "
        f"median of {res['repeats']} paired rounds.",
        "",
        "Machine fp32 matmul rate (median GFLOP/s): " + ", ".join(f"{k}: {v:.1f}" for k, v in res["matmul_gflops"].items())
        + f"; the rate used below is the better one, {res['machine_matmul_gflops']:.1f} GFLOP/s.",
        "",
        HEADER,
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in res["results"]:
        scaled = row["joint_candidates_timed"] != res["candidates"]
        joint = f"{row['joint_ms']:.0f}" + (f" (scaled from {row['joint_candidates_timed']})" if scaled else "")
        peak = f"{row['fbnl_peak_mib']:.0f}" if row["fbnl_peak_mib"] is not None else "n/a"
        proj = f"{row['kv_projection_ms']:.0f}" if row["kv_projection_ms"] is not None else "n/a"
        lines.append(f"| {row['n']} | {row['r']} | {row['rows_per_candidate']} | {row['fbnl_ms']:.0f} | {joint} | "
                     f"{row['speedup']:.1f}x | {row['flop_speedup']:.1f}x | {row['decoder_gflops']:.1f} | "
                     f"{100 * row['fraction_of_matmul_rate']:.0f}% | {peak} | {proj} |")
    joint_peaks = {row["n"]: row["joint_peak_mib"] for row in res["results"]}
    lines += [
        "",
        "Joint peak memory (MiB over the resident set before the call): "
        + ", ".join(f"n={n}: {p:.0f}" if p is not None else f"n={n}: n/a" for n, p in joint_peaks.items()) + ".",
        "joint ms scaled from k candidates: timed on k of the candidates, times C / k (candidates are independent).",
        "K/V proj ms: `decoder.project_states` alone over the same candidates (first round): a cache of projected "
        "passages could save at most this, i.e. a speed-up of at most FBNL / (FBNL - proj).",
        "FLOP model: `flop_model` in benchmarks/bench_scoring.py; decoder GFLOP/s = its FBNL FLOPs x C / FBNL time.",
    ]
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for n in sorted({row["n"] for row in res["results"]}):
        rows = [row for row in res["results"] if row["n"] == n]
        rs = [row["r"] for row in rows]
        line = ax1.plot(rs, [row["speedup"] for row in rows], "o-", label=f"measured, n={n}")[0]
        ax1.plot(rs, [row["flop_speedup"] for row in rows], "--", color=line.get_color(), label=f"FLOP model, n={n}")
        ax2.plot(rs, [row["decoder_gflops"] for row in rows], "o-", label=f"decoder, n={n}")
    ax2.axhline(res["machine_matmul_gflops"], color="k", ls="--", label="fp32 matmul rate")
    ax2.axhline(0.6 * res["machine_matmul_gflops"], color="gray", ls=":", label="60% of it")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("MEP ratio r")
        ax.legend(fontsize=8)
    ax1.set_yscale("log")
    ax1.set_ylabel("joint time / FBNL time")
    ax1.set_title(f"FBNL speed-up, {res['candidates']} candidates")
    ax2.set_ylabel("GFLOP/s")
    ax2.set_title("decoder throughput vs matmul rate")
    fig.suptitle(f"{res['machine']['processor']}, {res['machine']['torch_threads']} threads, "
                 f"load {res['load_average_before']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--candidates", type=int, default=None, help="candidates per query (default: 100; quick 8)")
    p.add_argument("--ns", type=int, nargs="+", default=None, help="passage tokens (default: 512 4096; quick 64 256)")
    p.add_argument("--ratios", type=int, nargs="+", default=None,
                   help="MEP ratios (default: 1 2 4 8 16 32; quick 1 4)")
    p.add_argument("--repeats", type=int, default=None, help="paired rounds, median reported (default: 2; quick 1)")
    p.add_argument("--joint-candidates", type=int, nargs="+", default=None,
                   help="candidates timed for joint, one per n, scaled to --candidates (default: 100 10; quick 8 4)")
    p.add_argument("--batch-size", type=int, default=None, help="candidates per decoder pass (default: 32; quick 4)")
    p.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default: 60; quick 20)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: os.cpu_count())")
    p.add_argument("--quick", action="store_true", help="tiny model and sizes: a smoke run in seconds")
    p.add_argument("--output", default=None, help="output prefix for .md/.json/.png (default: "
                   "benchmarks/results/perf_cpu; with --quick a temp file)")
    args = p.parse_args(argv)
    profile = PROFILES["quick" if args.quick else "full"]
    for key in ("candidates", "ns", "ratios", "repeats", "joint_candidates", "batch_size", "prompt_len"):
        if getattr(args, key) is None:
            setattr(args, key, profile[key])
    args.shape = profile["shape"]
    from kalm_store.pooling import check_ratio

    args.ratios = [check_ratio(r) for r in args.ratios]
    if len(args.joint_candidates) != len(args.ns):
        p.error(f"--joint-candidates needs one count per n ({len(args.ns)}), got {args.joint_candidates}")
    for key in ("candidates", "repeats", "batch_size", "prompt_len", "threads"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if min(args.ns) < 1 or min(args.joint_candidates) < 1 or args.prompt_len < 2:
        p.error("--ns and --joint-candidates must be >= 1 and --prompt-len >= 2")
    if args.output is None:
        args.output = str(Path(tempfile.gettempdir()) / "kalm_perf_quick" if args.quick else RESULTS / "perf_cpu")
    args.command = shlex.join(["python", *(sys.argv if argv is None else ["benchmarks/bench_perf.py", *argv])])
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    res = run(args)
    write_results(args.output, to_markdown(res), res)
    plot(res, Path(f"{args.output}.png"))
    print(f"wrote {args.output}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
