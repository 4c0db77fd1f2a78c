"""Peak memory of ``kalm-store build`` against the size of its input (issue 3: streaming, memory bounded).

Run:  python benchmarks/bench_memory.py [--passages 2000 8000 32000] [--words 150] [--chunk-size 256]
Writes benchmarks/results/memory_build.md and .json (machine and exact command included).

Each size is a fresh ``kalm-store build`` subprocess (tiny offline model, so encoding is quick and the
process's own footprint is what is measured) over a JSON-lines corpus of ``--words`` words per passage;
its peak resident memory is the child's ``ru_maxrss``. Texts and matrices stream in chunks, so the peak
should stay flat while the input grows; what grows with the corpus is the set of ids seen (about 100
bytes each), which the table below shows apart.

Scale mode (issue 22: memory independent of corpus size)::

    python benchmarks/bench_memory.py --scale                      # 1M and 10M passages, local and Ray
    python benchmarks/bench_memory.py --scale --passages 1000000 4000000 --engines local

builds ``--passages`` synthetic short passages (``--words``, default 8, per passage) in a fresh
process per size and engine, ``--chunk-size`` (default 100,000) records per commit, no FTS/id index,
and writes benchmarks/results/memory_scale.md and .json: the driver's peak resident memory (its own
``ru_maxrss``) up to its last commit and over the whole run (which adds the ``text_digest`` BTREE index
Lance builds at the end), the Ray workers' (the largest ``VmHWM`` among the driver's descendant processes,
sampled from /proc), wall time, and every commit's seconds against the rows already in the table
(whether a commit's cost grows with the table). The Ray engine runs on a local Ray of ``--ray-cpus``
CPUs with one actor.

BENCHMARK SWITCH, NOT A USER FEATURE: encoding millions of passages on two cores is impossible, so
in scale mode the child process replaces ``KaLMModel.encode_ratios`` (in the driver and, through a Ray
``worker_process_setup_hook``, in every Ray worker) with a function that returns one fixed 1 x d
float16 matrix per passage (``n_tokens`` = 4). Only this script does it, in its own child process;
nothing in ``kalm_store`` reads a switch, and no test relies on it. Everything else (reading,
validating, the duplicate-id rule and its id set, compression, digests, Lance commits) is the real
build.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

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
    p.add_argument("--passages", type=int, nargs="+", default=None,
                   help="corpus sizes (default: 2000 8000 32000; with --scale 1000000 10000000)")
    p.add_argument("--words", type=int, default=None, help="words per passage (default: 150; with --scale 8)")
    p.add_argument("--chunk-size", type=int, default=None,
                   help="records per commit (default: 256; with --scale 100000)")
    p.add_argument("--out", default=None,
                   help="output prefix (default: results/memory_build; with --scale results/memory_scale)")
    p.add_argument("--scale", action="store_true",
                   help="scale mode: millions of short passages, encoder skipped (see the module docstring)")
    p.add_argument("--engines", nargs="+", choices=["local", "ray"], default=["local", "ray"],
                   help="with --scale: the engines to measure (default: local ray)")
    p.add_argument("--window-rows", type=int, default=1_000_000, help="with --scale: Ray window (default: 1000000)")
    p.add_argument("--ray-cpus", type=int, default=2, help="with --scale: CPUs of the local Ray (default: 2)")
    p.add_argument("--label", default="", help="with --scale: added to the engine's name in the table (e.g. the "
                                               "kalm_store version a PYTHONPATH points the child at)")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="with --scale: only combine the runs of earlier --scale results (e.g. one per engine, "
                        "run at once) into --out")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # one scale-mode build, JSON spec
    args = p.parse_args(argv)
    if args.child is not None:
        return run_child(json.loads(args.child))
    if args.scale and args.merge:
        return merge_scale(args.merge, Path(args.out or RESULTS / "memory_scale"))
    if args.scale:
        return main_scale(args, argv)
    args.passages = args.passages or [2000, 8000, 32000]
    args.words = args.words or 150
    args.chunk_size = args.chunk_size or 256
    args.out = args.out or str(RESULTS / "memory_build")
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


# ------------------------------------------------------------------------------------------- scale mode
FAKE_TOKENS = 4  # n_tokens of every passage under the skipped encoder: one pooled row at r >= 4


def skip_encoder() -> None:
    """THE BENCHMARK SWITCH (this process only): ``KaLMModel.encode_ratios`` returns one fixed 1 x d
    float16 matrix per passage instead of running the encoder. Never used by kalm_store or its tests."""
    import numpy as np

    from kalm_store.model import EncodedPassages, KaLMModel

    def encode_ratios(self: Any, passages: Any, ratios: Any = (4,), **_: Any) -> Any:
        m = np.full((1, self.dim), 0.25, np.float16)
        return EncodedPassages(token_counts=[FAKE_TOKENS] * len(passages),
                               matrices={int(r): [m] * len(passages) for r in ratios})

    KaLMModel.encode_ratios = encode_ratios  # type: ignore[method-assign]


def write_short_corpus(path: Path, n: int, words: int, seed: int = 0) -> int:
    """``n`` records of ``words`` words, written in blocks (10M records in about a minute)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for start in range(0, n, 100_000):
            f.write("".join('{"id": "passage-%010d", "text": "%s"}\n' % (i, " ".join(rng.choices(WORDS, k=words)))
                            for i in range(start, min(n, start + 100_000))))
    return path.stat().st_size


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # exited meanwhile
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], [root]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


class TreePeak:
    """Samples the peak resident memory (VmHWM) of this process's descendants (Ray's workers) from /proc."""

    def __init__(self, every_s: float = 0.5) -> None:
        self.peaks: dict[int, tuple[str, int]] = {}  # pid -> (name, KiB)
        self.every_s = every_s
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            for pid in _descendants(os.getpid()):
                try:
                    with open(f"/proc/{pid}/status") as f:
                        fields = dict(line.split(":", 1) for line in f if ":" in line)
                    hwm = int(fields.get("VmHWM", "0 kB").split()[0])
                    self.peaks[pid] = (fields.get("Name", "?").strip(), max(hwm, self.peaks.get(pid, ("", 0))[1]))
                except (OSError, ValueError):
                    continue
            self.stop.wait(self.every_s)

    def close(self) -> dict[str, Any]:
        self.stop.set()
        self.thread.join()
        top = sorted(self.peaks.values(), key=lambda p: -p[1])
        return {"processes": len(top), "largest_mib": top[0][1] / 1024 if top else 0.0,
                "largest": top[0][0] if top else None, "top": [(n, k / 1024) for n, k in top[:6]]}


def _vm(field: str) -> float:
    """A ``VmRSS``-like field of this process's /proc status, in MiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def _index_pool() -> int | None:
    """Lance's sort pool for the index step: the user's LANCE_MEM_POOL_SIZE, else kalm_store's bound
    (None: a kalm_store from before kalm_store.index_memory, whose index step takes Lance's default)."""
    if os.environ.get("LANCE_MEM_POOL_SIZE"):
        return int(os.environ["LANCE_MEM_POOL_SIZE"])
    try:
        from kalm_store.index_memory import INDEX_POOL_BYTES
    except ImportError:
        return None
    return INDEX_POOL_BYTES


def run_child(spec: dict[str, Any]) -> int:
    """One scale-mode build in this process (encoder skipped); writes what it measured to spec["report"]."""
    import resource

    skip_encoder()
    import kalm_store.commit as commit_mod
    from kalm_store.build import BuildOptions, build

    commits: list[tuple[int, float]] = []  # (rows in the table before, seconds) of each local commit
    real_commit = commit_mod.commit_rows

    def timed_commit(table: Any, rows: Any, **kw: Any) -> Any:
        before = table.count_rows()
        t = time.perf_counter()
        result = real_commit(table, rows, **kw)
        commits.append((before, time.perf_counter() - t))
        return result

    commit_mod.commit_rows = timed_commit  # store.write imports it from the module at each call
    loop_peak: list[float] = [0.0]  # the driver's peak up to its last commit: before the indices are built

    def on_commit(summary: Any) -> None:
        loop_peak[0] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    from kalm_store.store import PassageStore

    index_start: dict[str, Any] = {}  # resident MiB and Lance's pool when the index step begins
    real_update = PassageStore.update_indices

    def timed_update(self: Any, **kw: Any) -> Any:
        index_start["rss_mib"] = _vm("VmRSS")  # after the builder released its freed memory
        return real_update(self, **kw)

    PassageStore.update_indices = timed_update  # type: ignore[method-assign]

    options = BuildOptions(spec["input"], db=spec["db"], table="docs", model=spec["model"],
                           chunk_size=spec["chunk_size"], progress=False, fts_index=False, id_index=False)
    tree = TreePeak() if spec["engine"] == "ray" else None
    t = time.perf_counter()
    if spec["engine"] == "ray":
        import ray

        from kalm_store.plugins.ray import RayOptions, build_on_ray

        ray.init(num_cpus=spec["ray_cpus"], include_dashboard=False, log_to_driver=False,
                 runtime_env={"worker_process_setup_hook": skip_encoder})
        try:
            summary = build_on_ray(options, RayOptions(workers=1, window_rows=spec["window_rows"]),
                                   on_commit=on_commit)
        finally:
            ray.shutdown()
    else:
        summary = build(options, on_commit=on_commit)
    seconds = time.perf_counter() - t
    report = {"seconds": seconds, "driver_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "loop_peak_rss_mib": loop_peak[0], "index_start_rss_mib": index_start.get("rss_mib"),
              "index_pool_bytes": _index_pool(), "index_seconds": summary.index_seconds, "indices": summary.indices,
              "written": summary.written, "rows": summary.rows, "commits": summary.commits, "read": summary.read,
              "commit_seconds": commits, "workers": tree.close() if tree is not None else None}
    Path(spec["report"]).write_text(json.dumps(report))
    return 0


def main_scale(args: argparse.Namespace, argv: list[str] | None) -> int:
    from kalm_store.testing import make_test_model

    sizes = args.passages or [1_000_000, 10_000_000]
    words = args.words or 8
    chunk = args.chunk_size or 100_000
    out = Path(args.out or RESULTS / "memory_scale")
    work = Path(tempfile.mkdtemp(prefix="kalm-mem-scale-"))
    model = make_test_model(work / "tiny")
    runs = []
    for n in sizes:
        corpus = work / f"c{n}.jsonl"
        t = time.perf_counter()
        size = write_short_corpus(corpus, n, words)
        print(f"{n:,} passages: {size / 2**20:.0f} MiB written in {time.perf_counter() - t:.0f} s", flush=True)
        for engine in args.engines:
            spec = {"input": str(corpus), "db": str(work / f"db-{engine}-{n}"), "model": str(model),
                    "chunk_size": chunk, "engine": engine, "window_rows": args.window_rows,
                    "ray_cpus": args.ray_cpus, "report": str(work / f"r-{engine}-{n}.json")}
            child_rss, seconds = peak_rss_of([sys.executable, str(Path(__file__).resolve()), "--child",
                                              json.dumps(spec)])
            rep = json.loads(Path(spec["report"]).read_text())
            if rep["rows"] != n or rep["written"] != n:
                raise RuntimeError(f"{engine} build of {n} passages stored {rep['rows']} rows")
            run = {"engine": engine + (f" ({args.label})" if args.label else ""), "passages": n, "input_mib": size / 2**20, "process_seconds": seconds,
                   "wait4_maxrss_mib": child_rss, **rep}
            runs.append(run)
            print(f"  {engine}: driver peak {rep['driver_peak_rss_mib']:.0f} MiB, {rep['seconds']:.0f} s, "
                  f"{rep['commits']} commits" + (f", largest worker {rep['workers']['largest_mib']:.0f} MiB"
                                                 if rep["workers"] else ""), flush=True)
            shutil.rmtree(spec["db"], ignore_errors=True)
        corpus.unlink()
    command = "python benchmarks/bench_memory.py" + "".join(f" {shlex.quote(a)}" for a in (argv or sys.argv[1:]))
    res = {"benchmark": "bench_memory --scale", "command": command,
           "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
           "load_average": os.getloadavg(), "words_per_passage": words, "chunk_size": chunk,
           "window_rows": args.window_rows, "ray_cpus": args.ray_cpus, "runs": runs}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    out.with_suffix(".md").write_text(scale_markdown(res))
    print(scale_markdown(res))
    shutil.rmtree(work, ignore_errors=True)
    return 0


def merge_scale(paths: list[str], out: Path) -> int:
    """One results file from several --scale runs (their commands all listed)."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    res = dict(parts[0])
    res["command"] = [c for part in parts for c in ([part["command"]] if isinstance(part["command"], str)
                                                     else part["command"])]
    res["load_average"] = max((part["load_average"] for part in parts), key=lambda x: x[0])
    res["runs"] = sorted((r for part in parts for r in part["runs"]), key=lambda r: (r["engine"], r["passages"]))
    res["merged"] = "python benchmarks/bench_memory.py --scale --merge " + " ".join(shlex.quote(p) for p in paths)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    out.with_suffix(".md").write_text(scale_markdown(res))
    print(scale_markdown(res))
    return 0


def scale_markdown(res: dict[str, Any]) -> str:
    commands = [res["command"]] if isinstance(res["command"], str) else res["command"]
    lines = ["# Peak memory of `kalm-store build` at millions of passages (encoder skipped)", "",
             *[f"Command: `{c}`  " for c in commands], f"Machine: {res['machine']}; shared with other engineers' jobs "
             f"(load average at the end {', '.join(f'{x:.1f}' for x in res['load_average'])})  ",
             f"{res['words_per_passage']} words per passage; --chunk-size {res['chunk_size']}; no FTS/id index; "
             f"Ray: local, {res['ray_cpus']} CPUs, 1 actor, --window-rows {res['window_rows']}. "
             + (f"The runs above ran at the same time (one command per engine; combined by `{res['merged']}`), so "
                "their seconds include each other's load. " if res.get("merged") and len(commands) > 1 else "") + "BENCHMARK SWITCH: "
             "the encoder is replaced by a fixed 1 x d matrix per passage (see the script's docstring); reading, "
             "validation, the duplicate-id rule, compression, digests and commits are the real build. One run each.",
             "", "| engine | passages | input MiB | driver peak RSS MiB, up to the last commit | driver RSS MiB at the "
             "index step's start | driver peak RSS MiB, whole run (with the text_digest index) | Lance sort pool "
             "MiB | largest Ray worker peak MiB | seconds (index s) | commits | first / last commit s (rows before) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["runs"]:
        c = r["commit_seconds"]
        commit = f"{c[0][1]:.2f} ({c[0][0]:,}) / {c[-1][1]:.2f} ({c[-1][0]:,})" if c else "n/a (Ray: one Append per window)"
        worker = f"{r['workers']['largest_mib']:.0f}" if r["workers"] else "-"
        start = f"{r['index_start_rss_mib']:.0f}" if r.get("index_start_rss_mib") else "-"
        pool = r.get("index_pool_bytes")
        pool = f"{pool / 2**20:.0f}" if pool else "default (150)"
        lines.append(f"| {r['engine']} | {r['passages']:,} | {r['input_mib']:.0f} | {r['loop_peak_rss_mib']:.0f} | "
                     f"{start} | {r['driver_peak_rss_mib']:.0f} | {pool} | {worker} | {r['seconds']:.0f} ({r['index_seconds']:.0f}) | "
                     f"{r['commits']} | {commit} |")
    lines.append("")
    for engine in dict.fromkeys(r["engine"] for r in res["runs"]):
        rs = [r for r in res["runs"] if r["engine"] == engine]
        if len(rs) < 2:
            continue
        a, b = rs[0], rs[-1]
        growth = 100 * (b["loop_peak_rss_mib"] / a["loop_peak_rss_mib"] - 1)
        total = 100 * (b["driver_peak_rss_mib"] / a["driver_peak_rss_mib"] - 1)
        line = (f"- {engine}: {a['passages']:,} -> {b['passages']:,} passages (x{b['passages'] / a['passages']:.0f}): "
                f"driver peak up to the last commit {a['loop_peak_rss_mib']:.0f} -> {b['loop_peak_rss_mib']:.0f} MiB "
                f"({growth:+.1f}%); whole run, with Lance's text_digest index at the end, "
                f"{a['driver_peak_rss_mib']:.0f} -> {b['driver_peak_rss_mib']:.0f} MiB (**{total:+.1f}%**: the < +10% "
                f"target {'met' if total < 10 else 'NOT met'})")
        if a["workers"] and b["workers"]:
            line += (f"; largest worker {a['workers']['largest_mib']:.0f} -> {b['workers']['largest_mib']:.0f} MiB "
                     f"({100 * (b['workers']['largest_mib'] / a['workers']['largest_mib'] - 1):+.1f}%)")
        line += f"; {b['seconds'] / a['seconds']:.1f}x the time"
        lines.append(line)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
