"""Update benchmark: what ``kalm-store build --update`` costs against building the corpus again.

One run, one table of stdlib-docstring passages (as in ``bench_build.py``):

1. a fresh build of all passages (the reference);
2. re-running it unchanged, without and with ``--update`` (an id scan; plus one read of the stored
   texts per chunk);
3. ``--update`` after changing the text of 5% and 25% of the passages (chosen at random): only those
   are encoded, and they replace their rows in merge-insert commits.

Times are the builder's own encode+write time (``BuildSummary.work_seconds``: model loading and the
index update after the last commit are reported apart). After each update the table is checked: one
row per id, the edited texts stored, and each edited row's matrix equal to the passage encoded alone.

Usage: python benchmarks/bench_update.py [--passages 400] [--fractions 0.05 0.25] [--out benchmarks/results]
``--quick`` runs 40 passages on the tiny test model (the smoke run in the tests).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_build import corpus, nano_width_model  # noqa: E402


def run_build(inp: Path, db: Path, model, update: bool, chunk: int, batch: int) -> dict:
    from kalm_store.build import BuildOptions, build

    opts = BuildOptions(str(inp), db=str(db), table="docs", model=str(model.folder), ratios=[4], chunk_size=chunk,
                        batch_size=batch, progress=False, update=update)
    s = build(opts, model=model)
    return {"work_seconds": s.work_seconds, "index_seconds": s.index_seconds, "written": s.written,
            "updated": s.updated, "already_stored": s.already_stored, "commits": s.commits, "rows": s.rows}


def write_corpus(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    return path


def check_table(db: Path, model, texts: list[str], edited: list[int]) -> float:
    """One row per id with the current texts; returns the largest |difference| of an edited row's
    matrix from that passage encoded alone (float16 steps of batch-shape rounding, not errors)."""
    from kalm_store.store import PassageStore

    store = PassageStore.open(str(db), "docs")
    rows = store.table.to_arrow()
    stored = dict(zip(rows.column("id").to_pylist(), rows.column("text").to_pylist()))
    assert rows.num_rows == len(stored) == len(texts), "one row per id"
    assert all(stored[f"d{i}"] == t for i, t in enumerate(texts)), "the stored texts are the input's"
    ids = [f"d{i}" for i in edited]
    got = store.matrices(ids, 4)
    want = model.encode([texts[i] for i in edited], ratio=4, batch_size=1)
    return max(float(np.abs(g.astype(np.float32) - w.astype(np.float32)).max()) for g, w in zip(got, want))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--passages", type=int, default=400, help="corpus size (default: 400)")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.05, 0.25],
                    help="fractions of passages edited before each --update run (default: 0.05 0.25)")
    ap.add_argument("--chunk-size", type=int, default=128, help="records per commit (default: 128)")
    ap.add_argument("--batch-size", type=int, default=16, help="encoder batch (default: 16)")
    ap.add_argument("--quick", action="store_true", help="40 passages on the tiny test model (smoke run)")
    ap.add_argument("--out", default="benchmarks/results", help="results folder (default: benchmarks/results)")
    args = ap.parse_args()
    command = "python benchmarks/bench_update.py" + "".join(f" {shlex.quote(a)}" for a in sys.argv[1:])

    import torch
    from transformers.utils import logging as hf_logging

    from kalm_store import KaLMModel
    from kalm_store.testing import make_test_model

    hf_logging.disable_progress_bar()
    work = Path(tempfile.mkdtemp(prefix="kalm-bench-update-"))
    n = 40 if args.quick else args.passages
    folder = make_test_model(work / "tiny") if args.quick else nano_width_model(work / "nano-width")
    model = KaLMModel.from_pretrained(folder, device="cpu")
    texts = corpus(n)
    inp, db = work / "corpus.jsonl", work / "db"
    b = (args.chunk_size, args.batch_size)

    rows = [dict(step="fresh build", changed=0, **run_build(write_corpus(inp, texts), db, model, False, *b))]
    rows.append(dict(step="re-run, unchanged", changed=0, **run_build(inp, db, model, False, *b)))
    rows.append(dict(step="re-run --update, unchanged", changed=0, **run_build(inp, db, model, True, *b)))
    rng = random.Random(0)
    max_diff = 0.0
    for f in args.fractions:
        edited = sorted(rng.sample(range(n), max(1, round(f * n))))
        for i in edited:
            texts[i] = f"{texts[i]} (revised for the {f:.0%} update)"
        res = run_build(write_corpus(inp, texts), db, model, True, *b)
        assert (res["updated"], res["written"], res["rows"]) == (len(edited), len(edited), n), res
        max_diff = max(max_diff, check_table(db, model, texts, edited))
        rows.append(dict(step=f"--update, {f:.0%} of texts changed", changed=len(edited), **res))
    full = rows[0]["work_seconds"]
    for r in rows:
        r["vs_fresh_build"] = r["work_seconds"] / full

    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
               "torch_threads": torch.get_num_threads()}
    result = {"benchmark": "bench_update", "command": command, "machine": machine, "passages": n,
              "model": {"dim": model.dim,
                        "shape": "tiny test model" if args.quick else "nano-width random, 3 layers/stack"},
              "rows": rows, "max_abs_diff_edited_vs_encoded_alone": max_diff}
    md = [f"# `kalm-store build --update` vs a fresh build\n", f"Command: `{command}`  ",
          f"Machine: {machine['platform']}, {machine['cpus']} CPUs, torch {machine['torch']} "
          f"({machine['torch_threads']} threads); model d = {model.dim} ({result['model']['shape']}); "
          f"{n} stdlib passages, r = 4, chunks of {args.chunk_size}. One run: single runs vary by about 10% "
          "on a shared box.\n",
          "| step | texts changed | rows written | encode+write s | vs fresh build | index update s |",
          "|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['step']} | {r['changed']} | {r['written']} | {r['work_seconds']:.2f} | "
                  f"{r['vs_fresh_build']:.3f} | {r['index_seconds']:.2f} |")
    md.append(f"\nChecked after each update: one row per id, the edited texts stored, and every edited row's "
              f"matrix within {max_diff:.2g} of the passage encoded alone (float16 rounding of other batch shapes).")
    text = "\n".join(md) + "\n"
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "update_quick" if args.quick else "update"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    (out / f"{stem}.md").write_text(text)
    print(f"wrote {out / stem}.md and .json")


if __name__ == "__main__":
    main()
