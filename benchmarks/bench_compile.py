"""Issue 8, item 2: does ``torch.compile`` of the scoring decoder help on this machine? Paired rounds.

Run:  .venv/bin/python benchmarks/bench_compile.py [--candidates 32] [--n 512] [--ratio 4] [--rounds 5]
      [--threads N] [--output PREFIX]
Writes PREFIX.md and PREFIX.json (default benchmarks/results/compile_cpu).

Times ``decoder.margins`` (the whole scoring decoder, one batch of Nano-shape candidates) eagerly and
compiled with ``torch.compile(dynamic=False)`` (inductor), alternating within each round, after one
untimed call of each (the compile itself is reported separately), and checks the margins agree.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scoring import NANO, _machine, loadavg, random_model, write_results  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--candidates", type=int, default=32, help="candidates in the batch (default 32)")
    p.add_argument("--n", type=int, default=512, help="passage tokens before pooling (default 512)")
    p.add_argument("--ratio", type=int, default=4, help="MEP ratio (default 4)")
    p.add_argument("--rounds", type=int, default=5, help="paired rounds (default 5)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: os.cpu_count())")
    p.add_argument("--output", default=str(RESULTS / "compile_cpu"), help="output prefix for .md/.json")
    args = p.parse_args(argv)
    import torch

    from kalm_store import decoder

    torch.set_num_threads(args.threads)
    load_before = loadavg()
    prompt: list[int] = []
    _, tokenizer, model = random_model(NANO, prompt, "random")
    dec = model._decoder
    g = torch.Generator().manual_seed(0)
    prompt.extend([tokenizer.bos_token_id] + torch.randint(10, NANO["vocab_size"], (59,), generator=g).tolist())
    rows = -(-args.n // args.ratio)
    states = torch.randn(args.candidates, rows, NANO["hidden_size"], generator=g)  # (B, m, d)
    mask = torch.ones(args.candidates, rows, dtype=torch.bool)
    compiled = torch.compile(decoder.margins, dynamic=False)
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    with torch.inference_mode():
        prepared = decoder.prepare(dec, torch.tensor(prompt), torch.float32)
        fns = {"eager": lambda: decoder.margins(dec, prepared, states, mask),
               "compiled": lambda: compiled(dec, prepared, states, mask)}
        reference = fns["eager"]()
        t = time.perf_counter()
        diff = float((fns["compiled"]() - reference).abs().max())
        compile_s = time.perf_counter() - t
        for rnd in range(args.rounds):
            for name in (["eager", "compiled"] if rnd % 2 == 0 else ["compiled", "eager"]):
                t = time.perf_counter()
                fns[name]()
                times[name].append(time.perf_counter() - t)
    eager, comp = statistics.median(times["eager"]), statistics.median(times["compiled"])
    paired = statistics.median(e / c for e, c in zip(times["eager"], times["compiled"]))
    command = "python benchmarks/bench_compile.py" + "".join(f" {shlex.quote(a)}" for a in (argv or sys.argv[1:]))
    m = _machine(args.threads)
    res = {"benchmark": "bench_compile", "command": command, "machine": m, "load_average_before": load_before,
           "load_average_after": loadavg(), "candidates": args.candidates, "n": args.n, "ratio": args.ratio,
           "rows": rows, "compile_s": compile_s, "max_abs_margin_diff": diff, "times_s": times,
           "eager_ms": 1000 * eager, "compiled_ms": 1000 * comp, "speedup": paired}
    md = "\n".join([
        "# torch.compile of the scoring decoder (CPU, float32)", "",
        f"Command: `{command}`", "",
        f"Machine: {m['processor']}, {m['cpu_count']} CPUs ({m['torch_threads']} torch threads), {m['platform']}; "
        f"torch {m['torch']}. Load average before/after: {res['load_average_before']} / {res['load_average_after']}.", "",
        f"One batch of {args.candidates} Nano-shape candidates, {rows} stored rows each (n = {args.n}, r = {args.ratio}), "
        f"60-token prompt; medians of {args.rounds} paired rounds.", "",
        "| eager ms | compiled ms | speed-up (paired) | first compiled call, s | max abs margin diff |",
        "|---|---|---|---|---|",
        f"| {1000 * eager:.0f} | {1000 * comp:.0f} | {paired:.2f}x | {compile_s:.1f} | {diff:.1e} |", "",
    ])
    write_results(args.output, md, res)


if __name__ == "__main__":
    main()
