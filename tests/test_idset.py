"""The build's on-disk id set (kalm_store/idset.py): exact verdicts, bounded memory, and builds that use it
keep the duplicate-id rule, resume and --delete-missing exactly as before without holding ids in memory."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kalm_store.build import BuildOptions, build
from kalm_store.idset import IdSet, IdSetFullError


def test_classify_first_occurrence_wins_across_calls_and_within_one():
    with IdSet() as ids:
        ids.add_stored(["s1", "s2", "s2"])  # a table holding an id twice (an old duplicate) counts it once
        assert ids.stored_count == 2
        assert ids.classify(["n1", "s1", "n1", "n2"]) == ["new", "stored", "duplicate", "new"]
        assert ids.classify(["s1", "n2", "n3", "s2", "n3"]) == ["duplicate", "duplicate", "new", "stored", "duplicate"]
        assert ids.seen_count == 5
        assert ids.missing_count() == 0
        ids.add_stored(["s3", "n1"])  # n1 was seen: stored and seen, so not missing
        assert list(ids.missing()) == [["s3"]]
        with pytest.raises(TypeError, match="the string 'abc'"):
            ids.classify("abc")


def test_missing_streams_sorted_in_python_order():
    names = ["é", "z", "Z", "a", "\U0001F600", "a b", "", "ä", "日本", "passage-10", "passage-9"]
    with IdSet() as ids:
        ids.add_stored(names)
        ids.classify(["z", "nope"])
        batches = list(ids.missing(batch=3))
        assert [len(b) for b in batches] == [3, 3, 3, 1]
        assert [i for b in batches for i in b] == sorted(set(names) - {"z"})  # the order sorted() gave before
        assert ids.missing_count() == 10


def open_deleted_files() -> list[str]:
    """Files this process holds open whose name was removed (Linux: ``/proc/self/fd``)."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # the listing's own descriptor, closed meanwhile
            continue
        if target.endswith(" (deleted)"):
            out.append(target[:-len(" (deleted)")])
    return out


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs Linux /proc to see open deleted files")
def test_file_lives_in_the_given_folder_and_goes_with_close(tmp_path):
    """The file is made in the folder and its name removed at once (a killed build leaves nothing there);
    the set keeps working on the open file, which close() releases."""
    ids = IdSet(tmp_path)
    assert ids.path.parent == tmp_path and not ids.path.exists() and list(tmp_path.iterdir()) == []
    assert str(ids.path) in open_deleted_files()
    ids.add_stored(f"s{i:06d}" for i in range(50_000))  # more pages than the file had when its name went
    assert ids.classify(["s000007", "n"]) == ["stored", "new"] and ids.stored_count == 50_000
    ids.close()
    assert str(ids.path) not in open_deleted_files()
    ids.close()  # repeatable
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="is closed"):
        ids.classify(["a"])
    with pytest.raises(ValueError, match="cache_mib"):
        IdSet(tmp_path, cache_mib=0)


def test_a_full_disk_is_a_clear_error_naming_the_file_and_tmpdir(tmp_path):
    with IdSet(tmp_path) as ids:
        ids._conn.execute("PRAGMA max_page_count = 3")  # SQLite's own "database or disk is full"
        with pytest.raises(IdSetFullError, match=r"no space left for the build's id set .*set TMPDIR") as err:
            ids.classify([f"passage-{i:08d}" for i in range(5000)])
        assert isinstance(err.value.__cause__, sqlite3.OperationalError)  # the original error is kept
        assert isinstance(err.value, OSError)


def test_memory_stays_bounded_while_the_ids_grow():
    """10x the ids, about the same peak memory: a Python set of 600k ids alone takes ~60 MB."""
    script = textwrap.dedent("""
        import resource, sys
        from kalm_store.idset import IdSet
        n = int(sys.argv[1])
        with IdSet() as ids:
            ids.add_stored(f"stored-{i:09d}" for i in range(n // 2))
            for start in range(0, n, 20000):
                ids.classify([f"passage-{i:09d}" for i in range(start, start + 20000)])
            assert ids.seen_count == n and ids.missing_count() == n // 2
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    """)
    peaks = [int(subprocess.run([sys.executable, "-c", script, str(n)], check=True, capture_output=True,
                                text=True, timeout=300).stdout) for n in (60_000, 600_000)]
    assert peaks[1] - peaks[0] < 20 * 1024, peaks  # KiB: less than 20 MiB more for 540k more ids


# ----------------------------------------------------------------------------- builds through the id set
@pytest.fixture
def no_id_sets_in_memory(tmp_path, monkeypatch):
    """Builds may not read the table's ids whole, and stored ids arrive in batches of at most 3."""
    import kalm_store.idset as idset
    from kalm_store.store import PassageStore

    def refuse(self):
        raise AssertionError("the build read every stored id into memory")

    monkeypatch.setattr(PassageStore, "all_ids", refuse)
    monkeypatch.setattr(idset, "STREAM_ROWS", 3)
    batches: list[int] = []
    real = IdSet.add_stored

    def spy(self, ids):
        ids = list(ids)
        batches.append(len(ids))
        return real(self, ids)

    monkeypatch.setattr(IdSet, "add_stored", spy)
    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr("tempfile.tempdir", None)  # re-read TMPDIR
    return {"batches": batches, "tmp": tmp}


def _write(path: Path, records: list[tuple[str, str]]) -> Path:
    path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in records))
    return path


def _opts(tmp_path: Path, inp: Path, model_dir: Path, **kw) -> BuildOptions:
    return BuildOptions(input=str(inp), db=str(tmp_path / "db"), table="docs", model=str(model_dir),
                        progress=False, chunk_size=4, **kw)


def _texts(tmp_path: Path) -> dict[str, str]:
    from kalm_store.store import PassageStore

    rows = PassageStore.open(str(tmp_path / "db"), "docs").table.to_arrow()
    assert rows.num_rows == len(set(rows.column("id").to_pylist()))  # no id stored twice
    return dict(zip(rows.column("id").to_pylist(), rows.column("text").to_pylist()))


def test_duplicates_resume_and_delete_missing_hold_with_the_on_disk_set(tmp_path, model, tiny_model_dir,
                                                                        no_id_sets_in_memory):
    spy = no_id_sets_in_memory
    records = [(f"p{i}", f"text number {i}") for i in range(10)]
    # a partial run (as if stopped after its first 7 records), with a duplicate inside its second chunk
    part = _write(tmp_path / "part.jsonl", records[:5] + [("p4", "a later p4, same chunk")] + records[5:7])
    s = build(_opts(tmp_path, part, tiny_model_dir), model=model)
    assert (s.read, s.written, s.duplicates, s.already_stored, s.commits) == (8, 7, 1, 0, 2)
    assert spy["batches"] == []  # a new table: nothing to stream
    assert list(spy["tmp"].iterdir()) == []  # the id set's file is gone
    # the full input: duplicates across chunks (p1 after its chunk), within one (p8), of a stored id (p0);
    # new: p7, p8, p9
    full = _write(tmp_path / "full.jsonl", records[:8] + [("p1", "later p1"), ("p8", "p8 first"),
                                                          ("p8", "p8 again"), ("p0", "later p0")] + records[9:])
    s = build(_opts(tmp_path, full, tiny_model_dir), model=model)
    assert (s.read, s.written, s.already_stored, s.duplicates, s.rows) == (13, 3, 7, 3, 10)
    assert max(spy["batches"]) <= 3 and sum(spy["batches"]) == 7  # the 7 stored ids, streamed 3 at a time
    assert _texts(tmp_path) == {**dict(records[:8]), "p8": "p8 first", "p9": "text number 9"}
    again = build(_opts(tmp_path, full, tiny_model_dir), model=model)
    assert (again.written, again.already_stored, again.duplicates, again.rows) == (0, 10, 3, 10)  # idempotent
    # --delete-missing: the guard counts from the set, the deletion streams from it
    spy["batches"].clear()
    few = _write(tmp_path / "few.jsonl", records[:3] + [("p0", "dup")])
    with pytest.raises(ValueError, match="holds 3 of the 10 stored ids: --delete-missing would delete 7 rows"):
        build(_opts(tmp_path, few, tiny_model_dir, delete_missing=True), model=model)
    assert len(_texts(tmp_path)) == 10  # refused: nothing deleted
    s = build(_opts(tmp_path, few, tiny_model_dir, delete_missing=True, allow_mass_delete=True), model=model)
    assert (s.deleted, s.duplicates, s.already_stored, s.rows) == (7, 1, 3, 3)
    assert _texts(tmp_path) == dict(records[:3])
    assert sum(spy["batches"]) == 20 and max(spy["batches"]) <= 3  # 10 stored ids, read by each of the two runs
    assert list(spy["tmp"].iterdir()) == []  # also after the refused run


def test_a_failed_build_removes_its_id_set(tmp_path, model, tiny_model_dir, no_id_sets_in_memory):
    from kalm_store.records import BadRecordError

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "a", "text": "fine"}) + "\n" + "not json\n")
    with pytest.raises(BadRecordError, match="bad.jsonl:2"):
        build(_opts(tmp_path, bad, tiny_model_dir), model=model)
    assert _texts(tmp_path) == {"a": "fine"}
    assert list(no_id_sets_in_memory["tmp"].iterdir()) == []


# ------------------------------------------------------------------------------------------ odd ids
ODD_IDS = ["a", "A", "é", "e\u0301",  # case differs; NFC and NFD of one letter: distinct ids, never folded
           "a\x00b", "a\x00c", "a\x00", "\x7f\x01",  # NUL and control bytes (SQLite text holds them whole)
           "x" * 20_000, "x" * 19_999 + "y",  # long ids that differ only in their last character
           "it's", "back\\slash", "new\nline", "%", "_", " a", "a ", "\U0001F600"]


def test_classify_keeps_ids_that_differ_by_case_normalisation_nul_or_one_late_character_apart():
    assert len(set(ODD_IDS)) == len(ODD_IDS)
    with IdSet() as ids:
        ids.add_stored(["A", "a\x00"])
        assert ids.classify(ODD_IDS) == ["stored" if i in ("A", "a\x00") else "new" for i in ODD_IDS]
        assert ids.classify(ODD_IDS[::-1]) == ["duplicate"] * len(ODD_IDS)
        assert ids.classify(["a\x00d", "x" * 20_001]) == ["new", "new"]  # a prefix of nothing seen
        assert ids.missing_count() == 0
        ids.add_stored(["zz\x00z", "zz"])
        assert list(ids.missing()) == [["zz", "zz\x00z"]]


def test_a_build_keeps_odd_ids_apart_through_resume_update_and_delete_missing(tmp_path, model, tiny_model_dir,
                                                                            no_id_sets_in_memory):
    """Ids of ODD_IDS go through the whole build: the id set, Lance's merge on id, and the SQL filters of
    --update (changed rows) and --delete-missing (quoted literals with NUL, quotes, backslashes)."""
    records = [(pid, f"text {k}") for k, pid in enumerate(ODD_IDS)]
    inp = _write(tmp_path / "odd.jsonl", records + [("A", "a later A"), ("a\x00b", "a later a\\0b")])
    s = build(_opts(tmp_path, inp, tiny_model_dir), model=model)
    assert (s.written, s.duplicates, s.rows) == (len(ODD_IDS), 2, len(ODD_IDS))
    assert _texts(tmp_path) == dict(records)
    again = build(_opts(tmp_path, inp, tiny_model_dir), model=model)
    assert (again.written, again.already_stored, again.duplicates) == (0, len(ODD_IDS), 2)
    changed = [(pid, f"changed {k}" if k % 2 else text) for k, (pid, text) in enumerate(records)]
    s = build(_opts(tmp_path, _write(tmp_path / "u.jsonl", changed), tiny_model_dir, update=True), model=model)
    assert (s.updated, s.already_stored) == (len(ODD_IDS) // 2, len(ODD_IDS) - len(ODD_IDS) // 2)
    assert _texts(tmp_path) == dict(changed)
    keep = changed[::2] + [changed[5]]  # "a\x00c" stays, "a\x00b" and "a\x00" go, and so on
    s = build(_opts(tmp_path, _write(tmp_path / "k.jsonl", keep), tiny_model_dir, delete_missing=True), model=model)
    assert s.deleted == len(ODD_IDS) - len(keep) and _texts(tmp_path) == dict(keep)


# ----------------------------------------------------------------------------- where the set's file goes
def test_a_tmpdir_that_is_no_writable_folder_is_refused_before_anything_is_written(tmp_path, model, tiny_model_dir,
                                                                                 monkeypatch):
    """Python's tempfile falls back to /tmp (perhaps a small tmpfs) when TMPDIR is missing; the build
    instead names TMPDIR and stops before touching the table."""
    import lance

    inp = _write(tmp_path / "c.jsonl", [("p1", "one"), ("p2", "two")])
    build(_opts(tmp_path, inp, tiny_model_dir), model=model)
    version = lance.dataset(str(tmp_path / "db" / "docs.lance")).version
    more = _write(tmp_path / "more.jsonl", [("p3", "three")])
    for bad in (tmp_path / "no-such-folder", inp):  # missing, and a file
        monkeypatch.setenv("TMPDIR", str(bad))
        monkeypatch.setattr("tempfile.tempdir", None)
        with pytest.raises(NotADirectoryError, match=rf"TMPDIR='{bad}' is not a folder"):
            build(_opts(tmp_path, more, tiny_model_dir), model=model)
    assert lance.dataset(str(tmp_path / "db" / "docs.lance")).version == version
    assert _texts(tmp_path) == {"p1": "one", "p2": "two"}
    with pytest.raises(FileNotFoundError, match="cannot make the build's id set in '.*no-such-folder'"):
        IdSet(tmp_path / "no-such-folder")


def test_a_full_disk_mid_build_stops_it_clearly_keeps_what_was_stored_and_resumes(tmp_path, model, tiny_model_dir,
                                                                                 monkeypatch):
    """The id set's disk fills while the build runs (SQLite's own "database or disk is full"): the build
    stops with the error naming the set and TMPDIR; the rows stored before and the chunks committed
    before stay, once each; the same command, with room, finishes the build."""
    before = [(f"s{i}", f"stored {i}") for i in range(6)]
    build(_opts(tmp_path, _write(tmp_path / "s.jsonl", before), tiny_model_dir), model=model)
    records = [(f"p{i:05d}-" + "x" * 200, f"text {i}") for i in range(120)]
    inp = _write(tmp_path / "c.jsonl", records)
    real = IdSet.__init__

    def small_disk(self, *a, **k):
        real(self, *a, **k)
        self._conn.execute("PRAGMA max_page_count = 8")  # a few pages of ids, then "full"

    monkeypatch.setattr(IdSet, "__init__", small_disk)
    with pytest.raises(IdSetFullError, match=r"no space left for the build's id set .*set TMPDIR"):
        build(_opts(tmp_path, inp, tiny_model_dir), model=model)
    texts = _texts(tmp_path)  # no id stored twice (checked there), the earlier rows intact
    assert {k: texts[k] for k, _ in before} == dict(before) and 6 < len(texts) < 126
    assert all(texts[k] == dict(records)[k] for k in texts if k.startswith("p"))
    monkeypatch.setattr(IdSet, "__init__", real)
    s = build(_opts(tmp_path, inp, tiny_model_dir), model=model)
    assert s.written == 126 - len(texts) and _texts(tmp_path) == dict(before) | dict(records)
