"""Masks are read by convention (0/255 or 0/1), never by one fixed threshold: a 0/1 copy of the
data trains and scores exactly as the 0/255 original."""

from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import pytest

from conftest import read_mask
from data_files import DataIssues, read_patient_masks
from synthetic_data import make_synthetic_dataset
from data_preprocessing import mask_convention
from engine import main


@pytest.mark.parametrize("values, expected", [
    ({0, 255}, ("0/255", 127)), ({0}, ("0/255", 127)), ({0, 1}, ("0/1", 0)), ({1}, ("0/1", 0)),
    ({0, 1, 2, 3}, ("labels", 0)), ({0, 3, 200, 255}, ("graded", 127)), ({0, 100}, ("graded", 50)),
])
def test_mask_convention_by_hand(values, expected):
    assert mask_convention(values) == expected


def _write_mask(path, mask):
    cv2.imwrite(str(path), mask.astype(np.uint8))


def test_a_patient_is_read_by_the_convention_of_all_its_files(tmp_path, capsys):
    m = np.zeros((8, 8), np.uint8)
    m[2:4, 2:4] = 1
    for i, values in enumerate((m, m * 0, m)):
        _write_mask(tmp_path / f"P_{i + 1}_mask.tif", values)
    issues = DataIssues()
    masks, convention = read_patient_masks(sorted(tmp_path.glob("*_mask.tif")), issues)
    assert convention == "0/1" and [int(x.sum()) for x in masks] == [4, 0, 4] and not issues.items
    assert read_mask(tmp_path / "P_1_mask.tif").sum() == 4  # one file alone: the same reading
    # One file saved 0/255 beside 0/1 files: each read by its own values, and reported.
    _write_mask(tmp_path / "P_2_mask.tif", m * 255)
    masks, convention = read_patient_masks(sorted(tmp_path.glob("*_mask.tif")), issues)
    assert convention == "mixed 0/1 and 0/255" and [int(x.sum()) for x in masks] == [4, 4, 4]
    assert issues.summary() == "1 fixed: mask conventions mixed"
    # Several labels: every one is tumor, with the values named in the report.
    _write_mask(tmp_path / "P_2_mask.tif", m * 2)
    masks, convention = read_patient_masks(sorted(tmp_path.glob("*_mask.tif")), issues)
    assert convention == "labels" and [int(x.sum()) for x in masks] == [4, 4, 4]
    assert "[0, 1, 2] are neither 0/255 nor 0/1" in issues.items[-1][1]


def _zero_one_copy(source, target, patients=None):
    """A copy of ``source`` whose masks (of ``patients``, default all) are re-saved with 1 for tumor."""
    shutil.copytree(source, target)
    for mask in target.glob("*/*_mask.tif"):
        if patients is None or mask.parent.name in patients:
            raw = cv2.imread(str(mask), cv2.IMREAD_UNCHANGED)
            _write_mask(mask, (raw > 127).astype(np.uint8))
    return target


def _tiny(data, out, split=("--val-fraction", "0.4")):
    return ["--data-dir", str(data), "--image-size", "32", "--features", "4", "--epochs", "1",
            "--batch-size", "4", "--device", "cpu", "--amp", "off", *split, "--out-dir", str(out)]


def test_a_zero_one_copy_trains_and_scores_as_the_original(tmp_path, capsys):
    original = make_synthetic_dataset(tmp_path / "a" / "kaggle_3m", patients=5, slices=6, size=64)
    names = sorted(p.name for p in original.iterdir() if p.is_dir())
    copy = _zero_one_copy(original, tmp_path / "b" / "kaggle_3m", patients=names[:3])
    assert main(_tiny(original, tmp_path / "run-a")) == 0
    assert main(_tiny(copy, tmp_path / "run-b")) == 0
    a, b = (json.loads((tmp_path / r / "metrics.json").read_text()) for r in ("run-a", "run-b"))
    assert a["per_patient"] == b["per_patient"] and a["dice_per_volume_mean"] == b["dice_per_volume_mean"]
    assert all(p["tumor_pixels"] > 0 for p in b["per_patient"])
    out = capsys.readouterr().out
    assert "masks 0/1 (3: " in out and "0/255 (2: " in out  # which convention was read, and where
    # The data report counts the same tumor, says how each patient was read, and finds no problem.
    for root, name in ((original, "a.json"), (copy, "b.json")):
        assert main(["data", "--data-dir", str(root), "--out", str(tmp_path / name)]) == 0
    ra, rb = (json.loads((tmp_path / n).read_text()) for n in ("a.json", "b.json"))
    assert ra["tumor_slices"] == rb["tumor_slices"] > 0
    assert rb["mask_conventions"] == {"0/1": names[:3], "0/255": names[3:]}
    assert rb["problems"] == [] and rb["patients_without_tumor"] == []


def test_no_tumor_anywhere_is_an_error_and_one_patient_without_is_a_warning(tmp_path, capsys):
    data = make_synthetic_dataset(tmp_path / "s" / "kaggle_3m", patients=5, slices=6, size=64)
    first = sorted(p for p in data.iterdir() if p.is_dir())[0]
    for mask in first.glob("*_mask.tif"):
        _write_mask(mask, np.zeros((64, 64)))
    assert main(_tiny(data, tmp_path / "r1", ("--val-patients", first.name))) == 0
    err = capsys.readouterr().err
    assert f"1 patient without tumor in any mask: {first.name}" in err
    for mask in data.glob("*/*_mask.tif"):
        _write_mask(mask, np.zeros((64, 64)))
    assert main(_tiny(data, tmp_path / "r2")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no patient has any tumor" in err[0]
    assert main(["data", "--data-dir", str(data), "--out", str(tmp_path / "d.json")]) == 2
    assert "no patient has any tumor" in capsys.readouterr().err
