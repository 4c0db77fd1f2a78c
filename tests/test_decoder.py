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


# bf16 bounds: measured on the tiny model (x86_64, torch 2.13.0 CPU; DOCS at r = 2 and r = 4, the two
# queries below), each bound about twice the largest error measured, rounded up. Measured max |margin
# error|: fast bf16 vs float32 0.017 (r = 2) and 0.049 (r = 4); fast bf16 vs transformers bf16 0.024;
# bf16 encode -> float16 store -> bf16 score vs the same in float32 0.039; stored matrices, bf16 vs float32
# encoder, 1.4% of the largest |value|. A wrong formula moves margins by O(1) (the margins of DOCS spread
# over > 0.8 per query); a norm computed in bf16 moves them by only ~0.01 on this small model, which no end-to-end
# bound separates from bf16 rounding: test_rms_norm_normalises_in_float32 guards that one exactly.
BF16_QUERIES = ("what is json?", "how do I parse a json file and read the values into a list of python objects?")
BF16_MARGIN_VS_FP32 = 0.1  # measured 0.049
BF16_MARGIN_VS_TRANSFORMERS = 0.05  # measured 0.024
BF16_STORED_SCORE_VS_FP32 = 0.08  # measured 0.039
BF16_STORED_REL = 0.03  # measured 0.014 of max |value|


@pytest.fixture(scope="module")
def bf16_models(tiny_model_dir):
    fast = KaLMModel.from_pretrained(tiny_model_dir, dtype="bfloat16", device="cpu")
    slow = KaLMModel.from_pretrained(tiny_model_dir, dtype="bfloat16", device="cpu", fast_decoder=False)
    ref = KaLMModel.from_pretrained(tiny_model_dir)
    assert fast.dtype == slow.dtype == torch.bfloat16 and ref.dtype == torch.float32
    return fast, slow, ref


@pytest.mark.parametrize("ratio", [2, 4])
def test_fast_decoder_bfloat16_close_to_transformers_bfloat16(bf16_models, ratio):
    fast, slow, ref = bf16_models
    mats = ref.encode(DOCS, ratio=ratio)
    for query in BF16_QUERIES:
        a = fast.score(query, mats, return_margin=True)
        b = slow.score(query, mats, return_margin=True)
        c = ref.score(query, mats, return_margin=True)
        assert np.ptp(c) > 0.5  # the margins differ far more than the bounds below
        np.testing.assert_allclose(a, c, atol=BF16_MARGIN_VS_FP32, rtol=0)
        np.testing.assert_allclose(a, b, atol=BF16_MARGIN_VS_TRANSFORMERS, rtol=0)


def test_rms_norm_normalises_in_float32():
    """bf16 input is normalised in float32 and rounded to bf16 once, as T5Gemma2RMSNorm does."""
    from kalm_store import decoder

    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(64, 640, generator=gen) * torch.logspace(-2, 2, 640)).bfloat16()  # wide dynamic range
    scale = 1.0 + torch.randn(640, generator=gen) * 0.1
    xf = x.float()
    want = (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + 1e-6) * scale).bfloat16()
    got = decoder.rms_norm(x, scale, 1e-6)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, want)
    in_bf16 = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-6) * scale.bfloat16()  # the defect
    assert not torch.equal(in_bf16, want)  # so the equality above can tell the two apart


def test_bfloat16_encode_store_score_close_to_float32(bf16_models, tmp_path):
    """What a CUDA build stores: a bf16 encoder -> float16 matrices in the table -> bf16 scores, against the
    same pipeline in float32."""
    from kalm_store.store import PassageStore

    fast, _, ref = bf16_models
    records = [{"id": f"d{i}", "text": t} for i, t in enumerate(DOCS)]
    ids = [r["id"] for r in records]
    stores = {}
    for name, m in (("bf16", fast), ("fp32", ref)):
        stores[name] = PassageStore.create(str(tmp_path / name), "docs", m, ratios=[1, 4])
        assert stores[name].add(records) == len(DOCS)
    for r in (1, 4):
        got = stores["bf16"].matrices(ids, r)
        want = stores["fp32"].matrices(ids, r)
        for g, w in zip(got, want):
            assert g.dtype == w.dtype == np.float16 and g.shape == w.shape
            err = np.abs(g.astype(np.float32) - w.astype(np.float32)).max()
            assert err <= BF16_STORED_REL * np.abs(w.astype(np.float32)).max(), (r, err)
        for query in BF16_QUERIES:
            a = fast.score(query, got, return_margin=True)
            c = ref.score(query, want, return_margin=True)
            np.testing.assert_allclose(a, c, atol=BF16_STORED_SCORE_VS_FP32, rtol=0)


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
