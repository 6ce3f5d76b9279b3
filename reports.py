"""Metrics -> reports: the tables and pictures a run leaves behind, all rendered headless.

Every function writes into a run (or evaluation) folder and returns the path it wrote:

- ``curves.png``: training and validation loss, validation Dice per volume, per epoch;
- ``dice_per_volume.png``: per-patient Dice, sorted, with mean and median lines;
- ``overlays/<patient>.png``: each validation patient's slices where the truth or the prediction
  has tumor, FLAIR with the truth outlined in green and the prediction in red, and the slice's
  Dice (or "false positive only", "tumor missed") in its caption;
- ``per_patient.csv``: Dice, IoU, HD95, true and predicted tumor area, slice counts, and how much
  brighter the true lesion is on FLAIR than the brain around it (``metrics.lesion_contrast``);
- ``summary.md``: config, metrics, timing, environment, links to the images, best and worst patients.

``compare_runs`` pairs the per-patient Dice of two runs (the ``compare`` command).

Charts are bare ``matplotlib.figure.Figure`` objects, which render with the Agg canvas: no
display, no pyplot state shared between calls; the overlay grids are tiled in numpy.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
import pandas as pd
import torch
from scipy import ndimage

from data_files import institution
from libraries import UserError, counted, first_names, write_csv, write_image, write_text
from metrics import dice_from_counts

if TYPE_CHECKING:
    from matplotlib.figure import Figure

TRUTH_COLOR = (0, 200, 0)  # green
PRED_COLOR = (255, 0, 0)  # red


def _figure(figsize: tuple[float, float], layout: str | None = "constrained") -> Figure:
    """A bare Figure, by default with constrained layout. matplotlib is imported here, not at the
    top: it takes 0.7 s, which every command (and every one-line error) paid at start, charts or not."""
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, layout=layout)


def write_history(run_dir: Path, history: list[dict]) -> None:
    """history.csv (one row per epoch) and curves.png, rewritten after every epoch."""
    write_csv(run_dir / "history.csv", pd.DataFrame(history))
    plot_curves(run_dir, history)


def validation_row(val_loss: float | None, metrics: dict) -> dict:
    """The validation columns of history.csv for one epoch."""
    variants = metrics["postprocessing"]
    return {"val_loss": val_loss, "val_dice_per_volume_mean": metrics["dice_per_volume_mean"],
            "val_dice_per_volume_median": metrics["dice_per_volume_median"], "val_dice_global": metrics["dice_global"],
            **{f"val_dice_per_volume_mean_{'raw' if name == 'none' else name}": v["dice_per_volume_mean"]
               for name, v in variants.items()}}


def seconds_left(rows: Sequence[dict], val_slices: int, epochs_left: int, validations_left: int) -> float:
    """The time the remaining epochs should take, from ``rows`` (the history rows this process has
    trained so far): their mean training phase times ``epochs_left``, plus their mean validation
    phase times ``validations_left``. A validation not timed yet (``--val-every``) counts as none."""
    val = [val_slices / row["val_images_per_second"] for row in rows if "val_images_per_second" in row]
    train = [row["seconds"] - (val_slices / row["val_images_per_second"] if "val_images_per_second" in row else 0.0)
             for row in rows]
    return float(np.mean(train)) * epochs_left + (float(np.mean(val)) * validations_left if val else 0.0)


def training_time(history: Sequence[dict], elapsed: float, epochs_here: int) -> tuple[dict, str]:
    """How long a run trained, for summary.md and the closing line: ``elapsed`` seconds in this
    process, which ran the last ``epochs_here`` of the ``history`` rows. A resumed run's earlier
    epochs ran in other processes, so its total is the sum of every epoch's time instead."""
    if epochs_here >= len(history):
        return {"training minutes": elapsed / 60}, f"{elapsed / 60:.1f} min"
    total = sum(row["seconds"] for row in history) / 60
    return ({"training minutes, all epochs": total, "training minutes, since the resume": elapsed / 60},
            f"{total:.1f} min, {elapsed / 60:.1f} of them since the resume")


def format_duration(seconds: float) -> str:
    """'45 s' under a minute and a half, else whole minutes ('43 min')."""
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def epoch_line(epoch: int, epochs: int, row: dict, best: bool, left: float | None = None) -> str:
    """The line printed after an epoch; ``left``: the seconds the remaining epochs should take."""
    line = f"epoch {epoch}/{epochs}  train loss {row['train_loss']:.4f}"
    if "val_loss" in row:
        others = ", ".join(f"{k.removeprefix('val_dice_per_volume_mean_')} {v:.4f}" for k, v in row.items()
                           if k.startswith("val_dice_per_volume_mean_"))
        line += (f"  val loss {row['val_loss']:.4f}  val Dice/volume {row['val_dice_per_volume_mean']:.4f} "
                 f"(median {row['val_dice_per_volume_median']:.4f}; {others})")
    line += f"  {row['seconds']:.0f}s ({row['train_images_per_second']:.1f}"
    line += f" / {row['val_images_per_second']:.1f} img/s)" if "val_images_per_second" in row else " img/s)"
    line += "  *best*" if best else ""
    return line + (f"  ~{format_duration(left)} left" if left is not None and epoch < epochs else "")


def plot_curves(out_dir: Path, history: Sequence[dict]) -> Path:
    """curves.png: losses (left) and validation Dice per volume (right), per epoch; the training
    loss alone for a run without validation patients (--split none)."""
    frame = pd.DataFrame(history)
    validated = "val_loss" in frame
    val = frame.dropna(subset=["val_loss"]) if validated else frame  # --val-every skips epochs
    # Fixed margins, not constrained layout: this chart is redrawn after every epoch, and laying it
    # out took about 40% of its time (0.50 s a call against 0.31 s); its labels never change.
    fig = _figure(figsize=(10 if validated else 5, 4), layout=None)
    fig.subplots_adjust(left=0.08 if validated else 0.14, right=0.98, bottom=0.12, top=0.92, wspace=0.22)
    loss_ax, dice_ax = fig.subplots(1, 2) if validated else (fig.subplots(1, 1), None)
    loss_ax.plot(frame["epoch"], frame["train_loss"], "o-", label="train")
    if validated:
        loss_ax.plot(val["epoch"], val["val_loss"], "o-", label="validation")
    loss_ax.set(xlabel="epoch", ylabel="Dice + BCE loss", title="Loss")
    loss_ax.legend()
    if validated:
        dice_ax.plot(val["epoch"], val["val_dice_per_volume_mean"], "o-", label="mean")
        dice_ax.plot(val["epoch"], val["val_dice_per_volume_median"], "o-", label="median")
        dice_ax.set(xlabel="epoch", ylabel="Dice", ylim=(0, 1), title="Validation Dice per volume")
        dice_ax.legend()
    path = out_dir / "curves.png"
    fig.savefig(path, dpi=100)
    return path


def write_per_patient_csv(out_dir: Path, metrics: dict, clinical: pd.DataFrame | None = None) -> Path:
    """per_patient.csv: one row per validation patient, joined with data.csv's clinical fields
    (by patient ID, TCGA_XX_NNNN) when that table is given; missing cells stay empty."""
    frame = pd.DataFrame(metrics["per_patient"]).rename(
        columns={"tumor_pixels": "true_area_px", "predicted_pixels": "pred_area_px"}
    )
    columns = ["patient", "dice", "iou", "hd95_px", "hd95_mm", "true_area_px", "pred_area_px",
               "slices", "tumor_slices", "flair_contrast"]
    frame = frame[[c for c in columns if c in frame]]
    frame.insert(1, "institution", frame["patient"].map(institution))
    if trained := metrics.get("scored_patients_trained_on_names"):
        frame.insert(2, "in_training", frame["patient"].isin(trained))
    if clinical is not None:
        ids = frame["patient"].map(lambda name: "_".join(name.split("_")[:3]))
        frame = pd.concat([frame, clinical.reindex(ids).reset_index(drop=True)], axis=1)
    path = out_dir / "per_patient.csv"
    write_csv(path, frame)
    return path


def plot_dice_per_volume(out_dir: Path, metrics: dict) -> Path:
    """dice_per_volume.png: horizontal bars of per-patient Dice, worst at the bottom."""
    rows = sorted(metrics["per_patient"], key=lambda r: r["dice"])
    fig = _figure(figsize=(8, 1.5 + 0.3 * len(rows)))
    ax = fig.subplots()
    ax.barh([r["patient"] for r in rows], [r["dice"] for r in rows], color="tab:blue")
    mean, median = metrics["dice_per_volume_mean"], metrics["dice_per_volume_median"]
    ax.axvline(mean, color="tab:red", linestyle="-", label=f"mean {mean:.3f}")
    ax.axvline(median, color="tab:orange", linestyle="--", label=f"median {median:.3f}")
    ax.set(xlim=(0, 1), xlabel="Dice per volume (3D)", title=f"{counted(len(rows), 'patient')}, post-processing: "
           f"{metrics.get('postprocess', 'none')}")
    ax.legend(loc="lower right")
    path = out_dir / "dice_per_volume.png"
    fig.savefig(path, dpi=100)
    return path


def _outline(mask: np.ndarray) -> np.ndarray:
    """The border pixels of a 2D bool mask (mask minus its erosion)."""
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def _display(flair: np.ndarray) -> np.ndarray:
    """A FLAIR slice stretched to uint8 between its 1st and 99th percentile, as (3, H, W)."""
    lo, hi = np.percentile(flair, (1, 99)) if flair.any() else (0, 1)
    gray = np.clip((flair.astype(np.float32) - lo) / max(hi - lo, 1e-6) * 255, 0, 255).astype(np.uint8)
    return np.repeat(gray[None], 3, axis=0)


def overlay_slice(flair: np.ndarray, truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8: FLAIR in gray, truth outlined in green, prediction outlined in red."""
    # Imported here: torchvision.utils pulls in torch._dynamo, 1.7 s that every command (and every
    # one-line error) would otherwise pay at start, though only the overlays use it.
    from torchvision.utils import draw_segmentation_masks

    outlines = torch.from_numpy(np.stack([_outline(truth), _outline(pred)]))
    drawn = draw_segmentation_masks(
        torch.from_numpy(_display(flair)), outlines, alpha=1.0, colors=[TRUTH_COLOR, PRED_COLOR]
    )
    return drawn.permute(1, 2, 0).numpy()


def write_overlays(
    out_dir: Path,
    volumes: dict[int, tuple[np.ndarray, np.ndarray | None]],
    flair: dict[int, np.ndarray],
    slice_numbers: dict[int, Sequence[int | str]],
    patients: Sequence[str],
    columns: int = 6,
) -> list[Path]:
    """overlays/<patient>.png for every patient: a grid of every slice where the truth or the
    prediction has tumor, so that false positives on slices without tumor show too.

    ``volumes`` maps patient index to (pred, truth) (D, H, W) bool volumes (truth None where it is
    unknown: predict), ``flair`` to the (D, H, W) FLAIR channel, ``slice_numbers`` to the slice
    number (or name) of each position. The grid is tiled in numpy and captioned with OpenCV: a
    matplotlib figure of 20 panels took seconds a patient.
    """
    folder = out_dir / "overlays"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for p, (pred, truth) in volumes.items():
        known = truth is not None
        truth = truth if known else np.zeros_like(pred)
        picked = np.flatnonzero(truth.any(axis=(1, 2)) | pred.any(axis=(1, 2)))
        tiles = []
        for j in picked:
            tp = int((pred[j] & truth[j]).sum())
            dice = dice_from_counts(tp, int(pred[j].sum()) - tp, int(truth[j].sum()) - tp)
            label = f"{int(pred[j].sum())} px" if not known else "false positive only" if not truth[j].any() else (
                "tumor missed" if not pred[j].any() else f"Dice {dice:.2f}")
            tiles.append(_captioned(overlay_slice(flair[p][j], truth[j], pred[j]), f"slice {slice_numbers[p][j]}: {label}"))
        tp = int((pred & truth).sum())
        volume_dice = dice_from_counts(tp, int(pred.sum()) - tp, int(truth.sum()) - tp)
        title = (f"{patients[p]}: Dice per volume {volume_dice:.3f} (green: truth, red: prediction)" if known
                 else f"{patients[p]}: {counted(len(picked), 'slice')} with predicted tumor (red)")
        grid = _tiled(tiles, columns) if tiles else np.zeros((64, 6 * 64, 3), np.uint8)
        width = max(grid.shape[1], 8 * len(title))  # room for the title over a narrow grid
        grid = np.pad(grid, ((0, 0), (0, width - grid.shape[1]), (0, 0)))
        path = folder / f"{patients[p]}.png"
        write_image(path, np.vstack([_caption(title, width), grid])[..., ::-1])
        paths.append(path)
    return paths


def _caption(text: str, width: int, height: int = 20) -> np.ndarray:
    """(height, width, 3) uint8: white text on black."""
    strip = np.zeros((height, width, 3), np.uint8)
    cv2.putText(strip, text, (4, height - 6), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA)
    return strip


def _captioned(tile: np.ndarray, text: str) -> np.ndarray:
    return np.vstack([_caption(text, tile.shape[1]), tile])


def _tiled(tiles: list[np.ndarray], columns: int) -> np.ndarray:
    """Tiles of one size in rows of ``columns``, the last row padded with black, 2 px apart."""
    h, w = tiles[0].shape[:2]
    columns = min(columns, len(tiles))
    rows = math.ceil(len(tiles) / columns)
    grid = np.zeros((rows * (h + 2), columns * (w + 2), 3), np.uint8)
    for k, tile in enumerate(tiles):
        r, c = divmod(k, columns)
        grid[r * (h + 2): r * (h + 2) + h, c * (w + 2): c * (w + 2) + w] = tile
    return grid


def _table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def _fmt(value: object, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def not_held_out(trained: Sequence[str], scored: int) -> str:
    """The sentence that says which of ``scored`` patients were used to train the model scored."""
    return (f"{len(trained)} of the {counted(scored, 'patient')} scored {'was' if len(trained) == 1 else 'were'} "
            f"used to train this model ({first_names(trained)}); their scores are not held out")


def write_summary(
    out_dir: Path,
    metrics: dict,
    *,
    title: str,
    config: dict,
    environment: dict,
    timing: dict,
    images: Sequence[Path],
) -> Path:
    """summary.md: what was run, what it scored, how long it took, where the pictures are."""
    keys = ("dice_per_volume_mean", "dice_per_volume_median", "iou_per_volume_mean", "dice_global",
            "iou_global", "dice_per_slice_tumor_mean", "precision", "recall", "hd95_px_mean")
    rows_by_dice = sorted(metrics["per_patient"], key=lambda r: r["dice"])
    lines = [f"# {title}", ""]
    if metrics.get("synthetic_data"):
        lines += ["**Synthetic data**: these numbers show that the code works, not how it does on MRI.", ""]
    if trained := metrics.get("scored_patients_trained_on_names"):
        lines += [f"**Not held out**: {not_held_out(trained, metrics['patients'])} (`in_training` in "
                  "per_patient.csv).", ""]
    lines += ["## Metrics", "",
              f"{counted(metrics['patients'], 'patient')}, {counted(metrics['slices'], 'slice')} "
              f"({metrics['tumor_slices']:,} with tumor); "
              f"post-processing `{metrics.get('postprocess', 'none')}`, "
              f"threshold {metrics.get('threshold', 0.5):g}.", ""]
    lines += _table([(k, _fmt(metrics.get(k))) for k in keys], ("metric", "value"))
    lines += ["", "Dice per volume by post-processing:", ""]
    lines += _table([(name, _fmt(v["dice_per_volume_mean"]), _fmt(v["dice_per_volume_median"]))
                     for name, v in metrics.get("postprocessing", {}).items()], ("post-processing", "mean", "median"))
    if metrics.get("postprocessing"):
        sites = by_institution(dice_table(metrics))
        names = [c.removeprefix("dice_") if c != "dice" else "raw" for c in sites.columns[2:]]
        lines += ["", "Mean Dice per volume by institution (the TCGA tissue source site in the patient's name), "
                  "and the mean FLAIR contrast of its lesions (flair_contrast in per_patient.csv):", ""]
        lines += _table([(r[0], r[1], *(_fmt(v) for v in r[2:])) for r in sites.itertuples(index=False)],
                        ("institution", "patients", *names))
    lines += ["", "## Patients", "", "Worst and best by Dice per volume:", ""]
    picked = rows_by_dice[:3] + [r for r in rows_by_dice[-3:] if r not in rows_by_dice[:3]]
    lines += _table([(r["patient"], _fmt(r["dice"]), _fmt(r.get("hd95_px"), 2), r["slices"]) for r in picked],
                    ("patient", "Dice", "HD95 (px)", "slices"))
    lines += ["", "All patients: [per_patient.csv](per_patient.csv)", "", "## Images", ""]
    lines += [f"- [{p.relative_to(out_dir)}]({p.relative_to(out_dir).as_posix()})" for p in images]
    lines += ["", "## Timing", ""]
    lines += _table([(k, _fmt(v, 2)) for k, v in timing.items()], ("what", "value"))
    lines += ["", "## Environment", ""]
    lines += _table(list(environment.items()), ("what", "value"))
    lines += ["", "## Config", ""]
    lines += _table([(k, f"`{v}`") for k, v in config.items() if not isinstance(v, (dict, list))],
                    ("setting", "value"))
    path = out_dir / "summary.md"
    write_text(path, "\n".join(lines) + "\n")
    return path


def write_reports(
    out_dir: Path,
    metrics: dict,
    *,
    volumes: dict[int, tuple[np.ndarray, np.ndarray]],
    scans: Sequence[object],
    title: str,
    config: dict,
    environment: dict,
    timing: dict,
    curves: Path | None = None,
    clinical: pd.DataFrame | None = None,
) -> list[Path]:
    """Write every report of an evaluated set.

    ``scans`` are the PatientVolumes that were scored, in the order whose indices key ``volumes``.
    ``curves``: a training run's curves.png, drawn after its last epoch, for summary.md to show.
    """
    flair = {p: v.unpadded(v.images[..., 1]) for p, v in enumerate(scans)}
    slice_numbers = {p: v.slice_numbers for p, v in enumerate(scans)}
    images = [curves] if curves else []
    images.append(plot_dice_per_volume(out_dir, metrics))
    images += write_overlays(out_dir, volumes, flair, slice_numbers, [v.name for v in scans])
    csv_path = write_per_patient_csv(out_dir, metrics, clinical)
    summary = write_summary(out_dir, metrics, title=title, config=config, environment=environment,
                            timing=timing, images=images)
    return [*images, csv_path, summary]


# ---------------------------------------------------------------------------------------------
# Comparing two runs on the same patients
# ---------------------------------------------------------------------------------------------

def score_column(postprocess: str) -> str:
    """The column of ``patient_scores`` that holds Dice with ``postprocess``: dice, dice_lcc, ..."""
    return "dice" if postprocess == "none" else f"dice_{postprocess}"


def scored_rules(frame: pd.DataFrame) -> list[str]:
    """The post-processing rules whose Dice ``frame`` holds (score_column's inverse): none, lcc, ..."""
    return ["none" if c == "dice" else c.removeprefix("dice_") for c in frame.columns if c.startswith("dice")]


def _scores_from_csv(path: Path) -> pd.DataFrame:
    try:
        frame = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not a readable CSV ({exc}); pass a cv_patients.csv written by 'cv'") from exc
    if not {"patient", "dice"} <= set(frame.columns):
        raise UserError(f"{path}: no patient and dice columns; pass a cv_patients.csv written by 'cv'")
    return frame[["patient", *(c for c in frame.columns if c == "dice" or c.startswith("dice_"))]]


def dice_table(metrics: dict) -> pd.DataFrame:
    """Columns patient, dice, dice_lcc, ... (one per post-processing) of an evaluation's metrics, then
    flair_contrast where its per-patient rows have it, and in_training where some patients scored
    were used to train the model."""
    variants = metrics["postprocessing"]
    none = variants["none"]["dice_per_patient"]
    table = pd.DataFrame({"patient": list(none), **{
        score_column(name): [v["dice_per_patient"][p] for p in none] for name, v in variants.items()}})
    contrast = {r["patient"]: r["flair_contrast"] for r in metrics.get("per_patient", []) if "flair_contrast" in r}
    if contrast:
        table["flair_contrast"] = table["patient"].map(contrast).astype(float)
    if trained := metrics.get("scored_patients_trained_on_names"):
        table["in_training"] = table["patient"].isin(trained)
    return table


def by_institution(scores: pd.DataFrame) -> pd.DataFrame:
    """Mean Dice per volume of each institution's patients: columns institution, patients, and the
    mean of each dice* column of ``scores`` (a ``patient_scores`` or ``dice_table`` frame) and of its
    flair_contrast where it has one, one row per institution in alphabetical order, then one for all
    patients.

    The dataset's patients come from five institutions (``data_loaders.institution``) whose scanners
    and protocols differ; a model that generalizes poorly shows it as a gap between them. Fainter
    lesions (a lower mean flair_contrast) scored lower too in our cross-validation (docs/results.md)."""
    columns = [c for c in scores.columns if c.startswith("dice") or c == "flair_contrast"]
    grouped = scores.assign(institution=scores["patient"].map(institution)).groupby("institution", sort=True)
    table = grouped[columns].mean().reset_index()
    table.insert(1, "patients", grouped.size().to_numpy())
    overall = pd.DataFrame([{"institution": "all", "patients": len(scores), **scores[columns].mean().to_dict()}])
    return pd.concat([table, overall], ignore_index=True)


def _scores_from_metrics(path: Path) -> pd.DataFrame:
    try:
        return dice_table(json.loads(path.read_text()))
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise UserError(f"{path}: no per-patient Dice in it; pass a cv folder, an evaluation folder or a "
                        "run folder with validation patients (score a --split none run with 'engine.py "
                        "evaluate')") from exc


def patient_scores(path: Path) -> tuple[pd.DataFrame, str]:
    """Held-out Dice per patient, for each post-processing (columns patient, dice, dice_lcc, ...), and where
    they were read: a cv folder's cv_patients.csv (or, for a cv still running or interrupted, the
    metrics.json of each fold it finished), a run or evaluation folder's metrics.json, or either file."""
    if path.is_dir():
        if (path / "cv_patients.csv").is_file():
            path = path / "cv_patients.csv"
        elif (path / "metrics.json").is_file():
            path = path / "metrics.json"
        elif folds := sorted((d for d in path.iterdir() if re.fullmatch(r"fold-\d+", d.name)
                              and (d / "metrics.json").is_file()), key=lambda d: int(d.name[5:])):
            frame = pd.concat([_scores_from_metrics(d / "metrics.json") for d in folds], ignore_index=True)
            return _scored_once(frame, path, f"no cv_patients.csv; its finished folds: "
                                             f"{', '.join(d.name for d in folds)}")
        else:
            raise UserError(f"{path}: holds no cv_patients.csv, metrics.json or finished fold; pass a cv, run "
                            "or evaluation folder")
    if not path.is_file():
        raise UserError(f"{path}: not found; pass a cv folder, a run or evaluation folder, or its "
                        "cv_patients.csv or metrics.json")
    frame = _scores_from_csv(path) if path.suffix == ".csv" else _scores_from_metrics(path)
    return _scored_once(frame, path, path.name)


def _scored_once(frame: pd.DataFrame, path: Path, source: str) -> tuple[pd.DataFrame, str]:
    """``frame`` and where it was read, refused if a patient is scored twice: pairing by patient
    would count that patient twice (2 x 2 rows) and shift the mean and its interval."""
    if (twice := frame.loc[frame["patient"].duplicated(), "patient"].unique()).size:
        where = "" if source == path.name else f" ({source})"
        raise UserError(f"{path}{where}: {', '.join(twice)} scored twice; pass the folds of one split, or "
                        "one run's cv_patients.csv or metrics.json")
    return frame, source


def paired_difference(
    a: np.ndarray, b: np.ndarray, *, resamples: int = 10_000, seed: int = 0, tie: float = 0.005
) -> dict:
    """Mean of b - a over paired patients, with a 95% percentile-bootstrap interval.

    Patients, not slices, are resampled with replacement, because a patient is the unit that was
    held out. ``better``/``worse`` count patients whose Dice moved by more than ``tie``.
    """
    diff = np.asarray(b, np.float64) - np.asarray(a, np.float64)
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(resamples, len(diff)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {"patients": len(diff), "mean_a": float(np.mean(a)), "mean_b": float(np.mean(b)),
            "median_a": float(np.median(a)), "median_b": float(np.median(b)),
            "difference": float(diff.mean()), "ci95_low": float(low), "ci95_high": float(high),
            "better": int((diff > tie).sum()), "worse": int((diff < -tie).sum())}


def compare_runs(
    a: pd.DataFrame, b: pd.DataFrame, *, resamples: int = 10_000, seed: int = 0,
    pairs: Sequence[tuple[str, str]] | None = None, per_institution: bool = False,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Pair two ``patient_scores`` tables by patient; return the summary (one row per compared
    post-processing: ``paired_difference``, with institution 'all') and the paired per-patient table.

    ``pairs`` lists (post-processing of A, post-processing of B) to compare; by default every
    post-processing both tables hold, each against itself. ``per_institution`` adds, after each
    post-processing's row, one row per institution (``data_loaders.institution``) of its patients.
    """
    # Every column but the patient gets its side's suffix, also one that only one run has
    # (merge's suffixes mark only the columns both have: an older run lacks the newer rules).
    paired = a.add_suffix("_a").rename(columns={"patient_a": "patient"}).merge(
        b.add_suffix("_b").rename(columns={"patient_b": "patient"}), on="patient")
    if paired.empty:
        raise UserError("the two runs scored no patient in common; compare runs that held out the same patients")
    if pairs is None:
        pairs = [(name, name) for name in scored_rules(a) if name in scored_rules(b)]
    for name_a, name_b in pairs:
        for name, frame, side in ((name_a, a, "A"), (name_b, b, "B")):
            if score_column(name) not in frame.columns:
                raise UserError(f"run {side} has no Dice with post-processing {name!r}; it has "
                                f"{', '.join(scored_rules(frame))}")
    groups = [("all", paired)]
    if per_institution:
        groups += list(paired.groupby(paired["patient"].map(institution), sort=True))
    summary = pd.DataFrame([
        {"postprocess": name_a if name_a == name_b else f"{name_a} -> {name_b}", "institution": site,
         **paired_difference(group[f"{score_column(name_a)}_a"].to_numpy(),
                             group[f"{score_column(name_b)}_b"].to_numpy(), resamples=resamples, seed=seed)}
        for name_a, name_b in pairs for site, group in groups
    ])
    return summary, paired.sort_values("patient", ignore_index=True)


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
    """The end-of-run table: every metric of the chosen post-processing, then each reported rule's Dice."""
    lines = [title, f"  {counted(metrics['patients'], 'patient')}, {counted(metrics['slices'], 'slice')} "
             f"({metrics['tumor_slices']:,} with tumor); post-processing: {metrics['postprocess']}, "
             f"threshold: {metrics['threshold']:g}"]
    for key, label in METRIC_LABELS:
        value = metrics[key]
        lines.append(f"  {label:<28} {'n/a' if value is None else f'{value:.4f}'}")
    hd = metrics["hd95_px_mean"]
    lines.append(f"  {'HD95 per volume, mean (px)':<28} {'n/a' if hd is None else f'{hd:.2f}'}"
                 + (f"  ({metrics['hd95_undefined_patients']} undefined)" if metrics["hd95_undefined_patients"] else ""))
    if metrics.get("hd95_mm_mean") is not None:
        lines.append(f"  {'HD95 per volume, mean (mm)':<28} {metrics['hd95_mm_mean']:.2f}")
    lines.append("  Dice per volume mean / median, by post-processing (patients whose tumor it threw away):")
    width = max(map(len, metrics["postprocessing"]))
    for name, v in metrics["postprocessing"].items():
        lost = v["tumor_lost_patients"]
        lines.append(f"    {name:<{width}} {v['dice_per_volume_mean']:.4f} / {v['dice_per_volume_median']:.4f}"
                     + (f"  ({len(lost)}: {', '.join(lost)})" if lost else ""))
    return "\n".join(lines)
