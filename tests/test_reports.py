"""Reports are written headless: files exist, images decode and show something, tables are complete."""

import csv
import json

import matplotlib.image as mpimg
import numpy as np
import pytest

from engine import main
from reports import PRED_COLOR, TRUTH_COLOR, overlay_slice


def test_overlay_slice_draws_both_outlines_exactly():
    flair = np.tile(np.arange(16, dtype=np.uint8) * 10, (16, 1))
    truth = np.zeros((16, 16), bool)
    truth[4:8, 4:8] = True
    pred = np.zeros((16, 16), bool)
    pred[9:14, 9:14] = True
    out = overlay_slice(flair, truth, pred)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert tuple(out[4, 4]) == TRUTH_COLOR and tuple(out[7, 5]) == TRUTH_COLOR  # border
    assert tuple(out[9, 13]) == PRED_COLOR
    assert out[5, 5, 0] == out[5, 5, 1] == out[5, 5, 2]  # inside the outline: gray FLAIR
    assert out[0, 0, 0] == out[0, 0, 1] == out[0, 0, 2]  # gray background


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reports")
    argv = ["--synthetic", "--synthetic-dir", str(tmp / "syn"), "--synthetic-patients", "5",
            "--synthetic-slices", "8", "--image-size", "32", "--features", "4", "--epochs", "2",
            "--batch-size", "4", "--device", "cpu", "--no-progress", "--cache-dir", str(tmp / "cache"),
            "--out-dir", str(tmp / "run")]
    assert main(argv) == 0
    return tmp / "run"


def _has_color(image: np.ndarray, rgb: tuple[int, int, int], tol: int = 60) -> bool:
    pixels = (image[..., :3] * 255 if image.dtype != np.uint8 else image[..., :3]).astype(int)
    return bool((np.abs(pixels - np.array(rgb)).max(axis=-1) <= tol).any())


def test_run_writes_every_report(run):
    metrics = json.loads((run / "metrics.json").read_text())
    val = [p["patient"] for p in metrics["per_patient"]]
    for name in ("curves.png", "dice_per_volume.png", *(f"overlays/{p}.png" for p in val)):
        image = mpimg.imread(run / name)
        assert image.ndim == 3 and image[..., :3].std() > 0.02, name  # decodes, not blank
    for p in val:
        # Every synthetic patient has tumor slices: the truth outline (green) is drawn.
        assert _has_color(mpimg.imread(run / "overlays" / f"{p}.png"), TRUTH_COLOR), p
    with open(run / "per_patient.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["patient"] for r in rows] == val
    for r, m in zip(rows, metrics["per_patient"]):
        assert float(r["dice"]) == pytest.approx(m["dice"]) and int(r["slices"]) == 8
        assert int(r["true_area_px"]) == m["tumor_pixels"] > 0 and int(r["pred_area_px"]) == m["predicted_pixels"]
        assert {"iou", "hd95_px", "tumor_slices"} <= r.keys()
    summary = (run / "summary.md").read_text()
    for text in ("Synthetic data", "dice_per_volume_mean", "overlays/", "curves.png", "torch", "Worst and best",
                 f"{metrics['dice_per_volume_mean']:.4f}"):
        assert text in summary, text


def test_evaluate_writes_the_same_reports(run, tmp_path):
    out = tmp_path / "eval"
    assert main(["evaluate", "--checkpoint", str(run / "best.pt"), "--device", "cpu", "--no-progress",
                 "--cache-dir", "off", "--out-dir", str(out)]) == 0
    for name in ("metrics.json", "per_patient.csv", "dice_per_volume.png", "summary.md"):
        assert (out / name).is_file(), name
    assert len(list((out / "overlays").glob("*.png"))) == len(json.loads((out / "metrics.json").read_text())["per_patient"])
