"""The compute-dtype choice shared by ``build``, ``search``, ``plan`` (and ``serve``): float32, bfloat16 or auto.

Storage is float16 whatever the compute dtype (matrices are upcast before the decoder), so a table
built in one compute dtype is scored in another without conversion. ``auto`` picks bfloat16 on CUDA
and on CPUs whose bf16 matmul, timed on the decoder's shapes, beats float32; float32 otherwise. The
probe runs once per process (torch only, about a tenth of a second) and its result is cached.

Importing this module loads no torch: ``--help`` stays cheap.
"""

from __future__ import annotations

import argparse
import time
from functools import lru_cache
from typing import Literal

DtypeChoice = Literal["float32", "bfloat16", "auto"]
ComputeDtype = Literal["float32", "bfloat16"]
CHOICES: tuple[str, ...] = ("float32", "bfloat16", "auto")

# The Nano decoder's MLP matmul, (rows x d) @ (d x F): the shape most of its FLOPs go through
# (bench_scoring.NANO: d = 640, F = 2048); 256 rows keep one product near 0.7 GFLOP: the whole probe
# (warm-up and 3 timed products per dtype) took 0.4-0.9 s on this shared 2-core host.
PROBE_SHAPE = (256, 640, 2048)
PROBE_REPEATS = 3  # best of 3 after one warm-up: the host is shared, the minimum is the least noisy
# bf16 must win by this factor: a tie (no native bf16, emulated by upcasting) is not worth its precision
PROBE_MARGIN = 1.10


def add_dtype_argument(parser: argparse.ArgumentParser, what: str = "model") -> None:
    """Add ``--dtype float32|bfloat16|auto`` (default: None, the released default) to a sub-command."""
    parser.add_argument(
        "--dtype", default=None, choices=CHOICES,
        help=f"{what} compute dtype; auto: bfloat16 on CUDA and on CPUs whose bf16 matmul measures faster "
             "than float32 (a short probe), else float32. Stored matrices are float16 either way "
             "(default: bfloat16 on CUDA, float32 on CPU)")


def _matmul_seconds(dtype_name: str) -> float:
    """Best-of-``PROBE_REPEATS`` seconds of one decoder-shaped matmul in ``dtype_name`` on the CPU."""
    import torch

    dt = getattr(torch, dtype_name)
    m, k, n = PROBE_SHAPE
    g = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=g).to(dt)  # (rows, d)
    b = torch.randn(k, n, generator=g).to(dt)  # (d, F)
    a @ b  # warm-up: oneDNN picks and caches its kernel here
    best = float("inf")
    for _ in range(PROBE_REPEATS):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return best


@lru_cache(maxsize=1)
def cpu_bf16_speedup() -> float:
    """float32 / bfloat16 time of the decoder-shaped matmul on this CPU (> 1: bf16 is faster); cached."""
    f32 = _matmul_seconds("float32")
    bf16 = _matmul_seconds("bfloat16")
    return f32 / max(bf16, 1e-12)


def resolve_dtype(choice: str | None, device: str | None = None) -> ComputeDtype | None:
    """The compute dtype for ``--dtype choice`` on ``device``, for ``KaLMModel.from_pretrained(dtype=...)``.

    Parameters
    ----------
    choice : {"float32", "bfloat16", "auto"} or None
        ``None`` returns ``None``: from_pretrained's default (bfloat16 on CUDA, float32 on CPU).
    device : str, optional
        The model's device; ``None`` means CUDA when torch sees one, else the CPU (as from_pretrained).

    Returns
    -------
    "float32", "bfloat16" or None

    Examples
    --------
    >>> resolve_dtype("float32", "cpu")
    'float32'
    """
    if choice is None or choice in ("float32", "bfloat16"):
        return choice  # type: ignore[return-value]
    if choice != "auto":
        raise ValueError(f"--dtype must be one of {list(CHOICES)}, got {choice!r}")
    import torch

    on_cuda = torch.cuda.is_available() if device is None else str(device).startswith("cuda")
    if on_cuda:
        return "bfloat16"
    return "bfloat16" if cpu_bf16_speedup() >= PROBE_MARGIN else "float32"


def dtype_name(dtype: object) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the name tables record)."""
    return str(dtype).removeprefix("torch.")


def record_compute_dtype(table: object, compute_dtype: str) -> list[str]:
    """Add ``compute_dtype`` to the table's ``compute_dtypes`` metadata before more rows are encoded into it.

    A table of an older kalm-store has no such key: its rows' dtype is unknown, so ``"unknown"`` is
    recorded beside the new one rather than claiming the old rows for it. One metadata commit, only when
    the dtype is new (a plain resume in the same dtype commits nothing). Two builds resuming one table
    in two new dtypes at the same moment can each write their list; the later one wins (read-modify-write
    of one metadata key, as ``repool``'s ratios).

    Returns
    -------
    list of str
        The dtypes recorded afterwards.
    """
    from . import schema

    current = schema.decode_metadata(table.schema.metadata).get("compute_dtypes")  # type: ignore[attr-defined]
    recorded = ["unknown"] if current is None else list(current)
    if compute_dtype in recorded and current is not None:
        return recorded
    recorded = sorted(set(recorded) | {compute_dtype})
    table.to_lance().update_schema_metadata(  # type: ignore[attr-defined]
        schema.encode_metadata({"compute_dtypes": recorded}))
    table.checkout_latest()  # type: ignore[attr-defined]
    return recorded


def torch_dtype(name: str) -> object:
    """``"bfloat16"`` -> ``torch.bfloat16``."""
    import torch

    return getattr(torch, name)
