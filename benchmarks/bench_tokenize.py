"""Cost of one huge passage before and after tokenization was bounded by max_length (issue 14 item 7).

Run:  .venv/bin/python benchmarks/bench_tokenize.py [--mb 10.8] [--max-length 1024]
Writes benchmarks/results/tokenize_bound.md and .json.

For each tokenizer, two fresh subprocesses tokenize the same ``<Document>: `` + 10.8 MB passage cut at
max_length: "before" is the call kalm-store made until now (``tokenizer(texts, truncation=True,
max_length=...)``, which reads the whole text), "after" is :func:`kalm_store.truncation.token_ids`.
Each reports wall time and the peak RSS it added over its own baseline (after imports and loading the
tokenizer), and the ids are compared. Tokenizers: the offline test tokenizer (byte-level BPE with a
word pre-tokenizer) and a Gemma-like BPE (spaces as '▁', no pre-tokenizer, byte fallback; trained here),
the structure of KaLM's real Gemma-3 tokenizer, which is not available offline.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_CHILD = r"""
import hashlib, json, resource, sys, time
kind, mode, mb, max_length, folder = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
from transformers import AutoTokenizer, PreTrainedTokenizerFast
if kind == "tiny":
    tok = AutoTokenizer.from_pretrained(folder)
else:
    from tokenizers import Tokenizer, models, normalizers, trainers
    words = ("the quick brown fox jumps over lazy dog parse json file return value error empty container "
             "vector databases store embeddings next to text a reranker scores each candidate").split()
    t = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    t.normalizer = normalizers.Replace(" ", "\u2581")
    t.train_from_iterator([" ".join(words[i:] + words[:i]) for i in range(len(words))] * 5,
                          trainers.BpeTrainer(vocab_size=800, show_progress=False,
                                              special_tokens=["<unk>"] + [f"<0x{b:02X}>" for b in range(256)]))
    tok = PreTrainedTokenizerFast(tokenizer_object=t)
from kalm_store.truncation import token_ids
unit = "Vector databases store embeddings next to text; a reranker scores each candidate against the query. "
text = "<Document>: " + unit * int(mb * 1e6 / len(unit))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
if mode == "before":
    ids = list(tok([text], add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"][0])
else:
    ids = token_ids(tok, [text], max_length)[0]
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": seconds, "added_peak_rss_mb": (peak - base) / 1024, "chars": len(text),
                  "n_ids": len(ids), "ids_sha": hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16]}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=10.8, help="passage size in MB of text (default: 10.8)")
    ap.add_argument("--max-length", type=int, default=1024, help="tokens kept (default: 1024)")
    args = ap.parse_args()
    import tempfile

    from kalm_store.testing import make_test_model

    folder = make_test_model(Path(tempfile.mkdtemp(prefix="kalm-tokenize-")) / "tiny")
    rows = []
    for kind in ("tiny", "gemma-like"):
        got = {}
        for mode in ("before", "after"):
            out = subprocess.run([sys.executable, "-c", _CHILD, kind, mode, str(args.mb), str(args.max_length),
                                  str(folder)], capture_output=True, text=True, check=True, cwd=ROOT)
            got[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append({"tokenizer": kind, **{f"{m}_{k}": v for m, r in got.items() for k, v in r.items()},
                     "same_ids": got["before"]["ids_sha"] == got["after"]["ids_sha"]})
        print(rows[-1], flush=True)
    cmd = "python benchmarks/bench_tokenize.py " + " ".join(sys.argv[1:])
    meta = {"command": cmd.strip(), "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, shared "
            "with other engineers' jobs (2 cores)", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "mb": args.mb, "max_length": args.max_length}
    results = ROOT / "benchmarks" / "results"
    (results / "tokenize_bound.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [f"# One {args.mb} MB passage cut at {args.max_length} tokens: tokenization before / after the bound",
             "", f"Command: `{meta['command']}`  ", f"Run on {meta['date']}; {meta['machine']}.", "",
             "| tokenizer | before: s | before: added peak RSS MB | after: s | after: added peak RSS MB | same ids |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['tokenizer']} | {r['before_seconds']:.2f} | {r['before_added_peak_rss_mb']:.0f} | "
                     f"{r['after_seconds']:.4f} | {r['after_added_peak_rss_mb']:.0f} | {r['same_ids']} |")
    (results / "tokenize_bound.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
