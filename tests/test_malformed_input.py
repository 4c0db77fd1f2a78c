"""Malformed input and damaged files a hostile user tries (issue 14): each one is a one-line error that
names the file (and line) and what to do; nothing stored is lost; ``--skip-bad`` skips what it can."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest


def _cli(argv: list[str], capsys) -> tuple[int, str, str]:
    from kalm_store.cli import main

    code = main(argv)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def _build_argv(inp: Path, db: Path, model_dir: Path, *extra: str) -> list[str]:
    return ["build", str(inp), "--db", str(db), "--table", "t", "--model", str(model_dir), "--no-progress",
            "--no-fts-index", "--no-id-index", *extra]


def _stored_ids(db: Path, table: str = "t") -> list[str]:
    import lancedb

    return sorted(lancedb.connect(str(db)).open_table(table).to_arrow().column("id").to_pylist())


def _one_line_error(err: str, command: str = "build") -> str:
    lines = [line for line in err.splitlines() if line.startswith(f"kalm-store {command}:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"kalm-store {command}: error: "), err
    return lines[0]


# ====================================================================== item 12: score input range
@pytest.mark.parametrize("dtype, value", [(np.float32, 3e38), (np.float64, 1e300), (np.float32, -70000.0),
                                          (np.float64, 65520.0)])
def test_score_refuses_values_beyond_float16_by_index(model, dtype, value):
    good = np.zeros((3, model.dim), np.float16)
    bad = np.zeros((2, model.dim), dtype)
    bad[1, 5] = value
    with pytest.raises(ValueError, match=r"matrices\[1\] holds values beyond float16 range"):
        model.score("q", [good, bad])


def test_score_refuses_beyond_float16_torch_and_accepts_the_edge(model):
    import torch

    bad = torch.zeros((2, model.dim), dtype=torch.float32)
    bad[0, 0] = 1e30
    with pytest.raises(ValueError, match=r"matrices\[0\] holds values beyond float16 range"):
        model.score("q", [bad])
    edge = np.zeros((2, model.dim), np.float32)
    edge[0, 0] = 65504.0  # the largest float16: stored matrices may hold it
    assert np.isfinite(model.score("q", [edge])).all()


# ====================================================================== item 6: valid JSON Python refuses
GOOD = [{"id": f"g{i}", "text": f"good passage {i}"} for i in range(3)]
HOSTILE = {
    "surrogate_text": ('{"id": "x", "text": "a \\ud800 b"}', r"text field 'text' holds a lone UTF-16 surrogate"),
    "surrogate_id": ('{"id": "\\udfff", "text": "t"}', r"id field 'id' holds a lone UTF-16 surrogate"),
    "deep": ('{"id": "x", "text": "t", "extra": ' + "[" * 100_000 + "]" * 100_000 + "}",
             r"JSON nested too deeply"),
    "bigint": ('{"id": "x", "text": "t", "n": ' + "7" * 5000 + "}", r"JSON value Python cannot read"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_valid_json_python_refuses_is_one_line_and_keeps_earlier_records(case, tmp_path, tiny_model_dir, capsys):
    line, match = HOSTILE[case]
    inp = tmp_path / "c.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in GOOD) + line + "\n" + json.dumps({"id": "after", "text": "z"})
                   + "\n", encoding="utf-8")
    code, _, err = _cli(_build_argv(inp, tmp_path / "db", tiny_model_dir), capsys)
    assert code == 1
    msg = _one_line_error(err)
    assert re.search(re.escape(f"{inp}:4: ") + match, msg), msg
    assert _stored_ids(tmp_path / "db") == ["g0", "g1", "g2"]  # the chunk's records before it are stored

    code, out, err = _cli(_build_argv(inp, tmp_path / "db2", tiny_model_dir, "--skip-bad", "--skip-report",
                                      str(tmp_path / "skipped.jsonl")), capsys)
    assert code == 0, err
    assert "1 bad records skipped" in out
    assert _stored_ids(tmp_path / "db2") == ["after", "g0", "g1", "g2"]
    report = [json.loads(x) for x in (tmp_path / "skipped.jsonl").read_text().splitlines()]
    assert [r["where"] for r in report] == [f"{inp}:4"]
