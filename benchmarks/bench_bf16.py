"""float32 vs bfloat16 compute on the CPU, side by side in one run (issue 19): speed and fidelity.

One random-weight Nano-shape T5Gemma2 (18+18 layers, d = 640; speed does not depend on the weights) is
made twice from one seed, in float32 and in bfloat16. In the same run, rounds alternating the dtype:

* matmul rate of each dtype: 2048^3 and the decoder-shaped (C*L) x d @ d x F product, GFLOP/s;
* encoder passages/s for the build (``KaLMModel.encode_ratios`` over passages of ~n tokens);
* scoring ms per 100 candidates (``KaLMModel.score`` over stored float16 matrices) per r;
* fidelity of bf16 against float32 on the same stored matrices (scored in bf16) and on matrices
  built in bf16 (both in bf16): max |dP|, Kendall tau and top-10 overlap per query (mean).

Random weights give P(yes) values of a random model, not of the trained reranker: the fidelity figures
bound the arithmetic's error, they are not a quality measurement. The host may be shared: ratios
within one run are the numbers to read, absolute times are noisy.

    python benchmarks/bench_bf16.py                # writes benchmarks/results/bf16_cpu.{md,json}
    python benchmarks/bench_bf16.py --quick        # tiny shape, seconds; writes to the temp folder
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scoring import NANO, TINY, _machine, loadavg, random_model, write_results  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
WORDS = ("json data file parse open read line error return value list vector text store query model "
         "python zebra river dawn graze quick brown fox lazy dog container passage encode score").split()


def _log(msg: str) -> None:
    print(f"[bench_bf16] {msg}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    from kalm_store.fidelity import kendall_tau, top_k_overlap

    torch.set_num_threads(args.threads)
    shape = dict(TINY if args.quick else NANO)
    prompt: list[int] = []
    models = {}
    for name, dt in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        models[name] = random_model(shape, prompt, "random", dtype=dt)[2]  # same seed: same weights
    model32 = models["float32"]
    rng = np.random.default_rng(0)
    d, f = shape["hidden_size"], shape["intermediate_size"]
    vocab = model32.tokenizer.vocab_size if hasattr(model32, "tokenizer") else 1024
    prompt.extend([2] + rng.integers(10, min(vocab, 1024), args.prompt_len - 1).tolist())
    # passages of about n tokens from a small word list (tokenizer of the tiny model: ~1-2 tokens a word)
    texts = [" ".join(rng.choice(WORDS, args.n)) for _ in range(args.candidates)]
    load_before = loadavg()

    mm = {}
    for name in models:
        dt = getattr(torch, name)
        a = torch.randn(args.candidates * args.prompt_len, d).to(dt)
        b = torch.randn(d, f).to(dt)
        sq = torch.randn(2048, 2048).to(dt)
        mm[name] = {"2048^3": (lambda sq=sq: sq @ sq, 2 * 2048 ** 3),
                    "decoder": (lambda a=a, b=b: a @ b, 2 * a.shape[0] * d * f)}
    times: dict[str, list[float]] = {}

    def timed(key: str, fn) -> None:
        t = time.perf_counter()
        fn()
        times.setdefault(key, []).append(time.perf_counter() - t)

    enc: dict[str, dict[int, list]] = {}
    with torch.inference_mode():
        for name, m in models.items():  # warm-up, and the matrices each dtype builds
            for fn, _ in mm[name].values():
                fn()
            enc[name] = m.encode_ratios(texts, args.ratios, batch_size=args.batch_size).matrices
        tokens = sum(len(t) for t in models["float32"].tokenize_passages(texts))
        _log(f"shape {'tiny' if args.quick else 'Nano'}, {args.candidates} passages, {tokens / len(texts):.0f} "
             f"tokens each on average, r={args.ratios}, {args.repeats} rounds, threads {args.threads}")
        for rnd in range(args.repeats):
            order = list(models) if rnd % 2 == 0 else list(models)[::-1]  # alternate: same load on both
            for name in order:
                m = models[name]
                for k, (fn, _) in mm[name].items():
                    timed(f"{name}/matmul/{k}", fn)
                timed(f"{name}/encode", lambda m=m: m.encode_ratios(texts, args.ratios, batch_size=args.batch_size))
                for r in args.ratios:
                    timed(f"{name}/score/{r}", lambda m=m, r=r: m.score("q", enc["float32"][r],
                                                                        batch_size=args.score_batch))
            _log(f"round {rnd + 1}/{args.repeats} done")

        fidelity = {}
        queries = [[2] + rng.integers(10, min(vocab, 1024), args.prompt_len - 1).tolist()
                   for _ in range(args.queries)]
        for r in args.ratios:
            rows = {"score": [], "build+score": []}
            for q in queries:
                prompt[:] = q
                ref = models["float32"].score("q", enc["float32"][r], batch_size=args.score_batch)
                for path, mats in (("score", enc["float32"][r]), ("build+score", enc["bfloat16"][r])):
                    got = models["bfloat16"].score("q", mats, batch_size=args.score_batch)
                    rows[path].append((float(np.abs(got - ref).max()), kendall_tau(got, ref), top_k_overlap(got, ref)))
            fidelity[r] = {p: {"max_abs_delta": max(x[0] for x in v), "kendall_tau": statistics.mean(x[1] for x in v),
                               "top10_overlap": statistics.mean(x[2] for x in v)} for p, v in rows.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    rates = {name: {k: flops / med[f"{name}/matmul/{k}"] / 1e9 for k, (_, flops) in mm[name].items()} for name in mm}
    return {
        "machine": _machine(args.threads), "load_before": load_before, "load_after": loadavg(),
        "command": "python benchmarks/bench_bf16.py " + " ".join(shlex.quote(a) for a in args.argv),
        "shape": shape, "candidates": args.candidates, "tokens_per_passage": tokens / len(texts),
        "prompt_len": args.prompt_len, "ratios": args.ratios, "repeats": args.repeats, "queries": args.queries,
        "matmul_gflops": rates,
        "encode_passages_per_s": {n: args.candidates / med[f"{n}/encode"] for n in models},
        "score_ms_per_100": {n: {r: 1000 * med[f"{n}/score/{r}"] * 100 / args.candidates for r in args.ratios}
                             for n in models},
        "fidelity": fidelity, "times": times,
    }


def to_markdown(res: dict) -> str:
    s, m = res["score_ms_per_100"], res["matmul_gflops"]
    lines = [
        "# float32 vs bfloat16 compute on the CPU (issue 19)", "",
        f"Command: `{res['command']}`", "",
        f"Machine: {res['machine']}; load average before {res['load_before']}, after {res['load_after']}.",
        "**The host was shared by ~8 engineers running tests and benchmarks at the same time: absolute timings "
        "are noisy; the float32/bfloat16 ratios are from one run, rounds alternating the dtype.**", "",
        f"Random-weight {'Nano' if res['shape']['hidden_size'] == 640 else 'tiny'} shape "
        f"(d = {res['shape']['hidden_size']}, {res['shape']['num_layers']}+{res['shape']['num_layers']} layers), "
        f"{res['candidates']} passages of {res['tokens_per_passage']:.0f} tokens on average, a "
        f"{res['prompt_len']}-token prompt, median of {res['repeats']} rounds. Stored matrices are float16 for both.", "",
        "| measure | float32 | bfloat16 | bf16 speed-up |", "|---|---|---|---|",
    ]
    for k in m["float32"]:
        lines.append(f"| matmul {k}, GFLOP/s | {m['float32'][k]:.1f} | {m['bfloat16'][k]:.1f} | "
                     f"{m['bfloat16'][k] / m['float32'][k]:.2f}x |")
    e = res["encode_passages_per_s"]
    lines.append(f"| encoder, passages/s (build) | {e['float32']:.2f} | {e['bfloat16']:.2f} | "
                 f"{e['bfloat16'] / e['float32']:.2f}x |")
    for r in res["ratios"]:
        a, b = s["float32"][r], s["bfloat16"][r]
        lines.append(f"| scoring r = {r}, ms per 100 candidates | {a:.0f} | {b:.0f} | {a / b:.2f}x |")
    lines += ["", f"Fidelity of bfloat16 against float32 ({res['queries']} random prompts x {res['candidates']} "
                  "candidates; random weights: an arithmetic-error bound, not a quality figure):", "",
              "| r | path | max abs dP | Kendall tau | top-10 overlap |", "|---|---|---|---|---|"]
    for r, paths in res["fidelity"].items():
        for p, v in paths.items():
            label = "float32-built, scored in bf16" if p == "score" else "built and scored in bf16"
            lines.append(f"| {r} | {label} | {v['max_abs_delta']:.4f} | {v['kendall_tau']:.3f} | "
                         f"{v['top10_overlap']:.2f} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny shape, few passages; results to the temp folder")
    p.add_argument("--candidates", type=int, default=None, help="passages (default: 30; quick 8)")
    p.add_argument("--n", type=int, default=None, help="words per passage (default: 300; quick 40)")
    p.add_argument("--ratios", type=lambda s: [int(x) for x in s.split(",")], default=None,
                   help="comma list (default: 1,4,16; quick 1,4)")
    p.add_argument("--repeats", type=int, default=None, help="rounds (default: 2; quick 1)")
    p.add_argument("--queries", type=int, default=5, help="random prompts for the fidelity (default: 5)")
    p.add_argument("--prompt-len", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=8, help="passages per encoder pass (default: 8)")
    p.add_argument("--score-batch", type=int, default=32, help="candidates per decoder pass (default: 32)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    q = args.quick
    args.candidates = args.candidates or (8 if q else 30)
    args.n = args.n or (40 if q else 300)
    args.ratios = args.ratios or ([1, 4] if q else [1, 4, 16])
    args.repeats = args.repeats or (1 if q else 2)
    if q:
        args.prompt_len = min(args.prompt_len, 20)
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
