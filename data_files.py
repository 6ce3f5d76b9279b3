"""Files -> arrays: find the dataset, pair and read its slices and masks, one patient's volume.

The Kaggle layout is read unchanged::

    kaggle_3m/<PATIENT>/<PATIENT>_<N>.tif        256x256 RGB: pre-contrast, FLAIR, post-contrast
    kaggle_3m/<PATIENT>/<PATIENT>_<N>_mask.tif   256x256 single channel, 0 or 255

Anything else in the tree (data.csv, README.md, .DS_Store, ...) is ignored. Slices are ordered by
N as a number (2 before 10). Masks are read by the convention their values show (0/255 or 0/1).
"""

from __future__ import annotations

import os
import re
import shlex
import sys
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from data_preprocessing import (
    STANDARD_MASK_CONVENTIONS,
    VolumeStats,
    binarize_mask,
    brain_box,
    brain_interior,
    buda_square,
    buda_stats,
    mask_convention,
    volume_stats,
)
from libraries import UserError, counted, first_names, write_text
from metrics import lesion_contrast

# Where the data is looked for when --data-dir is not given (after $LGG_DATA_DIR).
DEFAULT_LOCATIONS = ("kaggle_3m", "lgg-mri-segmentation/kaggle_3m")


DATA_ENV_VAR = "LGG_DATA_DIR"


DATASET_URL = "https://www.kaggle.com/datasets/mateuszbuda/lgg-mri-segmentation"


# Channel order of every slice: pre-contrast, FLAIR, post-contrast. Where a patient lacks a
# modality, the dataset repeats FLAIR in its place (6 of the 110 patients carry FLAIR in all three).
FLAIR_CHANNEL = 1


OTHER_MODALITIES = {"pre-contrast": 0, "post-contrast": 2}


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


def looks_like_root(path: Path) -> bool:
    """True if some subfolder of ``path`` holds a ``*_mask.tif`` (or ``.tiff``)."""
    return path.is_dir() and any(
        child.is_dir() and any(child.glob("*_mask.tif*")) for child in path.iterdir()
    )


def unpacked_root(path: Path) -> Path | None:
    """The kaggle_3m folder of a folder the Kaggle archive was unpacked into (it holds kaggle_3m and
    lgg-mri-segmentation/kaggle_3m, the same patients twice), or None."""
    return next((c for c in (path / "kaggle_3m", path / "lgg-mri-segmentation" / "kaggle_3m") if looks_like_root(c)),
                None)


def resolve_root(path: Path) -> Path:
    """Accept the kaggle_3m folder itself or a folder the Kaggle archive was unpacked into."""
    if looks_like_root(path):
        return path
    if (inner := unpacked_root(path)) is not None:
        return inner
    deeper = [d for d in sorted(path.rglob("*")) if d.is_dir() and len(d.relative_to(path).parts) <= 3
              and looks_like_root(d)] if path.is_dir() else []
    if deeper:
        raise DatasetError(f"{path}: the patient folders are nested deeper, in {deeper[0]} (an archive unpacked "
                           f"twice?); point --data-dir at {deeper[0]}")
    if path.is_dir() and any(path.glob("*_mask.tif*")):
        raise DatasetError(f"{path}: one patient's folder; point --data-dir at the folder that holds the patient "
                           f"folders ({path.resolve().parent}) and choose patients by name (--patients, "
                           "--val-patients)")
    if path.is_dir() and any(child.is_dir() and any(child.glob("*.tif*")) for child in path.iterdir()):
        raise DatasetError(f"{path}: patient folders of slices without any *_mask.tif; training and scoring need "
                           "each slice's mask. To segment slices without masks: python engine.py predict "
                           f"--checkpoint <best.pt> --input {path} --output <folder>")
    raise DatasetError(
        f"{path}: no patient folders with <PATIENT>_<N>.tif / <PATIENT>_<N>_mask.tif slices found; "
        f"point --data-dir at the kaggle_3m folder of {DATASET_URL}"
    )


def recorded_data_dir(recorded: str, record_file: Path) -> str:
    """The dataset folder a run recorded in ``record_file``, refused in one line where it no longer is."""
    if recorded and not Path(recorded).is_dir():
        raise DatasetError(f"{recorded} (recorded in {record_file}): no such folder; the data has moved or this is "
                           "another machine: pass --data-dir")
    return recorded


def unzip_advice(archive: Path, inside: str = "the folder") -> str:
    """How to unzip ``archive`` beside itself, and what to pass then."""
    return (f"unzip it ('unzip {shlex.quote(str(archive))} -d {shlex.quote(str(archive.with_suffix('')))}') and "
            f"pass {inside} inside it")


def refuse_zip(path: Path) -> None:
    """A zip archive given as --input: one line on how to unzip it (it was read as a broken image)."""
    if path.is_file() and zipfile.is_zipfile(path):
        raise DatasetError(f"{path}: a zip archive; {unzip_advice(path)}")


def find_data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    """Locate the dataset: ``data_dir``, else $LGG_DATA_DIR, else the default locations.

    Returns None when nothing was asked for and nothing was found (the caller may then fall
    back to synthetic data). A folder that was asked for but holds no dataset is an error.
    """
    for asked, source in ((data_dir, "--data-dir"), (os.environ.get(DATA_ENV_VAR), DATA_ENV_VAR)):
        if asked:
            path = Path(asked).expanduser()
            if not path.is_dir():
                if not path.exists():
                    problem = "no such folder; check the path"
                elif zipfile.is_zipfile(path):
                    problem = "a zip archive (Kaggle's archive.zip?); " + unzip_advice(path, "the kaggle_3m folder")
                else:
                    problem = "a file, not the dataset's folder; check the path"
                raise DatasetError(f"{path} (from {source}): {problem}")
            return resolve_root(path)
    for location in DEFAULT_LOCATIONS:
        if looks_like_root(Path(location)):
            return Path(location)
    return None


def subfolders(path: Path) -> list[Path]:
    """The folders in ``path``, sorted, hidden ones (.ipynb_checkpoints, a sync tool's .cache) left
    out: they are no patient's or case's."""
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


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
    for patient_dir in subfolders(root):
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


def imread(path: Path, sixteen_bit: bool = False) -> np.ndarray:
    """An image file's pixels as OpenCV decodes them; DatasetError for missing, empty, truncated or
    non-image files, and for pixels other than 8-bit (or 16-bit, with ``sixteen_bit``).

    Python reads the bytes and OpenCV decodes them: cv2.imread opens the path itself through the C
    library, which fails on Windows for a name outside the ANSI code page (a folder named 'Łódź'
    on a Western European system) and crashes where the locale cannot decode the name."""
    try:
        image = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error:  # an empty file; some malformed headers raise instead of returning None
        image = None
    except OSError as exc:
        raise DatasetError(f"{path}: cannot be read ({exc.strerror or exc}); check that it is there and can be "
                           "read") from None
    if image is None or image.size == 0:
        raise DatasetError(f"{path}: cannot be read as an image (empty, truncated or not a TIFF, PNG or JPEG file); "
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
    return as_three_channels(imread(path, sixteen_bit), path, issues)


def as_three_channels(image: np.ndarray, path: Path, issues: DataIssues | None = None) -> np.ndarray:
    """``imread``'s array of ``path`` as (H, W, 3) in file channel order, as ``read_image`` returns it."""
    if image.ndim == 2 or image.shape[2] in (1, 2):  # gray, or gray + alpha
        _report(issues, "fixed: grayscale copied to 3 channels",
                f"{path}: grayscale slice; its one channel is used as all three")
        return np.ascontiguousarray(np.repeat(image[..., :1] if image.ndim == 3 else image[..., None], 3, axis=2))
    if image.shape[2] == 4:
        _report(issues, "fixed: alpha channel dropped", f"{path}: 4 channels; the 4th (alpha) is ignored")
    # OpenCV decodes colour as BGR(A); reverse to the file's RGB order so channel 1 is FLAIR.
    return np.ascontiguousarray(image[..., 2::-1])


def patient_slice_size(sizes: Sequence[tuple[Path, tuple[int, ...], tuple[int, ...]]],
                       issues: DataIssues | None) -> tuple[int, ...]:
    """The (H, W) most of a patient's slices have, from each slice's (image path, image size, mask
    size). A slice of another size, or whose mask differs from its image, is resized to it in
    training; each is reported to ``issues`` here, so the ``data`` report lists it too."""
    shapes = [image for _, image, _ in sizes]
    shape = max(set(shapes), key=shapes.count)
    for path, image, mask in sizes:
        if image != shape:
            _report(issues, "fixed: resized", f"{path}: size {image}{f' (mask {mask})' if mask != image else ''} "
                    f"differs from the patient's {shape}; resized to {shape}")
        elif mask != shape:
            _report(issues, "fixed: resized", f"{path}: its mask is {mask}, the image {shape}; the mask is resized "
                    "to the image (check that it is this slice's mask)")
    return shape


def read_raw_mask(path: Path, issues: DataIssues | None = None) -> np.ndarray:
    """A mask file's (H, W) uint8 values as stored: the first channel of a mask saved with several,
    which is reported when the channels differ."""
    mask = imread(path)
    if mask.ndim == 3:
        if not (mask == mask[..., :1]).all():
            _report(issues, "fixed: mask with several channels",
                    f"{path}: {mask.shape[2]} channels that differ; the first is used (save the mask as one channel)")
        mask = mask[..., 0]
    return mask


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
    images: np.ndarray  # (N, H, W, 3) uint8, or float32 from scanner files (model_intensities)
    masks: np.ndarray  # (N, H, W) uint8 {0, 1}
    slice_numbers: list[int]
    stats: VolumeStats
    # (y0, y1, x0, x1) crop applied before resizing ('buda' normalization); None: whole slice.
    box: tuple[int, int, int, int] | None = None
    mask_convention: str = "0/255"  # how the mask files were read (read_patient_masks)
    spacing: tuple[float, float, float] | None = None  # (dz, dy, dx) mm from a file header; None: --spacing
    # (top, left, height, width): where the original slices sit in slices padded to a square field
    # of view (``square_field_of_view``); None: not padded.
    window: tuple[int, int, int, int] | None = None
    _interior: np.ndarray | None = field(default=None, repr=False, compare=False)
    _contrast: tuple[float | None] | None = field(default=None, repr=False, compare=False)

    def interior(self) -> np.ndarray:
        """(N, H, W) bool: the brain away from the scalp (``brain_interior``), computed once: every
        epoch's validation post-processes the same volumes."""
        if self._interior is None:
            self._interior = brain_interior(self.images)
        return self._interior

    def unpadded(self, array: np.ndarray) -> np.ndarray:
        """(N, H, W, ...) ``array`` on this volume's slices, cut back to the original slices' grid."""
        if self.window is None:
            return array
        top, left, height, width = self.window
        return array[:, top:top + height, left:left + width]

    def flair_contrast(self) -> float | None:
        """How much brighter the true lesion is on FLAIR than the brain around it
        (``metrics.lesion_contrast``), computed once; None without tumor."""
        if self._contrast is None:
            self._contrast = (lesion_contrast(self.images[..., FLAIR_CHANNEL], self.masks > 0, self.interior()),)
        return self._contrast[0]


NORMALIZATIONS = ("volume", "buda")


def set_normalization(volume: PatientVolume, method: str, image_size: int) -> PatientVolume:
    """Choose how a volume is normalized for a network that takes ``image_size`` square slices
    (see data_preprocessing and docs/reference.md).

    'volume' (the default): per-channel 1-99th percentile clipping and z-scoring over the voxels
    above the channel's minimum (0 in the TIFFs; any floor in scanner files). In this dataset that is most of each volume (42-99% of the FLAIR voxels of the 36-patient
    subset, median 95%), because the background is scanner noise of a few units, not 0: the
    statistics then depend on the share of the field of view the head fills (28-69%) and the noise.
    'buda': Buda et al.'s pipeline (their dataset.py and utils.py), in their order. They leave out
    each volume's first and last slice, zero every voxel below 10% of the maximum of what is left,
    keep the slices and the box that hold anything (their crop), zero-pad to a square and resize
    it with an order-2 spline (``buda_square``); the p10-p99 rescale and per-channel z-score are
    taken over those resized squares, padding included. Here the zeroing applies to every slice,
    with their threshold, and every slice is predicted, cropped to the same box.
    """
    if method == "volume":
        return volume
    if method != "buda":
        raise UserError(f"--normalization must be one of {', '.join(NORMALIZATIONS)}, got {method!r}")
    images = volume.images
    theirs = slice(1, -1) if len(images) > 2 else slice(None)  # their volume lacks the first and last slice
    volume.images = np.where(images < 0.1 * float(images[theirs].max()), 0, images).astype(np.uint8)
    volume._interior = None  # of the images before zeroing
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


def model_intensities(images: np.ndarray, normalization: str) -> np.ndarray:
    """(N, H, W, 3) slices of any scale as the pipeline takes them.

    8-bit values (integers in 0..255, whatever the array's type) pass as uint8: the dataset's own
    TIFFs, read the same way whatever file they came through. Anything else (12- to 16-bit
    scanner values, floats) passes as float32 under the 'volume' normalization, whose per-volume
    statistics remove scale and offset, with no 8-bit rounding. The 'buda' pipeline was built
    for the authors' 0-255 TIFFs: each channel is rescaled from its minimum..maximum to 0..255.
    """
    if images.dtype == np.uint8:
        return images
    values = images.astype(np.float32)
    if values.min() >= 0 and values.max() <= 255 and np.array_equal(values, np.round(values)):
        return values.astype(np.uint8)
    if normalization != "buda":
        return values
    low = values.min(axis=(0, 1, 2))
    span = np.maximum(values.max(axis=(0, 1, 2)) - low, 1e-6)
    return np.round((values - low) / span * 255).astype(np.uint8)


def input_volume(name: str, images: np.ndarray, masks: np.ndarray | None, *, normalization: str, image_size: int,
                 spacing: tuple[float, float, float] | None = None) -> PatientVolume:
    """A volume of slices that did not come from the dataset (predict's files, evaluate's scans):
    (N, H, W, 3) images of any scale (``model_intensities``), (N, H, W) masks (None: none known),
    prepared for a checkpoint's normalization and size, with a header's spacing. Under the
    'volume' normalization, slices whose field of view is not square are padded to one
    (``square_field_of_view``); predictions are cut back with ``PatientVolume.unpadded``."""
    masks = np.zeros(images.shape[:3], np.uint8) if masks is None else masks
    images = model_intensities(images, normalization)
    window = None
    if normalization == "volume":  # 'buda' crops to the brain and pads that box to a square itself
        images, masks, window = square_field_of_view(images, masks, spacing)
    volume = make_volume(name, images, masks, list(range(len(images))))
    volume.spacing, volume.window = spacing, window
    return set_normalization(volume, normalization, image_size)


def square_field_of_view(
    images: np.ndarray, masks: np.ndarray, spacing: tuple[float, float, float] | None
) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int, int] | None]:
    """(N, H, W, C) slices and (N, H, W) masks padded, centred, to a field of view square in mm
    (square pixels where ``spacing`` is unknown), and where the originals sit in them (top, left,
    H, W); None where nothing needed padding (within 1%).

    The network resizes every slice to a square, as the dataset's 256 x 256 slices are: a
    rectangular field of view (or rectangular pixels) would reach it stretched. Images are padded
    with each channel's minimum, which the 'volume' statistics leave out as background; masks with 0.
    """
    _, dy, dx = spacing or (1.0, 1.0, 1.0)
    height, width = images.shape[1:3]
    rows, cols = max(height, round(width * dx / dy)), max(width, round(height * dy / dx))
    if abs(height * dy - width * dx) <= 0.01 * max(height * dy, width * dx) or (rows, cols) == (height, width):
        return images, masks, None
    top, left = (rows - height) // 2, (cols - width) // 2
    padded = np.empty((len(images), rows, cols, images.shape[3]), images.dtype)
    padded[:] = images.min(axis=(0, 1, 2))
    padded[:, top:top + height, left:left + width] = images
    padded_masks = np.zeros((len(masks), rows, cols), masks.dtype)
    padded_masks[:, top:top + height, left:left + width] = masks
    return padded, padded_masks, (top, left, height, width)


def make_volume(name: str, images: np.ndarray, masks: np.ndarray, slice_numbers: list[int]) -> PatientVolume:
    """A patient volume from (N, H, W, 3) uint8 slices and (N, H, W) {0, 1} masks, with its
    'volume' normalization statistics; ``set_normalization`` switches it to another method."""
    return PatientVolume(name=name, images=images, masks=masks, slice_numbers=slice_numbers,
                         stats=volume_stats(images))


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
        print(f"warning: {counted(len(empty), 'patient')} without tumor in any mask: {first_names(empty, 5)}"
              "; every patient of the LGG dataset has some, so check "
              "their masks ('python engine.py data' lists the values found)", file=sys.stderr)


def describe_masks(volumes: dict[str, PatientVolume]) -> str:
    """Which mask convention was read, e.g. 'masks 0/255 (35 patients), 0/1 (1: TCGA_A)'."""
    by_convention: dict[str, list[str]] = {}
    for name, v in volumes.items():
        by_convention.setdefault(v.mask_convention, []).append(name)
    parts = []
    for convention, names in sorted(by_convention.items(), key=lambda item: -len(item[1])):
        listed = f": {first_names(sorted(names))}" if len(by_convention) > 1 else ""
        parts.append(f"{convention} ({len(names)}{listed})" if len(names) < len(volumes)
                     else f"{convention} ({counted(len(names), 'patient')})")
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
        write_text(out_dir / "data_issues.txt", "\n".join(m for _, m in issues.items) + "\n")
        print(f"  all of them: {out_dir / 'data_issues.txt'}; --strict makes them errors", file=sys.stderr)


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


def institution(patient: str) -> str:
    """The institution that scanned a patient: the first two fields of its name, which for this
    dataset's TCGA_<site>_<case>_<date> names is the TCGA tissue source site (TCGA_CS_4941_19960909
    -> TCGA_CS); the 110 patients come from five (CS, DU, EZ, FG, HT)."""
    return "_".join(patient.split("_")[:2])

