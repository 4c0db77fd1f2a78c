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


QUERIES = ["what is json?",  # short prompt
           "how do I parse a json file and read the values into a list of python objects, quickly and safely?",
           "python"]  # prompts of different lengths, one over the tiny model's sliding window (16)


@pytest.mark.parametrize("ratio", [1, 4])
def test_score_many_packs_queries_and_matches_each_alone(both, ratio):
    """Several queries in shared passes (prompts right-padded, each candidate reading its own prompt's last
    position) score every candidate as that query alone does, to 1e-5 in float32."""
    fast, _ = both
    mats = fast.encode(DOCS + ["a passage about parsing json in python", "zebra"], ratio=ratio,
                       storage_dtype="float32")
    groups = [mats[:3], mats[2:], mats[::2]]  # overlapping candidate sets of different sizes
    instructions = [None, "Judge whether the document answers the question.", None]
    passes = []
    many = fast.score_many(QUERIES, groups, instructions, batch_size=64, return_margin=True,
                           on_pass=lambda *a: passes.append(a))
    assert passes and passes[0][1] == 3  # one pass held the candidates of all three queries
    assert len({len(fast.prompt_ids(q, i)) for q, i in zip(QUERIES, instructions)}) == 3  # really padded
    for q, group, ins, got in zip(QUERIES, groups, instructions, many):
        alone = fast.score(q, group, ins, return_margin=True)
        assert got.shape == (len(group),) and got.dtype == np.float32
        np.testing.assert_allclose(got, alone, atol=1e-5, rtol=0)
    # the queries do differ: a shared candidate gets another score under another query
    assert abs(many[0][2] - many[1][0]) > 1e-3


def test_score_many_matches_transformers_and_small_passes(both):
    fast, slow = both
    mats = fast.encode(DOCS, ratio=2, storage_dtype="float32")
    a = fast.score_many(QUERIES, [mats, mats[1:], mats[:2]], return_margin=True, batch_size=2, max_rows=64)
    b = slow.score_many(QUERIES, [mats, mats[1:], mats[:2]], return_margin=True)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, atol=2e-5, rtol=0)
    probs = fast.score_many(QUERIES[:1], [mats])[0]
    np.testing.assert_allclose(probs, fast.score(QUERIES[0], mats), atol=0, rtol=0)


def test_score_many_one_layer_decoder(tmp_path):
    """With one decoder layer, layer 0 is also the last: its query rows come from each prompt's own end."""
    from kalm_store.testing import make_test_model

    from kalm_store.testing import TinyShape

    folder = make_test_model(tmp_path / "one", TinyShape(num_layers=1))
    fast = KaLMModel.from_pretrained(folder)
    slow = KaLMModel.from_pretrained(folder, fast_decoder=False)
    mats = fast.encode(DOCS, ratio=1, storage_dtype="float32")
    a = fast.score_many(QUERIES, [mats] * 3, return_margin=True)
    for q, got in zip(QUERIES, a):
        np.testing.assert_allclose(got, slow.score(q, mats, return_margin=True), atol=2e-5, rtol=0)


def test_score_many_refuses_mismatched_arguments(both):
    fast, _ = both
    mats = fast.encode(DOCS[:2], ratio=4)
    with pytest.raises(ValueError, match="one list of matrices per query"):
        fast.score_many(["a", "b"], [mats])
    with pytest.raises(ValueError, match="instructions has 1 entries for 2 queries"):
        fast.score_many(["a", "b"], [mats, mats], ["x"])
    with pytest.raises(ValueError, match="max_rows must be a positive int"):
        fast.score_many(["a"], [mats], max_rows=0)
    from kalm_store import decoder

    prompt = torch.tensor(fast.prompt_ids("a"))
    states, mask = fast._pad(mats)
    with pytest.raises(ValueError, match="owner= goes with several prompts"):
        decoder.margins(fast._decoder, prompt, states, mask.bool(), owner=torch.zeros(2, dtype=torch.long))
