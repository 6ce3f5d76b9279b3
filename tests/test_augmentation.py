"""The nnU-Net-style intensity augmentation: per channel, image only, training only, seeded."""

from __future__ import annotations

import json

import torch

from data_preprocessing import IntensityAugment
from data_preprocessing import batch_to_device as _to_device
from conftest import synthetic_tree
from engine import main


def _batch(n: int = 32, size: int = 24) -> torch.Tensor:
    """(n, 3, size, size) with the same image in all three channels."""
    one = torch.randn(n, 1, size, size, generator=torch.Generator().manual_seed(0))
    return one.repeat(1, 3, 1, 1)


def test_each_channel_draws_its_own_steps():
    x = _batch()
    y = IntensityAugment(seed=3)(x)
    changed = (y != x).flatten(2).any(2)  # (n, 3): which channels were touched
    assert changed.any()
    # Identical input channels come out different, and the steps taken differ between channels.
    assert any(not torch.equal(y[i, 0], y[i, 1]) or not torch.equal(y[i, 1], y[i, 2]) for i in range(len(x)))
    assert any(len(set(row.tolist())) > 1 for row in changed)
    assert torch.equal(x, _batch())  # the input is left as it was


def test_same_seed_same_augmentation_other_seed_other():
    x = _batch()
    a, b = IntensityAugment(seed=1), IntensityAugment(seed=99)
    first = a(x)
    a.reseed(1)
    assert torch.equal(a(x), first)
    assert not torch.equal(b(x), first)


def test_masks_pass_unchanged():
    batch = {"image": torch.randint(0, 255, (4, 3, 16, 16), dtype=torch.uint8),
             "stats": torch.tensor([[0.0] * 3, [255.0] * 3, [100.0] * 3, [50.0] * 3]).expand(4, 4, 3),
             "mask": (torch.rand(4, 1, 16, 16) > 0.7).to(torch.uint8)}
    plain_image, plain_mask = _to_device(batch, torch.device("cpu"), False)
    image, mask = _to_device(batch, torch.device("cpu"), False, IntensityAugment(seed=0))
    assert torch.equal(mask, plain_mask) and torch.equal(mask, batch["mask"].float())
    assert not torch.equal(image, plain_image)


def test_only_training_batches_are_augmented(tmp_path, monkeypatch):
    """One epoch on 4 synthetic patients: the augmentation sees the training batches and no validation batch."""
    seen = []
    real = IntensityAugment.__call__
    monkeypatch.setattr(IntensityAugment, "__call__", lambda self, x: seen.append(len(x)) or real(self, x))
    args = ["--data-dir", synthetic_tree(tmp_path / "syn", 5, 6), "--image-size", "32", "--epochs", "1",
            "--batch-size", "4",
            "--intensity-augment", "--val-fraction", "0.4",
            "--out-dir", str(tmp_path / "run")]
    assert main(args) == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    train_slices = 6 * len(config["patients"]["train"])
    assert sum(seen) == train_slices  # the 12 validation slices never pass through it
