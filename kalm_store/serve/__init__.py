"""``kalm-store serve``: the rerank service over a kalm-store table (Cohere- and TEI-compatible HTTP).

``create_app(db, table, model, ...)`` returns the ASGI app (FastAPI); ``kalm-store serve`` runs it on
uvicorn (or as Ray Serve replicas). Needs the ``serve`` extra: ``pip install "kalm-store[serve]"``.
Modules: ``app`` (routes, request/response models, errors), ``batcher`` (bounded queue, one scoring
worker packing several queries per decoder pass), ``resolve`` (text -> stored row by digest, id -> row,
unseen text -> encoder + LRU), ``search`` (``/search`` through the batcher), ``metrics`` (Prometheus).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from fastapi import FastAPI


def create_app(*args: Any, **kwargs: Any) -> FastAPI:
    """See :func:`kalm_store.serve.app.create_app` (imported here lazily, with an install hint)."""
    from .._deps import require

    require("fastapi", "serve")
    require("prometheus_client", "serve")
    from .app import create_app as _create

    return _create(*args, **kwargs)


__all__ = ["create_app"]
