"""Metrics from accumulated counts, checked by hand, and independent of batching."""

import numpy as np
import pytest
import torch

from libraries import UserError
from metrics import SegmentationMeter, dice_from_counts, iou_from_counts, lesion_contrast, parse_spacing, ratio


def masks(*rows):
    """(N, 1, 1, 4) bool tensor: one 1x4 slice per row."""
    return torch.tensor(rows, dtype=torch.bool).reshape(len(rows), 1, 1, 4)


def test_empty_case_convention():
    assert dice_from_counts(0, 0, 0) == 1.0  # empty prediction on empty truth
    assert iou_from_counts(0, 0, 0) == 1.0
    assert dice_from_counts(0, 3, 0) == 0.0  # prediction on empty truth
    assert dice_from_counts(0, 0, 3) == 0.0  # missed tumor
    assert ratio(0, 0, both_empty=False) == 0.0


def test_hand_computed_metrics():
    # Patient A, slice 1: pred 1100, truth 1000 -> tp 1, fp 1, fn 0 (slice Dice 2/3)
    # Patient A, slice 2: pred 0000, truth 0011 -> tp 0, fp 0, fn 2 (slice Dice 0)
    # Patient B, slice 1: pred 0000, truth 0000 -> empty on empty
    meter = SegmentationMeter(["A", "B"])
    pred = masks([1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0])
    truth = masks([1, 0, 0, 0], [0, 0, 1, 1], [0, 0, 0, 0])
    meter.update(pred, truth, torch.tensor([0, 0, 1]))
    m = meter.compute()
    a, b = m["per_patient"]
    # A in 3D: tp 1, fp 1, fn 2 -> Dice 2/5, IoU 1/4.
    assert (a["patient"], a["slices"]) == ("A", 2)
    assert a["dice"] == pytest.approx(0.4) and a["iou"] == pytest.approx(0.25)
    assert (b["dice"], b["iou"], b["slices"]) == (1.0, 1.0, 1)
    assert m["dice_per_volume_mean"] == pytest.approx(0.7)
    assert m["dice_per_volume_median"] == pytest.approx(0.7)
    assert m["iou_per_volume_mean"] == pytest.approx(0.625)
    assert m["dice_global"] == pytest.approx(0.4)
    assert m["iou_global"] == pytest.approx(0.25)
    assert m["dice_per_slice_tumor_mean"] == pytest.approx((2 / 3 + 0) / 2)
    assert m["tumor_slices"] == 2
    assert m["precision"] == pytest.approx(0.5)
    assert m["recall"] == pytest.approx(1 / 3)
    assert (m["patients"], m["slices"]) == (2, 3)


def test_metrics_do_not_depend_on_batch_size_or_order():
    rng = np.random.default_rng(0)
    n = 23
    pred = torch.from_numpy(rng.random((n, 1, 8, 8)) > 0.6)
    truth = torch.from_numpy(rng.random((n, 1, 8, 8)) > 0.7)
    truth[::4] = False  # some slices without tumor
    patient = torch.from_numpy(rng.integers(0, 4, n))

    def run(batch, order):
        meter = SegmentationMeter(["p0", "p1", "p2", "p3"])
        for i in range(0, n, batch):
            idx = order[i : i + batch]
            meter.update(pred[idx], truth[idx], patient[idx])
        return meter.compute()

    reference = run(n, np.arange(n))
    for batch in (1, 4, 7):
        other = run(batch, rng.permutation(n))
        for key in ("dice_per_volume_mean", "dice_global", "iou_global", "precision", "recall"):
            assert other[key] == pytest.approx(reference[key], abs=1e-12)
        assert other["dice_per_slice_tumor_mean"] == pytest.approx(reference["dice_per_slice_tumor_mean"], abs=1e-12)
        assert other["per_patient"] == reference["per_patient"]
    # And it is not trivially constant: per-volume and global Dice differ on this data.
    assert reference["dice_per_volume_mean"] != pytest.approx(reference["dice_global"], abs=1e-6)


def test_patient_never_seen_is_left_out():
    meter = SegmentationMeter(["A", "B"])
    meter.update(masks([1, 0, 0, 0]), masks([1, 0, 0, 0]), torch.tensor([1]))
    m = meter.compute()
    assert [p["patient"] for p in m["per_patient"]] == ["B"]
    assert m["dice_per_volume_mean"] == 1.0


def test_lesion_contrast_by_hand():
    """Brain around the lesion: seven pixels of 2 and seven of 4 (median 3, std 1); lesion: 10 and
    12 (mean 11). Contrast (11 - 3) / 1 = 8. Pixels outside ``inside`` do not count, whatever they hold."""
    flair = np.array([[2, 2, 2, 2, 2, 2, 2, 4],
                      [4, 4, 4, 4, 4, 4, 10, 12],
                      [250, 250, 250, 250, 250, 250, 250, 250]], np.uint8)[None]
    truth = np.zeros_like(flair, bool)
    truth[0, 1, 6:] = True
    inside = np.ones_like(truth)
    inside[0, 2] = False  # the scalp
    assert lesion_contrast(flair, truth, inside) == pytest.approx(8.0)
    # A darker lesion has a negative contrast; an affine rescaling of the scan changes nothing.
    dark = flair.copy()
    dark[0, 1, 6:] = 1
    assert lesion_contrast(dark, truth, inside) == pytest.approx(-2.0)
    assert lesion_contrast(flair.astype(np.float64) * 3 + 7, truth, inside) == pytest.approx(8.0)
    # Undefined: no tumor, no brain left around it, or a uniform brain.
    assert lesion_contrast(flair, np.zeros_like(truth), inside) is None
    assert lesion_contrast(flair, truth, truth) is None
    assert lesion_contrast(np.where(truth, 9, 5), truth, inside) is None


def test_a_volume_measures_its_lesion_contrast_on_flair_once(monkeypatch):
    """PatientVolume.flair_contrast is lesion_contrast of its FLAIR channel (1), its mask and its
    brain interior: a lesion bright on FLAIR only, so another channel would give a contrast near 0."""
    import data_files
    from data_preprocessing import volume_stats

    rng = np.random.default_rng(0)
    images = np.zeros((2, 40, 40, 3), np.uint8)
    images[:, 4:36, 4:36] = rng.integers(90, 110, (2, 32, 32, 3))  # the head
    masks = np.zeros((2, 40, 40), np.uint8)
    masks[1, 16:22, 16:22] = 1
    images[1, 16:22, 16:22, 1] = 200  # FLAIR-bright lesion
    volume = data_files.PatientVolume("P", images, masks, [1, 2], volume_stats(images))
    expected = lesion_contrast(images[..., 1], masks > 0, volume.interior())
    assert expected > 10 and volume.flair_contrast() == pytest.approx(expected)
    empty = data_files.PatientVolume("Q", images, np.zeros_like(masks), [1, 2], volume_stats(images))
    assert empty.flair_contrast() is None
    calls = []
    monkeypatch.setattr(data_files, "lesion_contrast", lambda *a: calls.append(a))
    assert volume.flair_contrast() == pytest.approx(expected) and not calls  # cached
    assert empty.flair_contrast() is None and not calls  # None is cached too


def test_spacing_takes_three_positive_finite_millimetres_or_one():
    assert parse_spacing("") is None
    assert parse_spacing("2.5") == (2.5, 2.5, 2.5)
    assert parse_spacing("3,0.5,0.75") == (3.0, 0.5, 0.75)
    for bad in ("-1", "0,1,1", "1,2", "abc", "nan", "inf,1,1", "1,1,nan"):
        with pytest.raises(UserError, match="--spacing takes"):
            parse_spacing(bad)
