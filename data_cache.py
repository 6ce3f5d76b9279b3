"""The decoded-slice cache: every patient's slices decoded once into memory and onto disk.

Each patient's slices are held in memory (uint8; about 200 KB a slice) because per-volume
normalization needs the whole volume, and re-reading TIFFs every epoch is slow. The decoded
arrays are cached on disk, keyed by the files' names, sizes and modification times.
"""

from __future__ import annotations

import glob
import hashlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from data_preprocessing import (
    VolumeStats,
)
from libraries import UserError, atomic_write
from data_files import (
    DataIssues,
    DatasetError,
    PatientVolume,
    SliceRecord,
    check_tumor,
    group_by_patient,
    make_volume,
    patient_slice_size,
    read_image,
    read_patient_masks,
    read_raw_mask,
    scan_dataset,
    set_normalization,
)

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
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f"{glob.escape(volume.name)}-*.npz"):
            stale.unlink(missing_ok=True)  # entries for older versions of this patient's files
        atomic_write(path, lambda tmp: _write_cached(tmp, volume))
    except (OSError, UserError) as exc:  # atomic_write's UserError carries the OSError
        cause = exc.__cause__ if isinstance(exc, UserError) and exc.__cause__ else exc
        reason = getattr(cause, "strerror", None) or str(cause).splitlines()[0]
        raise CacheUnwritable(f"{cache_dir}: the decoded-slice cache cannot be written ({reason})", volume) from exc
    return volume


class CacheUnwritable(Exception):
    """The decoded-slice cache could not be written; ``volume`` was decoded all the same."""

    def __init__(self, message: str, volume: PatientVolume):
        super().__init__(message)
        self.volume = volume


# Bump when the cached arrays or the statistics change meaning: old entries are then ignored.
CACHE_VERSION = 2  # 2: statistics over the voxels above each channel's minimum (was: above 0)


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/lgg-unet, else ~/.cache/lgg-unet."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lgg-unet"


def _cache_path(records: Sequence[SliceRecord], cache_dir: Path) -> Path:
    """<cache_dir>/<hash of the patient folder>/<patient>-<hash of version and file stats>.npz"""
    # os.fsencode: the path's own bytes; str.encode() fails on the surrogates a non-UTF-8 locale
    # decodes a non-ASCII name into (and gives the same bytes under a UTF-8 one).
    folder = hashlib.sha1(os.fsencode(records[0].image_path.parent.resolve())).hexdigest()[:16]
    key = hashlib.sha1(f"v{CACHE_VERSION}".encode())
    for r in records:
        for p in (r.image_path, r.mask_path):
            st = p.stat()
            key.update(os.fsencode(p.name) + f"|{st.st_size}|{st.st_mtime_ns}\n".encode())
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
    shape = patient_slice_size([(r.image_path, img.shape[:2], msk.shape) for r, img, msk in read], issues)
    images, masks = [], []
    for r, img, msk in read:
        if img.shape[:2] != shape or msk.shape != shape:  # reported by patient_slice_size
            img = cv2.resize(img, shape[::-1], interpolation=cv2.INTER_AREA)
            msk = cv2.resize(msk, shape[::-1], interpolation=cv2.INTER_NEAREST)
        images.append(img)
        masks.append(msk)
    volume = make_volume(records[0].patient, np.stack(images), np.stack(masks), [r.index for r, _, _ in read])
    volume.mask_convention = convention
    return volume


CACHE_ENV_VAR = "LGG_CACHE_DIR"


def resolve_cache_dir() -> Path | None:
    """The decoded-slice cache: $LGG_CACHE_DIR if set ('off': no cache), else ``default_cache_dir``."""
    chosen = os.environ.get(CACHE_ENV_VAR, "")
    if chosen == "off":
        return None
    return Path(chosen).expanduser() if chosen else default_cache_dir()


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
        try:
            volume = load_volume(groups[name], cache_dir, issues)
        except CacheUnwritable as exc:  # a cache only saves time: go on without it
            print(f"warning: {exc}; going on without it (set {CACHE_ENV_VAR} to a writable folder, or to 'off')",
                  file=sys.stderr)
            volume, cache_dir = exc.volume, None
        if volume is None:
            issues.report("skipped: patient without readable slices", f"{root / name}: no readable slice; left out")
        else:
            volumes[name] = set_normalization(volume, normalization, image_size)
    check_tumor(root, volumes)
    return volumes

