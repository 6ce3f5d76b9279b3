"""2.5D input (--context-slices): which neighbours join each slice, with which statistics, and the
whole path from training through evaluate, predict and export with the wider first layer."""

import json

import numpy as np
import pytest
import torch

from data_loaders import (
    FLAIR_CHANNEL,
    LGGSlices,
    context_positions,
    group_by_patient,
    load_volume,
    make_synthetic_dataset,
    make_volume,
    scan_dataset,
)
from data_preprocessing import eval_preprocess, train_preprocess
from engine import main
from test_engine import tiny_args


def test_context_positions_are_nearest_first_and_clamped_to_the_volume():
    assert context_positions(2, 5, 2) == [1, 3, 0, 4]
    assert context_positions(0, 4, 2) == [0, 1, 0, 2]  # below slice 0: slice 0 again
    assert context_positions(3, 4, 1) == [2, 3]
    assert context_positions(0, 1, 1) == [0, 0]  # a one-slice volume is its own neighbour
    assert context_positions(2, 5, 0) == []


def _ramp_volume(n=4, size=16):
    """Slice j holds pre-contrast j, FLAIR 10 (j + 1) and post-contrast 100 + j in every pixel."""
    images = np.zeros((n, size, size, 3), np.uint8)
    for j in range(n):
        images[j] = (j, 10 * (j + 1), 100 + j)
    masks = np.zeros((n, size, size), np.uint8)
    masks[1, 4:8, 4:8] = 1
    return make_volume("P", images, masks, list(range(1, n + 1)))


def _constant(values, size=16):
    return torch.tensor(values, dtype=torch.uint8)[:, None, None].expand(len(values), size, size)


def test_items_carry_the_neighbours_flair_with_the_flair_statistics():
    vol = _ramp_volume()
    stats = vol.stats.as_tensor()  # (4, 3)
    ds = LGGSlices([vol], eval_preprocess(16), context=2)
    plain = LGGSlices([vol], eval_preprocess(16))
    # Own three channels, then FLAIR of j-1, j+1, j-2, j+2 (FLAIR of slice i is 10 (i + 1)), clamped.
    expected = {0: [0, 10, 100, 10, 20, 10, 30], 1: [1, 20, 101, 10, 30, 10, 40],
                2: [2, 30, 102, 20, 40, 10, 40], 3: [3, 40, 103, 30, 40, 20, 40]}
    for j, values in expected.items():
        item = ds[j]
        assert torch.equal(item["image"], _constant(values)), j
        assert item["stats"].shape == (4, 7) and torch.equal(item["stats"][:, :3], stats)
        for c in range(3, 7):
            assert torch.equal(item["stats"][:, c], stats[:, FLAIR_CHANNEL])
        assert torch.equal(item["mask"], plain[j]["mask"])
        assert torch.equal(plain[j]["image"], item["image"][:3])  # context 0 is the 2D input, unchanged
    assert plain[0]["image"].shape[0] == 3 and plain[0]["stats"].shape == (4, 3)


def test_modality_dropout_leaves_the_neighbours_alone():
    vol = _ramp_volume()
    item = LGGSlices([vol], eval_preprocess(16), context=1, modality_dropout=1.0)[1]
    assert torch.equal(item["image"], _constant([20, 20, 20, 10, 30]))
    flair = vol.stats.as_tensor()[:, FLAIR_CHANNEL]
    assert all(torch.equal(item["stats"][:, c], flair) for c in range(5))


def test_training_augmentation_moves_every_channel_alike():
    # Three identical slices: whatever zoom, rotation and flip an item draws, the neighbours' FLAIR
    # must still equal the slice's own FLAIR pixel for pixel.
    rng = np.random.default_rng(0)
    slice_ = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
    vol = make_volume("P", np.stack([slice_] * 3), np.zeros((3, 32, 32), np.uint8), [1, 2, 3])
    ds = LGGSlices([vol], train_preprocess(32), context=1)
    moved = 0
    for seed in range(8):
        ds.reseed(seed)
        image = ds[1]["image"]
        assert torch.equal(image[3], image[FLAIR_CHANNEL]) and torch.equal(image[4], image[FLAIR_CHANNEL]), seed
        moved += not torch.equal(image[FLAIR_CHANNEL], torch.from_numpy(slice_[..., FLAIR_CHANNEL]))
    assert moved > 0  # the augmentation did act


@pytest.fixture(scope="module")
def context_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("context")
    assert main(tiny_args(tmp_path, "run", "--context-slices", "1", "--epochs", "1")) == 0
    return tmp_path


def test_training_builds_a_five_channel_unet_and_records_it(context_run):
    ckpt = torch.load(context_run / "run" / "last.pt", weights_only=True)
    assert ckpt["model"]["inc.0.weight"].shape == (4, 5, 3, 3)
    assert ckpt["config"]["context_slices"] == 1
    assert json.loads((context_run / "run" / "config.json").read_text())["context_slices"] == 1


def test_evaluate_predict_and_export_read_the_context_from_the_checkpoint(context_run, capsys):
    run = context_run / "run"
    out = context_run / "eval"
    assert main(["evaluate", "--checkpoint", str(run / "last.pt"), "--device", "cpu", "--out-dir", str(out),
                 "--batch-size", "3", "--no-progress", "--cache-dir", "off"]) == 0
    trained = json.loads((run / "metrics.json").read_text())
    evaluated = json.loads((out / "metrics.json").read_text())
    for key in ("dice_per_volume_mean", "dice_global", "precision", "recall"):
        assert evaluated[key] == pytest.approx(trained[key], abs=1e-9), key

    patient = sorted(p for p in (context_run / "syn").iterdir() if p.is_dir())[0]
    assert main(["predict", "--checkpoint", str(run / "last.pt"), "--input", str(patient),
                 "--output", str(context_run / "pred")]) == 0
    assert len(list((context_run / "pred" / "masks").rglob("*.png"))) == 6
    assert "single slice" not in capsys.readouterr().out
    one = context_run / "one"  # one slice alone has no neighbours to read: the user is told
    one.mkdir()
    for f in sorted(patient.glob("*_3*.tif")):
        (one / f.name).write_bytes(f.read_bytes())
    assert main(["predict", "--checkpoint", str(run / "last.pt"), "--input", str(one),
                 "--output", str(context_run / "pred-one")]) == 0
    assert "a single slice, but this model also reads the 1 slice(s) on each side" in capsys.readouterr().out

    ts = context_run / "unet.ts"
    assert main(["export", "--checkpoint", str(run / "last.pt"), "--format", "torchscript", "--output", str(ts)]) == 0
    assert float(capsys.readouterr().out.split("batch of 2: ")[1].split()[0]) < 1e-4
    assert torch.jit.load(str(ts))(torch.randn(2, 5, 32, 32)).shape == (2, 1, 32, 32)


def test_released_weights_keep_the_context_and_score_as_the_checkpoint(context_run, capsys):
    run = context_run / "run"
    assert main(["export", "--checkpoint", str(run / "last.pt"), "--format", "state_dict",
                 "--output", str(context_run / "release")]) == 0
    released = next((context_run / "release").glob("unet-*.pt"))
    assert torch.load(released, weights_only=True)["config"]["context_slices"] == 1
    scores = {}
    for name, ckpt in (("checkpoint", run / "last.pt"), ("release", released)):
        out = context_run / f"eval-{name}"
        assert main(["evaluate", "--checkpoint", str(ckpt), "--data-dir", str(context_run / "syn"), "--patients",
                     "SYN_01", "--device", "cpu", "--out-dir", str(out), "--no-progress", "--cache-dir", "off"]) == 0
        scores[name] = json.loads((out / "metrics.json").read_text())["dice_per_volume_mean"]
    assert scores["release"] == pytest.approx(scores["checkpoint"], abs=1e-3)


def test_a_plain_state_dict_tells_its_context_by_its_first_layer(context_run, capsys):
    weights = context_run / "weights.pt"
    torch.save(torch.load(context_run / "run" / "last.pt", weights_only=True)["model"], weights)
    out = context_run / "eval-plain"
    assert main(["evaluate", "--checkpoint", str(weights), "--data-dir", str(context_run / "syn"),
                 "--patients", "SYN_00", "--image-size", "32", "--normalization", "volume", "--device", "cpu",
                 "--out-dir", str(out), "--no-progress", "--cache-dir", "off"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["patients"] == 1 and metrics["per_patient"][0]["patient"].startswith("SYN_00")


@pytest.mark.parametrize("extra, says", [(["--context-slices", "5"], "0 to 4"),
                                         (["--context-slices", "-1"], "0 to 4"),
                                         (["--context-slices", "1", "--encoder", "resnet34"], "--encoder resnet34")])
def test_impossible_context_is_refused_before_a_run_folder_exists(tmp_path, capsys, extra, says):
    assert main(tiny_args(tmp_path, "run", *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--context-slices" in err and says in err
    assert not (tmp_path / "run").exists()
    # The benchmark refuses it too, before it times or generates anything.
    assert main(["benchmark", *extra, "--synthetic", "--synthetic-dir", str(tmp_path / "syn"), "--device", "cpu",
                 "--out", str(tmp_path / "b.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and says in err
    assert not (tmp_path / "syn").exists() and not (tmp_path / "b.json").exists()


def test_synthetic_volumes_give_each_slice_its_real_neighbours(tmp_path):
    # Read from files, in slice order: the neighbours are the files numbered one below and one above.
    root = make_synthetic_dataset(tmp_path / "kaggle_3m", patients=2, slices=5, size=32)
    vol = load_volume(next(iter(group_by_patient(scan_dataset(root)).values())))
    image = LGGSlices([vol], eval_preprocess(32), context=1)[2]["image"]
    assert torch.equal(image[3], torch.from_numpy(vol.images[1, ..., FLAIR_CHANNEL]))
    assert torch.equal(image[4], torch.from_numpy(vol.images[3, ..., FLAIR_CHANNEL]))
    assert not torch.equal(image[3], image[FLAIR_CHANNEL])
