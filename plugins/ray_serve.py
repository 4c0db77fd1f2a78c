"""Replicas of the kalm-store HTTP app on Ray Serve (``kalm-store serve --engine ray --replicas N``).

Each replica builds the same app as ``kalm-store serve`` (:func:`kalm_store.serve.create_app`): it
opens the table, loads the model (on the GPU Ray gives it when ``num_gpus`` is reserved: Ray sets
``CUDA_VISIBLE_DEVICES`` per replica, and the default device picks CUDA when there is one) and runs its
own batcher. Ray Serve's proxy spreads requests over the replicas; each replica batches the requests
it holds. Nothing else differs: routes, request/response shapes, errors and metrics are the app's.

Examples
--------
>>> from kalm_store.serve.app import ServeOptions
>>> from kalm_store.plugins.ray_serve import serve_replicas
>>> serve_replicas(ServeOptions(db="s3://bucket/db", table="docs"), "KaLM-Embedding/KaLM-Reranker-V1-Nano",
...                replicas=4, gpus_per_replica=1)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
from typing import Any

from kalm_store._deps import require
from kalm_store.serve.app import ServeOptions, check_options

log = logging.getLogger("kalm_store.serve")


def deployment(options: ServeOptions, model: str, *, replicas: int = 1, device: str | None = None,
               dtype: str | None = None, gpus_per_replica: float = 0.0, cpus_per_replica: float = 1.0) -> Any:
    """The bound Ray Serve application: ``replicas`` copies of the kalm-store app.

    Parameters
    ----------
    options : ServeOptions
        What each replica serves (the same as ``kalm-store serve``'s flags).
    model : str
        Hub id or folder of the model, loaded by every replica (a folder must be reachable from each node).
    replicas : int, default 1
        Number of replicas.
    device : str, optional
        Device inside a replica; default ``None`` picks the replica's GPU when it reserved one.
    dtype : {"float32", "bfloat16", "auto"}, optional
        Compute dtype inside a replica (``auto`` is decided on the replica's own device); default
        ``None``: bfloat16 on CUDA, float32 on CPU.
    gpus_per_replica : float, default 0.0
        GPUs each replica reserves.
    cpus_per_replica : float, default 1.0
        CPUs each replica reserves.
    """
    check_options(options)
    serve = require("ray.serve", "ray")
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise ValueError(f"replicas must be a positive int, got {replicas!r}")
    fields = dataclasses.asdict(options)

    @serve.deployment(name="kalm-store", num_replicas=replicas,
                      ray_actor_options={"num_gpus": gpus_per_replica, "num_cpus": cpus_per_replica})
    @serve.ingress()
    class KalmStoreReplica:
        def __init__(self, fields: dict[str, Any], model: str, device: str | None, dtype: str | None) -> None:
            from kalm_store.serve import create_app

            o = ServeOptions(**fields)
            self.asgi_app = create_app(o.db, o.table, model, ratio=o.ratio, max_pending=o.max_pending,
                                       max_documents=o.max_documents, api_key=o.api_key, cache_mib=o.cache_mib,
                                       batch_size=o.batch_size, max_batch_rows=o.max_batch_rows, batching=o.batching,
                                       device=device, dtype=dtype, storage_options=o.storage_options)

        def __serve_build_asgi_app__(self) -> Any:
            return self.asgi_app

    return KalmStoreReplica.bind(fields, model, device, dtype)


def serve_replicas(options: ServeOptions, model: str, *, replicas: int = 1, host: str = "127.0.0.1",
                   port: int = 8000, device: str | None = None, dtype: str | None = None,
                   gpus_per_replica: float | None = None,
                   cpus_per_replica: float = 1.0, address: str | None = None) -> int:
    """Run ``replicas`` replicas behind Ray Serve's HTTP proxy on ``host:port`` until SIGTERM/SIGINT.

    Connects to the Ray cluster at ``address`` (default: ``RAY_ADDRESS``, or a local Ray started here).
    ``gpus_per_replica`` defaults to 1 when the cluster has GPUs, else 0. Returns 0 after shutting down.
    """
    ray = require("ray", "ray")
    serve = require("ray.serve", "ray")
    if not ray.is_initialized():
        import os

        # "local": start a Ray of our own rather than join whichever one this machine happens to run
        ray.init(address=address or os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False,
                 log_to_driver=True, configure_logging=False)
    if gpus_per_replica is None:
        gpus_per_replica = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    app = deployment(options, model, replicas=replicas, device=device, dtype=dtype, gpus_per_replica=gpus_per_replica,
                     cpus_per_replica=cpus_per_replica)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda s, f: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(app, name="kalm-store", route_prefix="/", blocking=False)
        log.warning("kalm-store on Ray Serve: %d replica(s) at http://%s:%d (GPUs per replica: %s)",
                    replicas, host, port, gpus_per_replica)
        stop.wait()
    finally:
        # deleting the application stops its replicas gracefully (each finishes its in-flight requests);
        # then the Ray this process started goes with it (a joined cluster keeps running)
        try:
            serve.delete("kalm-store", _blocking=True)
        finally:
            ray.shutdown()
    return 0


__all__ = ["deployment", "serve_replicas"]
