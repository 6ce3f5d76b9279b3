"""The training losses: soft Dice and binary cross-entropy on logits.

Losses take logits of shape (N, 1, H, W) and targets of the same shape with values in [0, 1]:
the fraction of each pixel that is tumor (0 or 1 but at the edges of a resized mask).
The evaluation metrics are in metrics.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - soft Dice, averaged over the slices of the batch.

    Dice = (2 * sum(p * t) + smooth) / (sum(p) + sum(t) + smooth), with p = sigmoid(logits), per
    slice. ``smooth`` keeps the ratio defined on empty slices (an empty slice predicted empty
    scores 1) and softens the gradient on tiny lesions. Per slice, every slice without tumor asks
    for an all-background prediction on its own.

    Shape:
        logits, target: (N, 1, H, W). Returns a scalar.
    """
    p = torch.sigmoid(logits.float()).flatten(1)
    t = target.float().flatten(1)
    dice = (2 * (p * t).sum(1) + smooth) / (p.sum(1) + t.sum(1) + smooth)
    return 1 - dice.mean()


def bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Pixel-mean binary cross-entropy on logits (numerically stable)."""
    return F.binary_cross_entropy_with_logits(logits.float(), target.float())


class DiceBCELoss(nn.Module):
    """``dice_weight * soft_dice_loss + bce_weight * bce_loss``, both on logits.

    Dice handles the heavy class imbalance (tumor is ~1% of pixels); BCE gives dense, well
    behaved gradients early in training when the Dice ratio is still noisy.
    """

    def __init__(self, dice_weight: float = 1.0, bce_weight: float = 1.0, smooth: float = 1.0) -> None:
        super().__init__()
        if dice_weight < 0 or bce_weight < 0 or dice_weight + bce_weight == 0:
            raise ValueError("dice_weight and bce_weight must be >= 0 and not both 0")
        self.dice_weight, self.bce_weight, self.smooth = dice_weight, bce_weight, smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = logits.new_zeros((), dtype=torch.float32)
        if self.dice_weight:
            loss = loss + self.dice_weight * soft_dice_loss(logits, target, self.smooth)
        if self.bce_weight:
            loss = loss + self.bce_weight * bce_loss(logits, target)
        return loss
