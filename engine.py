"""Train and evaluate a UNet that segments the FLAIR abnormality of low-grade gliomas (LGG MRI Segmentation).

    python engine.py                                   # train with the settings below
    python engine.py --epochs 20 --image-size 256      # any setting, as a flag
    python engine.py evaluate --checkpoint runs/X/best.pt

Edit the defaults in ``Config`` or pass them as flags: every field below is also a command-line
flag with the same default (``image_size`` -> ``--image-size``), generated from the dataclass.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import pickle
import random
import re
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from data_loaders import (
    DATA_ENV_VAR,
    DATASET_URL,
    DataIssues,
    DatasetError,
    LGGSlices,
    PatientVolume,
    ShardedSampler,
    SliceRecord,
    choose_split,
    dataset_report,
    default_cache_dir,
    default_num_workers,
    download_dataset,
    find_data_dir,
    group_by_patient,
    load_volume,
    make_loader,
    make_synthetic_dataset,
    match_patients,
    read_clinical,
    read_image,
    read_patient_list,
    scan_dataset,
    set_normalization,
)
from data_preprocessing import (
    brain_box,
    buda_stats,
    crop_pad_square,
    IntensityAugment,
    eval_preprocess,
    normalize,
    train_preprocess,
    volume_stats,
)
from libraries import (
    UserError,
    environment_report,
    init_distributed,
    quiet_opencv,
    resolve_amp,
    resolve_device,
    save_json,
    save_torch,
    seed_everything,
)
from loss_fun import DICE_MODES, DiceBCELoss, SegmentationMeter, hd95, largest_component_3d
from model import UNet, build_model, count_flops, count_parameters, fuse_conv_bn, load_weights
from reports import compare_runs, dice_table, overlay_slice, patient_scores, plot_curves, write_reports


def _opt(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    """A Config field whose help text (and choices) become the flag's."""
    return field(default=default, metadata={"help": help, "choices": choices})


# =============================================================================================
# Hyperparameters. Each one is also a flag: --data-dir, --image-size, --epochs, ...
# =============================================================================================
@dataclass
class Config:
    # ---- data ----
    data_dir: str = _opt("", "kaggle_3m folder; empty: $LGG_DATA_DIR, ./kaggle_3m, "
                         "./lgg-mri-segmentation/kaggle_3m, else synthetic data")
    synthetic: bool = _opt(False, "train on generated synthetic data even if a dataset is found")
    synthetic_dir: str = _opt("data/synthetic/kaggle_3m", "where synthetic data is generated")
    synthetic_patients: int = _opt(20, "synthetic patients to generate")
    synthetic_slices: int = _opt(24, "slices per synthetic patient")
    split: str = _opt("random", "validation patients: random (seeded, --val-fraction), buda (the 10 of "
                      "Buda et al.) or none (train on every patient; score later with 'evaluate "
                      "--patients unseen')", ("random", "buda", "none"))
    val_fraction: float = _opt(0.2, "share of patients held out for validation (split by patient)")
    val_patients: str = _opt("", "validation patients: comma list or a file of names/prefixes (overrides --split)")
    folds: int = _opt(0, "patient-level K-fold cross-validation: number of folds (0: off)")
    fold: int = _opt(0, "which fold (0..folds-1) is the validation set")
    image_size: int = _opt(128, "slices are resized to this square size (multiple of 16)")
    normalization: str = _opt("volume", "volume: per-patient percentile clip + z-score; buda: the "
                              "authors' crop, p10-p99 rescale, z-score", ("volume", "buda"))
    tumor_weight: float = _opt(1.0, "sample training slices with tumor this many times as often")
    modality_dropout: float = _opt(0.0, "training: chance that the pre- or post-contrast channel is replaced "
                                   "by FLAIR, as the dataset does where a patient lacks that modality")
    intensity_augment: bool = _opt(False, "training: nnU-Net-style gamma, brightness, contrast, noise, blur and "
                                   "low-resolution steps, drawn per channel, after normalization")
    # ---- model ----
    encoder: str = _opt("unet", "unet: the hand-written UNet; resnet34: a UNet on torchvision's ResNet-34",
                         ("unet", "resnet34"))
    encoder_weights: str = _opt("none", "with --encoder resnet34: none, or imagenet (torchvision's weights, "
                                "downloaded once)", ("none", "imagenet"))
    features: int = _opt(32, "UNet channels at the first level, doubled per level (32: 7.76M params)")
    pretrained: str = _opt("", "start from weights: a checkpoint or state_dict path, a URL, or 'buda' "
                           "(Buda et al.'s release; selects --normalization buda)")
    freeze_encoder: bool = _opt(False, "fine-tuning: train the decoder only (encoder weights and BatchNorm fixed)")
    encoder_lr_scale: float = _opt(1.0, "fine-tuning: the encoder's learning rate is --lr times this")
    # ---- optimization ----
    epochs: int = _opt(5, "passes over the training patients")
    batch_size: int = _opt(16, "slices per step")
    lr: float = _opt(1e-3, "peak AdamW learning rate")
    weight_decay: float = _opt(1e-4, "AdamW weight decay")
    schedule: str = _opt("cosine", "learning rate after warmup", ("cosine", "onecycle", "constant"))
    warmup_epochs: float = _opt(0.0, "linear learning-rate warmup, in epochs")
    patience: int = _opt(0, "stop after this many epochs without a better validation Dice per volume (0: off)")
    dice_weight: float = _opt(1.0, "weight of the soft Dice loss")
    bce_weight: float = _opt(1.0, "weight of the binary cross-entropy loss")
    dice_mode: str = _opt("sample", "soft Dice per slice, averaged (sample); pooled over the batch (batch); "
                          "or averaged over the slices with tumor only, the rest left to BCE (tumor)", DICE_MODES)
    threshold: float = _opt(0.5, "probability above which a pixel is called tumor")
    # ---- evaluation ----
    postprocess: str = _opt("none", "keep the largest 3D connected component per patient (lcc) or not; "
                            "both are always reported", ("none", "lcc"))
    tta: bool = _opt(False, "test-time augmentation: average with the left-right mirrored prediction")
    spacing: str = _opt("", "voxel spacing 'dz,dy,dx' in mm, to report HD95 in mm as well as pixels")
    # ---- hardware ----
    device: str = _opt("auto", "auto: CUDA if available, else CPU", ("auto", "cpu", "cuda"))
    amp: str = _opt("auto", "mixed precision; auto: bf16 on capable GPUs/CPUs, fp16 on older GPUs",
                    ("auto", "off", "bf16", "fp16"))
    channels_last: bool = _opt(True, "NHWC memory layout (faster convolutions on CPU and GPU)")
    num_workers: int = _opt(-1, "DataLoader worker processes; -1: 0 on <=2 cores, else up to 4")
    sync_bn: bool = _opt(False, "under torchrun on GPUs: synchronize BatchNorm statistics across processes")
    compile: bool = _opt(False, "torch.compile the model (opt-in: measure it with 'engine.py benchmark --compile')")
    strict: bool = _opt(False, "make every data problem an error instead of skipping or fixing it")
    cache_dir: str = _opt("", "cache of decoded slices; empty: ~/.cache/lgg-unet; 'off': decode TIFFs each run")
    # ---- run ----
    out_dir: str = _opt("", "run folder for checkpoints and metrics; empty: runs/<date-time>")
    resume: str = _opt("", "continue a run from its folder (last.pt) or a checkpoint, with its own settings")
    seed: int = _opt(42, "one seed for the split, initialization, augmentation and shuffling")
    progress: bool = _opt(True, "show tqdm progress bars")
    preset: str = _opt("none", "a tested recipe: cpu (128 px, ~26 min on 2 cores for the 36-patient "
                       "subset) or full (256 px, for a GPU); flags you give still win", ("none", "cpu", "full"))


# Recipes selected with --preset. Each replaces the defaults above, not the flags you pass.
PRESETS: dict[str, dict[str, Any]] = {
    "none": {},
    # 2 CPU cores (bf16): 128 px, 20 epochs of 1,130-1,303 slices is 21-26 minutes (all 36: 25.7).
    # Under 6-fold patient CV of the 36-patient subset (see the README's Results): the largest 3D
    # component gave +0.016 mean Dice per volume; modality dropout 0.2 then +0.031 more with it
    # (0.760 -> 0.791), most of it on the patients that lack a modality.
    "cpu": dict(image_size=128, epochs=20, batch_size=16, lr=1e-3, weight_decay=1e-4, schedule="cosine",
                warmup_epochs=1.0, tumor_weight=2.0, modality_dropout=0.2, postprocess="lcc"),
    # A GPU: full resolution, longer.
    "full": dict(image_size=256, epochs=60, batch_size=16, lr=1e-3, weight_decay=1e-4, schedule="cosine",
                 warmup_epochs=2.0, tumor_weight=2.0, modality_dropout=0.2, patience=20, postprocess="lcc"),
}


# =============================================================================================
# Command line
# =============================================================================================


def parse_bool(text: str) -> bool:
    """'on'/'off' (and true/false, yes/no, 1/0) for boolean flags such as ``--channels-last off``."""
    value = text.strip().lower()
    if value in ("on", "true", "yes", "1"):
        return True
    if value in ("off", "false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected on or off, got {text!r}")


def add_bool_flag(parser: argparse.ArgumentParser, name: str, default: bool, help_text: str) -> None:
    """``--name``, ``--name on|off`` and ``--no-name``."""
    flag = "--" + name.replace("_", "-")
    parser.add_argument(flag, dest=name, nargs="?", const=True, type=parse_bool, default=default,
                        metavar="on|off", help=help_text)
    parser.add_argument("--no-" + flag[2:], dest=name, action="store_false", help=argparse.SUPPRESS)


def add_config_flags(parser: argparse.ArgumentParser, defaults: Config | None = None) -> None:
    """Add one flag per Config field, with the field's default, type, help and choices."""
    defaults = defaults or Config()
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        help_text = f.metadata["help"] + " (default: %(default)s)"
        if isinstance(default, bool):
            add_bool_flag(parser, f.name, default, help_text)
        else:
            parser.add_argument(
                flag, type=type(default), default=default, choices=f.metadata["choices"], help=help_text
            )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="engine.py",
        description="Train (default) or evaluate a UNet for LGG FLAIR-abnormality segmentation.",
        epilog="'python engine.py train --help' lists every training setting.",
    )
    sub = parser.add_subparsers(dest="command")
    add_config_flags(sub.add_parser("train", help="train and validate (the default command)"))
    ev = sub.add_parser("evaluate", help="score a checkpoint on its validation patients, or on others")
    ev.add_argument("--checkpoint", required=True, help="a best.pt or last.pt written by training")
    ev.add_argument("--data-dir", default=None, help="dataset folder (default: the one it was trained on)")
    ev.add_argument("--patients", default="validation",
                    help="which patients of --data-dir to score: validation (the run's own; default), unseen "
                         "(every patient it did not train on: for a --split none model or another dataset), "
                         "all, or a comma list or file of names")
    ev.add_argument("--out-dir", default=None, help="where metrics.json goes (default: beside the checkpoint)")
    ev.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ev.add_argument("--amp", default="auto", choices=("auto", "off", "bf16", "fp16"))
    ev.add_argument("--batch-size", type=int, default=None, help="default: the training batch size")
    ev.add_argument("--num-workers", type=int, default=-1)
    ev.add_argument("--cache-dir", default="", help="as for training; 'off' disables the cache")
    add_bool_flag(ev, "progress", True, "show tqdm progress bars")
    ev.add_argument("--postprocess", choices=POSTPROCESSING, default=None, help="default: as trained")
    add_bool_flag(ev, "tta", None, "mirror test-time augmentation (default: as trained)")
    ev.add_argument("--spacing", default="", help="voxel spacing 'dz,dy,dx' in mm for HD95 in mm")
    add_bool_flag(ev, "strict", False, "make every data problem an error instead of skipping or fixing it")
    dl = sub.add_parser("download", help="fetch the dataset from Kaggle with kagglehub (optional dependency)")
    dl.add_argument("--to", default="lgg-mri-segmentation",
                    help="folder that receives kaggle_3m/ (default: ./lgg-mri-segmentation, found automatically)")
    pr = sub.add_parser("predict", help="segment new slices with a checkpoint: masks, overlays, areas")
    pr.add_argument("--checkpoint", required=True, help="a best.pt or last.pt written by training")
    pr.add_argument("--input", required=True, help="a slice (tif/png/jpg), a folder of slices, a patient folder or a dataset root")
    pr.add_argument("--output", required=True, help="folder for masks/, overlays/ and predictions.csv")
    pr.add_argument("--spacing", default="", help="voxel spacing 'dz,dy,dx' in mm: adds mm^2 and mm^3 columns")
    pr.add_argument("--batch-size", type=int, default=16)
    pr.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    pr.add_argument("--amp", default="auto", choices=("auto", "off", "bf16", "fp16"))
    add_bool_flag(pr, "tta", None, "mirror test-time augmentation (default: as trained)")
    ex = sub.add_parser("export", help="export a checkpoint to TorchScript or ONNX, checking parity")
    ex.add_argument("--checkpoint", required=True)
    ex.add_argument("--format", required=True, choices=("torchscript", "onnx"))
    ex.add_argument("--output", required=True, help="the file to write")
    data = sub.add_parser("data", help="report on a copy of the dataset: counts, checks, problems")
    data.add_argument("--data-dir", default="", help="kaggle_3m folder (default: found as for training)")
    data.add_argument("--out", default="", help="JSON file (default: runs/data-report-<date-time>.json)")
    add_bool_flag(data, "strict", False, "stop at the first data problem")
    cv = sub.add_parser("cv", help="patient-level K-fold cross-validation: train every fold, summarize",
                        description="Runs training once per fold (--folds K, default 5) into "
                        "<out-dir>/fold-<i>, then writes cv_summary.csv (per fold, mean and std over folds, and "
                        "mean and median over all patients pooled) and cv_patients.csv (each patient's Dice). "
                        "--resume DIR continues an interrupted cv run from where it stopped.")
    add_config_flags(cv, Config(folds=5))
    cmp = sub.add_parser(
        "compare", help="paired per-patient comparison of two runs' held-out Dice, with a bootstrap interval",
        description="Pairs the held-out Dice per patient of run A and run B (cv folders, run or evaluation "
        "folders, or their cv_patients.csv / metrics.json) by patient name and prints, without and with "
        "LCC, the mean and median of each and the mean of B - A with a 95%% bootstrap interval over "
        "patients. Patients scored by only one run are left out and counted.",
    )
    cmp.add_argument("run_a", help="the baseline")
    cmp.add_argument("run_b", help="the change")
    cmp.add_argument("--resamples", type=int, default=10_000, help="bootstrap resamples of the patients")
    cmp.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    cmp.add_argument("--out", default="", help="also write the paired per-patient table to this CSV")
    bench = sub.add_parser(
        "benchmark", help="time the reference fp32 path against the fast default path",
        description="Times training steps and inference for (a) the reference path (fp32, contiguous "
        "NCHW, eager) and (b) the fast default path (--amp, --channels-last, --compile), then the "
        "end-to-end training throughput through the real DataLoader. Training settings apply.",
    )
    add_config_flags(bench)
    bench.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    bench.add_argument("--repeats", type=int, default=7, help="timed steps; the median is reported")
    bench.add_argument("--e2e-batches", type=int, default=20, help="batches timed through the DataLoader")
    bench.add_argument("--out", default="", help="JSON file (default: <out-dir or runs>/benchmark-<date-time>.json)")
    return parser


COMMANDS = ("train", "evaluate", "predict", "export", "benchmark", "cv", "compare", "download", "data")


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse ``argv``; with no command (or only flags) the command is ``train``."""
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help")):
        argv = ["train", *argv]
    return build_parser().parse_args(argv)


def config_from_args(args: argparse.Namespace, argv: list[str] | None = None) -> Config:
    """The Config for parsed flags; a --preset fills in every field whose flag is not in ``argv``."""
    values = {f.name: getattr(args, f.name) for f in fields(Config)}
    given = {a.split("=")[0].removeprefix("--").removeprefix("no-").replace("-", "_")
             for a in (argv or []) if a.startswith("--")}
    for name, value in PRESETS[values["preset"]].items():
        if name not in given:
            values[name] = value
    return Config(**values)


# =============================================================================================
# Training and evaluation
# =============================================================================================


def _to_device(
    batch: dict, device: torch.device, channels_last: bool, augment: IntensityAugment | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's uint8 image and mask on ``device``; the image normalized (and, in training,
    intensity-augmented) there, the mask as float."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    image = normalize(batch["image"].to(device, non_blocking=True), batch["stats"].to(device, non_blocking=True))
    if augment is not None:
        image = augment(image)
    return image.contiguous(memory_format=memory_format), batch["mask"].to(device, non_blocking=True).float()


def autocast(device: torch.device, amp_dtype: torch.dtype | None) -> torch.autocast:
    """Mixed precision for the forward pass, or a no-op when ``amp_dtype`` is None (fp32)."""
    return torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)


def forward_loss(
    model: nn.Module, image: torch.Tensor, mask: torch.Tensor, loss_fn: nn.Module, amp_dtype: torch.dtype | None
) -> torch.Tensor:
    """Forward pass under autocast; the loss itself is computed in fp32."""
    with autocast(image.device, amp_dtype):
        logits = model(image)
    return loss_fn(logits.float(), mask)


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
    """Backward and update; the scaler is a no-op unless fp16 is used."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


def train_one_epoch(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    *,
    amp_dtype: torch.dtype | None,
    channels_last: bool,
    epoch: int,
    progress: bool,
    augment: IntensityAugment | None = None,
) -> tuple[float, int]:
    """One pass over the training loader; returns the summed per-sample loss and the sample count."""
    model.train()
    total, seen = 0.0, 0
    bar = tqdm(loader, desc=f"epoch {epoch} train", leave=False, disable=not progress)
    for step, batch in enumerate(bar):
        image, mask = _to_device(batch, device, channels_last, augment)
        loss = forward_loss(model, image, mask, loss_fn, amp_dtype)
        value = loss.item()
        if not math.isfinite(value):  # checked before the update, so the weights stay finite
            raise FloatingPointError(
                f"loss is {value} at epoch {epoch}, step {step}; "
                "lower --lr or use --amp off (the last good checkpoint is kept)"
            )
        optimizer_step(loss, optimizer, scaler)
        scheduler.step()
        total += value * len(image)
        seen += len(image)
        bar.set_postfix(loss=f"{total / seen:.4f}")
    return total, seen


def _to_full_resolution(logits: torch.Tensor, size: tuple[int, int], box: torch.Tensor | None = None) -> torch.Tensor:
    """Map (N, 1, S, S) logits back onto each slice's original (H, W) = ``size`` grid.

    Without a crop box this is one bilinear resize. With one (the 'buda' normalization crops
    to the brain and pads to a square), each sample is resized to its padded square, unpadded
    and pasted into its box (rows y0, y1, x0, x1, top, left, side); pixels outside the box are
    background (a very negative logit).
    """
    size = tuple(size)
    if box is None:
        if tuple(logits.shape[-2:]) == size:
            return logits
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    out = logits.new_full((len(logits), 1, *size), -1e4)
    for i, (y0, y1, x0, x1, top, left, side) in enumerate(box.tolist()):
        square = F.interpolate(logits[i : i + 1], size=(side, side), mode="bilinear", align_corners=False)
        out[i, :, y0:y1, x0:x1] = square[0, :, top : top + y1 - y0, left : left + x1 - x0]
    return out


def forward_with_mirror(
    model: nn.Module, x: torch.Tensor, amp_dtype: torch.dtype | None, tta: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fp32 logits of ``x`` and, with ``tta``, of its left-right mirror, flipped back into place."""
    with autocast(x.device, amp_dtype):
        logits = model(x).float()
        mirrored = torch.flip(model(torch.flip(x, dims=[-1])).float(), dims=[-1]) if tta else None
    return logits, mirrored


@torch.inference_mode()
def predict_volumes(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    device: torch.device,
    *,
    loss_fn: nn.Module | None,
    threshold: float,
    amp_dtype: torch.dtype | None,
    channels_last: bool,
    tta: bool,
    progress: bool,
    desc: str = "validate",
) -> tuple[float, int, dict[int, tuple[np.ndarray, np.ndarray]]]:
    """Predict every slice of the loader; return the summed loss, the slice count and, per patient
    index of the loader's dataset, the
    (D, H, W) bool predicted and true volumes at the masks' own resolution, in slice order.

    With ``tta`` the probabilities of the slice and of its left-right mirror are averaged.
    The loss (on the un-augmented logits, at model resolution) is summed per sample.
    """
    model.eval()
    total, seen = 0.0, 0
    slices: dict[int, list[tuple[int, np.ndarray, np.ndarray]]] = {}
    for batch in tqdm(loader, desc=desc, leave=False, disable=not progress):
        image, mask = _to_device(batch, device, channels_last)
        logits, mirrored = forward_with_mirror(model, image, amp_dtype, tta)
        if loss_fn is not None:
            total += loss_fn(logits, mask).item() * len(image)
            seen += len(image)
        size, box = batch["full_mask"].shape[-2:], batch.get("box")
        prob = torch.sigmoid(_to_full_resolution(logits, size, box))
        if mirrored is not None:
            prob = (prob + torch.sigmoid(_to_full_resolution(mirrored, size, box))) / 2
        pred = (prob > threshold).cpu().numpy()[:, 0]
        truth = batch["full_mask"].numpy()[:, 0] > 0.5
        for p, s, pr, tr in zip(batch["patient"].tolist(), batch["slice"].tolist(), pred, truth):
            slices.setdefault(p, []).append((s, pr, tr))
    volumes = {}
    for p, items in slices.items():
        items.sort(key=lambda item: item[0])
        volumes[p] = (np.stack([i[1] for i in items]), np.stack([i[2] for i in items]))
    return total, seen, volumes


POSTPROCESSING = ("none", "lcc")


def score_volumes(
    volumes: dict[int, tuple[np.ndarray, np.ndarray]],
    patients: list[str],
    *,
    postprocess: str,
    spacing: tuple[float, float, float] | None,
) -> dict:
    """Metrics over all patient volumes, with the given post-processing, plus HD95 per patient."""
    meter = SegmentationMeter(patients)
    distances = {}
    for p, (pred, truth) in volumes.items():
        if postprocess == "lcc":
            pred = largest_component_3d(pred)
        meter.update(torch.from_numpy(pred)[:, None], torch.from_numpy(truth)[:, None],
                     torch.full((len(pred),), p, dtype=torch.long))
        distances[patients[p]] = (hd95(pred, truth), hd95(pred, truth, spacing) if spacing else None)
    metrics = meter.compute()
    for row in metrics["per_patient"]:
        row["hd95_px"], row["hd95_mm"] = distances[row["patient"]]
    defined = [d[0] for d in distances.values() if d[0] is not None]
    metrics["hd95_px_mean"] = float(np.mean(defined)) if defined else None
    metrics["hd95_undefined_patients"] = len(distances) - len(defined)
    if spacing:
        mm = [d[1] for d in distances.values() if d[1] is not None]
        metrics["hd95_mm_mean"] = float(np.mean(mm)) if mm else None
    return metrics


Gather = Callable[[dict, float, int], tuple[dict, float, int]]


def evaluate(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    device: torch.device,
    *,
    loss_fn: nn.Module | None,
    threshold: float,
    amp_dtype: torch.dtype | None,
    channels_last: bool,
    progress: bool,
    postprocess: str = "none",
    tta: bool = False,
    spacing: tuple[float, float, float] | None = None,
    desc: str = "validate",
    patients: list[str] | None = None,
    gather: Gather | None = None,
) -> tuple[float | None, dict, dict[int, tuple[np.ndarray, np.ndarray]]]:
    """Loss, metrics and per-patient (pred, truth) volumes, scored against the masks at their own
    resolution.

    The returned metrics and predictions are those of ``postprocess``; ``metrics["postprocessing"]``
    holds the headline numbers of every post-processing option, so both are always reported.
    In a distributed job each rank predicts its own patients and ``gather`` merges the predicted
    volumes (by patient name) and loss sums of all ranks, so every rank scores the whole set;
    ``patients`` is then the full list, whose indices key the returned volumes.
    """
    # BatchNorm folded into the convs: the same function, faster (the caller's model is untouched).
    inference_model = fuse_conv_bn(getattr(model, "_orig_mod", model))
    loss_sum, count, local = predict_volumes(
        inference_model, loader, device, loss_fn=loss_fn, threshold=threshold, amp_dtype=amp_dtype,
        channels_last=channels_last, tta=tta, progress=progress, desc=desc,
    )
    named = {loader.dataset.patients[p]: v for p, v in local.items()}
    if gather is not None:
        named, loss_sum, count = gather(named, loss_sum, count)
    patients = patients or loader.dataset.patients
    volumes = {patients.index(name): v for name, v in named.items()}
    variants = {name: score_volumes(volumes, patients, postprocess=name, spacing=spacing)
                for name in POSTPROCESSING}
    metrics = variants[postprocess]
    metrics["postprocessing"] = {
        name: {**{k: v[k] for k in ("dice_per_volume_mean", "dice_per_volume_median", "dice_global",
                                    "hd95_px_mean")},
               "dice_per_patient": {row["patient"]: row["dice"] for row in v["per_patient"]}}
        for name, v in variants.items()
    }
    metrics["postprocess"], metrics["tta"] = postprocess, tta
    if postprocess == "lcc":
        volumes = {p: (largest_component_3d(pred), truth) for p, (pred, truth) in volumes.items()}
    loss = loss_sum / count if loss_fn is not None and count else None
    return loss, metrics, volumes


def gather_across_ranks(named: dict, loss_sum: float, count: int) -> tuple[dict, float, int]:
    """All ranks' predicted volumes (merged by patient name) and loss sums, on every rank."""
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (named, loss_sum, count))
    merged: dict = {}
    for part, _, _ in parts:
        merged.update(part)
    return merged, sum(p[1] for p in parts), sum(p[2] for p in parts)


# =============================================================================================
# Data set-up
# =============================================================================================


def locate_data(cfg: Config) -> tuple[Path, bool]:
    """The dataset root and whether it is synthetic; generates synthetic data when none is found."""
    if not cfg.synthetic:
        root = find_data_dir(cfg.data_dir or None)
        if root is not None:
            return root, False
        print(
            f"No LGG dataset found (--data-dir, ${DATA_ENV_VAR}, ./kaggle_3m). Training on SYNTHETIC data "
            f"instead; for the real data download {DATASET_URL} and pass --data-dir .../kaggle_3m"
        )
    root = make_synthetic_dataset(
        Path(cfg.synthetic_dir), patients=cfg.synthetic_patients, slices=cfg.synthetic_slices, seed=cfg.seed
    )
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
            volumes[name] = set_normalization(volume, normalization)
    return volumes


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


# =============================================================================================
# Reports
# =============================================================================================

METRIC_LABELS = (
    ("dice_per_volume_mean", "Dice per volume, mean"),
    ("dice_per_volume_median", "Dice per volume, median"),
    ("iou_per_volume_mean", "IoU per volume, mean"),
    ("dice_global", "Dice, all pixels"),
    ("iou_global", "IoU, all pixels"),
    ("dice_per_slice_tumor_mean", "Dice per tumor slice, mean"),
    ("precision", "Precision (pixels)"),
    ("recall", "Recall (pixels)"),
)


def format_metrics(metrics: dict, title: str) -> str:
    """The end-of-run table: every metric of the chosen post-processing, then both variants."""
    lines = [title, f"  {metrics['patients']} patients, {metrics['slices']} slices "
             f"({metrics['tumor_slices']} with tumor); post-processing: {metrics['postprocess']}, "
             f"mirror TTA: {'on' if metrics['tta'] else 'off'}"]
    for key, label in METRIC_LABELS:
        value = metrics[key]
        lines.append(f"  {label:<28} {'n/a' if value is None else f'{value:.4f}'}")
    hd = metrics["hd95_px_mean"]
    lines.append(f"  {'HD95 per volume, mean (px)':<28} {'n/a' if hd is None else f'{hd:.2f}'}"
                 + (f"  ({metrics['hd95_undefined_patients']} undefined)" if metrics["hd95_undefined_patients"] else ""))
    if metrics.get("hd95_mm_mean") is not None:
        lines.append(f"  {'HD95 per volume, mean (mm)':<28} {metrics['hd95_mm_mean']:.2f}")
    lines.append("  Dice per volume mean / median, by post-processing:")
    for name, v in metrics["postprocessing"].items():
        lines.append(f"    {name:<6} {v['dice_per_volume_mean']:.4f} / {v['dice_per_volume_median']:.4f}")
    return "\n".join(lines)


def unused_path(stem: Path) -> Path:
    """``stem`` if nothing is there, else the first free ``stem-2``, ``stem-3``, ..."""
    path, n = stem, 1
    while path.exists():
        n += 1
        path = stem.with_name(f"{stem.name}-{n}")
    return path


def new_run_dir(out_dir: str) -> Path:
    """The run folder: ``out_dir`` or a new runs/<date-time>[-N]; never one that already holds files."""
    if not out_dir:
        # A suffix only when two runs start in the same second.
        path = unused_path(Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S"))
    else:
        path = Path(out_dir)
    if path.exists() and any(path.iterdir()):
        raise UserError(f"{path}: already holds files; choose another --out-dir or remove it")
    path.mkdir(parents=True, exist_ok=True)
    return path


# =============================================================================================
# Commands
# =============================================================================================


def make_scheduler(
    optimizer: torch.optim.Optimizer, schedule: str, *, lr: float, total_steps: int, warmup_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step learning-rate schedule.

    'cosine': linear warmup from lr/100 to lr over ``warmup_steps``, then cosine decay to 0.
    'onecycle': torch's OneCycleLR, rising over the same warmup share, then annealing.
    'constant': the same warmup, then lr throughout.
    """
    total_steps, warmup_steps = max(1, total_steps), min(max(0, warmup_steps), max(0, total_steps - 1))
    if schedule == "onecycle":
        pct = max(warmup_steps / total_steps, 1 / total_steps)
        peaks = [group["lr"] for group in optimizer.param_groups]  # per group (--encoder-lr-scale)
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=peaks, total_steps=total_steps, pct_start=pct)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return 0.01 + 0.99 * step / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    if schedule not in ("cosine", "constant"):
        raise UserError(f"--schedule must be cosine, onecycle or constant, got {schedule!r}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def parse_spacing(text: str) -> tuple[float, float, float] | None:
    """--spacing 'dz,dy,dx' in mm (one value: isotropic), or None when empty."""
    if not text:
        return None
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) == 1:
        values *= 3
    if len(values) != 3 or min(values) <= 0:
        raise UserError(f"--spacing takes 'dz,dy,dx' in mm (or one value), got {text!r}")
    return tuple(values)


CV_CONFIG = "cv_config.json"  # the settings of a cv run, which ``cv --resume`` continues with
# Settings that may differ when a run is resumed (where and how it runs, not what it computes).
RESUMABLE_OVERRIDES = ("device", "num_workers", "progress", "cache_dir", "data_dir", "strict")


def resumable_overrides(cfg: Config) -> dict[str, Any]:
    """The RESUMABLE_OVERRIDES given on the resuming command line (progress always follows it)."""
    return {name: getattr(cfg, name) for name in RESUMABLE_OVERRIDES
            if getattr(cfg, name) != getattr(Config(), name) or name == "progress"}


def resolve_resume(cfg: Config) -> tuple[Config, dict]:
    """For --resume: the run's own Config (with RESUMABLE_OVERRIDES from ``cfg``) and its checkpoint."""
    path = Path(cfg.resume)
    if (path / CV_CONFIG).is_file():
        raise UserError(f"{path}: this is a cv folder; continue it with: python engine.py cv --resume {path}")
    ckpt = load_checkpoint(path / "last.pt" if path.is_dir() else path)
    stored = {f.name: ckpt["config"][f.name] for f in fields(Config) if f.name in ckpt["config"]}
    if "history" not in ckpt or "rng" not in ckpt:
        raise UserError(f"{cfg.resume}: this checkpoint has no training state to resume from; use last.pt")
    stored.update(resumable_overrides(cfg))
    if not cfg.data_dir:
        stored["data_dir"] = ckpt["config"]["resolved_data_dir"]
    stored["out_dir"] = str(path if path.is_dir() else path.parent)
    stored["resume"] = cfg.resume
    return Config(**stored), ckpt


def rng_state() -> dict:
    """Every global RNG state, in types that torch.load(weights_only=True) accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos,
                                                       has_gauss, gauss], "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def make_network(encoder: str, features: int, encoder_weights: str = "none") -> nn.Module:
    """build_model with a user-facing error when ImageNet weights cannot be downloaded."""
    try:
        return build_model(encoder, features, encoder_weights)
    except (OSError, RuntimeError) as exc:  # URLError is an OSError
        raise UserError(f"--encoder-weights {encoder_weights}: torchvision could not fetch the ImageNet weights "
                        f"({type(exc).__name__}); put resnet34-b627a593.pth in {torch.hub.get_dir()}/checkpoints/ "
                        "or use --encoder-weights none") from None


def pretrained_weights(spec: str) -> tuple[dict, str, str | None]:
    """load_weights with user-facing errors."""
    try:
        return load_weights(spec)
    except (OSError, ValueError, RuntimeError, KeyError, pickle.UnpicklingError) as exc:
        raise UserError(f"--pretrained {spec}: {exc}") from None


def train(cfg: Config) -> dict:
    """Train and validate every epoch; write checkpoints, history and metrics; return final metrics."""
    resumed = None
    if cfg.resume:
        cfg, resumed = resolve_resume(cfg)
    multiple = 32 if cfg.encoder == "resnet34" else 16
    if cfg.image_size % multiple or cfg.image_size < multiple:
        raise UserError(f"--image-size must be a positive multiple of {multiple} for --encoder {cfg.encoder}, "
                        f"got {cfg.image_size}")
    if not 0.0 <= cfg.modality_dropout <= 1.0:
        raise UserError(f"--modality-dropout is a probability in [0, 1], got {cfg.modality_dropout:g}")
    if cfg.patience and cfg.split == "none" and not (cfg.val_patients or cfg.folds):
        raise UserError("--patience stops on validation Dice, and --split none has no validation patients; "
                        "drop --patience (choose the epochs by cross-validation first)")
    spacing = parse_spacing(cfg.spacing)
    ddp = init_distributed(cfg.device)
    say = print if ddp.main else (lambda *args, **kwargs: None)  # rank 0 alone logs
    weights = None
    if cfg.pretrained and not resumed:
        weights, kind, expected = pretrained_weights(cfg.pretrained)
        if expected and expected != cfg.normalization:
            say(f"{cfg.pretrained}: these weights expect --normalization {expected}; using it")
            cfg = replace(cfg, normalization=expected)
    progress = cfg.progress and ddp.main
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    if ddp.enabled and device.type == "cuda":
        device = torch.device("cuda", ddp.local_rank)
    if cfg.sync_bn and not (ddp.enabled and device.type == "cuda"):
        raise UserError("--sync-bn needs a torchrun job on CUDA GPUs; drop it for single-process or CPU runs")
    amp_dtype = resolve_amp(cfg.amp, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick the fastest kernels
    if ddp.enabled and not ddp.main:
        dist.barrier()  # rank 0 generates synthetic data (if needed) first
    root, synthetic = locate_data(cfg)
    run_dir = Path(cfg.out_dir) if resumed else (new_run_dir(cfg.out_dir) if ddp.main else None)
    if ddp.enabled:
        if ddp.main:
            dist.barrier()
        shared = [run_dir]
        dist.broadcast_object_list(shared, src=0)  # every rank learns the run folder rank 0 made
        run_dir = shared[0]
    issues = DataIssues(strict=cfg.strict)
    patient_volumes = load_dataset(root, None, progress=progress, cache_dir=resolve_cache_dir(cfg.cache_dir),
                                   normalization=cfg.normalization, issues=issues)
    if ddp.main:
        report_issues(issues, run_dir)
    train_names, val_names = choose_split(
        sorted(patient_volumes), split=cfg.split, val_fraction=cfg.val_fraction, seed=cfg.seed,
        val_patients=cfg.val_patients, folds=cfg.folds, fold=cfg.fold,
    )
    workers = default_num_workers() if cfg.num_workers < 0 else cfg.num_workers

    env = environment_report(device)
    if ddp.enabled:
        env["distributed"] = f"{ddp.world} processes, {ddp.backend}"
    say(f"data: {root} ({'SYNTHETIC' if synthetic else 'real'}), {len(train_names)} train / "
          f"{len(val_names)} validation patients, normalization: {cfg.normalization}")
    say(f"device: {device}{' (' + env['gpu'] + ')' if 'gpu' in env else ''}, "
        f"amp: {amp_dtype or 'off'}, channels_last: {cfg.channels_last}, workers: {workers}, run: {run_dir}"
        + (f", {env['distributed']}" if ddp.enabled else ""))

    train_set = LGGSlices([patient_volumes[n] for n in train_names], train_preprocess(cfg.image_size),
                          modality_dropout=cfg.modality_dropout)
    # Every validation patient, for reports; in a distributed job each rank predicts its share of
    # the patients (whole volumes, so 3D metrics and post-processing need no cross-rank slices).
    # With --split none there are none: the run trains and checkpoints, and scores nothing.
    val_set = LGGSlices([patient_volumes[n] for n in val_names], eval_preprocess(cfg.image_size), full_mask=True)
    my_val_set = LGGSlices([patient_volumes[n] for n in val_names[ddp.rank :: ddp.world]],
                           eval_preprocess(cfg.image_size), full_mask=True) if ddp.enabled else val_set
    pin = device.type == "cuda"
    train_loader = make_loader(train_set, batch_size=cfg.batch_size, train=True, seed=cfg.seed,
                               num_workers=workers, pin_memory=pin, tumor_weight=cfg.tumor_weight,
                               rank=ddp.rank, world=ddp.world)
    val_loader = make_loader(my_val_set, batch_size=cfg.batch_size, train=False, seed=cfg.seed,
                             num_workers=workers, pin_memory=pin) if val_names else None

    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = make_network(cfg.encoder, cfg.features, cfg.encoder_weights).to(device, memory_format=memory_format)
    if weights is not None:
        try:
            model.load_state_dict(weights)
        except RuntimeError:
            raise UserError(f"--pretrained {cfg.pretrained}: these weights do not fit --encoder {cfg.encoder} "
                            f"--features {cfg.features} (published weights need --encoder unet --features 32)") from None
    if cfg.freeze_encoder:
        model.freeze_encoder()
    if cfg.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    # The wrappers (DDP, compile) run the steps; checkpoints hold the plain model's state_dict.
    net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if ddp.enabled else model
    net = torch.compile(net) if cfg.compile else net
    loss_fn = DiceBCELoss(cfg.dice_weight, cfg.bce_weight, mode=cfg.dice_mode)
    encoder = {id(p) for m in model.encoder() for p in m.parameters()}
    groups = [{"params": [p for p in model.parameters() if p.requires_grad and id(p) in encoder],
               "lr": cfg.lr * cfg.encoder_lr_scale},
              {"params": [p for p in model.parameters() if p.requires_grad and id(p) not in encoder], "lr": cfg.lr}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = make_scheduler(optimizer, cfg.schedule, lr=cfg.lr, total_steps=cfg.epochs * len(train_loader),
                               warmup_steps=round(cfg.warmup_epochs * len(train_loader)))
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    say(f"model: {type(model).__name__}, {count_parameters(model):,} trainable parameters; {len(train_set)} train slices "
          f"({int(train_set.has_tumor.sum())} with tumor, weight {cfg.tumor_weight:g}), "
          f"{len(val_set)} validation slices")

    config_record = {**asdict(cfg), "resolved_data_dir": str(root), "synthetic_data": synthetic,
                     "patients": {"train": train_names, "validation": val_names}, "environment": env}
    history: list[dict] = []
    best_dice, best_epoch, first_epoch = -1.0, 0, 1
    if resumed:
        if resumed["config"]["patients"]["validation"] != val_names:
            raise UserError(f"{cfg.resume}: the data no longer gives the run's validation patients; "
                            "resume with the same --data-dir")
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        scaler.load_state_dict(resumed["scaler"])
        set_rng_state(resumed["rng"])
        history, best_dice, best_epoch = resumed["history"], resumed["best_dice"], resumed["best_epoch"]
        first_epoch = resumed["epoch"] + 1
        say(f"resuming {run_dir} after epoch {resumed['epoch']} (best so far: epoch {best_epoch}, "
              f"Dice per volume {best_dice:.4f})")
    if ddp.main:
        save_json(run_dir / "config.json", config_record)
    validate = functools.partial(
        evaluate, model, val_loader, device, loss_fn=loss_fn, threshold=cfg.threshold, amp_dtype=amp_dtype,
        channels_last=cfg.channels_last, progress=progress, postprocess=cfg.postprocess, tta=cfg.tta,
        spacing=spacing, patients=val_names, gather=gather_across_ranks if ddp.enabled else None,
    )
    augment = IntensityAugment() if cfg.intensity_augment else None
    start = time.perf_counter()
    epoch, metrics, volumes = first_epoch - 1, resumed["metrics"] if resumed else None, {}
    for epoch in range(first_epoch, cfg.epochs + 1):
        # The data order and augmentation of an epoch depend only on (seed, epoch), so a resumed
        # run repeats an interrupted epoch exactly.
        train_loader.generator.manual_seed(cfg.seed + epoch)
        train_set.reseed(cfg.seed * 1_000_003 + epoch + 7919 * ddp.rank)
        if augment is not None:
            augment.reseed(cfg.seed * 1_000_003 + epoch + 7919 * ddp.rank)
        if isinstance(train_loader.sampler, ShardedSampler):
            train_loader.sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        loss_sum, seen = train_one_epoch(
            net, train_loader, loss_fn, optimizer, scheduler, scaler, device,
            amp_dtype=amp_dtype, channels_last=cfg.channels_last, epoch=epoch, progress=progress, augment=augment,
        )
        if ddp.enabled:  # the loss over every rank's samples
            sums = torch.tensor([loss_sum, seen], dtype=torch.float64, device=device)
            dist.all_reduce(sums)
            loss_sum, seen = sums.tolist()
        train_loss = loss_sum / max(seen, 1)
        t1 = time.perf_counter()
        train_ips = seen / (t1 - t0)
        row: dict[str, Any] = {"epoch": epoch, "train_loss": train_loss}
        if val_loader is not None:
            val_loss, metrics, volumes = validate()
            dice = metrics["dice_per_volume_mean"]
            raw, lcc = metrics["postprocessing"]["none"], metrics["postprocessing"]["lcc"]
            row.update(val_loss=val_loss, val_dice_per_volume_mean=dice,
                       val_dice_per_volume_median=metrics["dice_per_volume_median"],
                       val_dice_global=metrics["dice_global"],
                       val_dice_per_volume_mean_raw=raw["dice_per_volume_mean"],
                       val_dice_per_volume_mean_lcc=lcc["dice_per_volume_mean"])
            if dice > best_dice:
                best_dice, best_epoch = dice, epoch
        t2 = time.perf_counter()
        row.update(lr=scheduler.get_last_lr()[0], seconds=t2 - t0, train_images_per_second=train_ips)
        if val_loader is not None:
            row["val_images_per_second"] = len(val_set) / (t2 - t1)
        history.append(row)
        checkpoint = {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch,
            "metrics": metrics, "config": config_record, "history": history, "best_dice": best_dice,
            "best_epoch": best_epoch, "rng": rng_state(),
        }
        if ddp.main:
            # last.pt first: a crash between the two writes leaves a best.pt no newer than last.pt.
            save_torch(run_dir / "last.pt", checkpoint)
            if best_epoch == epoch:
                save_torch(run_dir / "best.pt", checkpoint)
            write_history(run_dir, history)
        if val_loader is None:
            say(f"epoch {epoch}/{cfg.epochs}  train loss {train_loss:.4f}  {t2 - t0:.0f}s ({train_ips:.1f} img/s)")
            continue
        say(f"epoch {epoch}/{cfg.epochs}  train loss {train_loss:.4f}  val loss {val_loss:.4f}  "
              f"val Dice/volume {dice:.4f} (median {metrics['dice_per_volume_median']:.4f}; "
              f"raw {raw['dice_per_volume_mean']:.4f}, lcc {lcc['dice_per_volume_mean']:.4f})  "
              f"{t2 - t0:.0f}s ({train_ips:.1f} / {row['val_images_per_second']:.1f} img/s)"
              f"{'  *best*' if best_epoch == epoch else ''}")
        if cfg.patience and epoch - best_epoch >= cfg.patience:
            say(f"early stop: no better validation Dice per volume for {cfg.patience} epochs")
            break

    elapsed = time.perf_counter() - start
    if val_loader is None:
        final = {"epoch": epoch, "train_loss": history[-1]["train_loss"] if history else None,
                 "train_patients": len(train_names), "validation_patients": 0, "synthetic_data": synthetic}
        if ddp.main:
            save_json(run_dir / "metrics.json", final)
            say(f"trained on all {len(train_names)} patients, {epoch} epochs, {elapsed / 60:.1f} min; wrote {run_dir}/: "
                "last.pt, history.csv, curves.png, metrics.json. There are no validation patients, so nothing "
                "was scored; score it on patients it never saw with:\n"
                f"  python engine.py evaluate --checkpoint {run_dir / 'last.pt'} --data-dir DIR --patients unseen")
        return final
    if not volumes:  # resumed after the last epoch: nothing left to train, score the weights again
        _, metrics, volumes = validate()
    final = {**metrics, "epoch": epoch, "best_epoch": best_epoch,
             "best_dice_per_volume_mean": best_dice, "synthetic_data": synthetic}
    if not ddp.main:
        return final
    save_json(run_dir / "metrics.json", final)
    title = f"Validation after epoch {epoch} ({'SYNTHETIC data: not a result on MRI' if synthetic else 'real data'})"
    timing = {"training minutes": elapsed / 60, "epochs": epoch,
              "train images/s (mean)": float(np.mean([h["train_images_per_second"] for h in history])),
              "validation images/s (mean)": float(np.mean([h["val_images_per_second"] for h in history]))}
    write_reports(run_dir, final, volumes=volumes, dataset=val_set, title=f"Training run {run_dir.name}: {title}",
                  config=config_record, environment=env, timing=timing, history=history,
                  clinical=read_clinical(root))
    say(format_metrics(final, title))
    say(f"best epoch {best_epoch} (Dice per volume {best_dice:.4f}); {elapsed / 60:.1f} min; wrote "
          f"{run_dir}/: metrics.json, summary.md, per_patient.csv, curves.png, dice_per_volume.png, overlays/, "
          "best.pt, last.pt, history.csv")
    return final


def resolve_cv_resume(cfg: Config) -> tuple[Config, Path]:
    """For ``cv --resume DIR``: the cv run's own Config (with RESUMABLE_OVERRIDES from ``cfg``) and DIR."""
    base = Path(cfg.resume)
    path = base / CV_CONFIG
    if not path.is_file():
        raise UserError(f"{base}: no {CV_CONFIG} here; pass the folder a cv run wrote (the one holding fold-0, ...)")
    try:
        stored = json.loads(path.read_text())
        values = {f.name: stored[f.name] for f in fields(Config) if f.name in stored}
        Config(**values)
    except (OSError, ValueError, TypeError) as exc:
        raise UserError(f"{path}: unreadable ({exc}); start the cross-validation again in a new --out-dir") from None
    return Config(**{**values, **resumable_overrides(cfg), "out_dir": str(base), "resume": ""}), base


def run_fold(cfg: Config, fold: int, fold_dir: Path) -> dict:
    """Train one fold of a cv run, or pick it up where an interrupted run left it.

    A fold with a metrics.json is finished and is read back; one with a last.pt is resumed
    from it (exactly, like ``--resume``); one stopped before its first checkpoint is moved
    aside to fold-<i>.incomplete and trained again.
    """
    if (fold_dir / "metrics.json").is_file():
        print(f"fold {fold}: finished earlier; reading {fold_dir / 'metrics.json'}")
        return json.loads((fold_dir / "metrics.json").read_text())
    if (fold_dir / "last.pt").is_file():
        return train(replace(cfg, fold=fold, out_dir="", resume=str(fold_dir)))
    if fold_dir.exists() and any(fold_dir.iterdir()):
        aside = unused_path(fold_dir.with_name(fold_dir.name + ".incomplete"))
        fold_dir.rename(aside)
        print(f"fold {fold}: {fold_dir} stopped before its first checkpoint; moved it to {aside.name}, "
              "training the fold again")
    return train(replace(cfg, fold=fold, out_dir=str(fold_dir)))


def cross_validate(cfg: Config) -> pd.DataFrame:
    """The ``cv`` command: train fold 0..K-1 of a patient-level K-fold split, then summarize.

    Writes <out-dir>/fold-<i>/ for each fold, <out-dir>/cv_patients.csv (every patient once, with
    its held-out Dice with and without LCC) and <out-dir>/cv_summary.csv (one row per fold, the
    mean and std over folds, then the mean and median over all patients pooled, which is how
    Buda et al. report cross-validation), and prints the table. ``--resume DIR`` continues an
    interrupted cv run in DIR with its own settings: finished folds are read back, an unfinished
    one is resumed from its last.pt, and the summary is the one an uninterrupted run writes.
    """
    if cfg.resume:
        cfg, base = resolve_cv_resume(cfg)
    else:
        if cfg.folds < 2:
            raise UserError(f"cv needs --folds of at least 2, got {cfg.folds}")
        base = new_run_dir(cfg.out_dir)
        save_json(base / CV_CONFIG, asdict(cfg))
    rows, per_patient = [], []
    for fold in range(cfg.folds):
        print(f"\n===== fold {fold + 1}/{cfg.folds} =====")
        m = run_fold(cfg, fold, base / f"fold-{fold}")
        raw, lcc = m["postprocessing"]["none"], m["postprocessing"]["lcc"]
        rows.append({"fold": fold, "patients": m["patients"],
                     "dice_per_volume_mean": raw["dice_per_volume_mean"],
                     "dice_per_volume_median": raw["dice_per_volume_median"],
                     "dice_per_volume_mean_lcc": lcc["dice_per_volume_mean"],
                     "dice_per_volume_median_lcc": lcc["dice_per_volume_median"],
                     "dice_global": raw["dice_global"], "hd95_px_mean": raw["hd95_px_mean"]})
        per_patient.append(dice_table(m).assign(fold=fold))
    table = pd.DataFrame(rows)
    numeric = table.drop(columns=["fold"])
    patients = pd.concat(per_patient, ignore_index=True)[["fold", "patient", "dice", "dice_lcc"]]
    patients.to_csv(base / "cv_patients.csv", index=False)
    pooled = {"fold": "all patients", "patients": len(patients),
              "dice_per_volume_mean": patients["dice"].mean(), "dice_per_volume_median": patients["dice"].median(),
              "dice_per_volume_mean_lcc": patients["dice_lcc"].mean(),
              "dice_per_volume_median_lcc": patients["dice_lcc"].median()}
    summary = pd.concat([table, numeric.mean().to_frame().T.assign(fold="mean"),
                         numeric.std(ddof=1).to_frame().T.assign(fold="std"), pd.DataFrame([pooled])],
                        ignore_index=True)
    summary.to_csv(base / "cv_summary.csv", index=False)
    print(f"\n{cfg.folds}-fold patient-level cross-validation ({'SYNTHETIC data' if cfg.synthetic else cfg.data_dir or 'auto data'}):")
    print(summary.to_string(index=False, float_format=lambda v: f"{v:.4f}", na_rep=""))
    mean, std = numeric["dice_per_volume_mean"].mean(), numeric["dice_per_volume_mean"].std(ddof=1)
    print(f"Dice per volume: {mean:.4f} ± {std:.4f} (mean ± std over folds); over all {len(patients)} patients "
          f"mean {pooled['dice_per_volume_mean']:.4f}, median {pooled['dice_per_volume_median']:.4f} "
          f"(with LCC {pooled['dice_per_volume_mean_lcc']:.4f} / {pooled['dice_per_volume_median_lcc']:.4f}); "
          f"wrote {base / 'cv_summary.csv'} and cv_patients.csv")
    print("For the final model, train once more with the same settings on every patient (--split none) "
          "and score it on other patients with 'evaluate --patients unseen'.")
    return summary


def compare_command(args: argparse.Namespace) -> pd.DataFrame:
    """The ``compare`` command: run B against run A, patient by patient (see ``compare_runs``)."""
    if args.resamples < 1 or args.seed < 0:
        raise UserError(f"--resamples must be at least 1 and --seed at least 0, got {args.resamples} "
                        f"and {args.seed}")
    (a, source_a), (b, source_b) = patient_scores(Path(args.run_a)), patient_scores(Path(args.run_b))
    summary, paired = compare_runs(a, b, resamples=args.resamples, seed=args.seed)
    only = {name: len(set(frame["patient"]) - set(paired["patient"])) for name, frame in (("A", a), ("B", b))}
    print(f"A: {args.run_a} ({source_a})\nB: {args.run_b} ({source_b})\n{len(paired)} patients scored by both"
          + (f" (left out: {only['A']} only in A, {only['B']} only in B)" if any(only.values()) else ""))
    for row in summary.itertuples():
        label = "with LCC" if row.postprocess == "lcc" else "raw"
        print(f"{label:>8}: mean {row.mean_a:.4f} -> {row.mean_b:.4f}, "
              f"B - A {row.difference:+.4f} (95% CI {row.ci95_low:+.4f} to {row.ci95_high:+.4f}); median "
              f"{row.median_a:.4f} -> {row.median_b:.4f}; patients better: {row.better}, worse: {row.worse} "
              "(by more than 0.005)")
    if args.out:
        paired.to_csv(args.out, index=False)
        print(f"wrote {args.out}")
    return summary


def write_history(run_dir: Path, history: list[dict]) -> None:
    """history.csv (one row per epoch) and curves.png, rewritten after every epoch."""
    pd.DataFrame(history).to_csv(run_dir / "history.csv", index=False)
    plot_curves(run_dir, history)


def load_checkpoint(path: Path) -> dict:
    """Load a checkpoint written by ``train`` without running any pickled code."""
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint; pass a best.pt or last.pt from a run folder")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # weights_only met a Python object it will not build
        raise UserError(f"{path}: refused: it holds pickled Python objects, which could run code when "
                        "loaded; only tensors and plain data are accepted (re-save just its state_dict "
                        "where you trust its source)") from exc
    except (RuntimeError, OSError, EOFError, ValueError) as exc:  # truncated or not a torch file
        raise UserError(f"{path}: not a loadable checkpoint ({type(exc).__name__}: damaged or not written "
                        "by torch.save); pass a best.pt or last.pt written by engine.py") from exc
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise UserError(f"{path}: not a checkpoint written by engine.py (no model/config entries)")
    return ckpt


def network_from_checkpoint(ckpt: dict) -> nn.Module:
    """The network a checkpoint was trained with, holding its weights (on the CPU)."""
    record = ckpt["config"]
    model = make_network(record.get("encoder", "unet"), record["features"])
    model.load_state_dict(ckpt["model"])
    return model


def patients_to_score(spec: str, available: list[str], root: Path, record: dict, checkpoint: Path) -> list[str]:
    """``evaluate --patients``: the run's validation patients, the patients of ``root`` (whose
    patients are ``available``) it did not train on (unseen), all of them, or those named in a
    comma list or file."""
    if spec == "validation":
        if not record["patients"]["validation"]:
            raise UserError(f"{checkpoint}: this run trained on every patient (--split none), so it has no "
                            "validation patients; score it on others with --patients unseen --data-dir DIR")
        return record["patients"]["validation"]
    if spec == "all":
        return available
    if spec == "unseen":
        trained = set(record["patients"]["train"])
        unseen = [p for p in available if p not in trained]
        if not unseen:
            raise UserError(f"{root}: {checkpoint} was trained on every patient here; pass a --data-dir "
                            "that holds other patients")
        return unseen
    listed, source = read_patient_list(spec, "--patients")
    return match_patients(listed, available, source)


def evaluate_checkpoint(args: argparse.Namespace) -> dict:
    """The ``evaluate`` command: score a checkpoint on its validation patients, or on those --patients picks."""
    ckpt_path = Path(args.checkpoint)
    ckpt = load_checkpoint(ckpt_path)
    record = ckpt["config"]
    device = resolve_device(args.device)
    amp_dtype = resolve_amp(args.amp, device)
    root = find_data_dir(args.data_dir or record["resolved_data_dir"])
    if root is None:
        raise UserError("no dataset found; pass --data-dir")
    issues = DataIssues(strict=args.strict)
    groups = group_by_patient(scan_dataset(root, issues))
    names = patients_to_score(args.patients, sorted(groups), root, record, ckpt_path)
    out_dir = Path(args.out_dir) if args.out_dir else ckpt_path.parent / f"evaluate-{ckpt_path.stem}"
    out_dir.mkdir(parents=True, exist_ok=True)
    trained = sorted(set(names) & set(record["patients"]["train"]))
    if trained:
        print(f"warning: {len(trained)} of the {len(names)} patients scored were used to train this model "
              f"({', '.join(trained[:3])}{', ...' if len(trained) > 3 else ''}); their scores are not held out",
              file=sys.stderr)
    volumes = load_dataset(root, names, progress=args.progress, cache_dir=resolve_cache_dir(args.cache_dir),
                           normalization=record.get("normalization", "volume"), issues=issues, groups=groups)
    report_issues(issues, out_dir)
    val_set = LGGSlices(list(volumes.values()), eval_preprocess(record["image_size"]), full_mask=True)
    workers = default_num_workers() if args.num_workers < 0 else args.num_workers
    loader = make_loader(val_set, batch_size=args.batch_size or record["batch_size"], train=False,
                         seed=record["seed"], num_workers=workers, pin_memory=device.type == "cuda")
    model = network_from_checkpoint(ckpt)
    channels_last = record["channels_last"]
    model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    loss_fn = DiceBCELoss(record["dice_weight"], record["bce_weight"],
                          mode=record.get("dice_mode", "sample"))
    start = time.perf_counter()
    postprocess = args.postprocess or record.get("postprocess", "none")
    tta = record.get("tta", False) if args.tta is None else args.tta
    val_loss, metrics, volumes = evaluate(
        model, loader, device, loss_fn=loss_fn, threshold=record["threshold"], amp_dtype=amp_dtype,
        channels_last=channels_last, progress=args.progress, desc="evaluate", postprocess=postprocess,
        tta=tta, spacing=parse_spacing(args.spacing or record.get("spacing", "")),
    )
    seconds = time.perf_counter() - start
    result = {**metrics, "checkpoint": str(ckpt_path), "checkpoint_epoch": ckpt["epoch"],
              "data_dir": str(root), "patients_scored": args.patients, "scored_patients_trained_on": len(trained),
              "val_loss": val_loss, "synthetic_data": record["synthetic_data"],
              "images_per_second": metrics["slices"] / seconds}
    save_json(out_dir / "metrics.json", result)
    kind = "SYNTHETIC data: not a result on MRI" if record["synthetic_data"] else "real data"
    title = f"Evaluation of {ckpt_path} (epoch {ckpt['epoch']}, {kind}; patients: {args.patients})"
    write_reports(out_dir, result, volumes=volumes, dataset=val_set, title=title, config=record,
                  environment=environment_report(device),
                  timing={"evaluation seconds": seconds, "images/s": metrics["slices"] / seconds},
                  clinical=read_clinical(root))
    print(format_metrics(result, title))
    print(f"{metrics['slices'] / seconds:.1f} slices/s; wrote {out_dir}/: metrics.json, summary.md, "
          "per_patient.csv, dice_per_volume.png, overlays/")
    return result

# =============================================================================================
# Benchmark
# =============================================================================================


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _interleaved_rates(fns: list[Any], images: int, device: torch.device, warmup: int, repeats: int) -> list[float]:
    """images / median seconds of each function in ``fns``, timed in turns (A, B, A, B, ...).

    Taking turns means a shared machine that slows down or speeds up mid-run (other tenants,
    clock changes) shifts every path alike, so the ratios between paths stay meaningful.
    """
    for fn in fns:
        for _ in range(warmup):
            fn()
    _sync(device)
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(max(1, repeats)):
        for fn, took in zip(fns, times):
            t = time.perf_counter()
            fn()
            _sync(device)
            took.append(time.perf_counter() - t)
    return [images / statistics.median(took) for took in times]


@dataclass
class _TimedPath:
    """One execution path under ``time_paths``: its own model copy, optimizer and inputs."""

    amp_dtype: torch.dtype | None
    model: nn.Module
    net: nn.Module  # what trains: the model, or its compiled wrapper
    x: torch.Tensor
    y: torch.Tensor
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    infer_net: nn.Module | None = None


def time_paths(
    paths: dict[str, dict], *, features: int, image_size: int, batch_size: int, device: torch.device,
    warmup: int, repeats: int,
) -> list[dict]:
    """Training-step and inference throughput of each execution path in ``paths``, on random inputs.

    ``paths`` maps a name to its options: amp_dtype, channels_last, compile_model, and fused
    (infer with BatchNorm folded into the convs, as evaluate does). Every path starts from the
    same weights and sees the same batch; the paths are timed in turns.
    """
    x = torch.randn(batch_size, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    y = (torch.rand(batch_size, 1, image_size, image_size, generator=torch.Generator().manual_seed(1)) > 0.95).float()
    loss_fn = DiceBCELoss()
    runs = []
    for options in paths.values():
        torch.manual_seed(0)
        memory_format = torch.channels_last if options["channels_last"] else torch.contiguous_format
        model = UNet(features=features).to(device, memory_format=memory_format)
        runs.append(_TimedPath(
            amp_dtype=options["amp_dtype"], model=model,
            net=torch.compile(model) if options["compile_model"] else model,
            x=x.to(device).contiguous(memory_format=memory_format), y=y.to(device),
            optimizer=torch.optim.AdamW(model.parameters(), lr=1e-4),
            scaler=torch.amp.GradScaler(device.type, enabled=options["amp_dtype"] == torch.float16)))

    def train_step(r: _TimedPath) -> Callable[[], Any]:
        return lambda: optimizer_step(forward_loss(r.net, r.x, r.y, loss_fn, r.amp_dtype), r.optimizer, r.scaler)

    for r in runs:
        r.net.train()
    train_ips = _interleaved_rates([train_step(r) for r in runs], batch_size, device, warmup, repeats)
    # Inference copies are made after training, so BatchNorm has real running statistics.
    for r, options in zip(runs, paths.values()):
        infer = fuse_conv_bn(r.model) if options["fused"] else r.model.eval()
        r.infer_net = torch.compile(infer) if options["compile_model"] else infer

    def infer_step(r: _TimedPath) -> Callable[[], None]:
        def run() -> None:
            with torch.inference_mode(), autocast(device, r.amp_dtype):
                r.infer_net(r.x)
        return run

    infer_ips = _interleaved_rates([infer_step(r) for r in runs], batch_size, device, warmup, repeats)
    forward_flops, train_flops = count_flops(runs[0].model, image_size)
    return [
        {"path": name, "train_img_s": t, "infer_img_s": i,
         "train_tflop_s": t * train_flops / 1e12, "infer_tflop_s": i * forward_flops / 1e12}
        for name, t, i in zip(paths, train_ips, infer_ips)
    ]


def time_end_to_end(cfg: Config, device: torch.device, amp_dtype: torch.dtype | None, batches: int) -> dict:
    """Training throughput through the real loader (decode/cache, augmentation, collation, step)."""
    root, synthetic = locate_data(cfg)
    load = dict(progress=cfg.progress, cache_dir=resolve_cache_dir(cfg.cache_dir),
                normalization=cfg.normalization, issues=DataIssues(strict=cfg.strict))
    load_dataset(root, None, **load)  # fills the cache if it is cold
    t0 = time.perf_counter()  # from here on: a warm cache, as every run after the first sees it
    volumes = load_dataset(root, None, **load)
    dataset = LGGSlices(list(volumes.values()), train_preprocess(cfg.image_size),
                        modality_dropout=cfg.modality_dropout)
    workers = default_num_workers() if cfg.num_workers < 0 else cfg.num_workers
    loader = make_loader(dataset, batch_size=cfg.batch_size, train=True, seed=cfg.seed, num_workers=workers,
                         pin_memory=device.type == "cuda")
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = make_network(cfg.encoder, cfg.features).to(device, memory_format=memory_format)
    net = torch.compile(model) if cfg.compile else model
    net.train()
    loss_fn = DiceBCELoss(cfg.dice_weight, cfg.bce_weight, mode=cfg.dice_mode)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    def train_step(batch: dict) -> int:
        image, mask = _to_device(batch, device, cfg.channels_last)
        optimizer_step(forward_loss(net, image, mask, loss_fn, amp_dtype), optimizer, scaler)
        return len(image)

    def load_only(batch: dict) -> int:
        return len(_to_device(batch, device, cfg.channels_last)[0])

    first_at, train_img_s = _timed_batches(loader, device, batches, train_step)
    return {"data": str(root), "synthetic_data": synthetic, "slices": len(dataset), "workers": workers,
            "first_batch_seconds_warm_cache": first_at - t0, "train_img_s": train_img_s,
            # What the input pipeline alone delivers: the most training can reach with this loader.
            "loader_img_s": _timed_batches(loader, device, batches, load_only)[1]}


def _timed_batches(
    loader: torch.utils.data.DataLoader, device: torch.device, batches: int, work: Callable[[dict], int]
) -> tuple[float, float]:
    """Run ``work`` (returning the images it handled) on 1 + ``batches`` batches, cycling the loader.

    Returns when the first batch arrived (``time.perf_counter``) and the images/s of the other
    ``batches``: the first one, with worker start-up and warm-up, is not timed.
    """
    first_at, timed_from, images, done = 0.0, 0.0, 0, 0
    while done <= batches:
        for batch in loader:
            if done == 0:
                first_at = time.perf_counter()
            n = work(batch)
            if done == 0:
                _sync(device)
                timed_from = time.perf_counter()
            else:
                images += n
            done += 1
            if done > batches:
                break
    _sync(device)
    return first_at, images / (time.perf_counter() - timed_from)


def benchmark(args: argparse.Namespace, argv: list[str] | None = None) -> dict:
    """The ``benchmark`` command: reference vs fast path, then end to end; prints a table, writes JSON."""
    cfg = config_from_args(args, argv)
    device = resolve_device(cfg.device)
    amp_dtype = resolve_amp(cfg.amp, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    common = {"features": cfg.features, "image_size": cfg.image_size, "batch_size": cfg.batch_size,
              "device": device, "warmup": args.warmup, "repeats": args.repeats}
    paths = {
        "reference (fp32, NCHW, eager)": dict(amp_dtype=None, channels_last=False, compile_model=False,
                                              fused=False),
        f"fast (amp {amp_dtype or 'off'}, channels_last {cfg.channels_last}, compile {cfg.compile})": dict(
            amp_dtype=amp_dtype, channels_last=cfg.channels_last, compile_model=cfg.compile, fused=True),
    }
    print(f"timing {len(paths)} paths in turns ...", flush=True)
    rows = time_paths(paths, **common)
    ref, fast = rows
    e2e = time_end_to_end(cfg, device, amp_dtype, args.e2e_batches)
    result = {
        "environment": environment_report(device), "image_size": cfg.image_size,
        "batch_size": cfg.batch_size, "features": cfg.features, "paths": rows,
        "train_speedup": fast["train_img_s"] / ref["train_img_s"],
        "infer_speedup": fast["infer_img_s"] / ref["infer_img_s"],
        "end_to_end": e2e, "end_to_end_vs_fast_step": e2e["train_img_s"] / fast["train_img_s"],
    }
    out = Path(args.out or Path(cfg.out_dir or "runs") / f"benchmark-{datetime.now():%Y%m%d-%H%M%S}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_json(out, result)
    env = result["environment"]
    print(f"\nUNet ({cfg.features} features), {cfg.image_size}x{cfg.image_size}, batch {cfg.batch_size}, "
          f"{env.get('gpu', env['device'])}, torch {env['torch']}")
    print(f"{'path':<58} {'train img/s':>12} {'infer img/s':>12} {'train TFLOP/s':>14} {'infer TFLOP/s':>14}")
    for r in rows:
        print(f"{r['path']:<58} {r['train_img_s']:>12.2f} {r['infer_img_s']:>12.2f} "
              f"{r['train_tflop_s']:>14.3f} {r['infer_tflop_s']:>14.3f}")
    print(f"{'speed-up, fast / reference':<58} {result['train_speedup']:>11.2f}x {result['infer_speedup']:>11.2f}x")
    print(f"{'end to end through the DataLoader (' + str(e2e['workers']) + ' workers)':<58} "
          f"{e2e['train_img_s']:>12.2f} {'':>12}  = {result['end_to_end_vs_fast_step']:.0%} of the bare fast step")
    print(f"{'input pipeline alone, no model (' + str(e2e['workers']) + ' workers)':<58} {e2e['loader_img_s']:>12.2f}")
    print(f"first batch {e2e['first_batch_seconds_warm_cache']:.2f} s after start with a warm cache "
          f"({e2e['slices']} slices{', SYNTHETIC' if e2e['synthetic_data'] else ''}); wrote {out}")
    return result



# =============================================================================================
# predict and export
# =============================================================================================

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


@torch.inference_mode()
def predict_command(args: argparse.Namespace) -> Path:
    """The ``predict`` command: masks, overlays and a tumor-area CSV for new slices."""
    ckpt = load_checkpoint(Path(args.checkpoint))
    record = ckpt["config"]
    device = resolve_device(args.device)
    amp_dtype = resolve_amp(args.amp, device)
    spacing = parse_spacing(args.spacing)
    out = Path(args.output)
    groups, other = collect_inputs(Path(args.input))
    for f in other:
        print(f"skipped (not an image): {f}", file=sys.stderr)
    model = network_from_checkpoint(ckpt)
    channels_last = record["channels_last"]
    model = fuse_conv_bn(model).to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    normalization, size = record.get("normalization", "volume"), record["image_size"]
    tta = record.get("tta", False) if args.tta is None else args.tta
    preprocess = eval_preprocess(size)
    rows, skipped = [], len(other)
    for group, files in groups.items():
        images, names = [], []
        for f in files:
            try:
                image = read_image(f)  # grayscale comes back copied into 3 channels
            except DatasetError:
                print(f"skipped (not an image): {f}", file=sys.stderr)
                skipped += 1
                continue
            images.append(image)
            names.append(f)
        if not images:
            continue
        same_size = len({im.shape for im in images}) == 1
        # Statistics over the whole group (a patient volume); voxels are pooled, so sizes may differ.
        pooled = np.concatenate([im.reshape(-1, 1, 1, 3) for im in images])
        if normalization == "buda" and same_size:
            box = brain_box(np.stack(images))
            stats = buda_stats(np.stack(images)[:, box[0]:box[1], box[2]:box[3]])
        else:
            box, stats = None, (buda_stats(pooled) if normalization == "buda" else volume_stats(pooled))
        stats_t = stats.as_tensor().to(device)
        for start in range(0, len(images), args.batch_size):
            chunk = list(range(start, min(start + args.batch_size, len(images))))
            tensors, boxes = [], []
            for j in chunk:
                image, mask = images[j], np.zeros(images[j].shape[:2], np.uint8)
                if box is not None:
                    image, mask, (top, left, side) = crop_pad_square(image, mask, box)
                    boxes.append([*box, top, left, side])
                tensors.append(preprocess(image, mask)[0])
            x = normalize(torch.stack(tensors).to(device), stats_t)
            x = x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            logits, flipped = forward_with_mirror(model, x, amp_dtype, tta)
            for k, j in enumerate(chunk):
                b = torch.tensor([boxes[k]]) if boxes else None
                hw = images[j].shape[:2]
                prob = torch.sigmoid(_to_full_resolution(logits[k : k + 1], hw, b))
                if flipped is not None:
                    prob = (prob + torch.sigmoid(_to_full_resolution(flipped[k : k + 1], hw, b))) / 2
                pred = (prob[0, 0] > record["threshold"]).cpu().numpy()
                stem = names[j].stem
                (out / "masks" / group).mkdir(parents=True, exist_ok=True)
                (out / "overlays" / group).mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(out / "masks" / group / f"{stem}_pred.png"), pred.astype(np.uint8) * 255)
                overlay = overlay_slice(images[j][..., 1], np.zeros_like(pred), pred)
                cv2.imwrite(str(out / "overlays" / group / f"{stem}.png"), overlay[..., ::-1])
                area = int(pred.sum())
                rows.append({"patient": group, "file": str(names[j]), "level": "slice", "area_px": area,
                             "area_mm2": area * spacing[1] * spacing[2] if spacing else None, "volume_mm3": None})
        total = sum(r["area_px"] for r in rows if r["patient"] == group and r["level"] == "slice")
        rows.append({"patient": group, "file": "", "level": "patient", "area_px": total,
                     "area_mm2": total * spacing[1] * spacing[2] if spacing else None,
                     "volume_mm3": total * spacing[0] * spacing[1] * spacing[2] if spacing else None})
    out.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame(rows, columns=["patient", "file", "level", "area_px", "area_mm2", "volume_mm3"])
    table.to_csv(out / "predictions.csv", index=False)
    slices = int((table["level"] == "slice").sum())
    print(f"predicted {slices} slices of {len(groups)} patient(s)/folder(s)"
          + (f", skipped {skipped} non-image file(s)" if skipped else "")
          + f"; wrote {out}/masks/, overlays/, predictions.csv")
    return out


def export_command(args: argparse.Namespace) -> float:
    """The ``export`` command: TorchScript or ONNX, with a parity check against eager PyTorch."""
    ckpt = load_checkpoint(Path(args.checkpoint))
    record = ckpt["config"]
    model = network_from_checkpoint(ckpt)
    model.eval()
    deployed = fuse_conv_bn(model)  # the same function with BatchNorm folded into the convs
    size = record["image_size"]
    example = torch.randn(1, 3, size, size)
    check = torch.randn(2, 3, size, size)  # another batch size than traced: the batch axis is dynamic
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



def report_dataset(args: argparse.Namespace) -> dict:
    """The ``data`` command: print the dataset report and write it as JSON."""
    root = find_data_dir(args.data_dir or None)
    if root is None:
        raise UserError(f"no dataset found (--data-dir, ${DATA_ENV_VAR}, ./kaggle_3m); "
                        "run 'python engine.py download' or pass --data-dir")
    report = dataset_report(root, strict=args.strict)
    clinical = read_clinical(root)
    report["clinical_table"] = None if clinical is None else {"rows": len(clinical), "columns": list(clinical.columns)}
    out = Path(args.out) if args.out else Path("runs") / f"data-report-{datetime.now():%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    save_json(out, report)
    area = report["tumor_area_px"]
    lines = [
        f"dataset: {root}",
        f"  {report['patients']} patients, {report['slices']} slices, {report['tumor_slices']} with tumor",
        f"  {report['completeness']['message']}",
        "  institutions: " + ", ".join(f"{k} {v}" for k, v in report["institutions"].items()),
        "  image sizes: " + ", ".join(f"{k} ({v})" for k, v in report["image_sizes"].items()),
        "  mask values: " + ", ".join(f"{k}: {v:,}" for k, v in report["mask_values"].items()),
        (f"  tumor area per tumor slice (px): median {area['median']:.0f}, mean {area['mean']:.0f}, "
         f"min {area['min']}, max {area['max']}") if area["count"] else "  no tumor in any slice",
        f"  patients without tumor: {', '.join(report['patients_without_tumor']) or 'none'}",
        f"  patients with identical channels (one modality copied 3 times): "
        f"{', '.join(report['patients_with_identical_channels']) or 'none'}",
        *(f"  patients with FLAIR in place of {modality} in every slice: {', '.join(names) or 'none'}"
          for modality, names in report["patients_with_flair_in_place_of"].items()),
        "  clinical table (data.csv): " + (f"{len(clinical)} rows" if clinical is not None else "not found (optional)"),
        f"  problems: {report['problem_summary'] or 'none'}",
    ]
    lines += [f"    {p}" for p in report["problems"][:10]]
    print("\n".join(lines) + f"\nwrote {out}")
    return report


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    quiet_opencv()
    try:
        if args.command == "evaluate":
            evaluate_checkpoint(args)
        elif args.command == "benchmark":
            benchmark(args, argv)
        elif args.command == "cv":
            cross_validate(config_from_args(args, argv))
        elif args.command == "compare":
            compare_command(args)
        elif args.command == "download":
            target = download_dataset(Path(args.to))
            print(f"dataset ready in {target}\nthe loader finds it from this folder; elsewhere run:\n"
                  f"  export {DATA_ENV_VAR}={target.resolve()}")
        elif args.command == "data":
            report_dataset(args)
        elif args.command == "predict":
            predict_command(args)
        elif args.command == "export":
            export_command(args)
        else:
            train(config_from_args(args, argv))
    except (UserError, FloatingPointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except torch.cuda.OutOfMemoryError:
        print("error: the GPU ran out of memory; lower --batch-size or --image-size, or keep --amp on "
              "(checkpoints already written are kept)", file=sys.stderr)
        return 2
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
