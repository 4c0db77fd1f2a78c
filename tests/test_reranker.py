"""KaLMReranker inside LanceDB: scores equal KaLMModel.score, one output contract, async, refusals."""

from __future__ import annotations

import asyncio

import numpy as np
import pyarrow as pa
import pytest

import lancedb  # a core dependency: never skipped
from lancedb.index import FTS

from kalm_store.codec import CorruptMatrixError
from kalm_store.plugins.lancedb import KaLMReranker, finish_results
from kalm_store.store import PassageStore, StoreMismatchError  # noqa: E402

QUERY = "how do I parse json?"
QVEC = [0.1, -0.2, 0.3, 0.0, 0.5, -0.1, 0.2, 0.05]
TEXTS = [
    "JSON is a data format.",
    "Python is a programming language. Parse the file and return a list of values.",
    "Vector databases store embeddings next to text; a reranker scores each candidate.",
    "Zebras graze quietly near the riverbank at dawn.",
    "Open the file and read its lines, then raise an error if it is empty.",
    "Parse JSON text into Python objects with json loads.",
]


def _records(n: int = 18) -> list[dict]:
    rng = np.random.default_rng(0)
    return [{"id": f"p{i}", "text": f"{TEXTS[i % len(TEXTS)]} (item {i}, json)" if i % 3 else TEXTS[i % len(TEXTS)],
             "vector": rng.normal(size=8).astype(np.float32).tolist()} for i in range(n)]


@pytest.fixture(scope="module")
def store(model, tmp_path_factory):
    db = str(tmp_path_factory.mktemp("rrdb"))
    st = PassageStore.create(db, "docs", model, ratios=[2, 4], vector_dim=8)
    st.add(_records())
    st.table.create_index("text", config=FTS())
    st.db_uri = db  # for the async tests
    return st


def _search(tbl, mode: str, rr, *, limit: int = 50, select: list[str] | None = None, row_id: bool = False):
    if mode == "vector":
        q = tbl.search(QVEC)
    elif mode == "fts":
        q = tbl.search(QUERY, query_type="fts")
    else:
        q = tbl.search(query_type="hybrid").vector(QVEC).text(QUERY)
    if select is not None:
        q = q.select(select)
    if row_id:
        q = q.with_row_id(True)
    q = q.limit(limit)
    q = q.rerank(rr, query_string=QUERY) if mode == "vector" else q.rerank(rr)
    return q.to_arrow()


def _expected(store, model, ids: list[str], ratio: int) -> np.ndarray:
    return model.score(QUERY, store.matrices(ids, ratio))


# ---------------------------------------------------------------------------- scores equal KaLMModel.score
@pytest.mark.parametrize("mode", ["vector", "fts", "hybrid"])
@pytest.mark.parametrize("fetch", ["select", "rowid"])
@pytest.mark.parametrize("ratio", [2, 4])
def test_scores_equal_model_score(store, model, mode, fetch, ratio):
    rr = KaLMReranker(model, table=store.table, ratio=ratio, batch_size=4)
    select = ["id", "text", "n_tokens", f"kalm_r{ratio}"] if fetch == "select" else None
    out = _search(store.table, mode, rr, select=select, row_id=fetch == "rowid")
    assert out.num_rows > 0
    got = out.column("_relevance_score").to_numpy()
    np.testing.assert_allclose(got, _expected(store, model, out.column("id").to_pylist(), ratio), rtol=1e-5, atol=1e-6)


def test_fetch_by_id_when_no_rowid(store, model):
    rr = KaLMReranker(model, table=store.table)
    results = store.table.search(QVEC).select(["id", "text"]).limit(5).to_arrow()
    assert "_rowid" not in results.column_names
    out = rr.rerank_vector(QUERY, results)
    np.testing.assert_allclose(out["_relevance_score"].to_numpy(),
                               _expected(store, model, out["id"].to_pylist(), 2), rtol=1e-5, atol=1e-6)


def test_default_ratio_is_smallest_stored(store, model):
    assert KaLMReranker(model, table=store.table).ratio == 2
    assert KaLMReranker(model, table=store, ratio=4).column == "kalm_r4"  # a PassageStore works as table


# ---------------------------------------------------------------------------- the one output contract
def _check_contract(out: pa.Table, return_score: str, mode: str, keep: bool = False) -> None:
    assert isinstance(out, pa.Table)
    assert out.schema.field("_relevance_score").type == pa.float32()
    scores = out.column("_relevance_score").to_numpy()
    assert np.all(np.diff(scores) <= 0), "not sorted descending"
    assert any(c.startswith("kalm_r") for c in out.column_names) == keep
    first_stage = {"vector": ["_distance"], "fts": ["_score"], "hybrid": ["_distance", "_score"]}[mode]
    for col in first_stage:
        assert (col in out.column_names) == (return_score == "all"), (col, out.column_names)
    if return_score == "relevance":
        assert "_distance" not in out.column_names and "_score" not in out.column_names


@pytest.mark.parametrize("mode", ["vector", "fts", "hybrid"])
@pytest.mark.parametrize("return_score", ["relevance", "all"])
@pytest.mark.parametrize("empty", [False, True])
def test_output_contract(store, model, mode, return_score, empty):
    """Every path x return_score mode, through LanceDB and with empty input, meets one contract."""
    rr = KaLMReranker(model, table=store.table, return_score=return_score)
    if not empty:
        out = _search(store.table, mode, rr, select=["id", "text", "n_tokens", "kalm_r2"], row_id=True)
        assert out.num_rows > 0
        _check_contract(out, return_score, mode)
        return
    # empty input straight into the rerank_* methods (LanceDB's own empty shortcuts bypass rerankers)
    vec = store.table.search(QVEC).with_row_id(True).limit(5).to_arrow().slice(0, 0)
    fts = store.table.search(QUERY, query_type="fts").with_row_id(True).limit(5).to_arrow().slice(0, 0)
    out = {"vector": lambda: rr.rerank_vector(QUERY, vec), "fts": lambda: rr.rerank_fts(QUERY, fts),
           "hybrid": lambda: rr.rerank_hybrid(QUERY, vec, fts)}[mode]()
    assert out.num_rows == 0
    _check_contract(out, return_score, mode)


def test_empty_search_through_lancedb(store, model):
    rr = KaLMReranker(model, table=store.table)
    out = (store.table.search(QVEC).where("id = 'no-such-id'", prefilter=True).limit(10)
           .rerank(rr, query_string=QUERY).to_arrow())
    assert out.num_rows == 0 and "_relevance_score" in out.column_names


def test_keep_matrices(store, model):
    rr = KaLMReranker(model, table=store.table, keep_matrices=True)
    out = _search(store.table, "vector", rr, select=["id", "n_tokens", "kalm_r2"])
    assert "kalm_r2" in out.column_names
    _check_contract(out, "relevance", "vector", keep=True)


def test_finish_results_sorts_and_types():
    t = pa.table({"id": ["a", "b", "c"], "_distance": [0.1, 0.2, 0.3], "kalm_r4": [b"x", b"y", b"z"]})
    out = finish_results(t, np.array([0.2, 0.9, 0.5]), return_score="relevance")
    assert out.column_names == ["id", "_relevance_score"]
    assert out["id"].to_pylist() == ["b", "c", "a"]


def test_k_larger_than_candidates(store, model):
    rr = KaLMReranker(model, table=store.table)
    out = _search(store.table, "vector", rr, limit=1000, row_id=True)
    assert out.num_rows == store.table.count_rows()


# ---------------------------------------------------------------------------- per-call options, batching
def test_per_call_options_do_not_mutate(store, model):
    rr = KaLMReranker(model, table=store.table, batch_size=3)
    res = store.table.search(QVEC).with_row_id(True).limit(8).to_arrow()
    before = rr.score_results(QUERY, res)
    other = rr.score_results(QUERY, res, instruction="Find passages about animals.", batch_size=1)
    assert not np.allclose(before, other)
    assert rr.instruction is None and rr.batch_size == 3
    np.testing.assert_array_equal(rr.score_results(QUERY, res), before)
    np.testing.assert_allclose(rr.score_results(QUERY, res, batch_size=8), before, rtol=1e-5, atol=1e-6)


def test_instruction_reaches_the_prompt(store, model):
    instr = "Find passages about animals."
    rr = KaLMReranker(model, table=store.table, instruction=instr)
    out = _search(store.table, "fts", rr, row_id=True)
    want = model.score(QUERY, store.matrices(out["id"].to_pylist(), 2), instr)
    np.testing.assert_allclose(out["_relevance_score"].to_numpy(), want, rtol=1e-5, atol=1e-6)


def test_table_version_change_is_rechecked(model, tmp_path):
    st = PassageStore.create(str(tmp_path), "grow", model, ratios=[4], vector_dim=8)
    recs = _records(6)
    st.add(recs[:3])
    rr = KaLMReranker(model, table=st.table)
    assert _search(st.table, "vector", rr, row_id=True).num_rows == 3
    st.add(recs[3:])
    assert _search(st.table, "vector", rr, row_id=True).num_rows == 6


# ---------------------------------------------------------------------------- async tables
def test_async_table_all_modes(store, model):
    sync_rr = KaLMReranker(model, table=store.table)
    want = {m: _search(store.table, m, sync_rr, row_id=True) for m in ("vector", "fts", "hybrid")}

    async def main():
        db = await lancedb.connect_async(store.db_uri)
        tbl = await db.open_table("docs")
        rr = KaLMReranker(model, table=tbl)  # AsyncTable handle: metadata and takes run on LanceDB's loop
        vec = await tbl.query().nearest_to(QVEC).with_row_id().limit(50).rerank(rr, query_string=QUERY).to_arrow()
        fts = await tbl.query().nearest_to_text(QUERY).with_row_id().limit(50).rerank(rr).to_arrow()
        hyb = await tbl.query().nearest_to(QVEC).nearest_to_text(QUERY).limit(50).rerank(rr).to_arrow()
        sel = await (tbl.query().nearest_to(QVEC).select(["id", "n_tokens", "kalm_r2"]).limit(50)
                     .rerank(rr, query_string=QUERY).to_arrow())
        return {"vector": vec, "fts": fts, "hybrid": hyb, "select": sel}

    got = asyncio.run(main())
    for mode in ("vector", "fts", "hybrid"):
        a, b = got[mode], want[mode]
        assert sorted(a["id"].to_pylist()) == sorted(b["id"].to_pylist()), mode
        sa = dict(zip(a["id"].to_pylist(), a["_relevance_score"].to_pylist()))
        sb = dict(zip(b["id"].to_pylist(), b["_relevance_score"].to_pylist()))
        assert all(abs(sa[i] - sb[i]) < 1e-5 for i in sa), mode
        _check_contract(a, "relevance", mode)
    np.testing.assert_allclose(got["select"]["_relevance_score"].to_numpy(),
                               _expected(store, model, got["select"]["id"].to_pylist(), 2), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("kwargs, match", [
    ({"return_score": "best"}, r"return_score must be one of \['relevance', 'all'\], got 'best'"),
    ({"batch_size": 0}, "batch_size must be a positive int, got 0"),
    ({"ratio": 3}, r"ratio must be one of \[1, 2, 4, 8, 16, 32\], got 3"),
])
def test_bad_arguments_refused_before_the_table(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        KaLMReranker(model, table=object(), **kwargs)  # the bogus table is never touched


def test_not_a_model_refused(store):
    with pytest.raises(TypeError, match="KaLMModel"):
        KaLMReranker("some/model", table=store.table)


def test_other_model_refused_naming_fingerprint(store, tmp_path):
    from kalm_store import KaLMModel
    from kalm_store.testing import TinyShape, make_test_model

    other = KaLMModel.from_pretrained(make_test_model(tmp_path / "other", TinyShape(seed=1)))
    with pytest.raises(StoreMismatchError, match="fingerprint"):
        KaLMReranker(other, table=store.table)


def test_unstored_ratio_refused(store, model):
    with pytest.raises(StoreMismatchError, match=r"stores ratios \[2, 4\], not r=8"):
        KaLMReranker(model, table=store.table, ratio=8)


def test_plain_table_refused(model, tmp_path):
    tbl = lancedb.connect(str(tmp_path)).create_table("plain", data=[{"id": "a", "text": "x"}])
    with pytest.raises(StoreMismatchError, match="no kalm-store metadata"):
        KaLMReranker(model, table=tbl)


def test_results_without_any_key_refused(store, model):
    rr = KaLMReranker(model, table=store.table)
    res = store.table.search(QVEC).select(["n_tokens"]).limit(3).to_arrow()
    with pytest.raises(ValueError, match=r"with_row_id\(True\)"):
        rr.rerank_vector(QUERY, res)


@pytest.mark.parametrize("mode", ["vector", "fts"])
def test_text_only_results_reranked_by_text_digest(store, model, mode):
    """A search that selected only `text` (no _rowid, no id): its rows are found by their text digest."""
    rr = KaLMReranker(model, table=store.table)
    out = _search(store.table, mode, rr, select=["text"])
    assert out.num_rows > 0 and "id" not in out.column_names
    by_text = dict(zip(store.table.to_arrow().column("text").to_pylist(), store.table.to_arrow().column("id").to_pylist()))
    ids = [by_text[t] for t in out.column("text").to_pylist()]
    np.testing.assert_allclose(out.column("_relevance_score").to_numpy(), _expected(store, model, ids, rr.ratio),
                               rtol=1e-5, atol=1e-6)


def test_text_only_results_of_unknown_text_refused(store, model):
    rr = KaLMReranker(model, table=store.table)
    res = pa.table({"text": ["a passage this table never stored"]})
    with pytest.raises(KeyError, match="never stored"):
        rr.rerank_fts(QUERY, res)


def _other_table(model, tmp_path, texts=None):
    """A second store of the same model whose rows sit at the same _rowids as `store`'s, other passages."""
    recs = _records()
    recs = [dict(r, id=f"q{i}", text=(texts or {}).get(i, f"other passage {i} about zebras")) for i, r in enumerate(recs)]
    st = PassageStore.create(str(tmp_path), "other", model, ratios=[2, 4], vector_dim=8)
    st.add(recs)
    st.table.create_index("text", config=FTS())
    return st


@pytest.mark.parametrize("select", [None, ["id"], ["text"], ["id", "text"]])
def test_reranker_refuses_results_of_another_table(store, model, tmp_path, select):
    """A reranker bound to table A, handed table B's results fetched by _rowid, must not score A's rows."""
    other = _other_table(model, tmp_path)
    rr = KaLMReranker(model, table=store.table)
    q = other.table.search(QVEC).with_row_id(True)
    if select is not None:
        q = q.select(select)
    res = q.limit(5).to_arrow().drop_columns([c for c in ("kalm_r2", "kalm_r4") if c in q.limit(1).to_arrow().column_names])
    with pytest.raises(StoreMismatchError, match="not the search results' rows"):
        rr.rerank_vector(QUERY, res)


def test_reranker_refuses_same_ids_with_other_texts(store, model, tmp_path):
    """Fetched by id: table B reuses A's ids for other texts; the text comparison refuses it."""
    other = PassageStore.create(str(tmp_path), "same_ids", model, ratios=[2, 4], vector_dim=8)
    other.add([dict(r, text=f"another text {i}") for i, r in enumerate(_records())])
    rr = KaLMReranker(model, table=store.table)
    res = other.table.search(QVEC).select(["id", "text"]).limit(5).to_arrow()
    with pytest.raises(StoreMismatchError, match="result text 'another text"):
        rr.rerank_vector(QUERY, res)


def test_results_with_only_rowid_refused(store, model):
    rr = KaLMReranker(model, table=store.table)
    res = store.table.search(QVEC).with_row_id(True).select(["n_tokens"]).limit(3).to_arrow()
    with pytest.raises(ValueError, match="select 'id' or 'text'"):
        rr.rerank_vector(QUERY, res)


def test_vector_rerank_needs_a_string_query(store, model):
    rr = KaLMReranker(model, table=store.table)
    with pytest.raises(TypeError, match="query_string"):
        rr.rerank_vector(None, store.table.search(QVEC).with_row_id(True).limit(3).to_arrow())


@pytest.mark.parametrize("fetch", ["select", "rowid"])
@pytest.mark.parametrize("bad", ["null", "garbage"])
def test_missing_or_corrupt_matrix_names_the_id(model, tmp_path, fetch, bad):
    st = PassageStore.create(str(tmp_path), "bad", model, ratios=[4], vector_dim=8)
    recs = _records(4)
    rows = st.encode_records(recs)
    blobs = rows.column("kalm_r4").to_pylist()
    blobs[2] = None if bad == "null" else b"not a zstd frame"
    i = rows.column_names.index("kalm_r4")
    st.table.add(rows.set_column(i, rows.schema.field(i), pa.array(blobs, pa.large_binary())))
    rr = KaLMReranker(model, table=st.table)
    select = ["id", "n_tokens", "kalm_r4"] if fetch == "select" else None
    with pytest.raises(CorruptMatrixError, match="passage id 'p2'"):
        _search(st.table, "vector", rr, select=select, row_id=fetch == "rowid")


def test_deleted_candidate_names_the_id(model, tmp_path):
    st = PassageStore.create(str(tmp_path), "gone", model, ratios=[4], vector_dim=8)
    st.add(_records(4))
    rr = KaLMReranker(model, table=st.table)
    res = st.table.search(QVEC).with_row_id(True).select(["id"]).limit(4).to_arrow()
    st.table.delete("id = 'p1'")
    with pytest.raises(KeyError, match="p1"):
        rr.rerank_vector(QUERY, res)


# ---------------------------------------------------------------------------- on_stale="skip"
@pytest.fixture()
def stale_store(model, tmp_path):
    """A store whose row p3 had its text changed by LanceDB's own update (its matrix is of the old text)."""
    st = PassageStore.create(str(tmp_path), "stale", model, ratios=[4], vector_dim=8)
    st.add(_records(8))
    st.table.create_index("text", config=FTS())
    st.table.update(where="id = 'p3'", values={"text": "zeppelins drift over the harbour, json"})
    return st


def test_on_stale_default_still_refuses(stale_store, model):
    from kalm_store.store import StaleMatrixError

    rr = KaLMReranker(model, table=stale_store.table)
    with pytest.raises(StaleMatrixError, match="p3"):
        _search(stale_store.table, "vector", rr, select=["text"] + rr.columns)


@pytest.mark.parametrize("mode", ["vector", "fts", "hybrid"])
@pytest.mark.parametrize("fetch", ["select", "rowid", "text"])
def test_on_stale_skip_drops_and_names_them(stale_store, model, mode, fetch):
    from kalm_store.plugins.lancedb import StaleCandidatesWarning

    rr = KaLMReranker(model, table=stale_store.table, on_stale="skip")
    select = {"select": ["text"] + rr.columns, "rowid": ["id"], "text": ["text"]}[fetch]
    with pytest.warns(StaleCandidatesWarning, match=r"left out 1 stale candidate of table 'stale': passage id \['p3'\]"):
        out = _search(stale_store.table, mode, rr, select=select, row_id=fetch == "rowid")
    rows = stale_store.table.to_arrow()
    id_of = dict(zip(rows.column("text").to_pylist(), rows.column("id").to_pylist()))
    ids = out.column("id").to_pylist() if "id" in out.column_names else [id_of[t] for t in out.column("text").to_pylist()]
    assert "p3" not in ids and len(ids) == 7
    np.testing.assert_allclose(out.column("_relevance_score").to_numpy(),
                               model.score(QUERY, stale_store.matrices(ids, 4)), rtol=1e-5, atol=1e-6)
    assert np.all(np.diff(out.column("_relevance_score").to_numpy()) <= 0)


def test_on_stale_skip_score_results_gives_nan_for_stale_rows(stale_store, model):
    from kalm_store.plugins.lancedb import StaleCandidatesWarning

    rr = KaLMReranker(model, table=stale_store.table, on_stale="skip")
    res = stale_store.table.search().select(["text"] + rr.columns).limit(10).to_arrow()
    with pytest.warns(StaleCandidatesWarning):
        scores = rr.score_results(QUERY, res)
    ids = res.column("id").to_pylist()
    assert np.isnan(scores[ids.index("p3")]) and np.isfinite(np.delete(scores, ids.index("p3"))).all()


def test_on_stale_skip_all_stale_gives_empty_results(stale_store, model):
    from kalm_store.plugins.lancedb import StaleCandidatesWarning

    rr = KaLMReranker(model, table=stale_store.table, on_stale="skip")
    res = stale_store.table.search().where("id = 'p3'").select(["text"] + rr.columns).limit(10).to_arrow()
    with pytest.warns(StaleCandidatesWarning):
        out = rr.rerank_table(QUERY, res)
    assert out.num_rows == 0 and out.column("_relevance_score").type == pa.float32()


def test_on_stale_checked(store, model):
    with pytest.raises(ValueError, match="on_stale must be one of"):
        KaLMReranker(model, table=store.table, on_stale="ignore")


def test_selected_matrices_of_a_table_built_by_another_model_refused(store, model, tmp_path):
    from kalm_store import KaLMModel
    from kalm_store.testing import TinyShape, make_test_model

    other_model = KaLMModel.from_pretrained(make_test_model(tmp_path / "seed3", TinyShape(seed=3)))
    other = PassageStore.create(str(tmp_path / "db"), "theirs", other_model, ratios=[2, 4], vector_dim=8)
    other.add(_records(4))
    rr = KaLMReranker(model, table=store.table, ratio=4)
    res = other.table.search(QVEC).select(["text"] + rr.columns).limit(4).to_arrow()
    with pytest.raises(StoreMismatchError, match="the table of these search results was built by model"):
        rr.rerank_vector(QUERY, res)
