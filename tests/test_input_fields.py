"""Input fields beyond id, text and vector kept as columns (issue 15, item 1); a build after `repool`
(item 4); everything that needs no model checked before the model loads (item 5)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from kalm_store.build import BuildOptions, build
from kalm_store.records import BadRecordError


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def opts(tmp_path: Path, inp: Path | str, model_dir: Path, **kw) -> BuildOptions:
    kw.setdefault("chunk_size", 4)
    return BuildOptions(input=str(inp), db=str(tmp_path / "db"), table="docs", model=str(model_dir),
                        progress=False, **kw)


def table(tmp_path: Path):
    import lancedb

    return lancedb.connect(str(tmp_path / "db")).open_table("docs")


def rows_by_id(tmp_path: Path) -> dict[str, dict]:
    return {r["id"]: r for r in table(tmp_path).to_arrow().to_pylist()}


def corpus(n: int = 10) -> list[dict]:
    modules = ["json", "os", "re", "csv"]
    return [{"id": f"p{i}", "text": f"passage {i} about the {modules[i % 4]} module of python",
             "module": modules[i % 4], "year": 2000 + i, "score": i / 4, "tags": [modules[i % 4], "doc"],
             "url": f"https://docs/{i}"} for i in range(n)]


@pytest.fixture
def no_model_load(monkeypatch):
    """Loading a model is an error: what these tests check must be refused without one."""
    from kalm_store.model import KaLMModel

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the mistake was found")

    monkeypatch.setattr(KaLMModel, "from_pretrained", classmethod(lambda cls, *a, **k: refuse()))


# ---------------------------------------------------------------------- item 1: fields kept as columns
def test_jsonl_fields_become_typed_columns_across_chunks(tmp_path, model, tiny_model_dir):
    records = corpus(10)
    records[0]["tags"] = []  # an empty list fixes no type: the next value does
    del records[1]["url"]  # a record without a field holds null there
    records[2]["extra_late"] = None
    records[9]["late"] = "first seen in the last chunk"
    s = build(opts(tmp_path, write_jsonl(tmp_path / "c.jsonl", records), tiny_model_dir), model=model)
    assert (s.written, s.commits) == (10, 3)
    tbl = table(tmp_path)
    types = {f.name: f.type for f in tbl.schema}
    assert types["module"] == pa.string() and types["year"] == pa.int64() and types["score"] == pa.float64()
    assert types["tags"] == pa.list_(pa.string()) and types["url"] == pa.string() and types["late"] == pa.string()
    assert "extra_late" not in types  # only null so far: no column until a value shows its type
    from kalm_store.input_columns import is_input_column

    assert all(is_input_column(tbl.schema.field(n)) for n in ("module", "year", "late"))
    assert not is_input_column(tbl.schema.field("text"))
    got = rows_by_id(tmp_path)
    assert got["p3"]["module"] == "csv" and got["p3"]["year"] == 2003 and got["p3"]["score"] == 0.75
    assert got["p0"]["tags"] == [] and got["p4"]["tags"] == ["json", "doc"]
    assert got["p1"]["url"] is None and got["p2"]["url"] == "https://docs/2"
    assert got["p9"]["late"] == "first seen in the last chunk" and got["p0"]["late"] is None
    from kalm_store.store import PassageStore

    store = PassageStore.open(str(tmp_path / "db"), "docs", model=model)
    assert store.matrices(["p9"], 4)[0].shape[0] == -(-got["p9"]["n_tokens"] // 4)


def test_a_type_conflict_names_file_line_and_field_and_keeps_what_came_before(tmp_path, model, tiny_model_dir):
    records = corpus(10)
    records[6]["year"] = "MMVI"
    inp = write_jsonl(tmp_path / "c.jsonl", records)
    with pytest.raises(BadRecordError, match=r"c\.jsonl:7: field 'year' holds a string \('MMVI'\), but its column "
                                             r"is int64 \(set by .*c\.jsonl:1\)"):
        build(opts(tmp_path, inp, tiny_model_dir), model=model)
    assert sorted(rows_by_id(tmp_path)) == [f"p{i}" for i in range(6)]  # the records before it are stored
    # a whole float in an int column is that int; 2006.5 is not (pyarrow alone would truncate it)
    records[6]["year"] = 2006.5
    with pytest.raises(BadRecordError, match=r"c\.jsonl:7: field 'year' holds a number \(2006\.5\)"):
        build(opts(tmp_path, write_jsonl(inp, records), tiny_model_dir), model=model)
    records[6]["year"] = 2006.0
    s = build(opts(tmp_path, write_jsonl(inp, records), tiny_model_dir), model=model)
    assert (s.written, s.already_stored) == (4, 6) and rows_by_id(tmp_path)["p6"]["year"] == 2006


def test_a_resumed_build_holds_the_tables_types_and_refuses_before_the_model(tmp_path, model, tiny_model_dir,
                                                                             no_model_load, capsys):
    """The table schema records the types: a later build with another type on its first line is refused
    naming the line, the field and the table's column, before any model is loaded."""
    from kalm_store.cli import main

    build(opts(tmp_path, write_jsonl(tmp_path / "a.jsonl", corpus(4)), tiny_model_dir), model=model)
    later = [{"id": "q1", "text": "more", "year": "two thousand"}]
    argv = ["build", str(write_jsonl(tmp_path / "b.jsonl", later)), "--db", str(tmp_path / "db"), "--table", "docs",
            "--model", str(tiny_model_dir), "--no-progress"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "b.jsonl:1: field 'year' holds a string ('two thousand'), but its column is int64 (set by the table's " \
           "column 'year')" in err
    with pytest.raises(AssertionError, match="model was loaded"):  # it is refused, not merely unloaded
        main(["--debug"] + argv[:1] + [str(write_jsonl(tmp_path / "ok.jsonl", [{"id": "q1", "text": "ok", "year": 5}]))]
             + argv[2:])  # --debug: the CLI reports other errors in one line


def test_parquet_and_csv_fields(tmp_path, model, tiny_model_dir):
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    records = corpus(6)
    t = pa.table({"id": [r["id"] for r in records], "text": [r["text"] for r in records],
                  "module": [r["module"] for r in records], "year": pa.array([r["year"] for r in records], pa.int32()),
                  "when": pa.array([np.datetime64("2024-01-02T00:00:00", "s")] * 6, pa.timestamp("s"))})
    pq.write_table(t, tmp_path / "c.parquet")
    s = build(opts(tmp_path, tmp_path / "c.parquet", tiny_model_dir), model=model)
    assert s.written == 6
    got = rows_by_id(tmp_path)
    assert got["p2"]["module"] == "re" and got["p2"]["year"] == 2002 and str(got["p2"]["when"]) == "2024-01-02 00:00:00"
    types = {f.name: f.type for f in table(tmp_path).schema}  # a Parquet file's own types are kept
    assert types["year"] == pa.int32() and types["when"] == pa.timestamp("ms")  # Parquet keeps s as ms and types["module"] == pa.string()
    # CSV: pyarrow infers each column's type from the first block; a later value of another type names
    # its row and field (the reader alone says only "CSV conversion error to int64")
    lines = ["id,text,module,year"] + [f"c{i},{'t' * 100},m,{i}" for i in range(40_000)] + ["cx,last,mx,MMXX"]
    (tmp_path / "big.csv").write_text("\n".join(lines) + "\n")
    assert (tmp_path / "big.csv").stat().st_size > 1 << 22  # the bad value is in a later block than the first
    from kalm_store.records import read_records

    with pytest.raises(BadRecordError, match=r"big\.csv row 40001: field 'year' holds 'MMXX', but its column is "
                                             r"int64 \(inferred from the rows before it\)"):
        for _ in read_records(str(tmp_path / "big.csv")):
            pass
    pcsv.write_csv(t.drop_columns(["when"]), tmp_path / "d.csv")
    build(opts(tmp_path / "csv", tmp_path / "d.csv", tiny_model_dir, keep_fields=["year"]), model=model)
    csv_rows = rows_by_id(tmp_path / "csv")
    assert csv_rows["p4"]["year"] == 2004 and "module" not in csv_rows["p4"]
    with pytest.raises(ValueError, match=r"no column 'title' to keep \(--keep-field"):
        build(opts(tmp_path / "d", tmp_path / "d.csv", tiny_model_dir, keep_fields=["title"]), model=model)


def test_keep_field_drop_fields_and_reserved_names(tmp_path, model, tiny_model_dir, capsys):
    from kalm_store.cli import main

    inp = write_jsonl(tmp_path / "c.jsonl", corpus(4))
    base = ["--table", "docs", "--model", str(tiny_model_dir), "--no-progress"]
    assert main(["build", str(inp), "--db", str(tmp_path / "a"), "--keep-field", "module", "--keep-field", "year"]
                + base) == 0
    assert main(["build", str(inp), "--db", str(tmp_path / "b"), "--drop-fields"] + base) == 0
    import lancedb

    names = {k: lancedb.connect(str(tmp_path / k)).open_table("docs").schema.names for k in "ab"}
    assert {"module", "year"} <= set(names["a"]) and not {"url", "tags", "score"} & set(names["a"])
    assert names["b"] == ["id", "text", "n_tokens", "text_digest", "kalm_r4"]
    capsys.readouterr()
    assert main(["build", str(inp), "--db", str(tmp_path / "c"), "--keep-field", "n_tokens"] + base) == 1
    assert "--keep-field 'n_tokens': that name is taken" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:  # argparse: the two flags exclude each other
        main(["build", str(inp), "--db", str(tmp_path / "c"), "--keep-field", "x", "--drop-fields"] + base)
    assert exit_.value.code == 2 and "--drop-fields: not allowed with argument --keep-field" in capsys.readouterr().err
    capsys.readouterr()
    vec = write_jsonl(tmp_path / "v.jsonl", [{"id": "a", "text": "t", "vector": [1.0, 2.0]}])
    assert main(["build", str(vec), "--db", str(tmp_path / "c")] + base) == 1
    err = capsys.readouterr().err
    assert "v.jsonl:1: field 'vector' has the name of a column kalm-store stores itself (pass --vector-field vector" in err
    assert not (tmp_path / "c" / "docs.lance").exists()


def test_update_replaces_kept_fields_without_re_encoding_unchanged_texts(tmp_path, model, tiny_model_dir,
                                                                         monkeypatch):
    records = corpus(8)
    inp = write_jsonl(tmp_path / "c.jsonl", records)
    build(opts(tmp_path, inp, tiny_model_dir), model=model)
    table(tmp_path).add_columns({"note": "concat('hand-added ', id)"})  # a column of the user's own
    before = rows_by_id(tmp_path)
    records[1]["module"] = "pathlib"  # only a field changed: no encoding
    del records[2]["url"]  # a field the record no longer has: null
    records[5]["text"] = "an edited passage"  # text changed: re-encoded, with its fields
    records[5]["year"] = 1999
    write_jsonl(inp, records)
    encoded: list[str] = []
    real = type(model).encode_ratios

    def spy(self, texts, *a, **k):
        encoded.extend(texts)
        return real(self, texts, *a, **k)

    monkeypatch.setattr(type(model), "encode_ratios", spy)
    s = build(opts(tmp_path, inp, tiny_model_dir, update=True), model=model)
    assert encoded == ["an edited passage"]
    assert (s.written, s.updated, s.already_stored) == (3, 3, 5)
    after = rows_by_id(tmp_path)
    assert after["p1"]["module"] == "pathlib" and after["p1"]["kalm_r4"] == before["p1"]["kalm_r4"]
    assert after["p1"]["text_digest"] == before["p1"]["text_digest"] and after["p1"]["note"] == "hand-added p1"
    assert after["p2"]["url"] is None and after["p2"]["module"] == "re"
    assert after["p5"]["year"] == 1999 and after["p5"]["text"] == "an edited passage"
    assert after["p5"]["note"] == "hand-added p5" and after["p5"]["kalm_r4"] != before["p5"]["kalm_r4"]
    assert all(after[k] == before[k] for k in ("p0", "p3", "p4", "p6", "p7"))
    encoded.clear()
    again = build(opts(tmp_path, inp, tiny_model_dir, update=True), model=model)
    assert (again.written, again.already_stored, encoded) == (0, 8, [])  # idempotent


def test_search_where_and_field_and_the_reranker_pass_kept_fields_through(tmp_path, model, tiny_model_dir, capsys):
    from kalm_store.cli import main
    from kalm_store.plugins.lancedb import KaLMReranker

    inp = write_jsonl(tmp_path / "c.jsonl", corpus(12))
    base = ["--db", str(tmp_path / "db"), "--table", "docs", "--model", str(tiny_model_dir)]
    assert main(["build", str(inp), "--no-progress"] + base) == 0
    capsys.readouterr()
    assert main(["search", "python module", "--mode", "fts", "--where", "module = 'json'", "--field", "module",
                 "--field", "year", "--json"] + base) == 0
    hits = json.loads(capsys.readouterr().out)["results"]
    assert sorted(h["id"] for h in hits) == ["p0", "p4", "p8"]
    assert all(h["module"] == "json" and h["year"] == 2000 + int(h["id"][1:]) for h in hits)
    tbl = table(tmp_path)
    rr = KaLMReranker(model, table=tbl)
    out = tbl.search("python", query_type="fts").where("year >= 2006").select(["text", "url"] + rr.columns) \
        .limit(20).rerank(rr).to_arrow()
    assert out.num_rows == 6 and "url" in out.column_names and "kalm_r4" not in out.column_names
    assert {u for u in out.column("url").to_pylist()} == {f"https://docs/{i}" for i in range(6, 12)}
    by_rowid = tbl.search("python", query_type="fts").select(["text", "module"]).with_row_id(True).limit(20) \
        .rerank(rr).to_arrow()  # matrices fetched by _rowid: the selected fields stay
    assert by_rowid.num_rows == 12 and set(by_rowid.column("module").to_pylist()) == {"json", "os", "re", "csv"}


# ---------------------------------------------------------------------- item 4: build after repool
def test_the_same_build_command_goes_on_after_repool(tmp_path, model, tiny_model_dir, capsys):
    from kalm_store.cli import main
    from kalm_store.store import PassageStore

    records = corpus(8)
    inp = write_jsonl(tmp_path / "c.jsonl", records[:4])
    base = ["--db", str(tmp_path / "db"), "--table", "docs", "--model", str(tiny_model_dir), "--no-progress",
            "--chunk-size", "4", "--batch-size", "4"]
    assert main(["build", str(inp), "--ratio", "4"] + base) == 0
    assert main(["repool", "--db", str(tmp_path / "db"), "--table", "docs", "--from", "4", "--to", "8"]) == 0
    write_jsonl(inp, records[:6])
    capsys.readouterr()
    assert main(["build", str(inp), "--ratio", "4"] + base) == 0  # the command that made the table
    out = capsys.readouterr().out
    assert "wrote 2 " in out and "the table stores ratios [4, 8]: rows were written at each of them" in out
    write_jsonl(inp, records)
    assert main(["build", str(inp)] + base) == 0  # no --ratio: the table's
    assert "wrote 2 " in capsys.readouterr().out
    store = PassageStore.open(str(tmp_path / "db"), "docs", model=model)
    assert store.ratios == [4, 8] and store.table.count_rows() == 8
    # new rows at r=8 are the encoder's own pooling at 8, as a build with both ratios writes them
    enc = model.encode_ratios([r["text"] for r in records[4:6]], [4, 8], batch_size=4)
    for got, want in zip(store.matrices(["p4", "p5"], 8), enc.matrices[8]):
        assert got.tobytes() == want.tobytes()
    assert main(["build", str(inp), "--ratio", "16"] + base) == 1
    err = capsys.readouterr().err
    assert "does not store: [16]" in err and "`kalm-store repool --from 8 --to 16` adds r=16" in err
    assert main(["repool", "--db", str(tmp_path / "db"), "--table", "docs", "--from", "4", "--to", "16",
                 "--drop-source"]) == 0
    capsys.readouterr()
    assert main(["build", str(inp), "--ratio", "4"] + base) == 1  # r=4 is gone: a true conflict
    err = capsys.readouterr().err
    assert "build asks for [4], which the table does not store: [4]" in err and "cannot be derived" in err
    assert main(["build", str(inp)] + base) == 0  # without --ratio it still appends (nothing new here)


def test_a_ratio_the_table_lacks_names_the_repool_that_adds_it(tmp_path, model, tiny_model_dir, no_model_load):
    from kalm_store.store import PassageStore, StoreMismatchError

    PassageStore.create(str(tmp_path / "db"), "docs", model, ratios=[2, 4]).add([{"id": "a", "text": "x"}])
    inp = write_jsonl(tmp_path / "c.jsonl", [{"id": "b", "text": "y"}])
    with pytest.raises(StoreMismatchError, match=r"does not store: \[1, 16\] .*r=1 is finer than every stored "
                                                 r"ratio and cannot be derived .*`kalm-store repool --from 4 --to 16`"):
        build(opts(tmp_path, inp, tiny_model_dir, ratios=[1, 4, 16]))


# ---------------------------------------------------------------------- item 5: no model for a mistake
@pytest.fixture
def small_store(tmp_path_factory, model, tiny_model_dir):
    root = tmp_path_factory.mktemp("small")
    recs = [dict(r, vec=[float(i), 1.0, 0.0]) for i, r in enumerate(corpus(4))]
    build(BuildOptions(str(write_jsonl(root / "c.jsonl", recs)), db=str(root / "db"), table="docs",
                       model=str(tiny_model_dir), vector_field="vec", progress=False), model=model)
    return root


@pytest.mark.parametrize("flags, message", [
    (["--field", "nope"], "fields ['nope'] are not columns of table 'docs'"),
    (["--mode", "vector", "--query-vector", "1,2"], "--query-vector has 2 values; table 'docs' holds 3-d vectors"),
    (["--ratio", "8"], "stores ratios [4], not r=8"),
    (["--mode", "vector"], "holds brought vectors"),
    (["--where", "modul = 'json'"], "where \"modul = 'json'\" is not a filter table 'docs' can run: Schema error: No "
                                    "field named modul"),
])
def test_search_refuses_before_loading_the_model(small_store, tiny_model_dir, no_model_load, capsys, flags, message):
    from kalm_store.cli import main

    argv = ["search", "json", "--db", str(small_store / "db"), "--table", "docs", "--model", str(tiny_model_dir),
            "--mode", "fts"]  # a later --mode wins
    assert main(argv + flags) == 1
    assert message in capsys.readouterr().err


def test_search_without_a_full_text_index_is_refused_before_the_model(tmp_path, model, tiny_model_dir,
                                                                      no_model_load):
    from kalm_store import search

    build(opts(tmp_path, write_jsonl(tmp_path / "c.jsonl", corpus(3)), tiny_model_dir, fts_index=False), model=model)
    with pytest.raises(ValueError, match="needs a full-text index on 'text'"):
        search(str(tmp_path / "db"), "docs", "json", model=str(tiny_model_dir), mode="fts")


@pytest.mark.parametrize("content, suffix, message", [
    ('[{"id": "a", "text": "x"}]\n', ".json", "c.json:1: expected a JSON object, got list"),
    ("pid,body\na,x\n", ".csv", "no column 'id' in the header"),
    ('{"id": "a"}\n', ".jsonl", "c.jsonl:1: missing text field 'text'"),
])
def test_build_and_plan_refuse_bad_input_before_loading_the_model(tmp_path, small_store, tiny_model_dir,
                                                                  no_model_load, capsys, content, suffix, message):
    from kalm_store.cli import main

    inp = tmp_path / f"c{suffix}"
    inp.write_text(content if suffix != ".json" else content.replace("\n", ""))
    for db in (tmp_path / "new", small_store / "db"):  # a new table and an existing one
        assert main(["build", str(inp), "--db", str(db), "--table", "docs", "--model", str(tiny_model_dir),
                     "--vector-field", "vec"]) == 1
        err = capsys.readouterr().err
        assert message.split(": ", 1)[-1] in err or message in err, err
    assert not (tmp_path / "new" / "docs.lance").exists()
    assert main(["plan", str(inp), "--model", str(tiny_model_dir)]) == 1
    assert message.split(": ", 1)[-1] in capsys.readouterr().err


def test_build_refuses_other_layouts_before_loading_the_model(small_store, tmp_path, tiny_model_dir, no_model_load,
                                                              capsys):
    from kalm_store.cli import main

    inp = write_jsonl(tmp_path / "c.jsonl", [{"id": "z", "text": "new", "vec": [1.0, 0.0, 0.0]}])
    argv = ["build", str(inp), "--db", str(small_store / "db"), "--table", "docs", "--model", str(tiny_model_dir)]
    assert main(argv + ["--vector-field", "vec", "--ratio", "8"]) == 1
    assert "does not store: [8]" in capsys.readouterr().err
    assert main(argv + ["--vector-field", "vec", "--max-length", "64"]) == 1
    assert "max_length: table has 1024, build asks for 64" in capsys.readouterr().err
    assert main(argv) == 1  # no --vector-field for a table of brought vectors
    assert "vectors: table's are 'brought', build's are 'none'" in capsys.readouterr().err
    bad = write_jsonl(tmp_path / "w.jsonl", [{"id": "z", "text": "new", "vec": [1.0, 0.0]}])
    assert main(["build", str(bad)] + argv[2:] + ["--vector-field", "vec"]) == 1
    assert "w.jsonl:1: vector field 'vec' has 2 values; the table's vectors have 3" in capsys.readouterr().err
