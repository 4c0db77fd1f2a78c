"""What ``kalm-store eval`` reports: the table on stdout, the ``--json`` object, and the files in ``--out``.

Files written into the output folder:

* ``per_query.tsv``: ``query-id, system, ndcg@10, mrr@10, recall@10, recall@100, retrieved`` per
  judged query and system (``first_stage``, ``r1``, ``r4``, ..., ``joint``);
* ``runs/{system}.trec`` and ``qrels.trec``: each system's ranking and the judgments in TREC format
  (``trec_eval -c -m ndcg_cut.10 qrels.trec runs/r4.trec`` reproduces nDCG@10);
* ``report.json``: everything, settings and counts included (:meth:`EvalReport.to_dict`);
* ``eval.png``: quality (nDCG@10, MRR@10, Recall@10) and bytes per passage against r.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .metrics import MEASURES


@dataclass
class SystemResult:
    """One ranking system's numbers: the mean of each measure and the per-query values."""

    name: str  # "first_stage", "r4", "joint"
    mean: dict[str, float]
    per_query: dict[str, dict[str, float]]
    rankings: dict[str, list[str]]  # query id -> passage ids, best first


@dataclass
class EvalReport:
    """What :func:`kalm_store.evaluate` returns."""

    data_dir: str
    split: str
    db: str | None  # None: a temporary store, removed afterwards
    table: str
    mode: str
    candidates: int
    ratios: list[int]
    sources: dict[int, int]  # requested ratio -> stored ratio it was scored from (re-pooled when different)
    stored_ratios: list[int]
    model: str
    instruction: str | None
    queries: int  # judged queries evaluated (every mean is over these)
    skipped_unjudged: int  # queries.jsonl entries without a qrels row
    no_relevant: int  # of the evaluated queries: those whose judgments hold no relevant passage (they score 0)
    not_evaluated: int  # judged queries left out by max_queries
    warnings: list[str]
    built: str | None  # the builder's summary line when this run built (or resumed) the table
    bytes_per_passage: dict[int, dict[str, float | None]]
    systems: dict[str, SystemResult]
    joint_sample: dict[str, Any] | None = None
    scores: dict[str, dict[str, np.ndarray]] = field(default_factory=dict, repr=False)  # system -> query -> P(yes)
    qrels: dict[str, dict[str, int]] = field(default_factory=dict, repr=False)  # the evaluated queries' judgments

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` object: ``{"first_stage": {measure: mean}, "r4": {...}, ...}`` (plus
        ``"joint_sample"`` when the joint forward was run)."""
        out: dict[str, Any] = {name: dict(s.mean) for name, s in self.systems.items() if name != "joint"}
        if self.joint_sample is not None:
            out["joint_sample"] = self.joint_sample
        return out

    def to_dict(self) -> dict[str, Any]:
        """Everything (``report.json``): settings, counts, warnings, bytes, means."""
        return {
            "data_dir": self.data_dir, "split": self.split, "db": self.db, "table": self.table, "mode": self.mode,
            "candidates": self.candidates, "ratios": self.ratios,
            "sources": {f"r{r}": s for r, s in self.sources.items()}, "stored_ratios": self.stored_ratios,
            "model": self.model, "instruction": self.instruction, "queries": self.queries,
            "skipped_unjudged": self.skipped_unjudged, "no_relevant": self.no_relevant,
            "not_evaluated": self.not_evaluated, "warnings": self.warnings, "built": self.built,
            "bytes_per_passage": {f"r{r}": b for r, b in self.bytes_per_passage.items()},
            "results": self.to_json(),
        }


def format_table(rep: EvalReport) -> str:
    """The readable report: one row per system, measures as means over the judged queries."""
    lines = [f"{rep.data_dir} ({rep.split}): {rep.queries} judged queries, first stage {rep.mode} top "
             f"{rep.candidates}, model {rep.model}"]
    skipped = []
    if rep.skipped_unjudged:
        skipped.append(f"{rep.skipped_unjudged} queries without judgments")
    if rep.not_evaluated:
        skipped.append(f"{rep.not_evaluated} beyond --max-queries")
    if skipped:
        lines.append("skipped: " + ", ".join(skipped))
    if rep.no_relevant:
        lines.append(f"{rep.no_relevant} judged queries have no relevant passage: they score 0 on every measure "
                     "(as in trec_eval -c)")
    lines += [f"warning: {w}" for w in rep.warnings]
    head = ["system", *MEASURES, "raw/passage", "stored/passage", "from"]
    rows = []
    for name, s in rep.systems.items():
        if name == "joint":
            continue
        row = [name, *(f"{s.mean[m]:.4f}" for m in MEASURES)]
        if name == "first_stage":
            row += ["-", "-", "-"]
        else:
            r = int(name[1:])
            b = rep.bytes_per_passage[r]
            src = rep.sources[r]
            row += [_kb(b["raw_float16"]), _kb(b["stored"]), "stored" if src == r else f"repool r{src}"]
        rows.append(row)
    lines += _grid(head, rows)
    if rep.joint_sample is not None:
        js = rep.joint_sample
        lines.append(f"joint forward (passages re-encoded, unpooled) on the first {js['queries']} queries:")
        head = ["system", *MEASURES, "|dP| vs joint", "tau vs joint", "top10 overlap"]
        rows = [["joint", *(f"{js['joint'][m]:.4f}" for m in MEASURES), "-", "-", "-"],
                ["first_stage", *(f"{js['first_stage'][m]:.4f}" for m in MEASURES), "-", "-", "-"]]
        for r in rep.ratios:
            f = js[f"r{r}"]
            rows.append([f"r{r}", *(f"{f[m]:.4f}" for m in MEASURES), _num(f["mean_abs_dp"], 4),
                         _num(f["kendall_tau"], 3), _num(f["top10_overlap"], 2)])
        lines += _grid(head, rows)
    if rep.built:
        lines.append(f"built table {rep.table!r}: {rep.built}")
    return "\n".join(lines)


def _grid(head: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    return ["  ".join(h.rjust(w) for h, w in zip(head, widths))] + \
        ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]


def _kb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e3:.1f} kB"


def _num(x: float | None, digits: int) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def write_outputs(rep: EvalReport, folder: Path, *, plot: bool = True) -> list[Path]:
    """Write ``per_query.tsv``, ``runs/*.trec``, ``report.json`` (and ``eval.png``) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    path = folder / "per_query.tsv"
    with open(path, "w", encoding="utf-8") as f:
        f.write("\t".join(["query-id", "system", *MEASURES, "retrieved"]) + "\n")
        for name, s in rep.systems.items():
            for q, values in s.per_query.items():
                f.write("\t".join([q, name, *(f"{values[m]:.6f}" for m in MEASURES),
                                   str(len(s.rankings.get(q, ())))]) + "\n")
    written.append(path)
    runs = folder / "runs"
    runs.mkdir(exist_ok=True)
    for name, s in rep.systems.items():
        path = runs / f"{name}.trec"
        with open(path, "w", encoding="utf-8") as f:
            for q, ids in s.rankings.items():
                for i, pid in enumerate(ids):
                    f.write(f"{q} Q0 {pid} {i + 1} {len(ids) - i} {name}\n")  # scores mirror the ranks
        written.append(path)
    path = folder / "qrels.trec"  # the judgments of the evaluated queries, in the format trec_eval reads
    with open(path, "w", encoding="utf-8") as f:
        for q, judged in rep.qrels.items():
            for pid, grade in judged.items():
                f.write(f"{q} 0 {pid} {grade}\n")
    written.append(path)
    path = folder / "report.json"
    path.write_text(json.dumps(rep.to_dict(), indent=2) + "\n", encoding="utf-8")
    written.append(path)
    if plot:
        written.append(plot_report(rep, folder / "eval.png"))
    return written


def plot_report(rep: EvalReport, path: Path) -> Path:
    """A PNG: each measure against r (first stage dashed), and bytes per passage on a second axis."""
    from ._deps import require

    matplotlib = require("matplotlib", "plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rs = rep.ratios
    fig, ax = plt.subplots(figsize=(7, 5.2))
    colors = {"ndcg@10": "tab:red", "mrr@10": "tab:orange", "recall@10": "tab:green", "recall@100": "tab:purple"}
    for m, color in colors.items():
        ax.plot(rs, [rep.systems[f"r{r}"].mean[m] for r in rs], "o-", color=color, label=f"{m} reranked")
        ax.axhline(rep.systems["first_stage"].mean[m], color=color, linestyle="--", alpha=0.5,
                   label=f"{m} first stage")
    ax.set_xscale("log", base=2)
    ax.set_xticks(rs, [str(r) for r in rs])
    ax.set_xlabel("MEP ratio r")
    ax.set_ylabel("mean over judged queries")
    ax.set_ylim(0.0, 1.02)
    ax2 = ax.twinx()
    ax2.plot(rs, [float(rep.bytes_per_passage[r]["raw_float16"] or 0.0) for r in rs], "s:", color="tab:blue",
             label="float16 bytes / passage")
    stored = [(r, float(b)) for r in rs if (b := rep.bytes_per_passage[r]["stored"]) is not None]
    if stored:
        ax2.plot([r for r, _ in stored], [b for _, b in stored], "D", color="tab:blue", label="stored bytes / passage")
    ax2.set_yscale("log")
    ax2.set_ylabel("bytes per passage")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.set_title(f"kalm-store eval: {Path(rep.data_dir).name} ({rep.split}), {rep.queries} queries, "
                 f"{rep.mode} top {rep.candidates}", fontsize=9)
    fig.tight_layout(rect=(0, 0.16, 1, 1))  # the legend goes below the axes, off the curves
    fig.legend(h1 + h2, l1 + l2, fontsize=7, loc="lower center", ncol=3, frameon=False)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


__all__ = ["EvalReport", "SystemResult", "format_table", "write_outputs", "plot_report"]
