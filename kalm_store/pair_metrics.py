"""Evaluation of a model on labelled pairs, per ratio: loss, ROC-AUC and nDCG@10 per query group.

Scores come from :meth:`KaLMModel.score` (the one scoring core); the metrics from maintained
libraries: ROC-AUC from scikit-learn, nDCG@10 from pytrec-eval-terrier (what mteb uses).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ._deps import require
from .pairs import Pair

if TYPE_CHECKING:  # pragma: no cover
    from .finetune_data import PassageMatrices
    from .model import KaLMModel

_CHUNK = 256  # pairs of one group scored per call: bounds the matrices held at once


def check_metric_libraries() -> None:
    """Fail early, naming the extra, when a metric library is missing (before any training)."""
    require("pytrec_eval", "finetune")
    require("sklearn.metrics", "finetune")


def group_margins(model: KaLMModel, pairs: Sequence[Pair], source: PassageMatrices, ratio: int,
                  batch_size: int = 32) -> np.ndarray:
    """``z_yes - z_no`` of every pair at ``ratio``, scored one query group at a time by ``model.score``."""
    groups: dict[tuple[str, str | None], list[int]] = defaultdict(list)
    for i, p in enumerate(pairs):
        groups[p.group].append(i)
    out = np.empty(len(pairs), dtype=np.float32)
    for (query, instruction), idx in groups.items():
        for start in range(0, len(idx), _CHUNK):
            part = idx[start:start + _CHUNK]
            mats = source.get([pairs[i] for i in part], ratio)
            out[part] = model.score(query, mats, instruction, batch_size=batch_size, return_margin=True)
    return out


def metrics(pairs: Sequence[Pair], margins: np.ndarray, distill_weight: float = 1.0) -> dict[str, Any]:
    """Loss (Eq. 6 + weighted Eq. 10, mean per pair), ROC-AUC over labelled pairs, mean nDCG@10 per group.

    ROC-AUC is None when the labelled pairs hold one class only; nDCG@10 averages the query groups that
    have at least one positive (groups without one have no ideal ranking), None when there is none.
    """
    import pytrec_eval
    import torch
    from sklearn.metrics import roc_auc_score

    from .losses import pair_loss

    m = torch.from_numpy(np.asarray(margins, dtype=np.float32))
    label = torch.tensor([p.label or 0 for p in pairs], dtype=torch.float32)
    has_label = torch.tensor([p.label is not None for p in pairs])
    teacher = torch.tensor([0.5 if p.score is None else p.score for p in pairs], dtype=torch.float32)
    has_teacher = torch.tensor([p.score is not None for p in pairs])
    loss = float(pair_loss(m, label, has_label, teacher, has_teacher, distill_weight))
    labelled = [i for i, p in enumerate(pairs) if p.label is not None]
    y = [pairs[i].label for i in labelled]
    roc = float(roc_auc_score(y, margins[labelled])) if len(set(y)) == 2 else None
    qids: dict[tuple[str, str | None], str] = {}
    qrels: dict[str, dict[str, int]] = defaultdict(dict)
    run: dict[str, dict[str, float]] = defaultdict(dict)
    for i in labelled:
        q = qids.setdefault(pairs[i].group, f"q{len(qids)}")
        qrels[q][f"d{i}"] = int(pairs[i].label)
        run[q][f"d{i}"] = float(margins[i])  # ranks by margin: the same order as P(yes)
    with_pos = {q: rel for q, rel in qrels.items() if any(rel.values())}
    per_group = pytrec_eval.RelevanceEvaluator(with_pos, {"ndcg_cut.10"}).evaluate(
        {q: run[q] for q in with_pos}) if with_pos else {}
    values = [v["ndcg_cut_10"] for v in per_group.values()]
    return {"loss": loss, "roc_auc": roc, "ndcg@10": float(np.mean(values)) if values else None,
            "pairs": len(pairs), "labelled_pairs": len(labelled), "groups": len(qrels), "ndcg_groups": len(values)}


def evaluate(model: KaLMModel, pairs: Sequence[Pair], source: PassageMatrices, ratios: Sequence[int], *,
             batch_size: int = 32, distill_weight: float = 1.0) -> dict[str, dict[str, Any]]:
    """:func:`metrics` of ``model`` on ``pairs`` at every ratio (keys are the ratios as strings, for JSON)."""
    return {str(r): metrics(pairs, group_margins(model, pairs, source, r, batch_size), distill_weight)
            for r in ratios}


__all__ = ["evaluate", "metrics", "group_margins", "check_metric_libraries"]
