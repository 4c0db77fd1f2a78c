"""Reliability (issue 7): crashes, corruption, mismatches, concurrency and hostile input lose nothing.

Real processes throughout: builds are ``kalm-store build`` subprocesses killed with SIGKILL; readers
and writers racing a build or a repool run in ``spawn`` processes (forking after lancedb is in use
can deadlock). ``benchmarks/bench_reliability.py`` runs :func:`kill_and_resume` with 20+ kills.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from kalm_store.build import BuildOptions, build
from kalm_store.codec import CorruptMatrixError

WORDS = ("the quick brown fox jumps over a lazy dog python json file vector database reranker passage "
         "text query yes no model document stored").split()
PACKAGE = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-c", "import sys; from kalm_store.cli import main; sys.exit(main())"]


def make_corpus(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"id": f"p{i}", "text": " ".join(rng.choice(WORDS, size=int(rng.integers(1, 40))))} for i in range(n)]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def snapshot(db: Path, table: str = "docs", ratios: tuple[int, ...] = (4,)) -> dict:
    """Everything a table holds that a reader could see: ids (with repeats), values, metadata, indices."""
    from kalm_store.schema import column_name
    from kalm_store.store import PassageStore, decode_rows

    store = PassageStore.open(str(db), table)
    cols = ["id", "text", "n_tokens"] + [column_name(r) for r in ratios]
    rows = store.table.to_lance().to_table(columns=cols)
    ids = rows.column("id").to_pylist()
    mats = {r: dict(zip(ids, (m.tobytes() for m in decode_rows(rows, r, store.dim)))) for r in ratios}
    meta = dict(store.metadata)
    return {"ids": ids, "texts": dict(zip(ids, rows.column("text").to_pylist())), "matrices": mats,
            "metadata": meta, "indices": {ix.name: store.table.index_stats(ix.name).num_unindexed_rows
                                          for ix in store.table.list_indices()}}


def assert_same_table(got: dict, clean: dict) -> None:
    assert len(got["ids"]) == len(set(got["ids"])), "duplicated rows"
    lost = set(clean["ids"]) - set(got["ids"])
    assert not lost, f"{len(lost)} rows lost: {sorted(lost)[:5]}"
    assert set(got["ids"]) == set(clean["ids"])
    assert got["texts"] == clean["texts"]
    for r, by_id in clean["matrices"].items():
        diff = [i for i in by_id if got["matrices"][r][i] != by_id[i]]
        assert not diff, f"r={r}: matrices of {diff[:5]} differ from a clean build"
    assert got["metadata"] == clean["metadata"]
    assert set(got["indices"]) == set(clean["indices"]) and not any(got["indices"].values()), got["indices"]


# ====================================================================== 1. crash recovery
@dataclass
class KillReport:
    kills: int = 0  # builds SIGKILLed
    completed_runs: int = 0  # runs that finished before their kill moment
    rounds: int = 0  # fresh tables built to completion through kills
    rows_at_kill: list[int] = field(default_factory=list)
    seconds: float = 0.0
    mid_write: int = 0  # kills that landed after the run's own first commit and before the table was full


def _rows_now(db: Path) -> int:
    import lance

    try:
        return lance.dataset(str(db / "docs.lance")).count_rows()
    except Exception:  # not created yet
        return 0


def kill_and_resume(workdir: Path, model_dir: Path, kills: int, *, n: int = 300, chunk: int = 4,
                    seed: int = 0, model=None, log=None, mid_write_kills: int = 0) -> KillReport:
    """SIGKILL ``kalm-store build`` at random moments ``kills`` times, resuming each time; verify each table.

    A kill moment is either a random delay after the run's own first commit (mid-write, 70%) or a random
    moment between launch and the typical time to a first commit (startup, table creation, id scan). After the last
    kill of a round the same command runs to completion; the table must then equal a clean build
    (built in this process with ``model``, or by the CLI): no row lost or duplicated, every matrix bitwise equal, metadata and
    indices intact. With ``mid_write_kills``, kills go on until that many landed between commits (at most
    ``4 * mid_write_kills + kills`` kills in all, then it fails: the kill moments would be wrong).
    """
    rng = random.Random(seed)
    records = make_corpus(n, seed=seed)
    inp = write_jsonl(workdir / "corpus.jsonl", records)
    clean_db = workdir / "clean"
    if model is not None:
        build(BuildOptions(str(inp), str(clean_db), "docs", str(model_dir), chunk_size=chunk, progress=False),
              model=model)
    else:
        subprocess.run(CLI + ["build", str(inp), "--db", str(clean_db), "--table", "docs", "--model", str(model_dir),
                              "--chunk-size", str(chunk), "--no-progress"], check=True, capture_output=True)
    clean = snapshot(clean_db)
    report = KillReport()
    start = time.monotonic()
    startup = 5.0  # seconds from launch to a first commit, learned as kills happen

    def more_kills() -> bool:
        if report.kills >= kills and report.mid_write >= mid_write_kills:
            return False
        assert not mid_write_kills or report.kills < kills + 4 * mid_write_kills, \
            f"only {report.mid_write} of {report.kills} kills landed between commits"
        return True

    while more_kills():
        db = workdir / f"db{report.rounds}"
        cmd = CLI + ["build", str(inp), "--db", str(db), "--table", "docs", "--model", str(model_dir),
                     "--chunk-size", str(chunk), "--no-progress"]
        while more_kills():
            before = _rows_now(db)
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            started = time.monotonic()
            # mid-write (70%): a random delay after this run's first commit; else a random moment from the
            # start up to the typical time to a first commit (startup, table open/creation, id scan)
            after_rows = rng.random() < 0.7
            delay = rng.uniform(0.0, 1.5) if after_rows else rng.uniform(0.0, startup)
            t0 = started
            seen_rows = not after_rows
            while proc.poll() is None:
                if not seen_rows and _rows_now(db) > before:
                    seen_rows, t0 = True, time.monotonic()
                    startup = 0.7 * startup + 0.3 * (t0 - started)
                if seen_rows and time.monotonic() - t0 >= delay:
                    break
                time.sleep(0.02)
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                report.kills += 1
                report.rows_at_kill.append(_rows_now(db))
                report.mid_write += before < report.rows_at_kill[-1] < n
                if log:
                    log(f"kill {report.kills}: {'after its first commit' if after_rows else 'after start'} "
                        f"+{delay:.2f}s, {report.rows_at_kill[-1] - before} rows committed by this run, "
                        f"{report.rows_at_kill[-1]} in the table")
            else:
                err = proc.stderr.read().decode()
                assert proc.returncode == 0, err[-2000:]
                report.completed_runs += 1
                break  # this table is done: verify it, then a fresh round
        # resume to completion (a no-op if the last run finished) and compare with the clean build
        done = subprocess.run(cmd, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        assert_same_table(snapshot(db), clean)
        report.rounds += 1
        shutil.rmtree(db)
    report.seconds = time.monotonic() - start
    return report


@pytest.mark.slow
def test_sigkill_at_random_points_loses_nothing(tmp_path, tiny_model_dir, model):
    """Three kills that land between commits (CI); the benchmark runs the same with 20+. A kill before the
    run's first commit or after the table is full tests nothing new, so only kills between commits count."""
    report = kill_and_resume(tmp_path, tiny_model_dir, kills=3, n=200, chunk=4, model=model,
                             seed=int(os.environ.get("KILL_SEED", 7)), mid_write_kills=3)
    assert report.mid_write >= 3 and report.kills >= 3 and report.rounds >= 1
    assert sum(0 < rows < 200 for rows in report.rows_at_kill) >= 3  # the table held a part when killed


# ====================================================================== 2. corruption through the store
@pytest.fixture
def corrupt_store(model, tmp_path):
    """A real table whose stored values for p3 (bit flip), p5 (truncated), p7 (null) and p9 (n_tokens
    claims 2**30 tokens) are damaged; every other row is intact."""
    from kalm_store.store import PassageStore

    store = PassageStore.create(str(tmp_path / "db"), "docs", model, ratios=[4, 8])
    rows = store.encode_records(make_corpus(12, seed=2))
    blobs = rows.column("kalm_r4").to_pylist()
    b = bytearray(blobs[3])
    b[len(b) // 2] ^= 0x10
    blobs[3] = bytes(b)
    blobs[5] = blobs[5][:-7]
    blobs[7] = None
    rows = rows.set_column(rows.schema.get_field_index("kalm_r4"), rows.schema.field("kalm_r4"),
                           pa.array(blobs, pa.large_binary()))
    n_tokens = rows.column("n_tokens").to_pylist()
    n_tokens[9] = 2**30
    rows = rows.set_column(rows.schema.get_field_index("n_tokens"), rows.schema.field("n_tokens"),
                           pa.array(n_tokens, pa.int32()))
    store.table.add(rows)
    return store


BAD = {"p3": "corrupt zstd frame", "p5": "corrupt zstd frame|not a zstd frame", "p7": "null value",
       "p9": "n_tokens 1073741824 is outside 1..1024"}


@pytest.mark.parametrize("pid", sorted(BAD))
def test_corrupt_value_named_by_store_and_reranker(corrupt_store, model, pid, monkeypatch):
    from kalm_store.plugins.lancedb import KaLMReranker

    where = rf"passage id '{pid}', column kalm_r4"
    with pytest.raises(CorruptMatrixError, match=where) as e:
        corrupt_store.matrices(["p0", pid], ratio=4)
    assert any(s in str(e.value) for s in BAD[pid].split("|"))
    assert len(corrupt_store.matrices(["p0", "p1"], ratio=4)) == 2  # intact rows still read
    if pid == "p9":  # n_tokens beyond the table's max_length: refused before any frame is read, at every ratio
        with pytest.raises(CorruptMatrixError, match=r"passage id 'p9', column kalm_r8: n_tokens"):
            corrupt_store.matrices([pid], ratio=8)
    else:
        assert corrupt_store.matrices([pid], ratio=8)[0].shape[1] == model.dim  # the other column is intact

    monkeypatch.setattr(model, "score", lambda *a, **k: pytest.fail("scored a corrupt candidate"))
    rr = KaLMReranker(model, table=corrupt_store.table, ratio=4)
    tbl = corrupt_store.table
    for query in (tbl.search().where(f"id IN ('p0', '{pid}')").select(["text"] + rr.columns),  # select path
                  tbl.search().where(f"id IN ('p0', '{pid}')").select(["id", "text"]).with_row_id(True)):  # _rowid
        with pytest.raises(CorruptMatrixError, match=where):
            rr.rerank_table("q", query.to_arrow())


def test_verify_finds_every_damaged_and_stale_row(corrupt_store, capsys):
    """The whole-table check finds what each read would refuse, all of it, in batches smaller than the table."""
    from kalm_store.cli import main
    from kalm_store.verify import verify_store

    report = verify_store(corrupt_store, batch_rows=5, examples=2)
    assert report.rows == 12 and not report.ok and report.digests
    r4, r8, text = report.columns["kalm_r4"], report.columns["kalm_r8"], report.columns["text"]
    assert (r4.ok, r4.bad, r8.ok, r8.bad, text.ok, text.bad) == (8, 4, 11, 1, 12, 0)
    assert [pid for pid, _ in r4.examples] == ["p3", "p5"] and "n_tokens 1073741824" in r8.examples[0][1]
    corrupt_store.table.update(where="id = 'p0'", values={"text": "changed behind kalm-store's back"})
    text = verify_store(corrupt_store, ratios=[8]).columns["text"]
    assert (text.bad, text.examples[0][0]) == (1, "p0")
    db = str(Path(corrupt_store.table.uri).parent)
    assert main(["verify", "--db", db, "--table", "docs", "--json", "--no-progress"]) == 3
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is False and out["columns"]["kalm_r4"]["bad"] == 4 and out["columns"]["text"]["bad"] == 1
    assert main(["verify", "--db", db, "--table", "docs", "--ratio", "16"]) == 1
    assert "stores ratios [4, 8], not r=16" in capsys.readouterr().err


def test_verify_passes_a_clean_table(model, tmp_path, capsys):
    from kalm_store.cli import main
    from kalm_store.store import PassageStore

    store = PassageStore.create(str(tmp_path / "db"), "docs", model, ratios=[4])
    store.add(make_corpus(7, seed=3))
    assert main(["verify", "--db", str(tmp_path / "db"), "--table", "docs", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "7 rows" in out and "kalm_r4    ok 7, damaged 0" in out and "text       ok 7, stale 0" in out
    assert out.strip().endswith("all rows pass")


def test_corrupt_value_named_by_repool(corrupt_store):
    from kalm_store.repool import repool_store

    with pytest.raises(CorruptMatrixError, match=r"^passage id 'p3', column kalm_r4: "):
        repool_store(corrupt_store, 4, 16)
    assert corrupt_store.ratios == [4, 8]  # nothing committed


# ====================================================================== 3. mismatch, before scoring
@pytest.fixture(scope="module")
def other_models(tmp_path_factory, model):
    from kalm_store import KaLMModel
    from kalm_store.testing import TinyShape, make_test_model

    root = tmp_path_factory.mktemp("others")
    return {"model": KaLMModel.from_pretrained(make_test_model(root / "seed1", TinyShape(seed=1))),
            "d": KaLMModel.from_pretrained(make_test_model(root / "d32", TinyShape(hidden_size=32, head_dim=16))),
            "max_length": type(model)(model.hf_model, model.tokenizer, name_or_path=model.name_or_path,
                                      folder=model.folder, max_length=128)}


@pytest.mark.parametrize("what, match", [("model", "fingerprint: table has"), ("d", "dim: table has 64"),
                                         ("max_length", "max_length: table has 1024"),
                                         ("template", "template_version: table has"),
                                         ("ratio", r"stores ratios \[4\], not r=8")])
def test_mismatched_table_refused_before_scoring(tmp_path, model, other_models, monkeypatch, what, match):
    from kalm_store import prompts
    from kalm_store.plugins.lancedb import KaLMReranker
    from kalm_store.store import PassageStore, StoreMismatchError

    store = PassageStore.create(str(tmp_path / "db"), "docs", model, ratios=[4])
    store.add(make_corpus(4))
    use, ratio = model, None
    if what in other_models:
        use = other_models[what]
    elif what == "template":
        monkeypatch.setattr(prompts, "TEMPLATE_VERSION", "kalm-reranker-v9")
    else:
        ratio = 8
    monkeypatch.setattr(type(use), "score", lambda *a, **k: pytest.fail("scored before refusing"))
    with pytest.raises(StoreMismatchError, match=match):
        rr = KaLMReranker(use, table=store.table, ratio=ratio)
        rr.rerank_table("q", store.table.search().limit(4).to_arrow())
    if what != "ratio":
        with pytest.raises(StoreMismatchError, match=match):
            PassageStore.open(str(tmp_path / "db"), "docs", model=use)


def test_plain_lancedb_table_says_how_to_build(tmp_path, model):
    import lancedb

    from kalm_store.plugins.lancedb import KaLMReranker
    from kalm_store.store import PassageStore, StoreMismatchError

    tbl = lancedb.connect(str(tmp_path / "db")).create_table("plain", pa.table({"id": ["a"], "text": ["x"]}))
    for attempt in (lambda: PassageStore.open(str(tmp_path / "db"), "plain"),
                    lambda: KaLMReranker(model, table=tbl)):
        with pytest.raises(StoreMismatchError, match="no kalm-store metadata.*kalm-store build"):
            attempt()


# ====================================================================== 4. concurrency, real processes
def _reader(db: str, model_dir: str, chunk: int, n: int, stop_at: float, out, ready) -> None:
    """Query a table while another process builds it; report what each query saw."""
    from kalm_store import KaLMModel
    from kalm_store.plugins.lancedb import KaLMReranker
    from kalm_store.store import PassageStore, decode_rows

    model = KaLMModel.from_pretrained(model_dir)
    ready.set()  # the build starts only now: a slow start must not let it finish unobserved
    seen = []
    store = rr = None
    while time.monotonic() < stop_at:
        try:
            if store is None:
                store = PassageStore.open(db, "docs", model=model)
                rr = KaLMReranker(model, table=store.table, ratio=4)
            store.refresh()
            version = store.table.version
            count = store.table.count_rows()
            rows = store.table.search().select(["text"] + rr.columns).limit(n + 10).to_arrow()
            mats = decode_rows(rows, 4, model.dim)  # every fetched value decodes
            reranked = rr.rerank_table("json file", rows.slice(0, 16))
            ids = rows.column("id").to_pylist()
            seen.append({"version": version, "count": count,
                         "rows": len(ids), "unique": len(set(ids)), "decoded": len(mats),
                         "reranked": reranked.num_rows, "ids_ok": all(i.startswith("p") for i in ids)})
        except (ValueError, FileNotFoundError) as e:  # not created yet: no database folder, or no table
            if "no table" not in str(e) and "does not exist" not in str(e):
                seen.append({"error": repr(e)})
                break
        except Exception as e:  # anything else is a failure the parent reports
            seen.append({"error": repr(e)})
            break
        if seen and seen[-1].get("count") == n:
            break
        time.sleep(0.01)
    out.put(seen)


@pytest.mark.slow
def test_queries_during_a_build_see_whole_commits(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.syspath_prepend(str(PACKAGE))  # spawn children import this module as tests.test_reliability
    n, chunk = 96, 8
    inp = write_jsonl(tmp_path / "c.jsonl", make_corpus(n, seed=3))
    db = tmp_path / "db"
    ctx = mp.get_context("spawn")
    out, ready = ctx.Queue(), ctx.Event()
    reader = ctx.Process(target=_reader, args=(str(db), str(tiny_model_dir), chunk, n, time.monotonic() + 150, out,
                                               ready))
    reader.start()
    assert ready.wait(60), "the reader process did not start"
    build_proc = subprocess.run(CLI + ["build", str(inp), "--db", str(db), "--table", "docs", "--model",
                                       str(tiny_model_dir), "--chunk-size", str(chunk), "--no-progress"],
                                capture_output=True, text=True, timeout=120)
    assert build_proc.returncode == 0, build_proc.stderr[-2000:]
    seen = out.get(timeout=120)
    reader.join(timeout=30)
    assert seen and not any("error" in s for s in seen), seen[-3:]
    counts = [s["count"] for s in seen]
    assert counts[-1] == n and counts == sorted(counts)  # never goes back
    assert len(set(counts)) >= 2, f"reader saw no build in progress: {counts}"  # it really raced the build
    for s in seen:
        # one table version per query: the search returns exactly the rows counted at that version
        assert s["rows"] == s["count"] == s["unique"] == s["decoded"], s  # consistent, no duplicates
        assert s["count"] % chunk == 0 or s["count"] == n, s  # whole commits only
        assert s["reranked"] == min(16, s["count"]) and s["ids_ok"]


def _appender(db: str, rows_path: str, batch: int, ready, done, go=None, appended=None) -> None:
    """Append pre-encoded rows (only the original ratio) in many small commits; with ``go``, start once it
    is set, and set ``appended`` after the first commit."""
    import lancedb

    tbl = lancedb.connect(db).open_table("docs")
    rows = pa.ipc.open_file(rows_path).read_all()
    ready.set()
    if go is not None and not go.wait(60):
        raise TimeoutError("no go from the test")
    for start in range(0, rows.num_rows, batch):
        for attempt in range(20):  # an append that loses to the repool commit is retried too
            try:
                tbl.add(rows.slice(start, batch))
                if appended is not None:
                    appended.set()
                break
            except OSError as e:
                if "etryable" not in str(e) or attempt == 19:
                    raise
                time.sleep(0.02)
    done.set()


@pytest.mark.slow
def test_repool_during_appends_retries_and_loses_nothing(tmp_path, model, monkeypatch):
    """Repool r=4 -> r=8 while another process appends. Semantics: the add_columns commit retries its
    retryable conflicts, deriving again from the latest version; no row or stored value is lost; every
    row present at the winning commit gets r=8 equal to re-pooling its r=4; rows the (r=4-only) writer
    appends after that commit hold null at r=8, are named when scored at r=8, and a drop + repool once
    writing has stopped fills them."""
    from kalm_store.pooling import pooled_rows, repool
    from kalm_store.repool import drop_ratio, repool_store
    from kalm_store.store import PassageStore, decode_rows

    monkeypatch.syspath_prepend(str(PACKAGE))  # spawn children import this module as tests.test_reliability
    db = str(tmp_path / "db")
    store = PassageStore.create(db, "docs", model, ratios=[4])
    corpus = make_corpus(160, seed=4)
    store.add(corpus[:80])
    later = store.encode_records(corpus[80:])
    with pa.ipc.new_file(tmp_path / "rows.arrow", later.schema) as w:
        w.write_table(later)
    ctx = mp.get_context("spawn")
    ready, done, go, appended = ctx.Event(), ctx.Event(), ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_appender, args=(db, str(tmp_path / "rows.arrow"), 4, ready, done, go, appended))
    proc.start()
    assert ready.wait(60)
    # the race, made certain: repool's first derivation lets the appender go and waits for one of its
    # commits, so the first add_columns commit must lose to it and be retried from the newer version
    from kalm_store import repool as repool_module

    real_batch, calls = repool_module.repool_batch, []

    def first_waits_for_an_append(batch, *args):
        if not calls:
            go.set()
            assert appended.wait(60), "no append landed within 60 s"
        calls.append(batch.num_rows)
        return real_batch(batch, *args)

    monkeypatch.setattr(repool_module, "repool_batch", first_waits_for_an_append)
    result = repool_store(store, 4, 8, batch_size=16)
    proc.join(60)
    assert proc.exitcode == 0 and done.is_set()
    assert result.conflicts >= 1  # the commit lost the race at least once and was derived again
    assert sum(calls) >= 80 + result.rows  # the lost attempt derived the first 80 rows, the winner all it saw
    assert result.ratios == [4, 8] and result.rows > 80  # the winning derivation saw appended rows

    store.refresh()
    rows = store.table.to_lance().to_table(columns=["id", "n_tokens", "kalm_r4", "kalm_r8"])
    ids = rows.column("id").to_pylist()
    assert sorted(ids) == sorted(r["id"] for r in corpus) and len(ids) == len(set(ids))  # nothing lost
    want4 = dict(zip(store.encode_records(corpus[:80]).column("id").to_pylist(),
                     store.encode_records(corpus[:80]).column("kalm_r4").to_pylist()))
    want4 |= dict(zip(later.column("id").to_pylist(), later.column("kalm_r4").to_pylist()))
    assert all(rows.column("kalm_r4")[i].as_py() == want4[pid] for i, pid in enumerate(ids))  # r=4 untouched
    null8 = [pid for pid, v in zip(ids, rows.column("kalm_r8").to_pylist()) if v is None]
    assert set(null8) <= {r["id"] for r in corpus[80:]}  # only rows appended after the winning commit
    filled = rows.filter(rows.column("kalm_r8").is_valid())
    m4 = decode_rows(filled, 4, store.dim)
    m8 = decode_rows(filled, 8, store.dim)
    for n_tok, a, b in zip(filled.column("n_tokens").to_pylist(), m4, m8):
        assert b.shape[0] == pooled_rows(n_tok, 8)
        np.testing.assert_allclose(b.astype(np.float32), repool(a, n_tok, 4, 8).astype(np.float32),
                                   rtol=1e-3, atol=1e-3)
    if null8:
        with pytest.raises(CorruptMatrixError, match=rf"passage id '{null8[0]}', column kalm_r8: no stored"):
            store.matrices([null8[0]], ratio=8)
        drop_ratio(store, 8)
        repool_store(store, 4, 8)
    assert store.table.to_lance().to_table(columns=["kalm_r8"]).column(0).null_count == 0


# ====================================================================== 5. input errors, through the CLI
def _cli(argv: list[str], capsys) -> tuple[int, str, str]:
    from kalm_store.cli import main

    code = main(argv)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


GOOD = '{"id": "g1", "text": "fine"}\n'


@pytest.mark.parametrize("name, content, vector, match", [
    ("utf8.jsonl", GOOD.encode() + b'{"id": "x", "text": "caf\xe9"}\n', False, r"utf8\.jsonl:2: not valid JSON"),
    ("missing_id.jsonl", GOOD + '{"text": "no id"}\n', False, r"missing_id\.jsonl:2: missing id field 'id'"),
    ("missing_text.jsonl", GOOD + '{"id": "x"}\n', False, r"missing_text\.jsonl:2: missing text field 'text'"),
    ("text_type.jsonl", GOOD + '{"id": "x", "text": ["a"]}\n', False,
     r"text_type\.jsonl:2: text field 'text' must be a string, got list"),
    ("id_type.jsonl", GOOD + '{"id": {"a": 1}, "text": "t"}\n', False,
     r"id_type\.jsonl:2: id field 'id' must be a non-empty string"),
    ("not_object.jsonl", GOOD + '"just a string"\n', False, r"not_object\.jsonl:2: expected a JSON object"),
    ("width.jsonl", '{"id": "g1", "text": "t", "v": [1, 2, 3]}\n{"id": "x", "text": "t", "v": [1, 2]}\n', True,
     r"width\.jsonl:2: vector field 'v' has 2 values; the table's vectors have 3"),
    ("nan.jsonl", '{"id": "g1", "text": "t", "v": [1, 2]}\n{"id": "x", "text": "t", "v": [1, NaN]}\n', True,
     r"nan\.jsonl:2: vector field 'v'\[1\] is nan"),
    ("overflow.jsonl", '{"id": "g1", "text": "t", "v": [1, 2]}\n{"id": "x", "text": "t", "v": [1, -1e39]}\n', True,
     r"overflow\.jsonl:2: vector field 'v'\[1\] is -1e\+39, beyond float32"),
    ("null_text.jsonl", GOOD + '{"id": "x", "text": null}\n', False, r"null_text\.jsonl:2: text field 'text' is null"),
    ("vec_type.jsonl", '{"id": "g1", "text": "t", "v": [1, 2]}\n{"id": "x", "text": "t", "v": "1,2"}\n', True,
     r"vec_type\.jsonl:2: vector field 'v' must be a list of numbers"),
    ("empty.jsonl", "", False, r"empty\.jsonl' holds no records"),
    ("blank.jsonl", "\n\n  \n", False, r"blank\.jsonl' holds no records"),
])
def test_bad_input_names_file_and_line(tmp_path, tiny_model_dir, capsys, name, content, vector, match):
    inp = tmp_path / name
    inp.write_bytes(content if isinstance(content, bytes) else content.encode())
    argv = ["build", str(inp), "--db", str(tmp_path / "db"), "--table", "t", "--model", str(tiny_model_dir),
            "--no-progress"] + (["--vector-field", "v"] if vector else [])
    code, _, err = _cli(argv, capsys)
    assert code == 1, err
    assert err.startswith("kalm-store build: error: ") and err.count("\n") == 1, err
    import re

    assert re.search(match, err), err


# ====================================================================== 6. security
SOURCES = sorted(p for d in ("kalm_store", "plugins") for p in (PACKAGE / d).rglob("*.py"))


@pytest.mark.parametrize("pattern, why", [
    (r"trust_remote_code\s*=\s*True", "remote code from a checkpoint would run"),
    (r"^\s*import pickle|^\s*from pickle|\bpickle\.(load|loads)\b|cloudpickle|\bdill\b",
     "pickle runs code on load"),
    (r"torch\.load\((?![^)]*weights_only\s*=\s*True)", "torch.load without weights_only=True unpickles"),
    (r"shell\s*=\s*True", "a shell would interpolate paths"),
    (r"os\.system\(|os\.popen\(|commands\.getoutput", "a shell would interpolate paths"),
    (r"(?<![.\w])(eval|exec)\(", "input must never be evaluated"),
    (r"np\.load\([^)]*allow_pickle\s*=\s*True", "allow_pickle unpickles"),
    (r"use_safetensors\s*=\s*False", "weights only from safetensors"),
])
def test_no_dangerous_calls_in_the_package(pattern, why):
    import re

    assert SOURCES, "package sources not found"
    hits = [f"{p.relative_to(PACKAGE)}:{i}: {line.strip()}" for p in SOURCES
            for i, line in enumerate(p.read_text().splitlines(), 1)
            if re.search(pattern, line) and not line.lstrip().startswith("#")]
    assert not hits, f"{why}: {hits}"


def test_from_pretrained_loads_safetensors_only(tiny_model_dir, tmp_path):
    """A folder with only pytorch_model.bin (a pickle) is refused before anything is unpickled."""
    from kalm_store.model import KaLMModel, ModelLoadError

    folder = tmp_path / "bin_only"
    shutil.copytree(tiny_model_dir, folder)
    for st in folder.glob("*.safetensors"):
        st.unlink()
    # a pickle that would create a file if it were ever loaded
    marker = tmp_path / "pwned"
    payload = (b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")
    (folder / "pytorch_model.bin").write_bytes(payload)
    with pytest.raises(ModelLoadError, match="safetensors"):
        KaLMModel.from_pretrained(folder)
    assert not marker.exists()


def test_hub_downloads_fetch_no_pickles_or_code(tiny_model_dir, tmp_path, monkeypatch):
    """A hub repo that also holds pickles and code: only safetensors, json and tokenizer files come down,
    and the model loads from them. The download is the real allow-list applied by a stand-in hub."""
    import fnmatch

    import huggingface_hub

    from kalm_store.model import KaLMModel

    repo = tmp_path / "hub_repo"
    shutil.copytree(tiny_model_dir, repo)
    hostile = ["pytorch_model.bin", "model.pt", "modeling_evil.py", "weights.pkl", "model.ckpt", "x.pth"]
    for name in hostile:
        (repo / name).write_bytes(b"cos\nsystem\n(S'true'\ntR.")
    asked = []

    def snapshot_download(repo_id, *, revision=None, allow_patterns=None, local_files_only=False, **kw):
        asked.append((repo_id, allow_patterns))
        snap = tmp_path / "cache" / "abc123"  # a snapshot folder is named by its commit hash
        snap.mkdir(parents=True, exist_ok=True)
        for f in repo.iterdir():  # the hub's rule: a file comes down when any allow pattern matches it
            if allow_patterns is None or any(fnmatch.fnmatch(f.name, pat) for pat in allow_patterns):
                shutil.copy(f, snap / f.name)
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    model = KaLMModel.from_pretrained("org/tiny")
    fetched = sorted(f.name for f in (tmp_path / "cache" / "abc123").iterdir())
    assert asked and asked[0][0] == "org/tiny"
    assert not set(hostile) & set(fetched), fetched
    assert "model.safetensors" in fetched and "config.json" in fetched and "tokenizer.json" in fetched
    assert model.revision == "abc123" and model.score("q", model.encode(["a passage"], 4)).shape == (1,)


_AUDIT = r"""
import json, os, sys
PKG = tuple(os.path.join(sys.argv[1], d) + os.sep for d in ("kalm_store", "plugins"))
found, loads = [], []

def ours(frame):
    return frame is not None and frame.f_code.co_filename.startswith(PKG)

def via_ours(frame):
    while frame is not None:
        if ours(frame):
            return True
        frame = frame.f_back
    return False

def hook(event, args):
    if event in ("os.system", "os.exec", "os.posix_spawn", "os.spawn") and via_ours(sys._getframe(1)):
        found.append(f"{event} {args!r:.200}")
    elif event == "subprocess.Popen" and via_ours(sys._getframe(1)) and args[0] in ("/bin/sh", "sh", "/bin/bash"):
        found.append(f"shell {args!r:.200}")
    elif event == "pickle.find_class" and via_ours(sys._getframe(1)):
        found.append(f"unpickling {args!r:.200}")
    elif event in ("exec", "compile") and ours(sys._getframe(1)):  # eval/exec called by our own code
        found.append(f"{event} from {sys._getframe(1).f_code.co_filename}")

sys.addaudithook(hook)
import torch, transformers
def spy(cls):
    real = cls.from_pretrained
    def from_pretrained(*a, **kw):
        loads.append({"cls": cls.__name__, "trust_remote_code": kw.get("trust_remote_code"),
                      "use_safetensors": kw.get("use_safetensors")})
        return real(*a, **kw)
    cls.from_pretrained = from_pretrained
for name in ("AutoConfig", "AutoTokenizer", "AutoModelForSeq2SeqLM"):
    spy(getattr(transformers, name))
real_load = torch.load
torch.load = lambda *a, **kw: found.append("torch.load") or real_load(*a, **kw)

from kalm_store.cli import main
m, db, corpus, q = sys.argv[2:6]
steps = [["build", corpus, "--db", db, "--table", "docs", "--model", m, "--ratio", "4", "--no-progress"],
         ["search", "json file", "--db", db, "--table", "docs", "--model", m, "--mode", "fts", "-k", "2", "--json"],
         ["verify", "--db", db, "--table", "docs", "--no-progress"],
         ["repool", "--db", db, "--table", "docs", "--from", "4", "--to", "8"],
         ["plan", corpus, "--model", m, "--sample", "4", "--ratios", "1,4", "--queries", q, "--json"],
         ["info", "--db", db, "--table", "docs", "--json"]]
codes = [main(argv) for argv in steps]
print("AUDIT" + json.dumps({"codes": codes, "found": found, "loads": loads}))
"""


def test_the_cli_runs_no_shell_pickle_eval_or_remote_code(tmp_path, tiny_model_dir):
    """Behaviour, not source text: build, search, verify, repool, plan and info run under a Python audit
    hook that records every shell, os.system/exec, unpickling and torch.load reached through kalm-store's
    code and every eval/exec/compile it calls itself; and every transformers load says how it was asked."""
    corpus = write_jsonl(tmp_path / "c.jsonl", make_corpus(12, seed=2))
    queries = tmp_path / "q.jsonl"
    queries.write_text('{"id": "q", "text": "json file"}\n')
    proc = subprocess.run([sys.executable, "-c", _AUDIT, str(PACKAGE), str(tiny_model_dir), str(tmp_path / "db"),
                           str(corpus), str(queries)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.split("AUDIT", 1)[1])
    assert report["codes"] == [0] * 6, (report["codes"], proc.stderr[-2000:])
    assert report["found"] == []
    loads = report["loads"]
    assert {x["cls"] for x in loads} == {"AutoConfig", "AutoTokenizer", "AutoModelForSeq2SeqLM"}, loads
    assert not any(x["trust_remote_code"] for x in loads), loads
    assert all(x["use_safetensors"] is True for x in loads if x["cls"] == "AutoModelForSeq2SeqLM"), loads


def test_hostile_file_names_are_data_not_commands(tmp_path, tiny_model_dir, capsys, monkeypatch):
    """Paths with shell metacharacters are opened as files, never run or interpolated into a shell."""
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "pwned"
    name = "c; touch pwned; $(touch pwned) `touch pwned` '\"|&>x.jsonl"
    inp = write_jsonl(tmp_path / name, make_corpus(3))
    db = tmp_path / "db $(touch pwned); touch pwned"
    code, out, err = _cli(["build", str(inp), "--db", str(db), "--table", "docs", "--model", str(tiny_model_dir),
                           "--no-progress", "--no-fts-index"], capsys)
    assert code == 0, err
    assert "wrote 3" in out and not marker.exists()


def test_skip_bad_continues_and_reports_each_line(tmp_path, tiny_model_dir, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    inp = tmp_path / "mixed.jsonl"
    inp.write_bytes(b"".join([
        b'{"id": "a", "text": "first good", "v": [1, 2]}\n',
        b'{"id": "b", "text": "caf\xe9", "v": [1, 2]}\n',  # 2: invalid UTF-8
        b'{"id": "c", "text": "good", "v": [1, 2]}\n',
        b'not json\n',  # 4
        b'{"id": "d", "v": [1, 2]}\n',  # 5: no text
        b'{"id": "e", "text": 7, "v": [1, 2]}\n',  # 6: wrong type
        b'{"id": "f", "text": "t", "v": [1]}\n',  # 7: wrong width
        b'{"id": "g", "text": "t", "v": [NaN, 1]}\n',  # 8: NaN
        b'[1, 2]\n',  # 9: not an object
        b'{"id": "h", "text": "last good", "v": [3, 4]}\n',
    ]))
    base = ["build", str(inp), "--db", str(tmp_path / "db"), "--table", "docs", "--model", str(tiny_model_dir),
            "--vector-field", "v", "--no-progress", "--chunk-size", "2"]
    code, out, err = _cli(base + ["--skip-bad"], capsys)
    assert code == 0, err
    assert "wrote 3" in out and "7 bad" in out and "report: docs.skipped.jsonl" in out
    report = [json.loads(x) for x in (tmp_path / "docs.skipped.jsonl").read_text().splitlines()]
    assert [r["where"].rsplit(":", 1)[1] for r in report] == ["2", "4", "5", "6", "7", "8", "9"]
    assert all(r["where"].startswith(str(inp)) for r in report)
    assert [r["id"] for r in report] == [None, None, "d", "e", "f", "g", None]
    assert "not valid JSON" in report[0]["error"] and "has 1 values" in report[4]["error"]
    from kalm_store.store import PassageStore

    assert sorted(PassageStore.open(str(tmp_path / "db"), "docs").all_ids()) == ["a", "c", "h"]
    # an explicit report path; a resumed run rewrites it and adds no rows
    code, out, err = _cli(base + ["--skip-bad", "--skip-report", str(tmp_path / "r.jsonl")], capsys)
    assert code == 0 and "wrote 0" in out and len((tmp_path / "r.jsonl").read_text().splitlines()) == 7
    code, _, err = _cli(base + ["--skip-report", "x.jsonl"], capsys)
    assert code == 1 and "--skip-report needs --skip-bad" in err


def test_truncation_is_counted_and_reported(tmp_path, tiny_model_dir, capsys):
    inp = write_jsonl(tmp_path / "c.jsonl", [{"id": "short", "text": "yes"},
                                              {"id": "long", "text": " ".join(WORDS * 10)},
                                              {"id": "long2", "text": " ".join(WORDS * 3)}])
    code, out, err = _cli(["build", str(inp), "--db", str(tmp_path / "db"), "--table", "docs", "--model",
                           str(tiny_model_dir), "--max-length", "32", "--no-progress"], capsys)
    assert code == 0, err
    assert "2 passages cut at max_length 32 tokens" in out
    from kalm_store.store import PassageStore

    rows = PassageStore.open(str(tmp_path / "db"), "docs").table.to_arrow()
    assert max(rows.column("n_tokens").to_pylist()) == 32
