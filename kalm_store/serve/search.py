"""``POST /search``: :func:`kalm_store.query.run_search` with its reranker scoring through the batcher.

The first stage, the hybrid merge, the stored-matrix fetch and the output contract are the library's
own (:class:`~kalm_store.plugins.lancedb.KaLMReranker`); only the scoring call is replaced by a job
in the server's queue, so searches share decoder passes with rerank requests.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from kalm_store.plugins.lancedb import KaLMReranker

from .batcher import Batcher, Job, probabilities

if TYPE_CHECKING:  # pragma: no cover
    from kalm_store.model import KaLMModel


class BatchedReranker(KaLMReranker):
    """A :class:`KaLMReranker` whose scores come from the server's :class:`Batcher` (one per request).

    ``jobs`` lists the jobs it queued, so that the request can cancel them if its client goes away.
    """

    def __init__(self, model: KaLMModel, *, table: Any, batcher: Batcher, ratio: int,
                 instruction: str | None = None) -> None:
        super().__init__(model, table=table, ratio=ratio, instruction=instruction)
        self.batcher = batcher
        self.jobs: list[Job] = []

    def score_results(self, query: str, results: pa.Table, *, instruction: str | None = None,
                      batch_size: int | None = None) -> np.ndarray:
        """Scores (float32 ``P(yes)``) of the candidate rows, computed by the batcher's worker."""
        if not isinstance(query, str):
            raise TypeError(f"the rerank query must be a str, got {type(query).__name__}")
        self._check_table()
        if results.num_rows == 0:
            return np.zeros(0, dtype=np.float32)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            mats = self._matrices(results)
        job = self.batcher.submit(query, mats, self.instruction if instruction is None else instruction)
        self.jobs.append(job)
        return probabilities(job.future.result())  # blocks this worker thread, not the event loop


__all__ = ["BatchedReranker"]
