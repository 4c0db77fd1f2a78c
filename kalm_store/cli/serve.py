"""``kalm-store serve``: the rerank service over a table, on uvicorn (or Ray Serve replicas)."""

from __future__ import annotations

import argparse

ENGINES = ("uvicorn", "ray")


def register(sub: argparse._SubParsersAction, name: str) -> None:
    p = sub.add_parser(
        name,
        help="serve a table over HTTP: Cohere- and TEI-compatible rerank, search, metrics",
        description="Serve a kalm-store table over HTTP. POST /v2/rerank and /v1/rerank take Cohere's rerank "
                    "requests (cohere.ClientV2(base_url=...), LangChain, LlamaIndex), POST /rerank takes "
                    "text-embeddings-inference's, POST /search runs a first stage + rerank in the table; GET "
                    "/health, /info, /metrics (Prometheus). Posted texts the table holds are scored from their "
                    "stored matrices (found by text digest); other texts are encoded online and cached. "
                    "Concurrent requests share decoder passes. SIGTERM finishes in-flight requests and exits 0.",
    )
    p.add_argument("--db", required=True, help="LanceDB database URI (folder, s3://...)")
    p.add_argument("--table", required=True, help="table name")
    p.add_argument("--model", required=True,
                   help="hub id or folder of the model that built the table (another model is refused at start)")
    p.add_argument("--ratio", type=int, default=None,
                   help="stored MEP ratio to score with (default: the smallest the table stores)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default: 127.0.0.1, this machine only; 0.0.0.0 exposes it)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1... (default: CUDA when available)")
    from kalm_store.dtypes import add_dtype_argument

    add_dtype_argument(p, "decoder (and online encoder)")  # any table scores in either: storage is float16
    p.add_argument("--max-pending", type=int, default=64,
                   help="requests waiting for the scoring worker before new ones get 429 + Retry-After (default: 64)")
    p.add_argument("--max-documents", type=int, default=1000,
                   help="documents per request, and /search candidates, before 413 (default: 1000)")
    p.add_argument("--api-key", default=None,
                   help="require `Authorization: Bearer KEY` on every request but GET /health (default: none; "
                        "the KALM_STORE_API_KEY environment variable is read when this is not given)")
    p.add_argument("--cache-mib", type=float, default=256,
                   help="LRU of matrices encoded online for texts the table does not hold, MiB (default: 256)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="candidates per decoder pass at most (default: no cap; --max-batch-rows bounds a pass)")
    p.add_argument("--max-batch-rows", type=int, default=None,
                   help="padded stored rows per decoder pass, whichever requests the candidates come from (a pass "
                        "packs several); the worker takes waiting requests up to 8 passes' worth per step "
                        "(default: 1024 on the CPU, where small passes stay in cache; 8192 on a GPU)")
    p.add_argument("--no-batching", action="store_true",
                   help="score one request per step (no decoder passes shared across requests)")
    p.add_argument("--engine", choices=ENGINES, default="uvicorn",
                   help="uvicorn: one process (default); ray: Ray Serve replicas of the same app")
    p.add_argument("--replicas", type=int, default=1, help="Ray Serve replicas (--engine ray; default: 1)")
    p.add_argument("--gpus-per-replica", type=float, default=None,
                   help="GPUs each Ray replica reserves (default: 1 when the Ray cluster has GPUs, else 0)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                   help="server log level (default: info)")
    from kalm_store.storage import add_storage_arguments

    add_storage_arguments(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import os

    from kalm_store.serve.app import ServeOptions, check_options
    from kalm_store.storage import options_from_args

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be 0..65535, got {args.port}")
    if args.replicas < 1:
        raise ValueError(f"--replicas must be a positive int, got {args.replicas}")
    if args.engine == "uvicorn" and args.replicas != 1:
        raise ValueError("--replicas needs --engine ray (uvicorn runs one process)")
    api_key = args.api_key if args.api_key is not None else os.environ.get("KALM_STORE_API_KEY") or None
    options = ServeOptions(db=args.db, table=args.table, ratio=args.ratio, max_pending=args.max_pending,
                           max_documents=args.max_documents, api_key=api_key, cache_mib=args.cache_mib,
                           batch_size=args.batch_size, max_batch_rows=args.max_batch_rows,
                           batching=not args.no_batching, storage_options=options_from_args(args))
    check_options(options)  # before anything is opened or loaded
    if args.engine == "ray":
        from kalm_store.plugins.ray_serve import serve_replicas

        return serve_replicas(options, args.model, replicas=args.replicas, host=args.host, port=args.port,
                              device=args.device, dtype=args.dtype, gpus_per_replica=args.gpus_per_replica)
    import logging

    import uvicorn

    from kalm_store.serve import create_app

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(options.db, options.table, args.model, ratio=options.ratio, max_pending=options.max_pending,
                     max_documents=options.max_documents, api_key=options.api_key, cache_mib=options.cache_mib,
                     batch_size=options.batch_size, max_batch_rows=options.max_batch_rows,
                     batching=options.batching, device=args.device, dtype=args.dtype,
                     storage_options=options.storage_options)
    # uvicorn handles SIGTERM/SIGINT: stop accepting, finish in-flight requests, run the app's shutdown. It
    # then re-raises the signal to the handler it found installed; for SIGTERM that is this one, so a
    # drained server exits 0 (what process managers expect) instead of dying of the signal afterwards.
    import signal

    signal.signal(signal.SIGTERM, lambda sig, frame: logging.getLogger("kalm_store.serve").info(
        "SIGTERM: in-flight requests finished, exiting"))
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=None)
    return 0
