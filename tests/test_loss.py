"""Loss values checked against hand computation on 2x2 inputs."""

import math

import pytest
import torch

from loss_fun import DiceBCELoss, bce_loss, soft_dice_loss

BIG = 50.0  # sigmoid(±50) is 0 or 1 to float32 precision


def t(values):
    """A (N, 1, 2, 2) tensor from nested lists of 4 values per sample."""
    return torch.tensor(values, dtype=torch.float32).reshape(len(values), 1, 2, 2)


def test_dice_loss_at_half_probability():
    # p = 0.5 everywhere, one tumor pixel: intersection 0.5, sum(p) = 2, sum(t) = 1.
    logits, target = t([[0, 0, 0, 0]]), t([[1, 0, 0, 0]])
    # smooth 1: Dice = (2*0.5 + 1) / (2 + 1 + 1) = 0.5
    assert soft_dice_loss(logits, target, smooth=1.0).item() == pytest.approx(0.5)
    # smooth 0: Dice = 1 / 3
    assert soft_dice_loss(logits, target, smooth=0.0).item() == pytest.approx(2 / 3)


def test_dice_loss_is_per_slice_not_pooled():
    # Slice A: one tumor pixel, found (Dice 1). Slice B: three tumor pixels, none found (Dice 0).
    logits = t([[BIG, -BIG, -BIG, -BIG], [-BIG, -BIG, -BIG, -BIG]])
    target = t([[1, 0, 0, 0], [1, 1, 1, 0]])
    # Per-slice mean: 1 - (1 + 0) / 2 = 0.5 (pooled over the batch it would be 1 - 2 * 1 / (1 + 4) = 0.6).
    assert soft_dice_loss(logits, target, smooth=0.0).item() == pytest.approx(0.5, abs=1e-6)
    # A: one tumor pixel, half-found (p = 0.5): Dice 2 * 0.5 / (2 + 1) = 1/3; B: no tumor, two false
    # positives: Dice 0 / 2 = 0. Mean loss 1 - (1/3 + 0) / 2 = 5/6.
    logits = t([[0, 0, 0, 0], [BIG, BIG, -BIG, -BIG]])
    target = t([[1, 0, 0, 0], [0, 0, 0, 0]])
    assert soft_dice_loss(logits, target, smooth=0.0).item() == pytest.approx(5 / 6, abs=1e-6)


def test_dice_loss_empty_slice_predicted_empty_is_zero():
    assert soft_dice_loss(t([[-BIG] * 4]), t([[0] * 4]), smooth=1.0).item() == pytest.approx(0.0, abs=1e-6)


def test_bce_values():
    assert bce_loss(t([[0, 0, 0, 0]]), t([[1, 0, 1, 0]])).item() == pytest.approx(math.log(2))
    # -log(sigmoid(2)) = log(1 + e^-2); -log(1 - sigmoid(-1)) = log(1 + e^-1); the others are 0 and log 2.
    logits, target = t([[2, -1, 0, 0]]), t([[1, 0, 0, 1]])
    # Third pixel: logit 0, target 0 -> log 2; fourth: logit 0, target 1 -> log 2.
    expected = (math.log1p(math.exp(-2)) + math.log1p(math.exp(-1)) + 2 * math.log(2)) / 4
    assert bce_loss(logits, target).item() == pytest.approx(expected, rel=1e-6)


def test_dice_bce_weights():
    logits, target = t([[0, 0, 0, 0]]), t([[1, 0, 0, 0]])
    loss = DiceBCELoss(dice_weight=0.3, bce_weight=0.7, smooth=1.0)(logits, target)
    assert loss.item() == pytest.approx(0.3 * 0.5 + 0.7 * math.log(2))
    only_dice = DiceBCELoss(dice_weight=1.0, bce_weight=0.0)(logits, target)
    assert only_dice.item() == pytest.approx(0.5)


def test_dice_bce_rejects_zero_weights():
    with pytest.raises(ValueError):
        DiceBCELoss(dice_weight=0.0, bce_weight=0.0)


def test_losses_give_gradients_that_lower_the_loss():
    logits = t([[0.0, 0.0, 0.0, 0.0]]).requires_grad_()
    target = t([[1, 0, 0, 0]])
    DiceBCELoss()(logits, target).backward()
    # Raising the tumor pixel's logit and lowering the others reduces both terms.
    assert logits.grad[0, 0, 0, 0] < 0
    assert (logits.grad.flatten()[1:] > 0).all()
