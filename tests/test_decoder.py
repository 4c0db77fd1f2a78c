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
