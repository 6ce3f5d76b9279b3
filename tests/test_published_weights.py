"""Published weights as --checkpoint: predict, evaluate and export without a training run, the
overlap warnings for Buda et al.'s training patients, and release files named by their hash."""

from __future__ import annotations

import hashlib
import json

import cv2
import numpy as np
import pytest
import torch
from conftest import write_slice

from engine import main
from conftest import unet_to_buda
from model import UNet

HELD_OUT = "TCGA_HT_7616_19940304"  # one of the 10 patients Buda et al. validated on (--split buda)
TRAINED = "TCGA_CS_4941_19960909"  # one of the 100 they trained on


@pytest.fixture(scope="module")
def buda_weights(tmp_path_factory):
    """A state_dict with Buda et al.'s exact key names and shapes (random weights)."""
    torch.manual_seed(0)
    model = UNet()
    path = tmp_path_factory.mktemp("w") / "their-unet.pt"
    torch.save(unet_to_buda(model.state_dict()), path)
    return path


@pytest.fixture(scope="module")
def tiny_tree(tmp_path_factory):
    """Two 3-slice patients of 64x64: one the authors held out, one they trained on."""
    root = tmp_path_factory.mktemp("data") / "kaggle_3m"
    rng = np.random.default_rng(0)
    for name in (HELD_OUT, TRAINED):
        for i in (1, 2, 3):
            image = np.zeros((64, 64, 3), np.uint8)
            image[8:56, 10:54] = rng.integers(40, 200, (48, 44, 3), dtype=np.uint8)
            mask = np.zeros((64, 64), np.uint8)
            mask[20:30, 20:30] = 255
            write_slice(root / name, name, i, image, mask)
    return root


def test_predict_with_their_weights_writes_one_mask_per_slice(tmp_path, buda_weights, tiny_tree):
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", str(buda_weights), "--input", str(tiny_tree / TRAINED),
                 "--output", str(out), "--device", "cpu", "--amp", "off"]) == 0
    masks = sorted((out / "masks" / TRAINED).glob("*.png"))
    assert [m.name for m in masks] == [f"{TRAINED}_{i}_pred.png" for i in (1, 2, 3)]
    assert all(cv2.imread(str(m), cv2.IMREAD_UNCHANGED).shape == (64, 64) for m in masks)


def test_evaluate_their_weights_warns_about_the_patients_they_trained_on(tmp_path, buda_weights, tiny_tree, capsys):
    run = ["evaluate", "--checkpoint", str(buda_weights), "--data-dir", str(tiny_tree), "--device", "cpu",
           "--amp", "off"]
    assert main([*run, "--patients", "all", "--out-dir", str(tmp_path / "all")]) == 0
    err = capsys.readouterr().err
    assert f"1 of the 2 patients scored was used to train this model ({TRAINED})" in err
    metrics = json.loads((tmp_path / "all" / "metrics.json").read_text())
    assert metrics["scored_patients_trained_on"] == 1 and metrics["scored_patients_trained_on_names"] == [TRAINED]
    assert metrics["patients"] == 2
    # Their validation patients are the --split buda ones: here only HELD_OUT, and no warning.
    assert main([*run, "--out-dir", str(tmp_path / "val")]) == 0
    assert "warning" not in capsys.readouterr().err
    assert [p["patient"] for p in json.loads((tmp_path / "val" / "metrics.json").read_text())["per_patient"]] == [HELD_OUT]


def test_export_round_trips_and_the_name_carries_the_hash(tmp_path, buda_weights, tiny_tree, capsys):
    assert main(["export", "--checkpoint", str(buda_weights), "--format", "state_dict",
                 "--output", str(tmp_path / "release")]) == 0
    [released] = list((tmp_path / "release").iterdir())  # nothing else: no temporary file is left
    assert released.name.startswith("unet-") and released.suffix == ".pt"
    assert hashlib.sha256(released.read_bytes()).hexdigest().startswith(released.stem[5:])
    assert released.stat().st_size < buda_weights.stat().st_size * 0.6  # fp16: about half
    loaded = torch.load(released, weights_only=True)
    assert (loaded["config"]["image_size"], loaded["config"]["normalization"]) == (256, "buda")
    import hubconf  # torch.hub's entry point loads the release file by path (or URL)
    hub_model = hubconf.unet(pretrained=str(released))
    assert all(torch.equal(v, loaded["model"][k].float()) for k, v in hub_model.state_dict().items()
               if v.is_floating_point())
    for spec, out in ((buda_weights, "a"), (released, "b")):
        assert main(["predict", "--checkpoint", str(spec), "--input", str(tiny_tree / HELD_OUT),
                     "--output", str(tmp_path / out), "--device", "cpu", "--amp", "off"]) == 0
    for i in (1, 2, 3):
        a, b = (cv2.imread(str(tmp_path / o / "masks" / HELD_OUT / f"{HELD_OUT}_{i}_pred.png"), cv2.IMREAD_UNCHANGED)
                for o in "ab")
        assert np.array_equal(a, b)
    # A file whose name does not match its content is refused.
    wrong = tmp_path / "unet-00000000.pt"
    wrong.write_bytes(released.read_bytes())
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(wrong), "--input", str(tiny_tree / HELD_OUT),
                 "--output", str(tmp_path / "c"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "its name says sha256 00000000" in err


def test_a_plain_state_dict_needs_its_size_and_normalization(tmp_path, tiny_tree, capsys):
    path = tmp_path / "ours.pt"
    torch.save(UNet(features=4).state_dict(), path)
    run = ["predict", "--checkpoint", str(path), "--input", str(tiny_tree / TRAINED), "--device", "cpu"]
    assert main([*run, "--output", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pass --image-size and --normalization" in err
    assert main([*run, "--output", str(tmp_path / "b"), "--image-size", "32", "--normalization", "volume"]) == 0
    assert len(list((tmp_path / "b" / "masks" / TRAINED).glob("*.png"))) == 3
    # Weights of neither network: one line, not a KeyError.
    torch.save({"head.weight": torch.zeros(2)}, path)
    assert main([*run, "--output", str(tmp_path / "c"), "--image-size", "32", "--normalization", "volume"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "of an unknown layout" in err and not (tmp_path / "c").exists()


def test_epochs_zero_is_refused_with_a_pointer(tmp_path, capsys):
    assert main(["--data-dir", str(tmp_path / "s"), "--epochs", "0",
                 "--out-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "evaluate --checkpoint" in err and not (tmp_path / "r").exists()


def test_fine_tuning_their_weights_warns_when_it_validates_on_their_training_patients(
        tmp_path, buda_weights, tiny_tree, capsys):
    args = ["--data-dir", str(tiny_tree), "--pretrained", str(buda_weights), "--image-size", "32", "--epochs", "1",
            "--batch-size", "2", "--device", "cpu", "--amp", "off"]
    assert main([*args, "--val-patients", "TCGA_CS_4941", "--out-dir", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert out.count("warning: Buda et al.'s weights were trained on 1 of the 1 validation patients") == 1
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert metrics["scored_patients_trained_on_names"] == [TRAINED]
    assert main([*args, "--val-patients", "TCGA_HT_7616", "--out-dir", str(tmp_path / "b")]) == 0
    assert "warning" not in capsys.readouterr().out
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["scored_patients_trained_on"] == 0


def preset_with_weights(tree, weights) -> list[str]:
    """A one-step CPU-preset run that fine-tunes ``weights``, without --features or --out-dir."""
    return ["--preset", "cpu", "--data-dir", str(tree), "--pretrained", str(weights), "--image-size", "32",
            "--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "2", "--device", "cpu", "--amp", "off",
            "--val-patients", "TCGA_HT_7616"]


def test_the_cpu_preset_fine_tunes_weights_of_another_width(tmp_path, buda_weights, tiny_tree, capsys):
    """The CPU preset builds width 24; Buda et al.'s weights are width 32, so they set the width
    (and their normalization), rather than the run failing on a flag the user never gave."""
    args = [*preset_with_weights(tiny_tree, buda_weights), "--out-dir", str(tmp_path / "r")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.count("these weights are --features 32; using it") == 1
    record = json.loads((tmp_path / "r" / "config.json").read_text())
    assert (record["features"], record["normalization"]) == (32, "buda")
    saved = torch.load(tmp_path / "r" / "last.pt", weights_only=False)["model"]
    assert saved["inc.0.weight"].shape[0] == 32
    # The width the user asks for is the weights', so nothing is said.
    assert main([*args[:-1], str(tmp_path / "s"), "--features", "32"]) == 0
    assert "--features 32; using it" not in capsys.readouterr().out


def test_only_rank_0_says_the_weights_set_the_width(tmp_path, buda_weights, tiny_tree, capsys, monkeypatch):
    """The width is read before torchrun's processes join, so each would print it: the other ranks
    keep quiet (RANK is what torchrun sets; without WORLD_SIZE the run trains alone)."""
    args = preset_with_weights(tiny_tree, buda_weights)
    monkeypatch.setenv("RANK", "1")
    assert main([*args, "--out-dir", str(tmp_path / "r1")]) == 0
    assert "--features 32; using it" not in capsys.readouterr().out
    assert json.loads((tmp_path / "r1" / "config.json").read_text())["features"] == 32  # the width is still set
    monkeypatch.setenv("RANK", "0")
    assert main([*args, "--out-dir", str(tmp_path / "r0")]) == 0
    assert capsys.readouterr().out.count("these weights are --features 32; using it") == 1
