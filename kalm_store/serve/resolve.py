"""From posted documents to pooled matrices: stored rows by text digest or id, other texts encoded online.

A posted text is looked up by its ``text_digest`` (a BTREE scalar index makes that an index probe);
a row is used only when its stored text equals the posted text (a digest collision, or a row whose
text changed behind kalm-store's back, is never scored as the posted text) and its matrix at the
served ratio is not null. ``{"id": ...}`` documents are looked up by id. Texts the table does not hold
are encoded by the model's encoder and kept in a byte-bounded LRU of pooled matrices.

Whichever way a matrix comes, it is the float16 matrix :meth:`KaLMModel.encode` gives the text at the
served ratio, so a document scores the same from the store, the encoder or the cache.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.compute as pc

from .. import schema
from ..store import MissingRowError, StoreMismatchError, check_compatible, check_ratio_stored, decode_rows, sql_in
from ..store import text_digest as digest_of

if TYPE_CHECKING:  # pragma: no cover
    from ..model import KaLMModel
    from ..store import PassageStore

SOURCES = ("stored", "encoded", "cached")


@dataclass(frozen=True)
class Document:
    """One posted document: a text, or the id of a stored row."""

    text: str | None = None
    id: str | None = None


@dataclass
class Resolved:
    """What :meth:`Resolver.resolve` returns, in the order of the posted documents."""

    matrices: list[np.ndarray]
    texts: list[str]  # the posted text, or the stored text of an id document
    ids: list[str | None]  # stored id when the matrix came from the table
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SOURCES, 0))


class MatrixCache:
    """Thread-safe LRU of pooled matrices keyed by text, bounded by bytes (matrix bytes + text bytes)."""

    def __init__(self, max_bytes: int) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"cache size must be a non-negative number of bytes, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def cost(text: str, matrix: np.ndarray) -> int:
        return int(matrix.nbytes) + len(text.encode("utf-8"))

    def get(self, text: str) -> np.ndarray | None:
        with self._lock:
            mat = self._items.get(text)
            if mat is not None:
                self._items.move_to_end(text)
            return mat

    def put(self, text: str, matrix: np.ndarray) -> None:
        cost = self.cost(text, matrix)
        if cost > self.max_bytes:
            return  # larger than the whole cache: never kept
        with self._lock:
            old = self._items.pop(text, None)
            if old is not None:
                self.bytes -= self.cost(text, old)
            self._items[text] = matrix
            self.bytes += cost
            while self.bytes > self.max_bytes:
                key, mat = self._items.popitem(last=False)
                self.bytes -= self.cost(key, mat)

    def __len__(self) -> int:
        return len(self._items)


class Resolver:
    """Turns posted documents into the matrices to score (see the module docstring).

    Parameters
    ----------
    store : PassageStore
        The served table.
    model : KaLMModel
        The model that built it (checked again whenever the table's version changes).
    ratio : int
        The stored ratio served.
    cache_bytes : int
        Bound of the LRU of online-encoded matrices.
    refresh_s : float, default 5.0
        How often (at most) to look for commits made by other writers.
    """

    def __init__(self, store: PassageStore, model: KaLMModel, ratio: int, cache_bytes: int, *,
                 refresh_s: float = 5.0, encode_batch_size: int = 16) -> None:
        self.store = store
        self.model = model
        self.ratio = ratio
        self.column = schema.column_name(ratio)
        self.cache = MatrixCache(cache_bytes)
        self.refresh_s = refresh_s
        self.encode_batch_size = encode_batch_size
        self._refreshed = time.monotonic()
        self._version = store.table.version
        self._lock = threading.Lock()
        # One encoder call at a time: concurrent calls would only oversubscribe the cores (or the GPU)
        # the scoring worker is using.
        self._encode_lock = threading.Lock()

    # ------------------------------------------------------------------ table
    def dataset(self) -> Any:
        """The table's Lance dataset, after seeing other writers' commits at most every ``refresh_s``."""
        with self._lock:
            now = time.monotonic()
            if now - self._refreshed >= self.refresh_s:
                self.store.refresh()
                self._refreshed = now
                version = self.store.table.version
                if version != self._version:  # a rebuilt table may belong to another model now
                    what = f"table {self.store.table.name!r}"
                    check_compatible(self.store.metadata, self.model, what=what)
                    check_ratio_stored(self.store.metadata, self.ratio, what=what)
                    self._version = version
        return self.store.dataset()  # opened once per version: a fresh one re-reads every file's metadata

    def _columns(self) -> list[str]:
        return ["id", "text", "n_tokens", self.column] + ([schema.DIGEST_COLUMN] if self.store.has_digests else [])

    def _decode(self, rows: Any) -> list[np.ndarray]:
        return decode_rows(rows, self.ratio, self.model.dim, self.store.metadata.get("max_length"))

    def by_text(self, texts: Sequence[str]) -> dict[str, tuple[str, np.ndarray]]:
        """Stored rows holding exactly these texts (with a matrix at the served ratio): text -> (id, matrix)."""
        if not texts or not self.store.has_digests:
            return {}
        wanted = list(dict.fromkeys(texts))
        found: dict[str, tuple[str, np.ndarray]] = {}
        ds = self.dataset()
        for start in range(0, len(wanted), 1000):
            part = wanted[start:start + 1000]
            where = f"{schema.DIGEST_COLUMN} IN (" + ", ".join(f"X'{digest_of(t).hex()}'" for t in part) + ")"
            rows = ds.to_table(columns=self._columns(), filter=where)
            if rows.num_rows == 0:
                continue
            # same text (not only the same digest) and a matrix at this ratio (null: an unfinished repool)
            keep = pc.and_(pc.is_in(rows.column("text"), value_set=_string_array(part)),
                           pc.is_valid(rows.column(self.column)))
            rows = rows.filter(keep)
            # and a digest that is its text's own: a row whose text was changed behind kalm-store's back
            # (stale matrix) is left to the encoder instead of failing the request
            fresh = [digest_of(t) == d for t, d in zip(rows.column("text").to_pylist(),
                                                     rows.column(schema.DIGEST_COLUMN).to_pylist())]
            rows = rows.filter(_bool_array(fresh))
            if rows.num_rows == 0:
                continue
            for text, pid, mat in zip(rows.column("text").to_pylist(), rows.column("id").to_pylist(),
                                      self._decode(rows)):
                found.setdefault(text, (pid, mat))
        return found

    def by_id(self, ids: Sequence[str]) -> dict[str, tuple[str, np.ndarray]]:
        """Stored rows of ``ids``: id -> (text, matrix); raises :class:`MissingRowError` naming unknown ids."""
        wanted = list(dict.fromkeys(ids))
        found: dict[str, tuple[str, np.ndarray]] = {}
        if wanted:
            ds = self.dataset()
            for start in range(0, len(wanted), 1000):
                rows = ds.to_table(columns=self._columns(), filter=sql_in("id", wanted[start:start + 1000]))
                nulls = [pid for pid, ok in zip(rows.column("id").to_pylist(),
                                                pc.is_valid(rows.column(self.column)).to_pylist()) if not ok]
                if nulls:
                    raise StoreMismatchError(f"stored id(s) {nulls[:10]} hold no matrix at r={self.ratio} yet "
                                             f"(an unfinished repool): finish it with `kalm-store repool`")
                for pid, text, mat in zip(rows.column("id").to_pylist(), rows.column("text").to_pylist(),
                                          self._decode(rows)):
                    found[pid] = (text, mat)
        missing = [i for i in wanted if i not in found]
        if missing:
            raise MissingRowError(f"unknown document id(s) {missing[:10]}: not in table {self.store.table.name!r}")
        return found

    # ------------------------------------------------------------------ documents
    def resolve(self, documents: Sequence[Document]) -> Resolved:
        """Matrices for ``documents``: stored rows first (by id, then by text), then the cache, then the encoder."""
        out = Resolved(matrices=[None] * len(documents), texts=[""] * len(documents),  # type: ignore[list-item]
                       ids=[None] * len(documents))
        ids = [d.id for d in documents if d.id is not None]
        stored_ids = self.by_id(ids) if ids else {}
        texts = [d.text for d in documents if d.id is None]
        stored_texts = self.by_text(texts)  # type: ignore[arg-type]
        unseen: dict[str, list[int]] = {}
        for i, doc in enumerate(documents):
            if doc.id is not None:
                out.texts[i], out.matrices[i] = stored_ids[doc.id]
                out.ids[i] = doc.id
                out.counts["stored"] += 1
                continue
            text = doc.text
            assert text is not None  # internal invariant: a document is a text or an id
            out.texts[i] = text
            if text in stored_texts:
                out.ids[i], out.matrices[i] = stored_texts[text]
                out.counts["stored"] += 1
            elif (mat := self.cache.get(text)) is not None:
                out.matrices[i] = mat
                out.counts["cached"] += 1
            else:
                unseen.setdefault(text, []).append(i)
        if unseen:
            new = list(unseen)
            with self._encode_lock:
                mats = self.model.encode(new, ratio=self.ratio, batch_size=self.encode_batch_size)
            for text, mat in zip(new, mats):
                mat.setflags(write=False)  # shared through the cache: nobody may change it
                self.cache.put(text, mat)
                for i in unseen[text]:
                    out.matrices[i] = mat
                    out.counts["encoded"] += 1
        return out


def _string_array(values: Sequence[str]) -> Any:
    import pyarrow as pa

    return pa.array(list(values), pa.string())


def _bool_array(values: Sequence[bool]) -> Any:
    import pyarrow as pa

    return pa.array(list(values), pa.bool_())


__all__ = ["Document", "Resolved", "Resolver", "MatrixCache", "SOURCES"]
