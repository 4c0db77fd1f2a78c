"""Real `kalm-store build` processes racing each other on one table (issue 22 item 1's append / merge
commit path and the on-disk id set), and a build SIGKILLed then resumed.

Each build is a subprocess of the CLI. Where a test needs both builds to hold the same view of the table
(both find no table, or both read the same stored ids) a file barrier inside the processes holds each one
at that point until all have reached it; after it they run freely, so their commits interleave as the
scheduler makes them. What the tests check holds for any interleaving: every id stored exactly once, the
text of an id's first occurrence in the input whose row was stored, counts that add up, nothing stored
before lost, and no id set file left in TMPDIR.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

# Runs the CLI in a process that first waits, at one point of the build, until every peer has reached it:
# "create" (PassageStore.create, the first chunk of a table none of them found) or "writer" (the commit
# thread's start, after the build has read the stored ids into its id set). It reports the id set files in
# TMPDIR at that moment on stderr, so that a test can see them while every build holds one.
BARRIER = textwrap.dedent("""
    import os, sys, tempfile, time
    from pathlib import Path

    barrier, me, peers, at = Path(os.environ["BARRIER"]), os.environ["ME"], int(os.environ["PEERS"]), os.environ["AT"]

    def wait():
        (barrier / me).touch()
        deadline = time.monotonic() + 90
        while len(list(barrier.iterdir())) < peers:
            if time.monotonic() > deadline:
                sys.exit(f"barrier: only {sorted(p.name for p in barrier.iterdir())} of {peers} peers came")
            time.sleep(0.01)
        files = sorted(p for p in os.listdir(tempfile.gettempdir()) if p.startswith("kalm-store-ids-"))
        print("barrier-files " + " ".join(files), file=sys.stderr, flush=True)

    if at == "create":
        import kalm_store.store as target
        real = target.PassageStore.create.__func__

        def hooked(cls, *a, **k):
            wait()
            return real(cls, *a, **k)

        target.PassageStore.create = classmethod(hooked)
    else:
        import kalm_store.build as target
        real = target._Writer.__init__

        def hooked(self, *a, **k):
            wait()
            real(self, *a, **k)

        target._Writer.__init__ = hooked

    from kalm_store.cli import main
    sys.exit(main(sys.argv[1:]))
""")

SUMMARY = re.compile(r"read (\d+), wrote (\d+)(?: \((\d+) replacing[^)]*\))?.*skipped (\d+) already stored \+ (\d+) "
                     r"duplicate id.*table now has (\d+) row")


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def records(ids: list[str], tag: str) -> list[dict]:
    """One record per id, its text naming the input (``tag``) and the record's line, so a stored text
    says which input and which occurrence won."""
    return [{"id": pid, "text": f"{tag} line {n} {pid}"} for n, pid in enumerate(ids)]


def first_texts(recs: list[dict]) -> dict[str, str]:
    out: dict[str, str] = {}
    for r in recs:
        out.setdefault(r["id"], r["text"])
    return out


def build_cmd(inp: Path, db: Path, model_dir: Path, table: str = "docs", *flags: str) -> list[str]:
    return ["build", str(inp), "--db", str(db), "--table", table, "--model", str(model_dir), "--chunk-size", "4",
            "--no-progress", "--no-fts-index", *flags]


def run_together(tmp_path: Path, at: str, argvs: list[list[str]], tmpdir: Path) -> list[tuple[dict, str]]:
    """Run the builds at once, each held at ``at`` until all are there; returns (counts, stderr) of each."""
    script = tmp_path / "barrier_build.py"
    script.write_text(BARRIER)
    barrier = tmp_path / f"barrier-{at}"
    barrier.mkdir()
    env = dict(os.environ, BARRIER=str(barrier), PEERS=str(len(argvs)), AT=at, TMPDIR=str(tmpdir))
    procs = [subprocess.Popen([sys.executable, str(script), *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=dict(env, ME=str(k))) for k, argv in enumerate(argvs)]
    out = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=180)
            assert p.returncode == 0, stderr[-3000:]
            m = SUMMARY.search(stdout)
            assert m, stdout
            read, wrote, updated, stored, dups, rows = (int(g or 0) for g in m.groups())
            out.append(({"read": read, "written": wrote, "updated": updated, "already_stored": stored,
                         "duplicates": dups, "rows": rows}, stderr))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return out


def stored(db: Path, table: str = "docs") -> list[tuple[str, str]]:
    import lance

    t = lance.dataset(str(db / f"{table}.lance")).to_table(columns=["id", "text"])
    return list(zip(t.column("id").to_pylist(), t.column("text").to_pylist()))


def id_set_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("kalm-store-ids-"))


def check_each_id_once(rows: list[tuple[str, str]]) -> dict[str, str]:
    texts: dict[str, str] = {}
    for pid, text in rows:
        assert pid not in texts, f"id {pid!r} stored twice: {texts[pid]!r} and {text!r}"
        texts[pid] = text
    return texts


# ---------------------------------------------------------------------------------- two builds at once
@pytest.mark.slow
def test_two_builds_that_both_find_no_table_store_each_id_once(tmp_path, tiny_model_dir):
    """Both builds find no table and start with an empty id set (each believes it is alone); both reach
    the table's creation before either makes it. Before: the second failed with "table 'docs' already
    exists ... pass exist_ok=True" (an API hint on a CLI run). Now it writes into the table the first made,
    merging on id, and the counts of both add up to the union of the inputs."""
    db, tmpdir = tmp_path / "db", tmp_path / "tmpdir"
    tmpdir.mkdir()
    a_ids = [f"p{i}" for i in range(0, 40)] + ["p3", "p50"]  # p3 repeated in input a: its line 3 wins there
    b_ids = [f"p{i}" for i in range(20, 60)] + ["p25"]
    a, b = records(a_ids, "A"), records(b_ids, "B")
    (ca, ea), (cb, eb) = run_together(tmp_path, "create", [
        build_cmd(write_jsonl(tmp_path / "a.jsonl", a), db, tiny_model_dir),
        build_cmd(write_jsonl(tmp_path / "b.jsonl", b), db, tiny_model_dir)], tmpdir)
    texts = check_each_id_once(stored(db))
    union = set(a_ids) | set(b_ids)
    assert set(texts) == union and len(texts) == 60
    fa, fb = first_texts(a), first_texts(b)
    for pid, text in texts.items():  # the row stored is one input's first occurrence of the id
        assert text in (fa.get(pid), fb.get(pid)), (pid, text)
    assert texts["p3"] == "A line 3 p3" and texts["p25"] == "B line 5 p25"
    assert ca["written"] + cb["written"] == 60  # every id written by exactly one of them
    assert ca["duplicates"] == 1 and cb["duplicates"] == 1
    for c, ids in ((ca, a_ids), (cb, b_ids)):  # what a build did not write, the other stored first
        assert c["read"] == len(ids) and c["written"] + c["already_stored"] == len(set(ids))
    assert sum(t.startswith("A") for t in texts.values()) == ca["written"]
    assert id_set_files(tmpdir) == []


@pytest.mark.slow
def test_two_builds_holding_one_snapshot_of_a_stored_table_lose_nothing(tmp_path, model, tiny_model_dir):
    """A table with stored rows; two builds read the same stored ids (both held after reading them, before
    their first commit), then write overlapping new ids at once, one of them with --update changing some
    stored texts. Every stored row survives (changed only where the --update input changed it), every
    id once, counts add up; the --update build's text wins every id it holds, also those the other
    build committed first (as if it had run after it)."""
    from kalm_store.build import BuildOptions, build

    db, tmpdir = tmp_path / "db", tmp_path / "tmpdir"
    tmpdir.mkdir()
    base = records([f"s{i}" for i in range(12)], "base")
    build(BuildOptions(input=str(write_jsonl(tmp_path / "base.jsonl", base)), db=str(db), table="docs",
                       model=str(tiny_model_dir), progress=False, chunk_size=4, fts_index=False), model=model)
    # a meets the shared new ids (n15..n29) first, b last: a commits most of them before b gets there
    a_ids = ["s0", "s1"] + [f"n{i}" for i in range(15, 30)] + [f"n{i}" for i in range(0, 15)]
    a = records(a_ids, "A")
    a[0]["text"], a[1]["text"] = base[0]["text"], base[1]["text"]  # a plain build: stored ids are skipped anyway
    b_ids = ["s2", "s3", "s4"] + [f"n{i}" for i in range(30, 45)] + [f"n{i}" for i in range(15, 30)]
    b = records(b_ids, "B")
    b[2]["text"] = base[4]["text"]  # --update: s2 and s3 change, s4 is unchanged
    (ca, _), (cb, _) = run_together(tmp_path, "writer", [
        build_cmd(write_jsonl(tmp_path / "a.jsonl", a), db, tiny_model_dir),
        build_cmd(write_jsonl(tmp_path / "b.jsonl", b), db, tiny_model_dir, "docs", "--update")], tmpdir)
    texts = check_each_id_once(stored(db))
    assert set(texts) == {f"s{i}" for i in range(12)} | {f"n{i}" for i in range(45)}
    for i in range(12):
        want = {2: "B line 0 s2", 3: "B line 1 s3"}.get(i, base[i]["text"])
        assert texts[f"s{i}"] == want
    for i in range(45):  # the --update input wins every id it holds, whoever committed it first
        assert texts[f"n{i}"] == (first_texts(a) if i < 15 else first_texts(b))[f"n{i}"]
    # k: new ids of both that a committed first and b then replaced (b's --update, as if run after a)
    k = ca["written"] - 15
    assert 0 <= k <= 15 and ca["already_stored"] == 2 + 15 - k
    assert cb["written"] == 2 + 30 and cb["updated"] == 2 + k and cb["already_stored"] == 1  # s4 unchanged
    assert ca["rows"] <= 57 and cb["rows"] <= 57 and len(texts) == 57
    assert id_set_files(tmpdir) == []


# ------------------------------------------------------------------------------ SIGKILL, then resume
@pytest.mark.slow
def test_a_killed_build_leaves_no_id_set_file_and_resumes_exactly(tmp_path, model, tiny_model_dir):
    """SIGKILL a build once it has committed rows: its id set file must not stay in TMPDIR (nothing ever
    removes it: every build makes a fresh one). Before: the killed build's kalm-store-ids-*.sqlite stayed.
    The resumed build then stores the rest once each, its first occurrences, while another build of a
    second table runs beside it on the same TMPDIR, each with its own set."""
    import lance

    from kalm_store.build import BuildOptions, build

    db, tmpdir = tmp_path / "db", tmp_path / "tmpdir"
    tmpdir.mkdir()
    ids = [f"p{i}" for i in range(200)]
    recs = records(ids + ids[:50], "A")  # the repeats are later occurrences: skipped, also after a resume
    inp = write_jsonl(tmp_path / "a.jsonl", recs)
    proc = subprocess.Popen([sys.executable, "-m", "kalm_store", *build_cmd(inp, db, tiny_model_dir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=dict(os.environ, TMPDIR=str(tmpdir)))
    rows_at_kill, deadline = 0, time.monotonic() + 120
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                rows_at_kill = lance.dataset(str(db / "docs.lance")).count_rows()
            except Exception:  # noqa: BLE001 - not created yet
                rows_at_kill = 0
            if rows_at_kill:
                break
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert 0 < rows_at_kill < 200
    assert id_set_files(tmpdir) == []  # nothing of the killed build left behind

    other = write_jsonl(tmp_path / "b.jsonl", records([f"p{i}" for i in range(100, 140)], "B"))
    (ca, ea), (cb, eb) = run_together(tmp_path, "writer", [
        build_cmd(inp, db, tiny_model_dir),  # the resume
        build_cmd(other, db, tiny_model_dir, "other")], tmpdir)
    texts = check_each_id_once(stored(db))
    assert texts == first_texts(recs) and ca["rows"] == 200
    assert ca["written"] + ca["already_stored"] == 200 and ca["already_stored"] >= rows_at_kill
    assert ca["duplicates"] == 50
    assert check_each_id_once(stored(db, "other")) == first_texts(records([f"p{i}" for i in range(100, 140)], "B"))
    assert cb["written"] == 40
    assert id_set_files(tmpdir) == []
    # a second resume of a finished build adds nothing
    again = build(BuildOptions(input=str(inp), db=str(db), table="docs", model=str(tiny_model_dir), progress=False,
                               chunk_size=4, fts_index=False), model=model)
    assert (again.written, again.already_stored, again.duplicates, again.rows) == (0, 200, 50, 200)


# ------------------------------------------------------------ --update against a writer in between
def test_update_replaces_a_row_another_writer_stored_after_the_build_read_the_ids(tmp_path, model, tiny_model_dir):
    """An --update build reads the stored ids; then another writer stores one of the build's new ids with
    another text, before the build's chunk holding it commits. Run one after the other, in either order,
    the table ends with the --update input's text (its purpose: the table mirrors its input); before, the
    chunk's merge skipped the row as "already stored", and the other writer's text stayed."""
    from kalm_store.build import BuildOptions, build
    from kalm_store.store import PassageStore

    db = tmp_path / "db"
    opts = lambda inp: BuildOptions(input=str(inp), db=str(db), table="docs", model=str(tiny_model_dir),  # noqa: E731
                                    progress=False, chunk_size=4, fts_index=False, update=True)
    build(opts(write_jsonl(tmp_path / "base.jsonl", records([f"s{i}" for i in range(4)], "base"))), model=model)
    mine = records([f"n{i}" for i in range(8)], "mine")
    fired: list[int] = []

    def other_writer_stores_n5(summary):
        if not fired:
            other = PassageStore.open(str(db), "docs", model=model)
            fired.append(other.add([{"id": "n5", "text": "theirs n5"}, {"id": "n6", "text": mine[6]["text"]}]))

    summary = build(opts(write_jsonl(tmp_path / "mine.jsonl", mine)), model=model, on_commit=other_writer_stores_n5)
    assert fired
    texts = check_each_id_once(stored(db))
    assert texts["n5"] == "mine line 5 n5"  # the update's text, not the other writer's
    assert texts == {**{f"s{i}": f"base line {i} s{i}" for i in range(4)}, **first_texts(mine)}
    # n5 replaced a row whose text differed (updated); n6 was stored meanwhile with the same text (already stored)
    assert (summary.written, summary.updated, summary.already_stored) == (7, 1, 1)
