"""--lesion-fade: a training slice's lesion made fainter on FLAIR, its mask unchanged."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

import data_loaders
from conftest import lesion_volume
from data_loaders import LGGSlices
from data_preprocessing import eval_preprocess, fade_lesion
from engine import main
from metrics import lesion_contrast


def _slice(lesion_values=(180,)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 16 px slice: brain (rows and columns 2-13) at 50 / 100 / 70 in channels 0 / 1 / 2, and a
    3 x 3 lesion at rows and columns 6-8 whose FLAIR cycles through ``lesion_values``."""
    image = np.zeros((16, 16, 3), np.uint8)
    brain = np.zeros((16, 16), bool)
    brain[2:14, 2:14] = True
    image[brain] = (50, 100, 70)
    mask = np.zeros((16, 16), np.uint8)
    mask[6:9, 6:9] = 1
    image[6:9, 6:9, 1] = np.resize(np.array(lesion_values, np.uint8), (3, 3))
    return image, mask, brain


def test_the_lesion_moves_down_by_the_share_of_its_excess_and_nothing_else_moves():
    """Lesion 180 in a brain of 100: excess 80; factor 0.5 lowers it by 40, to 140. Values 160, 180
    and 200, three pixels each (mean 180), all move by 40 too: the texture is kept."""
    image, mask, brain = _slice()
    out = fade_lesion(image, mask, brain, 0.5, feather=0)
    assert (out[mask > 0, 1] == 140).all()
    assert np.array_equal(out[mask == 0], image[mask == 0])
    assert np.array_equal(out[..., [0, 2]], image[..., [0, 2]])  # the other modalities are untouched
    image, mask, brain = _slice((160, 180, 200))
    out = fade_lesion(image, mask, brain, 0.5, feather=0)
    assert np.array_equal(out[mask > 0, 1], image[mask > 0, 1] - 40)
    assert np.array_equal(fade_lesion(image, mask, brain, 1.0, feather=0), image)
    assert np.array_equal(fade_lesion(image, mask, brain, 0.0, feather=0)[mask > 0, 1], image[mask > 0, 1] - 80)


def test_the_measured_contrast_scales_by_the_factor():
    rng = np.random.default_rng(3)
    image, mask, brain = _slice()
    image[..., 1] = np.where(brain, rng.integers(80, 120, (16, 16)), 0)
    image[mask > 0, 1] = rng.integers(190, 230, 9)
    before = lesion_contrast(image[..., 1], mask > 0, brain)
    after = lesion_contrast(fade_lesion(image, mask, brain, 0.6, feather=0)[..., 1], mask > 0, brain)
    std = image[..., 1][brain & (mask == 0)].std()
    assert after == pytest.approx(0.6 * before, abs=0.5 / std)  # up to the uint8 rounding of each pixel


def test_the_shift_tapers_off_outside_the_lesion():
    image, mask, brain = _slice()
    out = fade_lesion(image, mask, brain, 0.5, feather=2.0).astype(int)
    assert (out[mask > 0, 1] == 140).all()  # the lesion itself takes the whole shift
    assert 60 < out[5, 7, 1] < 100 and out[4, 7, 1] >= out[5, 7, 1]  # beside it, less; further away, less still
    assert out[0, 0, 1] == 0 and out[13, 13, 1] == 100  # far away, nothing


def test_a_channel_that_copies_flair_is_faded_alike():
    image, mask, brain = _slice()
    image[..., 2] = image[..., 1]
    out = fade_lesion(image, mask, brain, 0.5, sources=(0, 1, 1), feather=0)
    assert np.array_equal(out[..., 2], out[..., 1]) and (out[mask > 0, 2] == 140).all()


def test_a_lesion_no_brighter_than_its_brain_or_without_brain_beside_it_is_left_alone():
    image, mask, brain = _slice((60,))
    assert np.array_equal(fade_lesion(image, mask, brain, 0.5), image)
    image, mask, _ = _slice()
    assert np.array_equal(fade_lesion(image, mask, mask > 0, 0.5), image)
    assert np.array_equal(fade_lesion(image, np.zeros_like(mask), np.ones_like(mask, bool), 0.5), image)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        fade_lesion(image, mask, mask > 0, 1.5)


def test_the_dataset_fades_tumor_slices_only_keeps_masks_and_is_reproducible():
    vols = [lesion_volume("A", 20, 22, (1, 2, 3), n=6), lesion_volume("B", 14, 26, (1, 2, 3), n=6)]
    plain = list(LGGSlices(vols, eval_preprocess(48)))
    faded = LGGSlices(vols, eval_preprocess(48), lesion_fade=1.0)
    faded.reseed(7)
    first = list(faded)
    faded.reseed(7)
    assert all(np.array_equal(a["image"], b["image"]) for a, b in zip(first, faded))
    faded.reseed(8)
    assert not all(np.array_equal(a["image"], b["image"]) for a, b in zip(first, faded))  # other factors
    for before, after in zip(plain, first):
        assert np.array_equal(before["mask"], after["mask"])
        lesion = before["mask"][0] > 0
        if not lesion.any():
            assert np.array_equal(before["image"], after["image"])
            continue
        # FLAIR of the lesion falls, by at most half of its excess of about 100 over the brain.
        drop = before["image"][1][lesion].float().mean() - after["image"][1][lesion].float().mean()
        assert 0 < drop <= 0.5 * 100 + 1
        assert np.array_equal(before["image"][[0, 2]], after["image"][[0, 2]])


def test_lesion_fade_reaches_the_training_slices_only(tmp_path, monkeypatch):
    """At p = 1, and tumor weight 1 (each slice once an epoch), every training slice with tumor is
    faded once and no validation slice is."""
    faded = []
    real = data_loaders.fade_lesion
    monkeypatch.setattr(data_loaders, "fade_lesion", lambda *a, **k: faded.append(1) or real(*a, **k))
    args = ["--synthetic", "--synthetic-dir", str(tmp_path / "syn"), "--synthetic-patients", "5",
            "--synthetic-slices", "6", "--image-size", "32", "--epochs", "1", "--batch-size", "4",
            "--lesion-fade", "1", "--val-fraction", "0.4", "--progress", "off", "--cache-dir", "off",
            "--out-dir", str(tmp_path / "run")]
    assert main(args) == 0
    train = json.loads((tmp_path / "run" / "config.json").read_text())["patients"]["train"]
    root = tmp_path / "syn"
    tumor_slices = sum(cv2.imread(str(m), cv2.IMREAD_GRAYSCALE).any()
                       for p in train for m in root.glob(f"{p}/*_mask.tif"))
    assert tumor_slices > 0 and len(faded) == tumor_slices
