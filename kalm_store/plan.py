"""Storage-budget planning: what each MEP ratio costs on the user's corpus, and which one to pick.

Bytes come from the tokenizer alone (token counts give the exact pooled row count ``ceil(n / r)``
of every passage) and from a small encoded sample (how well our zstd frames compress float16
states at each ratio). A stored value is one zstd frame, so its size is modelled per ratio as

    bytes(passage) = a_r + b_r * rows      (a_r: frame header, checksum, entropy tables; b_r: per row)

fitted by least squares on the sample (residuals sum to zero, so the sample's own total is exact);
sampled passages count with their measured size, the others with the fit. ``kalm-store info``
reports a column's ``stored_bytes`` as Lance's on-disk bytes: the values plus 8-12 bytes per row of
offsets and page structure (:func:`lance_row_overhead`), and so does the plan.
Without a sample the plan falls back to raw float16 (no compression) and says so.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ._text import format_bytes  # noqa: F401  (plan and info print sizes alike)
from .codec import encode_matrix
from .pooling import DEFAULT_RATIO, RATIOS, check_ratio

if TYPE_CHECKING:  # pragma: no cover
    from .fidelity import FidelityReport
    from .model import KaLMModel

OFFSET_BYTES = 8  # int64 offset per row of a large_binary column, counted in `kalm-store info` value_bytes


def lance_row_overhead(mean_value_bytes: float) -> float:
    """Bytes per row Lance's data files add to the values of a ``large_binary`` column, on top of
    the values themselves (offsets, repetition index, page headers): what separates ``kalm-store
    info``'s on-disk ``stored_bytes`` from the sum of the values.

    Measured with pylance 14 (file format 2.x, compression off): ~8.6 bytes below 128-byte values
    (mini-block pages), ~9.3 up to 256 bytes, 12 from 256 bytes on (full-zip pages).
    """
    if mean_value_bytes < 128:
        return 8.6
    if mean_value_bytes < 256:
        return 9.3
    return 12.0
CANDIDATES_PER_QUERY = 100  # candidates fetched per reranked query in the fetch-bytes column

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "pb": 10**15,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "pib": 2**50}


def parse_size(text: str | int) -> int:
    """Parse a byte size: ``"50GB"`` (decimal), ``"500MiB"`` (binary), ``"1.5TB"``, ``"123"`` (bytes).

    Examples
    --------
    >>> parse_size("1.5TB"), parse_size("500MiB"), parse_size(1024)
    (1500000000000, 524288000, 1024)
    """
    if isinstance(text, bool) or not isinstance(text, (str, int)):
        raise TypeError(f"a size must be a str or int, got {type(text).__name__}")
    if isinstance(text, int):
        if text <= 0:
            raise ValueError(f"a size must be positive, got {text}")
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise ValueError(f"cannot read size {text!r}: give a number with an optional unit, one of "
                         "B, KB, MB, GB, TB, PB (powers of 1000) or KiB, MiB, GiB, TiB, PiB (powers of 1024)")
    value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"a size must be positive, got {text!r}")
    return value




# ---------------------------------------------------------------------------------------------- pieces
@dataclass(frozen=True)
class LengthStats:
    """Encoder token counts of the corpus (after truncation to ``max_length``)."""

    passages: int
    tokens: int
    mean: float
    p50: float
    p95: float
    max: int
    truncated: int  # passages cut at max_length

    @classmethod
    def of(cls, counts: np.ndarray, max_length: int) -> LengthStats:
        counts = np.asarray(counts, np.int64)
        if counts.size == 0:
            raise ValueError("the corpus is empty: no passages to plan for")
        return cls(passages=int(counts.size), tokens=int(counts.sum()), mean=float(counts.mean()),
                   p50=float(np.percentile(counts, 50)), p95=float(np.percentile(counts, 95)),
                   max=int(counts.max()), truncated=int((counts >= max_length).sum()))


@dataclass(frozen=True)
class SizeModel:
    """Stored bytes of one value at one ratio: ``per_value + per_row * rows`` (zstd frame of float16)."""

    ratio: int
    per_value: float  # a_r: bytes every value pays (frame header, checksum, tables)
    per_row: float  # b_r: bytes per pooled row
    sample: int  # passages measured (0: raw float16 fallback)

    @classmethod
    def raw(cls, ratio: int, dim: int) -> SizeModel:
        """No measurement: bare float16, ``2 d`` bytes per row."""
        return cls(ratio=ratio, per_value=0.0, per_row=2.0 * dim, sample=0)

    @classmethod
    def fit(cls, ratio: int, rows: np.ndarray, nbytes: np.ndarray) -> SizeModel:
        """Least-squares fit of measured value sizes; the intercept is kept >= 0 and the slope then
        refitted so that the sample's total stays exact."""
        rows, nbytes = np.asarray(rows, np.float64), np.asarray(nbytes, np.float64)
        if rows.size == 0:
            raise ValueError("cannot fit a size model on an empty sample")
        a = 0.0
        if rows.size >= 2 and rows.var() > 0:
            b, a = np.polyfit(rows, nbytes, 1)
            a = max(float(a), 0.0)
        b = (nbytes.sum() - a * rows.size) / rows.sum()
        return cls(ratio=ratio, per_value=a, per_row=float(b), sample=int(rows.size))

    def predict(self, rows: np.ndarray) -> np.ndarray:
        return self.per_value + self.per_row * np.asarray(rows, np.float64)


@dataclass(frozen=True)
class RatioPlan:
    """Costs of one ratio on the corpus (the rows of the plan table)."""

    ratio: int
    column: str
    rows_mean: float  # pooled rows per passage
    rows_p50: float
    rows_p95: float
    raw_bytes_per_passage: float  # bare float16 matrix
    stored_bytes_per_passage: float  # stored value + Lance's per-row overhead, as `kalm-store info` counts it
    compression: float  # stored / raw (values only)
    raw_bytes_total: int
    stored_bytes_total: int  # predicted `kalm-store info` stored_bytes (on disk) of this column for the corpus
    value_bytes_total: int  # predicted `kalm-store info` value_bytes: values + 8-byte offsets
    stored_bytes_for_passages: int | None  # the same for --passages N
    fetch_bytes_per_query: float  # stored bytes read for CANDIDATES_PER_QUERY candidates
    decoded_bytes_per_query: float  # float16 bytes those candidates take in memory when decoded
    fits_budget: bool | None = None
    fidelity: dict[str, Any] | None = None

    @property
    def budgeted_bytes(self) -> int:
        """What a budget is compared with: the stored bytes for ``--passages N``, else for this corpus."""
        for_n = self.stored_bytes_for_passages
        return for_n if for_n is not None else self.stored_bytes_total


@dataclass
class Plan:
    """What :func:`make_plan` returns; ``to_dict`` is the ``--json`` output."""

    model: str
    dim: int
    max_length: int
    lengths: LengthStats
    compression_source: str  # how stored bytes were obtained (measured sample or raw fallback)
    ratios: list[RatioPlan]
    passages: int | None = None  # --passages N
    budget_bytes: int | None = None
    recommended: int | None = None
    reason: str = ""
    size_models: list[SizeModel] = field(default_factory=list)
    fidelity: FidelityReport | None = None

    def ratio(self, r: int) -> RatioPlan:
        return next(p for p in self.ratios if p.ratio == r)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "dim": self.dim, "max_length": self.max_length,
            "lengths": asdict(self.lengths), "compression_source": self.compression_source,
            "passages": self.passages, "budget_bytes": self.budget_bytes,
            "candidates_per_query": CANDIDATES_PER_QUERY,
            "recommended": self.recommended, "reason": self.reason,
            "ratios": [asdict(p) for p in self.ratios],
            "size_models": [asdict(m) for m in self.size_models],
            "fidelity": self.fidelity.to_dict() if self.fidelity is not None else None,
        }


# ---------------------------------------------------------------------------------------------- sizes
def measure_value_sizes(matrices: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Rows and stored bytes (our zstd frame, no offset) of each float16 matrix."""
    rows = np.array([m.shape[0] for m in matrices], np.int64)
    nbytes = np.array([len(encode_matrix(m)) for m in matrices], np.int64)
    return rows, nbytes


def ratio_costs(
    counts: np.ndarray,
    ratio: int,
    dim: int,
    size_model: SizeModel,
    *,
    measured: Mapping[int, int] | None = None,
    passages: int | None = None,
) -> RatioPlan:
    """Costs of ``ratio`` for passages of ``counts`` tokens.

    ``measured`` maps corpus positions to the exact stored value size of sampled passages; the
    others are predicted by ``size_model``. ``passages`` scales the total to N passages.
    """
    counts = np.asarray(counts, np.int64)
    rows = -(-counts // ratio)  # (N,) ceil(n / r)
    values = size_model.predict(rows)  # (N,)
    if measured:
        idx = np.fromiter(measured.keys(), np.int64)
        values[idx] = np.fromiter(measured.values(), np.float64)
    raw = rows * dim * 2  # (N,)
    stored_total = float(values.sum()) + lance_row_overhead(float(values.mean())) * counts.size
    per_passage = stored_total / counts.size
    return RatioPlan(
        ratio=ratio,
        column=f"kalm_r{ratio}",
        rows_mean=float(rows.mean()),
        rows_p50=float(np.percentile(rows, 50)),
        rows_p95=float(np.percentile(rows, 95)),
        raw_bytes_per_passage=float(raw.mean()),
        stored_bytes_per_passage=per_passage,
        compression=float(values.sum() / raw.sum()),
        raw_bytes_total=int(raw.sum()),
        stored_bytes_total=int(round(stored_total)),
        value_bytes_total=int(round(float(values.sum()) + OFFSET_BYTES * counts.size)),
        stored_bytes_for_passages=None if passages is None else int(round(per_passage * passages)),
        fetch_bytes_per_query=per_passage * CANDIDATES_PER_QUERY,
        decoded_bytes_per_query=float(raw.mean()) * CANDIDATES_PER_QUERY,
    )


def recommend(
    ratios: Sequence[RatioPlan],
    budget_bytes: int | None,
    *,
    passages: int | None = None,
    fidelity: FidelityReport | None = None,
) -> tuple[int | None, str]:
    """The finest ratio whose column fits ``budget_bytes`` (r = 4, the paper's default, without a
    budget; the costed ratio nearest to 4 when 4 is not costed), and one sentence saying why."""
    by_ratio = {p.ratio: p for p in ratios}
    scope = f"{passages:,} passages" if passages is not None else "this corpus"

    def measured(r: int) -> str:
        if fidelity is None:
            return ""
        f = fidelity.by_ratio().get(r)
        if f is None or f.kendall_tau is None:
            return ""
        text = (f"; measured on your sample it keeps Kendall tau {f.kendall_tau:.3f} and top-10 overlap "
                f"{f.top10_overlap:.2f} against r=1")
        if f.ndcg_at_10 is not None:
            ref = fidelity.by_ratio()[1].ndcg_at_10
            text += f", nDCG@10 {f.ndcg_at_10:.3f}" + (f" (r=1: {ref:.3f})" if ref is not None else "")
        return text

    if budget_bytes is None:
        if DEFAULT_RATIO in by_ratio:
            r, why = DEFAULT_RATIO, f"r={DEFAULT_RATIO} is the paper's default (no --budget given)"
        else:  # the costed ratio nearest to it on the log2 scale, the finer one of two as near
            r = min(by_ratio, key=lambda x: (abs(math.log2(x) - math.log2(DEFAULT_RATIO)), x))
            why = (f"r={r} is the nearest of the costed ratios {sorted(by_ratio)} to the paper's default "
                   f"r={DEFAULT_RATIO}, which is not among them (no --budget given)")
        return r, (f"{why}: its column takes {format_bytes(by_ratio[r].budgeted_bytes)} for {scope}{measured(r)}")
    fitting = [p for p in sorted(ratios, key=lambda p: p.ratio) if p.budgeted_bytes <= budget_bytes]
    if not fitting:
        coarsest = max(ratios, key=lambda p: p.ratio)
        return None, (f"no ratio fits {format_bytes(budget_bytes)}: even r={coarsest.ratio} needs "
                      f"{format_bytes(coarsest.budgeted_bytes)} for {scope}; raise the budget, store fewer passages or "
                      "lower max_length")
    best = fitting[0]
    return best.ratio, (f"r={best.ratio} is the finest ratio whose column ({format_bytes(best.budgeted_bytes)} for "
                        f"{scope}) fits the budget of {format_bytes(budget_bytes)}{measured(best.ratio)}")


# ---------------------------------------------------------------------------------------------- the plan
def token_counts(model: KaLMModel, texts: Sequence[str], *, chunk: int = 4096,
                 show_progress: bool = False) -> np.ndarray:
    """Encoder tokens of each passage (tokenizer only, no encoder), truncated to ``model.max_length``."""
    out = np.empty(len(texts), np.int64)
    starts = range(0, len(texts), chunk)
    if show_progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="tokenize", unit="chunk")
    for s in starts:
        out[s:s + chunk] = [len(ids) for ids in model.tokenize_passages(list(texts[s:s + chunk]))]
    return out


def make_plan(
    model: KaLMModel,
    counts: np.ndarray,
    *,
    sample_texts: Sequence[str] = (),
    sample_index: Sequence[int] = (),
    sample_ids: Sequence[str] | None = None,
    ratios: Sequence[int] = RATIOS,
    budget: str | int | None = None,
    passages: int | None = None,
    queries: Sequence[Any] | None = None,
    qrels: Mapping[str, Mapping[str, float]] | None = None,
    batch_size: int = 16,
    show_progress: bool = False,
) -> Plan:
    """Plan the storage of a corpus whose passages have ``counts`` encoder tokens.

    Parameters
    ----------
    model : KaLMModel
        The model that will build the store (its tokenizer gave ``counts``).
    counts : numpy.ndarray
        Encoder tokens per passage (see :func:`token_counts`).
    sample_texts : list of str, default ()
        Passages to encode for the compression measurement (and fidelity); empty: raw float16 sizes.
    sample_index : list of int, default ()
        Position of each sampled passage in ``counts`` (their measured sizes replace the prediction).
    sample_ids : list of str, optional
        Ids of the sampled passages (needed with ``qrels``).
    ratios : list of int, default (1, 2, 4, 8, 16, 32)
        Ratios to cost; fidelity needs 1 among them.
    budget : str or int, optional
        Storage budget of the matrix column (``"50GB"``, ``"500MiB"``, bytes); default ``None``.
    passages : int, optional
        Also cost N passages of the same length distribution.
    queries : list of fidelity.Query, optional
        Score the sample at every ratio against these and compare with r = 1.
    qrels : dict, optional
        ``{query_id: {passage_id: relevance}}`` for nDCG@10 and ROC-AUC per ratio.
    batch_size : int, default 16
        Passages per encoder pass.
    show_progress : bool, default False
        Show tqdm bars.

    Returns
    -------
    Plan

    Examples
    --------
    >>> counts = token_counts(model, texts)  # doctest: +SKIP
    >>> plan = make_plan(model, counts, sample_texts=texts[:64], sample_index=range(64), budget="50GB")  # doctest: +SKIP
    >>> plan.recommended, plan.ratio(4).stored_bytes_total  # doctest: +SKIP
    (2, 81234567)
    """
    ratios = sorted({check_ratio(r) for r in ratios})
    if not ratios:
        raise ValueError("ratios is empty: give at least one of 1, 2, 4, 8, 16, 32")
    budget_bytes = None if budget is None else parse_size(budget)
    if passages is not None and (isinstance(passages, bool) or not isinstance(passages, int) or passages < 1):
        raise ValueError(f"passages must be a positive int, got {passages!r}")
    sample_texts, sample_index = list(sample_texts), [int(i) for i in sample_index]
    if len(sample_texts) != len(sample_index):
        raise ValueError(f"sample_texts ({len(sample_texts)}) and sample_index ({len(sample_index)}) differ in length")
    if queries and not sample_texts:
        raise ValueError("fidelity needs an encoded sample: give sample passages (--sample > 0) with the queries")
    if queries and 1 not in ratios:
        raise ValueError(f"fidelity is measured against r=1; ratios {ratios} lack it")
    counts = np.asarray(counts, np.int64)
    lengths = LengthStats.of(counts, model.max_length)

    enc = None
    if sample_texts:
        enc = model.encode_ratios(sample_texts, ratios, batch_size=batch_size, show_progress=show_progress)
        expected = counts[sample_index].tolist()
        if enc.token_counts != expected:
            raise ValueError("the sampled passages tokenize to other lengths than the corpus statistics say; "
                             "the counts must come from this model's tokenizer and max_length")
    size_models, plans = [], []
    for r in ratios:
        measured = None
        if enc is not None:
            rows, nbytes = measure_value_sizes(enc.matrices[r])
            sm = SizeModel.fit(r, rows, nbytes)
            measured = dict(zip(sample_index, nbytes.tolist()))
        else:
            sm = SizeModel.raw(r, model.dim)
        size_models.append(sm)
        plans.append(ratio_costs(counts, r, model.dim, sm, measured=measured, passages=passages))
    source = (f"zstd measured per ratio on {len(sample_texts)} encoded passages" if enc is not None
              else "raw float16 (no sample encoded: stored sizes are upper bounds, zstd usually saves 5-10%)")

    fidelity = None
    if queries:
        from .fidelity import measure_fidelity

        assert enc is not None
        fidelity = measure_fidelity(model, queries, enc.matrices, passage_ids=sample_ids, qrels=qrels,
                                    show_progress=show_progress)
        by_ratio = fidelity.by_ratio()
        plans = [_with(p, fidelity=asdict(by_ratio[p.ratio])) for p in plans]
    recommended, reason = recommend(plans, budget_bytes, passages=passages, fidelity=fidelity)
    if budget_bytes is not None:
        plans = [_with(p, fits_budget=p.budgeted_bytes <= budget_bytes) for p in plans]
    return Plan(model=model.name_or_path, dim=model.dim, max_length=model.max_length, lengths=lengths,
                compression_source=source, ratios=plans, passages=passages, budget_bytes=budget_bytes,
                recommended=recommended, reason=reason, size_models=size_models, fidelity=fidelity)


def _with(p: RatioPlan, **changes: Any) -> RatioPlan:
    from dataclasses import replace

    return replace(p, **changes)


def sample_positions(n: int, k: int, *, seed: int = 0, must: Sequence[int] = ()) -> list[int]:
    """``k`` distinct positions out of ``n`` (seeded), always including ``must`` (which may exceed ``k``)."""
    if k < 0:
        raise ValueError(f"the sample size must be >= 0, got {k}")
    chosen = list(dict.fromkeys(int(i) for i in must))
    rest = np.setdiff1d(np.arange(n), np.asarray(chosen, np.int64))
    take = max(0, min(k - len(chosen), rest.size))
    if take:
        chosen += np.random.default_rng(seed).choice(rest, size=take, replace=False).tolist()
    return sorted(chosen)


# ---------------------------------------------------------------------------------------------- output
def format_plan(plan: Plan) -> str:
    """The human-readable plan: length statistics, one row per ratio, the recommendation."""
    L = plan.lengths
    lines = [
        f"model {plan.model} (d={plan.dim}, max_length={plan.max_length})",
        f"corpus: {L.passages:,} passages, {L.tokens:,} encoder tokens; per passage mean {L.mean:.1f}, "
        f"p50 {L.p50:.0f}, p95 {L.p95:.0f}, max {L.max}" + (f"; {L.truncated:,} truncated at max_length"
                                                             if L.truncated else ""),
        f"stored bytes: {plan.compression_source}",
    ]
    n_col = plan.passages is not None
    fid = plan.fidelity is not None
    qrels = fid and plan.fidelity is not None and plan.fidelity.judged_queries > 0
    head = ["r", "rows mean", "p50", "p95", "raw/passage", "stored/passage", "zstd", "column total"]
    if n_col:
        head.append(f"for {plan.passages:,}")
    head.append(f"fetch/{CANDIDATES_PER_QUERY} cand.")
    if fid:
        head += ["|dP|", "tau", "top10"]
    if qrels:
        head += ["nDCG@10", "AUC"]
    if plan.budget_bytes is not None:
        head.append("fits")
    rows = []
    for p in plan.ratios:
        row = [str(p.ratio), f"{p.rows_mean:.1f}", f"{p.rows_p50:.0f}", f"{p.rows_p95:.0f}",
               format_bytes(p.raw_bytes_per_passage), format_bytes(p.stored_bytes_per_passage),
               f"{p.compression:.3f}", format_bytes(p.stored_bytes_total)]
        if n_col:
            row.append(format_bytes(p.stored_bytes_for_passages or 0))
        row.append(format_bytes(p.fetch_bytes_per_query))
        if fid:
            f = p.fidelity or {}
            row += [_num(f.get("mean_abs_delta"), 4), _num(f.get("kendall_tau"), 3), _num(f.get("top10_overlap"), 2)]
        if qrels:
            f = p.fidelity or {}
            row += [_num(f.get("ndcg_at_10"), 3), _num(f.get("roc_auc"), 3)]
        if plan.budget_bytes is not None:
            row.append("yes" if p.fits_budget else "no")
        rows.append(row)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    lines.append("  ".join(h.rjust(w) for h, w in zip(head, widths)))
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    if fid and plan.fidelity is not None:
        lines.append(f"fidelity: {plan.fidelity.queries} queries x {plan.fidelity.candidates} sampled passages, "
                     "against r=1" + (f"; {plan.fidelity.judged_queries} queries with a relevant passage in the "
                                      "sample" if qrels else ""))
    budget = f" under a budget of {format_bytes(plan.budget_bytes)}" if plan.budget_bytes is not None else ""
    lines.append(f"recommended{budget}: " + (f"r={plan.recommended}" if plan.recommended else "none")
                 + f" ({plan.reason})")
    return "\n".join(lines)


def _num(x: float | None, digits: int) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def plot_plan(plan: Plan, path: str | Path) -> Path:
    """Write a PNG: stored bytes per passage (log scale) and measured fidelity against r."""
    from ._deps import require

    matplotlib = require("matplotlib", "plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rs = [p.ratio for p in plan.ratios]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(rs, [p.stored_bytes_per_passage for p in plan.ratios], "o-", color="tab:blue", label="stored bytes / passage")
    ax.plot(rs, [p.raw_bytes_per_passage for p in plan.ratios], "--", color="tab:blue", alpha=0.4,
            label="raw float16 / passage")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(rs, [str(r) for r in rs])
    ax.set_xlabel("MEP ratio r")
    ax.set_ylabel("bytes per passage")
    handles, labels = ax.get_legend_handles_labels()
    if plan.fidelity is not None:
        ax2 = ax.twinx()
        f = plan.fidelity.by_ratio()
        for key, label, color in (("kendall_tau", "Kendall tau vs r=1", "tab:orange"),
                                  ("top10_overlap", "top-10 overlap vs r=1", "tab:green"),
                                  ("ndcg_at_10", "nDCG@10", "tab:red"), ("roc_auc", "ROC-AUC", "tab:purple")):
            ys = [getattr(f[r], key) for r in rs]
            if all(y is not None for y in ys):
                ax2.plot(rs, ys, "s-", color=color, label=label)
        ax2.set_ylabel("fidelity (measured)")
        ax2.set_ylim(min(0.0, ax2.get_ylim()[0]), 1.02)
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    if plan.recommended is not None:
        ax.axvline(plan.recommended, color="grey", linestyle=":", label=f"recommended r={plan.recommended}")
        handles.append(ax.get_lines()[-1])
        labels.append(f"recommended r={plan.recommended}")
    # below the axes: inside them it covered the points (bytes fall to the lower right, fidelity sits on top)
    ax.legend(handles, labels, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, frameon=False)
    ax.set_title(f"kalm-store plan: {plan.lengths.passages:,} passages, {plan.model}", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120, bbox_inches="tight")  # the legend outside the axes stays in the picture
    plt.close(fig)
    return path


__all__ = ["Plan", "RatioPlan", "SizeModel", "LengthStats", "parse_size", "format_bytes", "token_counts",
           "make_plan", "recommend", "ratio_costs", "sample_positions", "format_plan", "plot_plan"]
