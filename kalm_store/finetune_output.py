"""What ``kalm-store finetune`` leaves in its output folder: a normal checkpoint and a training report.

The checkpoint is the base checkpoint's files with only the trained decoder tensors replaced: every
other tensor (encoder, shared token embedding, vision tower) is copied from the base file unchanged,
and config and tokenizer files are copied byte for byte. So ``KaLMModel.from_pretrained`` loads it like
the base, and its encoder fingerprint equals the base's: it scores the base's tables without re-encoding.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

# Files of a checkpoint folder copied as they are (weights are rewritten instead).
_COPIED = ("*.json", "tokenizer.model", "*.txt")


def _replace(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` through a temporary name: a reader never sees half a file."""
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def save_checkpoint(base: Path, out: Path, trained: Mapping[str, torch.Tensor]) -> list[str]:
    """Write ``base``'s checkpoint into ``out`` with the tensors of ``trained`` (name -> tensor) replaced.

    Returns the names of the files written. Raises ``RuntimeError`` if a trained tensor has no
    counterpart in the base files (a naming the writer does not know: nothing would be saved for it).
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    left = set(trained)
    for path in sorted(base.glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            meta = f.metadata()
            tensors = {}
            for key in f.keys():
                t = f.get_tensor(key)
                if key in trained:
                    new = trained[key].detach().to("cpu", t.dtype)  # the file's dtype, as the base stores it
                    if new.shape != t.shape:
                        raise RuntimeError(f"trained tensor {key} has shape {tuple(new.shape)}, the base file "
                                           f"{path.name} stores {tuple(t.shape)}")
                    t = new.contiguous()
                    left.discard(key)
                tensors[key] = t
        tmp = out / (path.name + ".tmp")
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, out / path.name)
        written.append(path.name)
        del tensors
    if left:
        raise RuntimeError(f"trained tensors {sorted(left)[:5]} are not in the base checkpoint's files; "
                           "the fine-tuned weights could not be saved under the base's names")
    for pattern in _COPIED:
        for path in sorted(base.glob(pattern)):  # a shard index lists the same shard names: copied too
            _replace(path, out / path.name)
            written.append(path.name)
    return written


def plot_losses(history: list[dict[str, Any]], path: Path) -> None:
    """Training loss per step, one line per ratio (matplotlib, headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ratios = sorted({int(r) for h in history for r in h["loss"]})
    steps = [h["step"] for h in history]
    for r in ratios:
        ax.plot(steps, [h["loss"].get(str(r), float("nan")) for h in history], label=f"r={r} (Eq. 6/10)")
    ax.plot(steps, [h["total"] for h in history], label="sum over ratios (Eq. 9)", color="black", linewidth=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title("kalm-store finetune")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def _fmt(x: Any) -> str:
    return "-" if x is None else f"{x:.4f}"


def write_report(out: Path, report: dict[str, Any]) -> None:
    """``finetune_report.json`` (everything), ``finetune_report.md`` (the before/after table), ``loss.png``."""
    plot_losses(report["history"], out / "loss.png")
    tmp = out / "finetune_report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, out / "finetune_report.json")
    lines = ["# kalm-store finetune report", "",
             f"Base model: `{report['base_model']}`; table `{report['table']}`; ratios {report['ratios']}; "
             f"{report['train_pairs']} training pairs, {report['eval_pairs']} evaluation pairs ({report['eval_source']}); "
             f"{report['steps']} steps, {report['device']} {report['dtype']}.", "",
             "| r | loss before | loss after | ROC-AUC before | ROC-AUC after | nDCG@10 before | nDCG@10 after |",
             "|---|---|---|---|---|---|---|"]
    for r in report["ratios"]:
        b, a = report["before"][str(r)], report["after"][str(r)]
        lines.append(f"| {r} | {_fmt(b['loss'])} | {_fmt(a['loss'])} | {_fmt(b['roc_auc'])} | {_fmt(a['roc_auc'])} | "
                     f"{_fmt(b['ndcg@10'])} | {_fmt(a['ndcg@10'])} |")
    lines += ["", "nDCG@10 is the mean over query groups with at least one positive (pytrec-eval-terrier); "
              "ROC-AUC over all labelled pairs (scikit-learn); loss is Eq. 6 (+ Eq. 10 for scored pairs) at that "
              "ratio. Training loss per step: `loss.png`.", ""]
    tmp = out / "finetune_report.md.tmp"
    tmp.write_text("\n".join(lines))
    os.replace(tmp, out / "finetune_report.md")


__all__ = ["save_checkpoint", "write_report", "plot_losses"]
