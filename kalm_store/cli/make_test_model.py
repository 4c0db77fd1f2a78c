"""``kalm-store make-test-model DIR``: write the tiny offline T5Gemma2 checkpoint."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction, name: str) -> None:
    p = sub.add_parser(
        name,
        help="write a tiny random-weight KaLM-compatible checkpoint (for tests and offline demos)",
        description="Write a tiny random-weight T5Gemma2 checkpoint (safetensors) and a tokenizer with "
                    "Gemma's special tokens to DIR. It loads like a real KaLM checkpoint; its scores "
                    "mean nothing.",
    )
    p.add_argument("dir", help="output folder (created if missing)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the weights (default: 0)")
    p.add_argument("--hidden-size", type=int, default=64, help="stored token width d (default: 64)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from kalm_store.testing import TinyShape, make_test_model

    if args.hidden_size < 8 or args.hidden_size % 4:
        raise ValueError(f"--hidden-size must be a multiple of 4 and >= 8, got {args.hidden_size}")
    folder = make_test_model(args.dir, TinyShape(seed=args.seed, hidden_size=args.hidden_size))
    print(f"wrote a tiny random KaLM-compatible checkpoint to {folder}")
    return 0
