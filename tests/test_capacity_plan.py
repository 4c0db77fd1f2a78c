"""The capacity plan (issue 22, item 4): its quick measurement runs end to end, its totals are the
arithmetic of its measured rates, and its readers of other helpers' results files use what they hold
or say plainly that they fall back."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("capacity_plan", ROOT / "benchmarks" / "capacity_plan.py")
capacity_plan = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(capacity_plan)




def test_quick_measurement_and_plan_agree_with_their_own_arithmetic(tmp_path, run_bench):
    rates_prefix = tmp_path / "rates"
    run_bench("capacity_measure.py", "--quick", "--out", str(rates_prefix), timeout=240)
    rates = json.loads(Path(f"{rates_prefix}.json").read_text())
    assert "--quick" in Path(f"{rates_prefix}.md").read_text() and rates["shape_name"] == "tiny"
    assert 0 < rates["tokens_mean"] <= rates["tokens_max"] <= 256  # passages cut to at most 256 tokens
    assert rates["fetch_rows"] == 120 and rates["build_passages_per_cpu_s"] > 0
    for r in (4, 8):  # decoded matrices of (ceil(n/4), 64) and (ceil(n/8), 64) float16 values, plus a frame
        assert rates["column_bytes_per_passage"][f"kalm_r{r}"] > math.ceil(rates["tokens_mean"] / r) * 64 * 2 * 0.5
    assert rates["column_bytes_per_passage"]["kalm_r4"] > 1.8 * rates["column_bytes_per_passage"]["kalm_r8"]
    peaks = rates["peak_rss_mib"]
    assert 0 < peaks["loaded"] <= peaks["after_build"] <= peaks["after_queries"]
    assert rates["other_columns"]["bytes_per_row"]["vector (data)"] == pytest.approx(768 * 4, rel=0.01)

    plan_prefix = tmp_path / "plan"
    proc = run_bench("capacity_plan.py", "--rates", f"{rates_prefix}.json", "--out", str(plan_prefix), timeout=240)
    md = Path(f"{plan_prefix}.md").read_text()
    assert "Command: `python benchmarks/capacity_plan.py --rates" in md and "| passages | r |" in proc.stdout
    res = json.loads(Path(f"{plan_prefix}.json").read_text())
    rows = res["plan"]["rows"]
    assert [(row["passages"], row["ratio"]) for row in rows] == [(n, r) for n in (10**6, 10**8, 10**9) for r in (4, 8)]
    common = res["plan"]["common_bytes_per_passage"]
    assert common == pytest.approx(sum(res["plan"]["per_passage_common_bytes"].values()))
    for row in rows:
        r, n = row["ratio"], row["passages"]
        assert row["bytes_per_passage"] == pytest.approx(rates["column_bytes_per_passage"][f"kalm_r{r}"] + common)
        assert row["bytes_on_disk"] == pytest.approx(n * row["bytes_per_passage"])
        assert row["build_core_hours_float32"] == pytest.approx(n / rates["build_passages_per_cpu_s"] / 3600)
        q = rates["query_ms_median"]
        assert row["qps_per_replica_1_thread"] == pytest.approx(
            1000 / (q[f"first_stage_fetch_decode_r{r}_ms"] + q[f"score_r{r}_cpu_ms"]))
        # no GPU encoder rate is measured unless a gpu_*.json holds one: then and only then GPU-hours
        assert (row["gpu_hours"] is None) == (res["sources"]["gpu"].get("file") is None)
    by_n = {row["passages"]: row for row in rows if row["ratio"] == 4}
    if by_n[10**9]["local_build_peak_mib"] is not None:  # the driver's memory never shrinks with N
        assert by_n[10**6]["local_build_peak_mib"] <= by_n[10**9]["local_build_peak_mib"]
    if res["plan"]["rows"][0]["gpu_hours"] is None:
        assert "none measured" in md


def _results_with(tmp_path: Path, files: dict[str, object]) -> Path:
    folder = tmp_path / "results"
    folder.mkdir()
    for name in ("bf16_cpu.json", "threads_cpu_t1.json", "threads_cpu_t2.json"):
        shutil.copy(ROOT / "benchmarks" / "results" / name, folder / name)
    for name, data in files.items():
        (folder / name).write_text(json.dumps(data))
    return folder


def test_readers_use_the_other_helpers_files_when_present(tmp_path):
    folder = _results_with(tmp_path, {
        # the layout of bench_memory.py --scale: the driver's own peak beside the process tree's
        "memory_scale.json": {"runs": [
            {"engine": "local", "passages": 1_000_000, "wait4_maxrss_mib": 9e3, "driver_peak_rss_mib": 700.0},
            {"engine": "local", "passages": 10_000_000, "wait4_maxrss_mib": 9e3, "driver_peak_rss_mib": 740.0},
            {"engine": "ray", "passages": 1_000_000, "driver_peak_rss_mib": 900.0, "workers": {"largest_mib": 5.0}},
            {"engine": "ray", "passages": 10_000_000, "driver_peak_rss_mib": 880.0, "workers": {"largest_mib": 5.0}}]},
        "query_s3.json": {"rows": [{"latency_ms": 5, "first_stage_ms": 12.0, "fetch_select_ms": 15.0},
                                   {"latency_ms": 20, "first_stage_ms": 45.0, "fetch_select_ms": 70.0,
                                    "fetch_rowid_ms": 55.0}]},
        "serve_nano.json": {"model_shape": {"hidden_size": 640}, "candidates": 100, "machine": {"threads": 2},
                            "results": [{"requests_per_s": 0.2, "documents": "store", "concurrency": 1},
                                        {"requests_per_s": 0.5, "documents": "online", "concurrency": 4},
                                        {"requests_per_s": 0.3, "documents": "store", "concurrency": 4}]},
    })
    mem = capacity_plan.memory_source(folder)
    assert mem["file"] == "memory_scale.json" and mem["note"] is None
    assert mem["engines"]["local"]["growth_bytes_per_passage"] == pytest.approx(40 * 2**20 / 9e6)
    assert mem["engines"]["ray"]["growth_bytes_per_passage"] == 0.0  # a fall is no growth
    s3 = capacity_plan.s3_source(folder)
    assert (s3["file"], s3["first_stage_ms"], s3["fetch_ms"]) == ("query_s3.json", 45.0, 55.0)
    # the layout of bench_query.py --s3: passes per latency, a median of stages each with its ms
    (folder / "query_s3.json").write_text(json.dumps({"model_shape": {"hidden_size": 256}, "matrix_bytes_mean": 19e3,
        "passes": [{"latency_ms": 5.0, "median": {"first_stage": {"ms": 300.0}, "fetch_rowid": {"ms": 400.0}}},
                   {"latency_ms": 20.0, "median": {"first_stage": {"ms": 360.0, "requests": 36},
                                                   "fetch_select": {"ms": 970.0}, "fetch_rowid": {"ms": 530.0},
                                                   "scoring": {"ms": 1300.0}}}]}))
    s3 = capacity_plan.s3_source(folder)
    assert (s3["first_stage_ms"], s3["fetch_ms"], s3["fetch_method"]) == (360.0, 530.0, "fetch_rowid")
    assert "d = 256" in s3["note"]
    # the s3rver run, when present, is read before moto's
    (folder / "query_s3_s3rver.json").write_text(json.dumps({"passes": [
        {"latency_ms": 20.0, "median": {"first_stage": {"ms": 140.0}, "fetch_rowid": {"ms": 150.0}}}]}))
    s3 = capacity_plan.s3_source(folder)
    assert (s3["file"], s3["first_stage_ms"], s3["fetch_ms"]) == ("query_s3_s3rver.json", 140.0, 150.0)
    serve = capacity_plan.serve_source(folder)
    assert (serve["file"], serve["requests_per_s"], serve["concurrency"]) == ("serve_nano.json", 0.3, 4)
    assert capacity_plan.gpu_source(folder)["file"] is None
    # bench_bf16.py's layout with several passage lengths: the one closest to 256 tokens is read
    (folder / "bf16_cpu.json").write_text(json.dumps({"shape": {"hidden_size": 640}, "load_before": [1, 1, 1],
        "encode": {"tokens_mean": 537, "float32": {"passages_per_s": 0.25}, "bfloat16": {"passages_per_s": 0.75}},
        "score": {"512/4": {"n": 512, "r": 4, "float32": {"ms_per_100": 300.0}, "bfloat16": {"ms_per_100": 100.0}},
                  "512/8": {"n": 512, "r": 8, "float32": {"ms_per_100": 200.0}, "bfloat16": {"ms_per_100": 100.0}},
                  "4096/4": {"n": 4096, "r": 4, "float32": {"ms_per_100": 9.0}, "bfloat16": {"ms_per_100": 1.0}}}}))
    bf16 = capacity_plan.bf16_source(folder)
    assert bf16["encoder_speedup"] == pytest.approx(3.0) and bf16["score_n"] == 512
    assert bf16["score_speedup"] == {4: pytest.approx(3.0), 8: pytest.approx(2.0)}


def test_readers_name_what_is_missing_or_not_understood(tmp_path):
    folder = _results_with(tmp_path, {"query_s3.json": {"runs": [{"delay": 20, "time": 3.0}]},
                                      "serve_tiny.json": {"model_shape": {"hidden_size": 64}, "candidates": 100,
                                                          "results": [{"requests_per_s": 2.0}]}})
    assert "neither memory_scale.json nor memory_build.json" in capacity_plan.memory_source(folder)["note"]
    s3 = capacity_plan.s3_source(folder)
    assert s3["file"] is None and "understood" in s3["note"] and "delay" in s3["note"]
    assert capacity_plan.serve_source(folder)["file"] is None  # the tiny model's server is no Nano figure
    (folder / "memory_build.json").write_text(json.dumps({"rows": [{"passages": 2000, "peak_rss_mib": 600.0},
                                                                   {"passages": 8000, "peak_rss_mib": 606.0}]}))
    mem = capacity_plan.memory_source(folder)
    assert mem["file"] == "memory_build.json" and "memory_scale.json" in mem["note"]
    assert mem["engines"]["local"]["growth_bytes_per_passage"] == pytest.approx(6 * 2**20 / 6000)
