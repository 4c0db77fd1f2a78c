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
    assert "1 bad record skipped" in out
    assert _stored_ids(tmp_path / "db2") == ["after", "g0", "g1", "g2"]
    report = [json.loads(x) for x in (tmp_path / "skipped.jsonl").read_text().splitlines()]
    assert [r["where"] for r in report] == [f"{inp}:4"]


# ====================================================================== item 8: FTS errors by the table's indices
@pytest.fixture(scope="module")
def small_db(tmp_path_factory, tiny_model_dir):
    """A built table ``t`` (with FTS index) and ``nofts`` (without), 20 rows each, three commits of ``t``."""
    from kalm_store.cli import main

    root = tmp_path_factory.mktemp("small")
    inp = root / "c.jsonl"
    inp.write_text("".join(json.dumps({"id": f"p{i}", "text": f"passage {i} about parsing files"}) + "\n"
                           for i in range(20)))
    for table, extra in (("t", []), ("nofts", ["--no-fts-index"])):
        assert main(["build", str(inp), "--db", str(root / "db"), "--table", table, "--model", str(tiny_model_dir),
                     "--no-progress", "--chunk-size", "10", *extra]) == 0
    return root


def _damaged_copy(small_db: Path, tmp_path: Path) -> Path:
    import shutil

    db = tmp_path / "db"
    shutil.copytree(small_db / "db", db)
    return db


def test_fts_error_only_when_the_table_has_no_fts_index(small_db, tiny_model_dir, capsys):
    base = ["search", "parsing", "--db", str(small_db / "db"), "--model", str(tiny_model_dir), "--mode", "fts"]
    code, _, err = _cli(base + ["--table", "nofts"], capsys)
    assert code == 1 and "needs a full-text index on 'text' of table 'nofts'" in _one_line_error(err, "search")
    # a division by zero in the filter is not a missing index (Lance's message holds "index.crates.io")
    code, _, err = _cli(base + ["--table", "t", "--where", "1/0 = 1"], capsys)
    msg = _one_line_error(err, "search")
    assert code == 1 and "full-text index" not in msg and "Divide by zero" in msg, msg
    assert ".rs:" not in msg and "table 't'" in msg  # no Rust source paths; the table is named
    code, out, err = _cli(base + ["--table", "t", "--json"], capsys)
    assert code == 0 and json.loads(out)["results"], err


# ====================================================================== item 9: damaged tables, disk full
def _newest_manifest(db: Path, table: str = "t") -> Path:
    return sorted((db / f"{table}.lance" / "_versions").glob("*.manifest"))[0]  # V2 names count down


@pytest.mark.parametrize("damage", ["truncated", "empty"])
@pytest.mark.parametrize("command", ["info", "verify", "search", "build"])
def test_damaged_newest_manifest_is_one_line_with_the_repair(damage, command, small_db, tiny_model_dir, tmp_path,
                                                             capsys):
    db = _damaged_copy(small_db, tmp_path)
    manifest = _newest_manifest(db)
    data = manifest.read_bytes()
    manifest.write_bytes(data[:100] if damage == "truncated" else b"")
    argv = {"info": ["info"], "verify": ["verify"],
            "search": ["search", "parsing", "--model", str(tiny_model_dir), "--mode", "fts"],
            "build": ["build", str(small_db / "c.jsonl"), "--model", str(tiny_model_dir), "--no-progress"]}[command]
    code, _, err = _cli(argv + ["--db", str(db), "--table", "t"], capsys)
    msg = _one_line_error(err, command)
    assert code == 1
    assert f"newest version file {manifest}" in msg and "move it out of _versions/ to go back to version" in msg, msg
    # the advice works: moving the damaged file away opens the previous version
    manifest.rename(tmp_path / "damaged.manifest")
    code, out, err = _cli(["info", "--db", str(db), "--table", "t", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["rows"] >= 10


def test_damaged_data_file_during_search_names_the_file(small_db, tiny_model_dir, tmp_path, capsys):
    db = _damaged_copy(small_db, tmp_path)
    victim = sorted((db / "t.lance" / "data").glob("*.lance"))[0]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    code, _, err = _cli(["search", "parsing", "--db", str(db), "--table", "t", "--model", str(tiny_model_dir),
                         "--mode", "fts", "-k", "20", "--candidates", "20"], capsys)
    msg = _one_line_error(err, "search")
    assert code == 1 and f"data file {victim}" in msg and "restore it from a backup" in msg, msg


def test_disk_full_during_build_is_one_line_and_keeps_the_commits(tmp_path, tiny_model_dir, capsys, monkeypatch):
    from kalm_store.store import PassageStore

    inp = tmp_path / "c.jsonl"
    inp.write_text("".join(json.dumps({"id": f"p{i}", "text": f"text {i}"}) + "\n" for i in range(30)))
    real_write = PassageStore.write
    calls = []

    def write(self, rows, *a, **kw):  # the third commit hits a full disk, as Lance reports it (tmpfs repro)
        calls.append(rows.num_rows)
        if len(calls) == 3:
            raise RuntimeError("lance error: LanceError(IO): No space left on device (os error 28), /root/.cargo/"
                               "registry/src/index.crates.io-1949cf8c6b5b557f/lance-file-13.0.0/src/writer/"
                               "structural.rs:191:9")
        return real_write(self, rows, *a, **kw)

    monkeypatch.setattr(PassageStore, "write", write)
    code, _, err = _cli(_build_argv(inp, tmp_path / "db", tiny_model_dir, "--chunk-size", "10"), capsys)
    msg = _one_line_error(err)
    assert code == 1 and "no space left on the device while writing table 't'" in msg and "resumes" in msg, msg
    assert len(_stored_ids(tmp_path / "db")) == 20
    monkeypatch.setattr(PassageStore, "write", real_write)
    code, _, err = _cli(_build_argv(inp, tmp_path / "db", tiny_model_dir, "--chunk-size", "10"), capsys)
    assert code == 0 and len(_stored_ids(tmp_path / "db")) == 30, err


def test_debug_flag_shows_the_traceback(tmp_path, capsys):
    from kalm_store.cli import main

    with pytest.raises(Exception):
        main(["--debug", "info", "--db", str(tmp_path / "nodb"), "--table", "t"])
    code, _, err = _cli(["info", "--db", str(tmp_path / "nodb"), "--table", "t"], capsys)
    assert code == 1 and "Traceback" not in err and err.count("\n") == 1


def test_unexpected_error_says_it_is_a_bug_and_how_to_see_more(tmp_path, capsys, monkeypatch):
    import kalm_store.cli.info as info

    def boom(args):
        raise KeyError(8)

    monkeypatch.setattr(info, "run", boom)
    code, _, err = _cli(["info", "--db", str(tmp_path), "--table", "t"], capsys)
    msg = _one_line_error(err, "info")
    assert code == 1 and "internal error KeyError" in msg and "kalm-store --debug info" in msg


# ====================================================================== item 9: damaged checkpoints
def _broken_model(tiny_model_dir: Path, tmp_path: Path, how: str) -> Path:
    import shutil
    import struct

    d = tmp_path / f"m_{how}"
    shutil.copytree(tiny_model_dir, d)
    weights, config = d / "model.safetensors", d / "config.json"
    if how == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif how == "huge_header":
        weights.write_bytes(struct.pack("<Q", 2**62) + weights.read_bytes()[8:])
    elif how == "tokenizer":
        (d / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"}}')
    else:
        c = json.loads(config.read_text())
        key, value = {"heads0": ("num_attention_heads", 0), "softcap0": ("final_logit_softcapping", 0.0),
                      "window_neg": ("sliding_window", -3), "width": ("hidden_size", 2**40),
                      "eps": ("rms_norm_eps", 1e30), "layers": ("num_hidden_layers", 10**5)}[how]
        for sub in (c["decoder"], c["encoder"]["text_config"]):
            sub[key] = value
            if key == "num_hidden_layers":
                sub["layer_types"] = ["full_attention"] * value
        config.write_text(json.dumps(c))
    return d


@pytest.mark.parametrize("how, names, match", [
    ("truncated", "model.safetensors", r"is not a readable safetensors file .*truncated or damaged"),
    ("huge_header", "model.safetensors", r"header too large"),
    ("tokenizer", "tokenizer.json", r"has no loadable tokenizer"),
    ("heads0", "config.json", r"config\.json"),
    ("softcap0", "config.json", r"final_logit_softcapping is 0\.0; it must be a positive finite number"),
    ("window_neg", "config.json", r"sliding_window is -3; it must be a positive int"),
    ("eps", "config.json", r"rms_norm_eps is 1e\+30; it must be below 1"),
    ("width", "config.json", r"hidden_size is 1099511627776, the weights' .*embed_tokens\.weight is 64 wide"),
    ("layers", "config.json", r"num_hidden_layers is 100000, the weights hold 3"),
])
def test_damaged_checkpoint_is_one_line_naming_the_file(how, names, match, tiny_model_dir, tmp_path, capsys):
    d = _broken_model(tiny_model_dir, tmp_path, how)
    inp = tmp_path / "c.jsonl"
    inp.write_text('{"id": "a", "text": "t"}\n')
    code, _, err = _cli(_build_argv(inp, tmp_path / "db", d), capsys)
    msg = _one_line_error(err)
    assert code == 1 and str(d) in msg and (names in msg or how == "tokenizer"), msg
    assert re.search(match, msg), msg
    assert "download the checkpoint again" in msg or "Fix that value" in msg


# ====================================================================== item 2: malformed CSV, mass deletes
def _csv_lines(n: int) -> list[str]:
    return ["id,text"] + [f'p{i},"passage {i} about things"' for i in range(n)]


def _write_csv(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("bad_line, expect_line, match", [
    ('p9,"unterminated', 11, r"malformed CSV: .*runs to line \d+: a quote is not closed"),
    ('p9,text "with" a,comma', 11, r"has 3 fields, the header has 2"),
    ('p9,"closed"junk', 11, r"malformed CSV: '\,' expected after '\"'"),
])
def test_malformed_csv_stops_naming_the_line_and_skip_bad_skips_only_it(bad_line, expect_line, match, tmp_path,
                                                                        tiny_model_dir, capsys):
    from kalm_store.records import read_records

    lines = _csv_lines(40)
    lines[10] = bad_line
    inp = _write_csv(tmp_path / "c.csv", lines)
    with pytest.raises(ValueError, match=re.escape(f"{inp}:{expect_line}: ") + match):
        list(read_records(str(inp)))
    bad: list = []
    got = [raw["id"] for _, raw in read_records(str(inp), on_bad=bad.append)]
    assert got == [f"p{i}" for i in range(40) if i != 9] and [b.where for b in bad] == [f"{inp}:{expect_line}"]

    code, _, err = _cli(_build_argv(inp, tmp_path / "db", tiny_model_dir, "--chunk-size", "100"), capsys)
    assert code == 1 and f"{inp}:{expect_line}: " in _one_line_error(err)
    assert _stored_ids(tmp_path / "db") == sorted(f"p{i}" for i in range(9))  # the records before it


def test_csv_lines_and_quoting_that_are_fine(tmp_path):
    import pyarrow as pa
    import pyarrow.csv as pcsv

    from kalm_store.records import read_records

    texts = ["a\nb", 'say "hi"', "x,y", "", "  spaced  ", "caf\u00e9 \U0001F600"]
    pcsv.write_csv(pa.table({"id": ["007", "b", "c", "d", "e", "f"], "text": texts}), tmp_path / "c.csv")
    got = list(read_records(str(tmp_path / "c.csv")))
    assert [raw["text"] for _, raw in got] == texts and got[0][1]["id"] == "007"
    assert [w for w, _ in got][:2] == [f"{tmp_path / 'c.csv'} row 1", f"{tmp_path / 'c.csv'} row 2"]  # well-formed
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbfid,text\r\np1,windows line\r\n\r\np2,x\r\n")
    assert [raw for _, raw in read_records(str(bom))] == [{"id": "p1", "text": "windows line"},
                                                          {"id": "p2", "text": "x"}]
    big = tmp_path / "big.csv"
    big.write_text("id,text\np1," + "w " * 200_000 + "\n")  # over the csv module's default 128 KiB field limit
    assert len(next(read_records(str(big)))[1]["text"]) == 400_000


def test_delete_missing_refuses_a_suspect_input(tmp_path, tiny_model_dir, capsys):
    """The reported case: one unterminated quote read 3 records of 100, and --delete-missing deleted 97."""
    full = _write_csv(tmp_path / "full.csv", _csv_lines(20))
    db = tmp_path / "db"
    assert _cli(_build_argv(full, db, tiny_model_dir), capsys)[0] == 0
    lines = _csv_lines(20)
    lines[3] = 'p2,"unterminated'  # no later quote closes it: pyarrow read the rest as one value
    lines = [lines[0]] + [x.replace('"', "") for x in lines[1:3]] + [lines[3]] + [x.replace('"', "") for x in lines[4:]]
    broken = _write_csv(tmp_path / "broken.csv", lines)
    code, _, err = _cli(_build_argv(broken, db, tiny_model_dir, "--update", "--delete-missing"), capsys)
    assert code == 1 and f"{broken}:4: malformed CSV" in _one_line_error(err)
    assert len(_stored_ids(db)) == 20

    few = _write_csv(tmp_path / "few.csv", _csv_lines(3))  # well-formed, but 3 records for 20 stored rows
    code, _, err = _cli(_build_argv(few, db, tiny_model_dir, "--update", "--delete-missing"), capsys)
    msg = _one_line_error(err)
    assert code == 1 and "would delete 17 rows, more than half" in msg and "--allow-mass-delete" in msg, msg
    assert len(_stored_ids(db)) == 20
    code, out, err = _cli(_build_argv(few, db, tiny_model_dir, "--update", "--delete-missing",
                                      "--allow-mass-delete"), capsys)
    assert code == 0 and "deleted 17 rows not in the input" in out, err
    assert _stored_ids(db) == ["p0", "p1", "p2"]


# ====================================================================== item 7: tokenization bounded by max_length
WORDS = ("the quick brown fox jumps over lazy dog parse json file return value error empty container "
         "naïve café 東京 данные ünïcödé !!! ... 1234 3.14 http://x.org/a?b=c ==== \t tab").split(" ")


@pytest.fixture(scope="module")
def gemma_like():
    """A BPE tokenizer built like Gemma's: spaces normalized to '▁', no pre-tokenizer (BPE sees the whole text as
    one word, so merges may cross words), byte fallback; trained here on a few sentences."""
    from tokenizers import Tokenizer, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Replace(" ", "▁")
    corpus = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 3
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>"] + [
        f"<0x{b:02X}>" for b in range(256)], show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def _full(tokenizer, text: str, max_length: int) -> list[int]:
    return list(tokenizer([text], add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"][0])


def _tokenizers(model, gemma_like):
    return {"tiny (byte-level, word pre-tokenizer)": model.tokenizer, "gemma-like (no pre-tokenizer)": gemma_like}


@pytest.mark.parametrize("max_length", [1, 2, 7, 16, 33, 100])
def test_prefix_tokenization_equals_full_on_fixed_texts(model, gemma_like, passages, max_length):
    from kalm_store.truncation import token_ids

    texts = [" ".join(passages) * k for k in (1, 3, 10)] + [" ".join(WORDS) * 40, "x" * 5000, "é" * 3000,
                                                           "a b " * 2000, "\n\n".join(passages) * 20]
    for name, tok in _tokenizers(model, gemma_like).items():
        got = token_ids(tok, texts, max_length)
        for text, ids in zip(texts, got):
            assert ids == _full(tok, text, max_length), (name, max_length, text[:60])


def test_prefix_tokenization_equals_full_on_generated_texts(model, gemma_like):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from kalm_store.truncation import token_ids

    word = st.one_of(st.sampled_from(WORDS), st.text(min_size=1, max_size=12))
    sep = st.sampled_from([" ", " ", " ", "  ", "\n", ", ", ". ", "\t", ""])
    text = st.lists(st.tuples(word, sep), min_size=1, max_size=400).map(lambda ws: "".join(w + s for w, s in ws))

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(text=text, max_length=st.integers(1, 40), which=st.booleans())
    def check(text, max_length, which):
        tok = model.tokenizer if which else gemma_like
        assert token_ids(tok, [text], max_length)[0] == _full(tok, text, max_length)

    check()


def test_a_huge_passage_is_tokenized_from_a_bounded_prefix(model, monkeypatch):
    """The work is bounded by max_length: no call to the tokenizer sees more than a few max_length's worth of
    characters of a 2 MB passage, and the ids are those of the whole text cut at max_length."""
    huge = "Vector databases store embeddings next to text; a reranker scores each candidate. " * 25_000
    expected = _full(model.tokenizer, "<Document>: " + huge, model.max_length)
    tok = model.tokenizer
    seen: list[int] = []
    real_call = type(tok).__call__

    def spy(self, text, *a, **kw):
        seen.extend(len(t) for t in ([text] if isinstance(text, str) else text))
        return real_call(self, text, *a, **kw)

    monkeypatch.setattr(type(tok), "__call__", spy)
    ids = model.tokenize_passages([huge, "short"])
    assert ids[0] == expected and len(ids[0]) == model.max_length
    assert max(seen) <= 24 * model.max_length, max(seen)  # 2 MB text, prefixes of at most ~24 chars per token
    q = model.prompt_ids(huge)  # queries too: cut to query_max_length from a prefix
    assert max(seen) <= 24 * model.max_length and len(q) > model.query_max_length
