"""float32 vs bfloat16 compute on the CPU, side by side in one run (issue 19): speed and fidelity.

One random-weight Nano-shape T5Gemma2 (benchmarks/bench_query.py SHAPES["nano"]: 18+18 layers,
d = 640; speed does not depend on the weights) is made twice from one seed, in float32 and in
bfloat16. In one run, every timed item runs in both dtypes back to back, the order alternating from
round to round so that the shared machine's load falls on both alike; medians are reported:

* a matmul probe per dtype: 2048^3, the decoder's prompt-row shape (C*L x d @ d x F) and its
  stored-row shape (rows x d @ d x layers*2*KV*hd), GFLOP/s;
* encoder passages/s for the build (``KaLMModel.encode_ratios`` at every ratio, pooling included);
* scoring ms per 100 candidates (``KaLMModel.score`` over stored float16 matrices) at each n and r;
* achieved GFLOP/s of the encoder and of scoring: FLOPs counted analytically from the shape
  (``bench_scoring.flop_model``: the model's full decoder for L prompt tokens over m stored rows, and
  its encoder over the passage's tokens), divided by the measured time, next to the matmul rates.

Then the fidelity of bf16 against float32, per query (max |dP|, Kendall tau, top-10 overlap) and per
r, over matrices the encoder built from passages of ``--fidelity-n`` tokens: float32-built matrices
scored in bf16, and bf16-built matrices (the encoder in bf16, stored float16, through the codec)
scored in float32 and in bf16; the reference is float32 throughout.

Random weights give P(yes) values of a random model, not of the trained reranker: the fidelity figures
bound the arithmetic's error, they are not a quality measurement. Scoring is timed over ``--candidates``
candidates per (n, r) and scaled to 100 (scoring time is linear in the candidates once a pass is full).

    python benchmarks/bench_bf16.py                # writes benchmarks/results/bf16_cpu.{md,json}
    python benchmarks/bench_bf16.py --quick        # tiny shape, seconds; writes to the temp folder
"""

from __future__ import annotations

import argparse
import math
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scoring import NANO, TINY, _machine, flop_model, loadavg, random_model, write_results  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = ("float32", "bfloat16")
WORDS = ("json data file parse open read line error return value list vector text store query model "
         "python zebra river dawn graze quick brown fox lazy dog container passage encode score").split()
# bench_query.SHAPES["nano"]: the Nano shape with a 1024-word vocabulary (the vocabulary only sizes the
# embedding lookup and the two head rows read, neither on the timed path; it saves 2 x 0.7 GB of weights).
NANO_SHAPE = dict(NANO, vocab_size=1024)


def _log(msg: str) -> None:
    print(f"[bench_bf16 {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def _texts(model, rng, count: int, tokens: int) -> list[str]:
    """``count`` passages of about ``tokens`` encoder tokens (word count calibrated on the tokenizer)."""
    per_word = len(model.tokenize_passages([" ".join(rng.choice(WORDS, 400))])[0]) / 400
    words = max(1, round(tokens / per_word))
    return [" ".join(rng.choice(WORDS, words)) for _ in range(count)]


def _encoder_flops(shape: dict, layer_types: list[str], n_tokens: int, prompt_len: int) -> float:
    """The encoder's share of flop_model's joint count for a passage of ``n_tokens`` tokens."""
    f = flop_model(shape, layer_types, n_tokens, prompt_len, 1)
    return f["joint_flops"] - f["fbnl_flops"]  # joint = encoder(n) + decoder(m = n); fbnl at r = 1 = decoder(n)


def run(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    from kalm_store.codec import decode_matrix, encode_matrix
    from kalm_store.fidelity import kendall_tau, top_k_overlap

    torch.set_num_threads(args.threads)
    shape = dict(TINY if args.quick else NANO_SHAPE)
    prompt: list[int] = []  # read by both models at every call (random_model): its length sets the cost
    models = {}
    for name in DTYPES:
        hf, _, models[name] = random_model(shape, prompt, "random", dtype=getattr(torch, name))  # one seed
    layer_types = list(hf.config.decoder.layer_types)
    rng = np.random.default_rng(0)
    d, ffn = shape["hidden_size"], shape["intermediate_size"]
    kv_width = shape["num_layers"] * 2 * shape["num_kv_heads"] * shape["head_dim"]
    vocab = min(shape["vocab_size"], 1024)
    prompt.extend([2] + rng.integers(10, vocab, args.prompt_len - 1).tolist())
    load_before = loadavg()

    # matmul probe: the operand shapes the model's hot path multiplies
    mm_shapes = {"2048^3": (2048, 2048, 2048) if not args.quick else (256, 256, 256),
                 "prompt rows": (args.candidates * args.prompt_len, d, ffn),
                 "stored rows": (1024 if not args.quick else 128, d, kv_width)}
    mm = {}
    for name in DTYPES:
        dt = getattr(torch, name)
        mm[name] = {}
        for k, (a, b, c) in mm_shapes.items():
            x, y = torch.randn(a, b).to(dt), torch.randn(b, c).to(dt)
            mm[name][k] = (lambda x=x, y=y: x @ y, 2 * a * b * c)

    enc_texts = _texts(models["float32"], rng, args.encode_passages, args.encode_n)
    enc_tokens = [len(t) for t in models["float32"].tokenize_passages(enc_texts)]
    ratios = args.ratios
    stored = {n: {r: [rng.standard_normal((math.ceil(n / r), d)).astype(np.float16) for _ in range(args.candidates)]
                  for r in ratios} for n in args.ns}  # speed does not depend on the values

    times: dict[str, list[float]] = {}
    loads: list[list[float] | None] = []

    def both(key: str, fn, order: tuple[str, ...]) -> None:
        for name in order:  # the two dtypes back to back: the same load on each
            t = time.perf_counter()
            fn(name)
            times.setdefault(f"{name}/{key}", []).append(time.perf_counter() - t)

    def one_round(order: tuple[str, ...], warm_up: bool = False) -> None:
        for k in mm_shapes:
            reps = 1 if warm_up else args.matmul_reps
            both(f"matmul/{k}", lambda name, k=k: [mm[name][k][0]() for _ in range(reps)], order)
        texts = enc_texts[:1] if warm_up else enc_texts
        both("encode", lambda name: models[name].encode_ratios(texts, ratios, batch_size=args.batch_size), order)
        for n in args.ns:
            for r in ratios[-1:] if warm_up else ratios:  # warm-up: every code path once, at its cheapest
                both(f"score/{n}/{r}", lambda name, n=n, r=r: models[name].score(
                    "q", stored[n][r], batch_size=args.candidates), order)
        if warm_up:
            times.clear()

    with torch.inference_mode():
        _log(f"shape {'tiny' if args.quick else 'Nano'}, threads {args.threads}, n={args.ns}, r={ratios}, "
             f"{args.candidates} candidates, encoder {len(enc_texts)} x {statistics.mean(enc_tokens):.0f} tokens, "
             f"{args.repeats} rounds + warm-up; load {load_before}")
        t0 = time.perf_counter()
        one_round(DTYPES, warm_up=True)  # allocator, kernels' first calls, lazily built tables
        _log(f"warm-up done in {time.perf_counter() - t0:.0f} s")
        for rnd in range(args.repeats):
            order = DTYPES if rnd % 2 == 0 else DTYPES[::-1]
            one_round(order)
            loads.append(loadavg())
            _log(f"round {rnd + 1}/{args.repeats} done ({time.perf_counter() - t0:.0f} s), load {loads[-1]}")

        # fidelity: matrices the encoder builds in each dtype, stored float16 through the codec
        fid_texts = _texts(models["float32"], rng, args.fidelity_candidates, args.fidelity_n)
        fid_tokens = [len(t) for t in models["float32"].tokenize_passages(fid_texts)]
        built = {}
        for name in DTYPES:
            enc = models[name].encode_ratios(fid_texts, args.fidelity_ratios, batch_size=args.batch_size).matrices
            built[name] = {r: [decode_matrix(encode_matrix(m), *m.shape) for m in mats] for r, mats in enc.items()}
        _log(f"fidelity passages encoded in both dtypes ({time.perf_counter() - t0:.0f} s)")
        queries = [[2] + rng.integers(10, vocab, args.prompt_len - 1).tolist() for _ in range(args.queries)]
        paths = {"score": ("bfloat16", "float32"), "build": ("float32", "bfloat16"),
                 "build+score": ("bfloat16", "bfloat16")}  # path -> (scoring dtype, building dtype)
        fidelity: dict[int, dict[str, dict]] = {}
        for r in args.fidelity_ratios:
            rows: dict[str, list[tuple[float, float, float]]] = {p: [] for p in paths}
            for q in queries:
                prompt[:] = q
                ref = models["float32"].score("q", built["float32"][r], batch_size=args.candidates)
                for p, (scorer, builder) in paths.items():
                    got = models[scorer].score("q", built[builder][r], batch_size=args.candidates)
                    rows[p].append((float(np.abs(got - ref).max()), kendall_tau(got, ref), top_k_overlap(got, ref)))
            fidelity[r] = {p: {"max_abs_delta": max(x[0] for x in v),
                               "median_max_abs_delta": statistics.median(x[0] for x in v),
                               "kendall_tau": statistics.mean(x[1] for x in v), "kendall_tau_min": min(x[1] for x in v),
                               "top10_overlap": statistics.mean(x[2] for x in v),
                               "top10_overlap_min": min(x[2] for x in v), "per_query": v} for p, v in rows.items()}
            _log(f"fidelity r={r} done ({time.perf_counter() - t0:.0f} s)")

    med = {k: statistics.median(v) for k, v in times.items()}
    rates = {name: {k: args.matmul_reps * flops / med[f"{name}/matmul/{k}"] / 1e9 for k, (_, flops) in mm[name].items()}
             for name in DTYPES}
    peak = {name: max(rates[name].values()) for name in DTYPES}
    enc_flops = sum(_encoder_flops(shape, layer_types, t, args.prompt_len) for t in enc_tokens)
    score = {}
    for n in args.ns:
        for r in ratios:
            flops = args.candidates * flop_model(shape, layer_types, n, args.prompt_len, r)["fbnl_flops"]
            score[f"{n}/{r}"] = {"n": n, "r": r, "flops_per_candidate": flops / args.candidates, **{
                name: {"ms_per_100": 1000 * med[f"{name}/score/{n}/{r}"] * 100 / args.candidates,
                       "gflops": flops / med[f"{name}/score/{n}/{r}"] / 1e9,
                       "of_peak": flops / med[f"{name}/score/{n}/{r}"] / 1e9 / peak[name]} for name in DTYPES}}
    return {
        "machine": _machine(args.threads), "load_before": load_before, "load_after": loadavg(), "load_per_round": loads,
        "command": "python benchmarks/bench_bf16.py " + " ".join(shlex.quote(a) for a in args.argv),
        "shape": shape, "threads": args.threads, "candidates": args.candidates, "prompt_len": args.prompt_len,
        "ns": args.ns, "ratios": ratios, "repeats": args.repeats, "queries": args.queries,
        "matmul_shapes": mm_shapes, "matmul_gflops": rates, "matmul_peak_gflops": peak,
        "encode": {"passages": len(enc_texts), "tokens_mean": statistics.mean(enc_tokens),
                   "flops_per_passage": enc_flops / len(enc_texts), **{
                       name: {"passages_per_s": len(enc_texts) / med[f"{name}/encode"],
                              "gflops": enc_flops / med[f"{name}/encode"] / 1e9,
                              "of_peak": enc_flops / med[f"{name}/encode"] / 1e9 / peak[name]} for name in DTYPES}},
        "score": score,
        "fidelity_setup": {"candidates": len(fid_texts), "ratios": args.fidelity_ratios,
                           "tokens_mean": statistics.mean(fid_tokens), "queries": args.queries},
        "fidelity": fidelity, "times": times, "elapsed_s": time.perf_counter() - t0,
    }


def to_markdown(res: dict) -> str:
    m, e, s = res["matmul_gflops"], res["encode"], res["score"]
    nano = res["shape"]["hidden_size"] == 640
    lines = [
        "# float32 vs bfloat16 compute on the CPU (issue 19)", "",
        f"Command: `{res['command']}`", "",
        f"Machine: {res['machine']}.",
        f"**Shared host** (2 cores, several engineers' tests and benchmarks running): load average before "
        f"{res['load_before']}, after each round {res['load_per_round']}, after {res['load_after']}. Absolute "
        "timings are inflated by that load; every item ran in both dtypes back to back, the order "
        "alternating per round, so the float32/bfloat16 ratios are the figures to read. Medians of "
        f"{res['repeats']} rounds after a warm-up round, {res['threads']} torch thread(s). The whole run took "
        f"{res['elapsed_s'] / 60:.1f} min.", "",
        f"Random-weight {'Nano' if nano else 'tiny'} shape (d = {res['shape']['hidden_size']}, "
        f"{res['shape']['num_layers']}+{res['shape']['num_layers']} layers, F = {res['shape']['intermediate_size']}), "
        f"a {res['prompt_len']}-token prompt. Stored matrices are float16 for both dtypes.", "",
        "## Matmul probe (same run)", "",
        "| product | float32 GFLOP/s | bfloat16 GFLOP/s | bf16 speed-up |", "|---|---|---|---|",
    ]
    for k, (a, b, c) in res["matmul_shapes"].items():
        lines.append(f"| {k} ({a} x {b} @ {b} x {c}) | {m['float32'][k]:.1f} | {m['bfloat16'][k]:.1f} | "
                     f"{m['bfloat16'][k] / m['float32'][k]:.2f}x |")
    pk = res["matmul_peak_gflops"]
    lines += ["", f"'Of matmul' below divides an achieved rate by the dtype's best probe rate ({pk['float32']:.1f} "
                  f"and {pk['bfloat16']:.1f} GFLOP/s).", "",
              "## Encoder (build)", "",
              f"{e['passages']} passages of {e['tokens_mean']:.0f} tokens on average, encoded and pooled at every r "
              f"in {res['ratios']}; {e['flops_per_passage'] / 1e9:.1f} GFLOP per passage counted from the shape.", "",
              "| dtype | passages/s | GFLOP/s | of matmul |", "|---|---|---|---|"]
    for name in DTYPES:
        lines.append(f"| {name} | {e[name]['passages_per_s']:.3f} | {e[name]['gflops']:.1f} | "
                     f"{e[name]['of_peak']:.0%} |")
    lines.append(f"| bf16 speed-up | {e['bfloat16']['passages_per_s'] / e['float32']['passages_per_s']:.2f}x | | |")
    lines += ["", "## Scoring", "",
              f"ms per 100 candidates, timed over {res['candidates']} candidates (one decoder pass where the row "
              "budget allows) and scaled to 100. GFLOP/s counts the model's full decoder (L prompt tokens over m "
              "stored rows, `bench_scoring.flop_model`); the scoring decoder skips a few percent of it (layer 0's "
              "prompt q/k/v once per query, the last layer's other prompt rows), so this is the model-equivalent "
              "rate.", "",
              "| n | r | float32 ms / 100 | bfloat16 ms / 100 | bf16 speed-up | float32 GFLOP/s (of matmul) | "
              "bfloat16 GFLOP/s (of matmul) |", "|---|---|---|---|---|---|---|"]
    for row in s.values():
        a, b = row["float32"], row["bfloat16"]
        lines.append(f"| {row['n']} | {row['r']} | {a['ms_per_100']:.0f} | {b['ms_per_100']:.0f} | "
                     f"{a['ms_per_100'] / b['ms_per_100']:.2f}x | {a['gflops']:.1f} ({a['of_peak']:.0%}) | "
                     f"{b['gflops']:.1f} ({b['of_peak']:.0%}) |")
    fs = res["fidelity_setup"]
    lines += ["", "## Fidelity of bfloat16 against float32", "",
              f"{fs['queries']} random prompts x {fs['candidates']} passages of {fs['tokens_mean']:.0f} tokens, "
              "matrices built by each dtype's encoder and stored float16 (through the codec); the reference is "
              "float32-built, float32-scored. Per query: max |dP| over its candidates, Kendall tau and top-10 "
              "overlap of its ranking; the table gives the worst max |dP| over queries, and the mean (min) of tau "
              "and overlap. Random weights: an arithmetic-error bound, not a quality figure.", "",
              "| r | path | max abs dP | Kendall tau mean (min) | top-10 overlap mean (min) |", "|---|---|---|---|---|"]
    labels = {"score": "float32-built, scored in bf16", "build": "bf16-built, scored in float32",
              "build+score": "bf16-built, scored in bf16"}
    worst = {p: 0.0 for p in labels}
    for r, paths in res["fidelity"].items():
        for p, v in paths.items():
            worst[p] = max(worst[p], v["max_abs_delta"])
            lines.append(f"| {r} | {labels[p]} | {v['max_abs_delta']:.4f} | {v['kendall_tau']:.3f} "
                         f"({v['kendall_tau_min']:.3f}) | {v['top10_overlap']:.2f} ({v['top10_overlap_min']:.2f}) |")
    lines += ["", "Worst max |dP| over every r: " + ", ".join(f"{labels[p]} {w:.4f}" for p, w in worst.items()) + "."]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Bound the run's time with --candidates, --repeats, --ns, --ratios and the "
                                       "fidelity flags; the full default run takes about 20 minutes on 1 core.")
    p.add_argument("--quick", action="store_true", help="tiny shape, few candidates; results to the temp folder")
    p.add_argument("--ns", type=_ints, default=None,
                   help="stored passage lengths in tokens (default 512,4096; quick 64)")
    p.add_argument("--ratios", type=_ints, default=None, help="MEP ratios (default 1,2,4,8,16,32; quick 1,4)")
    p.add_argument("--candidates", type=int, default=None,
                   help="candidates per timed scoring call, scaled to 100 (default 6; quick 4)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds after the warm-up (default 3; quick 1)")
    p.add_argument("--encode-passages", type=int, default=None, help="passages per timed encode (default 3; quick 4)")
    p.add_argument("--encode-n", type=int, default=None, help="tokens per encoded passage (default 512; quick 40)")
    p.add_argument("--matmul-reps", type=int, default=None, help="products per timed matmul probe (default 3)")
    p.add_argument("--fidelity-candidates", type=int, default=None,
                   help="passages per fidelity query (default 16; quick 12)")
    p.add_argument("--fidelity-n", type=int, default=None, help="tokens per fidelity passage (default 512; quick 40)")
    p.add_argument("--fidelity-ratios", type=_ints, default=None, help="ratios of the fidelity (default: --ratios)")
    p.add_argument("--queries", type=int, default=None, help="random prompts for the fidelity (default 3)")
    p.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 60; quick 20)")
    p.add_argument("--batch-size", type=int, default=8, help="passages per encoder pass (default: 8)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steadier on a shared host)")
    p.add_argument("--out", type=Path, default=None, help="results prefix (default benchmarks/results/bf16_cpu)")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    q = args.quick
    defaults = dict(ns=[64] if q else [512, 4096], ratios=[1, 4] if q else [1, 2, 4, 8, 16, 32],
                    candidates=4 if q else 6, repeats=1 if q else 3, encode_passages=4 if q else 3,
                    encode_n=40 if q else 512, matmul_reps=3, fidelity_candidates=12 if q else 16,
                    fidelity_n=40 if q else 512, queries=3, prompt_len=20 if q else 60)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.fidelity_ratios = args.fidelity_ratios or args.ratios
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    res = run(args)
    md = to_markdown(res)
    out = args.out or (Path(tempfile.gettempdir()) / "bf16_quick" if args.quick else RESULTS / "bf16_cpu")
    write_results(out, md, res)  # prints the table too
    return 0


if __name__ == "__main__":
    sys.exit(main())
