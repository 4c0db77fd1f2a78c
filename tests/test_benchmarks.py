"""Smoke tests of the benchmarks: --quick runs work end to end, write their tables and check their own results."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEADER = "| r | FBNL ms | joint ms | measured speed-up | FLOP-model speed-up |"




def test_bench_scoring_quick_writes_the_table(tmp_path, run_bench):
    prefix = tmp_path / "scoring_quick"
    proc = run_bench("bench_scoring.py", "--quick", "--threads", "1", "--output", str(prefix))
    md = Path(f"{prefix}.md").read_text()
    assert HEADER in md and HEADER in proc.stdout
    assert "--quick" in md  # the exact command is recorded
    res = json.loads(Path(f"{prefix}.json").read_text())
    assert [row["r"] for row in res["results"]] == [1, 4]
    assert res["machine"]["cpu_count"] == os.cpu_count()
    for row in res["results"]:
        assert row["fbnl_ms"] > 0 and row["joint_ms"] > 0 and row["flop_speedup"] > 1
    # FBNL at r=1 computes the joint model's margin (up to float16 storage of the encoder states)
    assert res["max_abs_margin_diff_r1"] < 5e-3


def test_flop_model_reproduces_the_nano_trend():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from bench_scoring import NANO, flop_model
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    layers = ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(18)]
    ratios = [flop_model(NANO, layers, 512, 60, r)["ratio"] for r in (1, 2, 4, 8)]
    reference = [6.2, 7.8, 8.9, 9.6]  # KALM_REFERENCE.md, n = 512, 60-token prompt
    assert ratios == sorted(ratios)
    for got, ref in zip(ratios, reference):
        assert 0.95 * ref < got < 1.15 * ref, (ratios, reference)


def test_bench_kv_cache_quick_cached_scores_equal_uncached(tmp_path, run_bench):
    prefix = tmp_path / "kv_quick"
    run_bench("bench_kv_cache.py", "--quick", "--threads", "1", "--output", str(prefix))
    res = json.loads(Path(f"{prefix}.json").read_text())
    assert "| cache | passages held | hit rate |" in Path(f"{prefix}.md").read_text()
    # margins from cached keys/values are the uncached margins: the cache changes time, never scores
    assert res["max_abs_margin_diff"] < 1e-5
    none, small, large = res["results"]
    assert none["cache_mib"] is None and none["hit_rate"] == 0
    assert 0 < small["passages_held"] < large["passages_held"] and small["hit_rate"] <= large["hit_rate"]
    assert 0 < res["projection_share"] < 1


def test_bench_gpu_quick_on_the_cpu_writes_the_table(tmp_path, run_bench):
    """The GPU benchmark is prepared for a lent GPU; here it runs its CPU smoke path end to end."""
    prefix = tmp_path / "gpu_quick"
    run_bench("bench_gpu.py", "--quick", "--device", "cpu", "--output", str(prefix))
    md = Path(f"{prefix}.md").read_text()
    assert "| n | r | rows | FBNL ms (p90) |" in md and "--device cpu" in md
    res = json.loads(Path(f"{prefix}.json").read_text())
    assert res["device"] == "cpu" and res["compute_dtype"] == "float32"
    assert [(row["n"], row["r"]) for row in res["results"]] == [(64, 1), (64, 4)]
    for row in res["results"]:
        assert row["fbnl_ms"] > 0 and row["joint_ms"] > 0 and len(row["fbnl_ms_all"]) == 2
    # FBNL at r = 1 computes the joint model's margins (float16 storage of the states in between)
    assert res["max_abs_margin_diff_r1"]["64"] < 5e-3


def test_bench_update_quick_checks_the_updated_table(tmp_path, run_bench):
    proc = run_bench("bench_update.py", "--quick", "--out", str(tmp_path))
    res = json.loads((tmp_path / "update_quick.json").read_text())
    steps = {r["step"]: r for r in res["rows"]}
    assert steps["fresh build"]["written"] == 40 and steps["re-run --update, unchanged"]["written"] == 0
    assert [r["updated"] for r in res["rows"][3:]] == [2, 10]  # 5% and 25% of 40 texts, and only those
    assert res["max_abs_diff_edited_vs_encoded_alone"] < 4e-3  # float16 steps, not another passage's matrix
    assert "| --update, 25% of texts changed | 10 | 10 |" in proc.stdout


def test_bench_finetune_quick_writes_the_table(tmp_path, run_bench):
    proc = run_bench("bench_finetune.py", "--quick", "--threads", "1", "--out", str(tmp_path))
    res = json.loads((tmp_path / "finetune_cpu.json").read_text())
    rows = {row["method"]: row for row in res["results"]}
    assert list(rows) == ["store", "joint, encoder frozen", "joint, encoder trained"]
    assert all(row["pairs_per_s"] > 0 and len(row["step_s"]) == 2 for row in rows.values())
    assert rows["store"]["store_speedup"] == 1.0
    assert res["store_rows_fetched"] >= 3  # the cache is off: every step read its rows from the table
    # gradients through the encoder keep its activations for backward: more memory per batch
    assert rows["joint, encoder trained"]["saved_for_backward_bytes"] > rows["store"]["saved_for_backward_bytes"]
    assert "| store |" in proc.stdout and "--quick" in (tmp_path / "finetune_cpu.md").read_text()


def test_bench_bf16_quick_writes_both_dtypes_and_their_fidelity(tmp_path, run_bench):
    prefix = tmp_path / "bf16_quick"
    run_bench("bench_bf16.py", "--quick", "--threads", "1", "--out", str(prefix))
    md = Path(f"{prefix}.md").read_text()
    assert "| product | float32 GFLOP/s | bfloat16 GFLOP/s | bf16 speed-up |" in md and "Shared host" in md
    assert "Command: `python benchmarks/bench_bf16.py --quick" in md
    res = json.loads(Path(f"{prefix}.json").read_text())
    assert set(res["matmul_gflops"]) == {"float32", "bfloat16"}
    assert [(row["n"], row["r"]) for row in res["score"].values()] == [(64, 1), (64, 4)]
    for row in res["score"].values():  # both dtypes timed, achieved rate counted from the shape
        assert all(row[d]["ms_per_100"] > 0 and row[d]["gflops"] > 0 for d in ("float32", "bfloat16"))
    assert all(res["encode"][d]["passages_per_s"] > 0 for d in ("float32", "bfloat16"))
    for paths in res["fidelity"].values():  # bf16 really differs from float32, within the tests' bound
        assert set(paths) == {"score", "build", "build+score"}
        assert all(1e-5 < v["max_abs_delta"] <= 0.03 and v["kendall_tau"] > 0.5 for v in paths.values())


def test_bench_memory_scale_mode_builds_every_row_and_writes_its_table(tmp_path, run_bench):
    """The scale mode's plumbing only (its encoder is skipped, so nothing here says anything about the
    model): every passage stored, one report per size, the table and the Command line written."""
    prefix = tmp_path / "scale"
    run_bench("bench_memory.py", "--scale", "--passages", "3000", "6000", "--chunk-size", "2000", "--engines",
              "local", "--out", str(prefix))
    res = json.loads(Path(f"{prefix}.json").read_text())
    assert [(r["engine"], r["passages"], r["rows"], r["commits"]) for r in res["runs"]] == \
        [("local", 3000, 3000, 2), ("local", 6000, 6000, 3)]
    assert all(len(r["commit_seconds"]) == r["commits"] and r["driver_peak_rss_mib"] > 0 for r in res["runs"])
    md = Path(f"{prefix}.md").read_text()
    assert "Command: `python benchmarks/bench_memory.py --scale" in md and "BENCHMARK SWITCH" in md
