"""New scans -> masks, and checkpoints -> deployable files: the ``predict`` and ``export`` commands.

``predict`` reads slices as they come (one file, a folder, a patient folder or a dataset root),
builds each folder's slices into a volume and runs it through the very pipeline that ``evaluate``
scores (``evaluation.scoring_loader`` and ``predict_volumes``): the same normalization, crop,
resize, ensemble averaging, paste-back, threshold and post-processing.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import re
import sys
import warnings
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch

from data_files import NORMALIZATIONS, DatasetError, make_volume, read_image, set_normalization
from evaluation import (
    add_scoring_flags,
    load_checkpoints,
    postprocess_volume,
    predict_volumes,
    scoring_loader,
    scoring_settings,
)
from libraries import UserError, memory_format, setup_device
from metrics import parse_spacing
from model import fuse_conv_bn, input_width, network_from_checkpoint, scoring_checkpoint
from reports import overlay_slice


def add_predict_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``predict`` command's flags."""
    parser.add_argument("--checkpoint", required=True, nargs="+",
                        help="a best.pt or last.pt written by training, or published weights: buda (Buda et al.'s, "
                             "downloaded once), a URL, a state_dict; several (or a cv folder) are averaged")
    parser.add_argument("--input", required=True,
                        help="a slice (tif/png/jpg), a folder of slices, a patient folder or a dataset root")
    parser.add_argument("--output", required=True, help="folder for masks/, overlays/ and predictions.csv")
    parser.add_argument("--spacing", default="", help="voxel spacing 'dz,dy,dx' in mm: adds mm^2 and mm^3 columns")
    parser.add_argument("--batch-size", type=int, default=16)
    add_scoring_flags(parser)


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``export`` command's flags."""
    parser.add_argument("--checkpoint", required=True, help="a checkpoint, or published weights as for evaluate")
    parser.add_argument("--format", required=True, choices=("torchscript", "onnx", "state_dict"),
                        help="state_dict: a small weights file with its record, named unet-<sha256 prefix>.pt")
    parser.add_argument("--output", required=True, help="the file to write (a folder for --format state_dict)")
    parser.add_argument("--image-size", type=int, default=None, help="for a plain state_dict: the size it expects")
    parser.add_argument("--normalization", choices=NORMALIZATIONS, default=None,
                        help="for a plain state_dict: the normalization it expects")


IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")


_NUMBER = re.compile(r"_(\d+)$")


def collect_inputs(path: Path) -> tuple[dict[str, list[Path]], list[Path]]:
    """Group the slices to predict by patient (folder); also return the files that are not images.

    ``path`` may be one slice, a folder of slices, a kaggle_3m patient folder or a dataset root.
    Masks (``*_mask.*``) are never inputs. Slices named ``<NAME>_<N>`` are ordered by N.
    """
    if path.is_file():
        return {path.parent.name or "input": [path]}, []
    if not path.is_dir():
        raise UserError(f"{path}: no such file or folder; pass a slice, a folder of slices or a dataset folder")
    groups: dict[str, list[Path]] = {}
    other: list[Path] = []
    for folder in [path, *sorted(p for p in path.iterdir() if p.is_dir())]:
        for f in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
            if f.stem.lower().endswith("_mask"):
                continue
            if f.suffix.lower() in IMAGE_SUFFIXES:
                groups.setdefault(folder.name, []).append(f)
            elif folder == path or f.name.lower() not in ("data.csv", "readme.md"):
                other.append(f)
    for files in groups.values():
        files.sort(key=lambda f: (int(m[1]) if (m := _NUMBER.search(f.stem)) else -1, f.name))
    return groups, other



def read_inputs(groups: dict[str, list[Path]]) -> tuple[list[tuple[str, list[Path], np.ndarray]], int]:
    """Decode each folder's slices into volumes of one slice size: (folder, files, (N, H, W, 3) images).

    A folder whose slices have several sizes cannot be one 3D volume: each size becomes a volume
    of its own, with its own normalization statistics and crop, and a note says so. Files that
    cannot be decoded are skipped with a line each; the count of skipped files is returned.
    """
    volumes, skipped = [], 0
    for group, files in groups.items():
        by_size: dict[tuple[int, int], list[tuple[Path, np.ndarray]]] = {}
        for f in files:
            try:
                image = read_image(f, sixteen_bit=True)  # grayscale comes back copied into 3 channels
            except DatasetError as exc:
                print(f"skipped: {exc}", file=sys.stderr)
                skipped += 1
                continue
            by_size.setdefault(image.shape[:2], []).append((f, image))
        if len(by_size) > 1:
            sizes = ", ".join(f"{h}x{w} ({len(v)})" for (h, w), v in by_size.items())
            print(f"note: {group}: slices of {len(by_size)} sizes ({sizes}); each size is normalized, cropped "
                  "and post-processed as a volume of its own", file=sys.stderr)
        for items in by_size.values():
            volumes.append((group, [f for f, _ in items], to_eight_bit(group, [im for _, im in items])))
    return volumes, skipped


def to_eight_bit(group: str, images: list[np.ndarray]) -> np.ndarray:
    """(N, H, W, 3) uint8 of one volume's slices. 16-bit slices are scaled by the volume's 99.9th
    percentile, one factor for the whole volume (the model was trained on 8-bit slices, and the
    per-volume normalization that follows removes the scale)."""
    if all(im.dtype == np.uint8 for im in images):
        return np.stack(images)
    volume = np.stack([im.astype(np.float32) for im in images])
    top = float(np.percentile(volume[volume > 0], 99.9)) if (volume > 0).any() else 1.0
    print(f"note: {group}: 16-bit slices, scaled to 8 bits by the volume's 99.9th percentile ({top:.0f})",
          file=sys.stderr)
    return np.clip(volume * (255.0 / max(top, 1e-6)), 0, 255).round().astype(np.uint8)


@torch.inference_mode()
def predict_command(args: argparse.Namespace) -> Path:
    """The ``predict`` command: masks, overlays and a tumor-area CSV for new slices."""
    loaded = load_checkpoints(args.checkpoint, image_size=args.image_size, normalization=args.normalization)
    record = loaded[0][1]["config"]
    threshold, postprocess = scoring_settings(args, record)
    device, amp_dtype = setup_device(args.device, args.amp)
    spacing = parse_spacing(args.spacing)
    out = Path(args.output)
    if (out / "predictions.csv").exists() or (out / "masks").exists():
        raise UserError(f"{out}: already holds predictions (predictions.csv, masks/); choose another --output "
                        "or remove it: earlier results are never overwritten")
    groups, other = collect_inputs(Path(args.input))
    for f in other:
        print(f"skipped (not an image): {f}", file=sys.stderr)
    inputs, skipped = read_inputs(groups)
    skipped += len(other)
    if not inputs:
        raise UserError(f"{args.input}: no readable slice (tif, tiff, png, jpg or jpeg) to predict"
                        + (f"; {skipped} file(s) skipped, as listed above" if skipped else ""))
    normalization = record.get("normalization", "volume")
    volumes = [set_normalization(make_volume(f"{group}#{i}", images, np.zeros(images.shape[:3], np.uint8),
                                             list(range(len(images)))), normalization, record["image_size"])
               for i, (group, _, images) in enumerate(inputs)]
    loader = scoring_loader(volumes, image_size=record["image_size"], batch_size=args.batch_size,
                            num_workers=0, seed=0, device=device)
    channels_last = record.get("channels_last", False)
    models = [fuse_conv_bn(network_from_checkpoint(c, str(path))).to(device, memory_format=memory_format(channels_last))
              for path, c in loaded]
    _, _, predicted = predict_volumes(models, loader, device, loss_fn=None, threshold=threshold,
                                      amp_dtype=amp_dtype, channels_last=channels_last, progress=False,
                                      desc="predict")
    rows = []
    for p, (group, files, images) in enumerate(inputs):
        pred = postprocess_volume(predicted[p], postprocess)
        (out / "masks" / group).mkdir(parents=True, exist_ok=True)
        (out / "overlays" / group).mkdir(parents=True, exist_ok=True)
        for f, image, mask in zip(files, images, pred):
            cv2.imwrite(str(out / "masks" / group / f"{f.stem}_pred.png"), mask.astype(np.uint8) * 255)
            overlay = overlay_slice(image[..., 1], np.zeros_like(mask), mask)
            cv2.imwrite(str(out / "overlays" / group / f"{f.stem}.png"), overlay[..., ::-1])
            rows.append(area_row(group, str(f), "slice", int(mask.sum()), spacing))
    for group in groups:
        total = sum(r["area_px"] for r in rows if r["patient"] == group)
        if any(r["patient"] == group for r in rows):
            rows.append(area_row(group, "", "patient", total, spacing))
    out.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame(rows, columns=["patient", "file", "level", "area_px", "area_mm2", "volume_mm3"])
    table.to_csv(out / "predictions.csv", index=False)
    slices = int((table["level"] == "slice").sum())
    print(f"predicted {slices} slices of {len(groups)} patient(s)/folder(s) (post-processing: {postprocess}, "
          f"threshold {threshold:g})"
          + (f", skipped {skipped} non-image file(s)" if skipped else "")
          + f"; wrote {out}/masks/, overlays/, predictions.csv")
    return out


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
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / ".unet-export.tmp"
    torch.save({"model": half if lossless else state, "config": record, "epoch": ckpt.get("epoch")}, tmp)
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    path = folder / f"unet-{digest[:8]}.pt"
    tmp.replace(path)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, {'fp16' if lossless else 'fp32'} weights: the "
          f"largest probability change from fp16 on a random batch is {gap:.1e}); load it with "
          f"--checkpoint {path} or from a URL ending in {path.name}")
    return path


def export_command(args: argparse.Namespace) -> float | Path:
    """The ``export`` command: TorchScript or ONNX, with a parity check against eager PyTorch, or a
    weights file for release (``--format state_dict``)."""
    ckpt = scoring_checkpoint(args.checkpoint, image_size=args.image_size, normalization=args.normalization)
    record = ckpt["config"]
    model = network_from_checkpoint(ckpt)
    model.eval()
    if args.format == "state_dict":
        return export_weights(ckpt, model, Path(args.output))
    deployed = fuse_conv_bn(model)  # the same function with BatchNorm folded into the convs
    size, channels = record["image_size"], input_width(model)
    example = torch.randn(1, channels, size, size)
    check = torch.randn(2, channels, size, size)  # another batch size than traced: the batch axis is dynamic
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        # Tracing warns about the input-size check in UNet.forward (traced as a constant) and
        # about TorchScript's deprecation; neither changes the exported function.
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        reference = model(check)
        if args.format == "torchscript":
            torch.jit.trace(deployed, example).save(str(out))
            exported = torch.jit.load(str(out))(check)
        else:
            try:
                import onnx  # noqa: F401  (optional dependency)
            except ImportError:
                raise UserError("ONNX export needs the optional package onnx (and onnxruntime for the parity "
                                "check): pip install onnx onnxruntime") from None
            torch.onnx.export(deployed, example, str(out), input_names=["image"], output_names=["logits"],
                              dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
            try:
                import onnxruntime
            except ImportError:
                print(f"wrote {out}; install onnxruntime to check parity against PyTorch")
                return float("nan")
            session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
            exported = torch.from_numpy(session.run(None, {"image": check.numpy()})[0])
    diff = float((exported - reference).abs().max())
    print(f"wrote {out} ({args.format}); max abs difference from eager PyTorch on a batch of 2: {diff:.2e}")
    return diff

