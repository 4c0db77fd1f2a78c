"""Matryoshka Embedding Pooling (MEP): mean-pool encoder states by a ratio r.

``H^(r)[j] = mean(H[j*r : min((j+1)*r, n)])`` over the n valid tokens of a passage: groups of r
consecutive tokens from token 0, the last group averaging only its valid tokens, padding never inside
a mean. A coarser ratio is derived exactly from a finer one by a token-count-weighted mean of groups.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import torch

RATIOS: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
DEFAULT_RATIO = 4


def check_ratio(ratio: object, name: str = "ratio") -> int:
    """Return ``ratio`` as an int, or raise ``ValueError`` naming the allowed ratios."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, np.integer)) or int(ratio) not in RATIOS:
        raise ValueError(f"{name} must be one of {list(RATIOS)}, got {ratio!r}")
    return int(ratio)


def pooled_rows(n_tokens: int, ratio: int) -> int:
    """Rows of the pooled matrix of a passage of ``n_tokens`` tokens: ``ceil(n / r)``."""
    return math.ceil(n_tokens / ratio)


def group_sizes(n_tokens: int, ratio: int) -> np.ndarray:
    """Token count of each pooled row: ``r`` for all but the last, which holds the remainder."""
    rows = pooled_rows(n_tokens, ratio)
    sizes = np.full(rows, ratio, dtype=np.int64)
    if rows:
        sizes[-1] = n_tokens - ratio * (rows - 1)
    return sizes


def mep_pool(states: torch.Tensor, mask: torch.Tensor, ratio: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool a right-padded batch of encoder states by ``ratio``.

    Parameters
    ----------
    states : torch.Tensor
        ``(B, n, d)`` encoder states.
    mask : torch.Tensor
        ``(B, n)`` attention mask, 1 for valid tokens; valid tokens form a prefix (right padding).
    ratio : int
        One of :data:`RATIOS`.

    Returns
    -------
    tuple[torch.Tensor, torch.Tensor]
        ``(B, ceil(n/r), d)`` float32 pooled states and the ``(B, ceil(n/r))`` long count of tokens
        in each group (0 for groups made only of padding).
    """
    import torch

    ratio = check_ratio(ratio)
    b, n, d = states.shape
    rows = math.ceil(n / ratio)
    pad = rows * ratio - n
    weights = mask.to(torch.float32)  # (B, n)
    # where, not multiply: padded positions may hold non-finite values and NaN * 0 is NaN
    x = torch.where(mask.bool().unsqueeze(-1), states.to(torch.float32), 0.0)  # (B, n, d), padding zeroed
    if pad:
        x = torch.nn.functional.pad(x, (0, 0, 0, pad))  # (B, rows*r, d)
        weights = torch.nn.functional.pad(weights, (0, pad))  # (B, rows*r)
    sums = x.view(b, rows, ratio, d).sum(dim=2)  # (B, rows, d)
    counts = weights.view(b, rows, ratio).sum(dim=2)  # (B, rows)
    pooled = sums / counts.clamp(min=1.0).unsqueeze(-1)  # (B, rows, d)
    return pooled, counts.to(torch.long)


def repool(matrix: np.ndarray, n_tokens: int, from_ratio: int, to_ratio: int) -> np.ndarray:
    """Derive the ``to_ratio`` matrix of one passage from its stored ``from_ratio`` matrix.

    Exact up to float16 rounding: each coarse row is the mean of ``to/from`` consecutive fine rows,
    weighted by how many tokens each fine row averaged (only the last row can hold fewer than r).

    Parameters
    ----------
    matrix : numpy.ndarray
        ``(ceil(n/from_ratio), d)`` pooled matrix.
    n_tokens : int
        Valid tokens of the passage (after truncation).
    from_ratio, to_ratio : int
        Source and target ratios; ``to_ratio`` must be a multiple of ``from_ratio``.

    Returns
    -------
    numpy.ndarray
        ``(ceil(n/to_ratio), d)`` matrix in the dtype of ``matrix``.
    """
    from_ratio = check_ratio(from_ratio, "from_ratio")
    to_ratio = check_ratio(to_ratio, "to_ratio")
    if to_ratio < from_ratio or to_ratio % from_ratio:
        raise ValueError(
            f"cannot re-pool from r={from_ratio} to r={to_ratio}: the target must be a multiple of the "
            "source (a finer ratio can never be recovered from a coarser one; re-encode instead)"
        )
    rows = pooled_rows(n_tokens, from_ratio)
    if matrix.ndim != 2 or matrix.shape[0] != rows:
        raise ValueError(
            f"matrix has shape {matrix.shape}, expected ({rows}, d) for {n_tokens} tokens at r={from_ratio}"
        )
    k = to_ratio // from_ratio
    d = matrix.shape[1]
    out_rows = pooled_rows(n_tokens, to_ratio)
    sizes = group_sizes(n_tokens, from_ratio).astype(np.float32)  # (rows,)
    x = matrix.astype(np.float32) * sizes[:, None]  # (rows, d) token sums
    pad = out_rows * k - rows
    if pad:
        x = np.concatenate([x, np.zeros((pad, d), np.float32)])  # (out_rows*k, d)
        sizes = np.concatenate([sizes, np.zeros(pad, np.float32)])
    sums = x.reshape(out_rows, k, d).sum(axis=1)  # (out_rows, d)
    counts = sizes.reshape(out_rows, k).sum(axis=1)  # (out_rows,)
    return (sums / counts[:, None]).astype(matrix.dtype)
