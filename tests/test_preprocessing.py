"""Transforms carry masks as tumor fractions aligned with the image; per-volume normalization
matches hand computation."""

import numpy as np
import pytest
import torch

from data_preprocessing import (
    MASK_SCALE,
    batch_to_device,
    binarize_mask,
    eval_preprocess,
    normalize,
    train_preprocess,
    volume_stats,
)


def test_binarize_mask():
    mask = np.array([0, 1, 127, 128, 254, 255], np.uint8)
    assert binarize_mask(mask).tolist() == [0, 0, 0, 1, 1, 1]


def test_train_transform_keeps_sizes_and_moves_the_mask():
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
        areas.add(int(y.sum()))
    assert len(areas) > 1  # the augmentation really moves the mask


def test_masks_shrink_to_tumor_fractions_by_hand():
    # 4 x 4 -> 2 x 2: each small pixel is the share of tumor in its 2 x 2 block, times 255.
    # Nearest neighbour would keep pixels (0,0), (0,2), (2,0), (2,2) only: [[0, 0], [0, 255]].
    mask = np.zeros((4, 4), np.uint8)
    mask[1, 1] = 1  # one pixel of the top-left block: 255 / 4 = 63.75
    mask[2:4, 2:4] = 1  # the whole bottom-right block
    mask[2, 0] = 1
    mask[3, 1] = 1  # two of the bottom-left block: 127.5, which OpenCV rounds to 128
    _, y = eval_preprocess(2)(np.zeros((4, 4, 3), np.uint8), mask)
    assert y.dtype == torch.uint8 and y[0].tolist() == [[64, 0], [128, 255]]
    # batch_to_device makes them the fractions the losses take.
    batch = {"image": torch.zeros(1, 3, 2, 2, dtype=torch.uint8), "mask": y[None],
             "stats": torch.tensor([[[0.0] * 3, [1.0] * 3, [0.0] * 3, [1.0] * 3]])}
    _, target = batch_to_device(batch, torch.device("cpu"), channels_last=False)
    assert torch.allclose(target[0, 0], torch.tensor([[64, 0], [128, 255]]) / 255)
    assert MASK_SCALE == 255


@pytest.mark.parametrize("seed", range(5))
def test_shrinking_a_mask_commutes_with_mirroring_it(seed):
    """The image is shrunk by area, which commutes with flips: pixel i of the small grid is centred
    on 2i + 0.5 of the large one. A mask shrunk the same way stays aligned with it, so shrinking
    the mirrored mask gives the mirrored shrunk mask, exactly. Nearest neighbour (pixel 2i) does
    not: a block with an odd edge lands a pixel off after the flip."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((32, 32), np.uint8)
    for _ in range(3):
        y0, x0 = rng.integers(0, 24, 2)
        h, w = rng.integers(2, 9, 2)
        mask[y0:y0 + h, x0:x0 + w] = 1
    pre, blank = eval_preprocess(16), np.zeros((32, 32, 3), np.uint8)
    for axis in (0, 1):
        shrunk = pre(blank, mask)[1][0]
        assert torch.equal(pre(blank, np.flip(mask, axis).copy())[1][0], shrunk.flip(axis))
    assert int(shrunk.sum()) == pytest.approx(mask.sum() / 4 * MASK_SCALE, abs=int(mask.sum()))  # area kept


def test_training_warps_move_the_mask_exactly_as_the_image():
    """With the mask also painted into the image's first channel (and no intensity change), every
    resize, flip, zoom, rotation and shift must leave that channel equal to the mask: the target
    stays on the pixels it labels."""
    rng = np.random.default_rng(3)
    mask = np.zeros((64, 64), np.uint8)
    mask[17:40, 9:33] = 1
    mask[45:50, 40:61] = 1
    image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    image[..., 0] = mask * MASK_SCALE
    pre = train_preprocess(32, affine_p=1.0, intensity_p=0.0)
    pre.transform.set_random_seed(0)
    for _ in range(10):
        x, y = pre(image, mask)
        assert torch.equal(x[0], y[0])


def test_eval_transform_is_deterministic():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    mask = (rng.random((64, 64)) > 0.5).astype(np.uint8)
    pre = eval_preprocess(32)
    a, b = pre(image, mask), pre(image, mask)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


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
    """Area (the sum of tumor fractions) of a centred 16 x 16 square after 300 training transforms,
    over 256. A zoom by s scales it by s^2; rotation and flips keep it (up to the bilinear warp's
    8-bit rounding of the rim, a margin of 0.02). The zoom is 0.9-1.1: areas 0.81-1.21."""
    image = np.full((64, 64, 3), 100, np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[24:40, 24:40] = 1
    pre = train_preprocess(64)  # 64 px in, 64 px out: the resize changes nothing
    pre.transform.set_random_seed(0)
    ratios = np.array([int(pre(image, mask)[1].sum()) / MASK_SCALE for _ in range(300)]) / 256
    assert ratios.min() >= 0.81 - 0.02 and ratios.max() <= 1.21 + 0.02
    assert ratios.min() < 1.0 < ratios.max()  # it does zoom, both ways
    # The one affine step leaves a slice unmoved with p 0.5 (rotations can keep the area exactly,
    # so this is a lower bound on the share with ratio 1).
    assert np.mean(ratios == 1.0) >= 0.4
