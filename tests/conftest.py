"""Shared fixtures: the repository root on sys.path, tiny synthetic trees, the shared real subset."""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_files import make_volume  # noqa: E402  (needs the root on sys.path)

# The real subset (66 patients since 2026-12-05), beside the repository; absent on users' clones.
REAL_DATA = ROOT.parent / "shared" / "data" / "lgg_subset" / "kaggle_3m"
requires_real_data = pytest.mark.skipif(
    not REAL_DATA.is_dir(), reason=f"real LGG subset not found at {REAL_DATA}"
)


def lesion_volume(name: str, y: int, x: int, tumor_slices: tuple[int, ...], copies: bool = False, n: int = 8):
    """An n-slice 48 px head (a disk of 90-110) with a 4 px square lesion of 200s at (y, x) on
    ``tumor_slices``; with ``copies``, FLAIR in all three channels, as for a patient lacking both others."""
    rng = np.random.default_rng(ord(name))
    yy, xx = np.mgrid[:48, :48]
    head = (yy - 24) ** 2 + (xx - 24) ** 2 < 22 ** 2
    images = np.where(head[None, ..., None], rng.integers(90, 110, (n, 48, 48, 3)), 0).astype(np.uint8)
    masks = np.zeros((n, 48, 48), np.uint8)
    for j in tumor_slices:
        masks[j, y:y + 4, x:x + 4] = 1
    images[masks > 0] = 200
    if copies:
        images[..., 0] = images[..., 2] = images[..., 1]
    return make_volume(name, images, masks, list(range(1, n + 1)))


def write_slice(folder: Path, patient: str, index: int, rgb: np.ndarray, mask: np.ndarray) -> None:
    """Write one Kaggle-style image/mask pair; ``rgb`` is (H, W, 3) in file order."""
    folder.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(folder / f"{patient}_{index}.tif"), np.ascontiguousarray(rgb[..., ::-1]))
    cv2.imwrite(str(folder / f"{patient}_{index}_mask.tif"), mask)


@pytest.fixture
def fake_tree(tmp_path: Path) -> Path:
    """kaggle_3m-style tree: 5 patients with slices 8, 9 and 10 (16x16) plus stray files."""
    root = tmp_path / "kaggle_3m"
    rng = np.random.default_rng(0)
    for p in range(5):
        name = f"TCGA_XX_{p:04d}_20000101"
        for index in (10, 9, 8):
            rgb = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            mask = np.zeros((16, 16), np.uint8)
            mask[4:8, 4:8] = 255
            write_slice(root / name, name, index, rgb, mask)
        (root / name / ".DS_Store").write_bytes(b"\0\1")
        (root / name / "notes.txt").write_text("not a slice")
    (root / "data.csv").write_text("Patient,age\n")
    (root / "README.md").write_text("readme")
    return root


@pytest.fixture(autouse=True)
def private_cache_home(tmp_path, monkeypatch):
    """Keep the default decoded-slice cache of every test inside its tmp_path, never in ~/.cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


def read_mask(path: Path, issues=None) -> np.ndarray:
    """One mask file as (H, W) uint8 {0, 1}, by the convention its own values show (the package
    reads whole patients at once: ``read_patient_masks``)."""
    from data_files import read_patient_masks

    return read_patient_masks([path], issues)[0][0]


def unet_to_buda(state_dict: dict) -> dict:
    """Our UNet's state_dict in Buda et al.'s key names: the inverse of ``model.buda_to_unet``, to
    write files in their layout."""
    from model import _buda_key_map

    inverse = {ours: theirs for theirs, ours in _buda_key_map().items()}
    return {f"{inverse[key.rpartition('.')[0]]}.{key.rpartition('.')[2]}": value for key, value in state_dict.items()}


def synthetic_tree(folder, patients: int, slices: int) -> str:
    """A synthetic kaggle_3m tree of 64 px slices in ``folder`` (generated once, then reused), for
    --data-dir: a quarter of the default size's side, enough for the tests' 32 px models."""
    from synthetic_data import make_synthetic_dataset

    return str(make_synthetic_dataset(Path(folder), patients=patients, slices=slices, size=64, seed=42))


# A Kaggle slice's rows run anterior -> posterior and its columns from the patient's right to left
# (radiological, as DICOM displays): stacked as (column, row, slice) voxels that is LPS, here
# with the issue's 1 x 1 x 2.5 mm spacing.
TIFF_AFFINE = np.diag([-1.0, -1.0, 2.5, 1.0])


def write_nifti(path: Path, slices: np.ndarray, affine: np.ndarray = TIFF_AFFINE) -> Path:
    """Save (D, H, W) slices (Kaggle layout) as a NIfTI volume of (W, H, D) voxels under ``affine``."""
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(slices.transpose(2, 1, 0)), affine), str(path))
    return path


def write_dicom_series(folder: Path, voxels: np.ndarray, affine: np.ndarray, series: str = "") -> list[Path]:
    """Write (X, Y, Z) uint16 ``voxels`` on a RAS ``affine`` as a DICOM MR series, one file a slice,
    the geometry DICOM's way (LPS positions, row/column cosines, pixel spacing)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    steps = np.linalg.norm(lps[:3, :3], axis=0)
    series_uid, paths = series or generate_uid(), []
    study_uid, frame_uid = generate_uid(), generate_uid()  # as a scanner's export has them
    for k in range(voxels.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MRImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.SeriesInstanceUID, ds.InstanceNumber = "MR", series_uid, k + 1
        ds.StudyInstanceUID, ds.FrameOfReferenceUID, ds.SeriesNumber = study_uid, frame_uid, 3
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Patient", "LGG-0001", "", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "120000", "1", ""
        ds.ReferringPhysicianName = ""
        ds.ImageOrientationPatient = [*(lps[:3, 0] / steps[0]), *(lps[:3, 1] / steps[1])]
        ds.ImagePositionPatient = [float(v) for v in (lps @ [0, 0, k, 1])[:3]]
        ds.PixelSpacing, ds.SliceThickness = [float(steps[1]), float(steps[0])], float(steps[2])
        plane = np.ascontiguousarray(voxels[:, :, k].T.astype(np.uint16))  # rows = j, columns = i
        ds.Rows, ds.Columns = plane.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = plane.tobytes()
        path = folder / f"IM{k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def tiny_checkpoint(path: Path, image_size: int = 32, normalization: str = "volume") -> Path:
    """A seeded, untrained 4-feature UNet saved as a checkpoint of this package."""
    import torch

    from model import UNet

    torch.manual_seed(0)
    config = {"features": 4, "image_size": image_size, "channels_last": True, "threshold": 0.5,
              "normalization": normalization, "resolved_data_dir": "", "seed": 0, "batch_size": 4,
              "patients": {"train": [], "validation": []}, "synthetic_data": True}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": UNet(features=4).state_dict(), "config": config, "epoch": 1}, path)
    return path


def between_float16_values(prob: np.ndarray, quantile: float) -> float:
    """A threshold halfway between two neighbouring values of ``prob`` (probabilities held as float16),
    near its ``quantile``: a probability rounded to float16 then lies on the same side of it as the
    float32 value it came from, unless that value was the threshold itself, which rounds either way."""
    values = np.unique(prob)
    k = min(max(int(np.searchsorted(values, np.quantile(prob, quantile))), 1), len(values) - 1)
    return (float(values[k - 1]) + float(values[k])) / 2
