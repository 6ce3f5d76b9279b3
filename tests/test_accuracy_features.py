"""Splits, Buda normalization, sampling, schedules, post-processing, HD95, presets and cv."""

import csv
import json
import shutil

import numpy as np
import pytest
import torch
from scipy import ndimage
from conftest import synthetic_tree, write_slice

from data_cache import load_volume
from data_files import (
    DatasetError,
    PatientVolume,
    group_by_patient,
    institution,
    scan_dataset,
    set_normalization,
)
from data_loaders import (
    BUDA_VAL_PREFIXES,
    LGGSlices,
    choose_split,
    draw_weights,
    kfold_split,
    make_loader,
    steps_per_epoch,
)
from data_preprocessing import (
    MASK_SCALE,
    brain_box,
    buda_stats,
    crop_pad_square,
    eval_preprocess,
    normalize,
    spline_resize,
    volume_stats,
)
from cv import step_advice
from engine import config_from_args, main, parse_args
from evaluation import to_full_resolution
from training import make_scheduler
from metrics import hd95, largest_component_3d

# ---------------------------------------------------------------------------------------- splits


def test_kfold_is_patient_disjoint_and_covers_everyone_once():
    patients = [f"P{i:02d}" for i in range(23)]
    seen = []
    for fold in range(5):
        train, val = kfold_split(patients, 5, fold, seed=7)
        assert set(train).isdisjoint(val) and set(train) | set(val) == set(patients)
        assert 4 <= len(val) <= 5
        seen += val
    assert sorted(seen) == patients  # every patient validated exactly once
    assert kfold_split(patients, 5, 0, seed=7) == kfold_split(list(reversed(patients)), 5, 0, seed=7)
    with pytest.raises(DatasetError):
        kfold_split(patients, 5, 5, seed=7)
    with pytest.raises(DatasetError, match="^--folds 2 is more than the 1 patient found$"):
        kfold_split(["P00"], 2, 0, seed=7)


def test_kfold_seed_shuffles_the_folds():
    """Another seed gives other folds, and no seed gives the alphabetical every-K-th folds."""
    patients = [f"P{i:02d}" for i in range(36)]
    alphabetical = sorted(patients)[0::6]
    folds = {seed: kfold_split(patients, 6, 0, seed)[1] for seed in (0, 1, 42)}
    assert len({tuple(v) for v in folds.values()}) == 3
    assert all(v != alphabetical for v in folds.values())
    assert kfold_split(patients, 6, 0, 42) == kfold_split(patients, 6, 0, 42)  # still deterministic


def test_buda_split_picks_exactly_those_patients():
    folders = [f"{p}_19990101" for p in BUDA_VAL_PREFIXES] + ["TCGA_XX_0001_20000101", "TCGA_XX_0002_20000101"]
    train, val = choose_split(folders, split="buda", val_fraction=0.2, seed=0)
    assert val == sorted(f"{p}_19990101" for p in BUDA_VAL_PREFIXES)
    assert train == ["TCGA_XX_0001_20000101", "TCGA_XX_0002_20000101"]


def test_buda_split_names_the_missing_patients():
    folders = [f"{p}_19990101" for p in BUDA_VAL_PREFIXES[2:]] + ["TCGA_XX_0001_20000101"]
    with pytest.raises(DatasetError) as err:
        choose_split(folders, split="buda", val_fraction=0.2, seed=0)
    assert BUDA_VAL_PREFIXES[0] in str(err.value) and BUDA_VAL_PREFIXES[1] in str(err.value)
    assert BUDA_VAL_PREFIXES[2] not in str(err.value)


def test_val_patients_from_list_and_file(tmp_path):
    folders = ["TCGA_AA_0001_2000", "TCGA_AA_0002_2000", "TCGA_BB_0003_2001"]
    assert choose_split(folders, split="random", val_fraction=0.2, seed=0,
                        val_patients="TCGA_AA_0002, TCGA_BB_0003_2001") == (["TCGA_AA_0001_2000"],
                                                                            ["TCGA_AA_0002_2000", "TCGA_BB_0003_2001"])
    listing = tmp_path / "val.txt"
    listing.write_text("# held out\nTCGA_AA_0001\n")
    assert choose_split(folders, split="random", val_fraction=0.2, seed=0, val_patients=str(listing))[1] == [
        "TCGA_AA_0001_2000"]
    with pytest.raises(DatasetError, match="TCGA_ZZ_9999"):
        choose_split(folders, split="random", val_fraction=0.2, seed=0, val_patients="TCGA_ZZ_9999")
    with pytest.raises(DatasetError, match="every patient"):
        choose_split(folders, split="random", val_fraction=0.2, seed=0, val_patients=",".join(folders))


def test_split_none_trains_on_every_patient_unless_folds_or_a_list_choose():
    folders = ["TCGA_BB_0003_2001", "TCGA_AA_0001_2000", "TCGA_AA_0002_2000"]
    assert choose_split(folders, split="none", val_fraction=0.2, seed=0) == (sorted(folders), [])
    # --val-patients and --folds come first, as they do for the other splits.
    assert choose_split(folders, split="none", val_fraction=0.2, seed=0, val_patients="TCGA_AA_0002")[1] == [
        "TCGA_AA_0002_2000"]
    assert len(choose_split(folders, split="none", val_fraction=0.2, seed=0, folds=3, fold=0)[1]) == 1


# ---------------------------------------------------------------------------------- normalization


def test_buda_normalization_statistics():
    rng = np.random.default_rng(0)
    volume = np.zeros((6, 40, 40, 3), np.uint8)
    volume[:, 8:30, 12:36] = rng.integers(20, 250, (6, 22, 24, 3), dtype=np.uint8)
    assert brain_box(volume) == (8, 30, 12, 36)
    cropped = volume[:, 8:30, 12:36]
    stats = buda_stats(cropped)
    p10, p99 = np.percentile(cropped, (10, 99))
    assert stats.low[0] == pytest.approx(p10) and stats.high[2] == pytest.approx(p99)
    z = normalize(torch.from_numpy(cropped).permute(0, 3, 1, 2), stats.as_tensor()).permute(0, 2, 3, 1).numpy()
    for c in range(3):  # z-scored per channel over the whole cropped volume
        assert z[..., c].mean() == pytest.approx(0, abs=1e-4)
        assert z[..., c].std() == pytest.approx(1, abs=1e-4)
    # And it equals the authors' two-step formula.
    scaled = np.clip((cropped.astype(np.float64) - p10) / (p99 - p10), 0, 1)
    expected = (scaled - scaled.mean(axis=(0, 1, 2))) / scaled.std(axis=(0, 1, 2))
    assert np.allclose(z, expected, atol=1e-4)


def test_crop_pad_and_paste_back_round_trip():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
    images[:, :, :5] = 0
    images[:, :4] = 0
    masks = np.zeros((3, 32, 32), np.uint8)
    masks[1, 10:20, 8:15] = 1
    vol = PatientVolume("P", images, masks, [1, 2, 3], volume_stats(images))
    vol.box = (4, 32, 5, 32)  # 28 x 27: padded to a 28 x 28 square
    image_sq, mask_sq, (top, left, side) = crop_pad_square(images[1], masks[1], vol.box)
    # 28 rows x 27 columns: one zero column is added on the right (left pad (28 - 27) // 2 = 0).
    assert image_sq.shape == (28, 28, 3) and (top, left, side) == (0, 0, 28)
    assert (image_sq[:, 27] == 0).all() and np.array_equal(mask_sq[:, :27], masks[1, 4:32, 5:32])
    # At the square's own size nothing is resampled, so the round trip must be exact.
    ds = LGGSlices([vol], eval_preprocess(28), full_mask=True)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    assert batch["box"].shape == (3, 7)
    # The model-input mask, as confident logits, pasted back onto the 32 x 32 grid.
    back = to_full_resolution(batch["mask"].float() / MASK_SCALE * 40 - 20, batch["full_mask"].shape[-2:], batch["box"]) > 0
    assert torch.equal(back, batch["full_mask"].bool())


def test_set_normalization_buda_sets_box_and_stats(fake_tree):
    recs = group_by_patient(scan_dataset(fake_tree))["TCGA_XX_0000_20000101"]
    vol = set_normalization(load_volume(recs), "buda", 32)
    assert vol.box is not None and vol.stats.low[0] == vol.stats.low[1]  # one p10 for all channels


def _buda_volume() -> np.ndarray:
    """Four 4 x 4 slices, all channels alike (see test_buda_preprocessing_by_hand)."""
    image = np.zeros((4, 4, 4, 3), np.uint8)
    image[0, 3, 3] = image[3, 3, 3] = 255  # first and last slice: not in their volume
    image[1, 0, :3] = [[200] * 3, [100] * 3, [100] * 3]
    image[1, 1, :2] = [[200] * 3, [15] * 3]
    image[1, 2, 1] = 20
    image[2] = 10  # below the threshold everywhere: emptied, then cropped away with their z-crop
    return image


def test_buda_preprocessing_by_hand():
    """Their order: drop the first and last slice, zero below 10% of the maximum, crop to what is
    left (slices too), pad to a square, resize, statistics over the squares with the padding.

    Without the first and last slice the maximum is 200, so the threshold is 20: the 15 becomes 0,
    the 20 stays (they zero what is *below* it), slice 2 (all 10) is emptied. With the 255s it
    would be 25.5 and the box would reach row and column 3. Slice 1 left (per channel):
        200 100 100        box rows 0-2, columns 0-2: already square, so nothing is padded and,
        200   0   0        at image size 3, nothing resampled. Its 27 values (on scikit-image's
          0  20   0        [0, 1] scale: /255) are 12 x 0, 3 x 20, 6 x 100, 6 x 200: p10 = 0 and
    p99 = 200 (positions 2.6 and 25.74 of 26). Rescaled, a channel is 1, 1, .5, .5, .1 and four 0s:
    mean 3.1 / 9, mean square 2.51 / 9. As statistics of the [0, 1] values: times 200 / 255.
    Slice 2 counted, or the 20 zeroed, would change both.
    """
    image = _buda_volume()
    vol = set_normalization(PatientVolume("P", image, np.zeros((4, 4, 4), np.uint8), [1, 2, 3, 4],
                                          volume_stats(image)), "buda", 3)
    assert vol.images[1, 1, 1].tolist() == [0, 0, 0] and vol.images[1, 2, 1].tolist() == [20] * 3
    assert not vol.images[2].any() and vol.images[0, 3, 3].tolist() == [255] * 3  # every slice zeroed alike
    assert vol.box == (0, 3, 0, 3)
    span = 200 / 255
    assert np.allclose(vol.stats.low, 0) and np.allclose(vol.stats.high, span)
    assert np.allclose(vol.stats.mean, span * 3.1 / 9, atol=1e-6)
    assert np.allclose(vol.stats.std, span * np.sqrt(2.51 / 9 - (3.1 / 9) ** 2), atol=1e-6)


def test_buda_statistics_are_taken_after_the_spline_resize():
    image = _buda_volume()
    at = {size: set_normalization(PatientVolume("P", image.copy(), np.zeros((4, 4, 4), np.uint8), [1, 2, 3, 4],
                                                volume_stats(image)), "buda", size) for size in (3, 7)}
    square = spline_resize(at[3].images[1, :3, :3] / np.float32(255), 7)  # the one slice they keep, at 7 px
    expected = buda_stats(np.clip(square, 0, 200 / 255)[None])
    for name in ("low", "high", "mean", "std"):
        assert np.allclose(getattr(at[7].stats, name), getattr(expected, name), atol=1e-6)
    assert not np.allclose(at[7].stats.mean, at[3].stats.mean, atol=1e-3)  # the resize moves them
    # The loader gives the network that same square, as float32 at the model's size.
    item = LGGSlices([at[7]], eval_preprocess(7))[1]
    assert item["image"].dtype == torch.float32
    assert np.allclose(item["image"].permute(1, 2, 0).numpy(), square, atol=1e-6)


def test_spline_resize_matches_the_whole_volume_resize():
    """Per slice and channel equals one order-2 zoom of the (N, H, W, C) volume, as they call it;
    masks by nearest neighbour, which at twice the size repeats each pixel in a 2 x 2 block."""
    rng = np.random.default_rng(3)
    volume = rng.random((3, 5, 5, 3)).astype(np.float32)
    whole = ndimage.zoom(volume, (1, 9 / 5, 9 / 5, 1), order=2, mode="grid-constant", cval=0.0, grid_mode=True)
    assert np.allclose(np.stack([spline_resize(v, 9) for v in volume]), whole, atol=1e-5)
    assert spline_resize(np.array([[1, 0], [0, 1]], np.uint8), 4, order=0).tolist() == [
        [1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]


def test_spline_resize_matches_scikit_image():
    """Their call itself, where scikit-image is installed (it is not a requirement). It clips to the
    input's range widened to the fill value 0, as set_normalization does for the statistics."""
    transform = pytest.importorskip("skimage.transform")
    volume = np.random.default_rng(4).random((2, 6, 6, 3))
    theirs = transform.resize(volume, (2, 11, 11, 3), order=2, mode="constant", cval=0, anti_aliasing=False)
    ours = np.clip(np.stack([spline_resize(v, 11) for v in volume]), 0, volume.max())
    assert np.allclose(ours, theirs, atol=1e-5)


# ------------------------------------------------------------------------------- post-processing


def test_largest_component_3d():
    vol = np.zeros((3, 6, 6), bool)
    vol[0:2, 0:2, 0:2] = True  # 8 voxels, spans two slices
    vol[2, 4:6, 4:6] = True  # 4 voxels
    vol[1, 4, 0] = True  # 1 voxel
    kept = largest_component_3d(vol)
    assert kept.sum() == 8 and kept[0:2, 0:2, 0:2].all()
    diagonal = np.zeros((2, 2, 2), bool)
    diagonal[0, 0, 0] = diagonal[1, 1, 1] = True  # corner-touching: separate under 6-connectivity
    assert largest_component_3d(diagonal).sum() == 1
    assert not largest_component_3d(np.zeros((2, 3, 3), bool)).any()


def test_hd95_known_distances():
    a = np.zeros((1, 20, 20), bool)
    a[0, 5:10, 5:10] = True
    assert hd95(a, a) == 0.0
    b = np.roll(a, 4, axis=2)  # the same square, 4 pixels to the right
    assert hd95(a, b) == pytest.approx(4.0)
    assert hd95(a, b, spacing=(1.0, 1.0, 0.5)) == pytest.approx(2.0)  # 4 px at 0.5 mm
    # One far outlier voxel is 1 of 33 pooled border distances (16 + 16 zeros, then ~12.7):
    # the 95th percentile (position 0.95 * 32 = 30.4 of the sorted list) is still 0, where the
    # plain Hausdorff distance would be the outlier's.
    c = a.copy()
    c[0, 18, 18] = True
    assert hd95(a, c) == 0.0
    # Two squares 4 px apart in a 3D volume, with anisotropic slices: only in-plane distances count.
    a3, b3 = np.repeat(a, 3, axis=0), np.repeat(b, 3, axis=0)
    assert hd95(a3, b3, spacing=(5.0, 1.0, 1.0)) == pytest.approx(4.0)
    assert hd95(a, np.zeros_like(a)) is None
    assert hd95(np.zeros_like(a), np.zeros_like(a)) == 0.0


# ----------------------------------------------------------------------------- training recipe


def _patients(root, slices, tumor):
    """Patients P_1, P_2, ... with ``slices[k]`` slices, the first ``tumor[k]`` of them with tumor."""
    rng = np.random.default_rng(0)
    for k, (n, t) in enumerate(zip(slices, tumor)):
        for i in range(n):
            mask = np.zeros((8, 8), np.uint8)
            mask[2:4, 2:4] = 255 if i < t else 0
            name = f"P_{k + 1}"
            write_slice(root / name, name, i + 1, rng.integers(1, 255, (8, 8, 3), dtype=np.uint8), mask)
    return LGGSlices([load_volume(recs) for recs in group_by_patient(scan_dataset(root)).values()],
                     eval_preprocess(16))


def test_tumor_weight_oversamples_tumor_slices(tmp_path):
    ds = _patients(tmp_path / "k", slices=(10,), tumor=(2,))  # 2 of 10 slices have tumor
    loader = make_loader(ds, batch_size=10, train=True, seed=0, num_workers=0, tumor_weight=4.0)
    drawn = torch.cat([b["mask"].flatten(1).any(1) for _ in range(200) for b in loader])
    # P(tumor) = 4 * 2 / (4 * 2 + 8) = 0.5, against 0.2 with uniform sampling.
    assert drawn.float().mean().item() == pytest.approx(0.5, abs=0.03)
    assert len(drawn) == 2000


def test_draw_weights_by_hand(tmp_path):
    ds = _patients(tmp_path / "k", slices=(2, 4), tumor=(1, 1))
    assert draw_weights(ds, 2.0).tolist() == [2, 1, 2, 1, 1, 1]
    assert draw_weights(ds, 1.0).tolist() == [1] * 6


def test_warmup_cosine_schedule_values():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    sched = make_scheduler(opt, total_steps=10, warmup_steps=2)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.001)  # warmup starts at lr / 100
    assert lrs[1] == pytest.approx(0.1 * (0.01 + 0.99 * 0.5))
    assert lrs[2] == pytest.approx(0.1)  # peak after warmup
    assert lrs[6] == pytest.approx(0.1 * 0.5 * (1 + np.cos(np.pi * 4 / 8)))
    assert lrs[9] < lrs[6] < lrs[2]


def test_weight_decay_and_warmup_flags_reach_the_optimizer_and_schedule():
    """--weight-decay sets every group's decay; --warmup-epochs is counted in the run's steps per epoch."""
    from engine import Config, build_parts

    def lrs(cfg, n):
        parts, sched = build_parts(cfg, torch.device("cpu"), None, None, distributed=False, steps_per_epoch=4)
        seen = []
        for _ in range(n):
            seen.append(parts.optimizer.param_groups[0]["lr"])
            parts.optimizer.step()
            sched.step()
        return parts.optimizer, seen

    opt, warm = lrs(Config(features=4, lr=0.01, weight_decay=0.05, warmup_epochs=0.5, epochs=2), 3)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.05]  # encoder and decoder groups
    assert warm == pytest.approx([0.01 * 0.01, 0.01 * (0.01 + 0.99 / 2), 0.01])  # 0.5 epoch = 2 of 4 steps
    _, cold = lrs(Config(features=4, lr=0.01, warmup_epochs=0.0, epochs=2), 1)
    assert cold == pytest.approx([0.01])


def test_preset_fills_defaults_but_flags_win():
    argv = ["--preset", "cpu", "--epochs", "3"]
    cfg = config_from_args(parse_args(argv), argv)
    assert (cfg.image_size, cfg.tumor_weight, cfg.warmup_epochs) == (128, 2.0, 1.0)
    assert cfg.epochs == 3 and cfg.steps_per_epoch == 150
    argv = ["--preset", "full", "--image-size=64"]
    assert config_from_args(parse_args(argv), argv).image_size == 64


def tiny(tmp_path, *extra):
    return ["--data-dir", synthetic_tree(tmp_path / "syn", 4, 5), "--image-size", "32", "--features", "4",
            "--batch-size", "4", "--device", "cpu", *extra]


def test_early_stopping(tmp_path, capsys):
    # lr 0: nothing improves after epoch 1, so patience 1 stops after epoch 2 of 6.
    assert main(tiny(tmp_path, "--epochs", "6", "--lr", "0", "--patience", "1",
                     "--out-dir", str(tmp_path / "run"))) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["epoch"] == 2 and metrics["best_epoch"] == 1
    assert "early stop: no better validation Dice per volume in 1 validation since epoch 1" in capsys.readouterr().out
    # The same at 2 epochs ends where it would have anyway: that is no early stop, and was called one.
    assert main(tiny(tmp_path, "--epochs", "2", "--lr", "0", "--patience", "1",
                     "--out-dir", str(tmp_path / "run2"))) == 0
    assert "early stop" not in capsys.readouterr().out
    assert set(metrics["postprocessing"]) == {"none"}  # the raw prediction is the configured rule here
    assert all("hd95_px" in p for p in metrics["per_patient"])


def test_patience_counts_validations_not_epochs():
    """With --val-every 5 and --patience 2, the run stopped at the first validation after the best
    (10 - 5 >= 2 epochs), though the help promised two validations."""
    from engine import validations_since_best

    def row(epoch, validated):
        return {"epoch": epoch, "train_loss": 1.0, **({"val_dice_per_volume_mean": 0.5} if validated else {})}

    every5 = [row(e, e % 5 == 0) for e in range(1, 16)]  # validated at 5, 10, 15
    assert validations_since_best({"history": every5[:10], "best_epoch": 5}) == 1  # epoch 10: go on
    assert validations_since_best({"history": every5, "best_epoch": 5}) == 2  # epoch 15: stop
    assert validations_since_best({"history": every5, "best_epoch": 15}) == 0
    every1 = [row(e, True) for e in range(1, 5)]
    assert validations_since_best({"history": every1, "best_epoch": 1}) == 3  # = epochs, as before


def test_cv_command_runs_every_fold_and_summarizes(tmp_path, capsys):
    assert main(["cv", *tiny(tmp_path, "--folds", "2", "--epochs", "1", "--postprocess", "brain-multi",
                             "--out-dir", str(tmp_path / "cv"))]) == 0
    printed = capsys.readouterr().out
    with open(tmp_path / "cv" / "cv_summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["fold"] for r in rows] == ["0", "1", "mean", "std", "all patients"]
    values = [float(r["dice_per_volume_mean"]) for r in rows[:2]]
    assert float(rows[2]["dice_per_volume_mean"]) == pytest.approx(np.mean(values))
    assert float(rows[3]["dice_per_volume_mean"]) == pytest.approx(np.std(values, ddof=1))
    vals = [json.loads((tmp_path / "cv" / f"fold-{i}" / "config.json").read_text())["patients"]["validation"] for i in (0, 1)]
    assert set(vals[0]).isdisjoint(vals[1]) and len(vals[0]) + len(vals[1]) == 4
    # The pooled row scores every patient once, with the Dice its own fold's metrics.json gave it.
    fold_dice = {row["patient"]: row["dice"] for i in (0, 1)
                 for row in json.loads((tmp_path / "cv" / f"fold-{i}" / "metrics.json").read_text())["per_patient"]}
    with open(tmp_path / "cv" / "cv_patients.csv") as f:
        patients = list(csv.DictReader(f))
    assert sorted(r["patient"] for r in patients) == sorted(vals[0] + vals[1]) == sorted(fold_dice)
    assert all(float(r["dice"]) == pytest.approx(fold_dice[r["patient"]]) for r in patients)
    assert float(rows[4]["patients"]) == 4
    # Counts print as counts: 2 validation patients a fold, not 2.0000.
    fold0 = next(line.split() for line in printed.splitlines() if line.strip().startswith("0 "))
    assert fold0[:2] == ["0", "2"] and fold0[-1] == rows[0]["optimizer_steps"].removesuffix(".0")
    # One row per institution of the pooled patients, then all of them, each the mean of its patients.
    with open(tmp_path / "cv" / "cv_institutions.csv") as f:
        sites = list(csv.DictReader(f))
    assert [r["institution"] for r in sites] == sorted({institution(r["patient"]) for r in patients}) + ["all"]
    for site in sites:
        mine = [r for r in patients if site["institution"] in ("all", institution(r["patient"]))]
        assert int(site["patients"]) == len(mine)
        for column in ("dice_brain-multi", "flair_contrast"):  # the lesions' contrast is averaged like the Dice
            assert float(site[column]) == pytest.approx(np.mean([float(r[column]) for r in mine])), column
    # Each patient's contrast is the one its fold's evaluation measured.
    for i in (0, 1):
        rows_i = json.loads((tmp_path / "cv" / f"fold-{i}" / "metrics.json").read_text())["per_patient"]
        for row in rows_i:
            mine = next(r for r in patients if r["patient"] == row["patient"])
            assert float(mine["flair_contrast"]) == pytest.approx(row["flair_contrast"]) and row["flair_contrast"] > 0
    assert "by institution (cv_institutions.csv)" in printed
    assert float(rows[4]["dice_per_volume_mean"]) == pytest.approx(np.mean(list(fold_dice.values())))
    assert float(rows[4]["dice_per_volume_median"]) == pytest.approx(np.median(list(fold_dice.values())))
    # The printed headline is the configured post-processing's (pooled over patients), raw beside it.
    brain = [float(r["dice_brain-multi"]) for r in patients]
    folds = [float(r["dice_per_volume_mean_brain-multi"]) for r in rows[:2]]
    assert (f"Dice per volume with --postprocess brain-multi: {np.mean(folds):.4f} +/- {np.std(folds, ddof=1):.4f} "
            f"(mean +/- std over folds); over all 4 patients mean {np.mean(brain):.4f}, median "
            f"{np.median(brain):.4f} (raw {np.mean(list(fold_dice.values())):.4f} / ") in printed
    # Steps, by hand: 4 patients x 5 slices, batch 4. A fold trains 10 slices: 2 batches of 4 and
    # one of 2 = 3 steps; the final model's 20 slices take 5, so 1 epoch of it is 5/3 ~ 2 of a fold.
    for i in (0, 1):
        m = json.loads((tmp_path / "cv" / f"fold-{i}" / "metrics.json").read_text())
        assert (m["train_slices"], m["slices"], m["steps_per_epoch"], m["optimizer_steps"]) == (10, 10, 3, 3)
    assert [float(r["optimizer_steps"]) for r in rows[:3]] == [3, 3, 3]
    assert ("Steps: each fold trained 3 optimizer steps on average (3 per epoch), as many as a final model on all "
            "20 slices (5 per epoch) trains in 0.6 epochs. A final model of 1 epoch (5 steps) is matched by folds "
            "of --epochs 2.") in printed


class _Numbers(torch.utils.data.Dataset):
    """n items, and the reseed hook make_loader calls."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i

    def reseed(self, seed: int) -> None:
        pass


def test_steps_per_epoch_is_the_training_loader_length():
    # make_loader drops only a last batch of 1 (BatchNorm cannot train on it).
    for n, batch, steps in ((16, 16, 1), (17, 16, 1), (18, 16, 2), (33, 16, 2), (34, 16, 3), (886, 16, 56), (1303, 16, 82)):
        assert steps_per_epoch(n, batch) == steps, (n, batch)
        loader = make_loader(_Numbers(n), batch_size=batch, train=True, seed=0, num_workers=0)
        assert len(loader) == len(list(loader)) == steps, (n, batch)


def test_step_advice_matches_the_final_models_steps():
    # The 3-fold CV of the preset: 886 train / 417 validation slices, 56 steps per epoch (886 = 55 * 16 + 6),
    # 20 epochs = 1,120 steps; the final model's 1,303 slices take 82 per epoch, so the folds amount to
    # 1,120 / 82 = 13.7 of its epochs, and matching its 20 takes 20 * 82 / 56 = 29.3 -> 29 epochs.
    folds = [{"train_slices": 886, "slices": 417, "steps_per_epoch": 56, "optimizer_steps": 1120}] * 3
    line = step_advice(folds, epochs=20, batch_size=16)
    assert "trained 1,120 optimizer steps on average (56 per epoch)" in line
    assert "all 1,303 slices (82 per epoch) trains in 13.7 epochs" in line
    assert line.endswith("A final model of 20 epochs (1,640 steps) is matched by folds of --epochs 29.")
    same = [{"train_slices": 1300, "slices": 3, "steps_per_epoch": 82, "optimizer_steps": 1640}]
    assert "matched" not in step_advice(same, epochs=20, batch_size=16)  # already as many steps
    assert step_advice([{"slices": 417}], epochs=20, batch_size=16) is None  # folds from before steps were saved
    # One step and one epoch read in the singular. 3 train + 1 validation slices in batches of 4: the final
    # model takes 1 step per epoch, as the fold did. 4 + 4 slices: the final model takes 2 per epoch, the fold
    # 1, so a final model of 1 epoch is matched by folds of 2.
    tiny = [{"train_slices": 3, "slices": 1, "steps_per_epoch": 1, "optimizer_steps": 1}]
    assert "each fold trained 1 optimizer step on average (1 per epoch)" in step_advice(tiny, epochs=1, batch_size=4)
    halves = [{"train_slices": 4, "slices": 4, "steps_per_epoch": 1, "optimizer_steps": 1}]  # final: 2 per epoch
    assert step_advice(halves, epochs=1, batch_size=4).endswith(
        "A final model of 1 epoch (2 steps) is matched by folds of --epochs 2.")
CV_KILLER = """
import os, signal, sys
sys.path.insert(0, {root!r})
import engine, training
real_train, fold = engine.train, None
def train(cfg):
    global fold
    fold = cfg.fold
    return real_train(cfg)
real_step = training.optimizer_step
def step(*args, **kwargs):
    if fold == 1 and os.path.exists(os.path.join({base!r}, "fold-1", "last.pt")):
        os.kill(os.getpid(), signal.SIGKILL)  # fold 1, epoch 2: fold 0 finished, fold 1 checkpointed
    return real_step(*args, **kwargs)
engine.train, training.optimizer_step = train, step
sys.exit(engine.main(sys.argv[1:]))
"""


def test_cv_resume_after_a_kill_writes_what_an_uninterrupted_run_writes(tmp_path, capsys):
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    argv = tiny(tmp_path, "--folds", "3", "--epochs", "2", "--tumor-weight", "2")
    assert main(["cv", *argv, "--out-dir", str(tmp_path / "whole")]) == 0
    cut = tmp_path / "cut"
    proc = subprocess.run([sys.executable, "-c", CV_KILLER.format(root=root, base=str(cut)), "cv", *argv,
                           "--out-dir", str(cut)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr
    assert (cut / "fold-0" / "metrics.json").is_file() and (cut / "fold-1" / "last.pt").is_file()
    assert not (cut / "fold-1" / "metrics.json").exists() and not (cut / "cv_summary.csv").exists()
    # As if fold 2 had been killed in its first epoch too: files, but no checkpoint.
    (cut / "fold-2").mkdir()
    (cut / "fold-2" / "config.json").write_text("{}")
    finished = (cut / "fold-0" / "metrics.json").stat().st_mtime_ns

    # The same command again is refused, and names the command that continues the cv.
    capsys.readouterr()
    assert main(["cv", *argv, "--out-dir", str(cut)]) == 2
    assert f"if it was interrupted, continue it with: python engine.py cv --resume {cut}" in capsys.readouterr().err
    # The run keeps its own settings: a flag it would ignore is refused, not ignored in silence.
    assert main(["cv", "--resume", str(cut), "--epochs", "9"]) == 2
    err = capsys.readouterr().err
    assert "--epochs 9 (the run's: 2) would be ignored" in err
    assert err.strip().endswith("start a new cv in another --out-dir)")  # not a single run's --pretrained
    assert main(["cv", "--resume", str(cut), "--epochs", "2", "--num-workers", "0"]) == 0  # its own value
    out = capsys.readouterr().out
    assert f"resuming {cut / 'fold-1'} after epoch 1" in out and "fold 0: finished earlier" in out
    assert (cut / "fold-0" / "metrics.json").stat().st_mtime_ns == finished  # read, not retrained
    assert (cut / "fold-2.incomplete" / "config.json").read_text() == "{}"  # moved aside, not deleted
    for name in ("cv_summary.csv", "cv_patients.csv"):
        assert (cut / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    for fold in (1, 2):
        a, b = (json.loads((d / f"fold-{fold}" / "metrics.json").read_text()) for d in (cut, tmp_path / "whole"))
        assert a["epoch"] == 2 and a["postprocessing"] == b["postprocessing"]


def test_cv_resume_from_another_working_folder_reads_the_same_patients(tmp_path, monkeypatch, capsys):
    # A cv started with a relative --data-dir, continued from elsewhere: the unfinished fold must
    # read the cv's own patients, not fail (or read whatever folder the same name means there).
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    synthetic_tree(tmp_path / "a" / "syn", 4, 5)
    monkeypatch.chdir(tmp_path / "a")
    argv = ["--data-dir", "syn", "--image-size", "32", "--features", "4", "--batch-size", "4", "--device", "cpu",
            "--folds", "2", "--epochs", "1", "--out-dir", str(tmp_path / "cv")]
    assert main(["cv", *argv]) == 0
    whole = (tmp_path / "cv" / "cv_patients.csv").read_bytes()
    shutil.rmtree(tmp_path / "cv" / "fold-1")  # as if killed before fold 1 began
    (tmp_path / "cv" / "cv_patients.csv").unlink()
    monkeypatch.chdir(tmp_path / "b")
    capsys.readouterr()
    assert main(["cv", "--resume", str(tmp_path / "cv")]) == 0, capsys.readouterr().err
    assert f"data: {tmp_path / 'a' / 'syn'} (SYNTHETIC)" in capsys.readouterr().out
    assert (tmp_path / "cv" / "cv_patients.csv").read_bytes() == whole


def test_cv_resume_refuses_data_that_changed_since_the_cv_began(tmp_path, capsys):
    # Each fold splits the patients it finds: a cv begun on 36 patients and resumed on 66 pooled
    # folds of two different splits (patients missing, others scored by a model trained on them).
    data = tmp_path / "data"
    shutil.copytree(synthetic_tree(tmp_path / "syn", 5, 5), data)
    shutil.move(data / "SYN_04_20000105", tmp_path / "SYN_04_20000105")
    argv = ["--data-dir", str(data), "--image-size", "32", "--features", "4", "--batch-size", "4", "--device", "cpu",
            "--folds", "2", "--epochs", "1", "--out-dir", str(tmp_path / "cv")]
    assert main(["cv", *argv]) == 0
    recorded = json.loads((tmp_path / "cv" / "cv_config.json").read_text())["patients"]
    assert recorded == {f"SYN_0{i}_2000010{i + 1}": 5 for i in range(4)}
    shutil.rmtree(tmp_path / "cv" / "fold-1")  # as if stopped before fold 1
    shutil.move(tmp_path / "SYN_04_20000105", data / "SYN_04_20000105")
    (data / "SYN_00_20000101" / "SYN_00_20000101_5.tif").unlink()
    (data / "SYN_00_20000101" / "SYN_00_20000101_5_mask.tif").unlink()
    capsys.readouterr()
    assert main(["cv", "--resume", str(tmp_path / "cv")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and ("changed since this cv began (1 patient added (SYN_04_20000105); "
                                     "1 patient with other slices (SYN_00_20000101))") in err
    assert not (tmp_path / "cv" / "fold-1").exists()


def test_cv_resume_needs_a_cv_folder(tmp_path, capsys):
    (tmp_path / "plain").mkdir()
    assert main(["cv", "--resume", str(tmp_path / "plain")]) == 2
    err = capsys.readouterr().err.strip()
    assert "cv_config.json" in err and err.count("\n") == 0
    # And the other way round: a cv folder given to a plain --resume says which command to use.
    (tmp_path / "plain" / "cv_config.json").write_text("{}")
    assert main(["--resume", str(tmp_path / "plain")]) == 2
    err = capsys.readouterr().err.strip()
    assert f"cv --resume {tmp_path / 'plain'}" in err and err.count("\n") == 0


def test_cv_refuses_a_setting_that_cannot_train_before_making_its_folder(tmp_path, capsys):
    out = tmp_path / "cv"
    assert main(["cv", "--folds", "2", "--data-dir", "synthetic", "--batch-size", "0", "--out-dir", str(out)]) == 2
    err = capsys.readouterr()
    assert err.err.strip() == "error: --batch-size must be at least 1, got 0" and "fold 1/2" not in err.out
    assert not out.exists()  # so the same --out-dir works once the flag is fixed
    # Nor does one refused by its data: more folds than patients is found from the file names, before
    # fold 1's header was printed.
    assert main(["cv", *tiny(tmp_path, "--folds", "5", "--epochs", "1", "--out-dir", str(out))]) == 2
    printed = capsys.readouterr()
    assert "--folds 5 is more than the 4 patients found" in printed.err and not out.exists()
    assert "fold 1/5" not in printed.out
    assert main(["cv", *tiny(tmp_path, "--folds", "2", "--epochs", "1", "--out-dir", str(out))]) == 0  # now free
