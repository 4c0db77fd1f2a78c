"""``kalm-store finetune --db DB --table T --model M --train pairs.jsonl --out DIR``: adapt the decoder from the store."""

from __future__ import annotations

import argparse
import json
import sys

_EPILOG = """\
Input: one JSON object per line,
  {"query": "...", "id": "p7", "label": 1}              a stored passage, hard label (0 or 1)
  {"query": "...", "text": "a new passage", "score": 0.83, "instruction": "..."}
"id" names a row of --table; "text" brings a passage that is not in it (encoded once by the frozen
encoder). "label" trains with the yes/no cross-entropy (paper Eq. 6), "score" (a teacher's P(yes) in
[0, 1]) with distillation (Eq. 10); a line may carry both. The loss is summed over --ratios (Eq. 9);
a ratio the table does not store is re-pooled exactly from a stored one it is a multiple of. A bad line
(label outside {0, 1}, score outside [0, 1], an id not in the table, bad JSON) or an empty file stops
the run before training, naming the line.

What trains: the decoder's own weights. The encoder and the token embedding it shares with the
decoder and the output head stay bitwise unchanged, so the table stays valid: the output checkpoint
records the same encoder fingerprint and scores the table (KaLMReranker, kalm-store search) with no
re-encoding. Compute: CUDA with bfloat16 autocast (float32 weights) when available, else CPU float32.

Output (--out, a new or empty folder): a normal checkpoint (config, safetensors, tokenizer) that
KaLMModel.from_pretrained loads, finetune_report.json / .md (loss, ROC-AUC and nDCG@10 per ratio,
before and after, on --eval or on a held-out fraction of the query groups) and loss.png.

Resume: checkpoints go to DIR/.finetune every --save-every steps (and at --stop-after); run the same
command with --resume to continue from the last one, with the same batches and schedule.

Example:
  kalm-store finetune --db ./db --table docs --model ./KaLM-Reranker-V1-Nano \\
      --train train.jsonl --eval dev.jsonl --out ./adapted --ratios 4,8 --epochs 2
"""


def _ratios(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ratios must be comma-separated ints such as 4,8, got {text!r}") from None


def register(sub: argparse._SubParsersAction, name: str) -> None:
    p = sub.add_parser(
        name,
        help="fine-tune the decoder on your (query, passage, label) pairs from the stored matrices",
        description="Train the decoder of a KaLM checkpoint on labelled or teacher-scored pairs, reading the "
                    "passages' pooled encoder matrices from a kalm-store table: no encoder pass per step, and the "
                    "table stays valid for the adapted model.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--db", required=True, help="LanceDB URI of the store")
    p.add_argument("--table", required=True, help="table name (built by --model's encoder)")
    p.add_argument("--model", required=True, help="base checkpoint folder or hub id")
    p.add_argument("--train", required=True, help="training pairs (JSON lines, see below)")
    p.add_argument("--out", required=True, help="output folder for the fine-tuned checkpoint and report")
    p.add_argument("--eval", default=None, help="evaluation pairs (default: hold out --eval-fraction of the "
                                                "query groups of --train)")
    p.add_argument("--ratios", type=_ratios, default=None,
                   help="trained ratios, comma-separated (default: the table's stored ratios)")
    p.add_argument("--epochs", type=int, default=1, help="passes over the training pairs (default: 1)")
    p.add_argument("--lr", type=float, default=5e-5, help="peak AdamW learning rate (default: 5e-5)")
    p.add_argument("--batch-size", type=int, default=16, help="pairs per optimizer step (default: 16)")
    p.add_argument("--seed", type=int, default=0, help="shuffling and held-out split seed (default: 0)")
    p.add_argument("--warmup-fraction", type=float, default=0.1,
                   help="linear warm-up over this fraction of the steps, then linear decay (default: 0.1)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default: 0)")
    p.add_argument("--distill-weight", type=float, default=1.0,
                   help="weight of the distillation loss for pairs with a score (default: 1)")
    p.add_argument("--eval-fraction", type=float, default=0.2,
                   help="query groups held out when --eval is not given (default: 0.2)")
    p.add_argument("--resume", action="store_true", help="continue the unfinished run in --out")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop after this many steps with a checkpoint (resume later); the schedule is the full run's")
    p.add_argument("--save-every", type=int, default=200, help="steps between checkpoints (default: 200)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: CUDA when available)")
    p.add_argument("--cache-mb", type=int, default=256,
                   help="in-memory cache of store matrices, MiB (default: 256)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    from kalm_store.storage import add_storage_arguments  # --storage-option KEY=VALUE for --db s3://...

    add_storage_arguments(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from kalm_store.finetune import FinetuneConfig, finetune
    from kalm_store.storage import options_from_args

    config = FinetuneConfig(ratios=args.ratios, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                            seed=args.seed, warmup_fraction=args.warmup_fraction, weight_decay=args.weight_decay,
                            distill_weight=args.distill_weight, eval_fraction=args.eval_fraction)
    result = finetune(args.db, args.table, args.model, args.train, args.out, eval=args.eval, config=config,
                      resume=args.resume, stop_after=args.stop_after, save_every=args.save_every,
                      device=args.device, cache_mb=args.cache_mb, storage_options=options_from_args(args),
                      show_progress=not args.no_progress)
    summary = {"out": str(result.out), "finished": result.finished, "step": result.step,
               "total_steps": result.total_steps, "ratios": result.ratios, "before": result.before,
               "after": result.after}
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    if not result.finished:
        print(f"stopped at step {result.step} of {result.total_steps}; continue with the same command and --resume")
        return 0
    print(f"fine-tuned checkpoint in {result.out} ({result.step} steps); report: {result.out / 'finetune_report.md'}")
    for r in result.ratios:
        b, a = result.before[str(r)], result.after[str(r)]  # type: ignore[index]
        print(f"r={r}: loss {b['loss']:.4f} -> {a['loss']:.4f}, ROC-AUC {_f(b['roc_auc'])} -> {_f(a['roc_auc'])}, "
              f"nDCG@10 {_f(b['ndcg@10'])} -> {_f(a['ndcg@10'])}", file=sys.stdout)
    return 0


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"
