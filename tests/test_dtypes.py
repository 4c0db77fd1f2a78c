"""bfloat16 compute on CPU: fidelity to float32, the --dtype choice end to end, auto's cached probe."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kalm_store.cli import main

# Max |P_bf16 - P_fp32| on the test model, measured (issue 19) over 5 seeds (TinyShape.seed 0-4) x r in
# {1, 4} x 4 queries x the 6 conftest passages (40 query scorings of 6 candidates each, P in 0.2-0.95):
#   bf16 decoder on float32-built matrices:  max 0.0110, median 0.0060
#   bf16 encoder and bf16 decoder:           max 0.0165, median 0.0061
#   bf16-built matrices, float32 decoder:    max 0.0103, median 0.0040
# The bound is 0.03: about twice the worst case measured, well under the P gaps rankings rest on.
# The benchmark (benchmarks/results/bf16_cpu.md, `python benchmarks/bench_bf16.py`: random-weight Nano
# shape, 18+18 layers, 3 prompts x 16 passages of ~555 tokens, r = 1..32) measures worst max |dP| 0.0446
# for the bf16 decoder on float32-built matrices, 0.0443 built and scored in bf16 and 0.0228 for
# bf16-built matrices scored in float32 (Kendall tau >= 0.93, top-10 overlap >= 0.90). bf16 error grows
# with depth: the 3-layer test model's worst (0.0165) is about a third of the 18-layer figure, so the
# test model is held to 0.03 (a test at the Nano bound, 0.045, would pass a 3-layer error 2.7x too large).
BF16_TOL = 0.03
QUERIES = ["how do I parse json?", "zebra", "what is a vector database", "read a file in python"]
TEXTS = ["JSON is a data format.", "Parse JSON text into Python objects with json loads.",
         "Zebras graze quietly near the riverbank at dawn.", "Open the file and read its lines."]


@pytest.fixture(scope="module")
def bf16_model(tiny_model_dir):
    from kalm_store import KaLMModel

    return KaLMModel.from_pretrained(tiny_model_dir, dtype="bfloat16")


@pytest.mark.parametrize("ratio", [1, 4])
def test_bf16_scores_within_tolerance_of_float32(model, bf16_model, passages, ratio):
    import torch

    assert model.dtype == torch.float32 and bf16_model.dtype == torch.bfloat16
    mats32 = model.encode(passages, ratio=ratio)
    mats16 = bf16_model.encode(passages, ratio=ratio)
    for mats in (mats32, mats16):  # stored float16 either way: a table built in one dtype scores in the other
        assert all(m.dtype == np.float16 for m in mats)
    worst = 0.0
    for q in QUERIES:
        ref = model.score(q, mats32)
        for got in (bf16_model.score(q, mats32), bf16_model.score(q, mats16), model.score(q, mats16)):
            assert np.isfinite(got).all()
            worst = max(worst, float(np.abs(got - ref).max()))
    assert worst <= BF16_TOL
    assert worst > 1e-4  # really computed in bf16: float32 twice would agree to ~1e-7


def test_resolve_dtype_explicit_and_default():
    from kalm_store.dtypes import resolve_dtype

    assert resolve_dtype(None, "cpu") is None  # from_pretrained's default: float32 on CPU
    assert resolve_dtype("float32", "cpu") == "float32"
    assert resolve_dtype("bfloat16", "cpu") == "bfloat16"
    assert resolve_dtype("auto", "cuda:0") == "bfloat16"  # CUDA: no probe
    with pytest.raises(ValueError, match="--dtype must be one of"):
        resolve_dtype("float16", "cpu")


def test_auto_follows_the_measured_rates_and_probes_once(monkeypatch):
    from kalm_store import dtypes

    calls: list[str] = []

    def fake(rates: dict[str, float]):
        def seconds(name: str) -> float:
            calls.append(name)
            return rates[name]
        return seconds

    monkeypatch.setattr(dtypes, "_matmul_seconds", fake({"float32": 0.10, "bfloat16": 0.04}))
    dtypes.cpu_bf16_speedup.cache_clear()
    try:
        assert dtypes.resolve_dtype("auto", "cpu") == "bfloat16"
        assert dtypes.resolve_dtype("auto", "cpu") == "bfloat16"
        assert calls == ["float32", "bfloat16"]  # cached: one probe per process
        assert dtypes.cpu_bf16_speedup() == pytest.approx(2.5)

        for rates, want in (({"float32": 0.10, "bfloat16": 0.30}, "float32"),   # emulated bf16: slower
                            ({"float32": 0.10, "bfloat16": 0.095}, "float32"),  # a tie is not worth it
                            ({"float32": 0.10, "bfloat16": 0.08}, "bfloat16")):
            monkeypatch.setattr(dtypes, "_matmul_seconds", fake(rates))
            dtypes.cpu_bf16_speedup.cache_clear()
            assert dtypes.resolve_dtype("auto", "cpu") == want, rates
    finally:
        dtypes.cpu_bf16_speedup.cache_clear()  # the next caller measures for real


def _corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"id": f"d{i}", "text": TEXTS[i % 4] + f" ({i})"}) + "\n"
                            for i in range(8)))
    return path


def test_build_records_dtype_and_search_scores_in_the_chosen_dtype(tmp_path, tiny_model_dir, model, bf16_model,
                                                                   capsys):
    from kalm_store import PassageStore

    db = str(tmp_path / "db")
    corpus = _corpus(tmp_path)
    args = ["build", str(corpus), "--db", db, "--table", "docs", "--model", str(tiny_model_dir), "--no-progress"]
    assert main(args + ["--dtype", "bfloat16"]) == 0
    assert PassageStore.open(db, "docs").metadata["compute_dtypes"] == ["bfloat16"]
    capsys.readouterr()
    assert main(["info", "--db", db, "--table", "docs"]) == 0
    assert "built in     bfloat16 compute dtype" in capsys.readouterr().out

    # the bf16-built table is scored in float32 and in bfloat16; each run's scores are that dtype's
    store = PassageStore.open(db, "docs")
    got = {}
    for dt, m in (("float32", model), ("bfloat16", bf16_model)):
        capsys.readouterr()
        assert main(["search", "parse json", "--db", db, "--table", "docs", "--model", str(tiny_model_dir),
                     "--mode", "fts", "-k", "8", "--json", "--dtype", dt]) == 0
        hits = json.loads(capsys.readouterr().out)["results"]
        assert hits
        ids = [h["id"] for h in hits]
        want = m.score("parse json", store.matrices(ids, 4))
        np.testing.assert_allclose([h["score"] for h in hits], want, rtol=1e-5, atol=1e-6)
        got[dt] = {h["id"]: h["score"] for h in hits}
    common = sorted(set(got["float32"]) & set(got["bfloat16"]))
    diffs = [abs(got["float32"][i] - got["bfloat16"][i]) for i in common]
    assert 1e-4 < max(diffs) <= BF16_TOL  # --dtype changed the arithmetic, within the stated bound


def test_resumed_build_in_another_dtype_records_both(tmp_path, tiny_model_dir):
    from kalm_store import PassageStore
    from kalm_store.dtypes import record_compute_dtype

    db = str(tmp_path / "db")
    corpus = _corpus(tmp_path)
    args = ["build", str(corpus), "--db", db, "--table", "docs", "--model", str(tiny_model_dir), "--no-progress"]
    assert main(args) == 0  # default on CPU: float32
    st = PassageStore.open(db, "docs")
    assert st.metadata["compute_dtypes"] == ["float32"]
    version = st.table.version
    assert main(args) == 0  # same dtype again: no metadata commit
    st.refresh()
    assert st.table.version == version and st.metadata["compute_dtypes"] == ["float32"]
    assert main(args + ["--dtype", "bfloat16"]) == 0
    st.refresh()
    assert st.metadata["compute_dtypes"] == ["bfloat16", "float32"]

    # a table of an older kalm-store has no key: its rows stay "unknown" beside the new dtype
    from kalm_store import schema

    raw = {k.decode(): v.decode() for k, v in st.table.schema.metadata.items()}
    raw.pop(schema.spec()["metadata_prefix"] + "compute_dtypes")
    st.table.to_lance().update_schema_metadata(raw, replace=True)
    st.refresh()
    assert "compute_dtypes" not in st.metadata
    assert record_compute_dtype(st.table, "float32") == ["float32", "unknown"]


def test_plan_compare_dtypes_reports_bf16_fidelity_on_the_sample(tmp_path, tiny_model_dir, model, bf16_model,
                                                                   capsys):
    corpus = _corpus(tmp_path)
    queries = tmp_path / "q.jsonl"
    queries.write_text("".join(json.dumps({"id": f"q{i}", "text": q}) + "\n" for i, q in enumerate(QUERIES)))
    argv = ["plan", str(corpus), "--model", str(tiny_model_dir), "--sample", "8", "--ratios", "1,4",
            "--queries", str(queries), "--compare-dtypes"]
    assert main(argv + ["--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    rows = {r["path"]: r for r in out["dtype_fidelity"]}
    assert set(rows) == {"score", "build+score"}
    r = out["recommended"]
    assert all(row["ratio"] == r and row["queries"] == 4 and row["candidates"] == 8 for row in rows.values())
    # the sample is the whole corpus (8 of 8): recompute both paths directly
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    m32, m16 = model.encode(texts, ratio=r), bf16_model.encode(texts, ratio=r)
    ref = np.stack([model.score(q, m32) for q in QUERIES])
    for path, got in (("score", np.stack([bf16_model.score(q, m32) for q in QUERIES])),
                      ("build+score", np.stack([bf16_model.score(q, m16) for q in QUERIES]))):
        assert rows[path]["max_abs_delta"] == pytest.approx(float(np.abs(got - ref).max()), abs=1e-6)
        assert rows[path]["mean_abs_delta"] == pytest.approx(float(np.abs(got - ref).mean()), abs=1e-6)
        assert 1e-4 < rows[path]["max_abs_delta"] <= BF16_TOL
        assert -1.0 <= rows[path]["kendall_tau"] <= 1.0 and 0.0 <= rows[path]["top10_overlap"] <= 1.0
    assert main(argv) == 0
    assert "bfloat16 vs float32 at r=" in capsys.readouterr().out
    assert main(argv[:-3] + ["--compare-dtypes"]) == 1  # without --queries: refused before loading
    assert "--compare-dtypes needs --queries" in capsys.readouterr().err
