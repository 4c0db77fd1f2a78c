"""The scoring-only decoder (kalm_store/decoder.py) against the transformers decoder it replaces."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kalm_store import KaLMModel


@pytest.fixture(scope="module")
def both(tiny_model_dir):
    fast = KaLMModel.from_pretrained(tiny_model_dir)
    slow = KaLMModel.from_pretrained(tiny_model_dir, fast_decoder=False)
    assert fast._decoder is not None and slow._decoder is None
    return fast, slow


DOCS = ["short one", "JSON is a data format used by many web services. " * 4, "Python " * 70, "x"]


@pytest.mark.parametrize("ratio", [1, 4, 32])
def test_fast_decoder_matches_transformers(both, ratio):
    fast, slow = both
    mats = fast.encode(DOCS, ratio=ratio, storage_dtype="float32")
    # a prompt longer than the tiny model's sliding window (16) so the sliding self-mask matters
    query = "how do I parse a json file and read the values into a list of python objects?"
    a = fast.score(query, mats, return_margin=True)
    b = slow.score(query, mats, return_margin=True)
    assert len(fast.prompt_ids(query)) > 16
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=0)
    assert np.ptp(a) > 0.05  # the scores really differ between passages


def test_fast_decoder_bfloat16_close_to_transformers_bfloat16(tiny_model_dir):
    fast = KaLMModel.from_pretrained(tiny_model_dir, dtype="bfloat16", device="cpu")
    slow = KaLMModel.from_pretrained(tiny_model_dir, dtype="bfloat16", device="cpu", fast_decoder=False)
    ref = KaLMModel.from_pretrained(tiny_model_dir)
    mats = ref.encode(DOCS, ratio=2)
    a = fast.score("what is json?", mats, return_margin=True)
    b = slow.score("what is json?", mats, return_margin=True)
    c = ref.score("what is json?", mats, return_margin=True)
    # bf16 has ~3 significant digits: both bf16 paths stay near the fp32 result, and near each other
    np.testing.assert_allclose(a, c, atol=0.15)
    np.testing.assert_allclose(a, b, atol=0.15)
    assert fast.dtype == torch.bfloat16


def test_batches_respect_candidate_and_row_budgets():
    from kalm_store.model import _batches

    rows = [4096, 4096, 4096, 512, 512, 128, 128, 128]
    got = _batches(list(range(8)), rows, batch_size=3, max_rows=8192)
    assert got == [[0, 1], [2, 3], [4, 5, 6], [7]]  # 2 x 4096 padded rows fit 8192; 3 at most per batch
    assert _batches([0], [10_000], batch_size=4, max_rows=8192) == [[0]]  # one candidate at least
    for batch in got:
        assert len(batch) * rows[batch[0]] <= 8192


def test_row_budget_and_batch_size_do_not_change_scores(both, monkeypatch):
    from kalm_store import model as model_module

    fast, _ = both
    mats = fast.encode(DOCS, ratio=1, storage_dtype="float32")
    a = fast.score("what is json?", mats, return_margin=True)
    monkeypatch.setattr(model_module, "_ROWS_PER_BATCH", 1)  # one candidate per pass
    b = fast.score("what is json?", mats, return_margin=True, batch_size=3)
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_prepared_prompt_and_precomputed_cross_match_plain_call(both):
    from kalm_store import decoder

    fast, _ = both
    mats = fast.encode(DOCS, ratio=2, storage_dtype="float32")
    prompt = torch.tensor(fast.prompt_ids("how do I parse a json file and read the values into python?"))
    states, mask = fast._pad(mats)
    with torch.inference_mode():
        plain = decoder.margins(fast._decoder, prompt, states, mask.bool())
        prepared = decoder.prepare(fast._decoder, prompt, torch.float32)
        cross = decoder.project_states(fast._decoder, states)  # (B, m, layers, 2, KV, hd)
        again = decoder.margins(fast._decoder, prepared, None, mask.bool(), cross=cross)
    assert cross.shape == (len(DOCS), states.shape[1], len(fast._decoder.layers), 2, 1, fast._decoder.head_dim)
    torch.testing.assert_close(plain, again, atol=1e-6, rtol=0)


def test_bench_perf_quick_writes_table_and_plot(tmp_path):
    """Smoke run of benchmarks/bench_perf.py --quick (tiny shape): table, json and png are written."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    prefix = tmp_path / "perf"
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "bench_perf.py"), "--quick", "--threads", "1",
                           "--output", str(prefix)], cwd=root, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(Path(f"{prefix}.json").read_text())
    assert [(row["n"], row["r"]) for row in res["results"]] == [(64, 1), (64, 4), (256, 1), (256, 4)]
    assert all(row["fbnl_ms"] > 0 and row["joint_ms"] > 0 and row["flop_speedup"] > 1 for row in res["results"])
    assert res["machine_matmul_gflops"] > 0 and Path(f"{prefix}.png").stat().st_size > 0
    assert "--quick" in Path(f"{prefix}.md").read_text()
