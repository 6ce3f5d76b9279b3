"""NIfTI and DICOM in, NIfTI masks out: the same answer through every door, orientation, intensity
scale, missing sequences, volumes in mm^3, evaluate on cases, and one line for every malformed input."""

import gzip
import json

import cv2
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from conftest import (REAL_DATA, TIFF_AFFINE, between_float16_values, requires_real_data, tiny_checkpoint,
                      write_dicom_series, write_nifti)

from data_files import model_intensities
from engine import main
from scans import from_slices, read_dicom_series, slice_spacing, to_slices

SEQUENCES = ("t1", "flair", "t1ce")  # the dataset's channel order
RUN = ["--device", "cpu", "--amp", "off", "--postprocess", "brain-multi"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt")


def head_volume(seed: int = 0, n: int = 10, size: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """(n, size, size, 3) uint8 slices of a head (a disk of 60-120) with a bright, off-centre
    lesion that differs by channel, and its (n, size, size) mask: nothing in it is symmetric."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    head = (yy - size // 2) ** 2 + (xx - size // 2) ** 2 < (size // 2 - 3) ** 2
    images = np.where(head[None, ..., None], rng.integers(60, 121, (n, size, size, 3)), 0).astype(np.uint8)
    truth = np.zeros((n, size, size), np.uint8)
    truth[3:7, 10:18, 26:38] = 1
    images[truth > 0] = (180, 230, 200)
    return images, truth


def nifti_case(folder, images, affine=TIFF_AFFINE, sequences=SEQUENCES, truth=None, dtype=None):
    """A case folder of one NIfTI file per sequence (and seg.nii.gz), from Kaggle-layout slices."""
    for c, name in enumerate(SEQUENCES):
        if name in sequences:
            data = images[..., c] if dtype is None else images[..., c].astype(dtype)
            write_nifti(folder / f"{name}.nii.gz", data, affine)
    if truth is not None:
        write_nifti(folder / "seg.nii.gz", truth, affine)
    return folder


def read_back(path):
    """A written mask as (D, H, W) slices in the Kaggle layout, and its image."""
    image = nib.load(str(path))
    return to_slices(np.asarray(image.dataobj), image.affine), image


def predict(checkpoint, out, *inputs):
    return main(["predict", "--checkpoint", str(checkpoint), "--output", str(out), *RUN, *inputs])


def test_orientation_round_trip_by_hand():
    # 2 x 3 x 4 voxels on an LPS grid: to_slices lays them out as (z, row, column) = (k, j, i),
    # and from_slices undoes it exactly, for LPS, RAS and a permuted axis order alike.
    voxels = np.arange(24).reshape(2, 3, 4)
    slices = to_slices(voxels, TIFF_AFFINE)
    assert slices.shape == (4, 3, 2) and slices[1, 2, 0] == voxels[0, 2, 1]
    for affine in (TIFF_AFFINE, np.diag([1.0, 1.0, 2.5, 1.0]), np.array([[0, 0, 2.5, 0], [-1, 0, 0, 0],
                                                                         [0, 1, 0, 0], [0, 0, 0, 1.0]])):
        assert np.array_equal(from_slices(to_slices(voxels, affine), affine), voxels)
    assert slice_spacing(nib.Nifti1Image(voxels.astype(np.float32), np.diag([0.5, 0.75, 3.0, 1]))) == (3.0, 0.75, 0.5)


def test_a_flipped_affine_lands_on_the_same_anatomy(tmp_path, checkpoint):
    """The same head stored LPS and RAS (voxels flipped, affine flipped): the masks, read back with
    their own affines, cover the same points of the patient, and each has its input's grid."""
    images, _ = head_volume()
    lps = nifti_case(tmp_path / "lps", images)
    ras_affine = np.diag([1.0, 1.0, 2.5, 1.0])
    ras_affine[:2, 3] = -(images.shape[2] - 1), -(images.shape[1] - 1)  # voxel (0, 0) is LPS' far corner
    flipped = images[:, ::-1, ::-1]  # what RAS voxels hold, laid out as Kaggle slices
    ras = nifti_case(tmp_path / "ras", flipped, ras_affine)
    assert np.allclose(nib.load(lps / "flair.nii.gz").affine @ [0, 0, 3, 1],
                       nib.load(ras / "flair.nii.gz").affine @ [images.shape[2] - 1, images.shape[1] - 1, 3, 1])
    world = {}
    for name, case in (("lps", lps), ("ras", ras)):
        assert predict(checkpoint, tmp_path / f"out-{name}", "--input", str(case)) == 0
        image = nib.load(str(tmp_path / f"out-{name}" / "masks" / f"{name}.nii.gz"))
        source = nib.load(str(case / "flair.nii.gz"))
        assert image.shape == source.shape and np.allclose(image.affine, source.affine)
        for code in ("qform_code", "sform_code"):
            assert image.header[code] == source.header[code], code
        assert image.get_data_dtype() == np.uint8 and set(np.unique(np.asarray(image.dataobj))) <= {0, 1}
        canonical = nib.as_closest_canonical(image)
        world[name] = (np.asarray(canonical.dataobj), canonical.affine)
    assert world["lps"][0].any() and np.allclose(world["lps"][1], world["ras"][1])
    assert np.array_equal(world["lps"][0], world["ras"][0])


def test_the_mask_is_displayed_as_a_mask_not_with_the_scans_window(tmp_path, checkpoint):
    """The mask's header was the FLAIR's copy: its display window (cal_min/cal_max, which viewers
    honour) showed the 0/1 mask as black, and its description was the scan's."""
    images, _ = head_volume(seed=12)
    case = nifti_case(tmp_path / "case", images)
    flair = nib.load(str(case / "flair.nii.gz"))
    flair.header["cal_min"], flair.header["cal_max"], flair.header["descrip"] = 0, 1500, b"FLAIR TE=120"
    nib.save(flair, str(case / "flair.nii.gz"))
    assert predict(checkpoint, tmp_path / "out", "--input", str(case)) == 0
    header = nib.load(str(tmp_path / "out" / "masks" / "case.nii.gz")).header
    assert (float(header["cal_min"]), float(header["cal_max"])) == (0.0, 1.0)
    assert header["descrip"].tobytes().rstrip(b"\0") == b"predicted FLAIR abnormality, 0/1 (lgg-unet)"


def test_probabilities_lie_on_the_flairs_grid_and_cut_at_the_threshold_give_the_raw_mask(tmp_path, checkpoint):
    """``--probabilities``: float32 values of 0-1 on the FLAIR's grid (a RAS affine, not the
    TIFFs' LPS), which cut at a threshold give the mask of ``--postprocess none`` at it voxel for
    voxel (but for probabilities equal to it, which float16, how they are held, rounds either way)."""
    images, _ = head_volume(seed=13)
    affine = np.diag([1.0, 1.0, 2.5, 1.0])
    affine[:2, 3] = -(images.shape[2] - 1), -(images.shape[1] - 1)
    case = nifti_case(tmp_path / "case", images[:, ::-1, ::-1], affine)
    assert predict(checkpoint, tmp_path / "out", "--input", str(case), "--probabilities") == 0
    prob_image = nib.load(str(tmp_path / "out" / "probabilities" / "case.nii.gz"))
    assert prob_image.get_data_dtype() == np.float32 and prob_image.shape == nib.load(str(case / "flair.nii.gz")).shape
    assert np.allclose(prob_image.affine, affine)
    mask_header = nib.load(str(tmp_path / "out" / "masks" / "case.nii.gz")).header
    assert [int(prob_image.header[c]) for c in ("qform_code", "sform_code")] == \
        [int(mask_header[c]) for c in ("qform_code", "sform_code")]
    assert (float(prob_image.header["cal_min"]), float(prob_image.header["cal_max"])) == (0.0, 1.0)
    prob = np.asarray(prob_image.dataobj)
    assert 0 <= prob.min() < prob.max() <= 1
    table = pd.read_csv(tmp_path / "out" / "predictions.csv")
    assert table["probabilities"].tolist() == [str(tmp_path / "out" / "probabilities" / "case.nii.gz")]
    threshold = between_float16_values(prob, 2 / 3)
    assert predict(checkpoint, tmp_path / "cut", "--input", str(case), "--postprocess", "none",
                   "--threshold", str(threshold)) == 0
    mask = np.asarray(nib.load(str(tmp_path / "cut" / "masks" / "case.nii.gz")).dataobj) > 0
    assert 0.1 < mask.mean() < 0.9 and ((prob > threshold) != mask).mean() < 0.005


def test_2d_slices_beside_scans_are_named_as_not_predicted(tmp_path, checkpoint, capsys):
    """A folder holding scans is read as scans, and 2D slice files beside them were left out without a word."""
    images, _ = head_volume(seed=15)
    case = nifti_case(tmp_path / "case", images)
    for name in ("P_1.tif", "P_2.png"):
        cv2.imwrite(str(case / name), images[0])
    assert predict(checkpoint, tmp_path / "out", "--input", str(case)) == 0
    assert (f"note: {case}: holds scans, so 2 2D slice files beside them (P_1.tif, ...) are not predicted; predict "
            "such files from a folder of their own") in capsys.readouterr().err


def test_square_field_of_view_by_hand():
    from data_files import square_field_of_view

    images = np.arange(8, dtype=np.float32).reshape(1, 2, 4, 1) - 3  # a 2 x 4 slice, minimum -3
    masks = np.array([[[0, 1, 1, 0], [0, 0, 1, 0]]], np.uint8)
    padded, padded_masks, window = square_field_of_view(images, masks, None)  # square pixels: pad to 4 x 4
    assert window == (1, 0, 2, 4)
    assert padded[0, :, :, 0].tolist() == [[-3] * 4, [-3, -2, -1, 0], [1, 2, 3, 4], [-3] * 4]
    assert padded_masks[0].tolist() == [[0] * 4, [0, 1, 1, 0], [0, 0, 1, 0], [0] * 4]
    # Pixels 2 mm high and 1 mm wide: 4 x 4 mm already, so nothing is padded.
    assert square_field_of_view(images, masks, (1.0, 2.0, 1.0))[2] is None
    # 1 mm high, 0.5 mm wide: 2 x 2 mm; a 4 x 4 matrix of them is 4 x 2 mm, padded to 4 x 8 pixels.
    tall = np.zeros((1, 4, 4, 1), np.float32)
    assert square_field_of_view(tall, np.zeros((1, 4, 4), np.uint8), (1.0, 1.0, 0.5))[0].shape == (1, 4, 8, 1)


@pytest.mark.parametrize("case_shape, dx, pad", [
    ((48, 36), 1.0, ((0, 0), (6, 6))),  # a rectangular field of view of square pixels
    ((48, 48), 0.75, ((0, 0), (8, 8))),  # a square matrix of pixels 1 mm high and 0.75 mm wide: 48 x 36 mm
])
def test_a_rectangular_field_of_view_reaches_the_network_unstretched(tmp_path, checkpoint, case_shape, dx, pad):
    """Every slice is resized to a square, as the dataset's 256 x 256 slices are: a scan whose field
    of view was not square reached the network stretched (1.33x here), without a word. Now it is
    padded to a square field of view, and the mask comes back on its own grid: the same mask as
    that of the scan padded by hand."""
    images, _ = head_volume(seed=13)
    images = images[:, :case_shape[0], :case_shape[1]]
    affine = np.diag([-dx, -1.0, 2.5, 1.0])
    by_hand = np.pad(images, ((0, 0), *pad, (0, 0)))  # the background, 0, is each channel's minimum here
    masks = {}
    for name, slices in (("rect", images), ("square", by_hand)):
        case = nifti_case(tmp_path / name, slices, affine=affine)
        assert predict(checkpoint, tmp_path / f"out-{name}", "--input", str(case), "--postprocess", "none") == 0
        masks[name], image = read_back(tmp_path / f"out-{name}" / "masks" / f"{name}.nii.gz")
        assert image.shape == nib.load(str(case / "flair.nii.gz")).shape  # each on its own grid
    (top, _), (left, _) = pad
    cropped = masks["square"][:, top:top + case_shape[0], left:left + case_shape[1]]
    assert masks["rect"].any() and np.array_equal(masks["rect"], cropped)


def test_evaluate_scores_a_padded_scan_on_its_own_grid(tmp_path, checkpoint):
    images, truth = head_volume(seed=14)
    images, truth = images[:, :, :36], truth[:, :, :36]
    nifti_case(tmp_path / "cases" / "P1", images, truth=truth)
    out = tmp_path / "eval"
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--input", str(tmp_path / "cases"),
                 "--out-dir", str(out), *RUN]) == 0
    row = json.loads((out / "metrics.json").read_text())["per_patient"][0]
    assert row["tumor_pixels"] == truth.sum() and row["slices"] == len(truth)
    overlay = cv2.imread(str(out / "overlays" / "P1.png"))
    assert overlay is not None  # the FLAIR drawn under the predictions is cut back to their grid too


def test_intensity_scale_and_offset_leave_the_prediction_unchanged(tmp_path, checkpoint):
    images, _ = head_volume(seed=1)
    masks = {}
    for name, scale, offset, dtype in (("eight", 1, 0, np.uint8), ("sixteen", 200, 1000, np.uint16),
                                       ("float", 0.01, -3.0, np.float32)):
        case = nifti_case(tmp_path / name, (images.astype(np.float64) * scale + offset).astype(dtype))
        assert predict(checkpoint, tmp_path / f"out-{name}", "--input", str(case)) == 0
        masks[name] = read_back(tmp_path / f"out-{name}" / "masks" / f"{name}.nii.gz")[0]
    assert masks["eight"].any()
    for name in ("sixteen", "float"):  # every door resizes in float32: no 8-bit rounding to differ by
        assert np.array_equal(masks[name], masks["eight"]), name


def test_model_intensities_by_hand():
    whole = np.array([0, 7, 255], np.uint16).reshape(1, 1, 3, 1).repeat(3, axis=-1)
    assert model_intensities(whole, "volume").dtype == np.uint8  # 8-bit values take the TIFFs' path
    deep = whole * 100 + 5
    assert model_intensities(deep, "volume").dtype == np.float32
    assert model_intensities(deep, "volume")[0, 0, :, 0].tolist() == [5, 705, 25505]
    # The authors' pipeline expects 0-255: each channel from its minimum..maximum.
    assert model_intensities(deep, "buda")[0, 0, :, 0].tolist() == [0, 7, 255]


def test_a_missing_t1_is_filled_with_flair_and_warned_once(tmp_path, checkpoint, capsys):
    images, _ = head_volume(seed=2)
    cases = tmp_path / "cases"
    for name in ("a", "b"):
        nifti_case(cases / name, images, sequences=("flair", "t1ce"))
    assert predict(checkpoint, tmp_path / "out", "--input", str(cases)) == 0
    err = capsys.readouterr().err
    assert err.count("no T1 (pre-contrast); the FLAIR is copied into its channel") == 1
    # The network saw exactly the FLAIR in channel 0: the same mask as a case whose t1 file is the FLAIR.
    filled = nifti_case(tmp_path / "copied", np.stack([images[..., 1], images[..., 1], images[..., 2]], -1))
    assert predict(checkpoint, tmp_path / "out-copied", "--input", str(filled)) == 0
    assert np.array_equal(read_back(tmp_path / "out" / "masks" / "a.nii.gz")[0],
                          read_back(tmp_path / "out-copied" / "masks" / "copied.nii.gz")[0])


def test_volume_in_mm3_is_the_voxel_count_times_the_spacing(tmp_path, checkpoint):
    images, _ = head_volume(seed=3)
    affine = np.diag([-0.5, -0.75, 3.0, 1.0])
    files = nifti_case(tmp_path / "case", images, affine)
    assert predict(checkpoint, tmp_path / "out", *(f"--{s}={files / f'{s}.nii.gz'}" for s in SEQUENCES)) == 0
    table = pd.read_csv(tmp_path / "out" / "predictions.csv")
    mask, _ = read_back(tmp_path / "out" / "masks" / "flair.nii.gz")
    assert len(table) == 1 and table["area_px"][0] == mask.sum() > 0
    assert table["volume_mm3"][0] == pytest.approx(mask.sum() * 0.5 * 0.75 * 3.0)
    assert (tmp_path / "out" / "overlays" / "flair.png").exists()  # one picture per case
    # --spacing is for 2D slices only, whichever door the scans come through.
    assert predict(checkpoint, tmp_path / "out2", "--input", str(files), "--spacing", "1,1,1") == 2
    assert predict(checkpoint, tmp_path / "out3", "--flair", str(files / "flair.nii.gz"), "--spacing", "1,1,1") == 2


def test_dicom_series_read_as_written(tmp_path):
    voxels = np.random.default_rng(4).integers(0, 4000, (6, 5, 4)).astype(np.uint16)
    affine = np.array([[0, 0, 2.5, -30], [-0.8, 0, 0, 12], [0, -0.9, 0, 40], [0, 0, 0, 1.0]])  # a sagittal series
    write_dicom_series(tmp_path / "s", voxels, affine)
    image = read_dicom_series(tmp_path / "s")
    assert np.allclose(image.affine, affine, atol=1e-4)
    assert np.array_equal(np.asarray(image.dataobj), voxels)


def test_evaluate_on_cases_counts_the_labels_asked_for(tmp_path, checkpoint, capsys):
    images, truth = head_volume(seed=5)
    labels = truth.copy()
    labels[3:7, 10:14, 26:38] = 4  # BraTS-like labels 1 and 4 inside 0
    nifti_case(tmp_path / "cases" / "P1", images, truth=labels, dtype=np.int16)
    per_label = {}
    for flag in ("nonzero", "4", "1,4"):
        out = tmp_path / f"eval-{flag}"
        assert main(["evaluate", "--checkpoint", str(checkpoint), "--input", str(tmp_path / "cases"),
                     "--labels", flag, "--out-dir", str(out), *RUN]) == 0
        row = json.loads((out / "metrics.json").read_text())["per_patient"][0]
        per_label[flag] = row
        assert row["hd95_mm"] is None or row["hd95_mm"] >= 0
    assert per_label["nonzero"]["tumor_pixels"] == per_label["1,4"]["tumor_pixels"] == truth.sum()
    assert per_label["4"]["tumor_pixels"] == (labels == 4).sum() < truth.sum()
    capsys.readouterr()
    # Labels no mask holds scored every case as tumor-free, Dice 0, in silence: now one line naming
    # the values there are. A case marked only with other labels is named in a warning.
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--input", str(tmp_path / "cases"),
                 "--labels", "2", "--out-dir", str(tmp_path / "eval-2"), *RUN]) == 2
    _one_line_error(capsys, "no mask holds any of --labels 2; they hold 1,4:", "--labels 1,4")
    assert not (tmp_path / "eval-2").exists()
    nifti_case(tmp_path / "cases" / "P3", images, truth=np.where(labels == 4, 4, 0).astype(np.int16), dtype=np.int16)
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--input", str(tmp_path / "cases"),
                 "--labels", "1", "--out-dir", str(tmp_path / "eval-1"), *RUN]) == 0
    assert ("warning: the masks of 1 case (P3) hold only 4, none of --labels 1: each is scored as a case without "
            "tumor") in capsys.readouterr().err
    for flag in (["--spacing", "1,1,1"], ["--patients", "all"], ["--data-dir", str(tmp_path)],  # not for scans
                 ["--strict"]):
        assert main(["evaluate", "--checkpoint", str(checkpoint), "--input", str(tmp_path / "cases"), *flag]) == 2
        _one_line_error(capsys, flag[0], "not --input's scans")
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--data-dir", str(tmp_path), "--labels", "4"]) == 2
    _one_line_error(capsys, "--labels", "a dataset folder's masks are 0/255")  # not ignored in silence
    # A case without a mask: one line.
    nifti_case(tmp_path / "nomask" / "P2", images)
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--input", str(tmp_path / "nomask"), *RUN]) == 2
    assert "no mask" in capsys.readouterr().err


def test_evaluate_on_cases_matches_evaluate_on_the_same_slices(tmp_path, checkpoint):
    """The same two patients as a kaggle_3m tree (with --spacing) and as NIfTI cases: same Dice, same HD95 in mm."""
    from conftest import write_slice

    results = {}
    for p in (6, 7):
        images, truth = head_volume(seed=p)
        for i, (image, mask) in enumerate(zip(images, truth)):
            write_slice(tmp_path / "tree" / f"P{p}", f"P{p}", i + 1, image, mask * 255)
        nifti_case(tmp_path / "cases" / f"P{p}", images, truth=truth)
    for name, source in (("tree", ["--data-dir", str(tmp_path / "tree"), "--patients", "all",
                                   "--spacing", "2.5,1,1"]), ("cases", ["--input", str(tmp_path / "cases")])):
        out = tmp_path / f"eval-{name}"
        assert main(["evaluate", "--checkpoint", str(checkpoint), *source, "--out-dir", str(out), *RUN]) == 0
        results[name] = json.loads((out / "metrics.json").read_text())
    for key in ("dice_per_volume_mean", "dice_global", "hd95_mm_mean"):
        assert results["cases"][key] == pytest.approx(results["tree"][key]), key
    assert results["cases"]["hd95_mm_mean"] is not None


# --- malformed inputs: one line naming the file, nothing already written lost ----------------------
def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error:") and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def test_malformed_nifti_inputs_get_one_line(tmp_path, checkpoint, capsys):
    images, _ = head_volume(seed=8)
    good = nifti_case(tmp_path / "good", images)
    data = (good / "flair.nii.gz").read_bytes()
    cases = {
        "truncated": lambda f: f.write_bytes(data[: len(data) // 2]),
        "flat": lambda f: nib.save(nib.Nifti1Image(images[0, ..., 1], TIFF_AFFINE), str(f)),
        "four_d": lambda f: nib.save(nib.Nifti1Image(np.stack([images[..., c] for c in range(3)], -1), TIFF_AFFINE),
                                     str(f)),
    }
    needles = {"truncated": "cannot be read as NIfTI", "flat": "a 2D image", "four_d": "split it into one file"}
    for name, make in cases.items():
        f = tmp_path / name / "flair.nii.gz"
        f.parent.mkdir()
        make(f)
        assert predict(checkpoint, tmp_path / f"out-{name}", "--flair", str(f)) == 2
        _one_line_error(capsys, str(f), needles[name])
        assert not (tmp_path / f"out-{name}").exists()
    # A T1 on another grid.
    write_nifti(good / "t1.nii.gz", images[..., 0], np.diag([-1.0, -1.0, 5.0, 1.0]))
    assert predict(checkpoint, tmp_path / "out-grid", "--input", str(good)) == 2
    _one_line_error(capsys, "t1.nii.gz", "t1.nii.gz: not on the grid of",
                    "spacing 1 x 1 x 5 mm, where the FLAIR has 1 x 1 x 2.5 mm;", "does not register")
    # One file given for two sequences was taken as both, without a word.
    flair = good / "flair.nii.gz"
    assert predict(checkpoint, tmp_path / "out-same", "--flair", str(flair), "--t1ce", str(flair)) == 2
    _one_line_error(capsys, f"--flair and --t1ce name the same {flair}", "leave --t1ce out")


def test_a_bad_case_among_good_ones_is_skipped_and_the_others_kept(tmp_path, checkpoint, capsys):
    images, _ = head_volume(seed=9)
    nifti_case(tmp_path / "cases" / "a", images)
    bad = nifti_case(tmp_path / "cases" / "b", images)
    (bad / "flair.nii.gz").write_bytes(gzip.compress(b"not a nifti at all"))
    assert predict(checkpoint, tmp_path / "out", "--input", str(tmp_path / "cases")) == 0
    printed = capsys.readouterr()
    assert "skipped:" in printed.err
    assert printed.out.startswith("predicted 1 case (") and ", skipped 1 case (listed above);" in printed.out
    assert pd.read_csv(tmp_path / "out" / "predictions.csv")["patient"].tolist() == ["a"]
    # Predicting into it again is refused and leaves it as it was.
    before = (tmp_path / "out" / "masks" / "a.nii.gz").read_bytes()
    assert predict(checkpoint, tmp_path / "out", "--input", str(tmp_path / "cases")) == 2
    _one_line_error(capsys, "already holds predictions")
    assert (tmp_path / "out" / "masks" / "a.nii.gz").read_bytes() == before


def test_malformed_dicom_inputs_get_one_line(tmp_path, checkpoint, capsys):
    images, _ = head_volume(seed=10)
    voxels = images[..., 1].transpose(2, 1, 0)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    assert predict(checkpoint, tmp_path / "o1", "--flair", str(tmp_path / "empty")) == 2
    _one_line_error(capsys, "empty", "no DICOM image")
    files = write_dicom_series(tmp_path / "gap", voxels, TIFF_AFFINE)
    files[4].unlink()
    assert predict(checkpoint, tmp_path / "o2", "--flair", str(tmp_path / "gap")) == 2
    _one_line_error(capsys, "a slice is missing between IM0003.dcm and IM0005.dcm", "5.0 mm apart")
    # Two series in one folder (the second's files renamed so that none is overwritten).
    for f in write_dicom_series(tmp_path / "second", voxels, TIFF_AFFINE):
        f.rename(tmp_path / "gap" / f"B{f.name}")
    assert predict(checkpoint, tmp_path / "o3", "--flair", str(tmp_path / "gap")) == 2
    _one_line_error(capsys, "several DICOM series in one folder", "named for its sequence (flair, t1, t1ce)")


def test_sequences_are_told_by_the_words_of_their_names():
    from pathlib import Path

    from scans import role_of

    names = {"BraTS20_Training_001_flair.nii.gz": "flair", "BraTS20_Training_001_t1ce.nii.gz": "t1ce",
             "BraTS20_Training_001_t1.nii.gz": "t1", "BraTS20_Training_001_t2.nii.gz": None,
             "BraTS-GLI-00000-000-t2f.nii.gz": "flair", "BraTS-GLI-00000-000-t1c.nii.gz": "t1ce",
             "BraTS-GLI-00000-000-t1n.nii.gz": "t1", "BraTS-GLI-00000-000-seg.nii.gz": "seg",
             "T1_post": "t1ce", "t1_pre": "t1", "case_0000.nii.gz": None}
    assert {name: role_of(Path(name)) for name in names} == names


def test_an_ambiguous_case_folder_lists_what_it_found(tmp_path, checkpoint, capsys):
    images, _ = head_volume(seed=11)
    case = nifti_case(tmp_path / "case", images)
    write_nifti(case / "flair_2.nii.gz", images[..., 1])
    assert predict(checkpoint, tmp_path / "out", "--input", str(case)) == 2
    _one_line_error(capsys, "2 entries look like flair", "flair.nii.gz, flair_2.nii.gz", "--flair")
    # evaluate takes no file flags: the advice is to rename (it named a --mask flag that never existed).
    (case / "flair_2.nii.gz").unlink()
    write_nifti(case / "seg.nii.gz", np.zeros(images.shape[:3], np.uint8))
    write_nifti(case / "mask.nii.gz", np.zeros(images.shape[:3], np.uint8))
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--input", str(case)]) == 2
    err = _one_line_error(capsys, "2 entries look like seg", "mask.nii.gz, seg.nii.gz", "rename them")
    assert "--mask" not in err


@requires_real_data
def test_a_real_patient_gives_the_same_mask_through_every_door(tmp_path, checkpoint):
    """TIFF slices, a NIfTI case folder, a DICOM series per sequence, and 16-bit NIfTI scaled and
    shifted: one mask, voxel for voxel (three NIfTI files by flag: test_volume_in_mm3...), and one
    probability: the same values where the sequences arrive as 8-bit values, as the TIFFs do."""
    patient = sorted(p for p in REAL_DATA.iterdir() if p.is_dir())[0]
    files = sorted((f for f in patient.glob("*.tif") if not f.stem.endswith("_mask")),
                   key=lambda f: int(f.stem.rpartition("_")[2]))
    images = np.stack([cv2.imread(str(f), cv2.IMREAD_COLOR)[..., ::-1] for f in files])
    assert predict(checkpoint, tmp_path / "tiff", "--input", str(patient), "--probabilities") == 0
    tiff = np.stack([cv2.imread(str(tmp_path / "tiff" / "masks" / patient.name / f"{f.stem}_pred.png"),
                                cv2.IMREAD_UNCHANGED) > 0 for f in files])
    tiff_prob = np.stack([cv2.imread(str(tmp_path / "tiff" / "probabilities" / patient.name / f"{f.stem}_prob.tif"),
                                     cv2.IMREAD_UNCHANGED) for f in files])
    assert 0 < tiff.sum() < tiff.size // 4
    case = nifti_case(tmp_path / patient.name, images)
    dicom = tmp_path / "dicom" / patient.name
    for c, name in enumerate(SEQUENCES):
        write_dicom_series(dicom / name, images[..., c].transpose(2, 1, 0), TIFF_AFFINE)
    scaled = nifti_case(tmp_path / "scaled" / patient.name, images.astype(np.float64) * 180 + 1500, dtype=np.uint16)
    doors = {"nifti": ["--input", str(case)],
             "dicom": ["--input", str(dicom)],
             "scaled": ["--input", str(scaled)]}
    for door, flags in doors.items():
        assert predict(checkpoint, tmp_path / door, *flags, "--probabilities") == 0, door
        mask_file = next((tmp_path / door / "masks").glob("*.nii.gz"))
        mask, image = read_back(mask_file)
        source = nib.load(str(case / "flair.nii.gz"))
        assert image.shape == source.shape and np.allclose(image.affine, source.affine), door
        if door == "dicom":  # scanner coordinates in both forms, as dcm2niix writes them
            assert (image.header["qform_code"], image.header["sform_code"]) == (1, 1)
        assert np.array_equal(mask, tiff), (door, int((mask != tiff).sum()))
        prob, _ = read_back(next((tmp_path / door / "probabilities").glob("*.nii.gz")))
        if door == "scaled":  # float32 statistics of other values: equal but for a float16 step (2.4e-4) or two
            assert np.abs(prob - tiff_prob).max() < 5e-4
        else:
            assert np.array_equal(prob, tiff_prob), door


def test_nan_and_infinite_voxels_are_the_background_and_said_once_per_file(tmp_path, checkpoint, capsys):
    """Some tools write NaN outside their mask. One such voxel made the per-volume statistics NaN
    and the whole mask empty, silently; NaN (or inf) is now the image's lowest value, its air."""
    images, _ = head_volume(seed=3)
    values = images.astype(np.float32) * 0.01 - 3.0  # a float scale whose background, -3, is not 0
    holed = values.copy()
    holed[:, :4] = np.nan  # the top rows are air in every slice
    holed[0, -1, -1] = np.inf
    assert (images[:, :4] == 0).all() and (images[0, -1, -1] == 0).all()
    masks = {}
    for name, data in (("plain", values), ("holed", holed)):
        assert predict(checkpoint, tmp_path / f"out-{name}", "--input", str(nifti_case(tmp_path / name, data))) == 0
        masks[name] = read_back(tmp_path / f"out-{name}" / "masks" / f"{name}.nii.gz")[0]
    assert masks["plain"].any() and np.array_equal(masks["holed"], masks["plain"])
    err = capsys.readouterr().err
    count = 4 * images.shape[0] * images.shape[2] + 1
    for sequence in SEQUENCES:
        assert err.count(f"holed/{sequence}.nii.gz: {count:,} voxels") == 1, err
    assert "NaN or infinite" in err and "plain/" not in err
    # Nothing finite at all is refused in one line.
    nifti_case(tmp_path / "void", np.full(values.shape, np.nan, np.float32))
    assert predict(checkpoint, tmp_path / "out-void", "--input", str(tmp_path / "void")) == 2
    assert "flair.nii.gz: every voxel is NaN or infinite" in capsys.readouterr().err


def test_a_sequence_of_one_value_is_refused_not_guessed(tmp_path, checkpoint, capsys):
    # A blank export normalizes to zeros, and the network's output on zeros was written as a mask.
    images, _ = head_volume(seed=3)
    nifti_case(tmp_path / "blank", np.zeros(images.shape, np.float32))
    assert predict(checkpoint, tmp_path / "out", "--input", str(tmp_path / "blank")) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "flair.nii.gz: every voxel is 0, an image with nothing to segment" in err
    assert not (tmp_path / "out").exists()
    # So is one whose only finite value is one number (the rest NaN).
    holed = np.full(images.shape, 7.0, np.float32)
    holed[:, :4] = np.nan
    nifti_case(tmp_path / "holed", holed)
    assert predict(checkpoint, tmp_path / "out", "--input", str(tmp_path / "holed")) == 2
    assert "every voxel is 7, an image with nothing to segment" in capsys.readouterr().err


def _seg_on_voxels(seg_path, affine, shape):
    """A DICOM SEG's frames placed on the voxels of a NIfTI grid (``affine``, ``shape``) by their
    own geometry (position, orientation, pixel spacing), as a viewer places them; asserts that
    every segmented pixel lands on a voxel centre."""
    import pydicom

    seg = pydicom.dcmread(seg_path)
    frames = seg.pixel_array.reshape(int(seg.NumberOfFrames), seg.Rows, seg.Columns)
    shared = seg.SharedFunctionalGroupsSequence[0]
    orient = np.array(shared.PlaneOrientationSequence[0].ImageOrientationPatient, float)
    dy, dx = (float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing)  # between rows, between columns
    placed = np.zeros(shape, np.uint8)
    to_voxel = np.linalg.inv(affine)
    for frame, group in zip(frames, seg.PerFrameFunctionalGroupsSequence):
        origin = np.array(group.PlanePositionSequence[0].ImagePositionPatient, float)
        rows, cols = np.nonzero(frame)
        lps = origin + np.outer(cols * dx, orient[:3]) + np.outer(rows * dy, orient[3:])
        ras = lps * [-1, -1, 1]
        ijk = (to_voxel[:3, :3] @ ras.T).T + to_voxel[:3, 3]
        assert np.allclose(ijk, np.round(ijk), atol=1e-3)
        i, j, k = np.round(ijk).astype(int).T
        placed[i, j, k] = 1
    return seg, placed


def test_a_dicom_seg_covers_the_voxels_of_the_nifti_mask_and_references_each_slice(tmp_path):
    """A sagittal series with a grid of three different sizes, so that no transposed or flipped
    axis goes unnoticed: the SEG's frames, placed by their own geometry, cover exactly the voxels
    the NIfTI mask holds, and each frame references the FLAIR slice at its position."""
    pytest.importorskip("highdicom")
    import pydicom

    from scans import load_case, write_dicom_seg, write_mask

    voxels = np.random.default_rng(4).integers(0, 4000, (12, 10, 7)).astype(np.uint16)
    affine = np.array([[0, 0, 2.5, -30], [-0.8, 0, 0, 12], [0, -0.9, 0, 40], [0, 0, 0, 1.0]])
    files = write_dicom_series(tmp_path / "flair", voxels, affine)
    case = load_case("c", {"flair": tmp_path / "flair"})
    mask = np.random.default_rng(5).random(case.truth.shape) < 0.2
    mask[:, :, 0] = False  # a source slice without tumor: its frame is left out
    nifti = nib.load(str(write_mask(mask, case, tmp_path / "m.nii.gz")))
    seg, placed = _seg_on_voxels(write_dicom_seg(mask, case, tmp_path / "m.seg.dcm", algorithm="tiny.pt, epoch 1"),
                                 nifti.affine, nifti.shape)
    assert np.array_equal(placed, np.asarray(nifti.dataobj)) and placed.sum() == mask.sum()
    sources = {ds.SOPInstanceUID: ds for ds in map(pydicom.dcmread, files)}
    assert int(seg.NumberOfFrames) == 6  # 7 slices, one without tumor
    for group in seg.PerFrameFunctionalGroupsSequence:
        source = sources[group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID]
        assert np.allclose(source.ImagePositionPatient, group.PlanePositionSequence[0].ImagePositionPatient)
    first = next(iter(sources.values()))
    assert (seg.StudyInstanceUID, seg.FrameOfReferenceUID, seg.PatientID) == (
        first.StudyInstanceUID, first.FrameOfReferenceUID, first.PatientID)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == first.SeriesInstanceUID
    assert seg.SegmentSequence[0].SegmentAlgorithmName == "lgg-unet"
    # No tumor at all: every frame is written, empty, rather than no SEG.
    seg, placed = _seg_on_voxels(write_dicom_seg(np.zeros_like(mask), case, tmp_path / "e.seg.dcm", algorithm="t"),
                                 nifti.affine, nifti.shape)
    assert int(seg.NumberOfFrames) == 7 and placed.sum() == 0


def test_predict_writes_a_dicom_seg_beside_the_nifti_mask(tmp_path, checkpoint):
    pytest.importorskip("highdicom")
    images, _ = head_volume(seed=11)
    case = tmp_path / "cases" / "P1"
    for c, name in enumerate(SEQUENCES):
        write_dicom_series(case / name, images[..., c].transpose(2, 1, 0), TIFF_AFFINE)
    assert predict(checkpoint, tmp_path / "out", "--input", str(case), "--dicom-seg") == 0
    table = pd.read_csv(tmp_path / "out" / "predictions.csv")
    assert list(table["dicom_seg"]) == [str(tmp_path / "out" / "masks" / "P1.seg.dcm")]
    nifti = nib.load(str(tmp_path / "out" / "masks" / "P1.nii.gz"))
    _, placed = _seg_on_voxels(table["dicom_seg"][0], nifti.affine, nifti.shape)
    assert np.array_equal(placed, np.asarray(nifti.dataobj))


def test_dicom_seg_is_refused_in_one_line_where_it_cannot_be_written(tmp_path, checkpoint, capsys, monkeypatch):
    import importlib

    import pydicom

    images, _ = head_volume(seed=12)
    nifti = nifti_case(tmp_path / "nifti", images)
    assert predict(checkpoint, tmp_path / "o1", "--input", str(nifti), "--dicom-seg") == 2
    _one_line_error(capsys, "--dicom-seg: the FLAIR of nifti is not a DICOM series folder")
    slices = tmp_path / "slices"
    slices.mkdir()
    cv2.imwrite(str(slices / "s_1.png"), images[0])
    assert predict(checkpoint, tmp_path / "o2", "--input", str(slices), "--dicom-seg") == 2
    _one_line_error(capsys, "--dicom-seg is for scans read from DICOM series")
    series = {name: write_dicom_series(tmp_path / "dicom" / name, images[..., c].transpose(2, 1, 0), TIFF_AFFINE)
              for c, name in enumerate(SEQUENCES)}
    files = series["flair"]
    real_import = importlib.import_module
    with monkeypatch.context() as m:
        m.setattr(importlib, "import_module",
                  lambda name, *a: (_ for _ in ()).throw(ImportError(name)) if name == "highdicom" else real_import(name, *a))
        assert predict(checkpoint, tmp_path / "o3", "--input", str(tmp_path / "dicom"), "--dicom-seg") == 2
    _one_line_error(capsys, "--dicom-seg needs the optional package highdicom: pip install highdicom")
    if importlib.util.find_spec("highdicom") is None:
        return
    import highdicom

    def odd(*args, **kwargs):
        raise ValueError("a header highdicom\ncannot take")

    with monkeypatch.context() as m:
        m.setattr(highdicom.seg, "Segmentation", odd)
        assert predict(checkpoint, tmp_path / "o5", "--input", str(tmp_path / "dicom"), "--dicom-seg") == 2
    _one_line_error(capsys, "highdicom could not make a DICOM SEG of this series (ValueError: a header highdicom "
                    "cannot take); the NIfTI mask beside it was written")
    assert (tmp_path / "o5" / "masks" / "dicom.nii.gz").is_file()
    for f in files:  # an anonymizer that dropped the study's UID
        ds = pydicom.dcmread(f)
        del ds.StudyInstanceUID
        ds.save_as(f)
    assert predict(checkpoint, tmp_path / "o4", "--input", str(tmp_path / "dicom"), "--dicom-seg") == 2
    _one_line_error(capsys, f"{files[0]}: lacks StudyInstanceUID")
    assert not (tmp_path / "o4").exists()  # refused before anything was predicted
