"""A deterministic synthetic LGG-like dataset in the kaggle_3m layout, for a first run and the tests.

Numbers on it show that the code works; they say nothing about MRI.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np


SYNTHETIC_VERSION = 1


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Zero-mean, unit-std, spatially smooth noise of shape (size, size)."""
    noise = cv2.GaussianBlur(rng.standard_normal((size, size)).astype(np.float32), (0, 0), sigma)
    return (noise - noise.mean()) / (noise.std() + 1e-6)


def _synthetic_patient(
    rng: np.random.Generator, n_slices: int, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic head volume: (N, size, size, 3) uint8 images and (N, size, size) 0/255 masks."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    c = size / 2
    head_a, head_b = rng.uniform(0.34, 0.42) * size, rng.uniform(0.40, 0.46) * size
    head_cx, head_cy = c + rng.uniform(-0.04, 0.04) * size, c + rng.uniform(-0.04, 0.04) * size
    # Tissue means per channel (pre-contrast, FLAIR, post-contrast) and a per-patient scanner
    # gain and noise level, so that intensities differ between "institutions" as in the real data.
    tissue = np.array([95.0, 80.0, 100.0]) * rng.uniform(0.6, 1.4)
    noise_sd = rng.uniform(3.0, 8.0)
    texture = _smooth_noise(rng, size, 6.0)
    # The lesion spans about a third of the slices, biggest in the middle of its span.
    span = max(2, round(n_slices * rng.uniform(0.28, 0.4)))
    first = int(rng.integers(1, n_slices - span))
    les_cx = head_cx + rng.uniform(-0.45, 0.45) * head_a
    les_cy = head_cy + rng.uniform(-0.45, 0.45) * head_b
    les_r = rng.uniform(0.06, 0.14) * size
    les_ratio, les_angle = rng.uniform(0.6, 1.0), rng.uniform(0, np.pi)
    les_gain = rng.uniform(0.45, 0.8)  # FLAIR brightening relative to tissue
    rim = _smooth_noise(rng, size, 4.0)  # makes lesion outlines irregular

    images = np.zeros((n_slices, size, size, 3), np.uint8)
    masks = np.zeros((n_slices, size, size), np.uint8)
    for z in range(n_slices):
        # Head cross-sections shrink towards the top and bottom of the volume.
        t = (z + 0.5) / n_slices * 2 - 1
        shrink = np.sqrt(max(0.15, 1 - (0.9 * t) ** 2))
        r_head = ((xx - head_cx) / (head_a * shrink)) ** 2 + ((yy - head_cy) / (head_b * shrink)) ** 2
        head, brain = r_head <= 1.0, r_head <= 0.82
        lesion = np.zeros_like(head)
        if first <= z < first + span:
            u = (z - first + 0.5) / span * 2 - 1
            r = les_r * np.sqrt(max(0.05, 1 - u**2))
            dx, dy = xx - les_cx, yy - les_cy
            ca, sa = np.cos(les_angle), np.sin(les_angle)
            d = np.sqrt(((dx * ca + dy * sa) / r) ** 2 + ((-dx * sa + dy * ca) / (r * les_ratio)) ** 2)
            lesion = (d + 0.25 * rim <= 1.0) & brain
        img = np.zeros((size, size, 3), np.float32)
        for ch in range(3):
            img[..., ch] = np.where(head, tissue[ch] * (1 + 0.08 * texture), 0)
        skull = head & ~brain
        img[skull] *= np.array([1.5, 0.6, 1.4], np.float32)  # fat-bright rim, dark on FLAIR
        img[lesion] *= np.array([0.9, 1 + les_gain, 1.05], np.float32)
        img += head[..., None] * rng.normal(0, noise_sd, img.shape).astype(np.float32)
        images[z] = np.clip(img, 0, 255).astype(np.uint8)
        masks[z] = lesion.astype(np.uint8) * 255
    return images, masks


def make_synthetic_dataset(
    root: Path, *, patients: int = 20, slices: int = 24, size: int = 256, seed: int = 0
) -> Path:
    """Write a deterministic synthetic LGG-like dataset in the kaggle_3m layout; return its root.

    Each patient is a head phantom whose FLAIR channel shows a bright, irregular lesion in about a
    third of its slices. An existing copy made with the same parameters is reused. It is written
    to a temporary folder and renamed into place, so an interrupted run never leaves half of it.
    """
    root = Path(root)
    params = {"version": SYNTHETIC_VERSION, "patients": patients, "slices": slices, "size": size, "seed": seed}
    manifest = root / "synthetic.json"
    if manifest.is_file() and json.loads(manifest.read_text()) == params:
        return root
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for p in range(patients):
        name = f"SYN_{p:02d}_{20000101 + p}"
        (tmp / name).mkdir()
        images, masks = _synthetic_patient(rng, slices, size)
        for z in range(slices):
            # cv2 writes BGR: reverse so the file holds (pre-contrast, FLAIR, post-contrast).
            cv2.imwrite(str(tmp / name / f"{name}_{z + 1}.tif"), images[z][..., ::-1])
            cv2.imwrite(str(tmp / name / f"{name}_{z + 1}_mask.tif"), masks[z])
    (tmp / "synthetic.json").write_text(json.dumps(params))
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    return root

