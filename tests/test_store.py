"""PassageStore: create/open/add/matrices/info, metadata from the schema file, refusals."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from kalm_store import schema
from kalm_store.store import (MissingRowError, PassageStore, StaleMatrixError, StoreMismatchError, check_ratio_stored,
                              decode_rows, text_digest)


@pytest.fixture
def store(tmp_path, model, passages):
    s = PassageStore.create(str(tmp_path / "db"), "docs", model, ratios=[8, 4])
    s.add([{"id": f"p{i}", "text": t} for i, t in enumerate(passages)])
    return s


def test_schema_and_metadata_come_from_the_file(store, model):
    spec = schema.spec()
    names = [f.name for f in store.table.schema]
    assert names == ["id", "text", "n_tokens", "text_digest", "kalm_r4", "kalm_r8"]  # no vector: text-only store
    rows = store.table.to_arrow()
    assert rows.column("text_digest").type == pa.binary(8)
    assert rows.column("text_digest").to_pylist() == [text_digest(t) for t in rows.column("text").to_pylist()]
    assert text_digest("yes") == hashlib.blake2b(b"yes", digest_size=8).digest()
    field = store.table.schema.field("kalm_r4")
    assert {k.decode(): v.decode() for k, v in field.metadata.items()} == spec["columns"][-1]["field_metadata"]
    meta = store.metadata
    assert set(meta) <= set(spec["metadata"])
    assert meta["fingerprint"] == model.fingerprint and meta["dim"] == model.dim and meta["ratios"] == [4, 8]
    assert meta["stored_dtype"] == "float16" and meta["max_length"] == model.max_length


def test_matrices_are_bitwise_what_encode_produced(store, model, passages):
    enc = model.encode_ratios(passages, [4, 8])  # same batch as add() used
    for r in (4, 8):
        got = store.matrices([f"p{i}" for i in reversed(range(len(passages)))], r)[::-1]
        for g, want in zip(got, enc.matrices[r]):
            assert g.dtype == np.float16 and g.tobytes() == want.tobytes()
    with pytest.raises(KeyError, match="nope") as missing:
        store.matrices(["p0", "nope"], 4)
    assert str(missing.value).startswith("ids not in table")  # the message itself, not KeyError's repr
    with pytest.raises(TypeError, match="ids must be strings, got int 7"):
        store.matrices(["p0", 7], 4)
    with pytest.raises(KeyError, match="it's"):  # quotes in ids stay inside the SQL literal
        store.matrices(["it's"], 4)
    with pytest.raises(StoreMismatchError, match=r"stores ratios \[4, 8\], not r=16"):
        store.matrices(["p0"], 16)


def test_add_is_idempotent_and_first_id_wins(store, passages):
    assert store.add([{"id": "p0", "text": "other"}, {"id": "new", "text": "a"}, {"id": "new", "text": "b"}]) == 1
    assert store.add([{"id": "new", "text": "c"}]) == 0
    rows = store.table.to_arrow()
    texts = dict(zip(rows.column("id").to_pylist(), rows.column("text").to_pylist()))
    assert len(texts) == len(passages) + 1 and texts["new"] == "a" and texts["p0"] == passages[0]
    with pytest.raises(ValueError, match="record 0"):
        store.add([{"id": 1, "text": "x"}])


def test_upsert_replaces_only_changed_rows(store, model, passages):
    def column(name):
        rows = store.table.to_arrow()
        return dict(zip(rows.column("id").to_pylist(), rows.column(name).to_pylist()))

    before = column("kalm_r4")
    records = [{"id": f"p{i}", "text": t} for i, t in enumerate(passages)]
    records[1] = {"id": "p1", "text": "zeppelins drift over the harbour"}
    assert store.upsert(records + [{"id": "new", "text": "a"}, {"id": "p1", "text": "a later p1"}]) == 2
    after = column("kalm_r4")
    assert column("text")["p1"] == "zeppelins drift over the harbour" and len(after) == len(passages) + 1
    assert store.matrices(["p1"], 4)[0].tobytes() == model.encode(["zeppelins drift over the harbour"], 4)[0].tobytes()
    assert {k: v for k, v in after.items() if k not in ("p1", "new")} == {k: v for k, v in before.items() if k != "p1"}
    version = store.table.version
    assert store.upsert(records) == 0 and store.table.version == version  # idempotent: no commit at all
    assert store.add([{"id": "p1", "text": "add never replaces"}]) == 0 and column("text")["p1"].startswith("zep")


def test_add_and_upsert_keep_other_keys_as_typed_columns(store, model, passages):
    """Keys beyond id/text/vector are the user's own fields: kept as columns (as a build keeps input
    fields), never dropped; an upsert that changes only them replaces those values without encoding."""
    def rows():
        t = store.table.to_arrow()
        return {r["id"]: r for r in t.to_pylist()}

    assert store.add([{"id": "u1", "text": "a page about harbours", "url": "https://a.example", "year": 2020},
                      {"id": "u2", "text": "a page about zeppelins", "url": "https://b.example"}]) == 2
    got = rows()
    assert store.table.schema.field("url").type == pa.string() and store.table.schema.field("year").type == pa.int64()
    assert (got["u1"]["url"], got["u1"]["year"]) == ("https://a.example", 2020)
    assert (got["u2"]["url"], got["u2"]["year"]) == ("https://b.example", None)
    assert got["p0"]["url"] is None  # rows stored before the column existed read null
    r4 = got["u1"]["kalm_r4"]
    version = store.table.version
    with pytest.raises(ValueError, match=r"record 1 \(id 'u4'\).*'year'.*int64"):  # 2020.5 does not fit int64
        store.add([{"id": "u3", "text": "fine"}, {"id": "u4", "text": "bad", "year": 2020.5}])
    assert store.table.version == version and "u3" not in rows()  # refused before any write
    assert store.upsert([{"id": "u1", "text": "a page about harbours", "url": "https://c.example", "year": 2021}]) == 1
    got = rows()
    assert (got["u1"]["url"], got["u1"]["year"]) == ("https://c.example", 2021)
    assert got["u1"]["kalm_r4"] == r4  # fields only: the matrix was not re-encoded
    assert store.upsert([{"id": "u1", "text": "a page about harbours", "url": "https://c.example", "year": 2021}]) == 0


def test_changed_compares_brought_vectors_as_stored(tmp_path, model):
    s = PassageStore.create(str(tmp_path / "db"), "v", model, ratios=[4], vector_dim=2)
    s.add([{"id": "a", "text": "x", "vector": [0.1, 0.2]}, {"id": "b", "text": "y", "vector": [1, 2]}])
    assert s.changed(["a", "b"], ["x", "y"], [[0.1, 0.2], [1, 2]]) == [False, False]  # float32 round trip
    assert s.changed(["a", "b"], ["x", "y!"], [[0.1, 0.25], [1, 2]]) == [True, True]
    assert s.changed(["a"], ["x"], [None]) == [True]  # writing it then names the missing vector
    with pytest.raises(KeyError, match="zz"):
        s.changed(["zz"], ["x"])
    assert s.upsert([{"id": "a", "text": "x", "vector": [0.5, 0.5]}]) == 1
    with pytest.raises(ValueError, match=r"record id 'c' has a vector of shape \(1,\); table 'v' stores 2-d vectors"):
        s.upsert([{"id": "c", "text": "z", "vector": [1.0]}])
    with pytest.raises(ValueError, match="record id 'd' has no vector"):
        s.add([{"id": "d", "text": "z"}])
    rows = s.table.to_arrow()
    assert dict(zip(rows.column("id").to_pylist(), rows.column("vector").to_pylist())) == {"a": [0.5, 0.5], "b": [1, 2]}


def test_a_text_changed_behind_kalm_stores_back_is_refused_then_repaired_by_upsert(store, model, passages):
    """LanceDB's own update (or a partial merge_insert) of `text` keeps the old matrices: every read
    path refuses them by id, and an upsert with the new text re-encodes the row."""
    from kalm_store.plugins.lancedb import KaLMReranker

    store.table.update(where="id = 'p2'", values={"text": "zeppelins drift over the harbour"})
    with pytest.raises(StaleMatrixError, match=r"passage id\(s\) \['p2'\]: the text was changed after kalm_r4"):
        store.matrices(["p0", "p2"], 4)
    assert store.matrices(["p0", "p1"], 4)[0].dtype == np.float16  # other rows still read
    rr = KaLMReranker(model, table=store.table, ratio=4)
    assert rr.columns == ["id", "n_tokens", "text_digest", "kalm_r4"]
    for query in (store.table.search().select(["text"] + rr.columns),  # the select path
                  store.table.search().select(rr.columns),  # no text selected: the text fetched by id
                  store.table.search().select(rr.columns).with_row_id(True),  # ... or by _rowid
                  store.table.search().select(["id"]).with_row_id(True)):  # the _rowid path
        with pytest.raises(StaleMatrixError, match="p2"):
            rr.rerank_table("q", query.limit(10).to_arrow())
    records = [{"id": f"p{i}", "text": t} for i, t in enumerate(passages)]
    records[2]["text"] = "zeppelins drift over the harbour"  # the table's (new) text: only the digest differs
    assert store.changed(["p1", "p2"], [records[1]["text"], records[2]["text"]]) == [False, True]
    assert store.upsert(records) == 1
    got = store.matrices(["p2"], 4)[0]
    assert got.tobytes() == model.encode(["zeppelins drift over the harbour"], 4)[0].tobytes()
    out = rr.rerank_table("q", store.table.search().select(["text"] + rr.columns).limit(10).to_arrow())
    assert out.num_rows == len(passages) and "text_digest" not in out.column_names and "text" in out.column_names
    fetched_text = rr.rerank_table("q", store.table.search().select(rr.columns).limit(10).to_arrow())
    assert fetched_text.column("_relevance_score").to_pylist() == out.column("_relevance_score").to_pylist()


def test_version_1_tables_without_digests_are_read_and_appended_to(tmp_path, model, passages):
    """Tables built before text_digest (schema version 1) open, take new rows and rerank, unchecked."""
    import lancedb

    from kalm_store.plugins.lancedb import KaLMReranker
    from kalm_store.store import model_metadata

    meta = model_metadata(model) | {"schema_version": 1, "kalm_store_version": "0.1.0", "ratios": [4],
                                    "vector_dim": None, "embedder": None}
    db = lancedb.connect(str(tmp_path / "db"))
    db.create_table("old", schema=schema.arrow_schema([4], None, meta, version=1))
    old = PassageStore.open(str(tmp_path / "db"), "old", model=model)
    assert not old.has_digests and old.add([{"id": f"p{i}", "text": t} for i, t in enumerate(passages)]) == 6
    assert "text_digest" not in old.table.schema.names
    want = model.encode(passages, 4)
    assert [m.tobytes() for m in old.matrices([f"p{i}" for i in range(6)], 4)] == [m.tobytes() for m in want]
    rr = KaLMReranker(model, table=old.table)
    assert rr.columns == ["id", "n_tokens", "kalm_r4"]
    ranked = rr.rerank_table("q", old.table.search().select(["text"] + rr.columns).limit(10).to_arrow())
    want_scores = model.score("q", want)  # the v1 rows score as their matrices do (no digest check to pass)
    assert ranked.column("id").to_pylist() == [f"p{i}" for i in np.argsort(-want_scores, kind="stable")]
    np.testing.assert_allclose(ranked.column("_relevance_score").to_numpy(), np.sort(want_scores)[::-1], atol=1e-6)
    assert old.upsert([{"id": "p0", "text": "new text"}]) == 1


def test_open_refuses_another_model_and_plain_tables(tmp_path, store, model):
    import lancedb

    from kalm_store import KaLMModel

    other = KaLMModel(model.hf_model, model.tokenizer, name_or_path="x", folder=model.folder, max_length=64)
    with pytest.raises(StoreMismatchError, match="max_length: table has 1024, model gives 64"):
        PassageStore.open(str(tmp_path / "db"), "docs", model=other)
    lancedb.connect(str(tmp_path / "db")).create_table("plain", data=[{"a": 1}])
    with pytest.raises(StoreMismatchError, match="no kalm-store metadata"):
        PassageStore.open(str(tmp_path / "db"), "plain")
    with pytest.raises(ValueError, match="no table 'zzz'"):
        PassageStore.open(str(tmp_path / "db"), "zzz")
    (tmp_path / "db" / "half.lance" / "_versions").mkdir(parents=True)  # listed, as while being created
    with pytest.raises(ValueError, match="no table 'half' .* yet: its folder holds no committed version"):
        PassageStore.open(str(tmp_path / "db"), "half")
    with pytest.raises(ValueError, match="already exists"):
        PassageStore.create(str(tmp_path / "db"), "docs", model)
    with pytest.raises(StoreMismatchError, match="ratios"):
        PassageStore.create(str(tmp_path / "db"), "docs", model, ratios=[4], exist_ok=True)
    assert PassageStore.create(str(tmp_path / "db"), "docs", model, ratios=[4, 8], exist_ok=True).ratios == [4, 8]


def test_check_layout_names_each_difference(store):
    store.check_layout([8, 4], vectors="none")
    store.check_layout([4], vectors="none")  # some of the stored ratios: the build writes them all
    with pytest.raises(StoreMismatchError, match=r"ratios: table has \[4, 8\], build asks for \[4, 16\], which the "
                                                 r"table does not store: \[16\]"):
        store.check_layout([4, 16], vectors="none")
    with pytest.raises(StoreMismatchError, match="vectors: table's are 'none', build's are 'brought'"):
        store.check_layout([4, 8], vectors="brought", vector_dim=3)


def test_info_bytes_are_bytes_on_disk(store, tmp_path):
    store.update_indices()
    info = store.info()
    assert info["rows"] == 6 and info["ratios"] == [4, 8] and info["fingerprint"] == store.metadata["fingerprint"]
    data_files = sum(p.stat().st_size for p in Path(tmp_path / "db" / "docs.lance" / "data").glob("*.lance"))
    total = sum(c["stored_bytes"] for c in info["columns"].values())
    assert total <= data_files <= total + 4096 * len(info["columns"]) + 8192  # file footers and metadata only
    for r in (4, 8):
        c = info["columns"][f"kalm_r{r}"]
        assert c["value_bytes"] <= c["stored_bytes"] <= c["value_bytes"] + 4096  # no Lance compression layer
        raw = sum(-(-n // r) for n in store.table.to_arrow().column("n_tokens").to_pylist()) * store.dim * 2
        assert c["raw_float16_bytes"] == raw
    assert {ix["name"] for ix in info["indices"]} == {"text_idx", "id_idx", "text_digest_idx"}  # the server looks texts up by digest


def test_decode_rows_and_ratio_check(store):
    rows = store.table.to_lance().to_table(columns=["id", "n_tokens", "kalm_r4"])
    mats = decode_rows(rows, 4, store.dim)
    assert [m.shape[0] for m in mats] == [-(-n // 4) for n in rows.column("n_tokens").to_pylist()]
    with pytest.raises(ValueError, match="lack the column 'kalm_r8'"):
        decode_rows(rows, 8, store.dim)
    assert check_ratio_stored(store.metadata, 8) == 8


@pytest.mark.parametrize(("change", "words"), [
    ("schema_version", ["schema version 3", "reads versions [1, 2]"]),
    ("text_digest_type", ["column 'text_digest' is binary, the schema declares fixed_size_binary[8]"]),
    ("listed_ratio_without_column", ["column 'kalm_r16' is missing"]),
    ("n_tokens_type", ["column 'n_tokens' is int64, the schema declares int32"]),
])
def test_open_refuses_a_layout_other_than_the_schema_file(tmp_path, model, change, words):
    """A table whose metadata claims kalm-store but whose layout differs is refused on open, by name."""
    import json

    import lancedb
    import pyarrow as pa

    from kalm_store.plugins.lancedb import KaLMReranker

    good = PassageStore.create(str(tmp_path / "db"), "good", model, ratios=[4])
    meta = dict(good.table.schema.metadata)
    fields = list(good.table.schema)
    if change == "schema_version":
        meta[b"kalm_store.schema_version"] = b"3"
    elif change == "text_digest_type":
        fields = [pa.field("text_digest", pa.binary(), nullable=False) if f.name == "text_digest" else f
                  for f in fields]
    elif change == "listed_ratio_without_column":
        meta[b"kalm_store.ratios"] = json.dumps([4, 16]).encode()
    else:
        fields = [pa.field("n_tokens", pa.int64(), nullable=False) if f.name == "n_tokens" else f for f in fields]
    db = lancedb.connect(str(tmp_path / "db"))
    bad = db.create_table("bad", schema=pa.schema(fields, metadata=meta))
    with pytest.raises(StoreMismatchError) as info:
        PassageStore.open(str(tmp_path / "db"), "bad")
    for w in words:
        assert w in str(info.value), (w, str(info.value))
    with pytest.raises(StoreMismatchError, match="table 'bad'"):  # the reranker checks it before any scoring
        KaLMReranker(model, table=bad)
    assert PassageStore.open(str(tmp_path / "db"), "good").ratios == [4]  # the real layout passes


def test_fingerprint_mismatch_names_the_stored_and_the_loaded_model(model, tmp_path):
    """Only hashes were named: the user could not tell which model to load."""
    from kalm_store import KaLMModel
    from kalm_store.testing import TinyShape, make_test_model

    other = KaLMModel.from_pretrained(make_test_model(tmp_path / "seed7", TinyShape(seed=7)))
    store = PassageStore.create(str(tmp_path / "db"), "docs", model, ratios=[4])
    with pytest.raises(StoreMismatchError) as info:
        PassageStore.open(str(tmp_path / "db"), "docs", model=other)
    msg = str(info.value)
    assert msg.startswith(f"table 'docs' was built by model {model.name_or_path!r}, not by the loaded "
                          f"{other.name_or_path!r} (")
    assert "fingerprint: table has" in msg
    same_weights = type(model)(model.hf_model, model.tokenizer, name_or_path=model.name_or_path, folder=model.folder,
                               max_length=128)
    with pytest.raises(StoreMismatchError, match=r"built by the same model weights .* with another configuration "
                                                 r"\(max_length: table has 1024, model gives 128\)"):
        PassageStore.open(str(tmp_path / "db"), "docs", model=same_weights)
    assert store.table.count_rows() == 0


def test_db_pointing_at_a_table_folder_says_to_pass_its_parent(model, tmp_path, capsys):
    from kalm_store.cli import main

    PassageStore.create(str(tmp_path / "db"), "docs", model, ratios=[4]).add([{"id": "a", "text": "json"}])
    table_dir = tmp_path / "db" / "docs.lance"
    assert (table_dir / "_versions").is_dir()
    with pytest.raises(ValueError, match=rf"db_uri '{table_dir}' is the folder of one table, not a database: pass "
                                         rf"its parent folder '{tmp_path / 'db'}' as db_uri and table='docs'"):
        PassageStore.open(str(table_dir), "docs")
    assert main(["info", "--db", str(table_dir), "--table", "docs"]) == 1
    assert (f"--db '{table_dir}' is the folder of one table, not a database: pass its parent folder "
            f"'{tmp_path / 'db'}' as --db and --table docs") in capsys.readouterr().err


def test_dataset_is_kept_per_version_and_follows_other_writers(store, model, passages, tmp_path):
    """PassageStore.dataset() opens Lance once per table version (a fresh open re-reads every file's metadata,
    8-11 round trips on object storage: tests/test_s3.py); a commit through another handle is seen after
    refresh(), with the new rows' matrices."""
    ds = store.dataset()
    assert store.dataset() is ds and ds.version == store.table.version
    other = PassageStore.open(str(tmp_path / "db"), "docs", model=model)  # another writer, e.g. another process
    other.add([{"id": "new", "text": "a passage written by another handle"}])
    with pytest.raises(MissingRowError, match="new"):  # this handle still reads its version, as before
        store.matrices(["new"], 4)
    store.refresh()
    assert store.dataset() is not ds and store.dataset().version == store.table.version > ds.version
    got = store.matrices(["new", "p0"], 4)
    assert got[0].tobytes() == model.encode(["a passage written by another handle"], 4)[0].tobytes()
    assert got[1].tobytes() == store.matrices(["p0"], 4)[0].tobytes()
