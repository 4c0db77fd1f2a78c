"""The paper's training losses, on the decoder's yes/no margin ``z_yes - z_no``.

* Eq. 6: cross-entropy of the two-way softmax over the ``[yes, no]`` logits at the last prompt position.
  ``softmax([z_yes, z_no])[0] = sigmoid(z_yes - z_no)``, so it is binary cross-entropy with logits on the
  margin (the log-sigmoid form stays finite for any margin).
* Eq. 9: the sum of Eq. 6 over the MEP ratios trained (one model serves every ratio); the sum itself is
  taken by the trainer, one ratio at a time, so that one ratio's graph is freed before the next is built.
* Eq. 10: distillation of a teacher's P(yes): KL(teacher || student) over the same two-way distribution;
  it equals the soft-label cross-entropy minus the teacher's entropy (constant in the weights), so its
  gradients are those of soft-label cross-entropy and it is 0 when the student matches the teacher.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def yes_no_ce(margin: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Eq. 6 per pair: ``-[y log P(yes) + (1 - y) log P(no)]``; ``margin`` and ``label`` are (B,)."""
    return F.binary_cross_entropy_with_logits(margin.float(), label.float(), reduction="none")


def distill_kl(margin: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Eq. 10 per pair: ``KL([t, 1 - t] || [p, 1 - p])`` with ``p = sigmoid(margin)``; both (B,)."""
    t = teacher.float()
    entropy = -(torch.xlogy(t, t) + torch.xlogy(1 - t, 1 - t))  # xlogy: 0 log 0 = 0 for t in {0, 1}
    return F.binary_cross_entropy_with_logits(margin.float(), t, reduction="none") - entropy


def pair_loss(margin: torch.Tensor, label: torch.Tensor, has_label: torch.Tensor, teacher: torch.Tensor,
              has_teacher: torch.Tensor, distill_weight: float = 1.0) -> torch.Tensor:
    """Mean over a batch of Eq. 6 (pairs with a label) plus ``distill_weight`` times Eq. 10 (with a score).

    Parameters
    ----------
    margin : torch.Tensor
        (B,) ``z_yes - z_no`` at one ratio.
    label, teacher : torch.Tensor
        (B,) hard labels and teacher P(yes); values where the matching mask is False are ignored.
    has_label, has_teacher : torch.Tensor
        (B,) bool masks.
    distill_weight : float, default 1.0
        Weight of the distillation term.

    Returns
    -------
    torch.Tensor
        Scalar: summed per-pair terms divided by the batch size.
    """
    zero = margin.new_zeros(margin.shape, dtype=torch.float32)
    hard = torch.where(has_label, yes_no_ce(margin, torch.where(has_label, label.float(), 0.0)), zero)
    soft = torch.where(has_teacher, distill_kl(margin, torch.where(has_teacher, teacher.float(), 0.5)), zero)
    return (hard + distill_weight * soft).sum() / margin.shape[0]


__all__ = ["yes_no_ce", "distill_kl", "pair_loss"]
