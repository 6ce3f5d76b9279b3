"""download (kagglehub mocked), the dataset report, the completeness check and clinical fields."""

import json
import sys
import types
import zipfile

import numpy as np
import pandas as pd
import pytest
from conftest import REAL_DATA, requires_real_data, write_slice
from PIL import Image

from data_commands import summarize_dataset
from data_files import find_data_dir
from engine import main
from reports import write_per_patient_csv


@requires_real_data
def test_report_counts_on_the_shared_subset(tmp_path):
    out = tmp_path / "report.json"
    assert main(["data", "--data-dir", str(REAL_DATA), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    folders = sorted(p for p in REAL_DATA.iterdir() if p.is_dir())
    masks = [m for p in folders for m in p.glob("*_mask.tif")]
    tumor = [m for m in masks if (np.asarray(Image.open(m)) > 127).any()]
    assert report["patients"] == len(folders)
    assert report["slices"] == len(masks)
    assert report["tumor_slices"] == len(tumor)
    # PIL reads file order: pre-contrast, FLAIR, post-contrast. Each patient's images read once.
    identical, in_place = [], {"pre-contrast": [], "post-contrast": []}
    for p in folders:
        images = [np.asarray(Image.open(f)) for f in p.glob("*.tif") if not f.name.endswith("_mask.tif")]
        if all((im[..., 0] == im[..., 1]).all() and (im[..., 1] == im[..., 2]).all() for im in images):
            identical.append(p.name)
            continue
        for modality, c in (("pre-contrast", 0), ("post-contrast", 2)):
            if all((im[..., c] == im[..., 1]).all() for im in images):
                in_place[modality].append(p.name)
    assert report["patients_with_identical_channels"] == identical
    assert report["patients_with_flair_in_place_of"] == in_place
    assert report["patients_with_flair_in_place_of"]["post-contrast"]  # the subset has some
    institutions = {}
    for p in folders:
        key = "_".join(p.name.split("_")[:2])
        institutions[key] = institutions.get(key, 0) + 1
    assert report["institutions"] == institutions
    assert report["completeness"]["status"] == "subset" and report["problems"] == []
    assert report["clinical_table"]["rows"] == len(pd.read_csv(REAL_DATA / "data.csv"))


def test_report_on_a_tree_with_planted_problems(tmp_path):
    root = tmp_path / "kaggle_3m"
    rng = np.random.default_rng(0)
    tumor = np.zeros((8, 8), np.uint8)
    tumor[2:5, 2:6] = 255  # 12 pixels
    for i in (1, 2, 3):
        write_slice(root / "TCGA_AA_0001_2000", "TCGA_AA_0001_2000", i,
                    rng.integers(0, 255, (8, 8, 3), dtype=np.uint8), tumor if i == 2 else tumor * 0)
        gray = rng.integers(0, 255, (8, 8, 1), dtype=np.uint8).repeat(3, axis=2)  # one modality x3
        write_slice(root / "TCGA_BB_0002_2000", "TCGA_BB_0002_2000", i, gray, tumor * 0)  # no tumor
        no_post = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
        no_post[..., 2] = no_post[..., 1]  # FLAIR stored in place of post-contrast
        write_slice(root / "TCGA_CC_0003_2000", "TCGA_CC_0003_2000", i, no_post, tumor)
    (root / "TCGA_AA_0001_2000" / "TCGA_AA_0001_2000_3_mask.tif").unlink()  # image without mask
    (root / "TCGA_BB_0002_2000" / "TCGA_BB_0002_2000_2.tif").write_bytes(b"")  # unreadable
    report = summarize_dataset(root)
    assert (report["patients"], report["slices"], report["tumor_slices"]) == (3, 8, 4)
    assert report["institutions"] == {"TCGA_AA": 1, "TCGA_BB": 1, "TCGA_CC": 1}
    assert report["patients_without_tumor"] == ["TCGA_BB_0002_2000"]
    assert report["patients_with_identical_channels"] == ["TCGA_BB_0002_2000"]
    assert report["patients_with_flair_in_place_of"] == {"pre-contrast": [], "post-contrast": ["TCGA_CC_0003_2000"]}
    assert report["tumor_area_px"]["count"] == 4 and report["tumor_area_px"]["max"] == 12
    assert report["mask_values"] == {"0": 7 * 64 - 4 * 12, "255": 4 * 12}
    assert "1 skipped: image without mask" in report["problem_summary"]
    assert "1 skipped: unreadable file" in report["problem_summary"]
    assert any("TCGA_BB_0002_2000_2.tif" in p for p in report["problems"])
    assert report["completeness"]["status"] == "subset"


def test_full_copy_with_missing_patients_says_what_is_missing(tmp_path):
    root = tmp_path / "kaggle_3m"
    ids = [f"TCGA_XX_{i:04d}" for i in range(110)]
    for pid in ids[:3]:
        write_slice(root / f"{pid}_2000", f"{pid}_2000", 1, np.ones((8, 8, 3), np.uint8), np.zeros((8, 8), np.uint8))
    pd.DataFrame({"Patient": ids, "age": [40] * 110}).to_csv(root / "data.csv", index=False)
    completeness = summarize_dataset(root)["completeness"]
    assert completeness["status"] == "incomplete"
    assert completeness["missing_patients"] == ids[3:]
    assert "107 patient folders missing" in completeness["message"] and "TCGA_XX_0003" in completeness["message"]
    assert "3,926 of 3,929 slice/mask pairs missing" in completeness["message"]  # 3 slices written


def fake_kagglehub(monkeypatch, download):
    module = types.ModuleType("kagglehub")
    module.dataset_download = download
    monkeypatch.setitem(sys.modules, "kagglehub", module)


def test_download_unpacks_and_is_found(tmp_path, monkeypatch):
    # A small archive shaped like Kaggle's: the tree twice, once under lgg-mri-segmentation/.
    src = tmp_path / "src"
    write_slice(src / "TCGA_AA_0001_2000", "TCGA_AA_0001_2000", 1, np.ones((8, 8, 3), np.uint8),
                np.zeros((8, 8), np.uint8))
    archive = tmp_path / "archive.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for f in src.rglob("*.tif"):
            for prefix in ("kaggle_3m", "lgg-mri-segmentation/kaggle_3m"):
                z.write(f, f"{prefix}/{f.relative_to(src)}")
    asked = []
    fake_kagglehub(monkeypatch, lambda handle: asked.append(handle) or str(archive))
    to = tmp_path / "data"
    assert main(["download", "--to", str(to)]) == 0
    assert asked == ["mateuszbuda/lgg-mri-segmentation"]
    assert sorted(p.name for p in (to / "kaggle_3m" / "TCGA_AA_0001_2000").iterdir()) == [
        "TCGA_AA_0001_2000_1.tif", "TCGA_AA_0001_2000_1_mask.tif"]
    assert find_data_dir(str(to)) == to / "kaggle_3m"
    assert not (to / "kaggle_3m.partial").exists()
    # The archive's extracted copy was left beside --to as data.unzipped (the clean-up looked inside it).
    assert sorted(p.name for p in tmp_path.iterdir()) == ["archive.zip", "data", "src"]
    assert sorted(p.name for p in to.iterdir()) == ["kaggle_3m"]
    # A folder holding the archive (as kagglehub may leave it), into a new --to: unpacked the same way.
    (tmp_path / "cache").mkdir()
    archive.rename(tmp_path / "cache" / "archive.zip")
    fake_kagglehub(monkeypatch, lambda handle: str(tmp_path / "cache"))
    assert main(["download", "--to", str(tmp_path / "data2")]) == 0
    assert sorted(p.name for p in (tmp_path / "data2").iterdir()) == ["kaggle_3m"]
    # An archive without the dataset: one line, and nothing extracted is left behind.
    with zipfile.ZipFile(tmp_path / "cache" / "archive.zip", "w") as z:
        z.writestr("readme.txt", "not the dataset")
    assert main(["download", "--to", str(tmp_path / "data3")]) == 2
    assert not (tmp_path / "data3").exists() or not list((tmp_path / "data3").iterdir())


def test_download_to_a_file_is_refused_before_downloading(tmp_path, monkeypatch, capsys):
    """--to naming a file downloaded the whole archive, then failed in mkdir with a traceback."""
    asked = []
    fake_kagglehub(monkeypatch, lambda handle: asked.append(handle) or str(tmp_path))
    (tmp_path / "notes.txt").write_text("kept")
    for to in (tmp_path / "notes.txt", tmp_path / "notes.txt" / "data"):
        assert main(["download", "--to", str(to)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {to}: ") and "is a file, not a folder; choose another --to" in err
    assert asked == [] and (tmp_path / "notes.txt").read_text() == "kept"


@pytest.mark.parametrize("failure", ["offline", "not installed"])
def test_download_fallback_message(tmp_path, monkeypatch, capsys, failure):
    if failure == "offline":
        def offline(handle):
            raise ConnectionError("Max retries exceeded with url: /api/v1/datasets")
        fake_kagglehub(monkeypatch, offline)
    else:
        monkeypatch.setitem(sys.modules, "kagglehub", None)  # import fails
    assert main(["download", "--to", str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    for text in ("kaggle.com/datasets/mateuszbuda/lgg-mri-segmentation", "archive.zip", "kaggle_3m", "LGG_DATA_DIR"):
        assert text in err
    # The manual steps unpack where --to says, and name that folder: they said lgg-mri-segmentation.
    to = tmp_path / "data"
    assert f"'unzip archive.zip -d {to}' and pass --data-dir {to / 'kaggle_3m'}" in err
    assert not (tmp_path / "data" / "kaggle_3m").exists()
    # Without --to, the folder the loader looks in.
    monkeypatch.chdir(tmp_path)
    assert main(["download"]) == 2
    assert "'unzip archive.zip -d lgg-mri-segmentation' next to engine.py" in capsys.readouterr().err


def test_per_patient_csv_joins_clinical_fields(tmp_path):
    metrics = {"per_patient": [
        {"patient": "TCGA_AA_0001_2000", "dice": 0.5, "iou": 0.3, "hd95_px": 2.0, "hd95_mm": None,
         "tumor_pixels": 10, "predicted_pixels": 8, "slices": 3, "tumor_slices": 1},
        {"patient": "TCGA_BB_0002_2000", "dice": 0.9, "iou": 0.8, "hd95_px": 1.0, "hd95_mm": None,
         "tumor_pixels": 20, "predicted_pixels": 21, "slices": 4, "tumor_slices": 2}]}
    clinical = pd.DataFrame({"Patient": ["TCGA_AA_0001"], "age_at_initial_pathologic": [44],
                             "neoplasm_histologic_grade": [None]}).set_index("Patient")
    frame = pd.read_csv(write_per_patient_csv(tmp_path, metrics, clinical))
    assert list(frame["patient"]) == ["TCGA_AA_0001_2000", "TCGA_BB_0002_2000"]
    assert frame.loc[0, "age_at_initial_pathologic"] == 44
    assert pd.isna(frame.loc[1, "age_at_initial_pathologic"])  # no clinical row: empty, not an error
    assert frame.loc[0, "true_area_px"] == 10
