"""Transforms keep masks binary; per-volume normalization matches hand computation."""

import numpy as np
import pytest
import torch

from data_preprocessing import (
    binarize_mask,
    eval_preprocess,
    normalize,
    train_preprocess,
    volume_stats,
)


def test_binarize_mask():
    mask = np.array([0, 1, 127, 128, 254, 255], np.uint8)
    assert binarize_mask(mask).tolist() == [0, 0, 0, 1, 1, 1]


def test_train_transform_keeps_masks_binary_and_sizes():
    rng = np.random.default_rng(0)
    image = rng.integers(1, 256, (64, 64, 3), dtype=np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[20:40, 10:30] = 1
    pre = train_preprocess(32, affine_p=1.0, intensity_p=1.0)
    pre.transform.set_random_seed(0)
    areas = set()
    for _ in range(20):
        x, y = pre(image, mask)
        assert x.shape == (3, 32, 32) and x.dtype == torch.uint8
        assert y.shape == (1, 32, 32) and y.dtype == torch.uint8
        assert set(torch.unique(y).tolist()) <= {0, 1}
        areas.add(int(y.sum()))
    assert len(areas) > 1  # the augmentation really moves the mask


def test_eval_transform_is_deterministic():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    mask = (rng.random((64, 64)) > 0.5).astype(np.uint8)
    pre = eval_preprocess(32)
    a, b = pre(image, mask), pre(image, mask)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert set(torch.unique(a[1]).tolist()) <= {0, 1}


def test_volume_stats_by_hand():
    # One channel, values 0 (background, ignored) and 1..100 once each.
    values = np.concatenate([np.zeros(50), np.arange(1, 101)]).astype(np.uint8)
    volume = values.reshape(1, 10, 15, 1)
    s = volume_stats(volume, low_pct=0, high_pct=100)
    assert s.low[0] == 1 and s.high[0] == 100
    assert s.mean[0] == pytest.approx(50.5)
    assert s.std[0] == pytest.approx(np.arange(1, 101).std())
    # With clipping at the 10th/90th percentiles (numpy's linear interpolation: 10.9 and 90.1).
    s = volume_stats(volume, low_pct=10, high_pct=90)
    assert s.low[0] == pytest.approx(10.9) and s.high[0] == pytest.approx(90.1)
    clipped = np.clip(np.arange(1, 101), 10.9, 90.1)
    assert s.mean[0] == pytest.approx(clipped.mean()) and s.std[0] == pytest.approx(clipped.std())


def test_volume_stats_follow_scale_and_offset_by_hand():
    # Scanner values: the same volume as above times 3 plus 1000 (the floor, 1000, is left out as 0 was).
    values = np.concatenate([np.zeros(50), np.arange(1, 101)])
    volume = (values * 3 + 1000).astype(np.uint16).reshape(1, 10, 15, 1)
    s = volume_stats(volume, low_pct=0, high_pct=100)
    assert (s.low[0], s.high[0]) == (1003, 1300)
    assert s.mean[0] == pytest.approx(50.5 * 3 + 1000) and s.std[0] == pytest.approx(np.arange(1, 101).std() * 3)
    # So the normalized volume is that of the 8-bit one; negative floats (a z-scored export) too.
    eight = values.astype(np.uint8).reshape(1, 10, 15, 1)
    z8 = normalize(torch.from_numpy(eight).permute(0, 3, 1, 2), volume_stats(eight).as_tensor())
    for scaled in (volume, (values.reshape(1, 10, 15, 1) - 60.0) / 7):
        z = normalize(torch.from_numpy(scaled).permute(0, 3, 1, 2), volume_stats(scaled).as_tensor())
        assert torch.allclose(z, z8, atol=1e-4)


def _head_in_noise(pad: int, noise: int) -> tuple[np.ndarray, np.ndarray]:
    """(3, 24 + 2 pad, 24 + 2 pad, 3): the same disk of 80-120 in ``pad`` more pixels of background
    noise of 1..noise on each side; and the disk, (3, S, S) bool."""
    yy, xx = np.mgrid[:24, :24]
    disk = np.pad((yy - 12) ** 2 + (xx - 12) ** 2 < 10 ** 2, pad)
    head = np.pad(np.random.default_rng(4).integers(80, 121, (3, 24, 24, 3)), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    noisy = np.random.default_rng(5).integers(1, noise + 1, head.shape)
    disk = np.broadcast_to(disk, head.shape[:3])
    return np.where(disk[..., None], head, noisy).astype(np.uint8), disk


def test_normalize_gives_zero_mean_unit_std_on_the_head():
    rng = np.random.default_rng(2)
    volume = rng.integers(1, 200, (4, 16, 16, 3), dtype=np.uint8)
    volume[:, :4] = 0  # background rows
    s = volume_stats(volume, low_pct=0, high_pct=100)
    # The whole volume as one (N, C, H, W) batch sharing one (4, C) set of statistics.
    z = normalize(torch.from_numpy(volume).permute(0, 3, 1, 2), s.as_tensor()).numpy()
    assert z.dtype == np.float32
    head = volume[..., 0] > 0
    for c in range(3):
        assert z[:, c][head].mean() == pytest.approx(0, abs=1e-5)
        assert z[:, c][head].std() == pytest.approx(1, abs=1e-5)


def test_normalize_by_hand_per_sample_statistics():
    # Two one-channel 1x2 images, each with its own volume's statistics (low, high, mean, std).
    image = torch.tensor([[[[0, 200]]], [[[50, 100]]]], dtype=torch.uint8)
    stats = torch.tensor([[[10.0], [150.0], [30.0], [2.0]], [[0.0], [255.0], [100.0], [50.0]]])
    z = normalize(image, stats)
    # Image 0: clipped to 10 and 150, then (v - 30) / 2. Image 1: (v - 100) / 50.
    assert z.tolist() == [[[[-10.0, 60.0]]], [[[-1.0, 0.0]]]]


def test_empty_channel_does_not_divide_by_zero():
    volume = np.zeros((2, 4, 4, 3), np.uint8)
    volume[..., 1] = 7
    s = volume_stats(volume)
    assert s.std[0] == 1.0 and s.std[2] == 1.0
    assert torch.isfinite(normalize(torch.from_numpy(volume[0]).permute(2, 0, 1), s.as_tensor())).all()


def test_training_zoom_stays_in_its_range():
    """Area of a centred 16 x 16 square after 300 training transforms, over 256. A zoom by s scales
    it by s^2; rotation and flips keep it (up to the nearest-neighbour rounding of the rim: 2 px of
    the 16 px side, so a margin of 1 - (15/16)^2 = 0.12). The zoom is 0.9-1.1: areas 0.81-1.21."""
    image = np.full((64, 64, 3), 100, np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[24:40, 24:40] = 1
    pre = train_preprocess(64)  # 64 px in, 64 px out: the resize changes nothing
    pre.transform.set_random_seed(0)
    ratios = np.array([int(pre(image, mask)[1].sum()) for _ in range(300)]) / 256
    assert ratios.min() >= 0.81 - 0.12 and ratios.max() <= 1.21 + 0.12
    assert ratios.min() < 1.0 < ratios.max()  # it does zoom, both ways
    # The one affine step leaves a slice unmoved with p 0.5 (rotations can keep the area exactly,
    # so this is a lower bound on the share with ratio 1).
    assert np.mean(ratios == 1.0) >= 0.4
