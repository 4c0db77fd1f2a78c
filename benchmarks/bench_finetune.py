"""Fine-tuning benchmark: training pairs/s from the store vs a joint fine-tune that re-encodes every step.

One run, one model, one set of pairs, the methods interleaved step by step (so load from other users of
the machine hits them alike):

1. ``store``: ``kalm-store finetune``'s own step (:class:`kalm_store.finetune.Trainer`): each step reads
   the batch's stored matrices from LanceDB (cache off, so every step reads and decodes), decoder
   forward + backward, AdamW step. The encoder never runs.
2. ``joint, encoder frozen``: the same trainer and decoder step, but every passage is tokenized and run
   through the encoder again each step (no gradients into it): what a trainer without a store pays.
3. ``joint, encoder trained``: the usual cross-encoder fine-tune: encoder + decoder forward with
   gradients through both, backward, AdamW over all non-embedding weights.

Memory per batch: the bytes of the activations autograd saves for backward in one step (each tensor once,
weights left out: the device-independent part that grows with the batch), plus peak CUDA memory on a GPU.

Usage: python benchmarks/bench_finetune.py [--passages 96] [--steps 8] [--batch-size 8] [--out benchmarks/results]
``--quick`` runs the tiny test model for a few steps (the smoke run in the tests).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_build import corpus, nano_width_model  # noqa: E402


class SavedBytes:
    """Bytes of the activations autograd saves for backward inside the context: each saved tensor counted
    once (by storage), weights left out (they are not per-batch memory)."""

    def __init__(self, params=()):
        self.weights = {p.untyped_storage().data_ptr() for p in params}

    def __enter__(self):
        import torch

        self.bytes = 0
        seen = set()

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in self.weights and ptr not in seen:
                seen.add(ptr)
                self.bytes += t.untyped_storage().nbytes()
            return t

        self._ctx = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


class ReEncode:
    """A matrix source that runs the frozen encoder on every passage of every batch (no store)."""

    def __init__(self, model, texts: dict[str, str]):
        self.model, self.texts = model, texts
        self.encoded_tokens = 0

    def get(self, pairs, ratio):
        enc = self.model.encode_ratios([self.texts[p.id] for p in pairs], [ratio], batch_size=len(pairs),
                                       storage_dtype="float32")
        self.encoded_tokens += sum(enc.token_counts)
        return enc.matrices[ratio]


class JointTrainer:
    """Encoder + decoder trained together; the passage is encoded with gradients each step."""

    def __init__(self, model, texts: dict[str, str], ratio: int, lr: float):
        import torch

        self.model, self.texts, self.ratio = model, texts, ratio
        emb = {id(model.hf_model.get_input_embeddings().weight)}
        self.params = [p for p in model.hf_model.parameters() if id(p) not in emb]
        for p in model.hf_model.parameters():
            p.requires_grad_(id(p) not in emb)
        self.optimizer = torch.optim.AdamW(self.params, lr=lr)

    def step(self, pairs) -> float:
        import torch

        from kalm_store.losses import pair_loss
        from kalm_store.pooling import mep_pool

        m = self.model
        ids = m.tokenize_passages([self.texts[p.id] for p in pairs])
        n = max(len(x) for x in ids)
        input_ids = torch.zeros((len(ids), n), dtype=torch.long)  # (B, n)
        mask = torch.zeros((len(ids), n), dtype=torch.long)  # (B, n)
        for row, x in enumerate(ids):
            input_ids[row, : len(x)], mask[row, : len(x)] = torch.tensor(x), 1
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(m.device.type, dtype=torch.bfloat16, enabled=m.device.type == "cuda"):
            states = m.hf_model.get_encoder()(input_ids=input_ids.to(m.device),
                                              attention_mask=mask.to(m.device)).last_hidden_state  # (B, n, d)
            pooled, counts = mep_pool(states, mask.to(m.device), self.ratio)  # (B, ceil(n/r), d)
            prompts = [m.prompt_ids(p.query) for p in pairs]
            lengths = [len(x) for x in prompts]
            pid = torch.zeros((len(prompts), max(lengths)), dtype=torch.long)  # (B, L)
            for row, x in enumerate(prompts):
                pid[row, : len(x)] = torch.tensor(x)
            margin = m._margins_transformers(pid.to(m.device), pooled, (counts > 0).long(),
                                             last=torch.tensor(lengths, device=m.device) - 1)  # (B,)
        dev = m.device
        label = torch.tensor([float(p.label) for p in pairs], device=dev)
        ones = torch.ones(len(pairs), dtype=torch.bool, device=dev)
        loss = pair_loss(margin, label, ones, label, ~ones)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        return float(loss.detach())


def make_pairs(texts: list[str], n: int, seed: int):
    from kalm_store.pairs import Pair

    rng = random.Random(seed)
    out = []
    for i in range(n):
        j = rng.randrange(len(texts))
        words = texts[rng.randrange(len(texts)) if i % 2 else j].split()
        q = " ".join(words[:8])
        out.append(Pair(line=i + 1, query=q, instruction=None, id=f"d{j}", text=None, label=i % 2 ^ 1, score=None))
    return out


def timed(fn, device, params) -> tuple[float, int, int]:
    """(seconds, activation bytes saved for backward, peak CUDA bytes) of one training step."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with SavedBytes(params) as saved:
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    return dt, saved.bytes, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--passages", type=int, default=96, help="passages in the store (default: 96)")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per method, after one warm-up (default: 8)")
    ap.add_argument("--batch-size", type=int, default=8, help="pairs per step (default: 8)")
    ap.add_argument("--ratio", type=int, default=4, help="trained ratio (default: 4)")
    ap.add_argument("--max-length", type=int, default=512, help="encoder tokens per passage (default: 512)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--quick", action="store_true", help="tiny test model, 2 steps (smoke run)")
    ap.add_argument("--out", default="benchmarks/results", help="results folder (default: benchmarks/results)")
    ap.add_argument("--name", default=None, help="results file name without suffix (default: finetune_<device>)")
    args = ap.parse_args()
    import torch

    from kalm_store import KaLMModel
    from kalm_store.finetune import FinetuneConfig, Trainer
    from kalm_store.finetune_data import PassageMatrices
    from kalm_store.store import PassageStore
    from kalm_store.testing import make_test_model

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.passages, args.steps, args.batch_size = min(args.passages, 8), 2, 4
    work = Path(tempfile.mkdtemp(prefix="bench_finetune_"))
    folder = make_test_model(work / "model") if args.quick else nano_width_model(work / "model")
    load = dict(device=args.device, dtype="float32", max_length=args.max_length)
    model = KaLMModel.from_pretrained(folder, **load)
    joint_model = KaLMModel.from_pretrained(folder, **load)
    texts = corpus(args.passages)
    by_id = {f"d{i}": t for i, t in enumerate(texts)}
    store = PassageStore.create(str(work / "db"), "docs", model, ratios=[args.ratio])
    store.add([{"id": k, "text": v} for k, v in by_id.items()], batch_size=16)
    store.update_indices(fts=False)  # the id index a built table has
    pairs = make_pairs(texts, (args.steps + 1) * args.batch_size, seed=0)
    tokens = [len(x) for x in model.tokenize_passages(texts)]

    config = FinetuneConfig(ratios=(args.ratio,), lr=1e-5, batch_size=args.batch_size)
    total = args.steps + 1
    source = PassageMatrices(store, model, [args.ratio], pairs, work / "texts", cache_bytes=1)  # cache off
    model._decoder = None
    store_trainer = Trainer(model, source, [args.ratio], config, total)
    re_encode = ReEncode(model, by_id)
    frozen_trainer = Trainer(model, re_encode, [args.ratio], config, total)
    joint = JointTrainer(joint_model, by_id, args.ratio, lr=1e-5)
    methods = {"store": lambda b: store_trainer.step(b), "joint, encoder frozen": lambda b: frozen_trainer.step(b),
               "joint, encoder trained": lambda b: joint.step(b)}
    weights = list(model.hf_model.parameters()) + list(joint_model.hf_model.parameters())
    times: dict[str, list[float]] = {k: [] for k in methods}
    saved: dict[str, int] = {}
    peaks: dict[str, int] = {}
    for s in range(total):
        batch = pairs[s * args.batch_size:(s + 1) * args.batch_size]
        for name, fn in methods.items():  # interleaved: the same batch, the same machine load
            dt, nbytes, peak = timed(lambda: fn(batch), model.device, weights)
            if s:  # step 0 is the warm-up
                times[name].append(dt)
            saved[name], peaks[name] = max(saved.get(name, 0), nbytes), max(peaks.get(name, 0), peak)
    results = []
    for name in methods:
        med = statistics.median(times[name])
        results.append({"method": name, "median_step_s": med, "pairs_per_s": args.batch_size / med,
                        "step_s": times[name], "saved_for_backward_bytes": saved[name],
                        "peak_cuda_bytes": peaks[name] or None})
    base = results[0]["pairs_per_s"]
    for row in results:
        row["store_speedup"] = base / row["pairs_per_s"]
    command = "python benchmarks/bench_finetune.py " + shlex.join(sys.argv[1:])
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
               "torch_threads": torch.get_num_threads(), "device": str(model.device),
               "load_average": os.getloadavg(), "shared": "~8 engineers share this 2-core machine" if not args.quick
               and model.device.type == "cpu" else None}
    res = {"benchmark": "bench_finetune", "command": command, "machine": machine,
           "model": {"shape": "tiny test model" if args.quick else "nano-width random, 3 layers/stack",
                     "dim": model.dim, "max_length": args.max_length},
           "passages": len(texts), "mean_tokens": float(np.mean(tokens)), "ratio": args.ratio,
           "batch_size": args.batch_size, "steps": args.steps, "store_rows_fetched": source.rows_fetched,
           "results": results}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = args.name or f"finetune_{model.device.type}"
    (out / f"{name}.json").write_text(json.dumps(res, indent=2))
    lines = ["# Fine-tuning from the store vs a joint fine-tune", "",
             f"Command: `{command}`  ",
             f"Machine: {machine['platform']}, {machine['cpus']} CPUs, torch {machine['torch']} "
             f"({machine['torch_threads']} threads), {machine['device']}; load average at the end "
             f"{', '.join(f'{x:.1f}' for x in machine['load_average'])}"
             + (" (the machine is shared by ~8 engineers: absolute numbers move with their load; the methods ran "
                "interleaved step by step, so the ratios are the measurement)." if machine["shared"] else "."),
             f"Model: {res['model']['shape']}, d = {model.dim}; {len(texts)} passages of {res['mean_tokens']:.0f} "
             f"tokens on average (max_length {args.max_length}), r = {args.ratio}, batch {args.batch_size} pairs, "
             f"median of {args.steps} steps after one warm-up.", "",
             "| method | pairs/s | median step s | store speed-up | activations saved for backward per batch MiB | peak CUDA MiB |",
             "|---|---|---|---|---|---|"]
    for row in results:
        peak = "-" if row["peak_cuda_bytes"] is None else f"{row['peak_cuda_bytes'] / 2**20:.0f}"
        lines.append(f"| {row['method']} | {row['pairs_per_s']:.2f} | {row['median_step_s']:.3f} | "
                     f"{row['store_speedup']:.2f}x | {row['saved_for_backward_bytes'] / 2**20:.1f} | {peak} |")
    lines += ["", "`store`: kalm-store finetune's step, reading every batch's matrices from LanceDB (cache off). "
              "`joint, encoder frozen`: the same step with every passage re-encoded (no gradient). "
              "`joint, encoder trained`: gradients through encoder and decoder (a usual cross-encoder fine-tune). "
              "Store speed-up = store pairs/s / method pairs/s.", ""]
    (out / f"{name}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
