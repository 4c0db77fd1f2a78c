"""Peak memory of ``kalm-store build`` against the size of its input (issue 3: streaming, memory bounded).

Run:  python benchmarks/bench_memory.py [--passages 2000 8000 32000] [--words 150] [--chunk-size 256]
Writes benchmarks/results/memory_build.md and .json (machine and exact command included).

Each size is a fresh ``kalm-store build`` subprocess (tiny offline model, so encoding is quick and the
process's own footprint is what is measured) over a JSON-lines corpus of ``--words`` words per passage;
its peak resident memory is the child's ``ru_maxrss``. Texts and matrices stream in chunks, so the peak
should stay flat while the input grows; what grows with the corpus is the set of ids seen (about 100
bytes each), which the table below shows apart.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
WORDS = ("the quick brown fox jumps over lazy dog python json file data vector store passage query encoded "
         "once and stored reranker scores each candidate open read lines return number items").split()
CLI = [sys.executable, "-c", "import sys; from kalm_store.cli import main; sys.exit(main())"]


def write_corpus(path: Path, n: int, words: int, seed: int = 0) -> int:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"passage-{i:08d}", "text": " ".join(rng.choices(WORDS, k=words))}) + "\n")
    return path.stat().st_size


def peak_rss_of(cmd: list[str]) -> tuple[float, float]:
    """(peak resident MiB, seconds) of one child process, from its own rusage (``os.wait4``)."""
    t = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: keep Popen from waiting again
        seconds = time.perf_counter() - t
        if proc.returncode != 0:
            err.seek(0)
            raise RuntimeError(f"{shlex.join(cmd)} failed: {err.read()[-2000:].decode(errors='replace')}")
    return usage.ru_maxrss / 1024, seconds  # ru_maxrss is KiB on Linux


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--passages", type=int, nargs="+", default=[2000, 8000, 32000],
                   help="corpus sizes (default: 2000 8000 32000)")
    p.add_argument("--words", type=int, default=150, help="words per passage (default: 150)")
    p.add_argument("--chunk-size", type=int, default=256, help="records per commit (default: 256)")
    p.add_argument("--out", default=str(RESULTS / "memory_build"), help="output prefix (default: results/memory_build)")
    args = p.parse_args(argv)
    from kalm_store.testing import make_test_model

    work = Path(tempfile.mkdtemp(prefix="kalm-mem-"))
    model = make_test_model(work / "tiny")
    rows = []
    for n in args.passages:
        corpus = work / f"c{n}.jsonl"
        size = write_corpus(corpus, n, args.words)
        row = {"passages": n, "input_mib": size / 2**20}
        for label, extra in (("", []), ("_no_index", ["--no-fts-index", "--no-id-index"])):
            cmd = CLI + ["build", str(corpus), "--db", str(work / f"db{n}{label}"), "--table", "docs", "--model",
                         str(model), "--chunk-size", str(args.chunk_size), "--no-progress", *extra]
            row[f"peak_rss_mib{label}"], row[f"seconds{label}"] = peak_rss_of(cmd)
        rows.append(row)
        print(f"{n} passages, input {size / 2**20:.1f} MiB: peak RSS {row['peak_rss_mib']:.0f} MiB "
              f"({row['peak_rss_mib_no_index']:.0f} MiB without the indices)", flush=True)
    command = "python benchmarks/bench_memory.py" + "".join(f" {shlex.quote(a)}" for a in (argv or sys.argv[1:]))
    res = {"benchmark": "bench_memory", "command": command,
           "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
           "words_per_passage": args.words, "chunk_size": args.chunk_size, "rows": rows}
    lines = to_markdown(res)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    out.with_suffix(".md").write_text(lines)
    print(lines)
    return 0


def to_markdown(res: dict) -> str:
    rows = res["rows"]
    lines = ["# Peak memory of `kalm-store build` against input size", "", f"Command: `{res['command']}`  ",
             f"Machine: {res['machine']}  ",
             f"Tiny offline model; {res['words_per_passage']} words per passage; --chunk-size {res['chunk_size']}; "
             "one build subprocess per size, peak resident memory from its own rusage (ru_maxrss).", "",
             "| passages | input MiB | peak RSS MiB | seconds | peak RSS MiB, no FTS/id index | seconds |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['passages']:,} | {r['input_mib']:.1f} | {r['peak_rss_mib']:.0f} | {r['seconds']:.1f} | "
              f"{r['peak_rss_mib_no_index']:.0f} | {r['seconds_no_index']:.1f} |" for r in rows]
    lines.append("")
    for a, b in zip(rows, rows[1:]):
        per = {k: (b[k] - a[k]) / (b["passages"] - a["passages"]) * 2**20
               for k in ("peak_rss_mib", "peak_rss_mib_no_index")}
        lines.append(f"- {a['passages']:,} -> {b['passages']:,} passages (input x{b['input_mib'] / a['input_mib']:.0f}): "
                     f"peak memory +{per['peak_rss_mib_no_index']:.0f} bytes per added passage without the indices, "
                     f"+{per['peak_rss_mib']:.0f} with them")
    lines.append(f"- over the whole range the input grows x{rows[-1]['input_mib'] / rows[0]['input_mib']:.0f} and the "
                 f"peak {100 * (rows[-1]['peak_rss_mib'] / rows[0]['peak_rss_mib'] - 1):+.0f}%: texts and matrices "
                 "stream in chunks; what grows is per-id state (the duplicate-id rule keeps every id, ~100 B each) "
                 "and what Lance keeps per commit and fragment")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
