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
4. Races: ``--race-rounds`` times, two ``kalm-store build`` subprocesses of one input into one new table
   at once (each reads the stored ids at its start); rows and distinct ids are counted in the table.
   Then the deterministic race tests of ``tests/test_concurrent_writes.py`` (an update racing a repool,
   a build across a repool, concurrent inserts of one id, a table folder left without a version,
   damaged indices, duplicate-id repair) and the interrupted ``repool --drop-source`` test.

Rows lost and duplicated are counted from the tables: in the kill part, each resumed table against
the clean build (ids missing, ids stored more than once, matrices that differ), before the test's own
assertions run.
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
    counts = {"rows_lost": 0, "rows_duplicated": 0, "matrices_differing": 0, "tables_compared": 0}
    compare = rel.assert_same_table

    def counted(got: dict, clean: dict) -> None:  # count from the tables, then the test's own assertions
        counts["tables_compared"] += 1
        counts["rows_duplicated"] += len(got["ids"]) - len(set(got["ids"]))
        counts["rows_lost"] += len(set(clean["ids"]) - set(got["ids"]))
        counts["matrices_differing"] += sum(got["matrices"][r].get(i) != m for r, by_id in clean["matrices"].items()
                                            for i, m in by_id.items())
        compare(got, clean)

    rel.assert_same_table = counted  # kill_and_resume compares each resumed table through this name
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_test_model(Path(tmp) / "tiny")
        model = KaLMModel.from_pretrained(model_dir)
        work = Path(tmp) / "work"
        work.mkdir()
        report = rel.kill_and_resume(work, model_dir, kills=kills, n=300, chunk=4, seed=seed, model=model,
                                     log=lambda m: print("  " + m, flush=True))
    return {"kills": report.kills, "rounds_verified": report.rounds, "runs_finished_before_kill": report.completed_runs,
            "rows_at_kill": report.rows_at_kill, **counts, "seconds": round(report.seconds, 1)}


RACES = "tests/test_concurrent_writes.py"  # deterministic races (issue 14)


def run_races(rounds: int, n: int = 120) -> dict:
    """Two real builds of one input into one new table at once, ``rounds`` times; then the race tests."""
    from kalm_store.testing import make_test_model

    cli = [sys.executable, "-c", "import sys; from kalm_store.cli import main; sys.exit(main())"]
    t0 = time.perf_counter()
    out: dict = {"concurrent_build_rounds": rounds, "passages": n, "rows": [], "distinct_ids": [],
                 "rows_duplicated": 0, "rows_lost": 0, "returncodes": []}
    rel = _load("test_reliability")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_test_model(Path(tmp) / "tiny")
        inp = rel.write_jsonl(Path(tmp) / "corpus.jsonl", rel.make_corpus(n, seed=11))
        for k in range(rounds):
            db = Path(tmp) / f"db{k}"
            cmd = cli + ["build", str(inp), "--db", str(db), "--table", "docs", "--model", str(model_dir),
                         "--chunk-size", "4", "--no-progress"]
            procs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)]
            codes = [p.wait(timeout=600) for p in procs]
            out["returncodes"].append(codes)
            if any(codes):
                # both may race to create the table: the loser's first commit is refused, one line; run it again
                again = subprocess.run(cmd, capture_output=True, text=True)
                out["returncodes"][-1].append(again.returncode)
            import lance

            ids = lance.dataset(str(db / "docs.lance")).to_table(columns=["id"]).column(0).to_pylist()
            out["rows"].append(len(ids))
            out["distinct_ids"].append(len(set(ids)))
            out["rows_duplicated"] += len(ids) - len(set(ids))
            out["rows_lost"] += n - len(set(ids))
    tail, rc, passed = _pytest_file(RACES)
    rtail, rrc, rpassed = _pytest_file("tests/test_repool.py", "interrupted_drop_source or refusals")
    out |= {"race_tests_passed": passed + rpassed, "race_pytest_summary": f"{tail}; {rtail}",
            "returncode": rc or rrc, "seconds": round(time.perf_counter() - t0, 1)}
    return out


def _pytest_file(path: str, selection: str | None = None) -> tuple[str, int, int]:
    """(pytest's summary line, its return code, tests passed) for one test file (``-k selection``)."""
    proc = subprocess.run([sys.executable, "-m", "pytest", path] + (["-k", selection] if selection else []),
                          cwd=ROOT, capture_output=True, text=True)
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-500:]
    passed = re.search(r"(\d+) passed", tail)
    return tail, proc.returncode, int(passed.group(1)) if passed else 0


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


def _pytest(selection: str, file: str = "tests/test_reliability.py") -> tuple[str, int, int]:
    """(pytest's summary line, its return code, tests passed) for ``-k selection`` of ``file``."""
    proc = subprocess.run([sys.executable, "-m", "pytest", file, "-k", selection],
                          cwd=ROOT, capture_output=True, text=True)
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-500:]
    passed = re.search(r"(\d+) passed", tail)
    return tail, proc.returncode, int(passed.group(1)) if passed else 0


def run_inputs() -> dict:
    t0 = time.perf_counter()
    hostile_tail, hostile_rc, hostile = _pytest(HOSTILE)
    malformed_tail, malformed_rc, malformed = _pytest("", "tests/test_malformed_input.py")
    rest_tail, rest_rc, _ = _pytest(f"not sigkill and not during and not {HOSTILE}")
    return {"hostile_input_cases": hostile, "hostile_pytest_summary": hostile_tail,
            "malformed_file_cases": malformed, "malformed_pytest_summary": malformed_tail,
            "pytest_summary": rest_tail, "returncode": hostile_rc or malformed_rc or rest_rc,
            "seconds": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=20, help="random SIGKILLs of a build (default: 20)")
    p.add_argument("--fuzz-profile", choices=["ci", "bench"], default="bench",
                   help="hypothesis profile: bench = 10,000 examples per property (default: bench)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill moments (default: 0)")
    p.add_argument("--race-rounds", type=int, default=3,
                   help="rounds of two concurrent builds of one input into one table (default: 3)")
    p.add_argument("--skip", action="append", choices=["kills", "fuzz", "inputs", "races"], default=[],
                   help="leave a part out, keeping its figures from an earlier run in --out (repeatable)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "reliability"),
                   help="output path without suffix (default: benchmarks/results/reliability)")
    args = p.parse_args(argv)
    out = Path(args.out)
    previous = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else {}
    result: dict = {k: previous[k] for k in ("kills", "fuzz", "inputs", "races") if k in previous and k in args.skip}
    result |= {"command": previous.get("command") if args.skip else
               "python benchmarks/bench_reliability.py " + " ".join(argv or sys.argv[1:]),
                    "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()} (shared with other "
                               "jobs: the seconds are not comparable between runs)",
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
    if "races" not in args.skip:
        print(f"{args.race_rounds} rounds of two concurrent builds, then the race tests:", flush=True)
        result["races"] = run_races(args.race_rounds)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# Reliability benchmark", "", f"Command: `{result['command']}`  ", f"Machine: {result['machine']}", ""]
    if "kills" in result:
        k = result["kills"]
        lines += [f"- SIGKILLs survived: **{k['kills']}** (tables verified: {k['rounds_verified']}; counted in the "
                  f"tables: rows lost {k.get('rows_lost')}, duplicated {k.get('rows_duplicated')}, matrices differing "
                  f"from a clean build {k.get('matrices_differing')}; {k['seconds']} s); rows committed "
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
                  f"- Malformed input files (CSV quoting and field counts, bad UTF-8, Parquet, JSON lines, --skip-bad, "
                  f"mass-delete guard; tests/test_malformed_input.py): **{i.get('malformed_file_cases', 0)}** cases "
                  f"({i.get('malformed_pytest_summary', 'not run')})",
                  f"- Corruption / mismatch / security / --skip-bad / truncation tests: {i['pytest_summary']}"]
    if "races" in result:
        r = result["races"]
        lines += [f"- Two concurrent builds of one input ({r['passages']} passages) into one table, "
                  f"{r['concurrent_build_rounds']} rounds: rows {r['rows']}, distinct ids {r['distinct_ids']}: "
                  f"**{r['rows_duplicated']} duplicated**, {r['rows_lost']} lost (exit codes {r['returncodes']})",
                  f"- Deterministic races (update vs repool, build across a repool, concurrent inserts of one id, "
                  f"table folder without a version, damaged indices, duplicate repair, interrupted --drop-source): "
                  f"**{r['race_tests_passed']}** tests ({r['race_pytest_summary']})"]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    ok = result.get("inputs", {}).get("returncode", 0) == 0 and result.get("races", {}).get("returncode", 0) == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
