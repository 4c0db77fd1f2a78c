"""Reliability figures for the README: random SIGKILLs survived, codec fuzz cases, hostile inputs tried.

Run:  .venv/bin/python benchmarks/bench_reliability.py [--kills 20] [--fuzz-profile bench] [--seed 0]
Writes benchmarks/results/reliability.md and .json (machine and exact command included).

1. Kills: ``kalm-store build`` subprocesses (tiny offline model, 300 passages, --chunk-size 4) SIGKILLed
   at random moments and resumed; every finished table is compared with a clean build (ids, no
   duplicates, bitwise matrices, metadata, indices) by ``tests/test_reliability.py::kill_and_resume``.
2. Fuzz: the hypothesis properties of ``tests/test_codec_fuzz.py`` under ``HYPOTHESIS_PROFILE=bench``
   (10,000 examples per property), plus the crafted-bomb allocation checks.
3. Inputs: the hostile-input, corruption, mismatch and security tests of ``tests/test_reliability.py``
   (run with pytest; the count of cases is reported).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tests" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def run_kills(kills: int, seed: int) -> dict:
    from kalm_store import KaLMModel
    from kalm_store.testing import make_test_model

    rel = _load("test_reliability")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_test_model(Path(tmp) / "tiny")
        model = KaLMModel.from_pretrained(model_dir)
        work = Path(tmp) / "work"
        work.mkdir()
        report = rel.kill_and_resume(work, model_dir, kills=kills, n=300, chunk=4, seed=seed, model=model,
                                     log=lambda m: print("  " + m, flush=True))
    return {"kills": report.kills, "rounds_verified": report.rounds, "runs_finished_before_kill": report.completed_runs,
            "rows_at_kill": report.rows_at_kill, "rows_lost": 0, "rows_duplicated": 0, "seconds": round(report.seconds, 1)}


def run_fuzz(profile: str) -> dict:
    os.environ["HYPOTHESIS_PROFILE"] = profile
    fuzz = _load("test_codec_fuzz")
    t0 = time.perf_counter()
    for name in ("test_round_trip_is_bitwise", "test_damaged_bytes_are_refused_or_decode_to_the_original",
                 "test_wrong_shape_is_refused", "test_arbitrary_bytes_never_crash"):
        print(f"  {name} ...", flush=True)
        getattr(fuzz, name)()  # raises on the first counterexample
    bombs = fuzz.test_crafted_bombs_are_refused_without_allocating
    (cases,) = [m.args[1] for m in bombs.pytestmark if m.name == "parametrize"]  # the test's own case list
    for case in cases:
        bombs(case)  # raises unless refused with < 1 MiB allocated
    return {"profile": profile, "cases": dict(fuzz.CASES), "total_cases": sum(fuzz.CASES.values()),
            "damaged_outcomes": dict(sorted(fuzz.OUTCOMES.items())), "bombs_refused_under_1MiB": list(cases),
            "seconds": round(time.perf_counter() - t0, 1)}


HOSTILE = "bad_input_names_file_and_line"  # the parametrized hostile-input cases of tests/test_reliability.py


def _pytest(selection: str) -> tuple[str, int, int]:
    """(pytest's summary line, its return code, tests passed) for ``-k selection`` of test_reliability."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "tests/test_reliability.py", "-k", selection],
                          cwd=ROOT, capture_output=True, text=True)
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-500:]
    passed = re.search(r"(\d+) passed", tail)
    return tail, proc.returncode, int(passed.group(1)) if passed else 0


def run_inputs() -> dict:
    t0 = time.perf_counter()
    hostile_tail, hostile_rc, hostile = _pytest(HOSTILE)
    rest_tail, rest_rc, _ = _pytest(f"not sigkill and not during and not {HOSTILE}")
    return {"hostile_input_cases": hostile, "hostile_pytest_summary": hostile_tail,
            "pytest_summary": rest_tail, "returncode": hostile_rc or rest_rc,
            "seconds": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=20, help="random SIGKILLs of a build (default: 20)")
    p.add_argument("--fuzz-profile", choices=["ci", "bench"], default="bench",
                   help="hypothesis profile: bench = 10,000 examples per property (default: bench)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill moments (default: 0)")
    p.add_argument("--skip", action="append", choices=["kills", "fuzz", "inputs"], default=[],
                   help="leave a part out, keeping its figures from an earlier run in --out (repeatable)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "reliability"),
                   help="output path without suffix (default: benchmarks/results/reliability)")
    args = p.parse_args(argv)
    out = Path(args.out)
    previous = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else {}
    result: dict = {k: previous[k] for k in ("kills", "fuzz", "inputs") if k in previous and k in args.skip}
    result |= {"command": previous.get("command") if args.skip else
               "python benchmarks/bench_reliability.py " + " ".join(argv or sys.argv[1:]),
                    "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
                    "python": platform.python_version()}
    if "fuzz" not in args.skip:
        print("codec fuzz:", flush=True)
        result["fuzz"] = run_fuzz(args.fuzz_profile)
        print(f"  {result['fuzz']['total_cases']} cases in {result['fuzz']['seconds']} s", flush=True)
    if "kills" not in args.skip:
        print(f"{args.kills} random SIGKILLs:", flush=True)
        result["kills"] = run_kills(args.kills, args.seed)
    if "inputs" not in args.skip:
        print("hostile inputs / corruption / mismatch / security tests:", flush=True)
        result["inputs"] = run_inputs()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# Reliability benchmark", "", f"Command: `{result['command']}`  ", f"Machine: {result['machine']}", ""]
    if "kills" in result:
        k = result["kills"]
        lines += [f"- SIGKILLs survived: **{k['kills']}** (tables verified: {k['rounds_verified']}; rows lost 0, "
                  f"duplicated 0, every matrix bitwise equal to a clean build; {k['seconds']} s); rows committed "
                  f"at each kill: {k['rows_at_kill']}"]
    if "fuzz" in result:
        f = result["fuzz"]
        lines += [f"- Codec fuzz cases: **{f['total_cases']}** ({f['cases']}), 0 failures; outcomes of damaged "
                  f"values: {f['damaged_outcomes']}; {len(f['bombs_refused_under_1MiB'])} crafted bombs "
                  f"({', '.join(f['bombs_refused_under_1MiB'])}) refused with < 1 MiB allocated ({f['seconds']} s)"]
    if "inputs" in result:
        i = result["inputs"]
        lines += [f"- Hostile inputs through the CLI: **{i['hostile_input_cases']}** cases, each refused with a "
                  f"one-line error naming file and line ({i['hostile_pytest_summary']})",
                  f"- Corruption / mismatch / security / --skip-bad / truncation tests: {i['pytest_summary']}"]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    ok = result.get("inputs", {}).get("returncode", 0) == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
