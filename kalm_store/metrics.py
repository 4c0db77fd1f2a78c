"""Retrieval metrics through pytrec_eval (pytrec-eval-terrier): nDCG@10, MRR@10, Recall@10, Recall@100.

Why pytrec-eval-terrier: it is trec_eval itself (C, wheels for every platform) and what BEIR and
mteb compute their published numbers with, so a number here is the number a paper reports for the
same ranking; ir-measures would add a layer over the same library for these four measures.

Two conventions are fixed here, both as ``trec_eval -c`` and BEIR do:

* every judged query counts: one the system retrieves nothing for gets 0 for every measure
  (pytrec_eval alone would leave it out of the average and reward finding nothing);
* the ranking measured is the ranking given: pytrec_eval re-sorts by score and breaks ties by
  document id, so each list is handed over with strictly decreasing pseudo-scores (its ranks).

nDCG uses trec_eval's linear gain (the grade itself), as BEIR does; MRR@10 is the reciprocal rank of
the first relevant passage within the top 10, 0 when there is none.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

MEASURES: tuple[str, ...] = ("ndcg@10", "mrr@10", "recall@10", "recall@100")
# our names -> pytrec_eval's result keys (recip_rank runs on the top-10 list only)
_TREC = {"ndcg@10": "ndcg_cut_10", "recall@10": "recall_10", "recall@100": "recall_100"}


def _pytrec_eval() -> Any:
    from ._deps import require

    return require("pytrec_eval", "eval")


def _as_run(ranked: Sequence[str], depth: int | None = None) -> dict[str, float]:
    ids = list(dict.fromkeys(ranked))[:depth]  # a passage listed twice counts once, at its first rank
    return {pid: float(len(ids) - i) for i, pid in enumerate(ids)}


def per_query(qrels: Mapping[str, Mapping[str, int]], rankings: Mapping[str, Sequence[str]]) -> dict[str, dict[str, float]]:
    """The four measures of every judged query.

    Parameters
    ----------
    qrels : dict
        ``{query id: {passage id: grade}}``; every query in it is scored.
    rankings : dict
        ``{query id: [passage id, best first]}``; a missing or empty list scores 0.

    Returns
    -------
    dict
        ``{query id: {"ndcg@10": ..., "mrr@10": ..., "recall@10": ..., "recall@100": ...}}``.

    Examples
    --------
    >>> per_query({"q": {"a": 1}}, {"q": ["b", "a"]})["q"]["mrr@10"]
    0.5
    """
    pytrec_eval = _pytrec_eval()
    judged = {q: {p: int(g) for p, g in rel.items()} for q, rel in qrels.items()}
    out = {q: dict.fromkeys(MEASURES, 0.0) for q in judged}
    full = {q: _as_run(rankings.get(q, ())) for q in judged}
    top10 = {q: _as_run(rankings.get(q, ()), 10) for q in judged}
    full = {q: r for q, r in full.items() if r}  # pytrec_eval skips these anyway; they keep their zeros
    top10 = {q: r for q, r in top10.items() if r}
    if full:
        scored = pytrec_eval.RelevanceEvaluator(judged, {"ndcg_cut.10", "recall.10,100"}).evaluate(full)
        for q, values in scored.items():
            for name, key in _TREC.items():
                out[q][name] = float(values[key])
        for q, values in pytrec_eval.RelevanceEvaluator(judged, {"recip_rank"}).evaluate(top10).items():
            out[q]["mrr@10"] = float(values["recip_rank"])
    return out


def mean(values: Mapping[str, Mapping[str, float]], queries: Sequence[str] | None = None) -> dict[str, float]:
    """The average of each measure over ``queries`` (default: every query in ``values``)."""
    qs = list(values) if queries is None else list(queries)
    if not qs:
        raise ValueError("no queries to average over")
    return {m: sum(values[q][m] for q in qs) / len(qs) for m in MEASURES}


__all__ = ["MEASURES", "per_query", "mean"]
