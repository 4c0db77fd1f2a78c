"""Fidelity per MEP ratio, measured on the user's own passages and queries.

Every sampled passage is encoded once (one encoder pass serves every ratio), each query is scored
against the whole sample at every ratio, and each ratio is compared with r = 1: mean absolute score
change, Kendall tau of the candidate order, overlap of the top 10. With relevance judgements (qrels)
the ratios are also compared with the truth: nDCG@10 and ROC-AUC (the paper's Figure 5/6 analysis on
the user's corpus). Nothing here is quoted from the paper: every number is measured.

The metrics are plain numpy (no scipy): Kendall tau-b, nDCG@10 with linear gains, ROC-AUC as the
Mann-Whitney statistic with tied scores counted as one half.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .pooling import RATIOS, check_ratio

if TYPE_CHECKING:  # pragma: no cover
    from .model import KaLMModel

TOP_K = 10  # depth of the top-k overlap and of nDCG


@dataclass(frozen=True)
class Query:
    """One query of a fidelity run."""

    id: str
    text: str


@dataclass(frozen=True)
class RatioFidelity:
    """Agreement of one ratio with r = 1 (and with the qrels, when given), averaged over queries."""

    ratio: int
    mean_abs_delta: float  # mean |P(yes) at r - P(yes) at r=1| over query x candidate pairs
    kendall_tau: float | None  # Kendall tau-b of each query's candidate order against r=1, mean over queries
    top10_overlap: float | None  # |top-10 at r  ∩  top-10 at r=1| / 10, mean over queries
    ndcg_at_10: float | None = None  # with qrels: mean over queries with a relevant candidate
    roc_auc: float | None = None  # with qrels: pooled over all (query, candidate) pairs, relevance > 0 positive


@dataclass(frozen=True)
class FidelityReport:
    """What :func:`measure_fidelity` returns."""

    queries: int  # queries scored
    candidates: int  # sampled passages every query is scored against
    judged_queries: int  # queries with at least one relevant candidate (0 without qrels)
    ratios: list[RatioFidelity] = field(default_factory=list)

    def by_ratio(self) -> dict[int, RatioFidelity]:
        return {f.ratio: f for f in self.ratios}

    def to_dict(self) -> dict[str, Any]:
        return {"queries": self.queries, "candidates": self.candidates, "judged_queries": self.judged_queries,
                "ratios": [asdict(f) for f in self.ratios]}


# ---------------------------------------------------------------------------------------------- metrics
def kendall_tau(x: np.ndarray, y: np.ndarray) -> float:
    """Kendall tau-b of two score vectors (ties in either count as neither concordant nor discordant).

    Returns ``nan`` with fewer than two items or when one vector is constant.

    Examples
    --------
    >>> kendall_tau(np.array([1.0, 2.0, 3.0]), np.array([1.0, 3.0, 2.0]))
    0.3333333333333333
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"kendall_tau needs two 1-D arrays of one length, got {x.shape} and {y.shape}")
    n = len(x)
    if n < 2:
        return float("nan")
    iu = np.triu_indices(n, 1)
    dx = np.sign(x[:, None] - x[None, :])[iu]  # (n(n-1)/2,)
    dy = np.sign(y[:, None] - y[None, :])[iu]
    den = math.sqrt(float(np.count_nonzero(dx)) * float(np.count_nonzero(dy)))
    return float((dx * dy).sum() / den) if den else float("nan")


def top_k_overlap(x: np.ndarray, y: np.ndarray, k: int = TOP_K) -> float:
    """Fraction of the top ``k`` items by ``x`` that are also in the top ``k`` by ``y``."""
    k = min(k, len(x))
    if k == 0:
        return float("nan")
    top_x = set(np.argsort(-np.asarray(x), kind="stable")[:k].tolist())
    top_y = set(np.argsort(-np.asarray(y), kind="stable")[:k].tolist())
    return len(top_x & top_y) / k


def ndcg_at_k(scores: np.ndarray, relevance: np.ndarray, k: int = TOP_K) -> float:
    """nDCG@k of ranking the candidates by ``scores``, linear gains ``rel / log2(rank + 1)``.

    The ideal order is that of the candidates' own judgements; ``nan`` when no candidate is relevant.
    """
    rel = np.asarray(relevance, np.float64)
    if not (rel > 0).any():
        return float("nan")
    discounts = 1.0 / np.log2(np.arange(2, k + 2))  # (k,)
    order = np.argsort(-np.asarray(scores), kind="stable")[:k]
    ideal = np.sort(rel)[::-1][:k]
    return float((rel[order] * discounts[: len(order)]).sum() / (ideal * discounts[: len(ideal)]).sum())


def rank_average(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` with ties given their average rank."""
    x = np.asarray(x)
    order = np.argsort(x, kind="stable")
    xs = x[order]
    ranks = np.empty(len(x), np.float64)
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])  # first index of each run of equal values
    ends = np.r_[starts[1:], len(x)]
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + 1 + e) / 2.0
    return ranks


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` separating ``labels`` True from False (ties count 1/2).

    Returns ``nan`` unless both classes are present.
    """
    labels = np.asarray(labels, bool)
    pos, neg = int(labels.sum()), int((~labels).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    ranks = rank_average(np.asarray(scores, np.float64))
    return float((ranks[labels].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


# ---------------------------------------------------------------------------------------------- inputs
def load_queries(path: str | Path) -> list[Query]:
    """Read queries from a ``.jsonl`` file: one object per line with ``"text"`` (or ``"query"``) and
    an optional ``"id"`` (default: the line number, from 0).

    Examples
    --------
    >>> load_queries("queries.jsonl")  # doctest: +SKIP
    [Query(id='q1', text='what is lance?'), ...]
    """
    path = Path(path)
    queries: list[Query] = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not a JSON object ({e.msg})") from None
            text = obj.get("text", obj.get("query")) if isinstance(obj, dict) else None
            if not isinstance(text, str):
                raise ValueError(f"{path}:{line_no}: a query needs a string 'text' (or 'query') field, got {line[:200]!r}")
            qid = obj.get("id", obj.get("_id", len(queries)))
            queries.append(Query(id=str(qid), text=text))
    if not queries:
        raise ValueError(f"{path} holds no queries")
    return queries


def load_qrels(path: str | Path) -> dict[str, dict[str, float]]:
    """Read relevance judgements: ``.jsonl`` with ``query_id``, ``passage_id`` (or ``corpus_id``),
    ``relevance`` (or ``score``); or a ``.tsv`` with columns query id, passage id, relevance (a BEIR
    header line is skipped), or TREC qrels ``qid 0 pid rel``. Returns ``{query_id: {passage_id: rel}}``.
    """
    path = Path(path)
    out: dict[str, dict[str, float]] = {}
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                obj = json.loads(line)
                qid = obj.get("query_id", obj.get("query-id"))
                pid = obj.get("passage_id", obj.get("corpus_id", obj.get("corpus-id")))
                rel = obj.get("relevance", obj.get("score"))
                if qid is None or pid is None or not isinstance(rel, (int, float)):
                    raise ValueError(f"{path}:{line_no}: need query_id, passage_id and a numeric relevance, "
                                     f"got {line[:200]!r}")
                out.setdefault(str(qid), {})[str(pid)] = float(rel)
    else:
        with open(path, encoding="utf-8", newline="") as f:
            for line_no, row in enumerate(csv.reader(f, delimiter="\t"), 1):
                if len(row) == 1:
                    row = row[0].split()  # TREC files are space separated
                if not row:
                    continue
                if len(row) == 4:  # TREC: qid iteration pid rel
                    row = [row[0], row[2], row[3]]
                if len(row) != 3:
                    raise ValueError(f"{path}:{line_no}: expected 'query_id<TAB>passage_id<TAB>relevance', got {row!r}")
                try:
                    rel = float(row[2])
                except ValueError:
                    if line_no == 1:
                        continue  # header line
                    raise ValueError(f"{path}:{line_no}: relevance {row[2]!r} is not a number") from None
                out.setdefault(row[0], {})[row[1]] = rel
    if not out:
        raise ValueError(f"{path} holds no relevance judgements")
    return out


# ---------------------------------------------------------------------------------------------- measure
def measure_fidelity(
    model: KaLMModel,
    queries: Sequence[Query],
    matrices: Mapping[int, Sequence[np.ndarray]],
    *,
    passage_ids: Sequence[str] | None = None,
    qrels: Mapping[str, Mapping[str, float]] | None = None,
    batch_size: int = 32,
    show_progress: bool = False,
) -> FidelityReport:
    """Score every query against the same sampled passages at every ratio and compare with r = 1.

    Parameters
    ----------
    model : KaLMModel
        The model that encoded ``matrices``.
    queries : list of Query
        Queries to score (see :func:`load_queries`).
    matrices : dict
        ``{ratio: [matrix per sampled passage]}`` as in ``KaLMModel.encode_ratios(...).matrices``;
        must hold ratio 1 (the reference).
    passage_ids : list of str, optional
        Ids of the sampled passages, needed with ``qrels``.
    qrels : dict, optional
        ``{query_id: {passage_id: relevance}}``; adds nDCG@10 and ROC-AUC per ratio. Default ``None``.
    batch_size : int, default 32
        Candidates per decoder pass.
    show_progress : bool, default False
        Show a tqdm bar over queries.

    Returns
    -------
    FidelityReport

    Examples
    --------
    >>> enc = model.encode_ratios(texts, ratios=[1, 2, 4, 8, 16, 32])  # doctest: +SKIP
    >>> measure_fidelity(model, load_queries("q.jsonl"), enc.matrices).by_ratio()[4].kendall_tau  # doctest: +SKIP
    0.93
    """
    ratios = sorted(check_ratio(r) for r in matrices)
    if 1 not in ratios:
        raise ValueError(f"fidelity is measured against r=1; matrices hold ratios {ratios}")
    if not queries:
        raise ValueError("queries is empty: give at least one query")
    n = len(matrices[1])
    if any(len(matrices[r]) != n for r in ratios):
        raise ValueError(f"every ratio needs the same passages; got {({r: len(matrices[r]) for r in ratios})}")
    if qrels is not None and (passage_ids is None or len(passage_ids) != n):
        raise ValueError("qrels need passage_ids, one per sampled passage")
    iterator: Any = queries
    if show_progress:
        from tqdm.auto import tqdm

        iterator = tqdm(queries, desc="fidelity", unit="query")
    scores: dict[int, list[np.ndarray]] = {r: [] for r in ratios}  # ratio -> (queries, n)
    for q in iterator:
        for r in ratios:
            scores[r].append(model.score(q.text, list(matrices[r]), batch_size=batch_size))
    relevance = None
    if qrels is not None:
        assert passage_ids is not None
        relevance = np.array([[float(qrels.get(q.id, {}).get(pid, 0.0)) for pid in passage_ids]
                              for q in queries])  # (queries, n)
    judged = int((relevance > 0).any(axis=1).sum()) if relevance is not None else 0
    ref = np.stack(scores[1])  # (queries, n)
    out = []
    for r in ratios:
        s = np.stack(scores[r])  # (queries, n)
        taus = [kendall_tau(s[i], ref[i]) for i in range(len(queries))]
        overlaps = [top_k_overlap(s[i], ref[i]) for i in range(len(queries))]
        ndcg = auc = None
        if relevance is not None:
            vals = [ndcg_at_k(s[i], relevance[i]) for i in range(len(queries))]
            ndcg = _nanmean(vals)
            auc = roc_auc(s.reshape(-1), relevance.reshape(-1) > 0)
            auc = None if math.isnan(auc) else auc
        out.append(RatioFidelity(ratio=r, mean_abs_delta=float(np.abs(s - ref).mean()), kendall_tau=_nanmean(taus),
                                 top10_overlap=_nanmean(overlaps), ndcg_at_10=ndcg, roc_auc=auc))
    return FidelityReport(queries=len(queries), candidates=n, judged_queries=judged, ratios=out)


def _nanmean(values: Sequence[float]) -> float | None:
    arr = np.asarray(values, np.float64)
    arr = arr[~np.isnan(arr)]
    return float(arr.mean()) if len(arr) else None


__all__ = ["Query", "RatioFidelity", "FidelityReport", "kendall_tau", "top_k_overlap", "ndcg_at_k", "roc_auc",
           "load_queries", "load_qrels", "measure_fidelity", "RATIOS"]
