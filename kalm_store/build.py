"""The bulk builder: a corpus in, a passage store out, resumable and memory bounded.

The pipeline, one chunk at a time::

    read records (streaming) -> validate -> drop ids seen earlier in the input or already stored
      -> encode (batches sorted by length) -> compress -> commit (one Lance commit per chunk, in a
         writer thread while the next chunk encodes) -> ... -> update FTS / id indices

Every commit is atomic, so a build killed at any point leaves whole chunks; re-running the same
command stores only what is missing (resume) and adds nothing to a finished build (idempotence).

Duplicate ids: the FIRST occurrence of an id wins. A later record with an id already seen in this
input is skipped and counted (``duplicates``). A record whose id is already stored is skipped
(``already_stored``), unless ``update=True`` and its text (or brought vector) differs from the stored
row's: then it is re-encoded and replaces that row in the chunk's commit (``updated``). With
``delete_missing=True``, once the whole input has been read and committed, stored ids it does not
hold are deleted (``deleted``); with ``update=True`` as well, the table then mirrors the input. An
input with no valid record never deletes anything: it is refused, and so is a deletion of more than
half of the stored rows unless ``allow_mass_delete=True``.

Memory does not grow with the corpus: texts and matrices stream in chunks of ``chunk_size`` records,
and the ids stored before the run and those seen in its input are kept in an exact set on disk
(:class:`~kalm_store.idset.IdSet`, a temporary SQLite file under ``TMPDIR``), queried one chunk at a
time.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ._text import plural
from .idset import IdSet
from .pooling import check_ratio
from .records import (STDIN, BadRecordError, Fields, InputFormat, Record, count_records, read_records,
                      resolve_format, validate_record)

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow as pa

    from .input_columns import InputColumns
    from .model import EncodedPassages, KaLMModel
    from .store import PassageStore

# --delete-missing refuses to delete more than this fraction of the stored rows unless allow_mass_delete
MASS_DELETE_FRACTION = 0.5

Embedder = Literal["sentence-transformers"]
EMBEDDERS: tuple[str, ...] = ("sentence-transformers",)


@dataclass
class BuildOptions:
    """Everything ``kalm-store build`` needs; the CLI parses its flags into this."""

    input: str  # .jsonl / .parquet / .csv path, or "-" for JSON lines on stdin
    db: str  # LanceDB URI (folder, s3://...)
    table: str  # table name (created if missing, else resumed)
    model: str  # KaLM hub id or local folder
    # MEP ratios, one kalm_r{r} column each. None: the table's ratios, or [4] for a new table. A build
    # writes every ratio the table stores (so after `repool --from 4 --to 8` the same command goes on
    # working); asking for one it does not store is refused.
    ratios: list[int] | None = None
    id_field: str = "id"
    text_field: str = "text"
    vector_field: str | None = None  # input field holding brought embeddings
    embedder: Embedder | None = None  # LanceDB registry function computing `vector` from `text`
    embedder_model: str | None = None  # its model name or folder
    embedder_device: str = "cpu"  # recorded in the table: searches embed queries with it too
    input_format: InputFormat = "auto"  # "auto" guesses from the suffix
    chunk_size: int = 1024  # records per commit
    batch_size: int = 16  # passages per encoder pass
    max_length: int = 1024  # encoder tokens kept per passage
    revision: str | None = None  # hub revision of the model
    device: str | None = None  # None: CUDA if available
    dtype: str | None = None  # None: bfloat16 on CUDA, float32 on CPU
    fts_index: bool = True  # native full-text index on `text`
    id_index: bool = True  # BTREE index on `id`
    progress: bool = True  # tqdm bar on stderr
    storage_options: dict[str, str] | None = None  # object-store options for db (kalm_store.storage)
    update: bool = False  # re-encode and replace stored rows whose text (or brought vector) changed
    delete_missing: bool = False  # after the whole input: delete stored ids the input does not hold
    keep_fields: list[str] | None = None  # other input fields kept as columns; None: every one, []: none
    allow_mass_delete: bool = False  # let delete_missing delete more than half of the stored rows

    def validate(self) -> None:
        """Check the options without touching disk or loading anything."""
        for name in ("input", "db", "table", "model", "id_field", "text_field"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a non-empty string, got {value!r}")
        if self.ratios is not None:
            if not self.ratios:
                raise ValueError("give at least one --ratio (one of 1, 2, 4, 8, 16, 32)")
            self.ratios = sorted({check_ratio(r, "--ratio") for r in self.ratios})
        resolve_format(self.input, self.input_format)
        for name in ("chunk_size", "batch_size", "max_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.embedder is not None and self.embedder not in EMBEDDERS:
            raise ValueError(f"embedder must be one of {list(EMBEDDERS)}, got {self.embedder!r}")
        if self.embedder is not None and not self.embedder_model:
            raise ValueError("--embedder needs --embedder-model NAME_OR_PATH")
        if self.embedder is None and self.embedder_model:
            raise ValueError("--embedder-model given without --embedder")
        if self.embedder is not None and self.vector_field is not None:
            raise ValueError("give either --vector-field (bring vectors) or --embedder (compute them), not both")
        if not isinstance(self.update, bool) or not isinstance(self.delete_missing, bool):
            raise ValueError(f"update and delete_missing must be bools, got {self.update!r}, {self.delete_missing!r}")
        if len({self.id_field, self.text_field, self.vector_field} - {None}) < 2 + (self.vector_field is not None):
            raise ValueError("--id-field, --text-field and --vector-field must name different fields")
        if self.keep_fields is not None:
            from .input_columns import check_keep

            if isinstance(self.keep_fields, str):
                raise TypeError(f"keep_fields must be a list of field names, got {self.keep_fields!r}")
            check_keep(self.keep_fields)
            taken = [k for k in self.keep_fields if k in (self.id_field, self.text_field, self.vector_field)]
            if taken:
                raise ValueError(f"--keep-field {taken[0]!r} is the id, text or vector field already")

    @property
    def fields(self) -> Fields:
        """Which input fields hold what, and which others are kept."""
        keep = None if self.keep_fields is None else tuple(dict.fromkeys(self.keep_fields))
        return Fields(id=self.id_field, text=self.text_field, vector=self.vector_field, keep=keep)

    def ratios_for(self, store: PassageStore | None) -> list[int]:
        """The ratios a build writes: every one the table stores, or those asked for (default [4]) in a
        new table."""
        if store is not None:
            return store.ratios
        return list(self.ratios) if self.ratios is not None else [4]

    @property
    def vectors(self) -> Literal["brought", "embedder", "none"]:
        return "brought" if self.vector_field else ("embedder" if self.embedder else "none")


@dataclass
class BuildSummary:
    """What a build did."""

    read: int = 0  # records read from the input
    written: int = 0  # rows committed by this run
    already_stored: int = 0  # skipped: id stored before this run (resume / idempotence), unchanged
    updated: int = 0  # of the written rows: replaced a stored row whose text or vector changed (update=True)
    deleted: int = 0  # stored rows whose id the input does not hold, deleted (delete_missing=True)
    duplicates: int = 0  # skipped: id repeated later in the input (first occurrence wins)
    bad: int = 0  # skipped bad records (only with an ``on_bad`` handler)
    ratios: list[int] = field(default_factory=list)  # ratios written (every one the table stores)
    tokens: int = 0  # encoder tokens of the written rows
    truncated: int = 0  # written passages that reached max_length tokens (cut there, or exactly that long)
    max_length: int = 0  # the encoder's max_length the passages were cut at
    commits: int = 0  # Lance commits (one per chunk with new rows)
    seconds: float = 0.0  # wall time of the whole run
    setup_seconds: float = 0.0  # of which: loading the model and checking the table, before the first record
    index_seconds: float = 0.0  # of which: creating or updating the indices after the last commit
    delete_seconds: float = 0.0  # of which: deleting the ids missing from the input (delete_missing=True)
    rows: int = 0  # rows in the table afterwards
    indices: list[str] = field(default_factory=list)  # indices created or updated

    @property
    def work_seconds(self) -> float:
        """Reading, encoding, compressing and committing: the time the rates are measured over."""
        return max(self.seconds - self.setup_seconds - self.index_seconds - self.delete_seconds, 0.0)

    def line(self) -> str:
        work = self.work_seconds
        replaced = f" ({self.updated} replacing {'a changed row' if self.updated == 1 else 'changed rows'})" \
            if self.updated else ""
        replaced += f", deleted {plural(self.deleted, 'row')} not in the input ({self.delete_seconds:.1f} s)" \
            if self.deleted else ""
        return (f"read {self.read}, wrote {self.written}{replaced} in {plural(self.commits, 'commit')} "
                f"({self.rate(self.written):.1f} "
                f"passages/s, {self.rate(self.tokens):.0f} tokens/s over {work:.1f} s of encoding and writing; "
                f"{self.setup_seconds:.1f} s loading and checks, {self.index_seconds:.1f} s indexing), skipped "
                f"{self.already_stored} already stored + {plural(self.duplicates, 'duplicate id')} + {self.bad} bad; "
                f"{plural(self.truncated, 'passage')} cut at max_length {self.max_length} tokens; "
                f"table now has {plural(self.rows, 'row')}")

    def rate(self, count: int) -> float:
        """``count`` per second of :attr:`work_seconds`."""
        return count / self.work_seconds if self.work_seconds else 0.0


def make_embedder(name: Embedder, model: str, device: str = "cpu") -> Any:
    """A LanceDB embedding-registry function (e.g. sentence-transformers over a local folder)."""
    from ._deps import require

    if name == "sentence-transformers":
        require("sentence_transformers", "embed")
    from lancedb.embeddings import get_registry

    alias, model_name = embedder_identity(name, model)
    if alias != name:  # an offline package's model: refuse now, in a second, if the package is missing
        from .embedders import offline_model_path

        offline_model_path(model_name)
    return get_registry().get(alias).create(name=model_name, device=device)


def embedder_identity(name: Embedder, model: str) -> tuple[str, str]:
    """The registry function and model name a table records for ``--embedder NAME --embedder-model MODEL``:
    a local folder by its absolute path; a model served offline by an installed package (such as
    all-MiniLM-L6-v2) as ``kalm-sentence-transformers`` with its name, which each machine resolves to
    the package's own files (see :mod:`kalm_store.embedders`); any other name as given."""
    path = Path(model).expanduser()
    if path.is_dir():
        return name, str(path.resolve())
    from .embedders import ALIAS, OFFLINE_MODELS

    if name == "sentence-transformers" and model in OFFLINE_MODELS:
        return ALIAS, model
    return name, model


def build(options: BuildOptions, *, model: KaLMModel | None = None,
          on_bad: Callable[[BadRecordError], None] | None = None,
          on_commit: Callable[[BuildSummary], None] | None = None) -> BuildSummary:
    """Build (or resume) a passage store from ``options.input``.

    Parameters
    ----------
    options : BuildOptions
        What to read and where to write; validated first.
    model : KaLMModel, optional
        An already loaded model; default ``None`` loads ``options.model``.
    on_bad : callable, optional
        Called with each :class:`~kalm_store.records.BadRecordError`; the record is then skipped and
        counted. Default ``None``: the first bad record stops the build (after committing the valid
        records read before it) and its error, naming the line, is raised. Refused with
        ``delete_missing`` (a skipped record's id must not count as missing).
    on_commit : callable, optional
        Called (from the writer thread) with the running summary after each commit.

    Returns
    -------
    BuildSummary

    Examples
    --------
    >>> from kalm_store.build import BuildOptions, build
    >>> build(BuildOptions("corpus.jsonl", db="./db", table="docs", model="./tiny"))  # doctest: +SKIP
    """
    options.validate()
    check_skip_bad(options, on_bad)
    start = time.perf_counter()
    if options.input != STDIN and not Path(options.input).is_file():
        raise FileNotFoundError(f"input {options.input!r} does not exist or is not a file")
    from .model import KaLMModel

    target, columns, vector_dim, summary, records = check_before_model(options, options.storage_options,
                                                                       on_bad, model_given=model is not None)
    if model is None:
        model = KaLMModel.from_pretrained(options.model, revision=options.revision, device=options.device,
                                          dtype=options.dtype, max_length=options.max_length)
    store, ids, embedder = open_target(options, model, options.storage_options, target=target)
    try:
        return _build(options, model, store, ids, embedder, columns, vector_dim, summary, records,
                      on_bad=on_bad, on_commit=on_commit, start=start)
    finally:
        ids.close()  # the id set's file goes; nothing of it is needed to resume


def _build(options: BuildOptions, model: KaLMModel, store: PassageStore | None, ids: IdSet, embedder: Any,
           columns: InputColumns, vector_dim: int | None, summary: BuildSummary,
           records: Iterator[tuple[str, dict[str, Any]]], *, on_bad: Callable[[BadRecordError], None] | None,
           on_commit: Callable[[BuildSummary], None] | None, start: float) -> BuildSummary:
    """The body of :func:`build`, once the model is loaded and the table's id set read."""
    from .store import PassageStore

    fields = options.fields
    summary.max_length = model.max_length
    ratios = options.ratios_for(store)
    summary.ratios = ratios

    total = count_records(options.input, options.input_format)
    bar = _progress(total, options.progress)
    summary.setup_seconds = time.perf_counter() - start
    writer: _Writer | None = None
    try:
        for chunk in read_chunks(options, fields, vector_dim, summary, on_bad, records=records, columns=columns):
            if store is None:  # first chunk of a new table: now the vector width and the input's columns are known
                width = len(chunk[0].vector) if options.vector_field and chunk[0].vector else None
                store = create_or_join(options, model, ratios, width, embedder, columns.take_new(), ids)
            if writer is None:
                writer = _Writer(store, summary, on_commit, known_version=ids.version, update=options.update)
            if new_columns := columns.take_new():  # fields met first in this chunk: columns before rows
                writer.drain()
                store.add_input_columns(new_columns)
            todo, replaced, fields_only = select_work(store, chunk, ids, summary, update=options.update,
                                                      columns=columns)
            if todo:
                enc = model.encode_ratios([r.text for r in todo], ratios, batch_size=options.batch_size)
                summary.tokens += sum(enc.token_counts)
                summary.truncated += sum(n >= model.max_length for n in enc.token_counts)
                writer.submit(todo, enc, fields.vector is not None, replaced=replaced, extras=columns.table(todo))
            if fields_only:
                writer.submit_fields(fields_only, columns)
            bar.update(summary.read - bar.n)  # records read, bad and duplicate ones too: the bar ends at the total
            elapsed = max(time.perf_counter() - start - summary.setup_seconds, 1e-9)
            bar.set_postfix_str(f"{summary.tokens / elapsed:.0f} tok/s, {summary.written} written", refresh=False)
    except BaseException:
        if writer is not None:
            writer.close(reraise=False)  # commit what was encoded, then raise the first error
        raise
    else:
        if writer is not None:
            writer.close()
        bar.update(summary.read - bar.n)  # bad records after the last chunk
        # the writer commits behind the bar: its last count is only known now
        elapsed = max(time.perf_counter() - start - summary.setup_seconds, 1e-9)
        bar.set_postfix_str(f"{summary.tokens / elapsed:.0f} tok/s, {summary.written} written", refresh=False)
    finally:
        bar.close()
    if options.delete_missing and store is not None:  # only here: the whole input was read and committed
        delete_missing(store, options, ids, summary)
    return finish_build(store, options, summary, start)


def create_or_join(options: BuildOptions, model: KaLMModel, ratios: list[int], vector_dim: int | None,
                   embedder: Any, new_columns: list[pa.Field], ids: IdSet, *,
                   compute_dtype: str | None = None) -> PassageStore:
    """The table a build found missing, created for its first chunk; ``ids`` learns the version at
    which it knows every stored id (none).

    Two builds started on one missing table both get here. The one whose creation loses (LanceDB:
    "Table ... already exists") joins the table the other made, as if it had found it at start: checked
    against its options and model, its ids read into ``ids`` (nothing of the input is seen yet), its
    missing input columns added. Its chunks then merge on id, so neither build stores an id twice.
    ``compute_dtype``: as in :func:`open_target` (default: ``model``'s).
    """
    from .dtypes import dtype_name, record_compute_dtype
    from .store import PassageStore, StoreMismatchError

    try:
        store = PassageStore.create(options.db, options.table, model, ratios, vector_dim=vector_dim,
                                    embedder=embedder, storage_options=options.storage_options,
                                    columns=new_columns, compute_dtype=compute_dtype)
    except (ValueError, OSError) as e:
        # the same checks as a table found at start (open_target), now against the one another build made
        target = check_target(options, options.storage_options, max_length=model.max_length)
        if target is None:  # no table made by another build: a real failure
            raise
        store = PassageStore(target, model)  # refuses another model
        if store.ratios != ratios:  # this build encodes `ratios`: it cannot fill the other's columns
            raise StoreMismatchError(f"table {options.table!r} was created meanwhile by another build with ratios "
                                     f"{store.ratios}, this build writes {ratios}; run it again with --ratio "
                                     f"{' --ratio '.join(map(str, store.ratios))}") from e
        record_compute_dtype(store.table, compute_dtype or dtype_name(model.dtype))
        ids.add_table(store.table)  # every id stored so far, and the version it holds them at
        if missing := [f for f in new_columns if f.name not in store.table.schema.names]:
            store.add_input_columns(missing)
        return store
    ids.version = empty_version(store.table)
    return store


def check_skip_bad(options: BuildOptions, on_bad: Callable[[BadRecordError], None] | None) -> None:
    """Refuse ``delete_missing`` with an ``on_bad`` handler (both engines, before any work)."""
    if options.delete_missing and on_bad is not None:
        raise ValueError("--delete-missing cannot be combined with --skip-bad: a skipped record's id would count "
                         "as missing and its stored row be deleted")


def delete_missing(store: PassageStore, options: BuildOptions, ids: IdSet, summary: BuildSummary) -> None:
    """``--delete-missing`` (both engines), once the whole input was read and committed: delete the ids
    stored before the run that the input did not hold, streamed from ``ids`` 1000 per commit.

    Refuses, deleting nothing, an input without one valid record and (unless ``allow_mass_delete``)
    the deletion of more than :data:`MASS_DELETE_FRACTION` of the rows stored before the run.
    """
    stored = ids.stored_count
    if not ids.seen_count:  # an empty file or a failed producer piped in must not read as "delete everything"
        raise ValueError(f"input {options.input!r} holds no valid record: --delete-missing would delete all "
                         f"{stored} stored rows, so nothing was deleted")
    doomed = ids.missing_count()
    if doomed > MASS_DELETE_FRACTION * stored and not options.allow_mass_delete:
        # a truncated export or a file read wrongly looks like this: far fewer records than stored rows
        raise ValueError(f"input {options.input!r} holds {stored - doomed} of the {stored} stored "
                         f"ids: --delete-missing would delete {doomed} rows, more than half of the table, so "
                         "nothing was deleted (the input's own records are stored); if the input is complete, "
                         "run the same command with --allow-mass-delete")
    t = time.perf_counter()
    for batch in ids.missing(1000):  # sorted, 1000 per commit: the batches a sorted list gave before
        deleted, commits = store.delete_ids(batch)
        summary.deleted += deleted
        summary.commits += commits
    summary.delete_seconds = time.perf_counter() - t


def empty_version(table: Any) -> int | None:
    """The latest version of ``table`` if it holds no row (every stored id known: none), else ``None``."""
    ds = table.to_lance()
    return ds.version if ds.count_rows() == 0 else None


def finish_build(store: PassageStore | None, options: BuildOptions, summary: BuildSummary,
                 start: float) -> BuildSummary:
    """After the last commit (both engines): FTS and id indices, the table's row count, the wall time."""
    if store is None:
        raise ValueError(f"input {options.input!r} holds no records; nothing to build")
    from .index_memory import release_unused_memory

    store.refresh()
    t = time.perf_counter()
    release_unused_memory()  # the committed chunks' freed pages, before the index step adds its own
    summary.indices = store.update_indices(fts=options.fts_index, id_index=options.id_index)
    summary.index_seconds = time.perf_counter() - t
    summary.rows = store.table.count_rows()
    summary.seconds = time.perf_counter() - start
    return summary


def check_target(options: BuildOptions, storage_options: dict[str, str] | None, *,
                 max_length: int | None = None) -> Any:
    """The build's existing table (a LanceDB table, ``None`` when there is none yet), checked against the
    options without a model: ratios, vector setup, embedder name and, with ``max_length``, the encoder's
    truncation (and the template version). Cheap, so both engines run it before loading the model."""
    from . import prompts
    from .storage import connect
    from .store import PassageStore, StoreMismatchError, UncommittedTableError, _table_names

    db = connect(options.db, storage_options)
    if options.table not in _table_names(db):
        return None
    try:
        store = PassageStore.open(options.db, options.table, storage_options=storage_options)
    except UncommittedTableError:  # a creation killed before its first commit: nothing stored, start anew
        return None
    meta = store.metadata
    if max_length is not None and meta.get("max_length") != max_length:
        raise StoreMismatchError(f"table {options.table!r} was built with another configuration (max_length: table "
                                 f"has {meta.get('max_length')!r}, build asks for {max_length}); pass --max-length "
                                 f"{meta.get('max_length')}, or build a new table")
    if meta.get("template_version") != prompts.TEMPLATE_VERSION:
        raise StoreMismatchError(f"table {options.table!r} was built with another configuration (template_version: "
                                 f"table has {meta.get('template_version')!r}, this kalm-store uses "
                                 f"{prompts.TEMPLATE_VERSION!r}); use the kalm-store version that built it, or build "
                                 "a new table")
    emb_meta = None
    if options.embedder:  # compare before loading the embedder's weights
        alias, model_name = embedder_identity(options.embedder, options.embedder_model or "")
        emb_meta = {"name": alias, "model": model_name}
    store.check_layout(options.ratios if options.ratios is not None else store.ratios, vectors=options.vectors,
                       embedder=emb_meta)
    return store.table


def check_before_model(options: BuildOptions, storage_options: dict[str, str] | None,
                       on_bad: Callable[[BadRecordError], None] | None, *, model_given: bool
                       ) -> tuple[Any, InputColumns, int | None, BuildSummary, Iterator[tuple[str, dict[str, Any]]]]:
    """What both engines check before loading a model (the table's layout, the input's header and first
    record), so that a mistake costs a second, not a model load.

    Returns the existing LanceDB table (``None`` when there is none yet), the input's kept columns, the
    stored vector width (``None`` unless vectors are brought to an existing table), a fresh summary and
    the input's ``(where, raw)`` records with the first one already read.
    """
    from .input_columns import InputColumns, declared_types

    target = check_target(options, storage_options, max_length=None if model_given else options.max_length)
    columns = InputColumns(target.schema if target is not None else None, options.fields.keep,
                           declared=declared_types(options.input, options.input_format))
    vector_dim = None
    if target is not None and options.vector_field:
        from .schema import decode_metadata

        vector_dim = decode_metadata(target.schema.metadata).get("vector_dim")
    summary = BuildSummary(max_length=options.max_length)
    return target, columns, vector_dim, summary, open_input(options, options.fields, vector_dim, columns, summary,
                                                            on_bad)


def open_target(options: BuildOptions, model: KaLMModel, storage_options: dict[str, str] | None, *,
                target: Any = None, compute_dtype: str | None = None) -> tuple[PassageStore | None, IdSet, Any]:
    """The build's table checked against its options and the model, before any encoding (one place for
    both engines).

    ``target`` is what :func:`check_target` returned (run here when not given). Returns the open store
    (``None`` when the table does not exist yet), the ids it already holds (an :class:`IdSet` on disk,
    streamed from the table; the caller closes it), and the LanceDB embedding function of ``--embedder``
    (``None`` without one). Refuses another model, a ratio the table does not
    store or another vector setup, naming the difference. An existing table gets the encoder's
    ``compute_dtype`` (default: ``model``'s) added to its ``compute_dtypes`` before anything is encoded.
    """
    from .dtypes import dtype_name, record_compute_dtype
    from .store import PassageStore, StoreMismatchError, embedder_metadata

    if target is None:
        target = check_target(options, storage_options)
    store: PassageStore | None = None
    if target is not None:
        store = PassageStore(target, model)  # refuses another model (fingerprint, d, max_length...)
        record_compute_dtype(store.table, compute_dtype or dtype_name(model.dtype))
    embedder = make_embedder(options.embedder, options.embedder_model or "", options.embedder_device) \
        if options.embedder else None
    if embedder is not None and store is not None and embedder_metadata(embedder) != store.metadata.get("embedder"):
        raise StoreMismatchError(f"table {options.table!r} was embedded by {store.metadata.get('embedder')!r}, "
                                 f"not {embedder_metadata(embedder)!r}")
    # last: the checks above cost nothing, reading a large table's ids does
    ids = IdSet.of_table(store.table) if store is not None else IdSet()
    return store, ids, embedder


def open_input(options: BuildOptions, fields: Fields, vector_dim: int | None, columns: InputColumns | None,
               summary: BuildSummary, on_bad: Callable[[BadRecordError], None] | None
               ) -> Iterator[tuple[str, dict[str, Any]]]:
    """The input's ``(where, raw)`` records, with its header and first record read and checked now: a
    wrong field name, a bad CSV header or a JSON array input fails before the model is loaded.

    A bad first record raises here unless ``on_bad`` is given (then :func:`read_chunks` skips it).
    """
    def unreadable(e: BadRecordError) -> None:  # a line that is not a JSON object, skipped with on_bad
        summary.read += 1
        summary.bad += 1
        on_bad(e)  # type: ignore[misc]

    records = read_records(options.input, options.input_format, fields=fields,
                           on_bad=unreadable if on_bad is not None else None)
    head = list(itertools.islice(records, 1))
    if head and on_bad is None:
        rec = validate_record(head[0][1], head[0][0], fields=fields, vector_dim=vector_dim)
        if columns is not None:
            columns.check(rec)  # reserved names, a type the table's column cannot hold (again, harmlessly, later)
    return itertools.chain(head, records)


def read_chunks(options: BuildOptions, fields: Fields, vector_dim: int | None, summary: BuildSummary,
                on_bad: Callable[[BadRecordError], None] | None, *,
                records: Iterator[tuple[str, dict[str, Any]]] | None = None,
                columns: InputColumns | None = None) -> Iterator[list[Record]]:
    """Valid records in lists of ``chunk_size``; a bad record ends the stream after the records before it.

    ``records`` is :func:`open_input`'s stream (opened here when not given); ``columns`` checks the
    kept input fields of each record against their columns' types (``None``: no checks).
    """
    chunk: list[Record] = []
    error: BadRecordError | None = None
    if records is None:
        records = open_input(options, fields, vector_dim, None, summary, on_bad)
    try:
        for where, raw in records:
            summary.read += 1
            try:
                rec = validate_record(raw, where, fields=fields, vector_dim=vector_dim)
                if columns is not None:
                    columns.check(rec)
            except BadRecordError as e:
                if on_bad is None:
                    raise
                on_bad(e)
                summary.bad += 1
                continue
            if fields.vector is not None and vector_dim is None:
                vector_dim = len(rec.vector or [])  # the first record fixes the width of a new table
            chunk.append(rec)
            if len(chunk) >= options.chunk_size:
                yield chunk
                chunk = []
    except BadRecordError as e:
        error = e
    if chunk:
        yield chunk
    if error is not None:
        raise error


def commit_encoded(store: PassageStore, rows: pa.Table, replaced: int, summary: BuildSummary, *,
                   known_version: int | None = None, update: bool = False) -> int | None:
    """Commit encoded rows (both engines): one atomic commit through the pinned merge-insert of
    :mod:`kalm_store.commit` (an append while the table is still at ``known_version``, the version whose
    every id the build's id set holds); ``replaced`` of them replace stored rows of the same id
    (``update=True``). Returns the version known after the commit (``None``: unknown from now on).

    With ``update``, rows skipped because a concurrent writer stored their id after the build read the
    stored ids are replaced where that writer's text (or brought vector) differs, in a second commit: as
    if the update had run after that writer, which is what it would have done (before, the other text
    stayed, an outcome of no order of the two runs). A build killed between the two commits leaves the
    other writer's row; running the same ``--update`` again replaces it."""
    from .commit import next_known_version

    result = store.write(rows, replace=replaced > 0, known_version=known_version)
    summary.written += result.inserted + result.replaced
    summary.already_stored += result.skipped  # a concurrent writer stored them first
    summary.updated += replaced
    summary.commits += 1
    known = next_known_version(known_version, result)
    if update and result.skipped and replace_changed(store, rows, summary):  # only a merge without replace skips
        known = None
    return known


def replace_changed(store: PassageStore, rows: pa.Table, summary: BuildSummary) -> bool:
    """``--update`` after a race (both engines): of encoded ``rows`` counted as already stored, those
    whose stored row differs (another writer's text or vector) replace it, in one commit; nothing is
    re-encoded. Returns whether it committed."""
    taken = rows.filter(changed_flags(store, rows))
    if not taken.num_rows:
        return False
    again = store.write(taken, replace=True)
    summary.written += again.inserted + again.replaced
    summary.updated += again.replaced
    summary.already_stored -= again.inserted + again.replaced
    summary.commits += 1
    return True


def changed_flags(store: PassageStore, rows: pa.Table) -> list[bool]:
    """For each of the encoded ``rows``: does the table's row of that id differ from it (text or brought
    vector; True where the table has no such row)?"""
    from .store import MissingRowError

    ids, texts = rows.column("id").to_pylist(), rows.column("text").to_pylist()
    vectors = rows.column("vector").to_pylist() if store.brings_vectors and "vector" in rows.column_names else None
    store.refresh()
    try:
        return store.changed(ids, texts, vectors)
    except MissingRowError:  # a row deleted meanwhile: rewriting all of them is right for it too
        return [True] * len(ids)


def fields_rows(records: list[Record], columns: InputColumns) -> pa.Table:
    """``id`` and the kept input fields of ``records`` (stored rows whose text is unchanged but whose kept
    fields differ, from :func:`select_changed`), for :func:`commit_fields`."""
    import pyarrow as pa

    extras = columns.table(records)
    assert extras is not None  # only records whose kept fields differ come here
    return extras.add_column(0, "id", pa.array([r.id for r in records], pa.string()))


def commit_fields(store: PassageStore, rows: pa.Table, summary: BuildSummary) -> None:
    """Replace only the kept input fields of stored rows (:func:`fields_rows`), in one commit; nothing is
    re-encoded (both engines)."""
    store.replace_fields(rows)
    summary.written += rows.num_rows
    summary.updated += rows.num_rows
    summary.commits += 1


class _Writer:
    """Commits chunks in one background thread, so encoding overlaps the Lance write.

    The chunk's rows (matrices already compressed) are built by the encoding thread: zstd is CPU work,
    and on a CPU-only machine a second busy thread stalls every parallel region of the encoder's
    (OpenMP) threads, which cost more than compressing in line (``benchmarks/bench_build.py``). The
    queue holds one chunk: at most two chunks' matrices are in memory at once.
    """

    def __init__(self, store: PassageStore, summary: BuildSummary,
                 on_commit: Callable[[BuildSummary], None] | None, known_version: int | None = None,
                 update: bool = False) -> None:
        self.store = store
        self.update = update  # --update: rows a concurrent writer stored first are replaced (commit_encoded)
        # the version at which every stored id is in the build's id set (None: unknown): while no other
        # writer commits, chunks are appended instead of merged on id (kalm_store.commit)
        self.known_version = known_version
        self.summary = summary
        self.on_commit = on_commit
        # (rows, rows replacing stored ones, fields only): full rows, or id + kept fields of unchanged texts
        self.queue: queue.Queue[tuple[pa.Table, int, bool] | None] = queue.Queue(maxsize=1)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="kalm-store-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            try:
                if item is None:
                    return
                if self.error is not None:
                    continue  # drain after a failure
                rows, replaced, fields_only = item
                try:
                    if fields_only:
                        self.known_version = None  # a commit commit_rows does not see: merge from now on
                        commit_fields(self.store, rows, self.summary)
                    else:
                        self.known_version = commit_encoded(self.store, rows, replaced, self.summary,
                                                            known_version=self.known_version, update=self.update)
                    if self.on_commit is not None:
                        self.on_commit(self.summary)
                except BaseException as e:  # re-raised in the main thread
                    self.error = e
            finally:
                self.queue.task_done()

    def submit(self, records: list[Record], enc: EncodedPassages, with_vectors: bool, replaced: int = 0,
               extras: pa.Table | None = None) -> None:
        """Queue one chunk's commit; ``replaced`` of the records replace stored rows of the same id."""
        if self.error is not None:
            raise self.error
        rows = self.store.rows_table([r.id for r in records], [r.text for r in records], enc,
                                     [r.vector for r in records] if with_vectors else None, extras=extras)
        self.queue.put((rows, replaced, False))

    def submit_fields(self, records: list[Record], columns: InputColumns) -> None:
        """Queue the replacement of the kept input fields of stored rows whose text is unchanged."""
        if self.error is not None:
            raise self.error
        self.queue.put((fields_rows(records, columns), len(records), True))

    def drain(self) -> None:
        """Wait until every queued commit is done (before changing the table's schema)."""
        self.queue.join()
        if self.error is not None:
            raise self.error

    def close(self, reraise: bool = True) -> None:
        self.queue.put(None)
        self.thread.join()
        if reraise and self.error is not None:
            raise self.error


def _progress(total: int | None, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="passage", desc="build", disable=not enabled, dynamic_ncols=True,
                smoothing=0.1)


__all__ = ["BuildOptions", "BuildSummary", "build", "delete_missing", "make_embedder", "EMBEDDERS"]


def select_new(chunk: list[Record], ids: IdSet, summary: BuildSummary,
               stored_again: list[Record] | None = None) -> list[Record]:
    """The duplicate-id policy, shared by every engine: the first occurrence of an id in the input
    wins (later ones are counted as ``duplicates``), ids already stored are skipped (``already_stored``)
    or, when ``stored_again`` is a list, collected there for :func:`select_changed`.
    ``ids`` (stored before the run, seen so far) records the chunk's ids as seen."""
    todo = []
    for rec, verdict in zip(chunk, ids.classify([r.id for r in chunk])):
        if verdict == "duplicate":
            summary.duplicates += 1
            continue
        if verdict == "stored":
            if stored_again is None:
                summary.already_stored += 1
            else:
                stored_again.append(rec)
        else:
            todo.append(rec)
    return todo


def select_work(store: PassageStore, chunk: list[Record], ids: IdSet, summary: BuildSummary,
                *, update: bool, columns: InputColumns | None = None) -> tuple[list[Record], int, list[Record]]:
    """What one chunk asks of either engine: the records to encode (new ids, then, with ``update``, stored
    ids whose text or brought vector changed), how many of those replace stored rows (the last ones),
    and the stored records whose kept input fields alone changed (:func:`commit_fields`)."""
    stored_again: list[Record] | None = [] if update else None
    todo = select_new(chunk, ids, summary, stored_again)
    changed, fields_only = select_changed(store, stored_again, summary, columns) if stored_again else ([], [])
    return todo + changed, len(changed), fields_only


def select_changed(store: PassageStore, records: list[Record], summary: BuildSummary,
                   columns: InputColumns | None = None) -> tuple[list[Record], list[Record]]:
    """``update=True``: of records whose id is stored, those whose text (or brought vector) differs from
    the stored row (to re-encode), and of the others those whose kept input fields differ from the
    stored columns (``columns``; only those values are replaced, nothing is encoded). The rest are
    counted as ``already_stored``."""
    from .input_columns import same_value

    vectors = [r.vector for r in records] if store.brings_vectors else None
    flags = store.changed([r.id for r in records], [r.text for r in records], vectors)
    changed = [r for r, c in zip(records, flags) if c]
    same_text = [r for r, c in zip(records, flags) if not c]
    fields_only: list[Record] = []
    if columns is not None and columns.types and same_text:
        names = list(columns.types)
        stored = store.column_values([r.id for r in same_text], names)
        fields_only = [r for r in same_text
                       if r.id in stored and not all(same_value(stored[r.id][n], r.extra.get(n)) for n in names)]
    summary.already_stored += len(same_text) - len(fields_only)
    return changed, fields_only
