"""CI cannot silently skip: with CI=true a test that importorskips a missing module fails (tests/conftest.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.mark.parametrize("ci, code, words", [("true", 1, "CI=true: 'no_such_module_kalm' is not importable"),
                                              ("", 0, "1 skipped"), ("false", 0, "1 skipped")])
def test_importorskip_fails_in_ci_and_skips_elsewhere(tmp_path, ci, code, words):
    shutil.copy(HERE / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_needs_a_module.py").write_text(
        "import pytest\n"
        "mod = pytest.importorskip('no_such_module_kalm', reason='not installed: pip install it')\n"
        "def test_it():\n    assert mod\n")
    env = {k: v for k, v in os.environ.items() if k != "CI"} | ({"CI": ci} if ci else {})
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert (proc.returncode not in (0, 5)) == bool(code), out  # 5: nothing ran (the module skipped)
    assert words in out, out


def test_ci_script_clears_its_venv_and_sets_ci():
    script = (HERE.parent / ".ci" / "run").read_text("utf-8")
    assert "python3 -m venv --clear .venv-ci" in script and "export CI=true" in script
