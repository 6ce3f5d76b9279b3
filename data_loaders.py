"""Files -> slices: find the dataset, pair slices with masks, split by patient, build DataLoaders.

The Kaggle layout is read unchanged::

    kaggle_3m/<PATIENT>/<PATIENT>_<N>.tif        256x256 RGB: pre-contrast, FLAIR, post-contrast
    kaggle_3m/<PATIENT>/<PATIENT>_<N>_mask.tif   256x256 single channel, 0 or 255

Anything else in the tree (data.csv, README.md, .DS_Store, ...) is ignored. Slices are ordered by
N as a number (2 before 10). Train and validation are split by patient, never by slice:
neighbouring slices of one brain look alike, so a slice-level split scores memory, not skill.

Each patient's slices are decoded once into memory (uint8; about 200 KB a slice) because
per-volume normalization needs the whole volume, and re-reading TIFFs every epoch is slow.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import math
import os
import random
import re
import shutil
import sys
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler, WeightedRandomSampler
from tqdm import tqdm

from data_preprocessing import (
    STANDARD_MASK_CONVENTIONS,
    Preprocess,
    VolumeStats,
    binarize_mask,
    brain_box,
    brain_interior,
    buda_square,
    buda_stats,
    fade_lesion,
    head_mask,
    mask_convention,
    paste_lesion,
    volume_stats,
)
from libraries import UserError, add_bool_flag, atomic_write, save_json
from metrics import lesion_contrast

# Where the data is looked for when --data-dir is not given (after $LGG_DATA_DIR).
DEFAULT_LOCATIONS = ("kaggle_3m", "lgg-mri-segmentation/kaggle_3m")
DATA_ENV_VAR = "LGG_DATA_DIR"
DATASET_URL = "https://www.kaggle.com/datasets/mateuszbuda/lgg-mri-segmentation"

# Channel order of every slice: pre-contrast, FLAIR, post-contrast. Where a patient lacks a
# modality, the dataset repeats FLAIR in its place (6 of the 110 patients carry FLAIR in all three).
FLAIR_CHANNEL = 1
OTHER_MODALITIES = {"pre-contrast": 0, "post-contrast": 2}

# Lesion pasting (--lesion-paste): a slice takes a lesion only if it lies within this many slices
# of its own patient's tumor (below a volume's tumor lie the skull base and face, whose tissue an
# eroded head mask does not tell from brain); donor slices lie within this share of the volume's
# height of the target slice's level, so that the brain around the lesion is of a like shape; up
# to this many donors are tried for a slice; the tissue carved around a lesion is this many
# pixels wide at 256 px (drawn uniformly, scaled with the slice width).
PASTE_SLICES_BEYOND_TUMOR = 2
PASTE_LEVEL_WINDOW = 0.15
PASTE_TRIES = 4
PASTE_MARGIN_PX = (2, 10)
# --lesion-fade: the range the lesion's FLAIR contrast is multiplied by. The fainter institutions'
# lesions have about 0.76 of the brighter ones' contrast (docs/results.md), the faintest patients
# well under half of the median.
FADE_FACTOR = (0.5, 1.0)

_SLICE_RE = re.compile(r"^(?P<stem>.+)_(?P<index>\d+)(?P<mask>_mask)?\.tiff?$", re.IGNORECASE)


class DatasetError(UserError):
    """A problem with the data on disk, with a message that names the file and the fix."""


@dataclass(frozen=True)
class SliceRecord:
    """One axial slice on disk: its patient, its slice number and its two files."""

    patient: str
    index: int
    image_path: Path
    mask_path: Path


class DataIssues:
    """Problems found in the data, each with the file and what was done about it.

    By default a problem that can be worked around is: the slice is skipped (unreadable, no
    partner file) or fixed (resized, grayscale to 3 channels, mask binarized), and counted for a
    summary. With ``strict`` every problem is an error instead.
    """

    def __init__(self, strict: bool = False) -> None:
        self.strict = strict
        self.items: list[tuple[str, str]] = []  # (kind, message naming the file)

    def report(self, kind: str, message: str) -> None:
        if self.strict:
            raise DatasetError(f"{message} (--strict makes this an error; drop --strict to skip or fix it)")
        self.items.append((kind, message))

    def summary(self) -> str:
        """One line: counts per kind, e.g. '2 skipped: unreadable; 1 fixed: resized'."""
        counts: dict[str, int] = {}
        for kind, _ in self.items:
            counts[kind] = counts.get(kind, 0) + 1
        return "; ".join(f"{n} {kind}" for kind, n in counts.items())


# ---------------------------------------------------------------------------------------------
# Finding and scanning the dataset
# ---------------------------------------------------------------------------------------------


def _looks_like_root(path: Path) -> bool:
    """True if some subfolder of ``path`` holds a ``*_mask.tif`` (or ``.tiff``)."""
    return path.is_dir() and any(
        child.is_dir() and any(child.glob("*_mask.tif*")) for child in path.iterdir()
    )


def resolve_root(path: Path) -> Path:
    """Accept the kaggle_3m folder itself or a folder the Kaggle archive was unpacked into."""
    for candidate in (path, path / "kaggle_3m", path / "lgg-mri-segmentation" / "kaggle_3m"):
        if _looks_like_root(candidate):
            return candidate
    deeper = [d for d in sorted(path.rglob("*")) if d.is_dir() and len(d.relative_to(path).parts) <= 3
              and _looks_like_root(d)] if path.is_dir() else []
    if deeper:
        raise DatasetError(f"{path}: the patient folders are nested deeper, in {deeper[0]} (an archive unpacked "
                           f"twice?); point --data-dir at {deeper[0]}")
    raise DatasetError(
        f"{path}: no patient folders with <PATIENT>_<N>.tif / <PATIENT>_<N>_mask.tif slices found; "
        f"point --data-dir at the kaggle_3m folder of {DATASET_URL}"
    )


def find_data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    """Locate the dataset: ``data_dir``, else $LGG_DATA_DIR, else the default locations.

    Returns None when nothing was asked for and nothing was found (the caller may then fall
    back to synthetic data). A folder that was asked for but holds no dataset is an error.
    """
    for asked, source in ((data_dir, "--data-dir"), (os.environ.get(DATA_ENV_VAR), DATA_ENV_VAR)):
        if asked:
            path = Path(asked).expanduser()
            if not path.is_dir():
                raise DatasetError(f"{path} (from {source}): no such folder; check the path")
            return resolve_root(path)
    for location in DEFAULT_LOCATIONS:
        if _looks_like_root(Path(location)):
            return Path(location)
    return None


def scan_dataset(root: Path, issues: DataIssues | None = None) -> list[SliceRecord]:
    """Pair every slice with its mask; records sorted by patient, then slice number.

    The integrity checks that need only the file names run here, on every run: an image without
    a mask (or the reverse), a patient folder without slices (or with them one folder too deep),
    a slice named for another patient, two files with one slice number (``_1`` beside ``_01``,
    ``.tif`` beside ``.tiff``) and gaps in the numbering. Each is reported to ``issues`` with the
    file and the fix (skipped, or an error under --strict); a tree with no slice is always an error.
    """
    issues = issues if issues is not None else DataIssues(strict=True)
    records: list[SliceRecord] = []
    for patient_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        images, masks, on_disk = _slice_files(patient_dir, issues)
        if not images and not masks:
            nested = [d.name for d in patient_dir.iterdir() if d.is_dir() and any(d.glob("*_mask.tif*"))]
            issues.report("skipped: patient folder without slices",
                          f"{patient_dir}: no <PATIENT>_<N>.tif slices; it is left out"
                          + (f" (its subfolder {nested[0]} holds them: move them up a level)" if nested
                             else " (delete the folder to silence this)"))
            continue
        missing = sorted(set(range(on_disk[0], on_disk[-1] + 1)) - set(on_disk)) if on_disk else []
        if missing:
            issues.report("warning: gap in slice numbers",
                          f"{patient_dir}: no slice {_values_text(missing)} between {on_disk[0]} and {on_disk[-1]}; "
                          "the volume is stacked without them, which changes 3D components and per-volume "
                          "scores (restore the files if they were lost)")
        for index in sorted(images.keys() | masks.keys()):
            if index not in masks:
                issues.report("skipped: image without mask",
                              f"{images[index]}: image has no mask (expected {images[index].stem}_mask.tif); "
                              "skipped: restore the mask or delete the image")
            elif index not in images:
                issues.report("skipped: mask without image",
                              f"{masks[index]}: mask has no image; skipped: restore the image or delete the mask")
            else:
                records.append(SliceRecord(patient_dir.name, index, images[index], masks[index]))
    if not records:
        raise DatasetError(f"{root}: no slice/mask pairs found; point --data-dir at kaggle_3m")
    return records


def _slice_files(patient_dir: Path, issues: DataIssues) -> tuple[dict[int, Path], dict[int, Path], list[int]]:
    """A patient folder's images and masks by slice number, leaving out (and reporting) files named
    for another patient and every file of a slice number that two files claim; and the sorted slice
    numbers its files carry, those left out included."""
    found: dict[tuple[bool, int], list[Path]] = {}
    for f in sorted(patient_dir.iterdir()):
        m = _SLICE_RE.match(f.name)
        if m is None or not f.is_file():
            continue  # stray file: README, .DS_Store, thumbnails, ...
        if m["stem"] != patient_dir.name:
            issues.report("skipped: slice of another patient",
                          f"{f}: named for {m['stem']}, but it is in {patient_dir.name}/; skipped: move it to "
                          "its own patient's folder")
            continue
        found.setdefault((bool(m["mask"]), int(m["index"])), []).append(f)
    images: dict[int, Path] = {}
    masks: dict[int, Path] = {}
    for (is_mask, index), files in found.items():
        if len(files) > 1:
            issues.report("skipped: duplicate slice number",
                          f"{patient_dir}: {', '.join(f.name for f in files)} are all {'mask' if is_mask else 'slice'} "
                          f"{index}; all are left out: delete the ones that do not belong")
            continue
        (masks if is_mask else images)[index] = files[0]
    return images, masks, sorted({index for _, index in found})


def group_by_patient(records: Sequence[SliceRecord]) -> dict[str, list[SliceRecord]]:
    """Records per patient, in the order given (scan_dataset's is by slice number)."""
    groups: dict[str, list[SliceRecord]] = {}
    for r in records:
        groups.setdefault(r.patient, []).append(r)
    return groups


def split_patients(
    patients: Sequence[str], val_fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    """Seeded patient-level split into (train, validation), each sorted.

    The result depends only on the set of patient names, ``val_fraction`` and ``seed``.
    """
    patients = sorted(set(patients))
    if not 0.0 < val_fraction < 1.0:
        raise DatasetError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    if len(patients) < 2:
        raise DatasetError(
            f"found {len(patients)} patient(s); a patient-level split needs at least 2"
        )
    n_val = min(max(1, round(val_fraction * len(patients))), len(patients) - 1)
    train, val = train_test_split(patients, test_size=n_val, random_state=seed, shuffle=True)
    return sorted(train), sorted(val)


# The 10 validation patients of Buda et al.'s PyTorch release (brain-segmentation-pytorch),
# as folder-name prefixes (the folders add the scan date).
BUDA_VAL_PREFIXES = (
    "TCGA_HT_7616", "TCGA_CS_6668", "TCGA_CS_4944", "TCGA_HT_7879", "TCGA_DU_7014",
    "TCGA_DU_6408", "TCGA_DU_6404", "TCGA_DU_5851", "TCGA_CS_6667", "TCGA_HT_7692",
)


def match_patients(names: Sequence[str], patients: Sequence[str], source: str) -> list[str]:
    """Resolve patient names or prefixes (TCGA_CS_4944 for TCGA_CS_4944_20010208) to folder names.

    Raises DatasetError naming every name that matches no folder, or more than one.
    """
    found, missing, ambiguous = [], [], []
    for name in names:
        hits = [p for p in patients if p == name] or [p for p in patients if p.startswith(name + "_")]
        if len(hits) == 1:
            found.append(hits[0])
        else:
            (ambiguous if hits else missing).append(name)
    if missing or ambiguous:
        problems = []
        if missing:
            problems.append(f"no patient folder for {', '.join(missing)}")
        if ambiguous:
            problems.append(f"more than one folder for {', '.join(ambiguous)}")
        raise DatasetError(f"{source}: {'; '.join(problems)}; check the names against the dataset folder")
    return sorted(set(found))


def read_patient_list(spec: str, flag: str = "--val-patients") -> tuple[list[str], str]:
    """Patients given to ``flag``: a file of names (one per line or comma-separated) or a comma list."""
    path = Path(spec).expanduser()
    if path.is_file():
        text, source = path.read_text(), str(path)
    else:
        text, source = spec, flag
    text = "\n".join(line.split("#", 1)[0] for line in text.splitlines())  # drop comments
    names = [n for n in re.split(r"[,\s]+", text) if n]
    if not names:
        raise DatasetError(f"{source}: no patient names given")
    return names, source


def kfold_split(patients: Sequence[str], folds: int, fold: int, seed: int) -> tuple[list[str], list[str]]:
    """Fold ``fold`` of a seeded patient-level K-fold split.

    The patients are put in a ``seed``-shuffled order and fold k validates on every K-th of them
    from position k: each patient is in exactly one validation fold, folds differ by at most one
    patient in size, and another seed gives other folds. (scikit-learn's GroupKFold, used before,
    ignores any shuffle: it ordered the folds itself, so every seed gave the same alphabetical folds.)
    """
    patients = sorted(set(patients))
    if folds < 2 or not 0 <= fold < folds:
        raise DatasetError(f"--folds must be >= 2 and --fold in 0..{folds - 1}, got {folds} and {fold}")
    if folds > len(patients):
        raise DatasetError(f"--folds {folds} is more than the {len(patients)} patients found")
    order = np.random.default_rng(seed).permutation(len(patients))
    val = {patients[i] for i in order[fold::folds]}
    return [p for p in patients if p not in val], sorted(val)


def choose_split(
    patients: Sequence[str], *, split: str, val_fraction: float, seed: int,
    val_patients: str = "", folds: int = 0, fold: int = 0,
) -> tuple[list[str], list[str]]:
    """(train, validation) patients: --val-patients, else --folds/--fold, else --split.

    ``split="none"`` trains on every patient and validates on none: the final model, once a
    recipe has been chosen by cross-validation, to be scored on other patients with ``evaluate``.
    """
    patients = sorted(set(patients))
    if val_patients:
        names, source = read_patient_list(val_patients)
        val = match_patients(names, patients, source)
    elif folds:
        return kfold_split(patients, folds, fold, seed)
    elif split == "buda":
        val = match_patients(BUDA_VAL_PREFIXES, patients, "--split buda")
    elif split == "random":
        return split_patients(patients, val_fraction, seed)
    elif split == "none":
        return patients, []
    else:
        raise DatasetError(f"--split must be random, buda or none, got {split!r}")
    train = [p for p in patients if p not in val]
    if not train:
        raise DatasetError("the validation split takes every patient; leave some for training")
    return train, val


# ---------------------------------------------------------------------------------------------
# Reading slices
# ---------------------------------------------------------------------------------------------


def _imread(path: Path, sixteen_bit: bool = False) -> np.ndarray:
    """cv2.imread that raises DatasetError for missing, empty, truncated or non-image files, and
    for pixels other than 8-bit (or 16-bit, with ``sixteen_bit``)."""
    try:
        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    except cv2.error:  # some malformed headers raise instead of returning None
        image = None
    if image is None or image.size == 0:
        raise DatasetError(f"{path}: cannot be read as an image (empty, truncated or not a TIFF); "
                           "re-download it or delete it")
    if image.dtype != np.uint8 and not (sixteen_bit and image.dtype == np.uint16):
        raise DatasetError(f"{path}: {image.dtype} pixels, expected 8-bit (as the dataset's); convert it "
                           "to 8-bit or delete it")
    if image.ndim == 3 and image.shape[2] not in (1, 2, 3, 4):
        raise DatasetError(f"{path}: {image.shape[2]} channels; expected 1 (grayscale) or 3 (pre-contrast, "
                           "FLAIR, post-contrast); re-save it or delete it")
    return image


def read_image(path: Path, issues: DataIssues | None = None, sixteen_bit: bool = False) -> np.ndarray:
    """Read a slice as (H, W, 3) uint8 (uint16 with ``sixteen_bit``) in file channel order
    (pre-contrast, FLAIR, post-contrast).

    A grayscale slice (with or without an alpha channel) is copied into all three channels, and
    an alpha channel is dropped; both are reported to ``issues``.
    """
    image = _imread(path, sixteen_bit)
    if image.ndim == 2 or image.shape[2] in (1, 2):  # gray, or gray + alpha
        _report(issues, "fixed: grayscale copied to 3 channels",
                f"{path}: grayscale slice; its one channel is used as all three")
        return np.ascontiguousarray(np.repeat(image[..., :1] if image.ndim == 3 else image[..., None], 3, axis=2))
    if image.shape[2] == 4:
        _report(issues, "fixed: alpha channel dropped", f"{path}: 4 channels; the 4th (alpha) is ignored")
    # OpenCV decodes colour as BGR(A); reverse to the file's RGB order so channel 1 is FLAIR.
    return np.ascontiguousarray(image[..., 2::-1])


def read_raw_mask(path: Path, issues: DataIssues | None = None) -> np.ndarray:
    """A mask file's (H, W) uint8 values as stored: the first channel of a mask saved with several,
    which is reported when the channels differ."""
    mask = _imread(path)
    if mask.ndim == 3:
        if not (mask == mask[..., :1]).all():
            _report(issues, "fixed: mask with several channels",
                    f"{path}: {mask.shape[2]} channels that differ; the first is used (save the mask as one channel)")
        mask = mask[..., 0]
    return mask


def read_mask(path: Path, issues: DataIssues | None = None) -> np.ndarray:
    """Read one mask file as (H, W) uint8 {0, 1}, by the convention its own values show
    (``mask_convention``); one outside 0/255 and 0/1 is reported. Whole patients are read by
    ``read_patient_masks``, which decides the convention over all of their files."""
    return read_patient_masks([path], issues)[0][0]


def _values_text(values: Sequence[int]) -> str:
    values = sorted(values)
    return f"{values[:6]}{'...' if len(values) > 6 else ''}"


def read_patient_masks(
    paths: Sequence[Path], issues: DataIssues | None, raw: Sequence[np.ndarray] | None = None
) -> tuple[list[np.ndarray], str]:
    """One patient's masks as (H, W) uint8 {0, 1}, and the convention they were read by.

    The convention is decided over all of the patient's files together: 0/255 or 0/1 as is; a
    patient whose files mix the two reads each file by its own (reported); any other values are
    binarized by ``mask_convention`` and reported with the values found. ``raw`` are the files'
    values when the caller has read them already (``read_raw_mask``). Raises DatasetError for an
    unreadable file, which the caller skips.
    """
    raw = [read_raw_mask(p, issues) for p in paths] if raw is None else raw
    values = [set(np.unique(m).tolist()) for m in raw]
    name, threshold = mask_convention(set().union(*values))
    if name in STANDARD_MASK_CONVENTIONS:
        return [binarize_mask(m, threshold) for m in raw], name
    per_file = [mask_convention(v) for v in values]
    folder = paths[0].parent
    if all(n in STANDARD_MASK_CONVENTIONS for n, _ in per_file):
        _report(issues, "fixed: mask conventions mixed",
                f"{folder}: some masks are 0/255 and some 0/1; each file is read by its own values "
                "(re-save them in one convention)")
        return [binarize_mask(m, t) for m, (_, t) in zip(raw, per_file)], "mixed 0/1 and 0/255"
    rule = "every nonzero label is tumor" if name == "labels" else f"tumor where > {threshold}"
    _report(issues, "fixed: mask binarized",
            f"{folder}: mask values {_values_text(set().union(*values))} are neither 0/255 nor 0/1; "
            f"read as {rule} (re-save the masks as 0/255 to silence this)")
    return [binarize_mask(m, threshold) for m in raw], name


def _report(issues: DataIssues | None, kind: str, message: str) -> None:
    if issues is not None:
        issues.report(kind, message)


@dataclass
class PatientVolume:
    """All slices of one patient in memory, in slice order."""

    name: str
    images: np.ndarray  # (N, H, W, 3) uint8
    masks: np.ndarray  # (N, H, W) uint8 {0, 1}
    slice_numbers: list[int]
    stats: VolumeStats
    # (y0, y1, x0, x1) crop applied before resizing ('buda' normalization); None: whole slice.
    box: tuple[int, int, int, int] | None = None
    mask_convention: str = "0/255"  # how the mask files were read (read_patient_masks)
    _interiors: dict[bool, np.ndarray] = field(default_factory=dict, repr=False, compare=False)
    _contrast: tuple[float | None] | None = field(default=None, repr=False, compare=False)

    def interior(self, shell: bool = False) -> np.ndarray:
        """(N, H, W) bool: the brain away from the scalp (``brain_interior``; with ``shell``, inside a
        shell of scalp and skull). Both are computed once, from one head mask: every epoch's
        validation post-processes the same volumes with every rule."""
        if not self._interiors:
            head = head_mask(self.images)
            self._interiors = {s: brain_interior(self.images, shell=s, head=head) for s in (False, True)}
        return self._interiors[shell]

    def flair_contrast(self) -> float | None:
        """How much brighter the true lesion is on FLAIR than the brain around it
        (``metrics.lesion_contrast``), computed once; None without tumor."""
        if self._contrast is None:
            self._contrast = (lesion_contrast(self.images[..., FLAIR_CHANNEL], self.masks > 0, self.interior()),)
        return self._contrast[0]


NORMALIZATIONS = ("volume", "head", "buda")


def set_normalization(volume: PatientVolume, method: str, image_size: int) -> PatientVolume:
    """Choose how a volume is normalized for a network that takes ``image_size`` square slices
    (see data_preprocessing and docs/reference.md).

    'volume' (the default): per-channel 1-99th percentile clipping and z-scoring over the voxels
    above 0. In this dataset that is most of each volume (42-99% of the FLAIR voxels of the 36-patient
    subset, median 95%), because the background is scanner noise of a few units, not 0: the
    statistics then depend on the share of the field of view the head fills (28-69%) and the noise.
    'head': the same over the head only (``head_mask``: brighter than a tenth of the volume's
    99th percentile, holes filled), so that neither moves them.
    'buda': Buda et al.'s pipeline (their dataset.py and utils.py), in their order. They leave out
    each volume's first and last slice, zero every voxel below 10% of the maximum of what is left,
    keep the slices and the box that hold anything (their crop), zero-pad to a square and resize
    it with an order-2 spline (``buda_square``); the p10-p99 rescale and per-channel z-score are
    taken over those resized squares, padding included. Here the zeroing applies to every slice,
    with their threshold, and every slice is predicted, cropped to the same box.
    """
    if method == "volume":
        return volume
    if method == "head":
        volume.stats = volume_stats(volume.images, where=head_mask(volume.images))
        return volume
    if method != "buda":
        raise UserError(f"--normalization must be one of {', '.join(NORMALIZATIONS)}, got {method!r}")
    images = volume.images
    theirs = slice(1, -1) if len(images) > 2 else slice(None)  # their volume lacks the first and last slice
    volume.images = np.where(images < 0.1 * float(images[theirs].max()), 0, images).astype(np.uint8)
    volume._interiors = {}  # of the images before zeroing
    kept = volume.images[theirs]
    filled = np.flatnonzero(kept.reshape(len(kept), -1).any(axis=1))
    if len(filled):
        kept = kept[filled[0]: filled[-1] + 1]
    volume.box = brain_box(kept)  # every voxel that survived the zeroing
    empty = np.zeros(images.shape[1:3], np.uint8)
    squares = np.stack([buda_square(image, empty, volume.box, image_size)[0] for image in kept])
    # scikit-image clips the resized volume to the range of its input.
    volume.stats = buda_stats(np.clip(squares, 0.0, float(kept.max()) / 255))
    return volume


def load_volume(
    records: Sequence[SliceRecord], cache_dir: Path | None = None, issues: DataIssues | None = None
) -> PatientVolume | None:
    """Decode one patient's slices and compute its normalization statistics.

    With ``cache_dir``, the decoded arrays and statistics are kept there as one .npz per
    patient, keyed by the files' paths, sizes and modification times and by CACHE_VERSION:
    later epochs and runs read that instead of the TIFFs, and a changed file rebuilds it.
    Problems are reported to ``issues`` when the TIFFs are decoded; None if nothing was readable.
    """
    if cache_dir is None:
        return _decode_volume(records, issues)
    path = _cache_path(records, cache_dir)
    if path.is_file():
        try:
            return _read_cached(path, records)
        except (OSError, ValueError, KeyError, EOFError):
            pass  # a damaged cache entry is rebuilt below
    reported = len(issues.items) if issues is not None else 0
    volume = _decode_volume(records, issues)
    if volume is None or (issues is not None and len(issues.items) > reported):
        return volume  # only clean volumes are cached, so every problem is reported on every run
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f"{glob.escape(volume.name)}-*.npz"):
        stale.unlink(missing_ok=True)  # entries for older versions of this patient's files
    atomic_write(path, lambda tmp: _write_cached(tmp, volume))
    return volume


# Bump when the cached arrays or the statistics change meaning: old entries are then ignored.
CACHE_VERSION = 1


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/lgg-unet, else ~/.cache/lgg-unet."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lgg-unet"


def _cache_path(records: Sequence[SliceRecord], cache_dir: Path) -> Path:
    """<cache_dir>/<hash of the patient folder>/<patient>-<hash of version and file stats>.npz"""
    folder = hashlib.sha1(str(records[0].image_path.parent.resolve()).encode()).hexdigest()[:16]
    key = hashlib.sha1(f"v{CACHE_VERSION}".encode())
    for r in records:
        for p in (r.image_path, r.mask_path):
            st = p.stat()
            key.update(f"{p.name}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return cache_dir / folder / f"{records[0].patient}-{key.hexdigest()[:16]}.npz"


def _write_cached(path: Path, v: PatientVolume) -> None:
    with open(path, "wb") as f:  # a file object: np.savez would add ".npz" to a path
        np.savez(
            f, images=v.images, masks=np.packbits(v.masks, axis=-1), width=v.masks.shape[-1],
            slice_numbers=np.array(v.slice_numbers), low=v.stats.low, high=v.stats.high,
            mean=v.stats.mean, std=v.stats.std, mask_convention=v.mask_convention,
        )


def _read_cached(path: Path, records: Sequence[SliceRecord]) -> PatientVolume:
    with np.load(path) as z:
        masks = np.unpackbits(z["masks"], axis=-1, count=int(z["width"]))
        return PatientVolume(
            name=records[0].patient, images=z["images"], masks=masks,
            slice_numbers=z["slice_numbers"].tolist(),
            stats=VolumeStats(low=z["low"], high=z["high"], mean=z["mean"], std=z["std"]),
            # Entries written before conventions were recorded are all 0/255: any other was reported
            # as a problem, and volumes with problems are never cached.
            mask_convention=str(z["mask_convention"]) if "mask_convention" in z else "0/255",
        )


def _decode_volume(records: Sequence[SliceRecord], issues: DataIssues | None = None) -> PatientVolume | None:
    """Read one patient's TIFFs and compute its normalization statistics.

    Unreadable slices are skipped and slices of another size than most of the patient's are
    resized to it (both reported to ``issues``). None when no slice could be read.
    """
    issues = issues if issues is not None else DataIssues(strict=True)
    readable = []
    for r in records:
        try:
            readable.append((r, read_image(r.image_path, issues), read_raw_mask(r.mask_path, issues)))
        except DatasetError as exc:
            issues.report("skipped: unreadable file", f"{exc}; the slice is skipped")
    if not readable:
        return None
    masks, convention = read_patient_masks([r.mask_path for r, _, _ in readable], issues,
                                           raw=[m for _, _, m in readable])
    read = [(r, img, msk) for (r, img, _), msk in zip(readable, masks)]
    shapes = [img.shape[:2] for _, img, _ in read]
    shape = max(set(shapes), key=shapes.count)  # the patient's usual slice size
    images, masks = [], []
    for r, img, msk in read:
        if img.shape[:2] != shape or msk.shape != shape:
            issues.report("fixed: resized",
                          f"{r.image_path}: size {img.shape[:2]} (mask {msk.shape}) differs from the patient's "
                          f"{shape}; resized to {shape}")
            img = cv2.resize(img, shape[::-1], interpolation=cv2.INTER_AREA)
            msk = cv2.resize(msk, shape[::-1], interpolation=cv2.INTER_NEAREST)
        images.append(img)
        masks.append(msk)
    volume = make_volume(records[0].patient, np.stack(images), np.stack(masks), [r.index for r, _, _ in read])
    volume.mask_convention = convention
    return volume


def make_volume(name: str, images: np.ndarray, masks: np.ndarray, slice_numbers: list[int]) -> PatientVolume:
    """A patient volume from (N, H, W, 3) uint8 slices and (N, H, W) {0, 1} masks, with its
    'volume' normalization statistics; ``set_normalization`` switches it to another method."""
    return PatientVolume(name=name, images=images, masks=masks, slice_numbers=slice_numbers,
                         stats=volume_stats(images))


# ---------------------------------------------------------------------------------------------
# Loading a dataset for a command
# ---------------------------------------------------------------------------------------------


def locate_data(
    data_dir: str, *, synthetic: bool, synthetic_dir: str, synthetic_patients: int, synthetic_slices: int, seed: int
) -> tuple[Path, bool]:
    """The dataset root and whether it is synthetic; generates synthetic data when none is found."""
    if not synthetic:
        root = find_data_dir(data_dir or None)
        if root is not None:
            return root, False
        print(
            f"No LGG dataset found (--data-dir, ${DATA_ENV_VAR}, ./kaggle_3m). Training on SYNTHETIC data "
            f"instead; for the real data download {DATASET_URL} and pass --data-dir .../kaggle_3m"
        )
    root = make_synthetic_dataset(Path(synthetic_dir), patients=synthetic_patients, slices=synthetic_slices, seed=seed)
    return root, True


def resolve_cache_dir(cache_dir: str) -> Path | None:
    """--cache-dir: '' -> the default cache folder, 'off' -> no cache."""
    if cache_dir == "off":
        return None
    return Path(cache_dir).expanduser() if cache_dir else default_cache_dir()


def load_dataset(
    root: Path,
    names: list[str] | None,
    *,
    progress: bool,
    cache_dir: Path | None,
    normalization: str,
    image_size: int,
    issues: DataIssues,
    groups: dict[str, list[SliceRecord]] | None = None,
) -> dict[str, PatientVolume]:
    """Decode (or read from the cache) the named patients, or all of them; by name.

    ``groups`` is ``root`` already scanned and grouped by patient, so that a caller who listed it
    to choose the patients does not list it twice. Patients of which no slice can be read are
    reported to ``issues`` and left out.
    """
    if groups is None:
        groups = group_by_patient(scan_dataset(root, issues))
    if names is None:
        names = sorted(groups)
    missing = [n for n in names if n not in groups]
    if missing:
        raise DatasetError(
            f"{root}: patient folder(s) {', '.join(missing)} not found; evaluate on the dataset "
            "the checkpoint was trained on (--data-dir), or pick other patients with --patients"
        )
    volumes = {}
    for name in tqdm(names, desc="loading", leave=False, disable=not progress):
        volume = load_volume(groups[name], cache_dir, issues)
        if volume is None:
            issues.report("skipped: patient without readable slices", f"{root / name}: no readable slice; left out")
        else:
            volumes[name] = set_normalization(volume, normalization, image_size)
    check_tumor(root, volumes)
    return volumes


def check_tumor(root: Path, volumes: dict[str, PatientVolume]) -> None:
    """Refuse a dataset in which no patient has tumor, and warn about each patient without any.

    Every one of the 110 LGG patients has tumor in some slices, so a patient without any is most
    likely a mask problem (values that no convention reads as tumor, masks of another patient).
    """
    empty = sorted(name for name, v in volumes.items() if not v.masks.any())
    if volumes and len(empty) == len(volumes):
        conventions = sorted({v.mask_convention for v in volumes.values()})
        raise DatasetError(f"{root}: no patient has any tumor in its masks (read as {', '.join(conventions)}); "
                           "check that the *_mask.tif files mark tumor with 255 (or 1)")
    if empty:
        print(f"warning: {len(empty)} patient(s) without tumor in any mask: {', '.join(empty[:5])}"
              f"{' ...' if len(empty) > 5 else ''}; every patient of the LGG dataset has some, so check "
              "their masks ('python engine.py data' lists the values found)", file=sys.stderr)


def describe_masks(volumes: dict[str, PatientVolume]) -> str:
    """Which mask convention was read, e.g. 'masks 0/255 (35 patients), 0/1 (1: TCGA_A)'."""
    by_convention: dict[str, list[str]] = {}
    for name, v in volumes.items():
        by_convention.setdefault(v.mask_convention, []).append(name)
    parts = []
    for convention, names in sorted(by_convention.items(), key=lambda item: -len(item[1])):
        listed = f": {', '.join(sorted(names)[:3])}{' ...' if len(names) > 3 else ''}" if len(by_convention) > 1 else ""
        parts.append(f"{convention} ({len(names)}{listed if len(names) < len(volumes) else ' patients'})")
    return "masks " + ", ".join(parts)


def report_issues(issues: DataIssues, out_dir: Path | None, shown: int = 5) -> None:
    """Print a count of the data problems (and the first few), and keep them all in data_issues.txt."""
    if not issues.items:
        return
    print(f"warning: data problems worked around: {issues.summary()}", file=sys.stderr)
    for _, message in issues.items[:shown]:
        print(f"  {message}", file=sys.stderr)
    if len(issues.items) > shown:
        print(f"  ... and {len(issues.items) - shown} more", file=sys.stderr)
    if out_dir is not None:
        (out_dir / "data_issues.txt").write_text("\n".join(m for _, m in issues.items) + "\n")
        print(f"  all of them: {out_dir / 'data_issues.txt'}; --strict makes them errors", file=sys.stderr)



# ---------------------------------------------------------------------------------------------
# Dataset and loaders
# ---------------------------------------------------------------------------------------------


class LGGSlices(Dataset):
    """2D slices of several patient volumes.

    Each item is a dict with ``image`` (C, S, S) uint8 (C = 3 + 2 * context), ``mask`` (1, S, S)
    uint8 {0, 1}, ``stats`` (4, C) float32, the volume's normalization statistics (``normalize``
    applies them on the device), ``patient`` (int index into ``self.patients``) and ``slice``
    (slice number). With ``full_mask=True`` it also holds ``full_mask`` (1, H, W) float32: the
    mask at the file's own resolution, which evaluation scores against so that metrics do not
    depend on ``image_size``.

    With ``modality_dropout`` p > 0 (training), each non-FLAIR channel of an item is, with
    chance p, replaced by the FLAIR channel together with its statistics: the item then looks
    exactly like a slice of a patient whose missing modality the dataset filled with FLAIR.
    This lives here rather than in albumentations because the statistics change with it.

    With ``context`` k > 0 (2.5D input), the FLAIR channels of the k slices below and the k
    above follow the slice's own three, nearest first (below, above, next below, ...): the image
    has 3 + 2k channels, and the statistics give each added channel the volume's FLAIR column.
    At the ends of a volume the missing neighbours repeat the end slice. They pass through the
    same albumentations call as the slice, so every channel gets the same geometry.

    With ``lesion_paste`` p > 0 (training), an item gets, with chance p, the lesion of a tumor
    slice of another patient pasted into its brain at the lesion's own place, maybe mirrored, with
    some tissue around it, in this volume's intensity scale (``paste_lesion``; CarveMix in 2D).
    The donor is a slice at a like level of a patient with three distinct modalities; a slice
    far from its own patient's tumor, or whose brain has room for none of the donors tried,
    stays as it is. The model then sees each lesion in other brains, in other scanners' scales.

    With ``lesion_fade`` p > 0 (training), a slice with tumor has, with chance p, its lesion made
    fainter on FLAIR (``fade_lesion``: its contrast to the brain around it times a factor drawn
    from FADE_FACTOR), its mask unchanged: more examples of the faint lesions that the model misses.
    """

    def __init__(
        self,
        volumes: Sequence[PatientVolume],
        preprocess: Preprocess,
        *,
        full_mask: bool = False,
        modality_dropout: float = 0.0,
        context: int = 0,
        lesion_paste: float = 0.0,
        lesion_fade: float = 0.0,
    ) -> None:
        if context < 0:
            raise ValueError(f"context is a number of slices on each side, >= 0; got {context}")
        for name, p in (("modality_dropout", modality_dropout), ("lesion_paste", lesion_paste),
                        ("lesion_fade", lesion_fade)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} is a probability in [0, 1], got {p}")
        for name, p in (("lesion_paste", lesion_paste), ("lesion_fade", lesion_fade)):
            if p and (context or any(v.box is not None for v in volumes)):
                raise ValueError(f"{name} works on whole 2D slices: not with context slices or the 'buda' crop")
        self.modality_dropout = modality_dropout
        self.lesion_paste = lesion_paste
        self.lesion_fade = lesion_fade
        self.context = context
        self.rng = np.random.default_rng(0)
        self.volumes = list(volumes)
        self.patients = [v.name for v in self.volumes]
        self.preprocess = preprocess
        self.full_mask = full_mask
        # (volume index, position in volume) for every slice, patients in order.
        self.index = [(p, i) for p, v in enumerate(self.volumes) for i in range(len(v.images))]
        self.has_tumor = np.concatenate([v.masks.any(axis=(1, 2)) for v in self.volumes]) if volumes else np.zeros(0, bool)
        # Once per volume, not per item: (4, 3 + 2 * context), the added columns FLAIR's.
        self.stats = [with_context_columns(v.stats.as_tensor(), context) for v in self.volumes]
        if lesion_paste or lesion_fade:
            # What pasting and fading need of every volume, once here rather than in each loader worker.
            self.sources = [channel_sources(v.images) for v in self.volumes]
            for v in self.volumes:
                v.interior()
        if lesion_paste:
            self._prepare_donors()

    def _prepare_donors(self) -> None:
        """The donor slices of lesion pasting."""
        tumor = [np.flatnonzero(v.masks.any(axis=(1, 2))) for v in self.volumes]  # slice positions, per volume
        donors = [(p, j) for p, v in enumerate(self.volumes) if self.sources[p] == tuple(range(v.images.shape[-1]))
                  for j in tumor[p]]
        self.donor_volume = np.array([p for p, _ in donors], int)
        self.donor_slice = np.array([j for _, j in donors], int)
        lengths = np.array([len(v.images) for v in self.volumes])
        self.donor_level = (self.donor_slice + 0.5) / lengths[self.donor_volume] if donors else np.zeros(0)
        # (first, last) slice position that may take a lesion, per volume
        self.paste_range = [(t[0] - PASTE_SLICES_BEYOND_TUMOR, t[-1] + PASTE_SLICES_BEYOND_TUMOR) if len(t) else (0, -1)
                            for t in tumor]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor | int]:
        p, j = self.index[i]
        vol = self.volumes[p]
        image, mask = vol.images[j], vol.masks[j]
        if self.context:
            around = context_positions(j, len(vol.images), self.context)
            flair = vol.images[around, ..., FLAIR_CHANNEL]  # (2k, H, W)
            image = np.concatenate([image, flair.transpose(1, 2, 0)], axis=2)  # (H, W, 3 + 2k)
        item: dict[str, torch.Tensor | int] = {"patient": p, "slice": vol.slice_numbers[j]}
        if vol.box is not None:  # 'buda': float32 at the model's size, as their network saw it
            image, mask, (top, left, side) = buda_square(image, mask, vol.box, self.preprocess.image_size)
            # Everything evaluation needs to paste a prediction back onto the original grid.
            item["box"] = torch.tensor([*vol.box, top, left, side])
        if self.lesion_paste > 0 and self.rng.random() < self.lesion_paste:
            image, mask = self._paste(p, j, image, mask)
        if self.lesion_fade > 0 and mask.any() and self.rng.random() < self.lesion_fade:
            image = fade_lesion(image, mask, vol.interior()[j], self.rng.uniform(*FADE_FACTOR), flair=FLAIR_CHANNEL,
                                sources=self.sources[p])
        stats = self.stats[p]
        if self.modality_dropout > 0:
            image, stats = self._drop_modalities(image, stats)
        item["image"], item["mask"] = self.preprocess(image, mask)
        item["stats"] = stats
        if self.full_mask:
            item["full_mask"] = torch.from_numpy(vol.masks[j]).float().unsqueeze(0)
        return item

    def _paste(self, p: int, j: int, image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Slice j of volume p with another patient's lesion pasted into its brain, or as it is
        when it is far from the patient's tumor or none of up to PASTE_TRIES donors fits."""
        first, last = self.paste_range[p]
        if not first <= j <= last:
            return image, mask
        vol = self.volumes[p]
        level = (j + 0.5) / len(vol.images)
        near = np.flatnonzero((self.donor_volume != p) & (np.abs(self.donor_level - level) <= PASTE_LEVEL_WINDOW))
        if not len(near):
            return image, mask
        for k in self.rng.choice(near, size=min(PASTE_TRIES, len(near)), replace=False):
            donor = self.volumes[self.donor_volume[k]]
            d_image, d_mask = donor.images[self.donor_slice[k]], donor.masks[self.donor_slice[k]]
            if d_image.shape != image.shape:
                continue
            if self.rng.random() < 0.5:  # the brain is roughly symmetric: the lesion may come mirrored
                d_image, d_mask = np.ascontiguousarray(d_image[:, ::-1]), np.ascontiguousarray(d_mask[:, ::-1])
            margin = round(self.rng.integers(PASTE_MARGIN_PX[0], PASTE_MARGIN_PX[1] + 1) * image.shape[1] / 256)
            pasted = paste_lesion(image, mask, vol.stats, d_image, d_mask, donor.stats, allowed=vol.interior()[j],
                                  margin=margin, sources=self.sources[p])
            if pasted is not None:
                return pasted
        return image, mask

    def _drop_modalities(self, image: np.ndarray, stats: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
        """Copies of (H, W, C) ``image`` and (4, C) ``stats`` with some channels replaced by FLAIR."""
        others = OTHER_MODALITIES.values()
        dropped = [c for c, u in zip(others, self.rng.random(len(others))) if u < self.modality_dropout]
        if not dropped:
            return image, stats
        image, stats = image.copy(), stats.clone()  # the volume in memory stays as it is
        image[..., dropped] = image[..., FLAIR_CHANNEL : FLAIR_CHANNEL + 1]
        stats[:, dropped] = stats[:, FLAIR_CHANNEL : FLAIR_CHANNEL + 1]
        return image, stats

    def reseed(self, seed: int) -> None:
        """Seed the augmentation streams (albumentations keeps its own RNG, apart from numpy's)."""
        self.preprocess.transform.set_random_seed(seed)
        self.rng = np.random.default_rng(seed)


def channel_sources(images: np.ndarray) -> tuple[int, ...]:
    """For each channel of an (N, H, W, C) volume, the channel it carries: FLAIR_CHANNEL where the
    channel repeats FLAIR in every voxel (the dataset's fill for a missing modality), else its own."""
    flair = images[..., FLAIR_CHANNEL]
    return tuple(FLAIR_CHANNEL if c != FLAIR_CHANNEL and np.array_equal(images[..., c], flair) else c
                 for c in range(images.shape[-1]))


def context_positions(j: int, n: int, context: int) -> list[int]:
    """The positions of slice j's 2 * ``context`` neighbours in a volume of n slices, nearest first
    (j-1, j+1, j-2, j+2, ...), clamped to the volume: the end slice stands in for missing ones."""
    return [min(max(j + sign * d, 0), n - 1) for d in range(1, context + 1) for sign in (-1, 1)]


def with_context_columns(stats: torch.Tensor, context: int) -> torch.Tensor:
    """(4, 3) normalization statistics -> (4, 3 + 2 * context): the neighbours' FLAIR channels
    are normalized with the volume's FLAIR statistics."""
    return torch.cat([stats, stats[:, FLAIR_CHANNEL : FLAIR_CHANNEL + 1].expand(-1, 2 * context)], dim=1)


def seed_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: derive every RNG of the worker from the loader's seed.

    torch gives each worker ``initial_seed() = base_seed + worker_id``, where base_seed comes
    from the loader's seeded generator, so workers differ from each other and across epochs
    but are the same from run to run.
    """
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    info = torch.utils.data.get_worker_info()
    if info is not None and hasattr(info.dataset, "reseed"):
        info.dataset.reseed(seed)


def default_num_workers() -> int:
    """Loader workers for this machine: none on <= 2 cores, where they would take the model's cores."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 0 if cpus <= 2 else min(4, cpus - 1)


class ShardedSampler(Sampler[int]):
    """The training order for one rank of a distributed job.

    Every rank draws the same (seed + epoch)-seeded order, a permutation or, with ``weights``,
    weighted draws with replacement (tumor-aware sampling), pads it to a multiple of ``world``
    and takes every ``world``-th index from ``rank``: the ranks share one epoch without overlap.
    """

    def __init__(self, n: int, *, rank: int, world: int, seed: int, weights: torch.Tensor | None = None,
                 draws: int | None = None) -> None:
        self.n, self.rank, self.world, self.seed, self.weights = n, rank, world, seed, weights
        self.draws = n if draws is None else draws  # the whole job's draws per epoch
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.draws / self.world)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        if self.weights is None:  # as many permutations as the draws need, one after another
            order = torch.cat([torch.randperm(self.n, generator=g) for _ in range(math.ceil(self.draws / self.n))])
            order = order[: self.draws].tolist()
        else:
            order = torch.multinomial(self.weights, self.draws, replacement=True, generator=g).tolist()
        order += order[: len(self) * self.world - self.draws]  # pad so every rank gets len(self)
        return iter(order[self.rank :: self.world])


def make_loader(
    dataset: LGGSlices,
    *,
    batch_size: int,
    train: bool,
    seed: int,
    num_workers: int,
    pin_memory: bool = False,
    tumor_weight: float = 1.0,
    balance_patients: bool = False,
    steps: int = 0,
    rank: int = 0,
    world: int = 1,
) -> DataLoader:
    """A seeded DataLoader. Training shuffles and drops a last batch of 1 (BatchNorm needs 2);
    validation keeps every slice, in order.

    A training epoch is one pass over ``dataset``, or with ``steps`` > 0 exactly ``steps`` batches
    on each process, whatever the dataset's size (nnU-Net's fixed iterations per epoch): then
    training takes as long on 110 patients as on 36. With ``tumor_weight`` != 1 or
    ``balance_patients``, training draws slices with replacement by ``draw_weights``.
    """
    generator = torch.Generator().manual_seed(seed)
    dataset.reseed(seed)
    sampler, weights = None, None
    draws = steps * batch_size * world if steps > 0 else len(dataset)
    if train and (tumor_weight != 1.0 or balance_patients):
        weights = draw_weights(dataset, tumor_weight=tumor_weight, balance_patients=balance_patients)
        sampler = WeightedRandomSampler(weights, num_samples=draws, replacement=True, generator=generator)
    elif train and steps > 0:
        sampler = RandomSampler(dataset, num_samples=draws, generator=generator)
    if train and world > 1:
        sampler = ShardedSampler(len(dataset), rank=rank, world=world, seed=seed, weights=weights, draws=draws)
    common = dict(num_workers=num_workers, pin_memory=pin_memory, worker_init_fn=seed_worker, generator=generator,
                  # Fresh workers each epoch draw their seeds from ``generator``: reseeding it per epoch
                  # makes every epoch reproducible on its own, which resuming a run relies on.
                  persistent_workers=False)
    if not train:
        # Every slice once, in order; a batch never spans two slice sizes, since each item carries
        # its mask at the file's own size (``full_mask``), and such tensors cannot be stacked.
        return DataLoader(dataset, batch_sampler=same_size_batches(dataset, batch_size), **common)
    per_rank = len(sampler) if sampler is not None else len(dataset)
    return DataLoader(dataset, batch_size=batch_size, shuffle=sampler is None, sampler=sampler,
                      drop_last=per_rank % batch_size == 1, **common)  # see steps_per_epoch


def draw_weights(dataset: LGGSlices, *, tumor_weight: float, balance_patients: bool) -> torch.Tensor:
    """How likely training is to draw each slice of ``dataset``, up to a common factor.

    A slice with tumor weighs ``tumor_weight`` times one without. With ``balance_patients`` each
    patient's slices then share one equal total, so a patient of 20 thick slices is drawn as
    often as one of 80 thin ones (nnU-Net samples cases uniformly): the per-volume Dice that
    scores the model counts every patient once, whatever its slice count.
    """
    if tumor_weight <= 0:
        raise UserError(f"--tumor-weight must be > 0, got {tumor_weight}")
    weights = torch.where(torch.from_numpy(dataset.has_tumor), tumor_weight, 1.0).double()
    if balance_patients:
        patient = torch.tensor([p for p, _ in dataset.index], dtype=torch.long)
        totals = torch.zeros(len(dataset.volumes), dtype=torch.double).index_add_(0, patient, weights)
        weights = weights / totals[patient]
    return weights


def steps_per_epoch(slices: int, batch_size: int) -> int:
    """Optimizer steps in one training epoch of ``slices`` draws on one process: ``make_loader``
    drops a last batch of 1, which BatchNorm cannot train on."""
    return slices // batch_size + (slices % batch_size > 1)


def same_size_batches(dataset: LGGSlices, batch_size: int) -> list[list[int]]:
    """Consecutive indices of ``dataset`` in batches of at most ``batch_size``, cut where the slice size changes."""
    batches: list[list[int]] = []
    last = None
    for i, (p, _) in enumerate(dataset.index):
        size = dataset.volumes[p].masks.shape[1:]
        if not batches or size != last or len(batches[-1]) == batch_size:
            batches.append([])
        batches[-1].append(i)
        last = size
    return batches


# ---------------------------------------------------------------------------------------------
# Synthetic LGG-like data
# ---------------------------------------------------------------------------------------------

SYNTHETIC_VERSION = 1


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Zero-mean, unit-std, spatially smooth noise of shape (size, size)."""
    noise = cv2.GaussianBlur(rng.standard_normal((size, size)).astype(np.float32), (0, 0), sigma)
    return (noise - noise.mean()) / (noise.std() + 1e-6)


def _synthetic_patient(
    rng: np.random.Generator, n_slices: int, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic head volume: (N, size, size, 3) uint8 images and (N, size, size) 0/255 masks."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    c = size / 2
    head_a, head_b = rng.uniform(0.34, 0.42) * size, rng.uniform(0.40, 0.46) * size
    head_cx, head_cy = c + rng.uniform(-0.04, 0.04) * size, c + rng.uniform(-0.04, 0.04) * size
    # Tissue means per channel (pre-contrast, FLAIR, post-contrast) and a per-patient scanner
    # gain and noise level, so that intensities differ between "institutions" as in the real data.
    tissue = np.array([95.0, 80.0, 100.0]) * rng.uniform(0.6, 1.4)
    noise_sd = rng.uniform(3.0, 8.0)
    texture = _smooth_noise(rng, size, 6.0)
    # The lesion spans about a third of the slices, biggest in the middle of its span.
    span = max(2, round(n_slices * rng.uniform(0.28, 0.4)))
    first = int(rng.integers(1, n_slices - span))
    les_cx = head_cx + rng.uniform(-0.45, 0.45) * head_a
    les_cy = head_cy + rng.uniform(-0.45, 0.45) * head_b
    les_r = rng.uniform(0.06, 0.14) * size
    les_ratio, les_angle = rng.uniform(0.6, 1.0), rng.uniform(0, np.pi)
    les_gain = rng.uniform(0.45, 0.8)  # FLAIR brightening relative to tissue
    rim = _smooth_noise(rng, size, 4.0)  # makes lesion outlines irregular

    images = np.zeros((n_slices, size, size, 3), np.uint8)
    masks = np.zeros((n_slices, size, size), np.uint8)
    for z in range(n_slices):
        # Head cross-sections shrink towards the top and bottom of the volume.
        t = (z + 0.5) / n_slices * 2 - 1
        shrink = np.sqrt(max(0.15, 1 - (0.9 * t) ** 2))
        r_head = ((xx - head_cx) / (head_a * shrink)) ** 2 + ((yy - head_cy) / (head_b * shrink)) ** 2
        head, brain = r_head <= 1.0, r_head <= 0.82
        lesion = np.zeros_like(head)
        if first <= z < first + span:
            u = (z - first + 0.5) / span * 2 - 1
            r = les_r * np.sqrt(max(0.05, 1 - u**2))
            dx, dy = xx - les_cx, yy - les_cy
            ca, sa = np.cos(les_angle), np.sin(les_angle)
            d = np.sqrt(((dx * ca + dy * sa) / r) ** 2 + ((-dx * sa + dy * ca) / (r * les_ratio)) ** 2)
            lesion = (d + 0.25 * rim <= 1.0) & brain
        img = np.zeros((size, size, 3), np.float32)
        for ch in range(3):
            img[..., ch] = np.where(head, tissue[ch] * (1 + 0.08 * texture), 0)
        skull = head & ~brain
        img[skull] *= np.array([1.5, 0.6, 1.4], np.float32)  # fat-bright rim, dark on FLAIR
        img[lesion] *= np.array([0.9, 1 + les_gain, 1.05], np.float32)
        img += head[..., None] * rng.normal(0, noise_sd, img.shape).astype(np.float32)
        images[z] = np.clip(img, 0, 255).astype(np.uint8)
        masks[z] = lesion.astype(np.uint8) * 255
    return images, masks


def make_synthetic_dataset(
    root: Path, *, patients: int = 20, slices: int = 24, size: int = 256, seed: int = 0
) -> Path:
    """Write a deterministic synthetic LGG-like dataset in the kaggle_3m layout; return its root.

    Each patient is a head phantom whose FLAIR channel shows a bright, irregular lesion in about a
    third of its slices. An existing copy made with the same parameters is reused. It is written
    to a temporary folder and renamed into place, so an interrupted run never leaves half of it.
    """
    root = Path(root)
    params = {"version": SYNTHETIC_VERSION, "patients": patients, "slices": slices, "size": size, "seed": seed}
    manifest = root / "synthetic.json"
    if manifest.is_file() and json.loads(manifest.read_text()) == params:
        return root
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for p in range(patients):
        name = f"SYN_{p:02d}_{20000101 + p}"
        (tmp / name).mkdir()
        images, masks = _synthetic_patient(rng, slices, size)
        for z in range(slices):
            # cv2 writes BGR: reverse so the file holds (pre-contrast, FLAIR, post-contrast).
            cv2.imwrite(str(tmp / name / f"{name}_{z + 1}.tif"), images[z][..., ::-1])
            cv2.imwrite(str(tmp / name / f"{name}_{z + 1}_mask.tif"), masks[z])
    (tmp / "synthetic.json").write_text(json.dumps(params))
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    return root


# ---------------------------------------------------------------------------------------------
# Download and dataset report
# ---------------------------------------------------------------------------------------------

KAGGLE_HANDLE = "mateuszbuda/lgg-mri-segmentation"
# The complete published dataset, for the completeness check.
FULL_PATIENTS, FULL_SLICES, FULL_TUMOR_SLICES = 110, 3929, 1373

MANUAL_DOWNLOAD = (
    f"download it by hand: open {DATASET_URL}, sign in, click Download (the file is archive.zip), "
    "then run 'unzip archive.zip -d lgg-mri-segmentation' next to engine.py (the loader finds "
    "lgg-mri-segmentation/kaggle_3m) or point --data-dir / $LGG_DATA_DIR at its kaggle_3m folder"
)


def _unpack(source: Path, dest: Path) -> Path:
    """Extract a .zip (or use a folder) and return the kaggle_3m folder found in it."""
    if source.is_file() and zipfile.is_zipfile(source):
        extract_to = dest.parent / (dest.name + ".unzipped")
        with zipfile.ZipFile(source) as archive:
            archive.extractall(extract_to)
        source = extract_to
    if source.is_dir():
        zips = [z for z in source.glob("*.zip") if zipfile.is_zipfile(z)]
        if zips and not any(source.rglob("*_mask.tif")):
            return _unpack(zips[0], dest)
        for candidate in [source, *sorted(p for p in source.rglob("kaggle_3m") if p.is_dir())]:
            if _looks_like_root(candidate):
                return candidate
    raise DatasetError(f"{source}: no kaggle_3m folder in the download; {MANUAL_DOWNLOAD}")


def download_dataset(to: Path) -> Path:
    """Fetch the dataset with kagglehub (optional dependency) and place it at ``to``/kaggle_3m.

    Raises DatasetError with the manual steps when kagglehub is missing, offline or unauthorized.
    """
    to = Path(to)
    target = to / "kaggle_3m"
    if _looks_like_root(target):
        return target
    try:
        import kagglehub  # optional: pip install kagglehub
    except ImportError:
        raise DatasetError(f"kagglehub is not installed (pip install kagglehub), or {MANUAL_DOWNLOAD}") from None
    try:
        downloaded = Path(kagglehub.dataset_download(KAGGLE_HANDLE))
    except Exception as exc:  # network, credentials and HTTP errors come in many types
        raise DatasetError(f"Kaggle download failed ({type(exc).__name__}: {str(exc)[:120]}); "
                           f"{MANUAL_DOWNLOAD}") from None
    found = _unpack(downloaded, to)
    to.mkdir(parents=True, exist_ok=True)
    tmp = to / "kaggle_3m.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(found, tmp)
    tmp.rename(target)  # only a complete copy ever carries the name the loader looks for
    shutil.rmtree(to / "kaggle_3m.unzipped", ignore_errors=True)
    return target


def read_clinical(root: Path) -> pd.DataFrame | None:
    """data.csv (genomic clusters, age, grade, ...) indexed by patient ID (TCGA_XX_NNNN), if present."""
    path = root / "data.csv"
    if not path.is_file():
        return None
    try:
        table = pd.read_csv(path)
    except (pd.errors.ParserError, UnicodeDecodeError, OSError):
        return None  # optional: a damaged table is ignored, never fatal
    if "Patient" not in table:
        return None
    return table.set_index("Patient")


def patient_id(folder: str) -> str:
    """TCGA_CS_4942_19970222 -> TCGA_CS_4942 (the key of data.csv)."""
    return "_".join(folder.split("_")[:3])


def dataset_report(root: Path, strict: bool = False) -> dict:
    """Everything a user should know about a copy of the dataset before training on it."""
    issues = DataIssues(strict=strict)
    records = scan_dataset(root, issues)
    groups = group_by_patient(records)
    sizes: dict[str, int] = {}
    mask_values = np.zeros(256, np.int64)
    areas, tumor_slices, per_patient, identical = [], 0, {}, []
    flair_in_place = {modality: [] for modality in OTHER_MODALITIES}
    flair = 2 - FLAIR_CHANNEL  # _imread keeps OpenCV's BGR order: file channel c is raw channel 2 - c
    conventions: dict[str, list[str]] = {}
    for name, recs in groups.items():
        mask_paths, raw_masks = [], []
        repeats_flair = {modality: True for modality in OTHER_MODALITIES}
        for r in recs:
            try:
                raw = _imread(r.image_path)
                mask_raw = read_raw_mask(r.mask_path, issues)
            except DatasetError as exc:
                issues.report("skipped: unreadable file", f"{exc}; the slice is skipped")
                continue
            mask_paths.append(r.mask_path)
            raw_masks.append(mask_raw)
            key = "x".join(map(str, raw.shape))
            sizes[key] = sizes.get(key, 0) + 1
            if raw.ndim == 3 and raw.shape[2] >= 3:
                for modality, c in OTHER_MODALITIES.items():
                    repeats_flair[modality] &= bool((raw[..., 2 - c] == raw[..., flair]).all())
            mask_values += np.bincount(mask_raw.ravel(), minlength=256)[:256]
        readable = len(mask_paths)
        # Tumor is counted by the convention the patient's masks are read with in training.
        masks, convention = read_patient_masks(mask_paths, issues, raw=raw_masks) if mask_paths else ([], "none readable")
        conventions.setdefault(convention, []).append(name)
        patient_areas = [int(m.sum()) for m in masks if m.any()]
        areas += patient_areas
        tumor_slices += len(patient_areas)
        per_patient[name] = {"slices": len(recs), "tumor_slices": len(patient_areas), "mask_convention": convention}
        if readable and all(repeats_flair.values()):  # one modality, copied into all three channels
            identical.append(name)
        elif readable:
            for modality, repeated in repeats_flair.items():
                if repeated:
                    flair_in_place[modality].append(name)
    institutions: dict[str, int] = {}
    for name in groups:
        site = institution(name)
        institutions[site] = institutions.get(site, 0) + 1
    report = {
        "root": str(root), "patients": len(groups), "slices": len(records), "tumor_slices": tumor_slices,
        "institutions": dict(sorted(institutions.items())), "image_sizes": sizes,
        "mask_values": {str(v): int(c) for v, c in enumerate(mask_values) if c},
        "mask_conventions": {c: sorted(names) for c, names in conventions.items()},
        "tumor_area_px": _distribution(areas),
        "patients_without_tumor": sorted(n for n, p in per_patient.items() if p["tumor_slices"] == 0),
        "patients_with_identical_channels": sorted(identical),
        "patients_with_flair_in_place_of": {m: sorted(names) for m, names in flair_in_place.items()},
        "per_patient": per_patient,
    }
    report["completeness"] = _completeness(root, report)
    if groups and tumor_slices == 0:
        issues.report("error: no tumor in any mask",
                      f"{root}: no patient has any tumor in its masks; check that the *_mask.tif files mark "
                      "tumor with 255 (or 1): training on them would teach the model that there is none")
    report["problems"] = [m for _, m in issues.items]
    report["problem_summary"] = issues.summary()
    return report


def _distribution(values: Sequence[int]) -> dict:
    if not values:
        return {"count": 0}
    v = np.asarray(values)
    return {"count": len(v), "min": int(v.min()), "p25": float(np.percentile(v, 25)),
            "median": float(np.median(v)), "mean": float(v.mean()), "p75": float(np.percentile(v, 75)),
            "max": int(v.max())}


def _completeness(root: Path, report: dict) -> dict:
    """Is this the whole dataset, a deliberate subset, or a full copy with something missing?

    data.csv names the patients of the copy it came with (all 110 in the published archive),
    so when it lists more patients than there are folders, those folders are missing.
    """
    clinical = read_clinical(root)
    ids = {patient_id(p) for p in report["per_patient"]}
    counts = (report["patients"], report["slices"], report["tumor_slices"])
    if counts == (FULL_PATIENTS, FULL_SLICES, FULL_TUMOR_SLICES):
        return {"status": "complete", "message": f"complete: all {FULL_PATIENTS} patients, {FULL_SLICES} "
                f"slices, {FULL_TUMOR_SLICES} with tumor"}
    listed = set(clinical.index) if clinical is not None else set()
    missing = sorted(listed - ids)
    full_copy = len(listed) >= FULL_PATIENTS or report["patients"] >= FULL_PATIENTS
    if full_copy:
        parts = []
        if missing:
            parts.append(f"{len(missing)} patient folder(s) missing: {', '.join(missing[:10])}"
                         f"{' ...' if len(missing) > 10 else ''}")
        if report["slices"] < FULL_SLICES:
            parts.append(f"{FULL_SLICES - report['slices']} of {FULL_SLICES} slice/mask pairs missing")
        if report["tumor_slices"] < FULL_TUMOR_SLICES:
            parts.append(f"{FULL_TUMOR_SLICES - report['tumor_slices']} of {FULL_TUMOR_SLICES} tumor slices missing")
        return {"status": "incomplete", "missing_patients": missing,
                "message": "looks like a full copy, but " + ("; ".join(parts) or "counts differ from the published ones")
                + f"; re-download {DATASET_URL}"}
    return {"status": "subset", "missing_patients": missing,
            "message": f"a subset: {report['patients']} of the {FULL_PATIENTS} patients "
            f"({report['slices']} of {FULL_SLICES} slices); not an error if that is what you meant to use"}


def institution(patient: str) -> str:
    """The institution that scanned a patient: the first two fields of its name, which for this
    dataset's TCGA_<site>_<case>_<date> names is the TCGA tissue source site (TCGA_CS_4941_19960909
    -> TCGA_CS); the 110 patients come from five (CS, DU, EZ, FG, HT)."""
    return "_".join(patient.split("_")[:2])


def report_dataset(data_dir: str, out: str, strict: bool) -> dict:
    """The ``data`` command: print the dataset report and write it as JSON."""
    root = find_data_dir(data_dir or None)
    if root is None:
        raise UserError(f"no dataset found (--data-dir, ${DATA_ENV_VAR}, ./kaggle_3m); "
                        "run 'python engine.py download' or pass --data-dir")
    report = dataset_report(root, strict=strict)
    clinical = read_clinical(root)
    report["clinical_table"] = None if clinical is None else {"rows": len(clinical), "columns": list(clinical.columns)}
    path = Path(out) if out else Path("runs") / f"data-report-{datetime.now():%Y%m%d-%H%M%S}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_json(path, report)
    area = report["tumor_area_px"]
    lines = [
        f"dataset: {root}",
        f"  {report['patients']} patients, {report['slices']} slices, {report['tumor_slices']} with tumor",
        f"  {report['completeness']['message']}",
        "  institutions: " + ", ".join(f"{k} {v}" for k, v in report["institutions"].items()),
        "  image sizes: " + ", ".join(f"{k} ({v})" for k, v in report["image_sizes"].items()),
        "  mask values: " + ", ".join(f"{k}: {v:,}" for k, v in report["mask_values"].items()),
        "  masks read as: " + ", ".join(f"{c} ({len(names)} patient{'s' if len(names) > 1 else ''}"
                                        + (f": {', '.join(names[:3])}{' ...' if len(names) > 3 else ''})"
                                           if c != "0/255" else ")")
                                        for c, names in report["mask_conventions"].items()),
        (f"  tumor area per tumor slice (px): median {area['median']:.0f}, mean {area['mean']:.0f}, "
         f"min {area['min']}, max {area['max']}") if area["count"] else "  no tumor in any slice",
        f"  patients without tumor: {', '.join(report['patients_without_tumor']) or 'none'}"
        + (" (warning: every patient of the LGG dataset has some; check their masks)"
           if report["patients_without_tumor"] else ""),
        f"  patients with identical channels (one modality copied 3 times): "
        f"{', '.join(report['patients_with_identical_channels']) or 'none'}",
        *(f"  patients with FLAIR in place of {modality} in every slice: {', '.join(names) or 'none'}"
          for modality, names in report["patients_with_flair_in_place_of"].items()),
        "  clinical table (data.csv): " + (f"{len(clinical)} rows" if clinical is not None else "not found (optional)"),
        f"  problems: {report['problem_summary'] or 'none'}",
    ]
    lines += [f"    {p}" for p in report["problems"][:10]]
    print("\n".join(lines) + f"\nwrote {path}")
    if report["patients"] and not report["tumor_slices"]:
        raise DatasetError(f"{root}: no patient has any tumor in its masks; see the mask values above")
    return report


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``data`` command's flags."""
    parser.add_argument("--data-dir", default="", help="kaggle_3m folder (default: found as for training)")
    parser.add_argument("--out", default="", help="JSON file (default: runs/data-report-<date-time>.json)")
    add_bool_flag(parser, "strict", False, "stop at the first data problem")


def add_download_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``download`` command's flags."""
    parser.add_argument("--to", default="lgg-mri-segmentation",
                        help="folder that receives kaggle_3m/ (default: ./lgg-mri-segmentation, found automatically)")
