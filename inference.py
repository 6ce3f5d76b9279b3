"""New scans -> masks, and checkpoints -> deployable files: the ``predict`` and ``export`` commands.

``predict`` reads slices as they come (one file, a folder, a patient folder or a dataset root),
builds each folder's slices into a volume and runs it through the very pipeline that ``evaluate``
scores (``evaluation.scoring_loader`` and ``predict_volumes``): the same normalization, crop,
resize, paste-back, threshold and post-processing.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib
import io
import logging
import re
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from data_files import (FLAIR_CHANNEL, NORMALIZATIONS, DatasetError, PatientVolume, input_volume,
                        read_image, refuse_zip, subfolders, unpacked_root)
from evaluation import (
    add_scoring_flags,
    load_scored_checkpoint,
    postprocess_volume,
    predict_volumes,
    scoring_loader,
    scoring_settings,
)
from libraries import (Interrupted, UserError, atomic_write, check_folder_path, check_new_file, counted,
                       first_names, memory_format, setup_device, write_csv, write_image)
from metrics import parse_spacing
from model import fuse_conv_bn, input_width, network_from_checkpoint, overridden_settings, scoring_checkpoint
from reports import write_overlays
from scans import (MODALITIES, MODALITY_NAMES, check_seg_references, find_cases, first_dicom_header, holds_scans,
                   load_case, strip_suffix, warn_filled, write_dicom_seg, write_mask, write_probability)


def add_predict_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``predict`` command's flags."""
    parser.add_argument("--checkpoint", required=True,
                        help="a best.pt or last.pt written by training, or published weights: buda (Buda et al.'s, "
                             "downloaded once), a URL, a state_dict")
    parser.add_argument("--input", default="",
                        help="2D slices (a tif/png/jpg, a folder of them, a dataset root), or scans: a case folder "
                             "of NIfTI files or DICOM series folders named by sequence, or a folder of cases")
    for role in MODALITIES:
        parser.add_argument(f"--{role}", default="",
                            help=f"instead of --input: the {MODALITY_NAMES[role]} as a NIfTI file or a DICOM series "
                                 f"folder{' (required)' if role == 'flair' else '; missing: FLAIR is copied in'}")
    parser.add_argument("--output", required=True, help="folder for masks/, overlays/ and predictions.csv")
    parser.add_argument("--spacing", default="",
                        help="2D slices only: voxel spacing 'dz,dy,dx' in mm, for mm^2 and mm^3 and for pixels that are "
                             "not square (scans: the header's)")
    parser.add_argument("--dicom-seg", action="store_true",
                        help="scans read from DICOM: also write masks/<case>.seg.dcm, a DICOM Segmentation that "
                             "references the FLAIR series (needs highdicom)")
    parser.add_argument("--probabilities", action="store_true",
                        help="also write the tumor probability the masks were cut from (before the threshold "
                             "and post-processing) as float32: probabilities/<case>.nii.gz for scans, "
                             "probabilities/<folder>/<slice>_prob.tif for 2D slices")
    parser.add_argument("--batch-size", type=int, default=16)
    add_scoring_flags(parser)


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``export`` command's flags."""
    parser.add_argument("--checkpoint", required=True, help="a checkpoint, or published weights as for evaluate")
    parser.add_argument("--format", required=True, choices=tuple(EXPORT_SUFFIXES) + ("state_dict",),
                        help="torch_export: torch.export's program (.pt2, for torch.export.load), the successor of "
                             "TorchScript (deprecated in torch); state_dict: a small weights file with its record, "
                             "named unet-<sha256 prefix>.pt")
    parser.add_argument("--output", required=True, help="the file to write (a folder for --format state_dict)")
    parser.add_argument("--image-size", type=int, default=None, help="for a plain state_dict: the size it expects")
    parser.add_argument("--normalization", choices=NORMALIZATIONS, default=None,
                        help="for a plain state_dict: the normalization it expects")


IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
DATASET_FILES = ("data.csv", "readme.md")  # beside the slices of the Kaggle tree: not inputs, and not worth a line
EXPORT_SUFFIXES = {"torch_export": ".pt2", "torchscript": ".ts", "onnx": ".onnx"}  # the file each format writes


_NUMBER = re.compile(r"_(\d+)$")  # <PATIENT>_<N>, the dataset's naming
_TRAILING_NUMBER = re.compile(r"(\d+)$")  # the slice number of any naming: 10.png, slice10.png, IM-0001-0010.png


def input_folders(path: Path) -> list[Path]:
    """The folders whose slices ``predict`` reads for ``path``: itself and its subfolders, hidden
    ones (.ipynb_checkpoints, .cache) left out."""
    return [path, *subfolders(path)]


def slice_files(folder: Path) -> list[Path]:
    """The 2D slices ``predict`` reads in ``folder``, sorted by name: images, neither hidden nor masks."""
    return sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
                  and not f.name.startswith(".") and not f.stem.lower().endswith("_mask"))


def collect_inputs(path: Path) -> tuple[dict[str, list[Path]], list[Path]]:
    """Group the slices to predict by patient; also return the files that are not images.

    ``path`` may be one slice, a folder of slices, a kaggle_3m patient folder or a dataset root.
    A folder is a patient, unless its slices are named ``<NAME>_<N>`` with several NAMEs: then each
    NAME is one (a volume is normalized and post-processed in 3D as a whole, so two patients must
    never share one). Masks (``*_mask.*``) are never inputs. Slices are ordered by the number that
    ends their name (N, or 10 in slice10.png), then by name.
    """
    if path.is_file():
        if path.stem.lower().endswith("_mask"):
            image = path.with_name(path.stem[:-len("_mask")] + path.suffix)
            raise UserError(f"{path}: a mask (named *_mask), not an MRI slice; pass the slice "
                            f"({image.name}) or the folder that holds it")
        return {path.parent.name or "input": [path]}, []
    if not path.is_dir():
        raise UserError(f"{path}: no such file or folder; pass a slice, a folder of slices or a dataset folder")
    if (inner := unpacked_root(path)) is not None and not any(slice_files(folder) for folder in input_folders(path)):
        print(f"note: {path} holds the dataset in {inner}; predicting its patients", file=sys.stderr)
        path = inner  # as --data-dir accepts it
    groups: dict[str, list[Path]] = {}
    other: list[Path] = []
    for folder in input_folders(path):
        slices = []
        for f in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
            if f.stem.lower().endswith("_mask"):
                continue
            if f.suffix.lower() in IMAGE_SUFFIXES:
                slices.append(f)
            elif f.name.lower() not in DATASET_FILES:
                other.append(f)
        patient = {f: f.stem[:m.start()] for f in slices if (m := _NUMBER.search(f.stem))}  # <PATIENT>_<N>
        names = sorted(set(patient.values()))
        if len(names) > 1:
            print(f"note: {folder.name}: slices of {len(names)} patients ({', '.join(names)}), told apart by their "
                  "names <PATIENT>_<N>; each is a volume of its own", file=sys.stderr)
        for f in slices:
            groups.setdefault(patient.get(f, folder.name) if len(names) > 1 else folder.name, []).append(f)
    for files in groups.values():
        # By number, not by name ("10.png" before "2.png"): the volume's slices must be in order for its
        # 3D post-processing.
        files.sort(key=lambda f: (int(m[1]) if (m := _TRAILING_NUMBER.search(f.stem)) else -1, f.name))
        seen: dict[str, Path] = {}
        for f in files:  # P_1.tif beside P_1.png: one slice twice in the volume, and one mask file for both
            if (first := seen.setdefault(f.stem, f)) != f:
                raise UserError(f"{f.parent}: {first.name} and {f.name} are one slice in two files (both masks would "
                                f"be {f.stem}_pred.png); keep one of them, or move the other to a folder of its own")
    return groups, other


def read_inputs(groups: dict[str, list[Path]]) -> tuple[list[tuple[str, list[Path], np.ndarray]], int]:
    """Decode each folder's slices into volumes of one slice size and bit depth: (name, files,
    (N, H, W, 3) uint8 or uint16 images; ``input_volume`` takes 16-bit values without 8-bit rounding).

    A folder whose slices have several sizes or bit depths cannot be one 3D volume: each becomes a
    volume of its own (named <folder>_<H>x<W>_<bits>bit), with its own normalization statistics
    and crop, and a note says so. Files that cannot be decoded are skipped with a line each; the count of skipped
    files is returned.
    """
    volumes, skipped = [], 0
    for group, files in groups.items():
        by_kind: dict[tuple[int, int, int], list[tuple[Path, np.ndarray]]] = {}
        for f in files:
            try:
                image = read_image(f, sixteen_bit=True)  # grayscale comes back copied into 3 channels
            except DatasetError as exc:
                print(f"skipped: {exc}", file=sys.stderr)
                skipped += 1
                continue
            by_kind.setdefault((*image.shape[:2], image.dtype.itemsize * 8), []).append((f, image))
        if len(by_kind) > 1:
            kinds = ", ".join(f"{h}x{w} {bits}-bit ({len(v)})" for (h, w, bits), v in by_kind.items())
            print(f"note: {group}: slices of {len(by_kind)} sizes or bit depths ({kinds}); each is normalized, "
                  "cropped and post-processed as a volume of its own", file=sys.stderr)
        for (h, w, bits), items in by_kind.items():
            name = group if len(by_kind) == 1 else f"{group}_{h}x{w}_{bits}bit"
            volumes.append((name, [f for f, _ in items], np.stack([im for _, im in items])))
    return volumes, skipped


def scan_inputs(args: argparse.Namespace) -> list[tuple[str, dict[str, Path]]] | None:
    """The cases to predict when the input is scans (NIfTI, DICOM); None for 2D slices."""
    named = {role: Path(getattr(args, role)) for role in MODALITIES if getattr(args, role)}
    if (named or (args.input and holds_scans(Path(args.input)))) and args.spacing:
        raise UserError("--spacing is for 2D slices: NIfTI and DICOM headers give the spacing")
    if named:
        if args.input:
            raise UserError("--input and --flair/--t1/--t1ce: pass one or the other")
        if "flair" not in named:
            raise UserError("--t1/--t1ce without --flair: FLAIR is the one sequence the model cannot do without")
        seen: dict[Path, str] = {}
        for role, path in named.items():
            other = seen.setdefault(path.resolve(), role)
            if other != role:
                raise UserError(f"--{other} and --{role} name the same {path}; pass each sequence's own file, or leave "
                                f"--{role if role != 'flair' else other} out (the FLAIR fills a missing sequence)")
        flair = named["flair"]
        return [(strip_suffix(flair.name) if flair.is_file() else flair.resolve().parent.name, named)]
    if not args.input:
        raise UserError("pass --input (2D slices, a case folder or a folder of cases) or --flair (and --t1, --t1ce)")
    path = Path(args.input)
    refuse_zip(path)
    if not holds_scans(path):
        return None
    cases = find_cases(path)
    if not cases:
        raise UserError(f"{path}: NIfTI or DICOM files, but no case: name the FLAIR's file or folder with 'flair' "
                        "(a case folder or a folder of them), or pass --flair (and --t1, --t1ce)")
    if path.is_dir():  # 2D slices beside the scans are not read in this mode: say so
        slices = [f for folder in input_folders(path) for f in slice_files(folder)]
        if slices:
            print(f"note: {path}: holds scans, so {counted(len(slices), '2D slice file')} beside them "
                  f"({first_names([f.name for f in slices], 1)}) {'is' if len(slices) == 1 else 'are'} not "
                  "predicted; predict such files from a folder of their own", file=sys.stderr)
    return cases


class Predictor:
    """The model of ``--checkpoint``, run on whole volumes the way ``evaluate`` runs it."""

    def __init__(self, args: argparse.Namespace) -> None:
        path, ckpt = load_scored_checkpoint(args.checkpoint, image_size=args.image_size,
                                            normalization=args.normalization)
        self.record = ckpt["config"]
        self.threshold, self.postprocess = scoring_settings(args, self.record)
        self.normalization = self.record.get("normalization", "volume")
        self.device, self.amp_dtype = setup_device(args.device, args.amp)
        self.batch_size = args.batch_size
        self.channels_last = self.record.get("channels_last", False)
        self.model = fuse_conv_bn(network_from_checkpoint(ckpt, str(path))).to(
            self.device, memory_format=memory_format(self.channels_last))
        self.weights = f"{path.name}, epoch {ckpt['epoch']}" if "epoch" in ckpt else path.name  # what predicted

    def volume(self, name: str, images: np.ndarray, spacing: tuple[float, float, float] | None = None) -> PatientVolume:
        """A volume of (N, H, W, 3) slices of any scale, prepared as the checkpoint says."""
        return input_volume(name, images, None, normalization=self.normalization,
                            image_size=self.record["image_size"], spacing=spacing)

    def __call__(self, volumes: list[PatientVolume]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Each volume's post-processed (D, H, W) bool prediction, and the (D, H, W) float16
        probability it was thresholded from."""
        loader = scoring_loader(volumes, image_size=self.record["image_size"], batch_size=self.batch_size,
                                num_workers=0, seed=0, device=self.device)
        _, _, predicted = predict_volumes(self.model, loader, self.device, loss_fn=None, threshold=self.threshold,
                                          amp_dtype=self.amp_dtype, channels_last=self.channels_last,
                                          progress=False, desc="predict")
        return [(postprocess_volume(predicted[p], self.postprocess), predicted[p].prob) for p in range(len(volumes))]


@torch.inference_mode()
def predict_command(args: argparse.Namespace) -> Path:
    """The ``predict`` command: masks, overlays and a tumor-size CSV for new slices or scans."""
    out = check_folder_path(Path(args.output), "--output")
    if held := [name for name in ("predictions.csv", "masks/", "probabilities/") if (out / name).exists()]:
        raise UserError(f"{out}: already holds predictions ({', '.join(held)}); choose another --output or remove "
                        "it: earlier results are never overwritten")
    cases = scan_inputs(args)
    if args.dicom_seg:
        check_dicom_seg(cases)
    predictor = Predictor(args)
    try:
        if cases is not None:
            (count, skipped), kind, unit = predict_scans(cases, predictor, out, dicom_seg=args.dicom_seg,
                                                         probabilities=args.probabilities), "case", "case"
        else:
            count, skipped, kind = predict_slices(Path(args.input), parse_spacing(args.spacing), predictor, out,
                                                  probabilities=args.probabilities)
            unit = "file"
    except KeyboardInterrupt:  # Ctrl-C: what was finished is on disk; say where
        table = out / "predictions.csv"
        raise Interrupted(f"interrupted; {table} lists what was predicted before, with its masks and overlays "
                          "beside it; predict the rest into another --output" if table.exists() else
                          f"interrupted before the first prediction was written to {out}") from None
    print(f"predicted {counted(count, kind)} (post-processing: {predictor.postprocess}, "
          f"threshold {predictor.threshold:g})"
          + (f", skipped {counted(skipped, unit)} (listed above)" if skipped else "")
          + f"; wrote {out}/masks/, overlays/, {'probabilities/, ' if args.probabilities else ''}predictions.csv")
    return out


CSV_COLUMNS = ["patient", "file", "level", "area_px", "area_mm2", "volume_mm3"]
# Float TIFFs deflated without a predictor: OpenCV 5's default floating-point predictor is one that tifffile
# cannot decode without imagecodecs. By number: OpenCV 4.9 lacks IMWRITE_TIFF_PREDICTOR (317) and writes floats
# uncompressed whatever IMWRITE_TIFF_COMPRESSION (259) says.
TIFF_DEFLATE = (259, 8, 317, 1)


def predict_slices(path: Path, spacing: tuple[float, float, float] | None, predictor: Predictor,
                   out: Path, *, probabilities: bool = False) -> tuple[int, int, str]:
    """2D slices -> masks/<folder>/<slice>_pred.png (and with ``probabilities``
    probabilities/<folder>/<slice>_prob.tif), one overlay grid per volume and a row per slice
    and per folder; returns the slices predicted, the files skipped and what was counted.

    Folder by folder: memory holds one folder's slices, not a dataset's, and predictions.csv is
    rewritten after each, so an interrupted run keeps every folder it finished."""
    groups, other = collect_inputs(path)
    for f in other:
        print(f"skipped (not an image): {f}", file=sys.stderr)
    rows, skipped = [], len(other)
    for group, group_files in tqdm(groups.items(), desc="predict", unit="folder", leave=False,
                                   disable=len(groups) == 1 or not sys.stderr.isatty()):
        inputs, unreadable = read_inputs({group: group_files})
        skipped += unreadable
        if not inputs:
            continue
        predictions = predictor([predictor.volume(name, images, spacing) for name, _, images in inputs])
        for kind in ["masks", *(["probabilities"] if probabilities else [])]:
            (out / kind / group).mkdir(parents=True, exist_ok=True)
        first_row = len(rows)
        for (name, files, images), (pred, prob) in zip(inputs, predictions):
            for f, mask, p in zip(files, pred, prob):
                write_image(out / "masks" / group / f"{f.stem}_pred.png", mask.astype(np.uint8) * 255)
                if probabilities:  # the values themselves, as a float TIFF
                    write_image(out / "probabilities" / group / f"{f.stem}_prob.tif", p.astype(np.float32),
                                TIFF_DEFLATE)
                rows.append(area_row(group, str(f), "slice", int(mask.sum()), spacing))
            numbers = [m[1] if (m := _TRAILING_NUMBER.search(f.stem)) else f.stem for f in files]  # "slice 12"
            write_overlays(out, {0: (pred, None)}, {0: images[..., FLAIR_CHANNEL]}, {0: numbers}, [name])
        rows.append(area_row(group, "", "patient", sum(r["area_px"] for r in rows[first_row:]), spacing))
        atomic_write(out / "predictions.csv",
                     lambda tmp: write_csv(tmp, pd.DataFrame(rows, columns=CSV_COLUMNS)))
    if not rows:
        raise UserError(f"{path}: no readable slice (tif, tiff, png, jpg or jpeg) nor NIfTI/DICOM scan to predict"
                        + (f"; {counted(skipped, 'file')} skipped, as listed above" if skipped else ""))
    return sum(r["level"] == "slice" for r in rows), skipped, "slice"


def check_dicom_seg(cases: list[tuple[str, dict[str, Path]]] | None) -> None:
    """Refuse ``--dicom-seg`` before any prediction where it cannot be honoured."""
    if cases is None:
        raise UserError("--dicom-seg is for scans read from DICOM series; 2D slices get PNG masks")
    if not_dicom := [name for name, files in cases if not files["flair"].is_dir()]:
        raise UserError(f"--dicom-seg: the FLAIR of {first_names(not_dicom, 3)} is not a DICOM series folder, and a "
                        "DICOM SEG references the DICOM images it segments; drop --dicom-seg for NIfTI input")
    try:
        importlib.import_module("highdicom")
    except ImportError:
        raise UserError("--dicom-seg needs the optional package highdicom: pip install highdicom") from None
    for _, files in cases:
        if (first := first_dicom_header(files["flair"])) is not None:
            check_seg_references(*first)


def predict_scans(cases: list[tuple[str, dict[str, Path]]], predictor: Predictor, out: Path, *,
                  dicom_seg: bool = False, probabilities: bool = False) -> tuple[int, int]:
    """Each case -> masks/<case>.nii.gz on its FLAIR's grid (with ``dicom_seg`` masks/<case>.seg.dcm,
    with ``probabilities`` probabilities/<case>.nii.gz on the same grid),
    overlays/<case>.png and a row of predictions.csv (rewritten after every case, so a case that
    fails later loses nothing). A case that cannot be read is an error when it is the only one,
    else skipped with its one line. Returns the cases predicted and skipped."""
    rows, warned = [], set()
    for name, files in tqdm(cases, desc="predict", unit="case", leave=False,
                            disable=len(cases) == 1 or not sys.stderr.isatty()):
        try:
            case = load_case(name, files)
        except UserError as exc:
            if len(cases) == 1:
                raise
            print(f"skipped: {exc}", file=sys.stderr)
            continue
        warn_filled(case, warned)
        pred, prob = predictor([predictor.volume(name, case.images, spacing=case.spacing)])[0]
        mask_path = write_mask(pred, case, out / "masks" / f"{name}.nii.gz")
        prob_path = write_probability(prob, case, out / "probabilities" / f"{name}.nii.gz") if probabilities else None
        seg_path = write_dicom_seg(pred, case, out / "masks" / f"{name}.seg.dcm", algorithm=predictor.weights) \
            if dicom_seg else None
        write_overlays(out, {0: (pred, None)}, {0: case.images[..., FLAIR_CHANNEL]}, {0: list(range(len(pred)))},
                       [name])
        voxels = int(pred.sum())
        dz, dy, dx = case.spacing
        rows.append({"patient": name, "file": str(case.source), "level": "patient", "area_px": voxels,
                     "area_mm2": None, "volume_mm3": voxels * dz * dy * dx, "mask": str(mask_path),
                     **({"dicom_seg": str(seg_path)} if seg_path else {}),
                     **({"probabilities": str(prob_path)} if prob_path else {})})
        columns = [*CSV_COLUMNS, "mask", *(["dicom_seg"] if dicom_seg else []),
                   *(["probabilities"] if probabilities else [])]
        atomic_write(out / "predictions.csv", lambda tmp: write_csv(tmp, pd.DataFrame(rows, columns=columns)))
    if not rows:
        raise UserError("no case could be read (each is listed above); nothing was written")
    return len(rows), len(cases) - len(rows)


def area_row(group: str, file: str, level: str, area: int, spacing: tuple[float, float, float] | None) -> dict:
    """One predictions.csv row: tumor area in pixels, and in mm^2 (and mm^3 per patient) with a spacing."""
    dz, dy, dx = spacing or (None, None, None)
    return {"patient": group, "file": file, "level": level, "area_px": area,
            "area_mm2": area * dy * dx if spacing else None,
            "volume_mm3": area * dz * dy * dx if spacing and level == "patient" else None}


# What a released weights file records besides the weights: how to prepare inputs, how to read
# the output, and which patients the model was trained and validated on.
RELEASE_KEYS = ("features", "image_size", "normalization", "threshold", "postprocess", "channels_last", "batch_size",
                "seed", "patients", "trained_on", "resolved_data_dir", "synthetic_data")


def export_weights(ckpt: dict, model: torch.nn.Module, folder: Path) -> Path:
    """A small weights file for release: our key names, a record (RELEASE_KEYS) and half precision
    where that changes no predicted pixel and no probability by 1e-3 on a random batch (else
    fp32); named unet-<first 8 hex digits of its sha256>.pt, as torch.hub's check_hash expects."""
    state = model.state_dict()
    half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    size, threshold = ckpt["config"]["image_size"], ckpt["config"].get("threshold", 0.5)
    x = torch.randn(4, input_width(model), size, size, generator=torch.Generator().manual_seed(0))
    rounded = copy.deepcopy(model)
    rounded.load_state_dict(half)  # copied into the fp32 parameters, as loading it later will
    with torch.no_grad():
        full_p, half_p = torch.sigmoid(model(x)), torch.sigmoid(rounded.eval()(x))
    gap = float((full_p - half_p).abs().max())
    lossless = gap < 1e-3 and torch.equal(full_p > threshold, half_p > threshold)
    record = {k: ckpt["config"][k] for k in RELEASE_KEYS if k in ckpt["config"]}
    buffer = io.BytesIO()  # in memory (about 10 MB): the name needs the hash of the bytes
    torch.save({"model": half if lossless else state, "config": record, "epoch": ckpt.get("epoch")}, buffer)
    content = buffer.getvalue()
    path = folder / f"unet-{hashlib.sha256(content).hexdigest()[:8]}.pt"
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: tmp.write_bytes(content))
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, {'fp16' if lossless else 'fp32'} weights: the "
          f"largest probability change from fp16 on a random batch is {gap:.1e}); load it with "
          f"--checkpoint {path} or from a URL ending in {path.name}")
    return path


def save_export(out: Path, save: Callable[[BinaryIO], object]) -> None:
    """Write ``out`` atomically (never half a file) by calling ``save`` on a file Python opened, not
    on its name. Given a name, torch.export.save warns unless it ends in .pt2 (atomic_write's
    temporary file does not), and the C++ writers of TorchScript and ONNX fail on a name the locale
    cannot encode."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            save(f)

    atomic_write(out, write)


def check_export_output(out: Path, fmt: str) -> Path:
    """``out`` if ``export --format fmt`` may write there, before any work; else a one-line error."""
    if fmt == "state_dict":  # a folder: the file is named by its hash
        if out.suffix.lower() in (".pt", ".pth") and not out.is_dir():
            raise UserError(f"--output {out}: --format state_dict writes into a folder and names the file by its "
                            "hash (unet-<hash>.pt); pass a folder, such as release/")
        return check_folder_path(out, "--output")
    check_new_file(out, "--output", "unet" + EXPORT_SUFFIXES[fmt])
    if fmt == "torch_export" and out.suffix != ".pt2":
        raise UserError(f"--output {out}: torch.export.load expects a program's file name to end in .pt2 and "
                        f"warns on any other; pass {out.with_suffix('.pt2')}")
    return out


def export_onnx(model: torch.nn.Module, pair: torch.Tensor, batch_axis: tuple, out: Path,
                check: torch.Tensor) -> torch.Tensor | None:
    """Write ``model`` to ``out`` as ONNX through torch.export (torch.onnx's exporter since torch 2.9,
    where the TorchScript-based one it replaces is deprecated); return onnxruntime's output on
    ``check``, or None where onnxruntime is not installed."""
    try:
        importlib.import_module("onnxscript")  # optional: the exporter's ONNX builder; it brings onnx
    except ImportError:
        raise UserError("ONNX export needs the optional packages onnx and onnxscript (and onnxruntime for the "
                        "parity check): pip install onnx onnxscript onnxruntime") from None
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)  # torch 2.5 logs a warning per torchvision operator it registers
    try:
        program = torch.onnx.export(model, (pair,), None, input_names=["image"], output_names=["logits"],
                                    dynamic_shapes=batch_axis, dynamo=True, verbose=False)
    finally:
        exporter_log.setLevel(level)
    onnx_bytes = program.model_proto.SerializeToString()
    save_export(out, lambda f: f.write(onnx_bytes))
    try:
        import onnxruntime
    except ImportError:
        print(f"wrote {out}; install onnxruntime to check parity against PyTorch")
        return None
    session = onnxruntime.InferenceSession(out.read_bytes(), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"image": check.numpy()})[0])


def export_command(args: argparse.Namespace) -> float | Path:
    """The ``export`` command: torch.export, TorchScript or ONNX, with a parity check against eager
    PyTorch, or a weights file for release (``--format state_dict``)."""
    out = check_export_output(Path(args.output), args.format)
    ckpt = scoring_checkpoint(args.checkpoint, image_size=args.image_size, normalization=args.normalization)
    record = ckpt["config"]
    overrides = overridden_settings(record, image_size=args.image_size, normalization=args.normalization)
    if overrides:
        flag, recorded, value = overrides[0]
        raise UserError(f"{flag} {value}: {args.checkpoint} records {flag} {recorded}, which the export keeps; "
                        f"drop {flag} (it is for a plain state_dict, which records neither)")
    model = network_from_checkpoint(ckpt)
    model.eval()
    if args.format == "state_dict":
        return export_weights(ckpt, model, out)
    deployed = fuse_conv_bn(model)  # the same function with BatchNorm folded into the convs
    size, channels = record["image_size"], input_width(model)
    example = torch.randn(1, channels, size, size)
    check = torch.randn(3, channels, size, size)  # another batch size than traced: the batch axis is dynamic
    # torch.export and ONNX trace on a batch of 2: on 1, torch.export would fix the batch size as a constant.
    pair, batch_axis = torch.cat([example, example]), ({0: torch.export.Dim("batch", min=1, max=4096)},)
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        # Tracing warns about the input-size check in UNet.forward (traced as a constant) and
        # about TorchScript's deprecation; neither changes the exported function.
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        reference = model(check)
        if args.format == "torch_export":
            program = torch.export.export(deployed, (pair,), dynamic_shapes=batch_axis)
            save_export(out, lambda f: torch.export.save(program, f))
            with open(out, "rb") as f:
                exported = torch.export.load(f).module()(check)
        elif args.format == "torchscript":
            traced = torch.jit.trace(deployed, example)
            save_export(out, lambda f: torch.jit.save(traced, f))
            with open(out, "rb") as f:
                exported = torch.jit.load(f)(check)
        else:
            exported = export_onnx(deployed, pair, batch_axis, out, check)
            if exported is None:
                return float("nan")
    diff = float((exported - reference).abs().max())
    print(f"wrote {out} ({args.format}); max abs difference from eager PyTorch on a batch of {len(check)}: "
          f"{diff:.2e}")
    return diff

