"""Batching across requests: a bounded queue and one scoring worker thread.

Requests put a :class:`Job` (one query and its candidates' matrices) in the queue and wait on its
future. The worker takes every waiting job whose candidates fit the step's row budget (at least one;
``STEP_PASSES`` passes' worth of rows) and scores them with one :meth:`KaLMModel.score_many` call,
which sorts the candidates of all those queries by length and cuts them into decoder passes of at
most ``max_rows`` padded stored rows: a pass holds the candidates of several requests. The row
budget, not a candidate count, bounds a pass (``batch_size`` is an optional extra cap), so a pass is
as full as memory allows whichever requests its candidates come from. That is the model's own
scoring API: the server adds queueing, not a second scorer. Model code runs on the worker thread
only, never on the event loop.

A job that is cancelled while still queued (its client went away) is removed and never scored; a job
the worker has taken runs to the end.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from ..model import KaLMModel

log = logging.getLogger("kalm_store.serve")

# A worker step takes waiting jobs up to this many passes' worth of stored rows: enough to fill the
# passes of several requests (little padding: candidates are sorted by length across them), few
# enough that the first job of a step does not wait long for the step's last pass.
STEP_PASSES = 8


class QueueFullError(RuntimeError):
    """The queue holds ``max_pending`` requests already; ``retry_after`` is a hint in whole seconds."""

    def __init__(self, max_pending: int, retry_after: int) -> None:
        super().__init__(f"server busy: {max_pending} requests are already waiting to be scored; retry later")
        self.retry_after = retry_after


class ShuttingDownError(RuntimeError):
    """The server is stopping and takes no new work."""


@dataclass(eq=False)
class Job:
    """One query and the matrices of its candidates, waiting to be scored."""

    query: str
    matrices: Sequence[np.ndarray]
    instruction: str | None
    future: Future = field(default_factory=Future)
    rows: int = 0  # stored rows of all candidates: what the step's row budget counts

    def __post_init__(self) -> None:
        self.rows = int(sum(m.shape[0] for m in self.matrices))


@dataclass
class PassStats:
    """Running totals the metrics and the benchmark read."""

    passes: int = 0
    candidates: int = 0
    queries_in_passes: int = 0
    steps: int = 0
    jobs: int = 0
    cancelled: int = 0
    score_seconds: float = 0.0  # wall time of the worker's score_many calls
    score_cpu_seconds: float = 0.0  # the worker thread's CPU time in them (unlike wall time, blind to other load)


class Batcher:
    """Bounded queue + one scoring worker (see the module docstring).

    Parameters
    ----------
    model : KaLMModel
        Scores with :meth:`KaLMModel.score_many`.
    max_pending : int
        Queued (not yet taken) jobs at most; :meth:`submit` raises :class:`QueueFullError` beyond.
    batch_size : int or None
        Candidates per decoder pass at most; ``None``: only ``max_rows`` bounds a pass.
    max_rows : int
        Padded stored rows per decoder pass (candidates x the pass's longest matrix), whichever
        requests the candidates come from. A worker step takes waiting jobs up to ``STEP_PASSES``
        times this many stored rows (at least one job).
    batching : bool, default True
        False scores one job per step (no packing across requests): the benchmark's baseline.
    on_pass : callable, optional
        Called on the worker thread after each decoder pass with (candidates, queries, padded rows).
    """

    def __init__(self, model: KaLMModel, *, max_pending: int, batch_size: int | None, max_rows: int,
                 batching: bool = True, on_pass: Callable[[int, int, int], None] | None = None) -> None:
        for name, value in (("max_pending", max_pending), ("batch_size", batch_size), ("max_rows", max_rows)):
            if value is None and name == "batch_size":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.model = model
        self.max_pending = max_pending
        self.batch_size = batch_size
        self.max_rows = max_rows
        self.step_rows = STEP_PASSES * max_rows
        self.batching = batching
        self.stats = PassStats()
        self._on_pass = on_pass
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._busy = False
        self._seconds_per_job = 0.05  # running mean, for Retry-After

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the worker thread (idempotent)."""
        with self._cond:  # an RLock: submit() calls this while holding it
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="kalm-scorer", daemon=True)
                self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Take no new jobs, score every queued one, then end the worker."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def pending(self) -> int:
        """Jobs queued and not yet taken by the worker."""
        return len(self._queue)

    # ------------------------------------------------------------------ requests
    def submit(self, query: str, matrices: Sequence[np.ndarray], instruction: str | None = None) -> Job:
        """Queue one query's candidates; its ``future`` resolves to float32 margins (z_yes - z_no)."""
        job = Job(query, matrices, instruction)
        with self._cond:
            if self._stopping:
                raise ShuttingDownError("server is shutting down")
            if self._thread is None:  # hosts that skip the app's startup (Ray Serve may) still get a worker
                self.start()
            if len(self._queue) >= self.max_pending:
                retry = max(1, math.ceil(self._seconds_per_job * (len(self._queue) + 1)))
                raise QueueFullError(self.max_pending, retry)
            self._queue.append(job)
            self._cond.notify()
        return job

    def cancel(self, job: Job) -> bool:
        """Remove a job that is still queued (its client went away); True if it was removed."""
        with self._cond:
            try:
                self._queue.remove(job)
            except ValueError:
                return False  # already taken (it runs to the end) or finished
            self.stats.cancelled += 1
        job.future.cancel()
        return True

    # ------------------------------------------------------------------ worker
    def _take(self) -> list[Job]:
        """Wait for work; return the jobs of the next step (empty: stop)."""
        with self._cond:
            while not self._queue and not self._stopping:
                self._cond.wait()
            if not self._queue:
                return []
            jobs = [self._queue.popleft()]
            rows = jobs[0].rows
            while self.batching and self._queue and rows + self._queue[0].rows <= self.step_rows:
                rows += self._queue[0].rows
                jobs.append(self._queue.popleft())
            self._busy = True
            return jobs

    def _run(self) -> None:
        while True:
            jobs = self._take()
            if not jobs:
                return
            start, cpu = time.perf_counter(), time.thread_time()
            try:
                self._score(jobs)
            finally:
                with self._cond:
                    self._busy = False
                elapsed = time.perf_counter() - start
                self.stats.score_cpu_seconds += time.thread_time() - cpu
                self._seconds_per_job = 0.8 * self._seconds_per_job + 0.2 * elapsed / len(jobs)
                self.stats.score_seconds += elapsed
                self.stats.steps += 1
                self.stats.jobs += len(jobs)

    def _pass(self, candidates: int, queries: int, rows: int) -> None:
        self.stats.passes += 1
        self.stats.candidates += candidates
        self.stats.queries_in_passes += queries
        if self._on_pass is not None:
            self._on_pass(candidates, queries, rows)

    def _batch_size(self, jobs: list[Job]) -> int:
        """The candidate cap handed to score_many: ``batch_size``, or (None) every candidate: rows bound."""
        return self.batch_size if self.batch_size is not None else max(1, sum(len(j.matrices) for j in jobs))

    def _score(self, jobs: list[Job]) -> None:
        """Score the step's jobs together; if that fails, each alone, so one bad job fails only itself."""
        live = [j for j in jobs if j.future.set_running_or_notify_cancel()]
        if not live:
            return
        try:
            margins = self.model.score_many([j.query for j in live], [j.matrices for j in live],
                                            [j.instruction for j in live], batch_size=self._batch_size(live),
                                            max_rows=self.max_rows, return_margin=True, on_pass=self._pass)
        except Exception as e:  # noqa: BLE001 - handed to the request, which logs and answers it
            if len(live) == 1:
                live[0].future.set_exception(e)
                return
            for job in live:
                try:
                    job.future.set_result(self.model.score_many(
                        [job.query], [job.matrices], [job.instruction], batch_size=self._batch_size([job]),
                        max_rows=self.max_rows, return_margin=True, on_pass=self._pass)[0])
                except Exception as one:  # noqa: BLE001
                    job.future.set_exception(one)
            return
        for job, m in zip(live, margins):
            job.future.set_result(m)


def probabilities(margins: np.ndarray) -> np.ndarray:
    """P(yes) from margins, as :meth:`KaLMModel.score` computes it (float64 sigmoid, float32 out)."""
    return (1.0 / (1.0 + np.exp(-np.asarray(margins, np.float64)))).astype(np.float32)


def describe(stats: PassStats) -> dict[str, Any]:
    """The stats as a JSON-able dict (``/info`` and the benchmark)."""
    return {"decoder_passes": stats.passes, "candidates": stats.candidates, "steps": stats.steps,
            "jobs": stats.jobs, "cancelled": stats.cancelled, "score_seconds": stats.score_seconds,
            "score_cpu_seconds": stats.score_cpu_seconds,
            "mean_candidates_per_pass": stats.candidates / stats.passes if stats.passes else 0.0,
            "mean_queries_per_pass": stats.queries_in_passes / stats.passes if stats.passes else 0.0}


__all__ = ["STEP_PASSES", "Batcher", "Job", "QueueFullError", "ShuttingDownError", "probabilities", "describe"]
