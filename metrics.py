"""Predictions -> numbers: evaluation metrics from accumulated counts, 3D post-processing of
predicted masks, and surface distances.

Metrics are computed from pixel counts accumulated over the whole evaluation set, per patient
and per slice, never as averages of per-batch means, so they do not depend on batch size.

The empty case: when a ratio's denominator is zero (Dice or IoU with an empty prediction and an
empty truth; precision with no predicted pixel; recall with no tumor pixel), the score is 1.0 if
prediction and truth are both empty (perfect agreement that there is no tumor) and 0.0 otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from scipy import ndimage

from libraries import UserError

def ratio(num: float, den: float, both_empty: bool) -> float:
    """num / den, with a zero denominator scored 1.0 if both masks are empty, else 0.0."""
    if den == 0:
        return 1.0 if both_empty else 0.0
    return float(num / den)  # a Python float, also for numpy inputs: checkpoints hold plain types


def dice_from_counts(tp: float, fp: float, fn: float) -> float:
    """Dice = 2TP / (2TP + FP + FN); 1.0 when prediction and truth are both empty."""
    return ratio(2 * tp, 2 * tp + fp + fn, both_empty=tp + fp + fn == 0)


def iou_from_counts(tp: float, fp: float, fn: float) -> float:
    """IoU (Jaccard) = TP / (TP + FP + FN); 1.0 when prediction and truth are both empty."""
    return ratio(tp, tp + fp + fn, both_empty=tp + fp + fn == 0)


class SegmentationMeter:
    """Accumulates pixel counts per patient and per slice; computes every metric once at the end.

    ``update`` takes binary predictions and truths of shape (N, 1, H, W) and the patient index of
    each sample. Counts are kept per patient (3D, over all of its slices) and summed for the
    global scores, so the result is the same for any batch size or order.
    """

    def __init__(self, patients: Sequence[str]) -> None:
        self.patients = list(patients)
        # Per patient: [tp, fp, fn, slices, slices with tumor] as int64 (up to ~10^7 pixels a volume).
        self.counts = np.zeros((len(self.patients), 5), np.int64)
        self.slice_dice_sum = 0.0  # sum of per-slice Dice over slices whose truth has tumor
        self.tumor_slices = 0

    def update(self, pred: torch.Tensor, truth: torch.Tensor, patient: torch.Tensor) -> None:
        """Add a batch. pred, truth: (N, 1, H, W) bool or {0, 1}; patient: (N,) int indices."""
        pred, truth = pred.bool().flatten(1), truth.bool().flatten(1)
        tp = (pred & truth).sum(1)
        fp = (pred & ~truth).sum(1)
        fn = (~pred & truth).sum(1)
        stats = torch.stack([tp, fp, fn, torch.ones_like(tp), ((tp + fn) > 0).long()], 1)
        stats = stats.cpu().numpy().astype(np.int64)
        np.add.at(self.counts, patient.cpu().numpy(), stats)
        has_tumor = (tp + fn) > 0
        if has_tumor.any():
            tp_t, fp_t, fn_t = (x[has_tumor].double() for x in (tp, fp, fn))
            self.slice_dice_sum += float((2 * tp_t / (2 * tp_t + fp_t + fn_t)).sum())
            self.tumor_slices += int(has_tumor.sum())

    def compute(self) -> dict:
        """All metrics as a JSON-ready dict; None where no slice (or no tumor slice) was seen.

        Patients with no slice seen are left out of ``per_patient`` and of the per-volume means.
        """
        seen = self.counts[:, 3] > 0
        per_patient = [
            {
                "patient": name,
                "dice": dice_from_counts(*map(int, c[:3])),
                "iou": iou_from_counts(*map(int, c[:3])),
                "slices": int(c[3]),
                "tumor_slices": int(c[4]),
                "tumor_pixels": int(c[0] + c[2]),
                "predicted_pixels": int(c[0] + c[1]),
            }
            for name, c, s in zip(self.patients, self.counts, seen)
            if s
        ]
        tp, fp, fn = (int(x) for x in self.counts[:, :3].sum(0))
        dices = [p["dice"] for p in per_patient]
        ious = [p["iou"] for p in per_patient]
        return {
            "dice_per_volume_mean": float(np.mean(dices)) if dices else None,
            "dice_per_volume_median": float(np.median(dices)) if dices else None,
            "dice_global": dice_from_counts(tp, fp, fn),
            "iou_per_volume_mean": float(np.mean(ious)) if ious else None,
            "iou_global": iou_from_counts(tp, fp, fn),
            "dice_per_slice_tumor_mean": (
                self.slice_dice_sum / self.tumor_slices if self.tumor_slices else None
            ),
            "precision": ratio(tp, tp + fp, both_empty=tp + fp + fn == 0),
            "recall": ratio(tp, tp + fn, both_empty=tp + fp + fn == 0),
            "patients": len(per_patient),
            "slices": int(self.counts[:, 3].sum()),
            "tumor_slices": self.tumor_slices,
            "per_patient": per_patient,
        }


# ---------------------------------------------------------------------------------------------
# Post-processing and surface distances on whole patient volumes
# ---------------------------------------------------------------------------------------------


def _keep_best_component(
    pred: np.ndarray, score: Callable[[np.ndarray, int], np.ndarray], fraction: float | None = None,
    floor: float = np.inf,
) -> np.ndarray:
    """Keep the 3D connected component (6-connectivity) of ``pred`` whose ``score`` is highest, or
    with ``fraction``, every component scoring at least ``fraction`` times the highest score or at
    least ``floor``.

    ``score(labels, n)`` returns one value per label 0..n (label 0, the background, is ignored).
    An empty volume stays empty; ties keep the component with the lowest label.
    """
    labels, n = ndimage.label(pred)
    if n <= 1:
        return pred.astype(bool)
    scores = np.asarray(score(labels, n), dtype=np.float64)
    scores[0] = -np.inf  # background
    if fraction is None:
        return labels == int(scores.argmax())
    return ((scores >= fraction * scores.max()) | (scores >= floor))[labels]


def largest_component_3d(volume: np.ndarray) -> np.ndarray:
    """Keep only the largest 3D connected component (6-connectivity) of a (D, H, W) bool volume.

    A low-grade glioma is usually one lesion, so small islands away from it are mostly false
    positives. An empty volume stays empty; ties keep the component with the lowest label.
    """
    return _keep_best_component(volume, lambda labels, n: np.bincount(labels.ravel(), minlength=n + 1))


# The mass (voxels times probability) inside the brain at which brain_components_3d keeps a
# component whatever outweighs it, on slices of 256 x 256 pixels: about half the smallest tumor
# among the 66 subset patients (1,870 pixels, TCGA_DU_8165; docs/results.md).
TUMOR_FLOOR_256 = 1000.0


def brain_components_3d(pred: np.ndarray, prob: np.ndarray, inside: np.ndarray, fraction: float = 0.5,
                        floor: float | None = None) -> np.ndarray:
    """Keep every 3D component whose probability mass inside the brain (``inside``: away from the
    scalp) is at least ``fraction`` of the heaviest one's, or at least ``floor``; if no component
    reaches inside, weigh the whole mass instead, so the rule never empties a prediction that had
    something to keep.

    False positives on the scalp rim of the top-of-head slices, or in the neck, weigh nothing
    here, however large; counting only the mass inside (rather than rejecting components mostly
    outside) keeps a tumor merged with such a rim. A false component inside the brain that
    outweighs the tumor would make a one-component rule (``fraction=1``) throw the tumor away; a
    rival of comparable mass is kept beside it instead, and a component of tumor size (``floor``,
    by default TUMOR_FLOOR_256 scaled with the slices' pixel count) is kept beside any rival, since
    no ranking can tell a confident false component from a confident tumor. Specks are dropped.

    Shape:
        pred, prob, inside: (D, H, W). Returns a (D, H, W) bool array.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if floor is None:
        floor = TUMOR_FLOOR_256 * pred.shape[-2] * pred.shape[-1] / 256**2
    return _keep_best_component(pred, _mass_inside(prob, inside), fraction, floor)


def _mass_inside(prob: np.ndarray, inside: np.ndarray) -> Callable[[np.ndarray, int], np.ndarray]:
    """Component scores for the brain rules: probability mass inside the brain, or the whole
    mass where no component reaches inside."""
    weights = prob.astype(np.float64).ravel()
    inside_weights = weights * inside.ravel()

    def score(labels: np.ndarray, n: int) -> np.ndarray:
        flat = labels.ravel()
        inner = np.bincount(flat, inside_weights, minlength=n + 1)
        return inner if inner[1:].max() > 0 else np.bincount(flat, weights, minlength=n + 1)

    return score


def lesion_contrast(flair: np.ndarray, truth: np.ndarray, inside: np.ndarray) -> float | None:
    """How much brighter the true lesion is on FLAIR than the brain around it, in that brain's
    standard deviations: (mean over ``truth`` - median over the rest of ``inside``) / its std.

    A property of the scan, not of a model: a change of brightness and contrast (x -> a x + b, a > 0)
    leaves it as it is, so no per-volume normalization moves it. On the 36 subset patients the
    institutions average 1.05 to 1.9, and it goes with Dice (docs/results.md). None where the
    patient has no tumor or nothing of the brain is left around it, or that brain is uniform.
    """
    brain = inside & ~truth
    if not truth.any() or not brain.any():
        return None
    values = flair[brain].astype(np.float64)
    spread = values.std()
    if spread == 0:
        return None
    return float((flair[truth].astype(np.float64).mean() - np.median(values)) / spread)


def _surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with at least one 6-neighbour outside it (the object's border)."""
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def hd95(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float] | None = None) -> float | None:
    """95th-percentile symmetric Hausdorff distance between two (D, H, W) bool volumes.

    The distances from every border voxel of each mask to the nearest border voxel of the other
    are pooled, and their 95th percentile is returned (the medpy definition), in voxels or, with
    ``spacing`` = (dz, dy, dx), in the spacing's unit. Both empty: 0.0. One empty: None, since no
    distance exists; such patients are counted apart and left out of the mean.
    """
    pred, truth = pred.astype(bool), truth.astype(bool)
    if not pred.any() and not truth.any():
        return 0.0
    if not pred.any() or not truth.any():
        return None
    # Distances between the two borders never leave the box that holds both masks: crop to it.
    idx = np.argwhere(pred | truth)
    lo, hi = idx.min(0), idx.max(0) + 1
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    pred, truth = np.pad(pred[box], 1), np.pad(truth[box], 1)
    sampling = tuple(spacing) if spacing is not None else None
    sp, st = _surface(pred), _surface(truth)
    to_truth = ndimage.distance_transform_edt(~st, sampling=sampling)[sp]
    to_pred = ndimage.distance_transform_edt(~sp, sampling=sampling)[st]
    return float(np.percentile(np.concatenate([to_truth, to_pred]), 95))


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
    if len(values) != 3 or not all(0 < v < float("inf") for v in values):  # nan fails too
        raise UserError(f"--spacing takes 'dz,dy,dx' in mm (or one value), got {text!r}")
    return tuple(values)

