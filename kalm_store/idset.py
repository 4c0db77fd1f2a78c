"""An exact set of passage ids on disk, so that a build's memory does not grow with the corpus.

A build needs two sets of ids: those stored before it started (resume, idempotence and
``--delete-missing``) and those it has seen in its input (the duplicate-id rule: the first
occurrence wins). Held as Python sets they cost about 100 bytes per id, 100 GB at a billion
passages. :class:`IdSet` keeps both in one SQLite table in a temporary file instead (one row per id,
a bit for "stored", a bit for "seen"), with a bounded page cache, queried one chunk of ids at a time;
the file's name is removed as soon as it is open (the space goes when the set is closed or the process
ends, even by SIGKILL), so no build leaves files behind in ``TMPDIR``. Lookups are exact (no hashing, no false positives).

Stored ids are streamed into it from the table's ``id`` column in batches, never materialised in
Python. The file lives under the system temporary directory (``TMPDIR``), or the ``directory`` given;
it takes about ``1.3 x (id length + 8)`` bytes per id (about 30 GB for a billion 16-character ids).
A full disk stops the build with an error naming the file and ``TMPDIR``. Where the temporary
directory is a tmpfs (held in RAM), point ``TMPDIR`` at a disk folder for large builds.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

STORED, SEEN = 1, 2  # bits of the ``f`` column
CACHE_MIB = 32  # SQLite page cache: what the set holds in memory, whatever the number of ids
STREAM_ROWS = 65536  # stored ids read from the table per batch
_VARS = 900  # ids per "IN (...)" lookup (below SQLite's oldest limit on bound variables, 999)

Verdict = Literal["new", "duplicate", "stored"]


class IdSetFullError(OSError):
    """The disk holding the id set's file is full."""


class IdSet:
    """Ids stored before this build and ids seen in its input, exact, on disk.

    Parameters
    ----------
    directory : str or Path, optional
        Folder of the temporary file; default ``None``: the system temporary directory (``TMPDIR``).
    cache_mib : int, default 32
        SQLite page cache in MiB: the memory the set uses, whatever the number of ids.

    Examples
    --------
    >>> from kalm_store.idset import IdSet
    >>> with IdSet() as ids:
    ...     ids.add_stored(["a", "b"])
    ...     ids.classify(["b", "c", "c"])
    ['stored', 'new', 'duplicate']
    """

    def __init__(self, directory: str | Path | None = None, *, cache_mib: int = CACHE_MIB) -> None:
        if isinstance(cache_mib, bool) or not isinstance(cache_mib, int) or cache_mib < 1:
            raise ValueError(f"cache_mib must be a positive int, got {cache_mib!r}")
        folder = _folder(directory)
        try:
            fd, name = tempfile.mkstemp(prefix="kalm-store-ids-", suffix=".sqlite", dir=folder)
        except OSError as e:
            raise OSError(e.errno, f"cannot make the build's id set in {folder!r} ({e.strerror}): give a "
                                   "writable folder (TMPDIR) and run the same command again") from e
        os.close(fd)
        self.path = Path(name)  # where the file is made; its name is removed once SQLite holds it open
        self.stored_count = 0  # distinct ids added with add_stored
        self.seen_count = 0  # distinct ids classify has seen
        # the table version whose ids add_stored received (of_table), None when unknown: the builder
        # appends without Lance's id join while the table is still at it (kalm_store.commit)
        self.version: int | None = None
        # isolation_level=None: no implicit transactions; each batch below is one explicit transaction
        self._db: sqlite3.Connection | None = sqlite3.connect(name, isolation_level=None, check_same_thread=False)
        try:
            for pragma in (f"cache_size = -{cache_mib * 1024}",  # negative: KiB
                           "mmap_size = 0",  # mapped pages would count in the resident memory
                           "journal_mode = OFF", "synchronous = OFF",  # a crash discards the file anyway
                           "locking_mode = EXCLUSIVE", "temp_store = FILE"):
                self._db.execute(f"PRAGMA {pragma}")
            self._db.execute("CREATE TABLE ids (id TEXT PRIMARY KEY, f INTEGER NOT NULL) WITHOUT ROWID")
        except BaseException:
            self.close()
            raise
        # the open connection keeps the file; its name goes now, so that a build killed (SIGKILL, OOM
        # killer) leaves nothing in TMPDIR: the kernel frees the space when the process ends
        _unlink_open(self.path)

    # --------------------------------------------------------------------------------------- building
    @classmethod
    def of_table(cls, table: Any, directory: str | Path | None = None, *, batch_rows: int | None = None) -> IdSet:
        """An id set holding every id of the LanceDB ``table`` as stored: its ``id`` column streamed
        in batches of ``batch_rows`` (default :data:`STREAM_ROWS`; the memory it takes), never read whole."""
        ids = cls(directory)
        try:
            ids.add_table(table, batch_rows=batch_rows)
        except BaseException:
            ids.close()
            raise
        return ids

    def add_table(self, table: Any, *, batch_rows: int | None = None) -> None:
        """Record every id of the LanceDB ``table`` as stored (streamed as in :meth:`of_table`), and its
        version as :attr:`version`."""
        ds = table.to_lance()  # pinned: exactly the ids of this version
        if ds.count_rows():
            for batch in ds.to_batches(columns=["id"], batch_size=batch_rows or STREAM_ROWS):
                self.add_stored(batch.column(0).to_pylist())
        self.version = ds.version

    def add_stored(self, ids: Iterable[str]) -> None:
        """Record ``ids`` as stored before this build (repeats are ignored)."""
        rows = [(i,) for i in ids]
        if not rows:
            return
        with self._write():
            cur = self._conn.executemany(f"INSERT OR IGNORE INTO ids (id, f) VALUES (?, {STORED})", rows)
            self.stored_count += max(cur.rowcount, 0)

    # ---------------------------------------------------------------------------------------- queries
    def classify(self, ids: Sequence[str]) -> list[Verdict]:
        """One verdict per id of a chunk, in order, and the first occurrences marked as seen.

        ``"duplicate"``: seen earlier (in an earlier chunk or earlier in this one); otherwise
        ``"stored"`` when stored before this build, else ``"new"``.
        """
        if isinstance(ids, str):
            raise TypeError(f"ids must be a sequence of id strings, got the string {ids!r}")
        flags = self._flags(list(dict.fromkeys(ids)))
        out: list[Verdict] = []
        first: list[tuple[str]] = []
        for i in ids:
            f = flags.get(i, 0)
            if f & SEEN:
                out.append("duplicate")
                continue
            flags[i] = f | SEEN
            first.append((i,))
            out.append("stored" if f & STORED else "new")
        if first:
            with self._write():
                self._conn.executemany(f"INSERT INTO ids (id, f) VALUES (?, {SEEN}) "
                                       f"ON CONFLICT (id) DO UPDATE SET f = f | {SEEN}", first)
            self.seen_count += len(first)
        return out

    def missing(self, batch: int = 1000) -> Iterator[list[str]]:
        """Ids stored before this build that its input did not hold, in lists of ``batch``, sorted
        (SQLite orders text by its UTF-8 bytes, which is Python's order of ``str``)."""
        cur = self._conn.execute(f"SELECT id FROM ids WHERE f = {STORED} ORDER BY id")
        try:
            while rows := cur.fetchmany(batch):
                yield [r[0] for r in rows]
        finally:
            cur.close()

    def missing_count(self) -> int:
        """How many ids :meth:`missing` yields (one scan of the file)."""
        return int(self._conn.execute(f"SELECT count(*) FROM ids WHERE f = {STORED}").fetchone()[0])

    # ---------------------------------------------------------------------------------------- the file
    def close(self) -> None:
        """Close and delete the file (repeatable)."""
        if self._db is not None:
            self._db.close()
            self._db = None
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> IdSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # a set dropped without close() still removes its file
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown: nothing left to report to
            pass

    @property
    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise ValueError(f"the id set {str(self.path)!r} is closed")
        return self._db

    def _flags(self, ids: list[str]) -> dict[str, int]:
        out: dict[str, int] = {}
        for k in range(0, len(ids), _VARS):
            part = ids[k:k + _VARS]
            sql = f"SELECT id, f FROM ids WHERE id IN ({', '.join('?' * len(part))})"
            out.update(self._conn.execute(sql, part).fetchall())
        return out

    def _write(self) -> _Transaction:
        return _Transaction(self)


def _folder(directory: str | Path | None) -> str:
    """The id set's folder: ``directory``, else ``TMPDIR`` when set, else the system's temporary folder.

    A ``TMPDIR`` that is no writable folder is refused, naming it: Python's :mod:`tempfile` would instead
    fall back to ``/tmp`` without a word, which may be a small tmpfs held in RAM, the very thing a large
    build's ``TMPDIR`` is set to avoid.
    """
    if directory is not None:
        return str(directory)
    env = os.environ.get("TMPDIR")
    if env and not (os.path.isdir(env) and os.access(env, os.W_OK | os.X_OK)):
        what = "is not a folder" if not os.path.isdir(env) else "is not writable"
        raise NotADirectoryError(f"TMPDIR={env!r} {what}: the build's id set (about 1.3 x (id length + 8) "
                                 "bytes per id) goes there; create it, point TMPDIR at a writable folder, or "
                                 "unset it, and run the same command again")
    return tempfile.gettempdir()


def _unlink_open(path: Path) -> bool:
    """Remove the name of the open file ``path``; False where the system refuses (Windows: then
    :meth:`IdSet.close` removes it)."""
    try:
        path.unlink()
    except PermissionError:
        return False
    return True


class _Transaction:
    """One explicit transaction around a batch of writes; a full disk becomes :class:`IdSetFullError`."""

    def __init__(self, ids: IdSet) -> None:
        self.ids = ids

    def __enter__(self) -> None:
        self.ids._conn.execute("BEGIN")

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: object) -> None:
        conn = self.ids._conn
        if kind is None:
            try:
                conn.execute("COMMIT")
                return
            except sqlite3.Error as e:
                error = e
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        if isinstance(error, sqlite3.OperationalError) and "full" in str(error).lower():
            raise IdSetFullError(f"no space left for the build's id set {str(self.ids.path)!r} (its name removed "
                                 "once open, its space freed when the build ends) "
                                 f"({self.ids.stored_count + self.ids.seen_count} ids so far, about 1.3 x (id "
                                 "length + 8) bytes each): free disk space there, or set TMPDIR to a folder "
                                 "with more room and run the same command again") from error
        if kind is None and error is not None:
            raise error


__all__ = ["IdSet", "IdSetFullError", "Verdict"]
