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


def test_tversky_beta_weighs_missed_tumor_against_false_positives():
    # p = 0.5 on 4 pixels, tumor on the first 2: TP = 1, FP = 1, FN = 1 (soft), sum(p) = 2, sum(t) = 2.
    logits, target = t([[0, 0, 0, 0]]), t([[1, 1, 0, 0]])
    # beta 0.7: (2*1 + 1) / (2*0.3*2 + 2*0.7*2 + 1) = 3 / 5 -> loss 0.4 (the Dice's is 1 - 3/5 too: FP = FN here).
    assert soft_dice_loss(logits, target, beta=0.7).item() == pytest.approx(0.4)
    # One pixel found of 3 (FN = 2), no false positive: Dice (2 + 1) / (1 + 3 + 1) = 0.6, loss 0.4;
    # beta 0.7: 3 / (2*0.3*1 + 2*0.7*3 + 1) = 3 / 5.8, a larger loss for the same miss.
    logits, target = t([[BIG, -BIG, -BIG, -BIG]]), t([[1, 1, 1, 0]])
    assert soft_dice_loss(logits, target).item() == pytest.approx(0.4, abs=1e-6)
    assert soft_dice_loss(logits, target, beta=0.7).item() == pytest.approx(1 - 3 / 5.8, abs=1e-6)
    # ... and a false positive costs less: 1 pixel of tumor found plus 2 false: Dice 3 / (3 + 1 + 1),
    # beta 0.7: 3 / (2*0.3*3 + 2*0.7*1 + 1) = 3 / 4.2.
    logits, target = t([[BIG, BIG, BIG, -BIG]]), t([[1, 0, 0, 0]])
    assert soft_dice_loss(logits, target, beta=0.7).item() == pytest.approx(1 - 3 / 4.2, abs=1e-6)
    # beta 0.5 is the Dice to the bit, in every mode.
    logits, target = torch.randn(3, 1, 5, 5), (torch.rand(3, 1, 5, 5) > 0.7).float()
    for mode in ("sample", "batch", "tumor"):
        assert torch.equal(soft_dice_loss(logits, target, mode=mode, beta=0.5), soft_dice_loss(logits, target, mode=mode))
    for beta in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="beta"):
            DiceBCELoss(beta=beta)


def test_dice_loss_is_per_sample_not_pooled():
    # Sample A: one tumor pixel, found (Dice 1). Sample B: three tumor pixels, none found (Dice 0).
    logits = t([[BIG, -BIG, -BIG, -BIG], [-BIG, -BIG, -BIG, -BIG]])
    target = t([[1, 0, 0, 0], [1, 1, 1, 0]])
    # Per-sample mean: 1 - (1 + 0) / 2 = 0.5. Pooled over the batch: 1 - 2 * 1 / (1 + 4) = 0.6.
    assert soft_dice_loss(logits, target, smooth=0.0).item() == pytest.approx(0.5, abs=1e-6)
    assert soft_dice_loss(logits, target, smooth=0.0, mode="batch").item() == pytest.approx(0.6, abs=1e-6)
    assert DiceBCELoss(1.0, 0.0, smooth=0.0, mode="batch")(logits, target).item() == pytest.approx(0.6, abs=1e-6)


def test_dice_loss_tumor_mode_leaves_empty_slices_to_bce():
    # A: one tumor pixel, half-found (p = 0.5 everywhere). B: no tumor, two false positives.
    logits = t([[0, 0, 0, 0], [BIG, BIG, -BIG, -BIG]])
    target = t([[1, 0, 0, 0], [0, 0, 0, 0]])
    # A alone, smooth 0: Dice = 2 * 0.5 / (2 + 1) = 1/3, so the loss is 2/3.
    assert soft_dice_loss(logits, target, smooth=0.0, mode="tumor").item() == pytest.approx(2 / 3, abs=1e-6)
    # Per sample, B adds a Dice of 0 (0 / 2): 1 - (1/3 + 0) / 2 = 5/6.
    assert soft_dice_loss(logits, target, smooth=0.0).item() == pytest.approx(5 / 6, abs=1e-6)
    # A batch with no tumor at all: no Dice term, the loss is the BCE alone.
    assert soft_dice_loss(logits[1:], target[1:], mode="tumor").item() == 0.0
    assert DiceBCELoss(mode="tumor")(logits[1:], target[1:]).item() == pytest.approx(bce_loss(logits[1:], target[1:]).item())
    with pytest.raises(ValueError, match="mode"):
        DiceBCELoss(mode="slices")


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
