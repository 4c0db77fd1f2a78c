"""PassageStore: the LanceDB table that holds pooled KaLM matrices beside vectors and text.

Layout and metadata come from ``schemas/passage_store.v2.json`` (see :mod:`kalm_store.schema`).
A table remembers which model built it (fingerprint, template version, max_length, d): writing
or scoring with anything else is refused, naming what differs. Each row also keeps a digest of the
text its matrices were encoded from, so a matrix whose text was changed behind kalm-store's back is
refused instead of scored.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import __version__, prompts, schema
from .codec import STORED_DTYPE, CorruptMatrixError, decode_matrix, encode_matrix
from .pooling import check_ratio, pooled_rows

if TYPE_CHECKING:  # pragma: no cover
    from .commit import CommitResult
    from .model import EncodedPassages, KaLMModel


class StoreMismatchError(ValueError):
    """A table and a model (or a requested ratio) do not belong together."""


class StaleMatrixError(ValueError):
    """A row's text no longer matches the text its stored matrices were encoded from."""


class UncommittedTableError(ValueError):
    """A table folder that holds no committed version yet (its creation was interrupted, or is under way)."""


class MissingRowError(KeyError):
    """Rows asked for (by id, or candidates by ``_rowid``) are not in the table."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0]) if self.args else ""


def model_metadata(model: KaLMModel, *, encoder: bool = True) -> dict[str, Any]:
    """The table metadata a model implies (the keys that must match, plus provenance); ``encoder=False``
    leaves out ``encoder_fingerprint`` (hashing the encoder costs a read of its weights)."""
    return {
        "model_id": model.name_or_path,
        "model_revision": model.revision,
        "fingerprint": model.fingerprint,
        **({"encoder_fingerprint": model.encoder_fingerprint} if encoder else {}),
        "dim": model.dim,
        "stored_dtype": STORED_DTYPE,
        "codec": schema.CODEC,
        "template_version": prompts.TEMPLATE_VERSION,
        "max_length": model.max_length,
    }


def embedder_metadata(embedder: Any) -> dict[str, Any]:
    """What a table records about the LanceDB embedding function computing its vectors."""
    return {"name": getattr(embedder, "__embedding_function_registry_alias__", None) or type(embedder).__name__,
            "model": getattr(embedder, "name", None)}


def check_compatible(table_meta: dict[str, Any], model: KaLMModel, *, what: str = "table") -> None:
    """Raise :class:`StoreMismatchError` listing every must-match key on which table and model differ."""
    if not table_meta:
        raise StoreMismatchError(
            f"{what} has no kalm-store metadata: it is not a kalm-store passage store. Build one with "
            "`kalm-store build INPUT --db URI --table NAME --model M` or PassageStore.create(...)"
        )
    keys = schema.must_match_keys()
    expected = model_metadata(model, encoder=False)
    if table_meta.get("fingerprint") != expected["fingerprint"] and table_meta.get("encoder_fingerprint"):
        # Stored matrices depend on the encoder alone: a model whose decoder differs (fine-tuned) but whose
        # encoder matches scores the table as it is. Tables without the key keep the whole-model check.
        expected["encoder_fingerprint"] = model.encoder_fingerprint
        keys = [k for k in keys if k != "fingerprint"] + ["encoder_fingerprint"]
        if table_meta["encoder_fingerprint"] != expected["encoder_fingerprint"]:
            keys.append("fingerprint")  # name both: the encoder differs, and so does the whole model
    diffs = [f"{k}: table has {table_meta.get(k)!r}, model gives {expected[k]!r}"
             for k in keys if table_meta.get(k) != expected[k]]
    if diffs:
        # hashes alone do not tell a user which model to load: name the one that built the table
        built = f"{table_meta.get('model_id')!r}" + (f" (revision {table_meta['model_revision']})"
                                                     if table_meta.get("model_revision") else "")
        loaded = f"{model.name_or_path!r}" + (f" (revision {model.revision})" if model.revision else "")
        weights = any(d.startswith(("fingerprint:", "encoder_fingerprint:")) for d in diffs)
        other = (f"by model {built}, not by the loaded {loaded}" if weights
                 else f"by the same model weights ({loaded}) with another configuration")
        raise StoreMismatchError(f"{what} was built {other} ({'; '.join(diffs)}); use the model it was built with, "
                                 "or build a new table")


def check_layout_file(table_schema: pa.Schema, *, what: str = "table") -> None:
    """Refuse a table whose schema version, or whose columns for its recorded ratios and vector width,
    differ from what ``schemas/passage_store.v2.json`` declares for that version (names and Arrow
    types, not nullability).

    Columns the metadata does not list are allowed: an interrupted ``repool`` leaves its new column
    unlisted until the run is finished.
    """
    meta = schema.decode_metadata(table_schema.metadata)
    version, readable = meta.get("schema_version"), schema.spec()["reads_versions"]
    if isinstance(version, bool) or version not in readable:
        raise StoreMismatchError(f"{what} has kalm-store schema version {version!r} (written by "
                                 f"kalm-store {meta.get('kalm_store_version')!r}); this kalm-store ({__version__}) "
                                 f"reads versions {readable}")
    expected = schema.arrow_schema(list(meta.get("ratios") or []), meta.get("vector_dim"), {}, version=version)
    problems = []
    for f in expected:
        if f.name not in table_schema.names:
            problems.append(f"column {f.name!r} is missing")
        elif table_schema.field(f.name).type != f.type:
            problems.append(f"column {f.name!r} is {table_schema.field(f.name).type}, the schema declares {f.type}")
    if problems:
        raise StoreMismatchError(f"{what} does not have the layout its metadata declares ({'; '.join(problems)})")


def check_ratio_stored(table_meta: dict[str, Any], ratio: int, *, what: str = "table") -> int:
    """Return ``ratio`` if the table stores it, else raise naming the stored ratios."""
    ratio = check_ratio(ratio)
    stored = table_meta.get("ratios") or []
    if ratio not in stored:
        raise StoreMismatchError(f"{what} stores ratios {stored}, not r={ratio}; pick one of them or add it "
                                 f"with `kalm-store repool --from <stored> --to {ratio}`")
    return ratio


def decode_rows(rows: pa.Table, ratio: int, dim: int, max_tokens: int | None = None) -> list[np.ndarray]:
    """Decode the ``kalm_r{ratio}`` values of fetched rows (columns ``id``, ``n_tokens``, the matrix).

    Every value is checked (``0 < n_tokens <= max_tokens``, the size it implies, checksum, finite);
    an error names the row id. Bounding ``n_tokens`` by the table's ``max_length`` keeps a crafted row
    (huge ``n_tokens`` and a frame declaring that size) from making us allocate without bound.
    """
    col = schema.column_name(ratio)
    for name in ("id", "n_tokens", col) + (("text",) if schema.DIGEST_COLUMN in rows.column_names else ()):
        if name not in rows.column_names:
            raise ValueError(f"fetched rows lack the column {name!r} (have {rows.column_names})")
    ids = rows.column("id").to_pylist()
    if schema.DIGEST_COLUMN in rows.column_names:
        check_digests(ids, rows.column("text").to_pylist(), rows.column(schema.DIGEST_COLUMN).to_pylist(), col)
    counts = rows.column("n_tokens").to_pylist()
    blobs = rows.column(col)
    out = []
    for i, (pid, n) in enumerate(zip(ids, counts)):
        if n is None or n < 1 or (max_tokens is not None and n > max_tokens):
            raise CorruptMatrixError(f"passage id {pid!r}, column {col}: n_tokens {n!r} is outside 1..{max_tokens}")
        blob = blobs[i].as_buffer()
        out.append(decode_matrix(blob, pooled_rows(n, ratio), dim, what=f"passage id {pid!r}, column {col}"))
    return out


def text_digest(text: str) -> bytes:
    """The ``text_digest`` value of a text: BLAKE2b-64 of its UTF-8 bytes."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()


def stale_ids(ids: Sequence[str], texts: Sequence[str | None], digests: Sequence[bytes | None]) -> list[str]:
    """The ids whose text is not the one their matrices were encoded from (its digest differs)."""
    return [i for i, t, d in zip(ids, texts, digests) if t is None or d is None or text_digest(t) != d]


def check_digests(ids: Sequence[str], texts: Sequence[str | None], digests: Sequence[bytes | None],
                  column: str = "the matrices") -> None:
    """Raise :class:`StaleMatrixError` naming the rows whose text is not the one their matrices were
    encoded from (changed by a write that bypassed kalm-store)."""
    stale = stale_ids(ids, texts, digests)
    if stale:
        raise StaleMatrixError(
            f"passage id(s) {stale[:10]}{' ...' if len(stale) > 10 else ''}: the text was changed after {column} was "
            "stored (a LanceDB update or merge_insert of `text` that bypassed kalm-store), so the stored matrix is of "
            "another text; re-encode with `kalm-store build --update` or PassageStore.upsert")


def sql_in(column: str, values: Sequence[str]) -> str:
    """A Lance filter ``column IN ('a', 'b')`` with every value quoted as an SQL string literal."""
    bad = [v for v in values if not isinstance(v, str)]
    if bad:
        raise TypeError(f"ids must be strings, got {type(bad[0]).__name__} {bad[0]!r}")
    return f"{column} IN (" + ", ".join("'" + v.replace("'", "''") + "'" for v in values) + ")"


class PassageStore:
    """A kalm-store table in a LanceDB database.

    Examples
    --------
    >>> store = PassageStore.create("./db", "docs", model, ratios=[4, 8])  # doctest: +SKIP
    >>> store.add([{"id": "a", "text": "first passage"}])  # doctest: +SKIP
    >>> store.matrices(["a"], ratio=4)[0].shape  # doctest: +SKIP
    (4, 640)
    """

    def __init__(self, table: Any, model: KaLMModel | None = None) -> None:
        self.table = table
        self.model = model
        self._dataset: Any = None  # see dataset()
        self._dataset_version: int | None = None
        self._dataset_lock = threading.Lock()
        if model is not None:
            check_compatible(self.metadata, model, what=f"table {table.name!r}")
        check_layout_file(table.schema, what=f"table {table.name!r}")

    # ------------------------------------------------------------------ create / open
    @classmethod
    def create(
        cls,
        db_uri: str,
        table: str,
        model: KaLMModel,
        ratios: Sequence[int] = (4,),
        *,
        vector_dim: int | None = None,
        embedder: Any | None = None,
        storage_options: dict[str, str] | None = None,
        exist_ok: bool = False,
        compute_dtype: str | None = None,
        columns: Sequence[pa.Field] = (),
    ) -> PassageStore:
        """Create an empty passage store (or open a compatible existing one with ``exist_ok``).

        Parameters
        ----------
        db_uri : str
            LanceDB database URI (a folder, ``s3://bucket/prefix``, ...).
        table : str
            Table name.
        model : KaLMModel
            The model whose encoder fills the table; its fingerprint is recorded.
        ratios : list of int, default (4,)
            MEP ratios to store, one ``kalm_r{r}`` column each.
        vector_dim : int, optional
            Width of brought retrieval vectors; ``None`` with no ``embedder`` makes a text-only store.
        embedder : lancedb.embeddings.EmbeddingFunction, optional
            LanceDB embedding function computing ``vector`` from ``text`` (recorded in the table,
            so searches embed queries the same way).
        storage_options : dict, optional
            Object-store options passed to ``lancedb.connect``.
        exist_ok : bool, default False
            Open an existing table instead of failing, if it is compatible.
        compute_dtype : str, optional
            Compute dtype of the encoder that fills the table, recorded as ``compute_dtypes``; default
            ``None``: ``model``'s (pass ``"unknown"`` when other processes encode, e.g. Ray workers).
        columns : sequence of pyarrow.Field, default ()
            More (nullable) columns, e.g. input fields kept by a build
            (:class:`kalm_store.input_columns.InputColumns`).
        """
        from .dtypes import dtype_name
        from .storage import connect

        ratios = sorted({check_ratio(r) for r in ratios})
        if not ratios:
            raise ValueError("ratios is empty: give at least one of 1, 2, 4, 8, 16, 32")
        if vector_dim is not None and (not isinstance(vector_dim, int) or vector_dim < 1):
            raise ValueError(f"vector_dim must be a positive int or None, got {vector_dim!r}")
        embedder_meta = None
        functions = None
        if embedder is not None:
            from lancedb.embeddings import EmbeddingFunctionConfig

            vector_dim = int(embedder.ndims())
            embedder_meta = embedder_metadata(embedder)
            functions = [EmbeddingFunctionConfig(source_column="text", vector_column="vector", function=embedder)]
        meta = model_metadata(model) | {
            "schema_version": schema.spec()["schema_version"],
            "kalm_store_version": __version__,
            "ratios": ratios,
            "vector_dim": vector_dim,
            "embedder": embedder_meta,
            "compute_dtypes": [compute_dtype or dtype_name(model.dtype)],
        }
        db = connect(db_uri, storage_options)
        if table in _table_names(db) and _has_version(db_uri, table, storage_options):
            if not exist_ok:
                raise ValueError(f"table {table!r} already exists in {db_uri}; open it or pass exist_ok=True")
            store = cls.open(db_uri, table, model=model, storage_options=storage_options)
            if store.ratios != ratios or store.metadata.get("vector_dim") != vector_dim:
                raise StoreMismatchError(
                    f"table {table!r} stores ratios {store.ratios} and vector_dim {store.metadata.get('vector_dim')}, "
                    f"asked for ratios {ratios} and vector_dim {vector_dim}")
            return store
        arrow_schema = schema.arrow_schema(ratios, vector_dim, meta)
        for f in columns:
            if f.name in arrow_schema.names:
                raise ValueError(f"column {f.name!r} is one of kalm-store's own ({arrow_schema.names})")
            arrow_schema = arrow_schema.append(f)
        tbl = db.create_table(table, schema=arrow_schema, embedding_functions=functions,
                              storage_options=storage_options)
        return cls(tbl, model)

    @classmethod
    def open(cls, db_uri: str, table: str, *, model: KaLMModel | None = None,
             storage_options: dict[str, str] | None = None) -> PassageStore:
        """Open an existing passage store; with ``model``, check that it built the table."""
        from .storage import connect

        db = connect(db_uri, storage_options, must_exist=True)
        if table not in _table_names(db):
            raise ValueError(f"no table {table!r} in {db_uri} (tables: {_table_names(db)})")
        try:
            tbl = db.open_table(table)
        except ValueError as e:  # listed but no committed version yet: another process is creating it
            if "was not found" not in str(e):  # LanceDB's own test for a missing table (lancedb.namespace)
                raise
            raise UncommittedTableError(
                f"no table {table!r} in {db_uri} yet: its folder holds no committed version, so a build creating "
                "it was stopped before its first commit (or is still making it); run that build again, which "
                "starts the table anew (nothing was stored)") from e
        if not schema.decode_metadata(tbl.schema.metadata):
            raise StoreMismatchError(
                f"table {table!r} in {db_uri} has no kalm-store metadata: it is a plain LanceDB table. Build a "
                "passage store with `kalm-store build INPUT --db URI --table NAME --model M`")
        return cls(tbl, model)

    # ------------------------------------------------------------------ metadata
    @property
    def metadata(self) -> dict[str, Any]:
        """The table's kalm-store metadata (schema-file keys, without prefix)."""
        return schema.decode_metadata(self.table.schema.metadata)

    @property
    def ratios(self) -> list[int]:
        return list(self.metadata.get("ratios") or [])

    @property
    def dim(self) -> int:
        return int(self.metadata["dim"])

    # ------------------------------------------------------------------ write
    def _rows_by_id(self, ids: Sequence[str], columns: list[str]) -> list[pa.Table]:
        """The stored rows of ``ids`` (those that exist, in table order), read 1000 ids per filter."""
        if not ids or self.table.count_rows() == 0:
            return []
        ids = list(ids)
        ds = self.table.to_lance()
        return [ds.to_table(columns=columns, filter=sql_in("id", ids[i:i + 1000])) for i in range(0, len(ids), 1000)]

    def existing_ids(self, ids: Sequence[str]) -> set[str]:
        """The subset of ``ids`` already stored."""
        return {i for rows in self._rows_by_id(ids, ["id"]) for i in rows.column("id").to_pylist()}

    def changed(self, ids: Sequence[str], texts: Sequence[str],
                vectors: Sequence[Sequence[float] | None] | None = None) -> list[bool]:
        """For ids already stored: does the given text (or brought vector) differ from the stored row's?

        What an update re-encodes. Vectors are compared only in a table that brings its own (as the
        float32 values stored); an embedding function's vectors follow from the text. A stale row (its
        text changed after its matrices were stored, see :func:`check_digests`) counts as changed even
        when its text is the given one, so that an update repairs it.
        """
        with_vectors = vectors is not None and self.brings_vectors
        wanted = ["text", schema.DIGEST_COLUMN if self.has_digests else None, "vector" if with_vectors else None]
        stored: dict[str, tuple[Any, ...]] = {}  # id -> (text, digest or None, vector or None)
        for part in self._rows_by_id(ids, ["id"] + [c for c in wanted if c]):
            values = [part.column(c).to_pylist() if c else [None] * part.num_rows for c in wanted]
            stored.update(zip(part.column("id").to_pylist(), zip(*values)))
        missing = [i for i in ids if i not in stored]
        if missing:
            raise MissingRowError(f"ids not in table {self.table.name!r}: {missing[:10]}")
        out = []
        for k, (i, text) in enumerate(zip(ids, texts)):
            old_text, old_digest, old_vector = stored[i]
            differs = old_text != text or (old_digest is not None and text_digest(old_text) != old_digest)
            if not differs and with_vectors:
                given = vectors[k]  # type: ignore[index]
                # a missing vector counts as a change, so that writing the row names it
                differs = given is None or not np.array_equal(np.asarray(old_vector, np.float32),
                                                              np.asarray(given, np.float32))
            out.append(differs)
        return out

    def delete_ids(self, ids: Sequence[str]) -> tuple[int, int]:
        """Delete the rows of ``ids`` (their matrices go with them), 1000 ids per Lance commit.

        Returns (rows deleted, commits). Ids not stored are ignored, so an interrupted call can be
        repeated.
        """
        ids = list(ids)
        deleted = commits = 0
        for i in range(0, len(ids), 1000):
            deleted += self.table.delete(sql_in("id", ids[i:i + 1000])).num_deleted_rows
            commits += 1
        return deleted, commits

    def write(self, rows: pa.Table, *, replace: bool = False, known_version: int | None = None) -> CommitResult:
        """Commit ``rows`` (from :meth:`rows_table`) in one atomic Lance commit; returns what it did.

        Rows whose id is stored by the time of the commit are skipped (another writer was first), so
        concurrent builds never store an id twice. ``replace=True`` instead replaces the stored rows
        with the same ids (a merge-insert on ``id``: old rows deleted, new ones written, in the same
        commit), with null at any ``kalm_r*`` column the rows lack (a ratio a concurrent ``repool``
        added), never the old text's matrix. ``known_version``: see :func:`~kalm_store.commit.commit_rows`
        (a builder's version at which it knows every stored id; the rows are then appended while the
        table is still at it). See :mod:`kalm_store.commit`.
        """
        from .commit import commit_rows

        return commit_rows(self.table, rows, replace=replace, known_version=known_version)

    def model_or_raise(self) -> KaLMModel:
        """The model this store was opened with; writing rows needs it."""
        if self.model is None:
            raise ValueError("this store was opened without a model; pass model= to PassageStore.open to add rows")
        return self.model

    def encode_records(self, records: Sequence[dict[str, Any]], *, batch_size: int = 16) -> pa.Table:
        """Encode the texts of ``records`` at every stored ratio into an Arrow table of this schema."""
        texts = [r["text"] for r in records]
        enc = self.model_or_raise().encode_ratios(texts, self.ratios, batch_size=batch_size)
        vectors = [r.get("vector") for r in records] if self.brings_vectors else None
        return self.rows_table([r["id"] for r in records], texts, enc, vectors)

    @property
    def has_digests(self) -> bool:
        """True when rows carry ``text_digest`` (schema version 2 on): reads check their text against it."""
        return schema.DIGEST_COLUMN in self.table.schema.names

    @property
    def brings_vectors(self) -> bool:
        """True when rows must carry their own ``vector`` (a vector column and no embedding function)."""
        return self.metadata.get("vector_dim") is not None and not self.metadata.get("embedder")

    def rows_table(self, ids: Sequence[str], texts: Sequence[str], encoded: EncodedPassages,
                   vectors: Sequence[Sequence[float] | None] | None = None,
                   extras: pa.Table | None = None) -> pa.Table:
        """Arrow rows of this table's schema from encoder output (matrices compressed here).

        With an embedding function the ``vector`` column is left out (LanceDB computes it on ``add``)
        unless ``vectors`` are given: Ray actors compute them with the table's own function, because
        fragments written straight to Lance bypass LanceDB's ``add``. ``extras`` holds the input fields
        kept as columns (:class:`kalm_store.input_columns.InputColumns`, one row per id), each a column
        of the table already. Other columns a user added to the table are left out: appended rows hold
        null there, and a replacing merge-insert keeps their values.
        """
        embeds = self.metadata.get("vector_dim") is not None and bool(self.metadata.get("embedder"))
        columns: dict[str, Any] = {
            "id": pa.array(list(ids), pa.string()),
            "text": pa.array(list(texts), pa.string()),
            "n_tokens": pa.array(encoded.token_counts, pa.int32()),
            schema.DIGEST_COLUMN: pa.array([text_digest(t) for t in texts], pa.binary(8)),  # dropped in version 1
        }
        if self.brings_vectors or (embeds and vectors is not None):
            dim = int(self.metadata["vector_dim"])
            if vectors is None:
                raise ValueError(f"table {self.table.name!r} stores brought vectors of width {dim}: give each row's vector")
            for pid, v in zip(ids, vectors):
                if v is None or isinstance(v, (str, bytes)) or np.shape(v) != (dim,):
                    got = "no vector" if v is None else f"a vector of shape {np.shape(v)}"
                    raise ValueError(f"record id {pid!r} has {got}; table {self.table.name!r} stores {dim}-d vectors")
            flat = np.asarray(vectors, dtype=np.float32)
            columns["vector"] = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), dim)
        for r in self.ratios:
            # a ratio the encoder was not asked for (a repool committed it during a build) holds null:
            # reads name such rows and running that repool again derives them
            columns[schema.column_name(r)] = pa.array([encode_matrix(m) for m in encoded.matrices[r]]
                                                      if r in encoded.matrices else [None] * len(ids), pa.large_binary())
        table_schema = self.table.schema
        for name in extras.column_names if extras is not None else ():
            if name not in table_schema.names:
                raise ValueError(f"input field {name!r} is not a column of table {self.table.name!r} yet; "
                                 "add it first (PassageStore.add_input_columns)")
            columns[name] = extras.column(name).cast(table_schema.field(name).type)  # type: ignore[union-attr]
        target = pa.schema([f for f in table_schema if f.name in columns], metadata=table_schema.metadata)
        return pa.table({f.name: columns[f.name] for f in target}, schema=target)

    def add_input_columns(self, fields: Sequence[pa.Field]) -> None:
        """Add columns for input fields a build met first (all null in the rows stored so far).

        Lance writes only the new columns' metadata. A concurrent writer's commit makes Lance refuse
        ours with a retryable conflict: we look again (another build may have added the same column)
        and retry. A column of that name with another type is refused, naming both types.
        """
        from lance.commit import CommitConflictError

        for attempt in range(8):
            self.table.checkout_latest()
            have = self.table.schema
            clash = [f"{f.name!r} is {have.field(f.name).type} in the table, {f.type} in the input"
                     for f in fields if f.name in have.names and have.field(f.name).type != f.type]
            if clash:
                raise StoreMismatchError(f"table {self.table.name!r}: column {'; '.join(clash)}")
            todo = [f for f in fields if f.name not in have.names]
            if not todo:
                return
            try:
                self.table.add_columns(todo)
                self.table.checkout_latest()
                return
            except CommitConflictError:
                if attempt == 7:
                    raise

    def column_values(self, ids: Sequence[str], columns: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The stored values of ``columns`` for ``ids`` (those stored): ``{id: {column: value}}``."""
        out: dict[str, dict[str, Any]] = {}
        for part in self._rows_by_id(ids, ["id", *columns]):
            for row in part.to_pylist():
                out[row.pop("id")] = row
        return out

    def replace_fields(self, rows: pa.Table) -> None:
        """Replace the values of ``rows``' columns (``id`` plus input-field columns) in the stored rows of
        those ids, in one atomic commit; text, matrices, digests and vectors stay as they are (a Lance
        merge-insert of those columns only, so nothing is re-encoded)."""
        self.table.merge_insert("id").when_matched_update_all().execute(rows)

    def check_layout(self, ratios: Sequence[int], *, vectors: Literal["brought", "embedder", "none"],
                     embedder: dict[str, Any] | None = None, vector_dim: int | None = None) -> None:
        """Refuse, naming what differs, when a build asks for a ratio the table does not store or another
        vector setup.

        A build appends at every ratio the table stores, so asking for some of them is no conflict
        (after ``repool --from 4 --to 8`` the build command that made the table still adds rows, at
        r=4 and r=8); asking for one it does not store is, since the rows already there cannot have it
        (``repool`` derives a coarser ratio, nothing derives a finer one). ``vectors`` says where the
        build's vectors come from; ``embedder`` is the :func:`embedder_metadata` of its embedding
        function; ``vector_dim`` the width of brought vectors when already known.
        """
        meta = self.metadata
        ratios = sorted({check_ratio(r) for r in ratios})
        table_vectors = "embedder" if meta.get("embedder") else ("brought" if meta.get("vector_dim") else "none")
        diffs = []
        missing = [r for r in ratios if r not in self.ratios]
        if missing:
            flags = " ".join(f"--ratio {r}" for r in self.ratios)
            fixes = []
            for r in missing:
                sources = [f for f in self.ratios if f < r and r % f == 0]
                fixes.append(f"`kalm-store repool --from {max(sources)} --to {r}` adds r={r}" if sources else
                             f"r={r} is finer than every stored ratio and cannot be derived (build a new table)")
            diffs.append(f"ratios: table has {self.ratios}, build asks for {ratios}, which the table does not "
                         f"store: {missing} (to add rows, pass {flags} or no --ratio; {'; '.join(fixes)})")
        if table_vectors != vectors:
            diffs.append(f"vectors: table's are {table_vectors!r}, build's are {vectors!r}")
        elif vectors == "embedder" and meta.get("embedder") != embedder:
            diffs.append(f"embedder: table has {meta.get('embedder')!r}, build asks for {embedder!r}")
        elif vectors == "brought" and vector_dim is not None and meta.get("vector_dim") != vector_dim:
            diffs.append(f"vector_dim: table has {meta.get('vector_dim')!r}, input vectors have {vector_dim}")
        if diffs:
            raise StoreMismatchError(f"table {self.table.name!r} was built with another layout ({'; '.join(diffs)}); "
                                     "use the same options, or build a new table")

    def all_ids(self) -> set[str]:
        """Every stored id (one scan of the ``id`` column)."""
        out: set[str] = set()
        if self.table.count_rows():
            for batch in self.table.to_lance().to_batches(columns=["id"]):
                out.update(batch.column(0).to_pylist())
        return out

    def refresh(self) -> None:
        """See commits made by other handles or processes."""
        self.table.checkout_latest()

    def dataset(self) -> Any:
        """The table's ``lance.LanceDataset`` at the table's current version, opened once per version.

        ``table.to_lance()`` opens the dataset anew on every call, with a fresh Lance session: the
        manifest, each data file's footer and column metadata and the indices are read again before the
        first matrix byte. On object storage those are 8-10 sequential round trips per read (counted
        through a latency proxy: ``benchmarks/results/query_s3.md``); the dataset kept here keeps them in
        its session, so a warm fetch of 100 rows is the take's own 2 round trips. Reads only: writes go
        through the table (or their own ``to_lance()``), and a new version opens a new dataset.
        """
        version = self.table.version
        with self._dataset_lock:
            if self._dataset is None or self._dataset_version != version:
                self._dataset, self._dataset_version = self.table.to_lance(), version
            return self._dataset

    def update_indices(self, *, fts: bool = True, id_index: bool = True, digest_index: bool = True) -> list[str]:
        """Create the full-text index on ``text`` and the BTREE indices on ``id`` and ``text_digest``
        (tables of schema version 2 on; the server finds a posted text's stored row by it), or add new
        rows to them.

        Existing indices are updated incrementally (only rows they do not cover are indexed);
        returns the names of the indices created or updated. Lance's sort for the BTREE indices runs
        in a bounded memory pool (:func:`kalm_store.index_memory.bounded_index_memory`; an exported
        ``LANCE_MEM_POOL_SIZE`` is kept).
        """
        from .index_memory import bounded_index_memory

        with bounded_index_memory():  # Lance's BTREE sort spills past a bounded pool (kalm_store.index_memory)
            return self._update_indices(fts=fts, id_index=id_index, digest_index=digest_index)

    def _update_indices(self, *, fts: bool, id_index: bool, digest_index: bool) -> list[str]:
        from .commit import retry_conflicts

        wanted = []
        if fts:
            wanted.append("text")
        if id_index:
            wanted.append("id")
        if digest_index and self.has_digests:
            wanted.append(schema.DIGEST_COLUMN)
        if not wanted or self.table.count_rows() == 0:
            return []
        have = {tuple(ix.columns): ix for ix in self.table.list_indices()}
        done = []
        stale = []
        for col in wanted:
            if (col,) in have:
                if have[(col,)].num_unindexed_rows:
                    stale.append(have[(col,)].name)
            else:
                from lancedb.index import FTS, BTree

                # another writer committing meanwhile is Lance's retryable conflict: index the latest version
                retry_conflicts(lambda c=col: self.table.create_index(c, config=FTS() if c == "text" else BTree(),
                                                                      replace=True),
                                f"creating the {col} index of table {self.table.name!r}",
                                before_retry=self.table.checkout_latest)
                done.append(f"{col}_idx")
        if stale:
            retry_conflicts(lambda: self.table.to_lance().optimize.optimize_indices(index_names=stale),
                            f"updating the indices of table {self.table.name!r}", before_retry=self.table.checkout_latest)
            self.table.checkout_latest()
            done.extend(stale)
        return done

    def add(self, records: Iterable[dict[str, Any]], *, batch_size: int = 16) -> int:
        """Encode and append records ``{"id", "text"[, "vector"], ...}`` whose id is not stored yet.

        Ids already in the table, and repeats of an id within ``records``, are skipped (first
        occurrence wins), so re-adding is idempotent. Other keys (``url``, ``title``...) are kept as
        nullable columns, typed as ``kalm-store build`` types input fields
        (:mod:`kalm_store.input_columns`); a value its column cannot hold raises ``ValueError`` naming
        the record and the field, before anything is written. Returns the number of rows written.
        """
        return self._add(records, batch_size, update=False)

    def upsert(self, records: Iterable[dict[str, Any]], *, batch_size: int = 16) -> int:
        """Like :meth:`add`, but a record whose id is stored with another text (or brought vector)
        is re-encoded and replaces that row, in the same commit as the new rows; one whose text is
        unchanged but whose other keys differ gets those columns replaced, without encoding.

        Records equal to their stored row are skipped, so upserting again is idempotent. Returns the
        number of rows written (new plus replaced). Change passages this way: LanceDB's own ``update``
        of ``text`` keeps the old text's matrices, which reads then refuse (:class:`StaleMatrixError`)
        until an upsert re-encodes the row.
        """
        return self._add(records, batch_size, update=True)

    def _add(self, records: Iterable[dict[str, Any]], batch_size: int, update: bool) -> int:
        from .build import BuildSummary, select_changed
        from .input_columns import InputColumns
        from .records import Record

        unique: list[Record] = []
        seen: set[str] = set()
        for i, r in enumerate(records):
            if not isinstance(r, dict) or not isinstance(r.get("id"), str) or not isinstance(r.get("text"), str):
                raise ValueError(f"record {i} must be a dict with string 'id' and 'text', got {r!r:.200}")
            if r["id"] not in seen:
                seen.add(r["id"])
                extra = {k: v for k, v in r.items() if k not in ("id", "text", "vector")}
                unique.append(Record(r["id"], r["text"], r.get("vector"), f"record {i} (id {r['id']!r})", extra))
        # Other keys become columns, typed and checked as a build types input fields: every value is
        # checked before the first write, so a bad one loses nothing.
        columns = InputColumns(self.table.schema)
        for rec in unique:
            columns.check(rec)
        stored = self.existing_ids([r.id for r in unique])
        new = [r for r in unique if r.id not in stored]
        old = [r for r in unique if r.id in stored] if update else []
        changed, fields_only = select_changed(self, old, BuildSummary(), columns) if old else ([], [])
        if not new and not changed and not fields_only:
            return 0
        if added := columns.take_new():
            self.add_input_columns(added)
        written = 0
        if new or changed:
            todo = new + changed
            enc = self.model_or_raise().encode_ratios([r.text for r in todo], self.ratios, batch_size=batch_size)
            rows = self.rows_table([r.id for r in todo], [r.text for r in todo], enc,
                                   [r.vector for r in todo] if self.brings_vectors else None, extras=columns.table(todo))
            result = self.write(rows, replace=bool(changed))
            written += result.inserted + result.replaced
        if fields_only:
            extras = columns.table(fields_only)
            assert extras is not None  # only records whose kept fields differ are here
            self.replace_fields(extras.add_column(0, "id", pa.array([r.id for r in fields_only], pa.string())))
            written += len(fields_only)
        return written

    # ------------------------------------------------------------------ read
    def matrices(self, ids: Sequence[str], ratio: int) -> list[np.ndarray]:
        """The stored float16 matrices of ``ids`` at ``ratio``, in the order of ``ids``.

        They are bitwise what :meth:`KaLMModel.encode` returned when the rows were added. Encoding the
        same passages again reproduces them bitwise in the same batches (same passages together, same
        batch size, device, dtype and thread count); other batches change the matrix-product shapes and
        with them the float summation order, which can move a value by one float16 step.
        """
        ratio = check_ratio_stored(self.metadata, ratio, what=f"table {self.table.name!r}")
        ids = list(ids)
        if not ids:
            return []
        where = sql_in("id", ids)
        checked = ["text", schema.DIGEST_COLUMN] if self.has_digests else []
        rows = self.dataset().to_table(columns=["id", "n_tokens", *checked, schema.column_name(ratio)],
                                       filter=where)
        mats = dict(zip(rows.column("id").to_pylist(), decode_rows(rows, ratio, self.dim, self.metadata.get("max_length"))))
        missing = [i for i in ids if i not in mats]
        if missing:
            raise MissingRowError(f"ids not in table {self.table.name!r}: {missing[:10]}")
        return [mats[i] for i in ids]

    def info(self) -> dict[str, Any]:
        """Rows, ratios, fingerprint and bytes per column, as stored on disk.

        ``stored_bytes`` of a column is what Lance reports its data files hold for that field
        (``LanceDataset.stats.data_stats()``: values, offsets and page overhead, after any Lance
        compression); ``value_bytes`` is the sum of the stored values plus 8-byte offsets, which equals
        it up to page overhead because Lance compression is off for ``kalm_r*``; ``raw_float16_bytes``
        is what the same matrices take as bare float16 (``ceil(n_tokens/r) * d * 2`` per passage).
        """
        meta = self.metadata
        rows = self.table.count_rows()
        ds = self.table.to_lance()
        on_disk = _bytes_on_disk(ds)
        counts = ds.to_table(columns=["n_tokens"]).column(0).to_numpy() if rows else np.zeros(0, np.int64)
        columns: dict[str, Any] = {}
        for f in self.table.schema:
            columns[f.name] = {"stored_bytes": on_disk.get(f.name, 0),
                               "bytes_per_passage": on_disk.get(f.name, 0) / rows if rows else 0.0}
        for r in self.ratios:
            col = schema.column_name(r)
            value_bytes = 0
            for batch in ds.to_batches(columns=[col]):
                arr = batch.column(0)
                value_bytes += int(pc.sum(pc.binary_length(arr)).as_py() or 0) + 8 * len(arr)  # values + int64 offsets
            raw = int(np.ceil(counts / r).sum()) * self.dim * 2
            columns[col] |= {"ratio": r, "value_bytes": value_bytes, "raw_float16_bytes": raw,
                             "raw_float16_bytes_per_passage": raw / rows if rows else 0.0,
                             "stored_vs_raw": columns[col]["stored_bytes"] / raw if raw else None}
        total = sum(c["stored_bytes"] for c in columns.values())
        return {"table": self.table.name, "uri": self.table.uri if hasattr(self.table, "uri") else None,
                "rows": rows, "tokens": int(counts.sum()), "ratios": self.ratios, "dim": self.dim,
                "fingerprint": meta.get("fingerprint"), "model_id": meta.get("model_id"),
                "stored_bytes": total, "bytes_per_passage": total / rows if rows else 0.0,
                "columns": columns, "indices": [{"name": ix.name, "type": str(ix.index_type), "columns": list(ix.columns)}
                                                for ix in self.table.list_indices()],
                "version": self.table.version, "metadata": meta}


def _has_version(db_uri: str, table: str, storage_options: dict[str, str] | None) -> bool:
    """False for a listed table whose folder holds no committed version: a creation killed before its first
    commit leaves only ``_transactions/``. Such a folder is safe to create anew: Lance commits version 1
    only if no other writer has (put-if-absent), so two creators cannot both win."""
    try:
        PassageStore.open(db_uri, table, storage_options=storage_options)
    except UncommittedTableError:
        return False
    except (ValueError, OSError):  # opened but refused (no kalm-store metadata, damaged): it has a version
        return True
    return True


def _bytes_on_disk(ds: Any) -> dict[str, int]:
    """Bytes each top-level field occupies in the dataset's data files (Lance's own statistics)."""
    names = {f.id(): f.name() for f in ds.lance_schema.fields()}
    return {names[s.id]: int(s.bytes_on_disk) for s in ds.stats.data_stats().fields if s.id in names}


def _table_names(db: Any) -> list[str]:
    """The database's tables; an object store that cannot be reached is one ``OSError`` naming the cause."""
    from .storage import is_object_store, object_store_error

    try:
        res = db.list_tables() if hasattr(db, "list_tables") else db.table_names()
    except (OSError, ValueError) as e:  # LanceDB reports object-store failures as ValueError("Invalid input, ...")
        uri = str(getattr(db, "uri", ""))
        if not uri or not is_object_store(uri):
            raise
        raise object_store_error(uri, e) from e
    names = getattr(res, "tables", res)
    return list(names)
