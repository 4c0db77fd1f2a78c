"""The index step's bounded memory (kalm_store.index_memory): the pool setting itself, that kalm-store's
index builds run under it, and that a BTREE index sorted in a pool small enough to spill answers
lookups exactly as a scan does."""

from __future__ import annotations

import hashlib
import json
import os

import pyarrow as pa
import pytest

from kalm_store.index_memory import ENV, INDEX_POOL_BYTES, bounded_index_memory, release_unused_memory


@pytest.fixture
def no_pool_env(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)


def test_pool_is_set_inside_and_removed_after(no_pool_env):
    with bounded_index_memory() as pool:
        assert pool == INDEX_POOL_BYTES == 32 * 2**20
        assert os.environ[ENV] == str(INDEX_POOL_BYTES)
        with bounded_index_memory(1 << 20) as inner:  # nested: the outer block's value stays
            assert inner == INDEX_POOL_BYTES and os.environ[ENV] == str(INDEX_POOL_BYTES)
        assert os.environ[ENV] == str(INDEX_POOL_BYTES)
    assert ENV not in os.environ


def test_pool_is_removed_after_an_error(no_pool_env):
    with pytest.raises(RuntimeError, match="boom"):
        with bounded_index_memory():
            raise RuntimeError("boom")
    assert ENV not in os.environ


def test_a_pool_the_user_exported_is_kept(monkeypatch):
    monkeypatch.setenv(ENV, "1073741824")
    with bounded_index_memory() as pool:
        assert pool == 1 << 30 and os.environ[ENV] == "1073741824"
    assert os.environ[ENV] == "1073741824"


def test_a_pool_that_is_not_bytes_is_refused(monkeypatch):
    monkeypatch.setenv(ENV, "1GB")
    with pytest.raises(ValueError, match=r"LANCE_MEM_POOL_SIZE='1GB' is not a number of bytes"):
        with bounded_index_memory():
            pass
    with pytest.raises(ValueError, match="pool_bytes must be a positive int"):
        with bounded_index_memory(0):
            pass


def test_release_unused_memory_runs():
    assert release_unused_memory() in (True, False)
    if os.path.exists("/lib/x86_64-linux-gnu/libc.so.6") or os.path.exists("/lib/aarch64-linux-gnu/libc.so.6"):
        assert release_unused_memory() is True  # glibc has malloc_trim


def _digest_table(n: int) -> pa.Table:
    texts = [f"passage {i % (n // 2)}" for i in range(n)]  # every text twice: a lookup finds two rows
    return pa.table({"id": [f"p{i:07d}" for i in range(n)], "text": texts,
                     "text_digest": pa.array([hashlib.blake2b(t.encode(), digest_size=8).digest() for t in texts],
                                             pa.binary(8))})


def _lookup(ds, column: str, values: list, *, index: bool) -> list[tuple]:
    lit = (lambda v: f"X'{v.hex()}'") if column == "text_digest" else (lambda v: f"'{v}'")
    where = f"{column} IN ({', '.join(lit(v) for v in values)})"
    if index:
        assert "ScalarIndexQuery" in ds.scanner(filter=where, columns=["id"]).explain_plan()
    rows = ds.to_table(columns=list(dict.fromkeys(["id", column])), filter=where, use_scalar_index=index).to_pylist()
    return sorted((r["id"], r[column]) for r in rows)


@pytest.mark.parametrize("column", ["text_digest", "id"])
def test_btree_sorted_in_a_spilling_pool_answers_as_a_scan(tmp_path, monkeypatch, column):
    """200k rows (about 7 MB to sort) in a 1 MiB pool: Lance's sort spills; the index built that way, and
    its incremental update under the same pool, must find exactly the rows a full scan finds."""
    import lance

    monkeypatch.delenv(ENV, raising=False)
    n = 200_000
    table = _digest_table(n)
    ds = lance.write_dataset(table, tmp_path / "t.lance", max_rows_per_file=50_000)
    with bounded_index_memory(1 << 20):
        ds.create_scalar_index(column, "BTREE")
    ds = lance.dataset(tmp_path / "t.lance")
    values = table.column(column).to_pylist()
    probe = values[::9973] + values[-3:] + ([b"\x00" * 8] if column == "text_digest" else ["absent"])
    found = _lookup(ds, column, probe, index=True)
    assert found == _lookup(ds, column, probe, index=False)
    assert len(found) == len(set(found)) >= len(probe) - 1  # each present value found (digests: both rows)

    more = _digest_table(n + 20_000).slice(n)  # new ids; texts repeat the stored ones
    ds = lance.write_dataset(more, tmp_path / "t.lance", mode="append")
    with bounded_index_memory(1 << 20):
        ds.optimize.optimize_indices(index_names=[f"{column}_idx"])
    ds = lance.dataset(tmp_path / "t.lance")
    assert ds.stats.index_stats(f"{column}_idx")["num_unindexed_rows"] == 0
    probe += more.column(column).to_pylist()[::997]
    assert _lookup(ds, column, probe, index=True) == _lookup(ds, column, probe, index=False)


def test_update_indices_builds_under_the_pool(model, tiny_model_dir, tmp_path, monkeypatch):
    """The builder's index step (finish_build -> PassageStore.update_indices) runs every index creation and
    update with Lance's pool at INDEX_POOL_BYTES, and leaves the variable as it found it."""
    from kalm_store.build import BuildOptions, build

    monkeypatch.delenv(ENV, raising=False)
    import lancedb.table

    seen: list[tuple[str, str | None]] = []
    create = lancedb.table.LanceTable.create_index

    def recording_create(self, column, *args, **kwargs):
        seen.append((column, os.environ.get(ENV)))
        return create(self, column, *args, **kwargs)

    monkeypatch.setattr(lancedb.table.LanceTable, "create_index", recording_create)
    inp = tmp_path / "c.jsonl"
    inp.write_text("".join(json.dumps({"id": f"p{i}", "text": f"passage number {i}"}) + "\n" for i in range(6)))
    summary = build(BuildOptions(str(inp), str(tmp_path / "db"), "docs", model=str(tiny_model_dir),
                                 chunk_size=4, progress=False), model=model)
    assert sorted(summary.indices) == ["id_idx", "text_digest_idx", "text_idx"]
    assert sorted(seen) == [("id", str(INDEX_POOL_BYTES)), ("text", str(INDEX_POOL_BYTES)),
                            ("text_digest", str(INDEX_POOL_BYTES))]
    assert ENV not in os.environ


def test_lance_reads_the_pool_set_in_the_block(tmp_path, monkeypatch):
    """The setting reaches Lance's sort: a 1 KiB pool cannot hold one batch, so the build fails, and the
    same build after the block (Lance's default pool) succeeds."""
    import lance

    monkeypatch.delenv(ENV, raising=False)
    ds = lance.write_dataset(_digest_table(100_000), tmp_path / "t.lance")
    with bounded_index_memory(1024):
        with pytest.raises(Exception, match="(?i)resources exhausted|memory"):
            ds.create_scalar_index("text_digest", "BTREE")
    ds.create_scalar_index("text_digest", "BTREE")
    assert lance.dataset(tmp_path / "t.lance").stats.index_stats("text_digest_idx")["num_unindexed_rows"] == 0


# A fresh interpreter frees an 8 MiB block (mapped; freeing it raises glibc's dynamic mmap threshold
# to 8 MiB), then asks for a 4 MiB block: it comes from the heap (no new mapping). glibc maps a block
# only when the heap's free top cannot hold it, so the next asks are larger (6 MiB inside the block,
# 7 MiB after it): with the threshold fixed at 32 KiB, then 128 KiB, each is mapped on its own.
_MMAP_PROBE = """
import ctypes, json
from kalm_store.index_memory import bounded_index_memory
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def mapped(n):
    before = libc.mallinfo2().hblks
    p = libc.malloc(n)
    grew = libc.mallinfo2().hblks - before
    libc.free(p)
    return grew
libc.free(libc.malloc(8 << 20))
out = {"outside": mapped(4 << 20)}
with bounded_index_memory():
    out["inside"] = mapped(6 << 20)
out["after"] = mapped(7 << 20)
print(json.dumps(out))
"""


@pytest.mark.skipif(not os.path.exists("/lib/x86_64-linux-gnu/libc.so.6")
                    and not os.path.exists("/lib/aarch64-linux-gnu/libc.so.6"), reason="glibc's malloc only")
@pytest.mark.parametrize("exported, want", [
    (None, {"outside": 0, "inside": 1, "after": 1}),
    # the user's threshold (read by glibc at start-up) is kept: the blocks stay in the heap throughout
    ("16777216", {"outside": 0, "inside": 0, "after": 0}),
])
def test_block_fixes_glibc_mmap_threshold(exported, want):
    import subprocess
    import sys

    from kalm_store.index_memory import MALLOC_ENV

    env = {k: v for k, v in os.environ.items() if k != MALLOC_ENV}
    if exported is not None:
        env[MALLOC_ENV] = exported
    out = subprocess.run([sys.executable, "-c", _MMAP_PROBE], env=env, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == want


def test_set_mmap_threshold_refuses_a_negative_size():
    from kalm_store.index_memory import set_mmap_threshold

    with pytest.raises(ValueError, match="nbytes must be a non-negative int"):
        set_mmap_threshold(-1)
