"""Scanner files -> volumes and back: NIfTI files and DICOM series of one case, and masks written
on the input's own grid (NIfTI, and a DICOM SEG on a DICOM series).

A case is up to three sequences on one grid (this package does not register images) plus, for
``evaluate``, a mask::

    case/flair.nii.gz  case/t1.nii.gz  case/t1ce.nii.gz  [case/seg.nii.gz]   (NIfTI, BraTS' names work)
    case/flair/*.dcm   case/t1/*.dcm   case/t1ce/*.dcm                      (a DICOM series per folder)

Volumes are reoriented to the closest canonical (RAS) orientation and sliced axially, each slice
laid out as the dataset's are (anterior up, the patient's right on the left), so the network sees
what it was trained on; masks are mapped back to the input's orientation, affine and header.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform

from data_files import FLAIR_CHANNEL, subfolders
from libraries import UserError

# The network's channels, in the dataset's order (data_files.FLAIR_CHANNEL is 1).
MODALITIES = ("t1", "flair", "t1ce")
MODALITY_NAMES = {"t1": "T1 (pre-contrast)", "flair": "FLAIR", "t1ce": "T1 post-contrast"}
# Words of a file or folder name that say what it holds; a name is split into words at every
# character that is not a letter or digit ("BraTS20_Training_001_t1ce.nii.gz" -> ..., "t1ce").
# BraTS' names of 2018-2021 (flair, t1, t1ce, t2, seg) and of 2023 (t2f, t1n, t1c, t2w, seg) both work;
# T2 is not an input of this network and is left out.
NAME_WORDS = {
    "flair": {"flair", "t2flair", "t2f"},
    "t1ce": {"t1ce", "t1gd", "t1c", "t1post", "post", "postcontrast", "gd", "t1wce", "ce"},
    "t1": {"t1", "t1n", "t1pre", "pre", "precontrast", "t1w", "t1native"},
    "seg": {"seg", "mask", "label", "labels", "segmentation", "truth", "gt"},
}
NIFTI_SUFFIXES = (".nii", ".nii.gz")
REGISTER_HINT = ("this package does not register images: resample them onto the FLAIR first, for example with "
                 "ANTs (antsRegistrationSyN.sh), 3D Slicer's General Registration (BRAINS) or SimpleITK")
CANONICAL = axcodes2ornt("RAS")


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def strip_suffix(name: str) -> str:
    """A file's name without .nii, .nii.gz or .dcm."""
    return re.sub(r"(\.nii(\.gz)?|\.dcm)$", "", name, flags=re.IGNORECASE)


def role_of(path: Path) -> str | None:
    """What a file or folder holds, from its name: 'flair', 't1ce', 't1', 'seg', or None."""
    words = set(re.split(r"[^a-z0-9]+", strip_suffix(path.name).lower()))
    for role in ("seg", "flair", "t1ce", "t1"):  # t1ce before t1: 'T1_post' names both words
        if words & NAME_WORDS[role]:
            return role
    return None


def is_scan(path: Path) -> bool:
    """A NIfTI file, or a folder holding DICOM files (files ending in .dcm, or any file with the
    DICOM preamble's 'DICM' at byte 128)."""
    if path.is_file():
        return is_nifti(path)
    return path.is_dir() and any(_looks_dicom(f) for f in path.iterdir() if f.is_file())


def _looks_dicom(path: Path) -> bool:
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def case_files(folder: Path) -> dict[str, Path]:
    """The sequences (and mask) of one case folder, by role; raises UserError where a role is
    claimed by several entries or FLAIR is missing, listing what was found and the flags to use."""
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith(".") and is_scan(p))
    found: dict[str, list[Path]] = {}
    for entry in entries:
        role = role_of(entry)
        if role is not None:
            found.setdefault(role, []).append(entry)
    listing = ", ".join(p.name for p in entries) or "no NIfTI file or DICOM folder"
    # evaluate has no flag per file, so renaming is the fix that works for both commands.
    flags = ("rename them so that one name says each of flair, t1, t1ce (and seg, evaluate's mask), "
             "or give predict each file with --flair, --t1 and --t1ce")
    for role, paths in found.items():
        if len(paths) > 1:
            raise UserError(f"{folder}: {len(paths)} entries look like {role} ({', '.join(p.name for p in paths)}); "
                            f"found: {listing}; {flags}")
    if "flair" not in found:
        raise UserError(f"{folder}: no FLAIR among {listing} (names with 'flair' are recognised; t1ce/t1gd/post "
                        f"and t1/pre for the others); {flags}")
    return {role: paths[0] for role, paths in found.items()}


def find_cases(path: Path) -> list[tuple[str, dict[str, Path]]]:
    """(name, files by role) of each case under ``path``: a case folder itself, or a folder of
    case folders. A folder of 2D slices is not a case (predict reads those as before)."""
    if is_nifti(path):
        return [(strip_suffix(path.name), {"flair": path})]
    direct = [p for p in path.iterdir() if is_scan(p) and role_of(p) is not None]
    if direct:
        return [(path.name, case_files(path))]
    cases = [p for p in subfolders(path) if any(is_scan(q) and role_of(q) is not None for q in p.iterdir())]
    return [(p.name, case_files(p)) for p in cases]


def holds_scans(path: Path) -> bool:
    """Whether ``path`` is a NIfTI file, a case folder or a folder of case folders (else: 2D slices)."""
    if path.is_file():
        return is_nifti(path)
    if not path.is_dir():
        return False
    return any(is_scan(p) or (p.is_dir() and any(is_scan(q) for q in p.iterdir())) for p in path.iterdir())


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------
def read_nifti(path: Path) -> nib.Nifti1Image:
    """A 3D NIfTI image with its voxels in memory; one-line errors for files that are not complete
    NIfTI, for 2D images and for 4D files of several volumes."""
    try:
        image = nib.load(str(path))
        data = np.asanyarray(image.dataobj)  # reads (and decompresses) everything: a cut file fails here
    except Exception as exc:  # nibabel raises ImageFileError, EOFError, zlib.error, OSError, ValueError...
        raise UserError(f"{path}: cannot be read as NIfTI ({type(exc).__name__}: {str(exc)[:80]}); "
                        "the file may be truncated: export or copy it again") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim == 2 or (data.ndim == 3 and min(data.shape) == 1):
        raise UserError(f"{path}: a 2D image ({'x'.join(map(str, data.shape))}); a 3D volume is needed: "
                        "export the whole series, or predict 2D slices as .tif/.png files")
    if data.ndim != 3:
        raise UserError(f"{path}: a {data.ndim}D image ({'x'.join(map(str, data.shape))}) whose volumes are not "
                        "named, so which one is FLAIR cannot be told: split it into one file per sequence "
                        "(for example fslsplit) and pass them with --flair, --t1 and --t1ce")
    return nib.Nifti1Image(data, image.affine, image.header)


def read_dicom_series(folder: Path) -> nib.Nifti1Image:
    """One DICOM series (a folder of its slices) as a NIfTI image in RAS world coordinates.

    Slices are ordered by their position along the slice normal; a gap larger than 1.5 times the
    usual spacing (a missing file), two slices at one position, several series in one folder
    and slices of different sizes or orientations are one-line errors.
    """
    slices, orient, spacing, step = dicom_series(folder)
    row, col = orient[:3], orient[3:]
    normal = np.cross(row, col)
    planes = []
    for f, ds in slices:
        try:
            pixels = ds.pixel_array.astype(np.float32)
        except Exception as exc:  # pydicom raises several kinds for compressed or cut pixel data
            raise UserError(f"{f}: its pixels cannot be decoded ({type(exc).__name__}); install the decoder "
                            "pydicom names (pylibjpeg, gdcm) or export the series uncompressed") from None
        if planes and pixels.shape != planes[0].shape:
            raise UserError(f"{f}: {pixels.shape} pixels where the series has {planes[0].shape}")
        slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
        planes.append(pixels * slope + intercept)
    # Voxel (i, j, k) = (column, row, slice); DICOM's patient axes are LPS, NIfTI's world is RAS.
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2] = row * spacing[1], col * spacing[0], normal * step
    lps[:3, 3] = np.array(slices[0][1].ImagePositionPatient, float)
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    image = nib.Nifti1Image(np.stack([p.T for p in planes], axis=-1), ras)
    image.set_qform(ras, code=1)  # scanner coordinates, in both forms, as dcm2niix writes them
    image.set_sform(ras, code=1)
    return image


def dicom_series(folder: Path) -> tuple[list[tuple[Path, Any]], np.ndarray, np.ndarray, float]:
    """A DICOM series folder's (file, dataset) slices sorted along the slice normal, its
    ImageOrientationPatient, PixelSpacing and slice step; ``read_dicom_series``'s voxel k is slice k."""
    slices = _dicom_slices(folder)
    orient, spacing = _common_geometry(slices)
    normal = np.cross(orient[:3], orient[3:])
    slices.sort(key=lambda item: float(np.array(item[1].ImagePositionPatient, float) @ normal))
    return slices, orient, spacing, _slice_step(folder, slices, normal)


def _dicom_slices(folder: Path) -> list[tuple[Path, Any]]:
    """(file, dataset) of every DICOM image in ``folder``, all of one series, at least two."""
    slices = [(f, ds) for f, ds in _dicom_files(folder) if "PixelData" in ds]
    if not slices:
        raise UserError(f"{folder}: no DICOM image in this folder; pass the folder that holds one series' files")
    if len({str(ds.get("SeriesInstanceUID", "")) for _, ds in slices}) > 1:
        raise UserError(f"{folder}: several DICOM series in one folder; put each series in a folder of its own, "
                        "named for its sequence (flair, t1, t1ce), or give predict the folders with --flair, --t1 "
                        "and --t1ce")
    if len(slices) < 2:
        raise UserError(f"{folder}: a single DICOM slice; a 3D series is needed")
    return slices


def _dicom_files(folder: Path, *, pixels: bool = True) -> Iterator[tuple[Path, Any]]:
    """(file, dataset) of each DICOM file in ``folder``, in name order, its pixels read or not."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    for f in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=not pixels)
        except (InvalidDicomError, OSError, ValueError, EOFError):
            continue  # not DICOM (a README, a DICOMDIR's neighbours): ignored
        yield f, ds


def _common_geometry(slices: list[tuple[Path, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """The series' ImageOrientationPatient (6) and PixelSpacing (2), the same on every slice."""
    first, orient, spacing = None, None, None
    for f, ds in slices:
        try:
            o, s = np.array(ds.ImageOrientationPatient, float), np.array(ds.PixelSpacing, float)
            _ = ds.ImagePositionPatient  # raises where it is missing, as the two above
        except AttributeError as exc:
            raise UserError(f"{f}: lacks {str(exc).split()[-1]} (ImagePositionPatient, ImageOrientationPatient "
                            "and PixelSpacing place a slice)") from None
        if first is None:
            first, orient, spacing = f, o, s
        elif not (np.allclose(o, orient, atol=1e-4) and np.allclose(s, spacing, atol=1e-4)):
            raise UserError(f"{f}: another orientation or pixel spacing than {first.name}; one series per folder")
    return orient, spacing


def _slice_step(folder: Path, slices: list[tuple[Path, Any]], normal: np.ndarray) -> float:
    """The spacing of the sorted ``slices`` along ``normal``; a missing or doubled slice is an error."""
    positions = np.array([np.array(ds.ImagePositionPatient, float) @ normal for _, ds in slices])
    gaps = np.diff(positions)
    step = float(np.median(gaps))
    if gaps.min() < 0.01 * max(step, 1e-6):
        i = int(np.argmin(gaps))
        raise UserError(f"{slices[i + 1][0]}: at the same position as {slices[i][0].name}; "
                        "one series (one echo, one time point) per folder")
    if gaps.max() > 1.5 * step:
        i = int(np.argmax(gaps))
        raise UserError(f"{folder}: a slice is missing between {slices[i][0].name} and {slices[i + 1][0].name} "
                        f"({positions[i]:.1f} and {positions[i + 1]:.1f} mm, {gaps[i]:.1f} mm apart where slices "
                        f"are {step:.1f} mm apart); copy the whole series")
    return step


def read_scan(path: Path) -> nib.Nifti1Image:
    """A NIfTI file or a DICOM series folder, as a 3D NIfTI image."""
    if path.is_dir():
        return read_dicom_series(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    if not is_nifti(path):
        raise UserError(f"{path}: not a NIfTI file (.nii, .nii.gz) nor a DICOM series folder")
    return read_nifti(path)


def grid_difference(flair: nib.Nifti1Image, image: nib.Nifti1Image) -> str | None:
    """What makes ``image``'s grid differ from the FLAIR's (shape, spacing, orientation, origin),
    ``image``'s value first, or None when they agree within a tenth of a voxel."""
    z_flair, z_image = nib.affines.voxel_sizes(flair.affine), nib.affines.voxel_sizes(image.affine)
    axes_flair, axes_image = "".join(nib.aff2axcodes(flair.affine)), "".join(nib.aff2axcodes(image.affine))
    if flair.shape != image.shape:
        what, mine, theirs = "shape", "x".join(map(str, image.shape)), "x".join(map(str, flair.shape))
    elif not np.allclose(z_flair, z_image, rtol=1e-3, atol=1e-4):
        what, mine, theirs = "spacing", f"{_mm(z_image)} mm", f"{_mm(z_flair)} mm"
    elif axes_flair != axes_image:
        what, mine, theirs = "orientation", axes_image, axes_flair
    elif not np.allclose(flair.affine[:3, :3], image.affine[:3, :3], atol=1e-3 * float(z_flair.max())):
        return "axis directions (the images are rotated against each other)"
    elif np.abs(flair.affine[:3, 3] - image.affine[:3, 3]).max() > 0.1 * float(z_flair.min()):
        what, mine, theirs = "origin", f"{_mm(image.affine[:3, 3])} mm", f"{_mm(flair.affine[:3, 3])} mm"
    else:
        return None
    return f"{what} {mine}, where the FLAIR has {theirs}"


def _mm(values: np.ndarray) -> str:
    return " x ".join(f"{v:g}" for v in np.round(values, 3))


# ------------------------------------------------------------------------------------------------
# Orientation: the file's voxel grid <-> the network's slices
# ------------------------------------------------------------------------------------------------
def to_slices(data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """(X, Y, Z) voxels -> (D, H, W) axial slices laid out as the dataset's: reoriented to RAS,
    then each slice with anterior at the top and the patient's right on the left (radiological)."""
    canonical = apply_orientation(data, ornt_transform(io_orientation(affine), CANONICAL))
    return np.ascontiguousarray(np.flip(canonical, (0, 1)).transpose(2, 1, 0))


def from_slices(slices: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """The inverse of ``to_slices``: (D, H, W) -> the file's (X, Y, Z) voxel order."""
    canonical = np.flip(slices.transpose(2, 1, 0), (0, 1))
    return np.ascontiguousarray(apply_orientation(canonical, ornt_transform(CANONICAL, io_orientation(affine))))


def slice_spacing(image: nib.Nifti1Image) -> tuple[float, float, float]:
    """(dz, dy, dx) in mm of the slices ``to_slices`` makes of ``image``."""
    to_ras = ornt_transform(io_orientation(image.affine), CANONICAL)
    sx, sy, sz = nib.affines.voxel_sizes(image.affine @ inv_ornt_aff(to_ras, image.shape))
    return float(sz), float(sy), float(sx)


# ------------------------------------------------------------------------------------------------
# A case
# ------------------------------------------------------------------------------------------------
@dataclass
class Case:
    """One case read for the network: the sequences stacked as the dataset's channels."""

    name: str
    images: np.ndarray  # (D, H, W, 3) float32 slices (to_slices), channels t1, flair, t1ce
    truth: np.ndarray  # (D, H, W) uint8 {0, 1}; zeros when no mask was given
    spacing: tuple[float, float, float]  # (dz, dy, dx) mm
    reference: nib.Nifti1Image  # the FLAIR as read: the grid, affine and header masks are written on
    source: Path  # the FLAIR's file or folder
    filled: tuple[str, ...]  # sequences missing, filled with FLAIR
    mask_values: tuple[float, ...] = ()  # the values above 0 in its mask, before --labels chose among them


def scan_values(image: nib.Nifti1Image, path: Path) -> np.ndarray:
    """A sequence's voxels as float32 slices (``to_slices``). NaN and infinite voxels, which some
    tools write outside their mask, become the image's lowest value: the air that the per-volume
    statistics leave out (one such voxel would make every statistic, and so the mask, NaN)."""
    values = to_slices(np.asarray(image.dataobj, dtype=np.float32), image.affine)
    bad = ~np.isfinite(values)
    if bad.all():
        raise UserError(f"{path}: every voxel is NaN or infinite; export the sequence again")
    if bad.any():
        print(f"warning: {path}: {int(bad.sum()):,} voxels ({bad.mean():.1%}) are NaN or infinite; they are taken as "
              "background (the image's lowest value)", file=sys.stderr)
        values = np.where(bad, values[~bad].min(), values)
    if values.min() == values.max():  # normalized to zeros, any mask would be the network's guess
        raise UserError(f"{path}: every voxel is {values.flat[0]:g}, an image with nothing to segment; export the "
                        "sequence again (a T1 or T1ce may instead be left out: the FLAIR fills it)")
    return values


def load_case(name: str, files: dict[str, Path], labels: tuple[int, ...] | None = None) -> Case:
    """Read a case's sequences (and its mask, if ``files`` has 'seg'), check they share the FLAIR's
    grid and stack them. A missing T1 or T1 post-contrast is filled with the FLAIR, as the dataset
    does for its 6 patients that lack one. ``labels``: the mask values that count as tumor (None:
    every value above 0)."""
    flair = read_scan(files["flair"])
    flair_slices = scan_values(flair, files["flair"])
    images, filled = [], [role for role in MODALITIES if role not in files]
    for role in MODALITIES:
        if role == "flair" or role in filled:
            images.append(flair_slices)  # converted once, whichever channels it fills
            continue
        image = read_scan(files[role])
        if (diff := grid_difference(flair, image)) is not None:
            raise UserError(f"{files[role]}: not on the grid of {files['flair']}: {diff}; {REGISTER_HINT}")
        images.append(scan_values(image, files[role]))
    truth = np.zeros(images[FLAIR_CHANNEL].shape, np.uint8)
    mask_values: tuple[float, ...] = ()
    if "seg" in files:
        seg = read_scan(files["seg"])
        if (diff := grid_difference(flair, seg)) is not None:
            raise UserError(f"{files['seg']}: the mask is not on the grid of {files['flair']}: {diff}")
        values = to_slices(np.asarray(seg.dataobj), seg.affine)
        truth = (np.isin(values, labels) if labels else values > 0).astype(np.uint8)
        mask_values = tuple(float(v) for v in np.unique(values[values > 0]))
    return Case(name=name, images=np.stack(images, axis=-1), truth=truth, spacing=slice_spacing(flair),
                reference=flair, source=files["flair"], filled=tuple(filled), mask_values=mask_values)


def warn_filled(case: Case, warned: set[str]) -> None:
    """Warn once per run and per missing sequence that it was filled with the FLAIR."""
    for role in case.filled:
        if role not in warned:
            warned.add(role)
            print(f"warning: {case.name}: no {MODALITY_NAMES[role]}; the FLAIR is copied into its channel, as in "
                  "the dataset's patients that lack one (trained for by modality dropout); accuracy may be lower "
                  "(said once)", file=sys.stderr)


def parse_labels(text: str) -> tuple[int, ...] | None:
    """``--labels``: a comma list of integer mask values that are tumor ('' or 'nonzero': every value above 0)."""
    if text in ("", "nonzero"):
        return None
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"--labels {text!r}: a comma list of integer label values, such as 1,2,4 "
                        "(BraTS' whole tumor)") from None


def write_mask(mask: np.ndarray, case: Case, path: Path) -> Path:
    """Write (D, H, W) bool ``mask`` as a uint8 0/1 NIfTI on ``case``'s FLAIR grid: its shape,
    orientation, affine and header (qform and sform codes included), so viewers overlay it as is."""
    return _write_on_grid(mask.astype(np.uint8), case, path, b"predicted FLAIR abnormality, 0/1 (lgg-unet)")


def write_probability(prob: np.ndarray, case: Case, path: Path) -> Path:
    """Write the (D, H, W) tumor probability (0-1, before threshold and post-processing) as a
    float32 NIfTI on ``case``'s FLAIR grid, as ``write_mask`` writes the mask."""
    return _write_on_grid(prob.astype(np.float32), case, path, b"tumor probability, 0-1 (lgg-unet)")


def _write_on_grid(slices: np.ndarray, case: Case, path: Path, description: bytes) -> Path:
    """(D, H, W) values of 0-1 -> a NIfTI of their dtype at ``path``, on the FLAIR's grid and header."""
    header = case.reference.header.copy()
    header.set_data_dtype(slices.dtype)
    # The FLAIR's display window (cal_max 1500, say) would show values of 0-1 as black, and its
    # description would describe the scan, not what is written.
    header["cal_min"], header["cal_max"] = 0, 1
    header["descrip"] = description
    affine = case.reference.affine
    image = nib.Nifti1Image(from_slices(slices, affine), affine, header)
    image.header.set_slope_inter(1, 0)
    # the input's codes: viewers place the mask exactly as the scan
    image.set_qform(affine, code=int(case.reference.header["qform_code"]))
    image.set_sform(affine, code=int(case.reference.header["sform_code"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{''.join(path.suffixes)}")
    nib.save(image, str(tmp))
    tmp.replace(path)
    return path


# Attributes of the Patient and General Study modules that a DICOM SEG copies from its source
# series. They are type 2 (present, possibly empty); anonymizers sometimes drop them altogether.
SEG_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "StudyID",
              "AccessionNumber", "ReferringPhysicianName")


def check_seg_references(path: Path, ds: Any) -> None:
    """Refuse, in one line, a DICOM series file that lacks the UIDs a DICOM SEG must share with it:
    the study's, which files the SEG with the series, and the frame of reference, which places it."""
    if missing := [name for name in ("StudyInstanceUID", "FrameOfReferenceUID") if name not in ds]:
        raise UserError(f"{path}: lacks {' and '.join(missing)}, which a DICOM SEG shares with the series it "
                        "segments; export the series with them, or drop --dicom-seg for the NIfTI mask alone")


def first_dicom_header(folder: Path) -> tuple[Path, Any] | None:
    """The first file of a DICOM series folder that places an image, and its header (pixels unread);
    None where there is none (``read_dicom_series`` then says what is wrong)."""
    return next(((f, ds) for f, ds in _dicom_files(folder, pixels=False) if "ImagePositionPatient" in ds), None)


def write_dicom_seg(mask: np.ndarray, case: Case, path: Path, *, algorithm: str) -> Path:
    """Write (D, H, W) bool ``mask`` as a DICOM Segmentation (binary, one segment) of the DICOM
    series the case's FLAIR was read from: each frame references the FLAIR slice it lies on, with
    that slice's position, in the series' study and frame of reference, so a PACS viewer, OHIF or
    3D Slicer overlays it on that series. ``algorithm`` names the weights (AlgorithmName's version).
    Frames without tumor are left out, unless no frame holds any. Needs highdicom."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    files, sources = zip(*dicom_series(case.source)[0])
    check_seg_references(files[0], sources[0])
    for ds in sources:
        for name in SEG_COPIED:
            if name not in ds:
                setattr(ds, name, "")
    # from_slices gives the FLAIR's voxel order, which for DICOM is (column, row, slice): see read_dicom_series.
    frames = from_slices(mask.astype(np.uint8), case.reference.affine).transpose(2, 1, 0).astype(bool)
    segment = hd.seg.SegmentDescription(
        segment_number=1, segment_label="FLAIR abnormality",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Neoplasm,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name="lgg-unet", version=algorithm, family=codes.cid7162.ArtificialIntelligence))
    try:
        seg = hd.seg.Segmentation(
            source_images=sources, pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=[segment], series_instance_uid=hd.UID(), series_number=9901,
            sop_instance_uid=hd.UID(), instance_number=1, manufacturer="lgg-unet",
            manufacturer_model_name="UNet for the FLAIR abnormality of low-grade gliomas", software_versions=algorithm,
            device_serial_number="none", series_description="FLAIR abnormality (lgg-unet)",
            omit_empty_frames=bool(frames.any()))
    except (ValueError, TypeError, AttributeError, KeyError) as exc:  # what highdicom raises for odd headers
        reason = " ".join(str(exc).split())
        raise UserError(f"{case.source}: highdicom could not make a DICOM SEG of this series ({type(exc).__name__}: "
                        f"{reason}); the NIfTI mask beside it was written") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    seg.save_as(tmp, enforce_file_format=True)
    tmp.replace(path)
    return path
