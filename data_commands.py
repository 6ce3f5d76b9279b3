"""The ``data`` and ``download`` commands: fetch the dataset, and report on a copy of it."""

from __future__ import annotations

import argparse
import shlex
import shutil
import zipfile
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import numpy as np

from libraries import UserError, add_bool_flag, check_folder_path, counted, first_names, save_json
from data_files import (
    DATASET_URL,
    DATA_ENV_VAR,
    DataIssues,
    DatasetError,
    FLAIR_CHANNEL,
    OTHER_MODALITIES,
    as_three_channels,
    imread,
    looks_like_root,
    find_data_dir,
    group_by_patient,
    institution,
    patient_id,
    patient_slice_size,
    read_clinical,
    read_patient_masks,
    read_raw_mask,
    scan_dataset,
)

KAGGLE_HANDLE = "mateuszbuda/lgg-mri-segmentation"


# The complete published dataset, for the completeness check.
FULL_PATIENTS, FULL_SLICES, FULL_TUMOR_SLICES = 110, 3929, 1373


DEFAULT_DOWNLOAD = Path("lgg-mri-segmentation")  # download --to; the loader looks in ./lgg-mri-segmentation/kaggle_3m


def manual_download(to: Path = DEFAULT_DOWNLOAD) -> str:
    """The steps that fetch the dataset by hand into ``to`` (download --to), and how it is then found."""
    where = ("next to engine.py (the loader finds lgg-mri-segmentation/kaggle_3m) or point --data-dir / "
             "$LGG_DATA_DIR at its kaggle_3m folder" if to == DEFAULT_DOWNLOAD else
             f"and pass --data-dir {shlex.quote(str(to / 'kaggle_3m'))} (or set ${DATA_ENV_VAR} to it)")
    return (f"download it by hand: open {DATASET_URL}, sign in, click Download (the file is archive.zip), "
            f"then run 'unzip archive.zip -d {shlex.quote(str(to))}' {where}")


def _inner(extract_to: Path) -> Path:
    """Where a zip inside the download (Kaggle's archive.zip within a folder) is extracted."""
    return extract_to.with_name(extract_to.name + "-inner")


def _unpack(source: Path, extract_to: Path) -> Path:
    """Extract a .zip into ``extract_to`` (or use a folder) and return the kaggle_3m folder found in it."""
    if source.is_file() and zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as archive:
            archive.extractall(extract_to)
        source = extract_to
    if source.is_dir():
        zips = [z for z in source.glob("*.zip") if zipfile.is_zipfile(z)]
        if zips and not any(source.rglob("*_mask.tif")):
            return _unpack(zips[0], _inner(extract_to))
        for candidate in [source, *sorted(p for p in source.rglob("kaggle_3m") if p.is_dir())]:
            if looks_like_root(candidate):
                return candidate
    # extract_to is <--to>/kaggle_3m.unzipped (or its -inner): the steps name the --to asked for.
    raise DatasetError(f"{source}: no kaggle_3m folder in the download; {manual_download(extract_to.parent)}")


def download_dataset(to: Path) -> Path:
    """Fetch the dataset with kagglehub (optional dependency) and place it at ``to``/kaggle_3m.

    Raises DatasetError with the manual steps when kagglehub is missing, offline or unauthorized.
    """
    to = check_folder_path(Path(to), "--to")  # before a download of 1 GB, not after it
    target = to / "kaggle_3m"
    if looks_like_root(target):
        return target
    try:
        import kagglehub  # optional: pip install kagglehub
    except ImportError:
        raise DatasetError(f"kagglehub is not installed (pip install kagglehub), or {manual_download(to)}") from None
    try:
        downloaded = Path(kagglehub.dataset_download(KAGGLE_HANDLE))
    except Exception as exc:  # network, credentials and HTTP errors come in many types
        raise DatasetError(f"Kaggle download failed ({type(exc).__name__}: {str(exc)[:120]}); "
                           f"{manual_download(to)}") from None
    unzipped = to / "kaggle_3m.unzipped"  # a zip's contents, removed once copied (or on failure)
    try:
        found = _unpack(downloaded, unzipped)
        to.mkdir(parents=True, exist_ok=True)
        tmp = to / "kaggle_3m.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(found, tmp)
        tmp.rename(target)  # only a complete copy ever carries the name the loader looks for
    finally:
        for extracted in (unzipped, _inner(unzipped)):
            shutil.rmtree(extracted, ignore_errors=True)
    return target


def _read_patient(
    recs: Sequence, issues: DataIssues, sizes: dict[str, int], mask_values: np.ndarray
) -> tuple[list[np.ndarray], str, dict[str, bool]]:
    """One patient's masks as training reads them and their convention, and for each non-FLAIR
    modality whether every readable slice repeats FLAIR in its place. Counts each image size into
    ``sizes`` and each raw mask value into ``mask_values``; unreadable slices are reported and skipped."""
    mask_paths, raw_masks, slice_sizes = [], [], []
    repeats_flair = {modality: True for modality in OTHER_MODALITIES}
    for r in recs:
        try:
            raw = imread(r.image_path)
            mask_raw = read_raw_mask(r.mask_path, issues)
        except DatasetError as exc:
            issues.report("skipped: unreadable file", f"{exc}; the slice is skipped")
            continue
        mask_paths.append(r.mask_path)
        raw_masks.append(mask_raw)
        slice_sizes.append((r.image_path, raw.shape[:2], mask_raw.shape))
        key = "x".join(map(str, raw.shape))
        sizes[key] = sizes.get(key, 0) + 1
        image = as_three_channels(raw, r.image_path, issues)  # reports grayscale and alpha, as training does
        for modality, c in OTHER_MODALITIES.items():
            repeats_flair[modality] &= bool((image[..., c] == image[..., FLAIR_CHANNEL]).all())
        mask_values += np.bincount(mask_raw.ravel(), minlength=256)[:256]
    if not mask_paths:
        return [], "none readable", repeats_flair
    patient_slice_size(slice_sizes, issues)  # what training resizes
    # Tumor is counted by the convention the patient's masks are read with in training.
    masks, convention = read_patient_masks(mask_paths, issues, raw=raw_masks)
    return masks, convention, repeats_flair


def summarize_dataset(root: Path, strict: bool = False) -> dict:
    """Everything a user should know about a copy of the dataset before training on it."""
    issues = DataIssues(strict=strict)
    records = scan_dataset(root, issues)
    groups = group_by_patient(records)
    sizes: dict[str, int] = {}
    mask_values = np.zeros(256, np.int64)
    areas, tumor_slices, per_patient, identical = [], 0, {}, []
    flair_in_place = {modality: [] for modality in OTHER_MODALITIES}
    conventions: dict[str, list[str]] = {}
    for name, recs in groups.items():
        masks, convention, repeats_flair = _read_patient(recs, issues, sizes, mask_values)
        readable = len(masks) > 0
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
        return {"status": "complete", "message": f"complete: all {FULL_PATIENTS} patients, {FULL_SLICES:,} "
                f"slices, {FULL_TUMOR_SLICES:,} with tumor"}
    listed = set(clinical.index) if clinical is not None else set()
    missing = sorted(listed - ids)
    full_copy = len(listed) >= FULL_PATIENTS or report["patients"] >= FULL_PATIENTS
    if full_copy:
        parts = []
        if missing:
            parts.append(f"{counted(len(missing), 'patient folder')} missing: {', '.join(missing[:10])}"
                         f"{' ...' if len(missing) > 10 else ''}")
        if report["slices"] < FULL_SLICES:
            parts.append(f"{FULL_SLICES - report['slices']:,} of {FULL_SLICES:,} slice/mask pairs missing")
        if report["tumor_slices"] < FULL_TUMOR_SLICES:
            parts.append(f"{FULL_TUMOR_SLICES - report['tumor_slices']:,} of {FULL_TUMOR_SLICES:,} tumor slices "
                         "missing")
        return {"status": "incomplete", "missing_patients": missing,
                "message": "looks like a full copy, but " + ("; ".join(parts) or "counts differ from the published ones")
                + f"; re-download {DATASET_URL}"}
    return {"status": "subset", "missing_patients": missing,
            "message": f"a subset: {report['patients']} of the {FULL_PATIENTS} patients "
            f"({report['slices']:,} of {FULL_SLICES:,} slices); not an error if that is what you meant to use"}


def data_command(data_dir: str, out: str, strict: bool) -> dict:
    """The ``data`` command: print the dataset report and write it as JSON."""
    root = find_data_dir(data_dir or None)
    if root is None:
        raise UserError(f"no dataset found (--data-dir, ${DATA_ENV_VAR}, ./kaggle_3m); "
                        "run 'python engine.py download' or pass --data-dir")
    path = Path(out) if out else Path("runs") / f"data-report-{datetime.now():%Y%m%d-%H%M%S}.json"
    check_folder_path(path.parent, "--out", named=path)  # before reading every slice, not after
    report = summarize_dataset(root, strict=strict)
    clinical = read_clinical(root)
    report["clinical_table"] = None if clinical is None else {"rows": len(clinical), "columns": list(clinical.columns)}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_json(path, report)
    area = report["tumor_area_px"]
    lines = [
        f"dataset: {root}",
        f"  {counted(report['patients'], 'patient')}, {counted(report['slices'], 'slice')}, "
        f"{report['tumor_slices']:,} with tumor",
        f"  {report['completeness']['message']}",
        "  institutions: " + ", ".join(f"{k} {v}" for k, v in report["institutions"].items()),
        "  image sizes: " + ", ".join(f"{k} ({v})" for k, v in report["image_sizes"].items()),
        "  mask values: " + ", ".join(f"{k}: {v:,}" for k, v in report["mask_values"].items()),
        "  masks read as: " + ", ".join(f"{c} ({counted(len(names), 'patient')}"
                                        + (f": {first_names(names)})"
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
        "  clinical table (data.csv): "
        + (counted(len(clinical), "row") if clinical is not None else "not found (optional)"),
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
    parser.add_argument("--to", default=str(DEFAULT_DOWNLOAD),
                        help="folder that receives kaggle_3m/ (default: ./lgg-mri-segmentation, found automatically)")

