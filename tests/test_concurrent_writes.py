"""Writers racing each other (issue 14 items 1, 3, 4, 5, 11) and `kalm-store optimize`, made deterministic:
the other writer's commit is run at the exact moment between one writer's read and its commit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from kalm_store.build import BuildOptions, build

WORDS = "the quick brown fox jumps over lazy dog python file read values list return error passage json".split()


def corpus(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"id": f"p{i}", "text": " ".join(rng.choice(WORDS, int(rng.integers(2, 40))))} for i in range(n)]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def options(tmp_path: Path, inp: Path, model_dir: Path, **kw) -> BuildOptions:
    kw.setdefault("chunk_size", 8)
    return BuildOptions(input=str(inp), db=str(tmp_path / "db"), table="docs", model=str(model_dir),
                        progress=False, **kw)


def cli(argv: list[str], capsys) -> tuple[int, str, str]:
    from kalm_store.cli import main

    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def stored_ids(store) -> list[str]:
    store.refresh()
    return store.table.to_lance().to_table(columns=["id"]).column(0).to_pylist()


def fire_once_inside(monkeypatch, table, method: str, action) -> list[bool]:
    """Run ``action`` once, right after the first call of ``table.<method>`` from now on."""
    fired: list[bool] = []
    original = getattr(table, method)

    def wrapped(*args, **kwargs):
        out = original(*args, **kwargs)
        if not fired:
            fired.append(True)
            action()
        return out

    monkeypatch.setattr(table, method, wrapped)
    return fired


# ------------------------------------------------------------------ item 1: an update racing a repool
def test_a_row_replaced_while_repool_adds_a_ratio_holds_null_there(model, tmp_path, monkeypatch):
    """The repool's add_columns commits between the writer's read of the table and its merge-insert.
    Before: the replaced row kept its old text's kalm_r8 beside the new text and digest (verify passed it,
    reads scored it, no repair saw it). Now it holds null at r=8, which verify names and repool re-derives
    from the new text's r=4 matrix."""
    from kalm_store.codec import CorruptMatrixError, encode_matrix, to_float16
    from kalm_store.pooling import repool
    from kalm_store.repool import repool_store
    from kalm_store.store import PassageStore
    from kalm_store.verify import verify_store

    db = str(tmp_path / "db")
    store = PassageStore.create(db, "docs", model, ratios=[4])
    store.add(corpus(12))
    other = PassageStore.open(db, "docs")  # the repool's own handle, as in another process
    new_text = "an edited passage about json files and the values they hold"
    rows = store.encode_records([{"id": "p3", "text": new_text}])  # r=4 only: the writer knows no r=8
    old_r8 = None

    def repool_now():
        nonlocal old_r8
        repool_store(other, 4, 8)
        old_r8 = other.table.to_lance().to_table(columns=["kalm_r8"], filter="id = 'p3'").column(0)[0].as_py()

    fired = fire_once_inside(monkeypatch, store.table, "checkout_latest", repool_now)
    store.write(rows, replace=True)
    assert fired and old_r8 is not None

    store.refresh()
    got = store.table.to_lance().to_table(columns=["id", "text", "kalm_r8"], filter="id = 'p3'").to_pylist()
    assert got == [{"id": "p3", "text": new_text, "kalm_r8": None}]  # not old_r8
    with pytest.raises(CorruptMatrixError, match=r"passage id 'p3', column kalm_r8: no stored matrix"):
        store.matrices(["p3"], 8)
    report = verify_store(store)
    assert report.columns["kalm_r8"].bad == 1 and report.columns["kalm_r8"].examples[0][0] == "p3"

    assert repool_store(other, 4, 8).filled == 1  # the documented repair: run the same repool again
    store.refresh()
    row = store.table.to_lance().to_table(columns=["n_tokens", "kalm_r8"], filter="id = 'p3'").to_pylist()[0]
    want = repool(store.matrices(["p3"], 4)[0], row["n_tokens"], 4, 8)  # from the new text's own matrix
    assert row["kalm_r8"] == encode_matrix(to_float16(want)) != old_r8
    assert verify_store(store).ok


# ------------------------------------------------------------------ item 4: a build during a repool
def test_a_build_finishes_its_chunks_when_a_repool_commits_during_it(model, tiny_model_dir, tmp_path):
    """Before: `KeyError: 8` from the chunk after the repool's commit. Now the build finishes; its later
    rows hold null at the new ratio (as documented for writers unaware of it) and repool fills them."""
    from kalm_store.repool import repool_store
    from kalm_store.store import PassageStore
    from kalm_store.verify import verify_store

    records = corpus(40, seed=1)
    inp = write_jsonl(tmp_path / "c.jsonl", records)
    done: list[int] = []

    def repool_after_first_commit(summary):
        if not done:
            done.append(summary.written)
            repool_store(PassageStore.open(str(tmp_path / "db"), "docs"), 4, 8)

    summary = build(options(tmp_path, inp, tiny_model_dir, fts_index=False), model=model,
                    on_commit=repool_after_first_commit)
    assert done == [8] and summary.written == 40 and summary.rows == 40
    store = PassageStore.open(str(tmp_path / "db"), "docs")
    assert store.ratios == [4, 8]
    rows = store.table.to_lance().to_table(columns=["id", "kalm_r8"])
    nulls = sorted(pid for pid, v in zip(rows.column("id").to_pylist(), rows.column("kalm_r8").to_pylist()) if v is None)
    assert nulls == sorted(r["id"] for r in records[8:])  # every row the build wrote after the repool
    assert verify_store(store).columns["kalm_r8"].bad == 32
    assert repool_store(store, 4, 8).filled == 32
    assert verify_store(store).ok


# ------------------------------------------------------------------ item 3: two builds into one table
def test_two_builds_of_one_input_store_each_id_once(model, tiny_model_dir, tmp_path):
    """A second build runs to its end while the first is between its first and second commit, both having
    read the stored ids at start. Before: every id after the first chunk was stored twice. Now the
    first build's later commits insert only ids still absent, and count the others as already stored."""
    from kalm_store.store import PassageStore

    records = corpus(48, seed=2)
    inp = write_jsonl(tmp_path / "c.jsonl", records)
    inner: list = []

    def second_build(summary):
        if not inner:
            inner.append(build(options(tmp_path, inp, tiny_model_dir, fts_index=False), model=model))

    first = build(options(tmp_path, inp, tiny_model_dir, fts_index=False), model=model, on_commit=second_build)
    (second,) = inner
    assert second.written == 40 and second.already_stored == 8
    assert first.written == 8 and first.already_stored == 40  # its later chunks were stored by the second
    ids = stored_ids(PassageStore.open(str(tmp_path / "db"), "docs"))
    assert sorted(ids) == sorted(r["id"] for r in records) and len(ids) == len(set(ids)) == 48
    assert first.rows == 48


def test_concurrent_inserts_of_one_id_keep_the_first_committed_copy(model, tmp_path, monkeypatch):
    """Lance commits two concurrent inserts of one key both (pylance 14 detects no conflict), so the
    later writer, seeing other commits between its read and its own, deletes its extra copies."""
    import kalm_store.commit as commit
    from kalm_store.store import PassageStore

    db = str(tmp_path / "db")
    store = PassageStore.create(db, "docs", model, ratios=[4])
    store.add(corpus(6))
    other = PassageStore.open(db, "docs")
    rows = store.encode_records([{"id": "n1", "text": "first writer's text"}, {"id": "n2", "text": "two"}])
    theirs = store.encode_records([{"id": "n1", "text": "other writer's text"}])
    complete = commit.complete_rows
    fired: list = []

    def other_commits_first(*args, **kwargs):  # after our read of version V, before our merge runs on it
        if not fired:
            fired.append(None)  # before: the other writer's own commit passes here too
            fired[0] = other.write(theirs)
        return complete(*args, **kwargs)

    monkeypatch.setattr(commit, "complete_rows", other_commits_first)
    result = store.write(rows)
    assert fired[0].inserted == 1
    # our copy of n1 was the one deleted: we stored only n2, n1 counts as skipped (another writer first)
    assert (result.inserted, result.skipped, result.duplicates_removed) == (1, 1, 1)
    store.refresh()
    got = store.table.to_lance().to_table(columns=["id", "text"], filter="id IN ('n1', 'n2')").to_pylist()
    assert sorted((r["id"], r["text"]) for r in got) == [("n1", "other writer's text"), ("n2", "two")]


def test_verify_names_duplicate_ids_and_optimize_dedupe_removes_them(model, tmp_path, capsys):
    """Duplicates stored by an older kalm-store (or a writer killed between its commit and its check):
    verify exits 3 naming them and the repair; optimize counts them, --dedupe keeps the first copy."""
    from kalm_store.store import PassageStore

    db = str(tmp_path / "db")
    store = PassageStore.create(db, "docs", model, ratios=[4])
    store.add(corpus(10))
    store.update_indices()
    again = store.encode_records([dict(r, text="a later copy") for r in corpus(10)[2:5]])
    store.table.add(again)  # what two racing builds left before: plain appends
    code, out, _ = cli(["verify", "--db", db, "--table", "docs", "--no-progress"], capsys)
    assert code == 3
    assert "duplicated 3" in out and "p2: stored 2 times" in out
    assert f"kalm-store optimize --db {db} --table docs --dedupe" in out

    code, out, _ = cli(["optimize", "--db", db, "--table", "docs"], capsys)
    assert code == 0 and "3 duplicate-id copies kept (run again with --dedupe" in out
    assert len(stored_ids(store)) == 13
    code, out, _ = cli(["optimize", "--db", db, "--table", "docs", "--dedupe", "--json"], capsys)
    result = json.loads(out)
    assert code == 0 and result["duplicates_removed"] == 3 and result["rows"] == 10
    store.refresh()
    texts = dict(zip(*[store.table.to_lance().to_table(columns=["id", "text"]).column(c).to_pylist()
                       for c in ("id", "text")]))
    assert texts == {r["id"]: r["text"] for r in corpus(10)}  # the first committed copies stayed
    assert cli(["verify", "--db", db, "--table", "docs", "--no-progress"], capsys)[0] == 0


def test_index_creation_retries_a_retryable_commit_conflict(model, tmp_path, monkeypatch):
    """Another writer committing while the index is built makes Lance refuse the index commit as a
    retryable conflict (LanceDB raises it as RuntimeError("lance error: Retryable commit conflict ...")).
    Before: a traceback at the end of a build. Now the index is created again from the latest version."""
    from kalm_store.store import PassageStore

    store = PassageStore.create(str(tmp_path / "db"), "docs", model, ratios=[4])
    store.add(corpus(10))
    calls: list[str] = []
    create = store.table.create_index

    def conflict_once(column, **kwargs):
        calls.append(column)
        if len(calls) == 1:
            store.add([{"id": "late", "text": "appended by another writer meanwhile"}])
            raise RuntimeError("lance error: Retryable commit conflict for version 4: This CreateIndex "
                               "transaction was preempted by concurrent transaction Append at version 4. "
                               "Please retry.")
        return create(column, **kwargs)

    monkeypatch.setattr(store.table, "create_index", conflict_once)
    assert store.update_indices() == ["text_idx", "id_idx", "text_digest_idx"]
    assert calls == ["text", "text", "id", "text_digest"]
    store.refresh()
    assert {ix.name: ix.num_unindexed_rows for ix in store.table.list_indices()} == \
        {"text_idx": 0, "id_idx": 0, "text_digest_idx": 0}


# ------------------------------------------------------------------ item 5: killed while creating the table
def test_a_table_folder_without_a_version_is_started_anew(model, tiny_model_dir, tmp_path, capsys):
    """A SIGKILL between LanceDB's first write and its first commit leaves `docs.lance/_transactions/`
    only. Before: every later command, the same build included, failed. Now other commands say what
    happened and what to do, and the same build starts the table anew."""
    from kalm_store.store import PassageStore

    records = corpus(12, seed=3)
    inp = write_jsonl(tmp_path / "c.jsonl", records)
    build(options(tmp_path, inp, tiny_model_dir, fts_index=False), model=model)
    folder = tmp_path / "db" / "docs.lance"
    for child in folder.iterdir():  # what the kill leaves: the transaction file, no version
        if child.name != "_transactions":
            shutil.rmtree(child)
    assert [p.name for p in folder.iterdir()] == ["_transactions"]

    code, _, err = cli(["info", "--db", str(tmp_path / "db"), "--table", "docs"], capsys)
    assert code == 1 and "holds no committed version" in err and "run that build again" in err
    summary = build(options(tmp_path, inp, tiny_model_dir, fts_index=False), model=model)
    assert summary.written == summary.rows == 12
    assert sorted(stored_ids(PassageStore.open(str(tmp_path / "db"), "docs"))) == sorted(r["id"] for r in records)


# ------------------------------------------------------------------ item 11 / optimize: indices
@pytest.mark.parametrize("damage", ["removed", "truncated"])
def test_verify_names_a_damaged_index_and_optimize_rebuilds_it(model, tmp_path, capsys, damage):
    from kalm_store.store import PassageStore

    db = str(tmp_path / "db")
    store = PassageStore.create(db, "docs", model, ratios=[4])
    store.add(corpus(20))
    store.update_indices()
    store.refresh()
    fts_uuid = next(ix for ix in store.table.to_lance().describe_indices() if ix.name == "text_idx")
    folders = sorted((tmp_path / "db" / "docs.lance" / "_indices").iterdir())
    assert len(folders) == 3 and fts_uuid
    for folder in folders:  # all three indices (text, id, text_digest)
        for f in folder.iterdir():
            if damage == "removed":
                f.unlink()
            else:
                f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    code, out, _ = cli(["verify", "--db", db, "--table", "docs", "--no-progress"], capsys)
    assert code == 3
    assert "index text_idx on ['text'] cannot be read" in out and "index id_idx on ['id'] cannot be read" in out
    assert "index text_digest_idx on ['text_digest'] cannot be read" in out
    assert f"`kalm-store optimize --db {db} --table docs` creates it anew" in out

    code, out, _ = cli(["optimize", "--db", db, "--table", "docs", "--json"], capsys)
    result = json.loads(out)
    assert code == 0 and sorted(result["indices_rebuilt"]) == ["id_idx", "text_digest_idx", "text_idx"]
    assert cli(["verify", "--db", db, "--table", "docs", "--no-progress"], capsys)[0] == 0
    store = PassageStore.open(db, "docs")
    hits = store.table.search(corpus(20)[0]["text"].split()[0], query_type="fts").limit(3).to_list()
    assert hits  # the full-text index answers again
    assert store.table.to_lance().count_rows(filter="id = 'p7'") == 1


def test_optimize_creates_missing_indices_compacts_and_removes_old_versions(model, tiny_model_dir, tmp_path, capsys):
    """A build stopped by an error commits its rows but not its indices; optimize creates them, and after
    deletions compacts the fragments and removes the old versions (their bytes leave the disk)."""
    records = corpus(30, seed=5)
    inp = write_jsonl(tmp_path / "c.jsonl", records)
    build(options(tmp_path, inp, tiny_model_dir, fts_index=False, id_index=False, chunk_size=5), model=model)
    db = str(tmp_path / "db")
    from kalm_store.store import PassageStore

    store = PassageStore.open(db, "docs")
    store.delete_ids([f"p{i}" for i in range(0, 30, 3)])
    code, out, _ = cli(["verify", "--db", db, "--table", "docs", "--no-progress"], capsys)
    assert code == 0 and "no index on ['text', 'id']" in out  # reported, not a failure
    before = sum(f.stat().st_size for f in (tmp_path / "db").rglob("*") if f.is_file())
    code, out, _ = cli(["optimize", "--db", db, "--table", "docs", "--json"], capsys)
    result = json.loads(out)
    assert code == 0 and sorted(result["indices_created"]) == ["id_idx", "text_idx"]
    assert result["fragments_before"] == 6 and result["fragments_after"] == 1 and result["rows"] == 20
    assert result["old_versions_removed"] > 0 and result["bytes_removed"] > 0
    after = sum(f.stat().st_size for f in (tmp_path / "db").rglob("*") if f.is_file())
    assert after < before
    store.refresh()
    assert len(store.table.to_lance().versions()) == 1
    assert sorted(store.all_ids()) == sorted(f"p{i}" for i in range(30) if i % 3)
    code, out, _ = cli(["verify", "--db", db, "--table", "docs", "--no-progress"], capsys)
    assert code == 0 and "no index" not in out


def test_a_builder_that_knows_every_id_appends_until_another_writer_commits(model, tmp_path, monkeypatch):
    """The build's fast path (kalm_store.commit, known_version): while the table is at the version whose
    ids the builder holds, a chunk is appended without Lance's id join; after another writer's commit it
    merges again (skipping what that writer stored); a commit landing inside the append is still seen,
    and the extra copy deleted (the first committed stays)."""
    import lance

    import kalm_store.commit as commit
    from kalm_store.commit import next_known_version
    from kalm_store.store import PassageStore

    db = str(tmp_path / "db")
    store = PassageStore.create(db, "docs", model, ratios=[4])
    store.add(corpus(6))
    other = PassageStore.open(db, "docs")
    merges: list[int] = []
    real_merge = lance.LanceDataset.merge_insert
    monkeypatch.setattr(lance.LanceDataset, "merge_insert", lambda self, *a, **k: (merges.append(1), real_merge(self, *a, **k))[1])

    def rows(*ids: str, text: str = "mine"):
        return store.encode_records([{"id": i, "text": f"{text} {i}"} for i in ids])

    known = store.table.to_lance().version
    first = store.write(rows("n1", "n2"), known_version=known)
    assert merges == [] and (first.inserted, first.read_version, first.committed_version) == (2, known, known + 1)
    known = next_known_version(known, first)
    assert known == first.committed_version
    other.write(rows("n3", text="theirs"))  # another writer (merging): our set no longer holds every stored id
    assert len(merges) == 1
    second = store.write(rows("n3", "n4"), known_version=known)
    assert len(merges) == 2 and (second.inserted, second.skipped) == (1, 1)
    assert next_known_version(known, second) is None

    known = store.table.to_lance().version  # as if the builder knew every id again at this version
    complete = commit.complete_rows
    fired: list = []

    def other_commits_first(*args, **kwargs):  # after our read of the known version, before our append
        if not fired:
            fired.append(None)
            fired[0] = other.write(rows("n5", text="theirs"))
        return complete(*args, **kwargs)

    monkeypatch.setattr(commit, "complete_rows", other_commits_first)
    third = store.write(rows("n5", "n6"), known_version=known)
    assert len(merges) == 3  # only the other writer merged: ours was appended
    assert third.committed_version == known + 2 and third.duplicates_removed == 1
    assert next_known_version(known, third) is None
    store.refresh()
    got = store.table.to_lance().to_table(columns=["id", "text"]).to_pylist()
    texts = {}
    for r in got:
        assert r["id"] not in texts, f"{r['id']} stored twice"
        texts[r["id"]] = r["text"]
    assert len(texts) == 12
    assert texts["n3"] == "theirs n3" and texts["n5"] == "theirs n5" and texts["n6"] == "mine n6"
