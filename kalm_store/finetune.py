"""Adapt the decoder to your own pairs, straight from the stored matrices, without re-encoding.

Stored matrices depend only on the encoder. With the encoder (and the token embedding it shares with
the decoder and the output head) frozen, the decoder trains on ``(query, stored matrix, label)`` pairs
with no encoder pass per step, and the store stays valid for the adapted model: the output
checkpoint's encoder fingerprint equals the base's, so it scores the base's tables as they are.

The training forward is :meth:`KaLMModel._margins_transformers`, the transformers decoder path that
``KaLMModel.score`` uses for configurations the fast decoder does not cover (the fast decoder gathers
detached weight copies: inference only). Losses: Eq. 6 per ratio, summed over ratios (Eq. 9), plus
Eq. 10 for pairs with a teacher score (:mod:`kalm_store.losses`).

Examples
--------
>>> import kalm_store
>>> result = kalm_store.finetune("./db", "docs", "./base-model", "train.jsonl", "./adapted",
...                              ratios=[4, 8], epochs=2)  # doctest: +SKIP
>>> result.after["4"]["roc_auc"]  # doctest: +SKIP
0.91
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import types
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .pairs import Pair, check_ids, read_pairs, split_groups
from .pooling import check_ratio

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .finetune_data import PassageMatrices
    from .model import KaLMModel

WORK_DIR = ".finetune"  # inside the output folder: encoded texts and resumable checkpoints, removed at the end
STATE_VERSION = 1


@dataclass(frozen=True)
class FinetuneConfig:
    """Training options (every one recorded in the run's checkpoints; a resumed run must use the same)."""

    ratios: tuple[int, ...] | None = None  # trained ratios; None: the table's stored ratios
    epochs: int = 1  # passes over the training pairs
    lr: float = 5e-5  # peak learning rate of AdamW
    batch_size: int = 16  # pairs per optimizer step (each scored at every ratio)
    seed: int = 0  # shuffling of pairs per epoch, and the held-out split
    warmup_fraction: float = 0.1  # linear warm-up over this fraction of the steps, then linear decay to 0
    weight_decay: float = 0.0  # AdamW weight decay
    max_grad_norm: float = 1.0  # gradient clipping (L2 norm over all trained tensors)
    distill_weight: float = 1.0  # weight of Eq. 10 for pairs with a teacher score
    eval_fraction: float = 0.2  # query groups held out when no evaluation file is given

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {self.seed!r}")
        for name, low, high in (("lr", 0.0, math.inf), ("max_grad_norm", 0.0, math.inf)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not low < v < high:
                raise ValueError(f"{name} must be a positive number, got {v!r}")
        for name in ("warmup_fraction", "weight_decay", "distill_weight"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < math.inf \
                    or (name == "warmup_fraction" and v >= 1.0):
                raise ValueError(f"{name} must be a number >= 0{' and < 1' if name == 'warmup_fraction' else ''}, "
                                 f"got {v!r}")
        if not isinstance(self.eval_fraction, (int, float)) or not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in (0, 1), got {self.eval_fraction!r}")
        if self.ratios is not None:
            if not self.ratios:
                raise ValueError("ratios is empty: give at least one of 1, 2, 4, 8, 16, 32 (or None for the table's)")
            object.__setattr__(self, "ratios", tuple(sorted({check_ratio(r) for r in self.ratios})))


@dataclass
class FinetuneResult:
    """What :func:`finetune` returns."""

    out: Path  # the output folder (a checkpoint once ``finished``)
    finished: bool  # False when stopped early by ``stop_after`` (resume to continue)
    step: int  # optimizer steps done so far
    total_steps: int
    ratios: list[int]
    before: dict[str, dict[str, Any]]  # ratio -> evaluation metrics of the base model
    after: dict[str, dict[str, Any]] | None = None  # ... of the saved fine-tuned model (when finished)
    history: list[dict[str, Any]] = field(default_factory=list)  # per step: step, epoch, lr, loss per ratio, total


# --------------------------------------------------------------------------- what trains, and how it scores
def trainable_parameters(hf_model: Any) -> dict[str, torch.nn.Parameter]:
    """Freeze everything, then unfreeze the decoder's own weights: the encoder and the token embedding it
    shares with the decoder and the (tied) output head stay frozen, so stored matrices stay valid."""
    for p in hf_model.parameters():
        p.requires_grad_(False)
    frozen = {id(p) for p in hf_model.get_encoder().parameters()}
    frozen |= {id(hf_model.get_input_embeddings().weight), id(hf_model.get_output_embeddings().weight)}
    decoder = {id(p) for p in hf_model.get_decoder().parameters()}
    out = {}
    for name, p in hf_model.named_parameters():  # tied tensors appear once, under their first name
        if id(p) in decoder and id(p) not in frozen:
            p.requires_grad_(True)
            out[name] = p
    if not out:
        raise RuntimeError("found no decoder weights to train")
    return out


def training_margins(model: KaLMModel, prompts: Sequence[Sequence[int]], mats: Sequence[np.ndarray]) -> torch.Tensor:
    """``z_yes - z_no`` of each (prompt, matrix) pair through the scoring core, with gradients.

    Prompts of different queries are right-padded and read at their own last token; the decoder is
    causal, so this is :meth:`KaLMModel.score`'s value for each pair (checked by the tests).
    """
    import torch

    states, mask = model._pad(list(mats))  # (B, m, d) compute dtype, (B, m)
    lengths = [len(p) for p in prompts]
    ids = torch.full((len(prompts), max(lengths)), model.tokenizer.pad_token_id or 0, dtype=torch.long)  # (B, L)
    for row, p in enumerate(prompts):
        ids[row, : len(p)] = torch.tensor(p, dtype=torch.long)
    last = torch.tensor(lengths, device=model.device) - 1  # (B,)
    return model._margins_transformers(ids.to(model.device), states, mask, last=last)


class Trainer:
    """One optimizer step at a time over batches of pairs: Eq. 9 over ``ratios`` (+ Eq. 10), AdamW, linear
    warm-up/decay, gradient clipping, bf16 autocast on CUDA (float32 master weights), float32 on CPU."""

    def __init__(self, model: KaLMModel, source: Any, ratios: Sequence[int], config: FinetuneConfig,
                 total_steps: int) -> None:
        import torch
        from transformers import get_linear_schedule_with_warmup

        self.model = model
        self.source = source  # .get(pairs, ratio) -> matrices
        self.ratios = list(ratios)
        self.config = config
        self.params = trainable_parameters(model.hf_model)
        self.optimizer = torch.optim.AdamW(list(self.params.values()), lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = get_linear_schedule_with_warmup(
            self.optimizer, int(config.warmup_fraction * total_steps), total_steps)
        self._prompts: dict[tuple[str, str | None], list[int]] = {}

    def prompt(self, pair: Pair) -> list[int]:
        key = pair.group
        if key not in self._prompts:
            self._prompts[key] = self.model.prompt_ids(pair.query, pair.instruction)
        return self._prompts[key]

    def losses(self, pairs: Sequence[Pair], mats: Sequence[np.ndarray]) -> torch.Tensor:
        """The loss of one ratio's batch (scalar, with gradients)."""
        import torch

        from .losses import pair_loss

        dev = self.model.device
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            margin = training_margins(self.model, [self.prompt(p) for p in pairs], mats)  # (B,)
        label = torch.tensor([p.label or 0 for p in pairs], dtype=torch.float32, device=dev)
        has_label = torch.tensor([p.label is not None for p in pairs], device=dev)
        teacher = torch.tensor([0.5 if p.score is None else p.score for p in pairs], dtype=torch.float32, device=dev)
        has_teacher = torch.tensor([p.score is not None for p in pairs], device=dev)
        return pair_loss(margin, label, has_label, teacher, has_teacher, self.config.distill_weight)

    def step(self, pairs: Sequence[Pair]) -> dict[int, float]:
        """One optimizer step on ``pairs``; returns the loss at each ratio (their sum is Eq. 9)."""
        import torch

        self.optimizer.zero_grad(set_to_none=True)
        out = {}
        for r in self.ratios:  # backward per ratio: gradients add up to those of the sum, one graph at a time
            loss = self.losses(pairs, self.source.get(pairs, r))
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"training loss at r={r} is {value}; lower the learning rate")
            loss.backward()
            out[r] = value
        torch.nn.utils.clip_grad_norm_(list(self.params.values()), self.config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        return out


# --------------------------------------------------------------------------- checkpoints of the run
def _file_digest(path: Path | None) -> str | None:
    if path is None:
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _checkpoints(work: Path) -> list[Path]:
    return sorted(p for p in work.glob("ckpt-*") if p.is_dir() and not p.name.endswith(".tmp"))


def _save_state(work: Path, trainer: Trainer, state: dict[str, Any]) -> None:
    """Write a checkpoint atomically (a folder renamed into place), then drop older ones."""
    import torch
    from safetensors.torch import save_file

    final = work / f"ckpt-{state['step']:08d}"
    tmp = work / (final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in trainer.params.items()}, str(tmp / "trained.safetensors"))
    torch.save({"optimizer": trainer.optimizer.state_dict(), "scheduler": trainer.scheduler.state_dict()},
               tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps(state))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in _checkpoints(work)[:-1]:
        shutil.rmtree(old)


def _load_state(ckpt: Path, trainer: Trainer) -> dict[str, Any]:
    import torch
    from safetensors.torch import load_file

    weights = load_file(str(ckpt / "trained.safetensors"))
    if set(weights) != set(trainer.params):
        raise ValueError(f"checkpoint {ckpt} holds other tensors than this model trains; it is not from this run")
    with torch.no_grad():
        for k, p in trainer.params.items():
            p.copy_(weights[k])
    opt = torch.load(ckpt / "optimizer.pt", map_location=trainer.model.device, weights_only=True)
    trainer.optimizer.load_state_dict(opt["optimizer"])
    trainer.scheduler.load_state_dict(opt["scheduler"])
    return json.loads((ckpt / "state.json").read_text())


def _check_out(out: Path, resume: bool) -> Path | None:
    """The checkpoint to resume from (None: a fresh run); refuses an output folder in any other state."""
    work = out / WORK_DIR
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file; give a folder for the fine-tuned checkpoint")
    ckpts = _checkpoints(work) if work.is_dir() else []
    if work.is_dir():
        if not resume:
            what = f"checkpoints up to step {int(ckpts[-1].name[5:])}" if ckpts else "its encoded texts"
            raise ValueError(f"--out {str(out)!r} holds an unfinished fine-tuning run ({what}); pass --resume "
                             "(resume=True) to continue it, or choose another output folder")
        return ckpts[-1] if ckpts else None
    if out.is_dir() and any(out.iterdir()):
        finished = (out / "finetune_report.json").is_file()
        raise ValueError(f"--out {str(out)!r} is not empty" + (" (it holds a finished fine-tuned model)" if finished else "")
                         + "; choose a new or empty folder")
    return None


# --------------------------------------------------------------------------- the run
def finetune(
    db: str,
    table: str,
    model: str | Path,
    train: str | Path,
    out: str | Path,
    *,
    eval: str | Path | None = None,  # noqa: A002 - the CLI's --eval
    ratios: Sequence[int] | None = None,
    epochs: int = 1,
    lr: float = 5e-5,
    batch_size: int = 16,
    seed: int = 0,
    config: FinetuneConfig | None = None,
    resume: bool = False,
    stop_after: int | None = None,
    save_every: int = 200,
    device: str | None = None,
    cache_mb: int = 256,
    storage_options: dict[str, str] | None = None,
    show_progress: bool = True,
) -> FinetuneResult:
    """Fine-tune the decoder of ``model`` on the pairs of ``train`` from the matrices stored in ``table``.

    Parameters
    ----------
    db, table : str
        LanceDB URI and table name of a passage store built by ``model``'s encoder.
    model : str or Path
        Base checkpoint folder (or hub id); its files are the template of the output checkpoint.
    train : str or Path
        Pairs file (:mod:`kalm_store.pairs`): ``{"query", "id" | "text", "label" | "score", "instruction"?}``.
    out : str or Path
        New (or empty) folder: the fine-tuned checkpoint, ``finetune_report.{json,md}`` and ``loss.png``.
    eval : str or Path, optional
        Evaluation pairs; default ``None`` holds out ``config.eval_fraction`` of the query groups of ``train``.
    ratios : list of int, optional
        Trained (and evaluated) ratios; default ``None`` is the table's stored ratios. A ratio that is a
        multiple of a stored one is derived by exact re-pooling.
    epochs, lr, batch_size, seed : optional
        Defaults 1, 5e-5, 16, 0 (see :class:`FinetuneConfig`).
    config : FinetuneConfig, optional
        Every training option; when given, ``ratios``/``epochs``/``lr``/``batch_size``/``seed`` must be left
        at their defaults.
    resume : bool, default False
        Continue the unfinished run whose checkpoints are in ``out`` (same data and options).
    stop_after : int, optional
        Stop after this many optimizer steps in this call, with a checkpoint (the learning-rate schedule
        stays that of the whole run); resume later. Default ``None``: run to the end.
    save_every : int, default 200
        Steps between checkpoints.
    device : str, optional
        Default ``None`` picks CUDA when available (bf16 autocast, float32 weights), else CPU float32.
    cache_mb : int, default 256
        Bound of the in-memory cache of store matrices (MiB).
    storage_options : dict, optional
        Object-store options for ``db``.
    show_progress : bool, default True
        tqdm progress bars.

    Returns
    -------
    FinetuneResult
    """
    import torch
    from tqdm.auto import tqdm

    from .finetune_data import PassageMatrices, source_ratios
    from .finetune_output import save_checkpoint, write_report
    from .model import KaLMModel
    from .pair_metrics import check_metric_libraries, evaluate
    from .store import PassageStore

    # ---- validate everything before loading a model or touching the table
    if config is None:
        config = FinetuneConfig(ratios=None if ratios is None else tuple(ratios), epochs=epochs, lr=lr,
                                batch_size=batch_size, seed=seed)
    elif (ratios, epochs, lr, batch_size, seed) != (None, 1, 5e-5, 16, 0):
        raise ValueError("give the training options either as config= or as keywords, not both")
    for name, v in (("save_every", save_every), ("cache_mb", cache_mb)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if stop_after is not None and (isinstance(stop_after, bool) or not isinstance(stop_after, int) or stop_after < 1):
        raise ValueError(f"stop_after must be a positive int or None, got {stop_after!r}")
    check_metric_libraries()
    from ._deps import require

    require("matplotlib", "plot")
    out = Path(out)
    ckpt = _check_out(out, resume)
    train_pairs = read_pairs(train)
    eval_pairs = read_pairs(eval) if eval is not None else None

    # ---- model (float32 master weights) and table (its encoder must be this model's)
    kalm = KaLMModel.from_pretrained(model, device=device, dtype="float32")
    store = PassageStore.open(db, table, model=kalm, storage_options=storage_options)
    train_ratios = list(config.ratios) if config.ratios is not None else store.ratios
    asked = list(dict.fromkeys(p.id for p in train_pairs + (eval_pairs or []) if p.id is not None))
    stored = store.existing_ids(asked) if asked else set()  # reads only the asked ids, not the whole table
    check_ids(train_pairs, stored, train, table)
    if eval_pairs is not None:
        check_ids(eval_pairs, stored, eval, table)
        eval_source = str(eval)
    else:
        train_pairs, eval_pairs = split_groups(train_pairs, config.eval_fraction, config.seed)
        eval_source = f"held-out {config.eval_fraction:.0%} of the query groups of {train}"

    run_key = {"base_fingerprint": kalm.fingerprint, "encoder_fingerprint": kalm.encoder_fingerprint,
               "db": str(db), "table": table, "train": _file_digest(Path(train)),
               "eval": _file_digest(Path(eval)) if eval is not None else None,
               "config": asdict(config) | {"ratios": train_ratios}}
    source_ratios(store.ratios, train_ratios, table)  # refuse an underivable ratio before writing anything
    work = out / WORK_DIR
    work.mkdir(parents=True, exist_ok=True)
    source = PassageMatrices(store, kalm, train_ratios, train_pairs + eval_pairs, work / "texts",
                             cache_bytes=cache_mb << 20, show_progress=show_progress)

    steps_per_epoch = math.ceil(len(train_pairs) / config.batch_size)
    total = config.epochs * steps_per_epoch
    state: dict[str, Any] | None = None
    trainer_args = (kalm, source, train_ratios, config, total)
    if ckpt is None:
        before = evaluate(kalm, eval_pairs, source, train_ratios, distill_weight=config.distill_weight)
        kalm._decoder = None  # its fused weight copies go stale once training starts; score uses the same core
        trainer = Trainer(*trainer_args)
        step, history = 0, []
    else:
        kalm._decoder = None
        trainer = Trainer(*trainer_args)
        state = _load_state(ckpt, trainer)
        diffs = [k for k in run_key if state["run"].get(k) != run_key[k]]
        if state.get("version") != STATE_VERSION or diffs:
            raise ValueError(f"--out {str(out)!r} holds a run with other {diffs or ['state version']}: resume it with "
                             "the same model, table, pairs files and options, or choose another output folder")
        step, history, before = state["step"], state["history"], state["before"]

    bar = tqdm(total=total, initial=step, desc="finetune", unit="step", disable=not show_progress)
    done_now = 0
    try:
        while step < total:
            epoch, b = divmod(step, steps_per_epoch)
            order = np.random.default_rng([config.seed, epoch]).permutation(len(train_pairs))  # same on resume
            batch = [train_pairs[i] for i in order[b * config.batch_size:(b + 1) * config.batch_size]]
            losses = trainer.step(batch)
            step += 1
            done_now += 1
            history.append({"step": step, "epoch": epoch, "lr": trainer.scheduler.get_last_lr()[0],
                            "loss": {str(r): v for r, v in losses.items()}, "total": sum(losses.values())})
            bar.update(1)
            bar.set_postfix(loss=f"{history[-1]['total']:.4f}")
            stopping = stop_after is not None and done_now >= stop_after and step < total
            if stopping or (step % save_every == 0 and step < total):
                _save_state(work, trainer, {"version": STATE_VERSION, "step": step, "run": run_key,
                                            "history": history, "before": before})
            if stopping:
                return FinetuneResult(out=out, finished=False, step=step, total_steps=total, ratios=train_ratios,
                                      before=before, history=history)
    finally:
        bar.close()

    # ---- the output checkpoint, evaluated as users will load it
    save_checkpoint(kalm.folder, out, trainer.params)
    adapted = KaLMModel.from_pretrained(out, device=str(kalm.device), dtype="float32",
                                        max_length=kalm.max_length, query_max_length=kalm.query_max_length)
    if adapted.encoder_fingerprint != kalm.encoder_fingerprint:  # would mean a frozen tensor was written changed
        raise RuntimeError("the saved checkpoint's encoder differs from the base's; this is a kalm-store bug")
    after = evaluate(adapted, eval_pairs, source, train_ratios, distill_weight=config.distill_weight)
    report = {"base_model": kalm.name_or_path, "base_fingerprint": kalm.fingerprint,
              "fingerprint": adapted.fingerprint, "encoder_fingerprint": kalm.encoder_fingerprint,
              "db": str(db), "table": table, "ratios": train_ratios, "stored_ratios": store.ratios,
              "source_ratios": {str(r): s for r, s in source.sources.items()},
              "train_pairs": len(train_pairs), "eval_pairs": len(eval_pairs), "eval_source": eval_source,
              "config": asdict(config) | {"ratios": train_ratios}, "steps": step,
              "device": str(kalm.device), "dtype": "bfloat16 autocast" if kalm.device.type == "cuda" else "float32",
              "trained_tensors": len(trainer.params),
              "trained_parameters": int(sum(p.numel() for p in trainer.params.values())),
              "before": before, "after": after, "history": history}
    write_report(out, report)
    shutil.rmtree(work)
    return FinetuneResult(out=out, finished=True, step=step, total_steps=total, ratios=train_ratios,
                          before=before, after=after, history=history)


class _CallableModule(types.ModuleType):
    """``kalm_store.finetune(...)`` calls :func:`finetune` even after ``kalm_store.finetune`` (this module)
    was imported: importing a submodule binds its name on the package, shadowing the lazy function."""

    def __call__(self, *args: Any, **kwargs: Any) -> FinetuneResult:
        return finetune(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

__all__ = ["finetune", "FinetuneConfig", "FinetuneResult", "Trainer", "trainable_parameters", "training_margins"]
