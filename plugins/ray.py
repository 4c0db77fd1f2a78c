"""Bulk building (and re-pooling) on a Ray cluster: encoder actors in Ray Data, one Lance commit per window.

The driver does what the local builder does, in the same order and with the same functions
(:mod:`kalm_store.build`): read and validate the input in chunks of ``chunk_size`` records, drop ids
seen earlier in the input or already stored (first occurrence wins), create or check the table
(same metadata, same refusals, before any encoding), and at the end update the FTS and id indices.
Only the middle moves to the cluster::

    driver: chunks of todo records ──ray.data.from_items──> EncodeActor x workers (one model each,
    num_gpus=G): model.encode_ratios [+ the table's embedding function] + PassageStore.rows_table
      ──> write task: lance.fragment.write_fragments (data files straight to the table's storage)
      ──> driver: one LanceOperation.Append commit per window of ``window_rows`` records

``update`` and ``delete_missing`` follow the local builder too, through its functions: the driver
picks, per chunk, the stored records whose text (or brought vector) changed (re-encoded by the
actors with the chunk's new records) and those whose kept input fields alone changed (no encoding).
An Append cannot replace rows, so a window that replaces any comes back to the driver as Arrow rows
and is committed through the local builder's pinned merge-insert on ``id`` (one atomic commit of its
new and replacing rows; the driver holds that window's encoded rows, so a large update wants a
smaller ``window_rows``); a window of new rows only is appended as above. The stored ids the input
does not hold are deleted once every window is committed, with the local builder's refusals, so a
stopped or failed run deletes nothing.

A chunk is encoded exactly as the local builder encodes it (same records, same length-sorted
batches), so a Ray build stores the same ids and bitwise the same matrices as a local build of the
same input on the same device, dtype and number of torch threads (CPU float32 sums depend on
it: ``RayOptions.threads_per_worker``). Each window's commit is atomic: a build stopped at any point
leaves whole windows, and running it again stores only what is missing (data files of an unfinished
window are unreferenced and removed by ``cleanup_old_versions``). Windows bound the driver's memory
(their texts) and the work lost to an interruption; actors start once per window (model load, about
10-30 s), so keep windows large (default one million records).

Examples
--------
>>> from kalm_store.build import BuildOptions
>>> from kalm_store.plugins.ray import RayOptions, build_on_ray
>>> opts = BuildOptions("corpus.jsonl", db="s3://bucket/db", table="docs", model="KaLM-Embedding/KaLM-Reranker-V1-Nano")
>>> build_on_ray(opts, RayOptions(address="auto", workers=8, gpus_per_worker=1))  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from kalm_store._deps import require

if TYPE_CHECKING:  # pragma: no cover
    from kalm_store.build import BuildOptions, BuildSummary
    from kalm_store.records import BadRecordError
    from kalm_store.repool import RepoolResult
    from kalm_store.store import PassageStore


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide the Ray part of a build runs."""

    address: str | None = None  # Ray cluster ("auto", "ray://head:10001"); None: RAY_ADDRESS or a local Ray
    workers: int = 1  # encoder actors, one model each
    gpus_per_worker: float = 0.0  # GPUs reserved per actor (0: CPU encoding); fractions share a GPU
    cpus_per_worker: float = 1.0  # CPUs reserved per actor
    threads_per_worker: int | None = None  # torch intra-op threads per actor; None: Ray's (= its CPUs)
    window_rows: int = 1_000_000  # records per Ray Data job and commit: resume granularity, driver memory
    rows_per_file: int = 1_048_576  # most rows in one Lance data file

    def validate(self) -> None:
        """Check the values without starting anything."""
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise ValueError(f"workers must be a positive int, got {self.workers!r}")
        for name in ("gpus_per_worker", "cpus_per_worker"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        if self.cpus_per_worker == 0 and self.gpus_per_worker == 0:
            raise ValueError("an actor needs cpus_per_worker > 0 or gpus_per_worker > 0")
        t = self.threads_per_worker
        if t is not None and (isinstance(t, bool) or not isinstance(t, int) or t < 1):
            raise ValueError(f"threads_per_worker must be a positive int or None, got {t!r}")
        for name in ("window_rows", "rows_per_file"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")


# ---------------------------------------------------------------------------------------------- workers
class EncodeActor:
    """Ray Data actor: loads the model once, turns chunks of records into rows of the table's schema.

    Input batch: one row per chunk (``chunk``, ``ids``, ``texts``[, ``vectors``]); output: the chunk's
    rows as built by :meth:`PassageStore.rows_table`, plus ``_chunk`` (the chunk's position in the input).
    """

    def __init__(self, spec: dict[str, Any]) -> None:
        from kalm_store.build import make_embedder
        from kalm_store.model import KaLMModel
        from kalm_store.store import PassageStore

        started = time.perf_counter()
        if spec["threads"] is not None:  # CPU results depend on the thread count: match the local build's
            import torch

            torch.set_num_threads(spec["threads"])
        model = KaLMModel.from_pretrained(spec["model"], revision=spec["revision"], device=spec["device"],
                                          dtype=spec["dtype"], max_length=spec["max_length"])
        # Opening with the model refuses a checkpoint that differs from the driver's (fingerprint).
        self.store = PassageStore.open(spec["db"], spec["table"], model=model,
                                       storage_options=spec["storage_options"])
        self.model = model
        # Fragments bypass LanceDB's add, so the table's embedding function runs here, per chunk as
        # add would run it.
        self.embedder = make_embedder(spec["embedder"], spec["embedder_model"], spec["embedder_device"]) \
            if spec["embedder"] else None
        self.ratios = spec["ratios"]
        self.batch_size = spec["batch_size"]
        self.load_seconds = time.perf_counter() - started

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        out = []
        for item in batch.to_pylist():
            enc = self.model.encode_ratios(item["texts"], self.ratios, batch_size=self.batch_size)
            vectors = item.get("vectors")
            if self.embedder is not None:
                vectors = self.embedder.compute_source_embeddings_with_retry(pa.array(item["texts"], pa.string()))
            # the kept input fields travel as Arrow IPC bytes: typed as the driver checked them, no pickle
            extras = pa.ipc.open_stream(item["extras"]).read_all() if item.get("extras") else None
            rows = self.store.rows_table(item["ids"], item["texts"], enc, vectors, extras=extras)
            rows = rows.append_column("_chunk", pa.array([item["chunk"]] * rows.num_rows, pa.int64()))
            out.append(rows.append_column("_tokens", pa.array(enc.token_counts, pa.int64())))
        return pa.concat_tables(out)


def write_block(batch: Any, *, uri: str, schema: Any, storage_options: dict[str, str] | None,
                data_storage_version: str | None, rows_per_file: int, max_length: int) -> Any:
    """Ray Data task: write one block of encoded rows as Lance data files; return the fragment metadata."""
    import lance.fragment
    import pyarrow as pa
    import pyarrow.compute as pc

    chunk = int(pc.min(batch.column("_chunk")).as_py())
    tokens, truncated = _token_stats(batch, max_length)
    rows = batch.drop_columns(["_chunk", "_tokens"])
    for f in schema:  # columns a user added to the table: null in new rows, as LanceDB's add leaves them
        if f.name not in rows.column_names:
            rows = rows.append_column(f, pa.nulls(rows.num_rows, f.type))
    rows = rows.select(schema.names).cast(schema)
    frags = lance.fragment.write_fragments(rows, uri, schema=schema, storage_options=storage_options,
                                           data_storage_version=data_storage_version,
                                           max_rows_per_file=rows_per_file)
    n = len(frags)
    return pa.table({"chunk": pa.array([chunk] * n, pa.int64()), "part": pa.array(range(n), pa.int64()),
                     "rows": pa.array([rows.num_rows if i == 0 else 0 for i in range(n)], pa.int64()),
                     "tokens": pa.array([tokens if i == 0 else 0 for i in range(n)], pa.int64()),
                     "truncated": pa.array([truncated if i == 0 else 0 for i in range(n)], pa.int64()),
                     "fragment": pa.array([json.dumps(f.to_json()) for f in frags], pa.string())})


# ---------------------------------------------------------------------------------------------- driver
def init_ray(options: RayOptions) -> bool:
    """Connect to ``options.address`` (or RAY_ADDRESS) or start a local Ray; True when this call started it."""
    ray = require("ray", "ray")
    if ray.is_initialized():
        return False
    ray.init(address=options.address, include_dashboard=False, log_to_driver=False,
             ignore_reinit_error=True)
    return True


def _absolute(path: str) -> str:
    """Local paths made absolute (workers do not share the driver's working directory); URIs as given."""
    return path if "://" in path else str(Path(path).expanduser().resolve())


def build_on_ray(options: BuildOptions, ray_options: RayOptions | None = None, *,
                 storage_options: dict[str, str] | None = None, model: Any | None = None,
                 on_bad: Callable[[BadRecordError], None] | None = None,
                 on_commit: Callable[[BuildSummary], None] | None = None) -> BuildSummary:
    """Build (or resume) a passage store like :func:`kalm_store.build.build`, encoding on Ray.

    Parameters
    ----------
    options : BuildOptions
        The same options as a local build (input, db, table, model, ratios, chunk_size, batch_size...).
    ray_options : RayOptions, optional
        Cluster address, actors, GPUs per actor, window size; default ``RayOptions()`` (one actor on a
        local Ray, or on the cluster named by ``RAY_ADDRESS``).
    storage_options : dict, optional
        Object-store options for ``options.db`` (see :func:`kalm_store.storage.storage_options`);
        they are passed to every worker.
    model : KaLMModel, optional
        The model loaded on the driver (for the table's metadata); default ``None`` loads
        ``options.model`` on the CPU. Actors load ``options.model`` themselves.
    on_bad, on_commit : callable, optional
        As in :func:`kalm_store.build.build` (``on_commit`` runs after each window's commit; ``on_bad``
        is refused with ``options.delete_missing``).

    Returns
    -------
    BuildSummary
        ``commits`` counts windows (plus, with ``update``, one per window whose kept fields alone
        changed, and the deletions' commits).
    """
    from kalm_store.build import (check_before_model, check_skip_bad, commit_fields, create_or_join, delete_missing,
                                  fields_rows, finish_build, open_target, read_chunks, select_work)
    from kalm_store.model import KaLMModel
    from kalm_store.records import STDIN, BadRecordError

    ray_options = ray_options or RayOptions()
    storage_options = storage_options if storage_options is not None else options.storage_options
    options.validate()
    ray_options.validate()
    check_skip_bad(options, on_bad)
    start = time.perf_counter()
    if options.input != STDIN and not Path(options.input).is_file():
        raise FileNotFoundError(f"input {options.input!r} does not exist or is not a file")
    require("ray", "ray")

    db_uri = _absolute(options.db)
    model_ref = _absolute(options.model) if Path(options.model).expanduser().is_dir() else options.model
    # as the local builder: what needs no model (table layout, input header, first record) comes first
    target, columns, vector_dim, summary, records = check_before_model(replace(options, db=db_uri), storage_options,
                                                                       on_bad, model_given=model is not None)
    fields = options.fields
    if model is None:
        model = KaLMModel.from_pretrained(model_ref, revision=options.revision, device="cpu",
                                          max_length=options.max_length)
    # the workers encode, on the device _run_window gives them, in options.dtype or that device's default
    worker_device = "cuda" if ray_options.gpus_per_worker > 0 else (options.device or "cpu")
    compute_dtype = options.dtype or ("bfloat16" if worker_device.startswith("cuda") else "float32")
    store, ids, embedder = open_target(replace(options, db=db_uri), model, storage_options, target=target,
                                       compute_dtype=compute_dtype)  # ids: stored before the run and seen, on disk
    summary.max_length = model.max_length
    summary.ratios = options.ratios_for(store)

    summary.setup_seconds = time.perf_counter() - start  # Ray's own start stays in the measured work
    started_ray = init_ray(ray_options)
    window: list[dict[str, Any]] = []  # chunks to encode
    field_rows: list[Any] = []  # id + kept fields of stored rows whose fields alone changed (update)
    window_rows = replaced = 0  # records read into the window; of its records to encode, those replacing rows

    def commit_window() -> None:
        nonlocal window, field_rows, window_rows, replaced
        assert store is not None  # created with the first chunk, before any window
        if window:
            ids.version = _run_window(window, store, options, ray_options, model_ref, db_uri, storage_options,
                                      summary, replaced=replaced, known_version=ids.version)
        if field_rows:
            import pyarrow as pa

            commit_fields(store, pa.concat_tables(field_rows, promote_options="default"), summary)
            ids.version = None  # a commit _run_window does not see: its next Append checks for duplicates
        if on_commit is not None:
            on_commit(summary)
        window, field_rows, window_rows, replaced = [], [], 0, 0

    try:
        for k, chunk in enumerate(read_chunks(options, fields, vector_dim, summary, on_bad, records=records,
                                              columns=columns)):
            if store is None:  # first chunk of a new table: the vector width and the input's columns are known now
                width = len(chunk[0].vector) if options.vector_field and chunk[0].vector else None
                # another build may create it meanwhile: then this one joins it (kalm_store.build.create_or_join)
                store = create_or_join(replace(options, db=db_uri, storage_options=storage_options), model,
                                       summary.ratios, width, embedder, columns.take_new(), ids,
                                       compute_dtype=compute_dtype)
            if new_columns := columns.take_new():  # fields met first in this chunk: columns before rows
                store.add_input_columns(new_columns)
            todo, n_replaced, fields_only = select_work(store, chunk, ids, summary, update=options.update,
                                                        columns=columns)
            if todo:
                item: dict[str, Any] = {"chunk": k, "ids": [r.id for r in todo], "texts": [r.text for r in todo]}
                if options.vector_field:
                    item["vectors"] = [r.vector for r in todo]
                extras = columns.table(todo)
                if extras is not None:
                    item["extras"] = _ipc_bytes(extras)
                window.append(item)
                replaced += n_replaced
            if fields_only:
                field_rows.append(fields_rows(fields_only, columns))
            window_rows += len(chunk)
            if (window or field_rows) and window_rows >= ray_options.window_rows:
                commit_window()
    except BadRecordError:
        if window or field_rows:  # as the local engine: the valid records before a bad one are committed
            commit_window()
        raise
    else:
        if window or field_rows:
            commit_window()
        if options.delete_missing and store is not None:  # only here: every window was committed
            delete_missing(store, options, ids, summary)
    finally:
        ids.close()
        if started_ray:
            require("ray", "ray").shutdown()
    return finish_build(store, options, summary, start)


def _run_window(window: list[dict[str, Any]], store: PassageStore, options: BuildOptions,
                ray_options: RayOptions, model_ref: str, db_uri: str,
                storage_options: dict[str, str] | None, summary: BuildSummary, *, replaced: int = 0,
                known_version: int | None = None) -> int | None:
    """Encode one window of chunks on Ray and commit it atomically: the actors' fragments in one Append,
    or, when ``replaced`` of its records replace stored rows (``update``), the encoded rows through the
    local engine's pinned merge-insert (:func:`kalm_store.build.commit_encoded`), run by the driver.

    ``known_version`` is the version at which the driver's id set holds every stored id: an Append read
    at another version (someone committed after the ids were read) or racing another commit is checked
    for ids stored twice. Returns the version known afterwards (``None``: unknown)."""
    import lance
    import ray.data

    store.refresh()
    ds = store.table.to_lance()
    read_version = ds.version
    gpus = ray_options.gpus_per_worker
    spec = {"model": model_ref, "revision": options.revision, "max_length": options.max_length,
            "device": "cuda" if gpus > 0 else (options.device or "cpu"), "dtype": options.dtype,
            "db": db_uri, "table": options.table, "storage_options": storage_options,
            "ratios": store.ratios, "batch_size": options.batch_size,
            "threads": ray_options.threads_per_worker, "embedder": options.embedder,
            "embedder_model": _absolute(options.embedder_model) if options.embedder_model
            and Path(options.embedder_model).expanduser().is_dir() else options.embedder_model,
            "embedder_device": options.embedder_device}
    data = ray.data.from_items(window, override_num_blocks=len(window))
    encoded = data.map_batches(EncodeActor, fn_constructor_kwargs={"spec": spec}, batch_size=1,
                               batch_format="pyarrow", concurrency=ray_options.workers,
                               num_cpus=ray_options.cpus_per_worker, num_gpus=gpus or None)
    max_length = store.model.max_length if store.model is not None else options.max_length
    if replaced:  # a Lance Append cannot replace rows: the window's rows come to the driver for one merge
        return _merge_window(encoded, store, replaced, max_length, summary, known_version)
    written = encoded.map_batches(
        write_block,  # type: ignore[arg-type]  # Ray's stub does not model fn_kwargs
        batch_size=None, batch_format="pyarrow", num_cpus=0.5,
        fn_kwargs={"uri": ds.uri, "schema": store.table.schema, "storage_options": storage_options,
                   "data_storage_version": ds.data_storage_version, "rows_per_file": ray_options.rows_per_file,
                   "max_length": max_length})
    parts = sorted(written.take_all(), key=lambda r: (r["chunk"], r["part"]))  # commit in input order
    fragments = [lance.fragment.FragmentMetadata.from_json(p["fragment"]) for p in parts]  # JSON: no pickle
    committed = lance.LanceDataset.commit(ds.uri, lance.LanceOperation.Append(fragments), read_version=read_version,
                                          storage_options=storage_options)
    summary.written += sum(p["rows"] for p in parts)
    # another writer committed meanwhile, or since the stored ids were read: it may hold our ids too
    uncontested = read_version == known_version and committed.version == read_version + 1
    if not uncontested:
        from kalm_store.commit import remove_duplicates_of

        store.refresh()
        lost = remove_duplicates_of(store.table, [i for item in window for i in item["ids"]], committed.version)
        summary.written -= len(lost)  # only copies of ours: the other writer's first copy stays
        summary.already_stored += len(lost)
        if options.update and lost:
            _update_lost_rows(store, committed.version, lost, summary)
    summary.tokens += sum(p["tokens"] for p in parts)
    summary.truncated += sum(p["truncated"] for p in parts)  # as the local builder counts them
    summary.commits += 1
    store.refresh()
    return committed.version if uncontested else None


def _update_lost_rows(store: PassageStore, version: int, lost: list[int], summary: BuildSummary) -> None:
    """``--update``: rows of ours deleted as later copies of ids another writer stored after the driver
    read the ids replace that writer's rows where their text (or brought vector) differs, as the local
    engine does (:func:`kalm_store.build.commit_encoded`): read back from ``version``, the Append that
    held them, and committed in one merge that replaces; nothing is re-encoded."""
    import pyarrow as pa

    from kalm_store.build import replace_changed

    at = store.table.to_lance().checkout_version(version)
    rows = pa.concat_tables([at.to_table(filter=f"_rowid IN ({', '.join(map(str, lost[i:i + 1000]))})")
                             for i in range(0, len(lost), 1000)])
    replace_changed(store, rows, summary)


def _merge_window(encoded: Any, store: PassageStore, replaced: int, max_length: int, summary: BuildSummary,
                  known_version: int | None = None) -> int | None:
    """Commit a window that replaces stored rows: its encoded rows (in input order) in one merge-insert."""
    import pyarrow as pa
    import ray

    from kalm_store.build import commit_encoded

    # blocks as Arrow tables (typed, no pickle of rows); chunks met later may hold more kept columns
    blocks = [b for b in ray.get(encoded.to_arrow_refs()) if b.num_rows]
    rows = pa.concat_tables(blocks, promote_options="default").sort_by("_chunk")  # stable: input order
    tokens, truncated = _token_stats(rows, max_length)
    known = commit_encoded(store, rows.drop_columns(["_chunk", "_tokens"]), replaced, summary,
                           known_version=known_version)
    summary.tokens += tokens
    summary.truncated += truncated
    store.refresh()
    return known


def _token_stats(rows: Any, max_length: int) -> tuple[int, int]:
    """Encoder tokens of encoded rows (their ``_tokens`` column) and how many reached ``max_length``."""
    import pyarrow.compute as pc

    tokens = rows.column("_tokens")
    return int(pc.sum(tokens).as_py() or 0), int(pc.sum(pc.greater_equal(tokens, max_length)).as_py() or 0)


def _ipc_bytes(table: Any) -> bytes:
    """An Arrow table as IPC stream bytes (how a chunk's kept input fields travel to the actors)."""
    import pyarrow as pa

    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


# ---------------------------------------------------------------------------------------------- repool
def repool_on_ray(store: PassageStore, from_ratio: int, to_ratio: int, ray_options: RayOptions | None = None, *,
                  storage_options: dict[str, str] | None = None, batch_size: int = 256) -> RepoolResult:
    """Derive ``kalm_r{to_ratio}`` from ``kalm_r{from_ratio}`` with ``lance_ray.add_columns``: one task per
    fragment across the cluster, one Merge commit (the vector index and other columns stay as they are).

    The same checks, transform and metadata step as :func:`kalm_store.repool.repool_store`. Finishing
    an interrupted run, or re-deriving the rows that hold null at the target ratio, is little work and
    runs locally, through :func:`~kalm_store.repool.repool_store`.
    """
    from kalm_store import schema
    from kalm_store.repool import RepoolResult, check_direction, check_repool, set_ratios
    from kalm_store.pooling import check_ratio

    lance_ray = require("lance_ray", "ray")
    ray_options = ray_options or RayOptions()
    ray_options.validate()
    f, t = check_ratio(from_ratio, "from_ratio"), check_ratio(to_ratio, "to_ratio")
    check_direction(f, t)
    table = store.table
    table.checkout_latest()
    ds = table.to_lance()
    stored = store.ratios
    dst = schema.column_name(t)
    if dst in ds.schema.names and f in stored:  # nothing to derive in bulk: finish a run or fill its nulls
        from kalm_store.repool import repool_store

        return repool_store(store, f, t, batch_size=batch_size)
    check_repool(stored, f, t, columns=ds.schema.names)
    transform = _repool_transform(f, t, store.dim)
    started = init_ray(ray_options)
    try:
        lance_ray.add_columns(ds.uri, transform=transform, read_columns=["id", "n_tokens", schema.column_name(f)],
                              storage_options=storage_options, batch_size=batch_size,
                              concurrency=ray_options.workers)
    finally:
        if started:
            require("ray", "ray").shutdown()
    rows = ds.count_rows()
    table.checkout_latest()
    set_ratios(table, stored + [t])
    return RepoolResult(from_ratio=f, to_ratio=t, rows=rows, ratios=store.ratios, dropped=None,
                        version=table.version)


def _repool_transform(f: int, t: int, dim: int) -> Callable[[Any], Any]:
    """A picklable batch UDF: ``kalm_r{f}`` rows -> ``kalm_r{t}`` rows (decode, re-pool, encode)."""
    import lance
    import pyarrow as pa

    from kalm_store import schema

    out_schema = pa.schema([schema.ratio_field(t)])

    @lance.batch_udf(output_schema=out_schema)
    def derive(batch: Any) -> Any:
        from kalm_store.repool import repool_batch

        return repool_batch(batch, f, t, dim)

    return derive


# ---------------------------------------------------------------------------------------------- CLI glue
def add_ray_arguments(parser: argparse.ArgumentParser, job: Literal["build", "repool"] = "build") -> None:
    """``--engine local|ray`` and the Ray flags of ``kalm-store build``, or of ``repool`` (which encodes
    nothing: only the cluster and the number of concurrent tasks apply)."""
    group = parser.add_argument_group("distributed (pip install \"kalm-store[ray]\")")
    if job == "repool":
        group.add_argument("--engine", choices=["local", "ray"], default="local",
                           help="where re-pooling runs: this process (default) or Ray tasks, one Lance add_columns "
                                "task per fragment")
    else:
        group.add_argument("--engine", choices=["local", "ray"], default="local",
                           help="where encoding runs: this process (default) or Ray Data actors")
    group.add_argument("--ray-address", default=None, metavar="ADDR",
                       help="Ray cluster to join (auto, ray://head:10001); default: RAY_ADDRESS, else a local Ray")
    if job == "repool":
        group.add_argument("--workers", type=int, default=1, metavar="N",
                           help="fragments re-pooled at once, one Ray task each (default: 1)")
        return
    group.add_argument("--workers", type=int, default=1, metavar="N", help="encoder actors, one model each (default: 1)")
    group.add_argument("--gpus-per-worker", type=float, default=0.0, metavar="G",
                       help="GPUs per actor (default: 0, CPU encoding)")
    group.add_argument("--cpus-per-worker", type=float, default=RayOptions.cpus_per_worker, metavar="C",
                       help=f"CPUs Ray reserves per actor (default: {RayOptions.cpus_per_worker:g})")
    group.add_argument("--threads-per-worker", type=int, default=None, metavar="T",
                       help="torch threads per actor (default: its reserved CPUs); matrices are bitwise equal to "
                            "a local CPU build's only at the local build's thread count")
    group.add_argument("--window-rows", type=int, default=RayOptions.window_rows, metavar="N",
                       help="records per Ray job and commit, the resume granularity; with --update a window that "
                            "replaces rows is merged by the driver, which then holds its encoded rows (default: "
                            f"{RayOptions.window_rows})")


def ray_options_from_args(args: argparse.Namespace) -> RayOptions:
    """Typed :class:`RayOptions` from the parsed flags of :func:`add_ray_arguments` (validated); the
    flags ``repool`` does not take keep their defaults."""
    opts = RayOptions(address=args.ray_address, workers=args.workers,
                      gpus_per_worker=getattr(args, "gpus_per_worker", 0.0),
                      cpus_per_worker=getattr(args, "cpus_per_worker", RayOptions.cpus_per_worker),
                      threads_per_worker=getattr(args, "threads_per_worker", None),
                      window_rows=getattr(args, "window_rows", RayOptions.window_rows))
    opts.validate()
    return opts


def run_ray_build(options: BuildOptions, args: argparse.Namespace, storage_options: dict[str, str] | None = None,
                  *, on_commit: Callable[[BuildSummary], None] | None = None) -> BuildSummary:
    """What ``kalm-store build --engine ray`` runs after parsing."""
    return build_on_ray(options, ray_options_from_args(args), storage_options=storage_options, on_commit=on_commit)


__all__ = ["RayOptions", "EncodeActor", "build_on_ray", "repool_on_ray", "add_ray_arguments",
           "ray_options_from_args", "run_ray_build", "init_ray", "write_block"]
