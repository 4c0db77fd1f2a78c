"""bfloat16 against float32 on the user's own passages and queries (``kalm-store plan --compare-dtypes``).

The same model is loaded in both compute dtypes; the sampled passages are encoded by each (storage is
float16 either way) and every query is scored against them three ways: the store built and scored in
float32 (the reference), built in float32 and scored in bfloat16 (search's --dtype on an existing
table), and built and scored in bfloat16. The measures are kalm_store.fidelity's: Kendall tau, top-10
overlap, plus the mean and the largest |P(yes)| change.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .fidelity import Query, kendall_tau, top_k_overlap

if TYPE_CHECKING:  # pragma: no cover
    from .model import KaLMModel


@dataclass(frozen=True)
class DtypeFidelity:
    """Agreement of one bf16 path with float32, over ``queries`` x ``candidates`` scores."""

    path: str  # "score" (float32-built, bf16-scored) or "build+score" (both in bf16)
    ratio: int
    queries: int
    candidates: int
    max_abs_delta: float  # largest |P_bf16 - P_fp32|
    mean_abs_delta: float
    kendall_tau: float  # mean over queries
    top10_overlap: float  # mean over queries

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare_dtypes(reference: KaLMModel, other: KaLMModel, queries: Sequence[Query], texts: Sequence[str], *,
                   ratio: int, batch_size: int = 16) -> list[DtypeFidelity]:
    """Score ``queries`` against ``texts`` in ``reference``'s dtype and in ``other``'s; compare.

    Parameters
    ----------
    reference, other : KaLMModel
        The same checkpoint (fingerprints must match) in two compute dtypes, float32 first.
    queries : list of Query
    texts : list of str
        The sampled passages.
    ratio : int
        MEP ratio the passages are pooled at.
    batch_size : int, default 16
        Passages per encoder pass and candidates per decoder pass.
    """
    if reference.fingerprint != other.fingerprint:
        raise ValueError("compare_dtypes needs one checkpoint in two dtypes; the fingerprints differ")
    if not queries or not texts:
        raise ValueError("compare_dtypes needs at least one query and one passage")
    ref_mats = reference.encode(list(texts), ratio=ratio, batch_size=batch_size)
    other_mats = other.encode(list(texts), ratio=ratio, batch_size=batch_size)
    ref = np.stack([reference.score(q.text, ref_mats, batch_size=batch_size) for q in queries])  # (Q, n)
    paths = {
        "score": np.stack([other.score(q.text, ref_mats, batch_size=batch_size) for q in queries]),
        "build+score": np.stack([other.score(q.text, other_mats, batch_size=batch_size) for q in queries]),
    }
    out = []
    for name, s in paths.items():
        delta = np.abs(s - ref)
        out.append(DtypeFidelity(
            path=name, ratio=ratio, queries=len(queries), candidates=len(texts),
            max_abs_delta=float(delta.max()), mean_abs_delta=float(delta.mean()),
            kendall_tau=float(np.nanmean([kendall_tau(s[i], ref[i]) for i in range(len(queries))])),
            top10_overlap=float(np.mean([top_k_overlap(s[i], ref[i]) for i in range(len(queries))]))))
    return out


def format_dtype_fidelity(rows: Sequence[DtypeFidelity], other: str = "bfloat16") -> str:
    """The lines ``plan`` prints under its table."""
    lines = [f"{other} vs float32 at r={rows[0].ratio} ({rows[0].queries} queries x {rows[0].candidates} "
             "sampled passages; storage is float16 either way):",
             f"  {'path':<34} {'max |dP|':>9} {'mean |dP|':>10} {'tau':>6} {'top-10':>7}"]
    label = {"score": f"float32-built, scored in {other}", "build+score": f"built and scored in {other}"}
    for r in rows:
        lines.append(f"  {label[r.path]:<34} {r.max_abs_delta:>9.4f} {r.mean_abs_delta:>10.4f} "
                     f"{r.kendall_tau:>6.3f} {r.top10_overlap:>7.2f}")
    return "\n".join(lines)
