"""kalm-store repool: a coarser ratio derived from a stored one equals encoding at it; nothing else moves."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from kalm_store import schema
from kalm_store.repool import RepoolError, drop_ratio, repool_store, set_ratios

WORDS = "the quick brown fox jumps over lazy dog python file read values list return error passage json".split()


def corpus(n: int = 40, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"id": f"p{i}", "text": " ".join(rng.choice(WORDS, int(rng.integers(1, 80)))),
             "vector": rng.standard_normal(8).astype(np.float32).tolist()} for i in range(n)]


def make_store(model, path, ratios):
    from kalm_store import PassageStore

    store = PassageStore.create(str(path), "docs", model, ratios=ratios, vector_dim=8)
    store.add(corpus(), batch_size=16)
    store.add([dict(r, id="x" + r["id"]) for r in corpus(10, seed=1)])  # a second fragment
    from lancedb.index import BTree

    store.table.create_index("id", config=BTree())
    return store


def other_files(ds, skip_field_ids: set[int]) -> list[tuple[int, str]]:
    """Data files holding any field but ``skip_field_ids``, per fragment."""
    return sorted((fr.fragment_id, df.path) for fr in ds.get_fragments() for df in fr.data_files()
                  if set(df.fields) - skip_field_ids)


def assert_close_fp16(got: list[np.ndarray], want: list[np.ndarray]) -> None:
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == np.float16
        g32, w32 = g.astype(np.float32), w.astype(np.float32)
        # both are one float16 rounding of the same float32 mean (plus the rounding of the source ratio)
        np.testing.assert_allclose(g32, w32, rtol=2 * 2.0**-10, atol=2.0**-12 * max(1.0, float(np.abs(w32).max())))


@pytest.mark.parametrize("src, dst", [(2, 8), (1, 32)])
def test_repooled_column_equals_encoding_at_the_coarser_ratio(model, tmp_path, src, dst) -> None:
    store = make_store(model, tmp_path, [src])
    ds = store.table.to_lance()
    before_files = other_files(ds, set())
    indices = [ix.name for ix in store.table.list_indices()]
    version = store.table.version

    result = repool_store(store, src, dst, batch_size=7)

    assert result.rows == 50 and result.ratios == [src, dst] and store.ratios == [src, dst]
    assert result.version > version
    ids = [f"p{i}" for i in range(40)] + [f"xp{i}" for i in range(10)]
    texts = [r["text"] for r in corpus()] + [r["text"] for r in corpus(10, seed=1)]
    assert_close_fp16(store.matrices(ids, dst), model.encode(texts, ratio=dst))
    # the new field is a kalm_r* field like the others: Lance compression off
    assert store.table.schema.field(schema.column_name(dst)).metadata == schema.ratio_field(dst).metadata
    # nothing else was rewritten: the old data files are all still there, the index too
    ds = store.table.to_lance()
    new_field = ds.schema.get_field_index(schema.column_name(dst))
    assert other_files(ds, set()) != before_files  # new files were written...
    dst_id = next(f.id() for f in ds.lance_schema.fields() if f.name() == schema.column_name(dst))
    assert other_files(ds, {dst_id}) == before_files  # ...only for the new column
    assert new_field >= 0 and [ix.name for ix in store.table.list_indices()] == indices
    info = store.info()
    assert info["columns"][schema.column_name(dst)]["stored_bytes"] > 0


def test_refusals(model, tmp_path) -> None:
    store = make_store(model, tmp_path, [4, 8])
    with pytest.raises(RepoolError, match="finer.*never be\\s+recovered"):
        repool_store(store, 8, 4)
    with pytest.raises(RepoolError, match="nothing to do"):
        repool_store(store, 4, 4)
    with pytest.raises(RepoolError, match="not the source r=2"):
        repool_store(store, 2, 16)
    again = repool_store(store, 4, 8)  # a finished run, run again: not an error, nothing written
    assert again.nothing_to_do and again.rows == again.filled == 0 and again.ratios == [4, 8]
    with pytest.raises(ValueError, match="to_ratio must be one of"):
        repool_store(store, 4, 12)
    version = store.table.version
    store.table.checkout_latest()
    assert store.table.version == version  # refusals wrote nothing


def test_drop_source_and_last_ratio(model, tmp_path) -> None:
    store = make_store(model, tmp_path, [4])
    result = repool_store(store, 4, 16, drop_source=True)
    assert result.dropped == 4 and store.ratios == [16]
    assert "kalm_r4" not in store.table.schema.names
    assert len(store.matrices(["p0", "p1"], 16)) == 2
    with pytest.raises(RepoolError, match="only ratio"):
        drop_ratio(store, 16)


def test_interrupted_run_is_finished_by_running_again(model, tmp_path) -> None:
    store = make_store(model, tmp_path, [2])
    repool_store(store, 2, 4)
    set_ratios(store.table, [2])  # as if the process died between add_columns and the metadata commit
    assert store.ratios == [2] and "kalm_r4" in store.table.schema.names
    again = repool_store(store, 2, 4)
    assert again.rows == 0 and store.ratios == [2, 4]


def test_an_interrupted_drop_source_run_is_finished_by_the_same_command(model, tmp_path, capsys) -> None:
    """Killed between the metadata commit (r=4 no longer listed) and the column drop, the source column
    stays on disk. Before: the same command exited 1 ("not the source r=4"). Now it drops the column;
    run once more, and a finished run without --drop-source, it exits 0 with "nothing to do"."""
    from kalm_store.cli import main

    store = make_store(model, tmp_path, [4])
    repool_store(store, 4, 8)
    set_ratios(store.table, [8])  # the kill: drop_ratio's metadata commit landed, drop_columns did not
    assert "kalm_r4" in store.table.schema.names and store.ratios == [8]
    argv = ["repool", "--db", str(tmp_path), "--table", "docs", "--from", "4", "--to", "8", "--drop-source"]
    assert main(argv) == 0
    assert "completed an interrupted re-pool to r=8; dropped r=4" in capsys.readouterr().out
    store.refresh()
    assert "kalm_r4" not in store.table.schema.names and store.ratios == [8]
    assert len(store.matrices(["p0", "p1"], 8)) == 2
    assert main(argv) == 0
    assert capsys.readouterr().out.startswith("nothing to do: table 'docs' stores r=8 for every row")

    other = make_store(model, tmp_path / "b", [2])
    argv = ["repool", "--db", str(tmp_path / "b"), "--table", "docs", "--from", "2", "--to", "4"]
    assert main(argv) == 0 and "re-pooled 50 rows" in capsys.readouterr().out
    other.refresh()
    version = other.table.version
    assert main(argv) == 0 and "nothing to do" in capsys.readouterr().out
    other.refresh()
    assert other.table.version == version  # the second run wrote nothing


def test_an_update_during_an_unfinished_repool_leaves_null_which_repool_fills(model, tmp_path, capsys) -> None:
    """A replaced row must not keep the old text's matrix in a ratio column its writer does not list:
    it holds null there (reads and `verify` name it), and running the repool again re-derives it, as
    it does for rows appended by writers unaware of the ratio."""
    from kalm_store.cli import main
    from kalm_store.codec import CorruptMatrixError, encode_matrix, to_float16
    from kalm_store.pooling import repool
    from kalm_store.verify import verify_store

    store = make_store(model, tmp_path, [2])
    repool_store(store, 2, 4)
    old_r4 = store.table.to_lance().to_table(columns=["kalm_r4"], filter="id = 'p1'").column(0)[0].as_py()
    set_ratios(store.table, [2])  # kalm_r4 written, not listed: the writer below encodes r=2 only
    assert store.upsert([dict(corpus()[1], text="an edited passage about json files")]) == 1
    assert store.add([{"id": "late", "text": "appended by a writer unaware of r=4", "vector": [0.0] * 8}]) == 1
    nulls = store.table.to_lance().to_table(columns=["id"], filter="kalm_r4 IS NULL").column(0).to_pylist()
    assert sorted(nulls) == ["late", "p1"]
    set_ratios(store.table, [2, 4])  # as another process's repool would list it
    with pytest.raises(CorruptMatrixError, match=r"passage id 'p1', column kalm_r4: no stored matrix \(null value\)"):
        store.matrices(["p1"], 4)
    report = verify_store(store)
    assert report.columns["kalm_r4"].bad == 2 and report.columns["text"].bad == 0

    assert main(["repool", "--db", str(tmp_path), "--table", "docs", "--from", "2", "--to", "4"]) == 0
    assert "re-derived 2 rows that held null at r=4" in capsys.readouterr().out
    store.refresh()
    assert verify_store(store).ok
    got = store.table.to_lance().to_table(columns=["id", "n_tokens", "kalm_r4"], filter="id = 'p1'").to_pylist()[0]
    want = repool(store.matrices(["p1"], 2)[0], got["n_tokens"], 2, 4)  # from the edited text's own r=2 matrix
    assert got["kalm_r4"] == encode_matrix(to_float16(want)) and got["kalm_r4"] != old_r4
    assert repool_store(store, 2, 4).nothing_to_do  # nothing left to fill


def test_fill_skips_a_row_replaced_since_it_was_read(model, tmp_path) -> None:
    """The fill writes only where the text digest is still the one it read."""
    from kalm_store.repool import fill_nulls

    store = make_store(model, tmp_path, [2])
    repool_store(store, 2, 4)
    set_ratios(store.table, [2])
    store.upsert([dict(corpus()[3], text="edited once")])
    set_ratios(store.table, [2, 4])
    real = store.table.merge_insert

    def replaced_meanwhile(on):  # another writer replaces p3 between the fill's read and its write
        del store.table.merge_insert  # once
        set_ratios(store.table, [2])
        store.upsert([dict(corpus()[3], text="edited twice")])
        set_ratios(store.table, [2, 4])
        return real(on)

    store.table.merge_insert = replaced_meanwhile
    assert fill_nulls(store, 2, 4) == 0
    assert "merge_insert" not in vars(store.table)  # the race really ran
    row = store.table.to_lance().to_table(columns=["text", "kalm_r4"], filter="id = 'p3'").to_pylist()[0]
    assert row == {"text": "edited twice", "kalm_r4": None}  # not the matrix derived from "edited once"
    assert fill_nulls(store, 2, 4) == 1


def test_cli_repool(model, tmp_path, capsys) -> None:
    from kalm_store.cli import main

    make_store(model, tmp_path, [1])
    assert main(["repool", "--db", str(tmp_path), "--table", "docs", "--from", "1", "--to", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ratios"] == [1, 2] and out["rows"] == 50
    # the refusal comes before any table is opened (the db does not even exist)
    assert main(["repool", "--db", str(tmp_path / "nope"), "--table", "t", "--from", "8", "--to", "4"]) == 1
    err = capsys.readouterr().err
    assert "finer r=4" in err and "encode the passages again into a new table" in err


def test_null_values_stay_null(model, tmp_path) -> None:
    """A null source value (a row whose matrix is missing) gives a null, not a crash."""
    import lance

    store = make_store(model, tmp_path, [1])
    ds = store.table.to_lance()
    ds.update({"kalm_r1": "NULL"}, where="id = 'p3'")
    store.table.checkout_latest()
    repool_store(store, 1, 2)
    got = lance.dataset(ds.uri).to_table(columns=["id", "kalm_r2"], filter="id = 'p3'")
    assert got.column("kalm_r2").null_count == 1
    assert isinstance(got.column("kalm_r2").type, type(pa.large_binary()))


def test_a_lost_commit_race_derives_again_from_the_latest_version(model, tmp_path, monkeypatch):
    """Deterministic form of the concurrent-append case: the first add_columns commit loses to a writer
    whose rows landed meanwhile; the retry re-derives from the latest version, appended rows included."""
    import lance
    from lance.commit import CommitConflictError

    store = make_store(model, tmp_path / "db", [4])
    real = lance.LanceDataset.add_columns
    calls = []

    def racing(self, *args, **kwargs):
        calls.append(self.version)
        if len(calls) == 1:  # a concurrent build commits its chunk first
            store.add([dict(r, id="late" + r["id"]) for r in corpus(6, seed=2)])
            raise CommitConflictError("Retryable commit conflict for version 4: a concurrent append won")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(lance.LanceDataset, "add_columns", racing)
    result = repool_store(store, 4, 8, batch_size=16)
    assert result.conflicts == 1 and len(calls) == 2 and calls[1] > calls[0]
    assert result.rows == 56 and result.ratios == [4, 8]
    ids = store.table.to_arrow().column("id").to_pylist()
    assert sum(i.startswith("late") for i in ids) == 6
    assert_close_fp16(store.matrices(ids, 8), model.encode(store.table.to_arrow().column("text").to_pylist(), 8))
