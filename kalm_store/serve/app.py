"""The HTTP app: routes, request/response models, errors (FastAPI).

Endpoints mirror the rerank APIs clients already speak:

* ``POST /v2/rerank``, ``POST /v1/rerank``: Cohere's rerank (``cohere.ClientV2(base_url=...)``,
  LangChain's and LlamaIndex's Cohere rerankers);
* ``POST /rerank``: text-embeddings-inference's (LlamaIndex's TEI postprocessor);
* ``POST /search``: first stage + rerank in the served table (:func:`kalm_store.search`'s arguments);
* ``GET /health``, ``GET /info``, ``GET /metrics`` (Prometheus).

Every request handler does its table reads, online encoding and waiting in worker threads; the model
runs on the batcher's scoring thread only. Errors are one JSON object ``{"message": ...}`` (also as
``error`` and ``error_type``, TEI's keys) and never a stack trace: unexpected errors are logged here
with a request id, which the response names.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import logging
import time
import uuid
from collections.abc import Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .batcher import Batcher, Job, QueueFullError, ShuttingDownError, describe, probabilities
from .resolve import SOURCES, Document, Resolver

if TYPE_CHECKING:  # pragma: no cover
    from ..model import KaLMModel

log = logging.getLogger("kalm_store.serve")

DEFAULT_MAX_PENDING = 64
DEFAULT_MAX_DOCUMENTS = 1000
DEFAULT_CACHE_MIB = 256
DEFAULT_BATCH_SIZE: int | None = None  # no candidate cap: the row budget bounds a pass
# Padded stored rows per decoder pass when not given, by device. On the CPU, packed passes of 512-1024
# rows scored 106-112 candidates per CPU second against 85 at 8192 rows (they stay in cache; the sweep in
# benchmarks/results/serve_small.md, small shape, 4 queries x 100 candidates; the tiny shape agreed).
# On a GPU bigger passes keep it busy; 8192 is the model's own memory bound (model._ROWS_PER_BATCH).
CPU_MAX_BATCH_ROWS = 1024
GPU_MAX_BATCH_ROWS = 8192


def default_max_batch_rows(device: Any) -> int:
    """The row budget per decoder pass for a model on ``device`` (see ``CPU_MAX_BATCH_ROWS``)."""
    return CPU_MAX_BATCH_ROWS if str(device).startswith("cpu") else GPU_MAX_BATCH_ROWS


# ---------------------------------------------------------------------- request / response models
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is a 422 naming it, not silently ignored


class DocumentObject(BaseModel):
    """A document as an object: ``{"text": ...}`` (Cohere v1), or ``{"id": ...}`` naming a stored row."""

    model_config = ConfigDict(extra="allow")  # Cohere v1 objects may carry other fields; they are echoed back
    text: str | None = None
    id: str | None = None

    @model_validator(mode="after")
    def _one_of(self) -> DocumentObject:
        if (self.text is None) == (self.id is None):
            raise ValueError("a document object needs exactly one of 'text' or 'id'")
        return self


class CohereRerankRequest(_Strict):
    """Cohere's rerank request (v1 and v2 fields), plus the extension ``instruction``."""

    model: str | None = Field(None, description="accepted; checked against the served model when given")
    query: str = Field(..., min_length=1)
    documents: list[str | DocumentObject]
    top_n: int | None = Field(None, ge=1)
    return_documents: bool = False
    max_tokens_per_doc: int | None = Field(None, ge=1)
    max_chunks_per_doc: int | None = Field(None, ge=1)  # v1: accepted, documents are never chunked
    rank_fields: list[str] | None = None  # v1: accepted; object documents are scored by their `text`
    instruction: str | None = None


class TEIRerankRequest(_Strict):
    """text-embeddings-inference's ``/rerank`` request."""

    query: str = Field(..., min_length=1)
    texts: list[str]
    raw_scores: bool = False
    return_text: bool = False
    truncate: bool | None = None
    truncation_direction: Literal["Right", "right", "Left", "left"] = "Right"
    instruction: str | None = None


class SearchRequest(_Strict):
    """``POST /search``: the arguments of :func:`kalm_store.search`."""

    query: str = Field(..., min_length=1)
    k: int = Field(10, ge=1)
    candidates: int = Field(100, ge=1)
    mode: Literal["vector", "fts", "hybrid"] = "hybrid"
    where: str | None = None
    fields: list[str] = Field(default_factory=list)
    query_vector: list[float] | None = None
    instruction: str | None = None


# ---------------------------------------------------------------------- errors
class APIError(Exception):
    """An error answered with ``status`` and a one-line message."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers


class ClientGone(Exception):
    """The client disconnected while its request waited."""


def _error(status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"message": message, "error": message, "error_type": kind}, status_code=status,
                        headers=headers)


def _field_name(loc: Sequence[Any]) -> str:
    """``("body", "documents", 0, "str")`` -> ``documents.0``: the field, without the union branch tried."""
    parts = [p for p in loc if p != "body"]
    if len(parts) >= 3 and parts[0] == "documents" and isinstance(parts[1], int) and parts[2] in ("str", "DocumentObject"):
        parts = parts[:2] + parts[3:]
    return ".".join(str(p) for p in parts) if parts else "body"


def _validation_message(exc: RequestValidationError) -> str:
    """One line naming each bad field (at most 5) and what is wrong with it."""
    errors = exc.errors()
    if not errors:
        return "invalid request"
    if errors[0].get("type") == "json_invalid":
        return f"body: malformed JSON ({errors[0].get('ctx', {}).get('error', errors[0].get('msg'))})"
    by_field: dict[str, list[str]] = {}
    for e in errors:
        msgs = by_field.setdefault(_field_name(e["loc"]), [])
        if e["msg"] not in msgs:
            msgs.append(e["msg"])
    # a union (string or document object) reports one message per branch: both are named
    return "; ".join(f"{f}: {' / '.join(m)}" for f, m in list(by_field.items())[:5])


# ---------------------------------------------------------------------- settings
@dataclass(frozen=True)
class ServeOptions:
    """What :func:`create_app` serves and how (one comment per field)."""

    db: str  # LanceDB database URI
    table: str  # table name
    ratio: int | None = None  # stored ratio scored; None: the smallest stored
    max_pending: int = DEFAULT_MAX_PENDING  # queued requests before 429
    max_documents: int = DEFAULT_MAX_DOCUMENTS  # documents per request before 413 (and /search candidates)
    api_key: str | None = None  # required as `Authorization: Bearer KEY` when set
    cache_mib: float = DEFAULT_CACHE_MIB  # LRU of online-encoded matrices, MiB
    batch_size: int | None = DEFAULT_BATCH_SIZE  # candidates per decoder pass at most; None: rows bound a pass
    max_batch_rows: int | None = None  # padded stored rows per decoder pass; None: by device (default_max_batch_rows)
    batching: bool = True  # pack several requests into each decoder pass
    storage_options: dict[str, str] | None = None  # object-store options for lancedb.connect
    create_digest_index: bool = True  # create the text_digest scalar index at start when missing


def check_options(o: ServeOptions) -> None:
    """Refuse bad settings (``ValueError`` naming them) before anything is opened or loaded."""
    for name in ("max_pending", "max_documents", "batch_size", "max_batch_rows"):
        value = getattr(o, name)
        if value is None and name in ("batch_size", "max_batch_rows"):
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if isinstance(o.cache_mib, bool) or not isinstance(o.cache_mib, (int, float)) or o.cache_mib < 0:
        raise ValueError(f"cache_mib must be a number >= 0, got {o.cache_mib!r}")
    if o.api_key is not None and (not isinstance(o.api_key, str) or not o.api_key):
        raise ValueError("api_key must be a non-empty string or None")
    if o.ratio is not None:
        from ..pooling import check_ratio

        check_ratio(o.ratio)


class Service:
    """The served table, model, resolver and batcher behind one app."""

    def __init__(self, options: ServeOptions, model: KaLMModel) -> None:
        from ..store import PassageStore, check_ratio_stored
        from . import metrics

        self.options = options
        self.model = model
        # refuses, by name, a table built by another model or configuration
        self.store = PassageStore.open(options.db, options.table, model=model, storage_options=options.storage_options)
        stored = self.store.ratios
        self.ratio = stored[0] if options.ratio is None else check_ratio_stored(
            self.store.metadata, options.ratio, what=f"table {options.table!r}")
        if options.create_digest_index:
            self._digest_index()
        self.metrics = metrics.Metrics()
        self.resolver = Resolver(self.store, model, self.ratio, int(options.cache_mib * 2**20))
        self.max_batch_rows = (options.max_batch_rows if options.max_batch_rows is not None
                               else default_max_batch_rows(model.device))
        self.batcher = Batcher(model, max_pending=options.max_pending, batch_size=options.batch_size,
                               max_rows=self.max_batch_rows, batching=options.batching,
                               on_pass=self.metrics.on_pass)
        self.metrics.bind(self)
        names = {model.name_or_path, Path(model.name_or_path).name}
        self.model_names = {n for n in names if n}

    def _digest_index(self) -> None:
        """The BTREE index on ``text_digest`` that text lookups probe, made at start when the table lacks it."""
        from .. import schema

        if not self.store.has_digests or self.store.table.count_rows() == 0:
            return
        if any(list(ix.columns) == [schema.DIGEST_COLUMN] for ix in self.store.table.list_indices()):
            return
        from lancedb.index import BTree

        from ..index_memory import bounded_index_memory

        try:
            with bounded_index_memory():
                self.store.table.create_index(schema.DIGEST_COLUMN, config=BTree(), replace=False)
            log.info("created the BTREE index on %s of table %r", schema.DIGEST_COLUMN, self.options.table)
        except Exception as e:  # noqa: BLE001 - a read-only store still serves, by scanning the digests
            log.warning("could not create the %s index (%s: %s); text lookups scan the column",
                        schema.DIGEST_COLUMN, type(e).__name__, e)

    def info(self) -> dict[str, Any]:
        meta = self.store.metadata
        return {"model": self.model.name_or_path, "model_revision": self.model.revision,
                "fingerprint": meta.get("fingerprint"), "table": self.options.table, "db": self.options.db,
                "ratio": self.ratio, "ratios": self.store.ratios, "rows": self.store.table.count_rows(),
                "table_version": self.store.table.version, "max_documents": self.options.max_documents,
                "max_pending": self.options.max_pending, "batching": self.options.batching,
                "batch_size": self.options.batch_size, "max_batch_rows": self.max_batch_rows,
                "pid": os.getpid(), "device": str(self.model.device), "dtype": str(self.model.dtype).replace("torch.", ""),
                "cache": {"bytes": self.resolver.cache.bytes, "max_bytes": self.resolver.cache.max_bytes,
                          "entries": len(self.resolver.cache)},
                "batcher": describe(self.batcher.stats) | {"pending": self.batcher.pending}}

    # ------------------------------------------------------------------ the shared rerank path
    async def rerank(self, request: Request, query: str, documents: list[Document],
                     instruction: str | None) -> tuple[Any, Any]:
        """Resolve and score ``documents`` against ``query``: (margins float32, Resolved)."""
        if len(documents) > self.options.max_documents:
            raise APIError(413, f"{len(documents)} documents in one request; this server takes at most "
                                f"{self.options.max_documents} (--max-documents)")
        resolved = await run_in_threadpool(self.resolver.resolve, documents)
        for source in SOURCES:
            self.metrics.documents.labels(source=source).inc(resolved.counts[source])
        if await request.is_disconnected():
            raise ClientGone()
        job = self.submit(query, resolved.matrices, instruction)
        return await self.wait(request, [job]), resolved

    def submit(self, query: str, matrices: Sequence[Any], instruction: str | None) -> Job:
        try:
            return self.batcher.submit(query, matrices, instruction)
        except QueueFullError as e:
            self.metrics.rejected.inc()
            raise APIError(429, str(e), headers={"Retry-After": str(e.retry_after)}) from None

    async def wait(self, request: Request, jobs: list[Job], task: asyncio.Future | None = None) -> Any:
        """Wait for ``task`` (or the one job's future), cancelling the queued jobs if the client leaves."""
        fut = task if task is not None else asyncio.wrap_future(jobs[0].future)
        while True:
            done, _ = await asyncio.wait({fut}, timeout=0.05)
            if done:
                return fut.result()
            if await request.is_disconnected():
                for job in list(jobs):
                    if self.batcher.cancel(job):
                        self.metrics.cancelled.inc()
                raise ClientGone()


def _check_model_field(service: Service, name: str | None) -> None:
    if name is not None and name not in service.model_names:
        raise APIError(422, f"model: this server serves {sorted(service.model_names)!r}, not {name!r} "
                            "(omit model, or name the served one)")


def _cohere_results(margins: Any, resolved: Any, body: CohereRerankRequest, version: str) -> dict[str, Any]:
    import numpy as np

    scores = probabilities(margins)
    order = np.argsort(-scores, kind="stable")[: body.top_n]
    results = []
    for i in order:
        item: dict[str, Any] = {"index": int(i), "relevance_score": float(scores[i])}
        if body.return_documents:
            doc = body.documents[i]
            extra = doc.model_dump(exclude_none=True) if isinstance(doc, DocumentObject) else {}
            item["document"] = extra | {"text": resolved.texts[i]}
        results.append(item)
    return {"id": str(uuid.uuid4()), "results": results,
            "meta": {"api_version": {"version": version}, "billed_units": {"search_units": 1},
                     "documents": resolved.counts}}


# ---------------------------------------------------------------------- the app
def create_app(
    db: str,
    table: str,
    model: KaLMModel | str | Path,
    *,
    ratio: int | None = None,
    max_pending: int = DEFAULT_MAX_PENDING,
    max_documents: int = DEFAULT_MAX_DOCUMENTS,
    api_key: str | None = None,
    cache_mib: float = DEFAULT_CACHE_MIB,
    batch_size: int | None = DEFAULT_BATCH_SIZE,
    max_batch_rows: int | None = None,
    batching: bool = True,
    device: str | None = None,
    dtype: str | None = None,
    storage_options: dict[str, str] | None = None,
) -> FastAPI:
    """The kalm-store rerank service as an ASGI app (run it with uvicorn, or ``kalm-store serve``).

    Parameters
    ----------
    db : str
        LanceDB database URI.
    table : str
        A kalm-store passage store in it; refused at start, naming what differs, if ``model`` did not build it.
    model : KaLMModel or str or Path
        The model that built the table, or its hub id / folder (loaded here, on ``device``).
    ratio : int, optional
        Stored MEP ratio to score with; default ``None`` is the smallest the table stores.
    max_pending : int, default 64
        Requests waiting for the scoring worker before new ones get 429 with ``Retry-After``.
    max_documents : int, default 1000
        Documents per request (and first-stage candidates per ``/search``) before 413.
    api_key : str, optional
        When set, every request but ``GET /health`` needs ``Authorization: Bearer <api_key>``.
    cache_mib : float, default 256
        Size of the LRU of matrices encoded online for texts the table does not hold.
    batch_size : int, optional
        Candidates per decoder pass at most; default ``None``: only ``max_batch_rows`` bounds a pass.
    max_batch_rows : int, optional
        Padded stored rows per decoder pass, whichever requests the candidates come from (a pass
        packs several); the worker takes waiting requests up to 8 passes' worth per step. Default
        ``None``: 1024 on the CPU (smaller passes stay in cache), 8192 on a GPU.
    batching : bool, default True
        Pack the candidates of several waiting requests into each decoder pass.
    device : str, optional
        Device of a model loaded here; default ``None`` picks CUDA when available.
    dtype : {"float32", "bfloat16", "auto"}, optional
        Compute dtype of a model loaded here (``kalm-store serve --dtype``; see :mod:`kalm_store.dtypes`);
        default ``None``: bfloat16 on CUDA, float32 on CPU. Stored matrices are float16 either way. With a
        loaded ``model``, a dtype it does not have is refused.
    storage_options : dict, optional
        Object-store options for ``lancedb.connect``.

    Returns
    -------
    fastapi.FastAPI

    Examples
    --------
    >>> import uvicorn
    >>> from kalm_store.serve import create_app
    >>> app = create_app("./db", "docs", "KaLM-Embedding/KaLM-Reranker-V1-Nano")  # doctest: +SKIP
    >>> uvicorn.run(app, host="127.0.0.1", port=8000)  # doctest: +SKIP
    """
    options = ServeOptions(db=db, table=table, ratio=ratio, max_pending=max_pending, max_documents=max_documents,
                           api_key=api_key, cache_mib=cache_mib, batch_size=batch_size,
                           max_batch_rows=max_batch_rows, batching=batching, storage_options=storage_options)
    check_options(options)
    from ..model import KaLMModel
    from ..store import PassageStore

    from ..dtypes import dtype_name, resolve_dtype

    if not isinstance(model, KaLMModel):
        PassageStore.open(db, table, storage_options=storage_options)  # a wrong --db/--table fails before loading
        model = KaLMModel.from_pretrained(model, device=device, dtype=resolve_dtype(dtype, device))
    elif dtype is not None and dtype != "auto" and dtype_name(model.dtype) != resolve_dtype(dtype, str(model.device)):
        raise ValueError(f"dtype={dtype!r}, but the given model computes in {dtype_name(model.dtype)}: load it "
                         f"with KaLMModel.from_pretrained(..., dtype={dtype!r}), or pass its name instead")
    return build_app(Service(options, model))


def build_app(service: Service) -> FastAPI:
    """The FastAPI app around a ready :class:`Service`."""
    from ..store import MissingRowError, StaleMatrixError, StoreMismatchError

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        service.batcher.start()
        log.info("serving table %r (r=%d, %d rows) with %s", service.options.table, service.ratio,
                 service.store.table.count_rows(), service.model.name_or_path)
        try:
            yield
        finally:
            # uvicorn has finished the in-flight requests by now (SIGTERM: graceful shutdown); the
            # worker scores whatever is still queued, then ends
            await run_in_threadpool(service.batcher.stop)
            log.info("scoring worker stopped")

    app = FastAPI(title="kalm-store", version=_version(), lifespan=lifespan,
                  description="KaLM-Reranker-V1 over a kalm-store table: Cohere- and TEI-compatible rerank.")
    app.state.service = service

    async def authorize(request: Request) -> None:
        key = service.options.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise APIError(401, "missing or wrong API key: send `Authorization: Bearer <key>`",
                           headers={"WWW-Authenticate": "Bearer"})

    guarded = [Depends(authorize)]

    # ------------------------------------------------------------------ errors
    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, _validation_message(exc), "Validation")

    @app.exception_handler(APIError)
    async def _api(request: Request, exc: APIError) -> JSONResponse:
        kind = {401: "Unauthorized", 404: "NotFound", 413: "PayloadTooLarge", 429: "Overloaded"}.get(exc.status, "Validation")
        return _error(exc.status, str(exc), kind, exc.headers)

    async def _answer(request: Request, exc: Exception) -> Response:
        """Known failures, each as one status and a one-line message (exception handlers, by class)."""
        if isinstance(exc, ClientGone):
            return Response(status_code=499)  # nobody reads it; the status is for the metrics and the log
        if isinstance(exc, MissingRowError):
            return _error(404, str(exc), "NotFound")
        if isinstance(exc, (StaleMatrixError, StoreMismatchError)):
            return _error(409, str(exc), "Conflict")
        if isinstance(exc, ShuttingDownError):
            return _error(503, str(exc), "Unavailable")
        # ValueError / TypeError: user input the library refused (a bad filter, a missing index...)
        return _error(400, str(exc).splitlines()[0][:1000] if str(exc) else type(exc).__name__, "Validation")

    for cls in (ClientGone, MissingRowError, StaleMatrixError, StoreMismatchError, ShuttingDownError, ValueError,
                TypeError):
        app.add_exception_handler(cls, _answer)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        rid = uuid.uuid4().hex[:12]
        log.error("request %s %s failed (request id %s)", request.method, request.url.path, rid, exc_info=exc)
        return _error(500, f"internal error (request id {rid}; details are in the server log)", "Backend")

    app.add_middleware(_Observe, metrics=service.metrics)

    # ------------------------------------------------------------------ routes
    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/info", dependencies=guarded)
    async def info() -> dict[str, Any]:
        return await run_in_threadpool(service.info)

    @app.get("/metrics", dependencies=guarded)
    async def metrics() -> Response:
        body, content_type = service.metrics.render()
        return Response(body, media_type=content_type)

    async def cohere(request: Request, body: CohereRerankRequest, version: str) -> dict[str, Any]:
        _check_model_field(service, body.model)
        if body.max_tokens_per_doc is not None and body.max_tokens_per_doc < service.model.max_length:
            raise APIError(422, f"max_tokens_per_doc: {body.max_tokens_per_doc} is below the served model's "
                                f"max_length ({service.model.max_length}); stored matrices were encoded from "
                                f"{service.model.max_length} tokens, so shorter cuts are not supported")
        docs = [Document(id=d.id, text=d.text) if isinstance(d, DocumentObject) else Document(text=d)
                for d in body.documents]
        if not docs:
            return _cohere_results([], _empty(), body, version)
        margins, resolved = await service.rerank(request, body.query, docs, body.instruction)
        return _cohere_results(margins, resolved, body, version)

    @app.post("/v2/rerank", dependencies=guarded)
    async def rerank_v2(request: Request, body: CohereRerankRequest) -> dict[str, Any]:
        """Cohere v2 rerank."""
        return await cohere(request, body, "2")

    @app.post("/v1/rerank", dependencies=guarded)
    async def rerank_v1(request: Request, body: CohereRerankRequest) -> dict[str, Any]:
        """Cohere v1 rerank."""
        return await cohere(request, body, "1")

    @app.post("/rerank", dependencies=guarded)
    async def rerank_tei(request: Request, body: TEIRerankRequest) -> list[dict[str, Any]]:
        """text-embeddings-inference rerank: ``[{index, score, text?}]`` sorted by score, descending."""
        import numpy as np

        if body.truncation_direction.lower() == "left":
            raise APIError(422, "truncation_direction: 'Left' is not supported; stored matrices keep a passage's "
                                "first max_length tokens ('Right')")
        if not body.texts:
            return []
        margins, resolved = await service.rerank(request, body.query, [Document(text=t) for t in body.texts],
                                                 body.instruction)
        scores = np.asarray(margins, np.float32) if body.raw_scores else probabilities(margins)
        order = np.argsort(-scores, kind="stable")
        return [{"index": int(i), "score": float(scores[i])} | ({"text": body.texts[i]} if body.return_text else {})
                for i in order]

    @app.post("/search", dependencies=guarded)
    async def search(request: Request, body: SearchRequest) -> dict[str, Any]:
        """First stage in the served table, then rerank (as :func:`kalm_store.search`)."""
        from ..query import check_search_args, run_search
        from .search import BatchedReranker

        if body.candidates > service.options.max_documents:
            raise APIError(413, f"candidates: {body.candidates} is more than this server scores per request "
                                f"({service.options.max_documents}, --max-documents)")
        check_search_args(body.query, body.k, body.candidates, body.mode, service.ratio, body.query_vector,
                          body.where, body.fields)

        def reranker() -> BatchedReranker:
            service.resolver.dataset()  # sees other writers' commits, as text lookups do
            return BatchedReranker(service.model, table=service.store.table, batcher=service.batcher,
                                   ratio=service.ratio, instruction=body.instruction)

        rr = await run_in_threadpool(reranker)
        task = asyncio.ensure_future(run_in_threadpool(
            run_search, service.store.table, rr, body.query, k=body.k, candidates=body.candidates, mode=body.mode,
            query_vector=body.query_vector, where=body.where, fields=body.fields))
        # if the client leaves, the thread's job is cancelled and its error is not anyone's to read
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        try:
            hits = await service.wait(request, rr.jobs, task=task)  # rr.jobs fills while the thread runs
        except QueueFullError as e:
            service.metrics.rejected.inc()
            raise APIError(429, str(e), headers={"Retry-After": str(e.retry_after)}) from None
        service.metrics.documents.labels(source="stored").inc(len(hits))
        return {"query": body.query, "results": _jsonable(hits)}

    return app


class _Observe:
    """Pure ASGI middleware counting requests, statuses, latency and in-flight requests.

    Not Starlette's ``BaseHTTPMiddleware``: that one wraps ``receive`` so that a handler's
    ``request.is_disconnected()`` never sees the client leave.
    """

    def __init__(self, app: Any, metrics: Any) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [500]  # what an exception escaping to the server error middleware becomes

        async def send_status(message: Any) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        start = time.perf_counter()
        route = scope.get("path", "")
        route = route if route in _ROUTES else "other"
        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.in_flight.dec()
            self.metrics.requests.labels(route=route, status=str(status[0])).inc()
            self.metrics.latency.labels(route=route).observe(time.perf_counter() - start)


def _empty() -> Any:
    from .resolve import Resolved

    return Resolved(matrices=[], texts=[], ids=[])


def _jsonable(hits: list[dict[str, Any]]) -> list[dict[str, Any]]:
    import numpy as np

    def fix(v: Any) -> Any:
        if isinstance(v, (bytes, bytearray)):
            return v.hex()
        if isinstance(v, np.generic):
            return v.item()
        if isinstance(v, np.ndarray):
            return v.tolist()
        return v

    return [{k: fix(v) for k, v in h.items()} for h in hits]


_ROUTES = {"/health", "/info", "/metrics", "/v1/rerank", "/v2/rerank", "/rerank", "/search"}


def _version() -> str:
    from .. import __version__

    return __version__


__all__ = ["create_app", "build_app", "Service", "ServeOptions", "check_options", "default_max_batch_rows"]
