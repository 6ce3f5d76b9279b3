"""The training losses: soft Dice and binary cross-entropy on logits.

Losses take logits of shape (N, 1, H, W) and targets of the same shape with values in {0, 1}.
The evaluation metrics are in metrics.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


DICE_MODES = ("sample", "batch", "tumor")


def _check_dice_mode(mode: str) -> None:
    if mode not in DICE_MODES:
        raise ValueError(f"mode must be one of {DICE_MODES}, got {mode!r}")


def _check_beta(beta: float) -> None:
    if not 0 < beta < 1:
        raise ValueError(f"beta (the Tversky weight of missed tumor pixels) must be in (0, 1), got {beta}")


def soft_dice_loss(
    logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0, mode: str = "sample", beta: float = 0.5
) -> torch.Tensor:
    """1 - soft Dice, averaged over the slices (``sample``), pooled over the batch (``batch``) or
    averaged over the slices that contain tumor (``tumor``).

    Dice = (2 * sum(p * t) + smooth) / (sum(p) + sum(t) + smooth), with p = sigmoid(logits).
    ``smooth`` keeps the ratio defined on empty slices (an empty slice predicted empty scores 1)
    and softens the gradient on tiny lesions. Per sample, every slice without tumor asks for an
    all-background prediction on its own; pooled, slices weigh by their pixels. With ``tumor``,
    slices without tumor are left to the BCE term, and a batch with no tumor gives 0.

    ``beta`` != 0.5 gives Tversky's index (Salehi et al., 2017), which weighs missed tumor (FN)
    by beta and false positives (FP) by 1 - beta:
    (2 TP + smooth) / (2 TP + 2 (1 - beta) FP + 2 beta FN + smooth)
    = (2 * sum(p * t) + smooth) / (2 (1 - beta) sum(p) + 2 beta sum(t) + smooth),
    which is the Dice above at beta = 0.5, to the bit. Above 0.5 it favours recall.

    Shape:
        logits, target: (N, 1, H, W). Returns a scalar.
    """
    _check_dice_mode(mode)
    _check_beta(beta)
    p = torch.sigmoid(logits.float()).flatten(1)
    t = target.float().flatten(1)
    if mode == "batch":
        p, t = p.reshape(1, -1), t.reshape(1, -1)
    elif mode == "tumor":
        has_tumor = t.sum(1) > 0
        if not has_tumor.any():
            return p.new_zeros(())
        p, t = p[has_tumor], t[has_tumor]
    # 2 * 0.5 == 1.0 exactly, so beta = 0.5 computes the plain Dice's sums unchanged.
    dice = (2 * (p * t).sum(1) + smooth) / ((2 * (1 - beta)) * p.sum(1) + (2 * beta) * t.sum(1) + smooth)
    return 1 - dice.mean()


def bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Pixel-mean binary cross-entropy on logits (numerically stable)."""
    return F.binary_cross_entropy_with_logits(logits.float(), target.float())


class DiceBCELoss(nn.Module):
    """``dice_weight * soft_dice_loss + bce_weight * bce_loss``, both on logits.

    Dice handles the heavy class imbalance (tumor is ~1% of pixels); BCE gives dense, well
    behaved gradients early in training when the Dice ratio is still noisy.
    """

    def __init__(
        self, dice_weight: float = 1.0, bce_weight: float = 1.0, smooth: float = 1.0, mode: str = "sample",
        beta: float = 0.5,
    ) -> None:
        super().__init__()
        if dice_weight < 0 or bce_weight < 0 or dice_weight + bce_weight == 0:
            raise ValueError("dice_weight and bce_weight must be >= 0 and not both 0")
        self.dice_weight, self.bce_weight, self.smooth = dice_weight, bce_weight, smooth
        _check_dice_mode(mode)  # at construction, not at the first batch
        _check_beta(beta)
        self.mode, self.beta = mode, beta

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = logits.new_zeros((), dtype=torch.float32)
        if self.dice_weight:
            loss = loss + self.dice_weight * soft_dice_loss(logits, target, self.smooth, self.mode, self.beta)
        if self.bce_weight:
            loss = loss + self.bce_weight * bce_loss(logits, target)
        return loss
