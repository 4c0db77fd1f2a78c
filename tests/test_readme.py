"""The README's Python example runs as written (with the offline test model in place of the hub id)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

import kalm_store

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs(tiny_model_dir, tmp_path, monkeypatch):
    block = re.findall(r"```python\n(.*?)```", README.read_text("utf-8"), re.S)[0]
    assert '"KaLM-Embedding/KaLM-Reranker-V1-Nano"' in block
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(block.replace('"KaLM-Embedding/KaLM-Reranker-V1-Nano"', repr(str(tiny_model_dir))), scope)
    hits = scope["hits"]
    assert [h["id"] for h in hits] and {h["id"] for h in hits} == {"a", "b"}
    scores = [h["_relevance_score"] for h in hits]
    assert scores == sorted(scores, reverse=True)
    assert not any(k.startswith("kalm_r") for k in hits[0])  # stored bytes dropped from the output
    # the scores are the model's own: same as scoring the stored matrices directly
    model, store = scope["model"], scope["store"]
    direct = model.score("how do I parse json?", store.matrices([h["id"] for h in hits], ratio=4))
    assert abs(direct[0] - scores[0]) < 1e-6 and abs(direct[1] - scores[1]) < 1e-6

    # the second block continues the first: the model on its own, then kalm_store.search
    second = re.findall(r"```python\n(.*?)```", README.read_text("utf-8"), re.S)[1]
    exec(second, scope)
    assert scope["mats"][0].dtype == np.float16 and scope["scores"].dtype == np.float32
    # checked against another path: the transformers decoder over matrices encoded here, not the same call
    from kalm_store import KaLMModel

    slow = KaLMModel.from_pretrained(tiny_model_dir, fast_decoder=False)
    fresh = slow.encode(["first passage", "second passage"], ratio=4)
    assert [m.shape for m in scope["mats"]] == [m.shape for m in fresh]
    want = slow.score("what is the first?", fresh)
    np.testing.assert_allclose(scope["scores"], want, atol=1e-5, rtol=0)
    assert abs(want[0] - want[1]) > 1e-4  # the two passages score apart, so the ranking below means something
    found = model.rank("what is the first?", ["first passage", "second passage"], top_k=1)
    best = int(np.argmax(want))
    assert [f["corpus_id"] for f in found] == [best] and abs(found[0]["score"] - want[best]) < 1e-5
    searched = kalm_store.search(str(tmp_path / "db"), "docs", "how do I parse json?", model=model, k=10,
                                 mode="vector", query_vector=[1, 0, 0])
    assert [(h["id"], h["score"]) for h in searched] == [(h["id"], h["_relevance_score"]) for h in hits]


def test_readme_test_command_is_what_ci_runs():
    text = README.read_text("utf-8")
    ci = (README.parent / ".ci" / "run").read_text("utf-8")
    assert "<!-- test-command -->" in text and "<!-- test-command -->" in ci
    cmd = text.split("<!-- test-command -->", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0].strip()
    assert cmd.startswith("pip install torch==2.13.0") and cmd.endswith("pytest")


def test_readme_example_prints_no_bars_and_no_lance_deprecation(tiny_model_dir, tmp_path):
    """The README's own example, in a fresh process (LANCEDB_LOG is read once, at lancedb's import):
    no transformers "Loading weights" bar, no Lance scanner deprecation WARN on stderr."""
    import os
    import subprocess
    import sys

    block = re.findall(r"```python\n(.*?)```", README.read_text("utf-8"), re.S)[0]
    code = block.replace('"KaLM-Embedding/KaLM-Reranker-V1-Nano"', repr(str(tiny_model_dir))) + "\nprint(len(hits))\n"
    env = {k: v for k, v in os.environ.items() if k != "LANCEDB_LOG"}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "2"
    assert "Loading weights" not in done.stderr and "WARN" not in done.stderr, done.stderr


def test_quiet_loading_keeps_real_warnings_and_restores_the_bars(caplog):
    from transformers.utils import logging as hf_logging

    from kalm_store._quiet import no_weight_bars

    was = hf_logging.is_progress_bar_enabled()  # an earlier CLI test in this process may have turned them off
    hf_logging.enable_progress_bar()
    try:
        with no_weight_bars():
            assert not hf_logging.is_progress_bar_enabled()
            hf_logging.get_logger("transformers.modeling_utils").warning("a real warning")
        assert hf_logging.is_progress_bar_enabled()
    finally:
        if not was:
            hf_logging.disable_progress_bar()
    assert "a real warning" in caplog.text  # transformers' logger is untouched: only the bars were off


def test_make_test_model_prints_no_bars(tmp_path, capfd):
    from kalm_store.cli import main

    assert main(["make-test-model", str(tmp_path / "t")]) == 0
    out, err = capfd.readouterr()
    assert out.startswith("wrote a tiny random") and "Writing model shards" not in err and "Loading" not in err
