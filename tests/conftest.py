"""Shared fixtures: one tiny offline T5Gemma2 checkpoint per test session, and a few passages.

In CI (``CI=true``, as GitHub Actions and ``.ci/run`` set it) ``pytest.importorskip`` fails instead of
skipping: every module the tests import that way is installed by the README's test command
(``.[test,ray,s3,plot]``), so a skip there would mean a broken install passing CI. A test that needs
something the test command does not install (a GPU, say) skips with ``pytest.skip`` and its reason.
"""

from __future__ import annotations

import os

import pytest


def in_ci(environ: dict[str, str] | None = None) -> bool:
    """True where ``CI`` is set to true (any case) or 1."""
    return (os.environ if environ is None else environ).get("CI", "").strip().lower() in ("true", "1")


_importorskip = pytest.importorskip


def _import_or_fail(modname: str, minversion: str | None = None, reason: str | None = None, **kwargs):
    """``pytest.importorskip`` that fails in CI: there the module must be there."""
    __tracebackhide__ = True
    try:
        return _importorskip(modname, minversion=minversion, reason=reason, **kwargs)
    except pytest.skip.Exception as e:
        pytest.fail(f"CI=true: {modname!r} is not importable ({e.msg}); the README test command installs it, "
                    "so skipping would hide a broken install", pytrace=False)


if in_ci():
    pytest.importorskip = _import_or_fail


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Folder with the tiny random-weight KaLM-compatible checkpoint (built once per session)."""
    from kalm_store.testing import make_test_model

    return make_test_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def model(tiny_model_dir):
    """The tiny checkpoint loaded through the public ``KaLMModel.from_pretrained`` (CPU, float32)."""
    from kalm_store import KaLMModel

    return KaLMModel.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def passages() -> list[str]:
    """Six passages of very different lengths: one word, a sentence, one longer than the tiny model's
    sliding window (16 tokens), and one over 100 tokens."""
    return [
        "yes",
        "JSON is a data format.",
        "Python is a programming language. Parse the file and return a list of values.",
        "Vector databases store embeddings next to text; a reranker scores each candidate against the query.",
        "Zebras graze quietly near the riverbank at dawn.",
        " ".join(
            [
                "The quick brown fox jumps over the lazy dog.",
                "Open the file and read its lines, then raise an error if it is empty.",
                "Return the number of items in a container; a passage of text is encoded once and stored.",
                "Meanwhile, unrelated words: kaleidoscope, marmalade, quixotic, zephyr, bureaucracy!",
            ]
        ),
    ]


@pytest.fixture
def run_bench():
    """Run ``benchmarks/<script> *args`` with one torch thread; fail with its stderr when it fails."""
    import os
    import subprocess
    import sys

    from pathlib import Path

    root = Path(__file__).resolve().parents[1]

    def run(script: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run([sys.executable, str(root / "benchmarks" / script), *args],
                              cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc

    return run
