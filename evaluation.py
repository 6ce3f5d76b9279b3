"""Model -> scores: predict whole patient volumes, post-process them in 3D, score them per patient,
and the ``evaluate`` command.

Every slice is predicted at the model's size, mapped back onto its file's own grid (undoing the
'buda' crop where there is one) and scored there against the mask as it is on disk, so that the
metrics do not depend on ``--image-size``. Training's validation, ``evaluate`` and ``predict``
all go through ``predict_volumes``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from data_cache import load_dataset, resolve_cache_dir
from data_files import (
    DataIssues,
    NORMALIZATIONS,
    PatientVolume,
    describe_masks,
    group_by_patient,
    find_data_dir,
    input_volume,
    read_clinical,
    recorded_data_dir,
    refuse_zip,
    report_issues,
    scan_dataset,
)
from data_loaders import (
    BUDA_VAL_PREFIXES,
    LGGSlices,
    default_num_workers,
    make_loader,
    match_patients,
    read_patient_list,
)
from data_preprocessing import batch_to_device, eval_preprocess, fill_slice_holes
from libraries import (UserError, add_bool_flag, autocast, check_folder_path, counted, environment_report,
                       memory_format, save_json, setup_device, unused_path)
from loss_fun import DiceBCELoss
from metrics import (
    SegmentationMeter,
    brain_components_3d,
    hd95,
    largest_component_3d,
    parse_spacing,
)
from model import (check_network_settings, fuse_conv_bn, network_from_checkpoint, overridden_settings,
                   scoring_checkpoint)
from reports import format_metrics, not_held_out, write_reports
from scans import find_cases, load_case, parse_labels, warn_filled
from synthetic_data import is_synthetic


def to_full_resolution(logits: torch.Tensor, size: tuple[int, int], box: torch.Tensor | None = None) -> torch.Tensor:
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


@dataclass
class PatientPrediction:
    """One patient's prediction at the masks' own resolution, (D, H, W) each, in slice order."""

    prob: np.ndarray  # float16: the probability, averaged over the models
    pred: np.ndarray  # bool: prob > threshold, decided in float32 before the cast
    truth: np.ndarray  # bool
    inside: np.ndarray  # bool: the brain, away from the scalp (data_preprocessing.brain_interior)
    contrast: float | None = None  # the true lesion's FLAIR contrast (PatientVolume.flair_contrast)
    spacing: tuple[float, float, float] | None = None  # (dz, dy, dx) mm from the scan's header (PatientVolume)


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
    progress: bool,
    desc: str = "validate",
) -> tuple[float, int, dict[int, PatientPrediction]]:
    """Predict every slice of the loader; return the summed loss, the slice count and, per patient
    index of the loader's dataset, its PatientPrediction. The loss (of the logits, at model
    resolution) is summed per sample. A patient is assembled as soon as its last slice is
    predicted, so only the unfinished patients' slices are held apart: evaluate on the 66
    shared patients peaked at 3.3 GB when every slice waited for the end, at 2.5 GB now.
    """
    model.eval()
    total, seen = 0.0, 0
    slices: dict[int, list[tuple[int, np.ndarray, np.ndarray, np.ndarray]]] = {}
    volumes: dict[int, PatientPrediction] = {}
    for batch in tqdm(loader, desc=desc, leave=False, disable=not progress):
        image, mask = batch_to_device(batch, device, channels_last)
        size, box = batch["full_mask"].shape[-2:], batch.get("box")
        with autocast(image.device, amp_dtype):
            logits = model(image).float()
        if loss_fn is not None:
            total += loss_fn(logits, mask).item() * len(image)
            seen += len(image)
        prob = torch.sigmoid(to_full_resolution(logits, size, box))
        pred = (prob > threshold).cpu().numpy()[:, 0]
        prob16 = prob.half().cpu().numpy()[:, 0]
        truth = batch["full_mask"].numpy()[:, 0] > 0.5
        for p, s, pb, pr, tr in zip(batch["patient"].tolist(), batch["slice"].tolist(), prob16, pred, truth):
            slices.setdefault(p, []).append((s, pb, pr, tr))  # views: a batch lives while a patient in it waits
            if len(slices[p]) == len(loader.dataset.volumes[p].images):
                volumes[p] = patient_prediction(loader.dataset.volumes[p], slices.pop(p))
    # Patients the loader read only in part (a sampler over some slices; every loader here reads whole volumes).
    volumes.update((p, patient_prediction(loader.dataset.volumes[p], items)) for p, items in slices.items())
    return total, seen, volumes


def patient_prediction(volume: PatientVolume, items: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]]
                       ) -> PatientPrediction:
    """One patient's (slice number, prob, pred, truth) items, in any order, as a PatientPrediction
    on the volume's own grid."""
    items.sort(key=lambda item: item[0])  # the volume's slices are in slice order too
    prob, pred, truth = (np.stack([i[k] for i in items]) for k in (1, 2, 3))
    whole = len(volume.images) == len(items)
    inside = volume.interior() if whole else np.ones_like(pred)
    # A volume padded to a square field of view is scored, and written, on its own grid.
    prob, pred, truth, inside = (volume.unpadded(a) for a in (prob, pred, truth, inside))
    return PatientPrediction(prob=prob, pred=pred, truth=truth, inside=inside,
                             contrast=volume.flair_contrast() if whole else None, spacing=volume.spacing)


# Post-processing of a patient's predicted volume (runs report the raw prediction beside the
# chosen rule; evaluate --all-rules reports every one): none; lcc, the largest 3D component by
# voxels (the published reference); brain-multi (the presets'), every component whose
# probability mass inside the brain is at least half the heaviest one's or of tumor size, so
# neither a scalp rim nor a rival inside the brain throws a found tumor away, then the holes of
# each slice filled (a cystic lesion's dark centre). Rules removed since
# (brain, mass, brain-shell, brain-filled: docs/results.md) fall back to brain-multi when a
# checkpoint names them.
POSTPROCESSING = ("none", "lcc", "brain-multi")


def postprocess_volume(v: PatientPrediction, method: str) -> np.ndarray:
    """The (D, H, W) bool prediction of ``v`` after ``method`` (one of POSTPROCESSING)."""
    if method == "none":
        return v.pred
    if method == "lcc":
        return largest_component_3d(v.pred)
    if method == "brain-multi":
        return fill_slice_holes(brain_components_3d(v.pred, v.prob, v.inside))
    raise UserError(f"--postprocess must be one of {', '.join(POSTPROCESSING)}, got {method!r}")


def score_volumes(
    volumes: dict[int, PatientPrediction],
    patients: list[str],
    *,
    postprocess: str,
    spacing: tuple[float, float, float] | None,
    scored: dict[int, list[tuple[np.ndarray, tuple]]] | None = None,
) -> tuple[dict, dict[int, np.ndarray]]:
    """Metrics over all patient volumes with the given post-processing, HD95 per patient, and the
    post-processed predictions.

    ``tumor_lost_patients`` names the patients whose raw prediction touched the tumor and whose
    post-processed one does not: the post-processing threw the tumor away. ``scored`` keeps, per
    patient, the predictions already measured by other post-processings and their HD95: the rules
    mostly keep the same component, and HD95 is the costly part of scoring.
    """
    meter = SegmentationMeter(patients)
    distances, kept, lost = {}, {}, []
    scored = {} if scored is None else scored
    for p, v in volumes.items():
        pred = kept[p] = postprocess_volume(v, postprocess)
        meter.update(torch.from_numpy(pred)[:, None], torch.from_numpy(v.truth)[:, None],
                     torch.full((len(pred),), p, dtype=torch.long))
        earlier = [d for other, d in scored.get(p, []) if np.array_equal(other, pred)]
        mm = v.spacing or spacing  # a header's spacing, else --spacing
        distances[patients[p]] = earlier[0] if earlier else (
            hd95(pred, v.truth), hd95(pred, v.truth, mm) if mm else None)
        scored.setdefault(p, []).append((pred, distances[patients[p]]))
        if (v.pred & v.truth).any() and not (pred & v.truth).any():
            lost.append(patients[p])
    metrics = meter.compute()
    contrast = {patients[p]: v.contrast for p, v in volumes.items()}
    for row in metrics["per_patient"]:
        row["hd95_px"], row["hd95_mm"] = distances[row["patient"]]
        row["flair_contrast"] = contrast[row["patient"]]
    defined = [d[0] for d in distances.values() if d[0] is not None]
    metrics["hd95_px_mean"] = float(np.mean(defined)) if defined else None
    metrics["hd95_undefined_patients"] = len(distances) - len(defined)
    metrics["tumor_lost_patients"] = sorted(lost)
    if spacing or any(v.spacing for v in volumes.values()):
        mm = [d[1] for d in distances.values() if d[1] is not None]
        metrics["hd95_mm_mean"] = float(np.mean(mm)) if mm else None
    return metrics, kept


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
    rules: Sequence[str] = (),
    spacing: tuple[float, float, float] | None = None,
    desc: str = "validate",
    patients: list[str] | None = None,
    gather: Gather | None = None,
) -> tuple[float | None, dict, dict[int, tuple[np.ndarray, np.ndarray]]]:
    """Loss, metrics and per-patient (pred, truth) volumes, scored against the masks at their own
    resolution.

    The returned metrics and predictions are those of ``postprocess``; ``metrics["postprocessing"]``
    holds the headline numbers of the raw prediction, of ``postprocess`` and of the other ``rules``.
    In a distributed job each rank predicts its own patients and ``gather`` merges the predicted
    volumes (by patient name) and loss sums of all ranks, so every rank scores the whole set;
    ``patients`` is then the full list, whose indices key the returned volumes.
    """
    # BatchNorm folded into the convs: the same function, faster (the caller's model is untouched).
    fused = fuse_conv_bn(getattr(model, "_orig_mod", model))
    loss_sum, count, local = predict_volumes(
        fused, loader, device, loss_fn=loss_fn, threshold=threshold, amp_dtype=amp_dtype,
        channels_last=channels_last, progress=progress, desc=desc,
    )
    named = {loader.dataset.patients[p]: v for p, v in local.items()}
    if gather is not None:
        named, loss_sum, count = gather(named, loss_sum, count)
    patients = patients or loader.dataset.patients
    volumes = {patients.index(name): v for name, v in named.items()}
    scored: dict = {}  # HD95 is measured once per distinct prediction, whichever rules give it
    variants = {name: score_volumes(volumes, patients, postprocess=name, spacing=spacing, scored=scored)
                for name in dict.fromkeys(("none", postprocess, *rules))}
    metrics, kept = variants[postprocess]
    metrics["postprocessing"] = {
        name: {**{k: v[k] for k in ("dice_per_volume_mean", "dice_per_volume_median", "dice_global",
                                    "hd95_px_mean", "tumor_lost_patients")},
               "dice_per_patient": {row["patient"]: row["dice"] for row in v["per_patient"]}}
        for name, (v, _) in variants.items()
    }
    metrics["postprocess"] = postprocess
    metrics["threshold"] = threshold
    loss = loss_sum / count if loss_fn is not None and count else None
    return loss, metrics, {p: (kept[p], v.truth) for p, v in volumes.items()}


def gather_across_ranks(named: dict, loss_sum: float, count: int) -> tuple[dict, float, int]:
    """All ranks' predicted volumes (merged by patient name) and loss sums, on every rank."""
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (named, loss_sum, count))
    merged: dict = {}
    for part, _, _ in parts:
        merged.update(part)
    return merged, sum(p[1] for p in parts), sum(p[2] for p in parts)


# =============================================================================================
# The evaluate command
# =============================================================================================


def trained_patients(record: dict, names: Sequence[str]) -> list[str]:
    """Which of ``names`` the model of ``record`` was trained on.

    Buda et al.'s published weights were trained on all 110 patients but the 10 they validated on
    (``random.seed(42); random.sample(sorted(folders), 10)``: the --split buda patients).
    """
    if record.get("trained_on") == "buda":
        return sorted(n for n in names if not any(n == p or n.startswith(p + "_") for p in BUDA_VAL_PREFIXES))
    trained = set(record["patients"]["train"])
    return sorted(n for n in names if n in trained)


def patients_to_score(spec: str, available: list[str], root: Path, record: dict, checkpoint: Path) -> list[str]:
    """``evaluate --patients``: the run's validation patients, the patients of ``root`` (whose
    patients are ``available``) it did not train on (unseen), all of them, or those named in a
    comma list or file."""
    if spec == "validation":
        if record.get("trained_on") == "buda":  # whichever of the 10 they held out are here
            held_out = [p for p in available if p not in trained_patients(record, [p])]
            if not held_out:
                raise UserError(f"{root}: none of the 10 patients Buda et al. held out (--split buda) is here; "
                                "pass --patients unseen, all or a list")
            return held_out
        if not record["patients"]["validation"]:
            raise UserError(f"{checkpoint}: this model has no validation patients recorded (--split none, or "
                            "published weights); score it with --patients unseen, all or a list, and --data-dir DIR")
        return record["patients"]["validation"]
    if spec == "all":
        return available
    if spec == "unseen":
        trained = set(trained_patients(record, available))
        unseen = [p for p in available if p not in trained]
        if not unseen:
            raise UserError(f"{root}: {checkpoint} was trained on every patient here; pass a --data-dir "
                            "that holds other patients")
        return unseen
    listed, source = read_patient_list(spec, "--patients")
    return match_patients(listed, available, source)


def load_scored_checkpoint(
    spec: str, *, image_size: int | None = None, normalization: str | None = None
) -> tuple[Path, dict]:
    """The checkpoint of ``--checkpoint``: this package's file, or published weights ('buda', a URL,
    a state_dict; see ``scoring_checkpoint``, which ``image_size`` and ``normalization`` are for)."""
    path = Path(spec)
    ckpt = scoring_checkpoint(spec, image_size=image_size, normalization=normalization)
    check_network_settings(ckpt["config"], spec)  # a given --image-size/--normalization applies to ours too
    record = ckpt["config"]
    for flag, recorded, value in overridden_settings(record, image_size=image_size, normalization=normalization):
        print(f"warning: {spec} was trained with {flag} {recorded}; using {flag} {value} as asked: the model sees "
              "inputs unlike those it was trained on", file=sys.stderr)
    record.update({k: v for k, v in (("image_size", image_size), ("normalization", normalization)) if v})
    return path, ckpt


def scoring_loader(
    volumes: list[PatientVolume], *, image_size: int, batch_size: int, num_workers: int, seed: int,
    device: torch.device,
) -> torch.utils.data.DataLoader:
    """The deterministic loader through which validation, ``evaluate`` and ``predict`` read volumes:
    every slice once, in order, resized for the model, with its mask at the file's resolution."""
    dataset = LGGSlices(volumes, eval_preprocess(image_size), full_mask=True)
    workers = default_num_workers(device) if num_workers < 0 else num_workers
    return make_loader(dataset, batch_size=batch_size, train=False, seed=seed, num_workers=workers,
                       pin_memory=device.type == "cuda")


def warn_trained_on(record: dict, names: Sequence[str]) -> list[str]:
    """The scored patients that the model was trained on, warned about once."""
    trained = trained_patients(record, names)
    if trained:
        print(f"warning: {not_held_out(trained, len(names))}", file=sys.stderr)
    return trained


def add_scoring_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of where and how a model is run on scans (evaluate, predict)."""
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--amp", default="auto", choices=("auto", "off", "bf16", "fp16"))
    parser.add_argument("--postprocess", choices=POSTPROCESSING, default=None, help="default: as trained")
    parser.add_argument("--threshold", type=float, default=None,
                        help="probability above which a pixel is called tumor (default: as trained)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="the size the weights expect (default: as trained; 256 for Buda et al.'s weights; "
                             "needed for a plain state_dict)")
    parser.add_argument("--normalization", choices=NORMALIZATIONS, default=None,
                        help="default: as trained; buda for Buda et al.'s weights; needed for a plain state_dict")


THRESHOLD = 0.5  # probability above which a pixel is tumor in training; evaluate and predict take --threshold


def check_threshold(threshold: float) -> None:
    """Refuse a threshold that would call every pixel tumor, or none (training, evaluate, predict)."""
    if not 0 < threshold < 1:
        raise UserError(f"--threshold {threshold:g}: a probability strictly between 0 and 1 is needed")


def scoring_settings(args: argparse.Namespace, record: dict) -> tuple[float, str]:
    """The threshold and post-processing that evaluate and predict use: the flags given, else the
    checkpoint's own settings (a rule this version no longer has falls back to the presets' 'brain-multi')."""
    threshold = record.get("threshold", 0.5) if args.threshold is None else args.threshold
    check_threshold(threshold)
    trained = record.get("postprocess", "none")
    return threshold, args.postprocess or (trained if trained in POSTPROCESSING else "brain-multi")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``evaluate`` command's flags."""
    parser.add_argument("--checkpoint", required=True,
                        help="a best.pt or last.pt written by training, or published weights: buda, a URL, a "
                             "state_dict")
    parser.add_argument("--data-dir", default=None, help="dataset folder (default: the one it was trained on)")
    parser.add_argument("--input", default="",
                        help="instead of --data-dir: NIfTI or DICOM cases, a case folder or a folder of them, each "
                             "with its mask (a file or folder named seg, mask or label); HD95 in mm from the header")
    parser.add_argument("--labels", default="nonzero",
                        help="with --input: the mask values that are tumor, a comma list (1,2,4: BraTS' whole "
                             "tumor); default: every value above 0")
    parser.add_argument("--patients", default="validation",
                        help="which patients of --data-dir to score: validation (the run's own; default), unseen "
                             "(every patient it did not train on: for a --split none model or another dataset), "
                             "all, or a comma list or file of names")
    parser.add_argument("--out-dir", default=None, help="where metrics.json goes (default: beside the checkpoint)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the training batch size")
    parser.add_argument("--num-workers", type=int, default=-1)
    parser.add_argument("--spacing", default="", help="voxel spacing 'dz,dy,dx' in mm for HD95 in mm")
    add_bool_flag(parser, "strict", False, "make every data problem an error instead of skipping or fixing it")
    add_bool_flag(parser, "all_rules", False, "report every post-processing rule, not only raw and --postprocess")
    add_scoring_flags(parser)


def evaluate_command(args: argparse.Namespace) -> dict:
    """The ``evaluate`` command: score a checkpoint on its validation patients, on those --patients
    picks, or on NIfTI/DICOM cases (--input)."""
    ckpt_path, ckpt = load_scored_checkpoint(args.checkpoint, image_size=args.image_size,
                                             normalization=args.normalization)
    record = ckpt["config"]
    threshold, postprocess = scoring_settings(args, record)
    device, amp_dtype = setup_device(args.device, args.amp)
    default_dir = ckpt_path.parent / f"evaluate-{ckpt_path.stem}"
    if args.input:
        default_dir = default_dir.with_name(f"{default_dir.name}-{Path(args.input).resolve().name}")
    out_dir = evaluation_dir(Path(args.out_dir) if args.out_dir else None, default_dir)
    if args.input:
        volumes, source, trained, clinical = case_volumes(args, record), args.input, [], None
    else:
        volumes, source, trained, clinical = dataset_volumes(args, ckpt_path, record, out_dir)
    loader = scoring_loader(volumes, image_size=record["image_size"],
                            batch_size=args.batch_size or record["batch_size"], num_workers=args.num_workers,
                            seed=record["seed"], device=device)
    channels_last = record.get("channels_last", True)
    model = network_from_checkpoint(ckpt, str(ckpt_path)).to(device, memory_format=memory_format(channels_last))
    progress = sys.stderr.isatty()
    start = time.perf_counter()
    val_loss, metrics, predicted = evaluate(
        model, loader, device, loss_fn=DiceBCELoss(), threshold=threshold, amp_dtype=amp_dtype,
        channels_last=channels_last, progress=progress, desc="evaluate", postprocess=postprocess,
        rules=POSTPROCESSING if args.all_rules else (),
        spacing=parse_spacing(args.spacing or record.get("spacing", "")),
    )
    seconds = time.perf_counter() - start
    scored = "cases" if args.input else args.patients
    synthetic = not args.input and is_synthetic(Path(source))  # the patients scored, whatever the model learned on
    result = {**metrics, "checkpoint": str(ckpt_path), "checkpoint_epoch": ckpt["epoch"],
              "data_dir": str(source), "patients_scored": scored, "scored_patients_trained_on": len(trained),
              "scored_patients_trained_on_names": trained,
              "val_loss": val_loss, "synthetic_data": synthetic,
              "images_per_second": metrics["slices"] / seconds}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_json(out_dir / "metrics.json", result)
    kind = "SYNTHETIC data: not a result on MRI" if synthetic else "real data"
    epoch = f"epoch {ckpt['epoch']}, " if ckpt["epoch"] is not None else ""
    title = f"Evaluation of {ckpt_path} ({epoch}{kind}; patients: {scored})"
    write_reports(out_dir, result, volumes=predicted, scans=loader.dataset.volumes, title=title, config=record,
                  environment=environment_report(device),
                  timing={"evaluation seconds": seconds, "images/s": metrics["slices"] / seconds},
                  clinical=clinical)
    print(format_metrics(result, title))
    print(f"{metrics['slices'] / seconds:.1f} slices/s; wrote {out_dir}/: metrics.json, summary.md, "
          "per_patient.csv, dice_per_volume.png, overlays/")
    return result


def evaluation_dir(asked: Path | None, default: Path) -> Path:
    """Where evaluate writes: ``asked`` (--out-dir), refused where it already holds results (a run's
    own folder among them), or ``default``, else the first free ``default-2``, ``default-3``, ...:
    earlier results are never overwritten."""
    if asked is None:
        return default if not (default / "metrics.json").exists() else unused_path(default)
    if (check_folder_path(asked, "--out-dir") / "metrics.json").exists():
        raise UserError(f"{asked}: already holds results (metrics.json); choose another --out-dir or remove them: "
                        "earlier results are never overwritten")
    return asked


def dataset_volumes(args: argparse.Namespace, ckpt_path: Path, record: dict,
                    out_dir: Path) -> tuple[list[PatientVolume], Path, list[str], pd.DataFrame | None]:
    """The patients of a dataset folder that ``--patients`` picks, read as in training; also the
    folder, the scored patients a model trained on and the clinical table."""
    if args.labels != "nonzero":
        raise UserError(f"--labels is for --input's masks; a dataset folder's masks are 0/255, and every value above "
                        f"0 is tumor: drop --labels {args.labels}")
    root = find_data_dir(args.data_dir or recorded_data_dir(record["resolved_data_dir"], ckpt_path))
    if root is None:
        raise UserError("no dataset found; pass --data-dir (the kaggle_3m layout) or --input (NIfTI or DICOM cases)")
    issues = DataIssues(strict=args.strict)
    groups = group_by_patient(scan_dataset(root, issues))
    names = patients_to_score(args.patients, sorted(groups), root, record, ckpt_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    trained = warn_trained_on(record, names)
    volumes = load_dataset(root, names, progress=sys.stderr.isatty(), cache_dir=resolve_cache_dir(),
                           normalization=record.get("normalization", "volume"), image_size=record["image_size"],
                           issues=issues, groups=groups)
    report_issues(issues, out_dir)
    print(f"{root}: {counted(len(volumes), 'patient')}, {describe_masks(volumes)}")
    return list(volumes.values()), root, trained, read_clinical(root)


def check_labels_found(unlabeled: dict[str, tuple[float, ...]], tumors: int, labels: str, path: Path) -> None:
    """Cases whose mask marks something, but nothing --labels counts as tumor: they would be scored
    as cases without tumor. If no case is left with tumor (``tumors``), a one-line error; else a
    warning naming them."""
    if not unlabeled:
        return
    found = sorted({v for values in unlabeled.values() for v in values})
    shown = ",".join(f"{v:g}" for v in found[:6]) + (", ..." if len(found) > 6 else "")
    names = ", ".join(list(unlabeled)[:3]) + (" ..." if len(unlabeled) > 3 else "")
    if not tumors:
        raise UserError(f"{path}: no mask holds any of --labels {labels}; they hold {shown}: pass the values that "
                        "mark the tumor, such as --labels " + ",".join(f"{v:g}" for v in found[:6]))
    print(f"warning: the masks of {counted(len(unlabeled), 'case')} ({names}) hold only {shown}, none of "
          f"--labels {labels}: each is scored as a case without tumor", file=sys.stderr)


def case_volumes(args: argparse.Namespace, record: dict) -> list[PatientVolume]:
    """``--input``'s NIfTI/DICOM cases with their masks, as volumes prepared for the checkpoint,
    with each header's spacing (so HD95 comes in mm)."""
    for flag, given, why in (("--spacing", args.spacing, "the headers give the spacing"),
                             ("--data-dir", args.data_dir, "--input names the cases"),
                             ("--patients", args.patients != "validation", "every case is scored"),
                             ("--strict", args.strict, "a scan that cannot be read is an error already")):
        if given:
            raise UserError(f"{flag} is for a dataset folder of 2D slices, not --input's scans ({why}); drop {flag}")
    path = Path(args.input)
    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    refuse_zip(path)
    labels = parse_labels(args.labels)
    cases = find_cases(path) if path.is_dir() else []
    if not cases:
        raise UserError(f"{path}: no NIfTI or DICOM case (a folder with a file or series named flair, and a mask)")
    normalization = record.get("normalization", "volume")
    volumes, warned, unlabeled = [], set(), {}
    for name, files in cases:
        if "seg" not in files:
            raise UserError(f"{path / name if path.name != name else path}: no mask (a file or folder named seg, mask "
                            "or label); evaluate needs one per case, predict needs none")
        case = load_case(name, files, labels)
        warn_filled(case, warned)
        if case.mask_values and not case.truth.any():  # labelled, but with none of --labels
            unlabeled[name] = case.mask_values
        volumes.append(input_volume(name, case.images, case.truth, normalization=normalization,
                                    image_size=record["image_size"], spacing=case.spacing))
    tumors = sum(bool(v.masks.any()) for v in volumes)
    check_labels_found(unlabeled, tumors, args.labels, path)
    print(f"{path}: {counted(len(volumes), 'case')}, {tumors} with tumor (labels: {args.labels})")
    return volumes
