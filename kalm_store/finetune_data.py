"""Where the fine-tuner's matrices come from: the store (re-pooled exactly for coarser ratios) or, for
passages brought as text, the frozen encoder once, spilled to disk so memory stays bounded.

The store is read at one table version for the whole run (a consistent snapshot); each batch fetches
only the rows it needs, and a bounded LRU keeps recently used matrices for later epochs.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import schema
from .pairs import Pair
from .pooling import check_ratio, pooled_rows, repool

if TYPE_CHECKING:  # pragma: no cover
    from .model import KaLMModel
    from .store import PassageStore


def source_ratios(stored: Sequence[int], ratios: Sequence[int], table: str) -> dict[int, int]:
    """For each trained ratio, the stored ratio it is read from: itself, or the finest stored ratio it is a
    multiple of (exact re-pooling; more float16 rows averaged is less rounding, as ``kalm-store eval``
    does); a ratio that is a multiple of no stored one is refused."""
    out = {}
    for r in ratios:
        r = check_ratio(r)
        sources = [s for s in stored if r % s == 0]
        if not sources:
            raise ValueError(f"table {table!r} stores ratios {sorted(stored)}; r={r} cannot be derived from them "
                             "(a coarser ratio is re-pooled exactly from a finer one, never the other way): "
                             f"train at a multiple of a stored ratio, or build the table with --ratio {r}")
        out[r] = r if r in sources else min(sources)
    return out


class TextMatrices:
    """Matrices of passages brought as text, encoded once and kept in one float16 file per ratio.

    The files are reused when a run is resumed (same texts, encoder and ratios: checked by a digest).
    """

    def __init__(self, model: KaLMModel, texts: Sequence[str], ratios: Sequence[int], folder: Path,
                 *, batch_size: int = 16, show_progress: bool = False) -> None:
        self.dim = model.dim
        self.index = {t: i for i, t in enumerate(texts)}
        folder.mkdir(parents=True, exist_ok=True)
        key = hashlib.sha256(json.dumps([model.encoder_fingerprint, sorted(ratios), list(texts)]).encode()).hexdigest()
        manifest = folder / "texts.json"
        self._files = {r: folder / f"texts_r{r}.f16" for r in ratios}
        if not (manifest.is_file() and json.loads(manifest.read_text()).get("key") == key):
            self._encode(model, list(texts), list(ratios), batch_size, show_progress)
            tmp = manifest.with_suffix(".tmp")
            tmp.write_text(json.dumps({"key": key, "rows": {str(r): v.tolist() for r, v in self._rows.items()}}))
            tmp.replace(manifest)  # written last: files without their manifest are encoded again
        saved = json.loads(manifest.read_text())["rows"]
        self._rows = {r: np.asarray(saved[str(r)], dtype=np.int64) for r in ratios}
        self._offsets = {r: np.concatenate([[0], np.cumsum(v)]) * self.dim for r, v in self._rows.items()}
        self._maps = {r: np.memmap(self._files[r], dtype=np.float16, mode="r") if len(texts) else None
                      for r in ratios}

    def _encode(self, model: KaLMModel, texts: list[str], ratios: list[int], batch_size: int,
                show_progress: bool) -> None:
        self._rows = {r: np.zeros(len(texts), np.int64) for r in ratios}
        files = {r: open(self._files[r], "wb") for r in ratios}
        try:
            chunk = 64 * batch_size  # encoded and written a chunk at a time: bounded memory
            for start in range(0, len(texts), chunk):
                enc = model.encode_ratios(texts[start:start + chunk], ratios, batch_size=batch_size,
                                          show_progress=show_progress)
                for r in ratios:
                    for j, m in enumerate(enc.matrices[r]):
                        self._rows[r][start + j] = m.shape[0]
                        files[r].write(np.ascontiguousarray(m, dtype=np.float16).tobytes())
        finally:
            for f in files.values():
                f.close()

    def get(self, text: str, ratio: int) -> np.ndarray:
        """The ``(ceil(n/ratio), d)`` float16 matrix of ``text`` (a read-only view of the file)."""
        i = self.index[text]
        begin, end = self._offsets[ratio][i], self._offsets[ratio][i + 1]
        return self._maps[ratio][begin:end].reshape(-1, self.dim)


class PassageMatrices:
    """Float16 matrices of the pairs' passages at the trained ratios.

    Parameters
    ----------
    store : PassageStore
        The table (opened with the model: its encoder was checked).
    model : KaLMModel
        Encodes the passages brought as text.
    ratios : list of int
        Trained ratios.
    pairs : list of Pair
        Every pair that will be asked for (training and evaluation): their texts are encoded up front.
    folder : Path
        Where the encoded texts are kept.
    cache_bytes : int, default 256 MiB
        Bound of the LRU of store matrices.
    """

    def __init__(self, store: PassageStore, model: KaLMModel, ratios: Sequence[int], pairs: Sequence[Pair],
                 folder: Path, *, cache_bytes: int = 256 << 20, batch_size: int = 16,
                 show_progress: bool = False) -> None:
        self.store = store
        self.dim = store.dim
        self.ratios = [check_ratio(r) for r in ratios]
        self.sources = source_ratios(store.ratios, self.ratios, store.table.name)
        self._ds = store.table.to_lance()  # one version for the whole run
        self._max_tokens = store.metadata.get("max_length")
        self._digests = store.has_digests
        texts = list(dict.fromkeys(p.text for p in pairs if p.text is not None))
        self.texts = TextMatrices(model, texts, self.ratios, folder, batch_size=batch_size,
                                  show_progress=show_progress)
        self._cache: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()
        self._cache_bytes = 0
        self._cache_limit = int(cache_bytes)
        self.rows_fetched = 0  # store rows read (for the benchmark and the report)

    def _fetch(self, ids: list[str], ratio: int) -> dict[str, np.ndarray]:
        from .store import decode_rows, sql_in

        source = self.sources[ratio]
        col = schema.column_name(source)
        checked = ["text", schema.DIGEST_COLUMN] if self._digests else []
        rows = self._ds.to_table(columns=["id", "n_tokens", *checked, col], filter=sql_in("id", ids))
        self.rows_fetched += rows.num_rows
        mats = decode_rows(rows, source, self.dim, self._max_tokens)
        counts = rows.column("n_tokens").to_pylist()
        out = {}
        for pid, n, m in zip(rows.column("id").to_pylist(), counts, mats):
            # (ceil(n/s), d) -> (ceil(n/r), d): token-count-weighted means, exact up to float16 rounding
            out[pid] = m if source == ratio else repool(m, n, source, ratio)
            assert out[pid].shape == (pooled_rows(n, ratio), self.dim)
        missing = [i for i in ids if i not in out]
        if missing:  # ids were checked against the table when the run started: someone deleted rows since
            from .store import MissingRowError

            raise MissingRowError(f"ids not in table {self.store.table.name!r} (deleted during the run?): {missing[:10]}")
        return out

    def get(self, pairs: Sequence[Pair], ratio: int) -> list[np.ndarray]:
        """The matrices of ``pairs`` at ``ratio``, in order."""
        want = list(dict.fromkeys(p.id for p in pairs if p.id is not None and (p.id, ratio) not in self._cache))
        fetched = self._fetch(want, ratio) if want else {}
        out: list[Any] = []
        for p in pairs:
            if p.text is not None:
                out.append(self.texts.get(p.text, ratio))
            elif p.id in fetched:
                out.append(fetched[p.id])
            else:
                self._cache.move_to_end((p.id, ratio))
                out.append(self._cache[(p.id, ratio)])
        for pid, m in fetched.items():
            self._remember((pid, ratio), m)
        return out

    def _remember(self, key: tuple[str, int], m: np.ndarray) -> None:
        if m.nbytes > self._cache_limit:
            return
        self._cache[key] = m
        self._cache_bytes += m.nbytes
        while self._cache_bytes > self._cache_limit:
            _, old = self._cache.popitem(last=False)
            self._cache_bytes -= old.nbytes


__all__ = ["PassageMatrices", "TextMatrices", "source_ratios"]
