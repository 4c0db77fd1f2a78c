"""Prometheus metrics of one app, in its own registry (several apps in one process do not collide)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:  # pragma: no cover
    from .app import Service


class Metrics:
    """Request, document, queue and decoder-pass metrics (names prefixed ``kalm_``)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("kalm_requests", "HTTP requests answered", ["route", "status"], registry=r)
        self.latency = Histogram("kalm_request_seconds", "request latency", ["route"], registry=r,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.documents = Counter("kalm_documents", "documents scored, by where their matrix came from",
                                 ["source"], registry=r)
        self.passes = Counter("kalm_decoder_passes", "decoder passes run by the scoring worker", registry=r)
        self.candidates = Counter("kalm_candidates", "candidates scored in decoder passes", registry=r)
        self.per_pass = Histogram("kalm_candidates_per_pass", "candidates per decoder pass", registry=r,
                                  buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
        self.queries_per_pass = Histogram("kalm_queries_per_pass", "queries sharing a decoder pass", registry=r,
                                          buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32))
        self.cancelled = Counter("kalm_cancelled_requests", "queued requests dropped because the client left",
                                 registry=r)
        self.rejected = Counter("kalm_rejected_requests", "requests refused with 429 (queue full)", registry=r)
        self.in_flight = Gauge("kalm_requests_in_flight", "requests being handled", registry=r)
        self.pending = Gauge("kalm_queue_pending", "requests queued for the scoring worker", registry=r)
        self.cache_bytes = Gauge("kalm_cache_bytes", "bytes in the LRU of online-encoded matrices", registry=r)

    def bind(self, service: Service) -> None:
        """Read the live gauges from the service at scrape time."""
        self.pending.set_function(lambda: service.batcher.pending)
        self.cache_bytes.set_function(lambda: service.resolver.cache.bytes)

    def on_pass(self, candidates: int, queries: int, rows: int) -> None:
        """The batcher's per-pass callback (scoring thread)."""
        self.passes.inc()
        self.candidates.inc(candidates)
        self.per_pass.observe(candidates)
        self.queries_per_pass.observe(queries)

    def render(self) -> tuple[Any, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
