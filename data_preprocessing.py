"""Slices -> tensors: mask binarization, per-volume intensity normalization and albumentations pipelines.

The order is: albumentations on the raw uint8 slice (resize, then, for training, flips, a small
affine and a light brightness/contrast change), conversion to uint8 CHW tensors, and then, on the
device the model runs on, per-volume normalization to float32 (``normalize``). Augmenting before
normalizing lets the affine fill the corners it exposes with 0, the value of the scanner
background, instead of a value that means nothing. Normalizing on the device lets the loader's
workers ship uint8 slices: a quarter of the bytes of float32 to pass between processes, pin and
copy to a GPU, which is what limits a fast GPU's input pipeline.

Normalization is per patient volume and per channel: clip to the [low, high] percentiles of the
volume's nonzero (head) voxels, then z-score with the mean and std of the clipped head voxels.
MRI intensities have no absolute scale and differ a lot between scanners and institutions, so
statistics of the whole training set (ImageNet-style mean/std) transfer badly across patients.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

# albumentations looks for a newer release online when imported; offline that costs a
# timeout and a warning on every run and in every DataLoader worker. Opt out unless asked.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402  (must follow the environment setting above)
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy import ndimage  # noqa: E402

from libraries import memory_format  # noqa: E402

# The two conventions masks come in: Kaggle's 0/255, and 0/1 (other datasets and tools, or a
# user's re-saved copy). Reading a 0/1 mask at > 127 would empty it, so no single threshold will do.
STANDARD_MASK_CONVENTIONS = ("0/255", "0/1")


def mask_convention(values: set[int] | np.ndarray) -> tuple[str, int]:
    """How masks holding these pixel values are read: (name, threshold), tumor where value > threshold.

    {0, 255}: '0/255' at > 127. {0, 1}: '0/1', 1 is tumor. Values up to 10 ('labels', several
    labels as in multi-class masks): every nonzero label is tumor. Anything else ('graded', such as
    the anti-aliased edges of a resized 0/255 mask): above half the largest value.
    """
    found = {int(v) for v in np.asarray(list(values) if isinstance(values, set) else values).ravel()}
    if found <= {0, 255}:
        return "0/255", 127
    if found <= {0, 1}:
        return "0/1", 0
    top = max(found)
    return ("labels", 0) if top <= 10 else ("graded", top // 2)


def binarize_mask(mask: np.ndarray, threshold: int = 127) -> np.ndarray:
    """uint8 {0, 1}: 1 where ``mask`` > ``threshold`` (``mask_convention`` chooses the threshold)."""
    return (mask > threshold).astype(np.uint8)


@dataclass(frozen=True)
class VolumeStats:
    """Per-channel intensity statistics of one patient volume, each an array of shape (C,)."""

    low: np.ndarray  # clip floor: low percentile of head voxels
    high: np.ndarray  # clip ceiling: high percentile of head voxels
    mean: np.ndarray  # mean of the clipped head voxels
    std: np.ndarray  # std of the clipped head voxels, never below 1e-6

    def as_tensor(self) -> torch.Tensor:
        """(4, C) float32: rows low, high, mean, std, the form ``normalize`` takes."""
        return torch.from_numpy(np.stack([self.low, self.high, self.mean, self.std]).astype(np.float32))


def volume_stats(volume: np.ndarray, low_pct: float = 1.0, high_pct: float = 99.0) -> VolumeStats:
    """Per-channel statistics of a (N, H, W, C) volume of any scale, over the voxels above each
    channel's minimum.

    The floor (0 in the dataset's TIFFs, an offset or a negative value in scanner files) is the
    air that fills much of the field of view; leaving it out keeps the share of air from moving
    the percentiles, and makes the statistics follow any scale and offset of the intensities, so
    the normalized volume does not change with them. A channel with no voxel above its floor gets
    low=high=mean=its floor and std=1.
    """
    if volume.ndim != 4:
        raise ValueError(f"expected a (N, H, W, C) volume, got shape {volume.shape}")
    channels = volume.shape[-1]
    low, high, mean, std = (np.zeros(channels, np.float32) for _ in range(4))
    std[:] = 1.0
    for c in range(channels):
        values = volume[..., c]
        floor = values.min() if values.size else 0
        head = values[values > floor].astype(np.float32)
        if head.size == 0:
            low[c] = high[c] = mean[c] = floor
            continue
        low[c], high[c] = np.percentile(head, [low_pct, high_pct])
        clipped = np.clip(head, low[c], high[c])
        mean[c] = clipped.mean()
        std[c] = max(float(clipped.std()), 1e-6)
    return VolumeStats(low=low, high=high, mean=mean, std=std)


def brain_box(volume: np.ndarray) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1): the box around every nonzero pixel, in any slice and channel (the crop of
    Buda et al., taken after their zeroing below 10% of the maximum). The whole image if none is."""
    projection = volume.max(axis=(0, 3)) if volume.ndim == 4 else volume.max(axis=0)
    ys, xs = np.nonzero(projection)
    if len(ys) == 0:
        return 0, projection.shape[0], 0, projection.shape[1]
    return int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1


def buda_stats(volume: np.ndarray) -> VolumeStats:
    """Normalization of Buda et al.: rescale the volume's 10th..99th percentile (all channels and
    voxels together) to [0, 1] with clipping, then z-score each channel over the volume.

    Expressed as VolumeStats so that ``normalize`` applies it unchanged:
    ((clip(x, p10, p99) - p10) / (p99 - p10) - m) / s == (clip(x, p10, p99) - mean) / std
    with mean = p10 + m (p99 - p10) and std = s (p99 - p10).
    """
    p10, p99 = (float(v) for v in np.percentile(volume, (10, 99)))
    span = max(p99 - p10, 1e-6)
    # float64: a float32 sum over millions of voxels drifts by 1e-4, as much as the details above.
    scaled = np.clip((volume.astype(np.float64) - p10) / span, 0, 1)
    channels = volume.shape[-1]
    m = scaled.reshape(-1, channels).mean(0)
    s = np.maximum(scaled.reshape(-1, channels).std(0), 1e-6)
    full = np.full(channels, 1, np.float32)
    return VolumeStats(low=full * p10, high=full * p99, mean=(p10 + m * span).astype(np.float32),
                       std=(s * span).astype(np.float32))


def background_level(volume: np.ndarray) -> np.ndarray:
    """(C,) the air's level in each channel of a (D, H, W, C) volume ((D, H, W): one value): the
    median of the outermost pixel frame of every slice. 0 for most scans; some FG scans carry a
    constant offset in one channel (76 and 103 on pre-contrast), where air is as bright as tissue."""
    frame = np.concatenate([volume[:, 0], volume[:, -1], volume[:, 1:-1, 0], volume[:, 1:-1, -1]], axis=1)
    return np.median(frame.reshape(-1, volume.shape[-1]) if volume.ndim == 4 else frame, axis=0)


def head_mask(volume: np.ndarray, fraction: float = 0.1) -> np.ndarray:
    """(D, H, W) bool: the head of each slice of a (D, H, W, C) volume: every pixel brighter than
    ``fraction`` of the volume's 99th percentile (any channel, each measured above its background
    level), holes filled, per slice."""
    above = np.clip(volume.astype(np.float32) - background_level(volume), 0, None)
    brightest = above.max(axis=-1) if volume.ndim == 4 else above
    nonzero = brightest[brightest > 0]
    if nonzero.size == 0:
        return np.zeros(brightest.shape, bool)
    return fill_slice_holes(brightest > fraction * np.percentile(nonzero, 99))


def fill_slice_holes(volume: np.ndarray) -> np.ndarray:
    """``volume`` (D, H, W bool) with the holes of each axial slice filled: background pixels that
    the slice's mask encloses (4-connected background not reaching the slice's border).

    The head mask fills the dark ventricles; the post-processing (``brain-multi``) fills a cystic
    lesion's dark centre, left out of a prediction that found its rim: the true masks are solid
    (32 of the 825 tumor slices of the 66 subset patients have a hole).
    """
    return np.stack([ndimage.binary_fill_holes(s) for s in volume]) if len(volume) else volume.astype(bool)


def brain_interior(volume: np.ndarray, margin: float = 0.05, fraction: float = 0.1) -> np.ndarray:
    """(D, H, W) bool: the head of each slice of a (D, H, W, C) volume (``head_mask``), shrunk by the scalp.

    The head is eroded by ``margin`` of the slice width (13 px at 256), about the thickness of
    scalp and skull. Post-processing uses it to tell components in the brain from those on the
    outer rim of the head (``metrics.brain_components_3d``).
    """
    head = head_mask(volume, fraction)
    steps = max(1, round(margin * head.shape[-1]))
    in_plane = np.array([[[0, 1, 0], [1, 1, 1], [0, 1, 0]]], bool)  # erode within each slice only
    return ndimage.binary_erosion(head, structure=in_plane, iterations=steps, border_value=0)


def crop_pad_square(
    image: np.ndarray, mask: np.ndarray, box: tuple[int, int, int, int]
) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int]]:
    """Crop to ``box`` and zero-pad the short side equally to a square.

    Returns the square image and mask and (top, left, side): where the crop sits in the square.
    """
    y0, y1, x0, x1 = box
    image, mask = image[y0:y1, x0:x1], mask[y0:y1, x0:x1]
    h, w = mask.shape
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    pad = ((top, side - h - top), (left, side - w - left))
    return np.pad(image, pad + ((0, 0),)), np.pad(mask, pad), (top, left, side)


def spline_resize(image: np.ndarray, size: int, order: int = 2) -> np.ndarray:
    """An (H, W, C) or (H, W) array resized to (size, size) by a spline of ``order``, as
    Buda et al. resize (scikit-image's ``resize(order=2, mode='constant', cval=0,
    anti_aliasing=False)``, which is this ``ndimage.zoom``): pixel centres aligned, zero outside.

    Each channel is resized on its own; their whole-volume call gives the same values, because a
    spline that is not resized along an axis passes through its samples there. float32 out; order
    0 (their masks) keeps the values.
    """
    factors = (size / image.shape[0], size / image.shape[1])
    planes = image[..., None] if image.ndim == 2 else image
    out = np.stack([ndimage.zoom(planes[..., c].astype(np.float32), factors, order=order, mode="grid-constant",
                                 cval=0.0, grid_mode=True) for c in range(planes.shape[-1])], axis=-1)
    return out[..., 0] if image.ndim == 2 else out


def buda_square(image: np.ndarray, mask: np.ndarray, box: tuple[int, int, int, int],
                size: int) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int]]:
    """A uint8 slice as Buda et al.'s network sees it: cropped to ``box``, zero-padded to a square
    and resized to ``size`` by an order-2 spline, as float32 on scikit-image's [0, 1] scale (uint8 /
    255); the mask by nearest neighbour. Also (top, left, side), as ``crop_pad_square``."""
    square, mask, placement = crop_pad_square(image, mask, box)
    return spline_resize(square / np.float32(255), size), spline_resize(mask, size, order=0).astype(mask.dtype), placement


def normalize(image: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
    """Clip each channel to its volume's [low, high] and z-score it with the volume's mean and std.

    Args:
        image: (C, H, W) or (B, C, H, W), any dtype (the loader gives uint8).
        stats: (4, C) or (B, 4, C) from ``VolumeStats.as_tensor``, on the same device.
    Returns float32 of ``image``'s shape, computed wherever the tensors are.
    """
    low, high, mean, std = (row[..., None, None] for row in stats.float().unbind(-2))
    return (image.float().clamp(low, high) - mean) / std


# Masks travel at the model's size as uint8 tumor fractions: 0 is background, MASK_SCALE a pixel
# wholly inside the tumor. Shrinking a mask by nearest neighbour (every other pixel at 256 -> 128)
# misplaces it by half a source pixel against the area-averaged image and aliases its edges: the true
# masks taken to 128 px that way and back by evaluation's bilinear resize score 0.964 mean Dice on
# the 66 shared patients, against 0.9925 for area-averaged masks (docs/results.md).
MASK_SCALE = 255


def batch_to_device(batch: dict, device: torch.device, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's image and mask on ``device``: the image normalized there in the model's memory
    format, the mask as the float fraction of each pixel that is tumor (``Preprocess``).

    Training, evaluation, prediction and the benchmark all move batches through here.
    """
    image = normalize(batch["image"].to(device, non_blocking=True), batch["stats"].to(device, non_blocking=True))
    return image.contiguous(memory_format=memory_format(channels_last)), batch["mask"].to(device, non_blocking=True).float() / MASK_SCALE


class Preprocess:
    """albumentations pipeline + conversion to tensors; normalization is left to ``normalize``.

    Called as ``preprocess(image, mask)`` with an (H, W, C) uint8 image and an (H, W) {0, 1}
    mask; returns a uint8 (C, S, S) image tensor and a uint8 (1, S, S) mask tensor of tumor
    fractions in 0..MASK_SCALE, S being ``image_size``: the mask is resized by area and moved by
    the same bilinear warps as the image, so it stays aligned with it. An image
    already resized by ``spline_resize`` (the 'buda' normalization) is float32 in [0, 1] and stays so.
    """

    def __init__(self, transform: A.Compose, image_size: int) -> None:
        self.transform = transform
        self.image_size = image_size

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.transform(image=image, mask=mask.astype(np.uint8) * np.uint8(MASK_SCALE))
        # HWC -> CHW.
        image_t = torch.from_numpy(np.ascontiguousarray(out["image"].transpose(2, 0, 1)))
        mask_t = torch.from_numpy(np.ascontiguousarray(out["mask"])).unsqueeze(0)
        return image_t, mask_t


def _resize(image_size: int) -> A.Resize:
    # INTER_AREA averages when shrinking (no aliasing), the mask's tumor fractions as the image's pixels.
    return A.Resize(image_size, image_size, interpolation=cv2.INTER_AREA, mask_interpolation=cv2.INTER_AREA)


def train_preprocess(
    image_size: int,
    *,
    hflip_p: float = 0.5,
    affine_p: float = 0.5,
    scale: float = 0.1,
    rotate_deg: float = 15.0,
    shift: float = 0.05,
    intensity_p: float = 0.3,
    intensity: float = 0.1,
) -> Preprocess:
    """Training pipeline: resize, horizontal flip, scale/rotation/shift, light brightness/contrast.

    Args:
        image_size: the slices are resized to this height and width in pixels.
        hflip_p: probability of a left-right flip (the brain is roughly symmetric; up-down is not).
        affine_p: probability of the affine step: zoom in [1 - scale, 1 + scale], rotation in
            [-rotate_deg, rotate_deg] and a shift.
        scale: relative zoom range of the affine step.
        rotate_deg: rotation range of the affine step, in degrees.
        shift: translation range as a fraction of the image size.
        intensity_p: probability of the brightness/contrast step.
        intensity: brightness and contrast limit (fraction of the uint8 range).
    """
    return Preprocess(
        image_size=image_size,
        transform=A.Compose(
            [
                _resize(image_size),
                A.HorizontalFlip(p=hflip_p),
                _affine(scale=(1 - scale, 1 + scale), rotate=(-rotate_deg, rotate_deg),
                        translate_percent=(-shift, shift), p=affine_p),
                A.RandomBrightnessContrast(
                    brightness_limit=intensity, contrast_limit=intensity, p=intensity_p
                ),
            ]
        )
    )


def _affine(**kwargs: Any) -> A.Affine:
    # Image and mask bilinear (the mask's tumor fractions move with the image); what moves in from outside is 0.
    return A.Affine(interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_LINEAR,
                    border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0, **kwargs)


def eval_preprocess(image_size: int) -> Preprocess:
    """Validation and inference pipeline: resize and normalization only, deterministic."""
    # Resized in float32, not in the slices' uint8: 8-bit rounding at the model's size would make
    # a scan's prediction depend on its intensity scale (a 16-bit file against its 8-bit TIFF).
    return Preprocess(A.Compose([A.ToFloat(max_value=1.0), _resize(image_size)]), image_size)
