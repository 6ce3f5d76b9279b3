"""Published-weight mapping, --pretrained and fine-tuning, predict, export and torch.hub."""

import json
import re
import shutil
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from conftest import REAL_DATA, between_float16_values, requires_real_data, write_slice

from synthetic_data import make_synthetic_dataset
from engine import main
from conftest import unet_to_buda
from model import UNet, load_weights

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def buda_file(tmp_path_factory):
    """A state_dict with Buda et al.'s exact key names and shapes, from a seeded UNet."""
    torch.manual_seed(0)
    model = UNet()
    model.train()
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))  # non-trivial BatchNorm buffers
    path = tmp_path_factory.mktemp("w") / "unet-buda.pt"
    torch.save(unet_to_buda(model.state_dict()), path)
    return path, model.eval()


def test_buda_key_mapping_round_trip(buda_file):
    path, original = buda_file
    theirs = torch.load(path, weights_only=True)
    assert len(theirs) == 118
    assert theirs["encoder1.enc1conv1.weight"].shape == (32, 3, 3, 3)
    assert theirs["encoder1.enc1norm1.running_mean"].shape == (32,)
    assert theirs["upconv4.weight"].shape == (512, 256, 2, 2)
    assert theirs["decoder1.dec1conv2.weight"].shape == (32, 32, 3, 3)
    assert theirs["conv.bias"].shape == (1,)
    state_dict, kind, normalization = load_weights(str(path))
    assert (kind, normalization) == ("buda", "buda")
    fresh = UNet()
    fresh.load_state_dict(state_dict)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), original(x))


def test_torch_hub_loads_the_same_model(buda_file):
    path, original = buda_file
    model = torch.hub.load(str(ROOT), "unet", source="local", pretrained=str(path), trust_repo=True)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), original(x))
    assert sum(p.numel() for p in torch.hub.load(str(ROOT), "unet", source="local").parameters()) == 7_763_041


def tiny_run(tmp_path, *extra):
    data = make_synthetic_dataset(tmp_path / "syn" / "kaggle_3m", patients=4, slices=4, size=64)
    return ["--data-dir", str(data), "--image-size", "32", "--epochs", "1", "--batch-size", "4",
            "--device", "cpu", *extra]


def test_pretrained_buda_weights_switch_normalization_and_freeze_encoder(tmp_path, buda_file, capsys):
    path, original = buda_file
    run = tmp_path / "run"
    assert main(tiny_run(tmp_path, "--pretrained", str(path), "--encoder-lr-scale", "0", "--out-dir", str(run))) == 0
    printed = capsys.readouterr().out
    assert "expect --normalization buda" in printed and "--encoder-lr-scale" not in printed  # as meant
    assert json.loads((run / "config.json").read_text())["normalization"] == "buda"
    trained = torch.load(run / "last.pt", weights_only=True)["model"]
    start = original.state_dict()
    for key in ("inc.0.weight", "down4.1.3.weight", "down2.1.1.running_mean"):
        assert torch.equal(trained[key], start[key]), key  # frozen: weights and BN statistics
    assert not torch.equal(trained["up4.conv.0.weight"], start["up4.conv.0.weight"])  # decoder trained


def test_a_checkpoint_of_a_removed_network_variant_is_refused_in_one_line(tmp_path, checkpoint, capsys):
    """A checkpoint trained with --encoder resnet34, --context-slices or --norm-layer group (levers
    removed after losing their experiments) names the commit that still loads it."""
    from model import REMOVED_IN

    for key, value in (("encoder", "resnet34"), ("context_slices", 1), ("norm_layer", "group")):
        ckpt = torch.load(checkpoint, weights_only=False)
        ckpt["config"][key] = value
        path = tmp_path / f"{key}.pt"
        torch.save(ckpt, path)
        assert main(["evaluate", "--checkpoint", str(path), "--device", "cpu"]) == 2
        err = capsys.readouterr().err.strip()
        flag = "--" + key.replace("_", "-")
        assert err.count("\n") == 0 and str(path) in err and f"{flag} {value}" in err and REMOVED_IN in err


def test_pretrained_download_failure_is_one_line(tmp_path, capsys):
    assert main(tiny_run(tmp_path, "--pretrained", "http://127.0.0.1:9/unet.pt", "--out-dir", str(tmp_path / "r"))) == 2
    # torch.hub announces the download itself: on stderr in torch 2.5, on stdout in recent releases.
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("Downloading: ")]
    assert len(err) == 1 and "download failed" in err[0]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    config = {"features": 4, "image_size": 32, "channels_last": True, "threshold": 0.5,
              "normalization": "volume", "resolved_data_dir": "", "seed": 0, "batch_size": 4,
              "patients": {"train": [], "validation": []}, "synthetic_data": True}
    torch.save({"model": UNet(features=4).state_dict(), "config": config, "epoch": 1}, path)
    return path


def test_predict_on_a_mixed_folder(tmp_path, checkpoint, capsys):
    folder = tmp_path / "in"
    rng = np.random.default_rng(0)
    for i in (1, 2, 10):
        write_slice(folder, "P", i, rng.integers(0, 255, (40, 48, 3), dtype=np.uint8), np.zeros((40, 48), np.uint8))
    cv2.imwrite(str(folder / "gray.png"), rng.integers(0, 255, (20, 30), dtype=np.uint8))
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.png").write_text("not an image either")
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", str(checkpoint), "--input", str(folder), "--output", str(out),
                 "--device", "cpu", "--batch-size", "2", "--spacing", "3,0.5,0.5"]) == 0
    captured = capsys.readouterr()
    assert "skipped (not an image)" in captured.err and "notes.txt" in captured.err and "broken.png" in captured.err
    masks = sorted((out / "masks" / "in").glob("*.png"))
    assert [m.name for m in masks] == ["P_10_pred.png", "P_1_pred.png", "P_2_pred.png", "gray_pred.png"]
    for m in masks:
        shape = cv2.imread(str(m), cv2.IMREAD_UNCHANGED).shape
        assert shape == ((20, 30) if m.name.startswith("gray") else (40, 48))  # the input's size
        assert set(np.unique(cv2.imread(str(m), cv2.IMREAD_UNCHANGED))) <= {0, 255}
    # One overlay grid per volume: the folder's slices of each size are a volume of their own.
    assert sorted(p.name for p in (out / "overlays").glob("*.png")) == ["in_20x30_8bit.png", "in_40x48_8bit.png"]
    table = pd.read_csv(out / "predictions.csv")
    slices = table[table["level"] == "slice"]
    assert len(slices) == 4 and "P_1_mask" not in " ".join(table["file"].fillna(""))
    patient = table[table["level"] == "patient"].iloc[0]
    assert patient["area_px"] == slices["area_px"].sum()
    assert patient["volume_mm3"] == pytest.approx(patient["area_px"] * 3 * 0.5 * 0.5)
    for _, row in slices.iterrows():  # the CSV's area is the mask written to disk
        name = Path(row["file"]).stem + "_pred.png"
        assert row["area_px"] == (cv2.imread(str(out / "masks" / "in" / name), cv2.IMREAD_UNCHANGED) > 0).sum()


def test_a_tilde_the_shell_left_is_the_home_folder(tmp_path, checkpoint, monkeypatch):
    """--checkpoint=~/m.pt reaches the program with its '~' (bash expands it only at a word's start):
    it was 'no such checkpoint', and --output=~/x made a folder named '~' in the working folder."""
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir(), work.mkdir()
    shutil.copy(checkpoint, home / "m.pt")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    assert main(["export", "--checkpoint=~/m.pt", "--format", "torch_export", "--output=~/exports/m.pt2"]) == 0
    assert (home / "exports" / "m.pt2").is_file() and not any(work.iterdir())


def test_the_dataset_roots_own_files_are_not_reported_as_skipped_inputs(tmp_path, checkpoint, capsys):
    """predict on a kaggle_3m root reported its data.csv and README.md as 'skipped (not an image)' and
    counted them: the check was silent about them only inside patient folders, where they never are."""
    root = tmp_path / "kaggle_3m"
    write_slice(root / "P_20000101", "P_20000101", 1, np.full((40, 48, 3), 90, np.uint8), np.zeros((40, 48), np.uint8))
    (root / "data.csv").write_text("Patient,death01\nP,0\n")
    (root / "README.md").write_text("the dataset")
    (root / "notes.txt").write_text("a file of the user's, named")
    (root / ".ipynb_checkpoints").mkdir()  # a hidden folder is no patient's: nothing read, nothing said
    (root / ".ipynb_checkpoints" / "explore-checkpoint.ipynb").write_text("{}")
    assert main(["predict", "--checkpoint", str(checkpoint), "--input", str(root), "--output", str(tmp_path / "o"),
                 "--device", "cpu"]) == 0
    printed = capsys.readouterr()
    assert printed.err.strip() == f"skipped (not an image): {root / 'notes.txt'}"
    assert "skipped 1 file (listed above)" in printed.out


def test_the_folder_the_kaggle_archive_was_unpacked_into_is_predicted_once(tmp_path, checkpoint, capsys):
    """--data-dir accepts the folder archive.zip was unpacked into; predict read only its two top
    levels, found no slice and stopped. Kaggle's archive holds kaggle_3m and
    lgg-mri-segmentation/kaggle_3m, the same patients twice: each must be predicted once."""
    unpacked = tmp_path / "lgg-mri-segmentation"
    rng = np.random.default_rng(0)
    images = {n: rng.integers(0, 255, (40, 48, 3), dtype=np.uint8) for n in (1, 2)}
    for root in (unpacked / "kaggle_3m", unpacked / "lgg-mri-segmentation" / "kaggle_3m"):
        for n, image in images.items():
            write_slice(root / "P_20000101", "P_20000101", n, image, np.zeros((40, 48), np.uint8))
    for name, given in (("whole", unpacked), ("root", unpacked / "kaggle_3m")):
        assert main(["predict", "--checkpoint", str(checkpoint), "--input", str(given), "--output",
                     str(tmp_path / name), "--device", "cpu", "--probabilities"]) == 0
    assert f"note: {unpacked} holds the dataset in {unpacked / 'kaggle_3m'}" in capsys.readouterr().err
    rows = pd.read_csv(tmp_path / "whole" / "predictions.csv")
    assert rows["file"].tolist() == pd.read_csv(tmp_path / "root" / "predictions.csv")["file"].tolist()
    assert rows["level"].tolist() == ["slice", "slice", "patient"]
    for n in (1, 2):
        written = [cv2.imread(str(tmp_path / out / "probabilities" / "P_20000101" / f"P_20000101_{n}_prob.tif"),
                              cv2.IMREAD_UNCHANGED) for out in ("whole", "root")]
        assert written[0].shape == (40, 48) and np.array_equal(*written)


def test_2d_slices_are_padded_to_a_square_field_of_view_in_mm_with_spacing(tmp_path, checkpoint, monkeypatch):
    """40 x 30 slices are padded to 40 x 40 when their pixels are taken as square, and not at all
    when --spacing says they are 0.75 mm high and 1 mm wide (30 x 30 mm); the masks keep the input's size."""
    import data_files

    windows = []
    real = data_files.square_field_of_view
    monkeypatch.setattr(data_files, "square_field_of_view",
                        lambda *a: (lambda r: windows.append(r[2]) or r)(real(*a)))
    folder = tmp_path / "in"
    for i in (1, 2):
        write_slice(folder, "P", i, np.full((40, 30, 3), 90, np.uint8), np.zeros((40, 30), np.uint8))
    for run, spacing in (("square", []), ("spaced", ["--spacing", "3,0.75,1"])):
        assert main(["predict", "--checkpoint", str(checkpoint), "--input", str(folder),
                     "--output", str(tmp_path / run), "--device", "cpu", *spacing]) == 0
        mask = cv2.imread(str(tmp_path / run / "masks" / "in" / "P_1_pred.png"), cv2.IMREAD_UNCHANGED)
        assert mask.shape == (40, 30)
    assert windows == [(0, 5, 40, 30), None]


def test_one_slice_in_two_files_is_refused_before_any_mask_is_written(tmp_path, checkpoint, capsys):
    """P_1.tif beside P_1.png went into the volume as two slices, and the second mask overwrote the
    first: 'predicted 3 slices' with 2 mask files."""
    folder = tmp_path / "in"
    for name in ("P_1.tif", "P_1.png", "P_2.tif"):
        folder.mkdir(exist_ok=True)
        cv2.imwrite(str(folder / name), np.full((40, 40, 3), 90, np.uint8))
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", str(checkpoint), "--input", str(folder), "--output", str(out),
                 "--device", "cpu"]) == 2
    assert capsys.readouterr().err.strip() == (f"error: {folder}: P_1.png and P_1.tif are one slice in two files "
                                               "(both masks would be P_1_pred.png); keep one of them, or move the "
                                               "other to a folder of its own")
    assert not out.exists()


def test_slices_of_a_volume_are_ordered_by_the_number_ending_their_name(tmp_path):
    """Slices exported as 1.png ... 10.png (or slice1 ...) were ordered by name, 10 before 2, so the
    volume's 3D post-processing joined slices that are not neighbours."""
    from inference import collect_inputs

    for names in (["1", "2", "10", "9"], ["slice1", "slice10", "slice2"], ["IM-0001-0010", "IM-0001-0002"],
                  ["P_10", "P_2", "P_1"]):
        folder = tmp_path / names[0]
        folder.mkdir()
        for name in names:
            (folder / f"{name}.png").write_bytes(b"")
        groups, _ = collect_inputs(folder)
        expected = sorted(names, key=lambda n: int(re.search(r"(\d+)$", n)[1]))
        assert [f.stem for f in groups[folder.name]] == expected, names


def test_predict_threshold_flag(tmp_path, checkpoint, capsys):
    # The masks at 0.6 lie inside those at 0.4 (lower threshold, more tumor), and they differ.
    folder = tmp_path / "in"
    rng = np.random.default_rng(1)
    for i in (1, 2, 3):
        write_slice(folder, "P", i, rng.integers(0, 255, (40, 48, 3), dtype=np.uint8), np.zeros((40, 48), np.uint8))
    masks = {}
    for t in (0.4, 0.6):
        out = tmp_path / f"out-{t}"
        assert main(["predict", "--checkpoint", str(checkpoint), "--input", str(folder), "--output", str(out),
                     "--device", "cpu", "--postprocess", "none", "--threshold", str(t)]) == 0
        assert f"threshold {t:g}" in capsys.readouterr().out
        masks[t] = np.stack([cv2.imread(str(m), cv2.IMREAD_UNCHANGED) > 0
                             for m in sorted((out / "masks" / "in").glob("*.png"))])
    assert (masks[0.4] >= masks[0.6]).all() and masks[0.4].sum() > masks[0.6].sum()


def test_predict_writes_each_slices_probability_as_float32_that_the_mask_was_cut_from(tmp_path, checkpoint, capsys):
    # Slices of 40 x 48: the probability comes back at the input's size, and cut at a threshold it
    # is the mask of --postprocess none at that threshold (but for probabilities equal to it, which
    # float16, how it is held, rounds either way).
    folder = tmp_path / "in"
    rng = np.random.default_rng(2)
    for i in (1, 2, 3):
        write_slice(folder, "P", i, rng.integers(0, 255, (40, 48, 3), dtype=np.uint8), np.zeros((40, 48), np.uint8))
    run = ["predict", "--checkpoint", str(checkpoint), "--input", str(folder), "--device", "cpu", "--postprocess",
           "none"]
    assert main([*run, "--probabilities", "--output", str(tmp_path / "out")]) == 0
    assert "probabilities/" in capsys.readouterr().out
    masks = sorted((tmp_path / "out" / "masks" / "in").glob("*_pred.png"))
    probs = [tmp_path / "out" / "probabilities" / "in" / m.name.replace("_pred.png", "_prob.tif") for m in masks]
    assert len(masks) == 3 and sorted((tmp_path / "out" / "probabilities" / "in").iterdir()) == probs
    prob = np.stack([np.asarray(Image.open(p)) for p in probs])  # a reader other than the writer's (OpenCV)
    assert prob.dtype == np.float32 and prob.shape == (3, 40, 48) and 0 <= prob.min() < prob.max() <= 1
    threshold = between_float16_values(prob, 2 / 3)
    assert main([*run, "--threshold", str(threshold), "--output", str(tmp_path / "cut")]) == 0
    mask = np.stack([cv2.imread(str(tmp_path / "cut" / "masks" / "in" / m.name), cv2.IMREAD_UNCHANGED) > 0
                     for m in masks])
    assert 0.1 < mask.mean() < 0.9 and ((prob > threshold) != mask).mean() < 0.005
    # An --output that holds probabilities alone is refused too: they would be mixed with another run's.
    (tmp_path / "two" / "probabilities").mkdir(parents=True)
    assert main([*run, "--probabilities", "--output", str(tmp_path / "two")]) == 2
    assert "already holds predictions (probabilities/)" in capsys.readouterr().err


@requires_real_data
def test_predict_on_real_slices(tmp_path, checkpoint):
    patient = sorted(p for p in REAL_DATA.iterdir() if p.is_dir())[0]
    folder = tmp_path / patient.name
    folder.mkdir()
    for i in (5, 6, 7):
        for suffix in ("", "_mask"):
            shutil.copy(patient / f"{patient.name}_{i}{suffix}.tif", folder)
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", str(checkpoint), "--input", str(folder), "--output", str(out),
                 "--device", "cpu"]) == 0
    masks = sorted((out / "masks" / patient.name).glob("*.png"))
    assert len(masks) == 3  # one per slice; the _mask.tif files are not inputs
    assert all(cv2.imread(str(m), cv2.IMREAD_UNCHANGED).shape == (256, 256) for m in masks)
    assert len(pd.read_csv(out / "predictions.csv")) == 4  # 3 slices + the patient total


def test_predict_goes_folder_by_folder_and_an_interrupt_keeps_the_folders_finished(tmp_path, checkpoint,
                                                                                    monkeypatch, capsys):
    """predict read and predicted a whole dataset root before writing anything: its memory grew with
    the input (3 GB for 66 patients), and Ctrl-C after minutes left nothing."""
    import inference

    rng = np.random.default_rng(0)
    for patient in ("TCGA_A", "TCGA_B", "TCGA_C"):
        for i in (1, 2):
            write_slice(tmp_path / "root" / patient, patient, i, rng.integers(0, 255, (32, 32, 3), dtype=np.uint8),
                        np.zeros((32, 32), np.uint8))
    seen, real_call = [], inference.Predictor.__call__

    def call(self, volumes):
        seen.append([v.name for v in volumes])
        if len(seen) == 3:
            raise KeyboardInterrupt
        return real_call(self, volumes)

    monkeypatch.setattr(inference.Predictor, "__call__", call)
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", str(checkpoint), "--input", str(tmp_path / "root"),
                 "--output", str(out), "--device", "cpu"]) == 130
    assert seen == [["TCGA_A"], ["TCGA_B"], ["TCGA_C"]]  # one folder in memory at a time
    table = pd.read_csv(out / "predictions.csv")
    assert table["patient"].tolist() == ["TCGA_A"] * 3 + ["TCGA_B"] * 3  # 2 slices and the total, each
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["TCGA_A", "TCGA_B"]
    assert capsys.readouterr().err.strip() == (f"interrupted; {out / 'predictions.csv'} lists what was predicted "
                                               "before, with its masks and overlays beside it; predict the rest into "
                                               "another --output")


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")  # the user's side, not ours
def test_torchscript_export_parity(tmp_path, checkpoint, capsys):
    out = tmp_path / "unet.ts"
    assert main(["export", "--checkpoint", str(checkpoint), "--format", "torchscript", "--output", str(out)]) == 0
    text = capsys.readouterr().out
    diff = float(text.split("eager PyTorch on a batch of 3: ")[1].split()[0])
    assert diff < 1e-4
    scripted = torch.jit.load(str(out))
    assert scripted(torch.randn(3, 3, 32, 32)).shape == (3, 1, 32, 32)
    # An export already there is kept, and a folder is not taken for the file (it was a traceback).
    before = out.read_bytes()
    for target, says in ((out, "already exists and is left as it is"), (tmp_path, "a folder; --output is the file")):
        assert main(["export", "--checkpoint", str(checkpoint), "--format", "torchscript",
                     "--output", str(target)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and f"{target}: {says}" in err
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["unet.ts"]
    # The export given back as a checkpoint: torch.load's warning and "damaged or not written by
    # torch.save" before; one line naming what it is and what to pass.
    for command in (["evaluate", "--data-dir", str(tmp_path)], ["predict", "--input", str(tmp_path),
                                                                "--output", str(tmp_path / "p")]):
        assert main([command[0], "--checkpoint", str(out), *command[1:]]) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"error: {out}: a TorchScript export, for your own code (torch.jit.load); pass the " \
                      "checkpoint it was exported from (a run's best.pt)"
    # A release file is named by its hash inside the --output folder: a .pt name made a folder of it.
    assert main(["export", "--checkpoint", str(checkpoint), "--format", "state_dict",
                 "--output", str(tmp_path / "weights.pt")]) == 2
    assert "--format state_dict writes into a folder" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unet.ts"]


def test_torch_export_parity_at_any_batch_size(tmp_path, checkpoint, capsys):
    """torch.export, TorchScript's successor: the program takes any batch size and computes what
    the checkpoint's network computes; given back as a checkpoint, it is named as what it is."""
    from model import UNet

    out = tmp_path / "unet.pt2"
    assert main(["export", "--checkpoint", str(checkpoint), "--format", "torch_export",
                 "--output", str(tmp_path / "unet.program")]) == 2  # torch.export.load would warn on it
    assert capsys.readouterr().err.strip().endswith(f"pass {out}")
    assert main(["export", "--checkpoint", str(checkpoint), "--format", "torch_export", "--output", str(out)]) == 0
    assert float(capsys.readouterr().out.split("eager PyTorch on a batch of 3: ")[1].split()[0]) < 1e-4
    program = torch.export.load(str(out)).module()
    model = UNet(features=4)
    model.load_state_dict(torch.load(checkpoint, weights_only=True)["model"])
    model.eval()
    for batch in (1, 2, 5):  # traced on 2; 1 is the size torch.export would have fixed, had it traced on it
        x = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            assert (program(x) - model(x)).abs().max().item() < 1e-4
    assert [p.name for p in tmp_path.iterdir()] == ["unet.pt2"]  # written whole, no temporary file left
    assert main(["evaluate", "--checkpoint", str(out), "--data-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (f"error: {out}: a PT2 (torch.export) export, for your own code "
                                               "(torch.export.load); pass the checkpoint it was exported from "
                                               "(a run's best.pt)")


def test_a_torch_export_program_in_torch_2_5s_layout_is_named_as_one(tmp_path, capsys):
    """torch 2.5's torch.export.save wrote the program's parts at the zip's top level; later
    releases write a PT2 archive (archive/archive_format, ...) and still load the old layout."""
    out = tmp_path / "unet.pt2"
    with zipfile.ZipFile(out, "w") as archive:
        for name in ("serialized_exported_program.json", "serialized_state_dict.pt", "serialized_constants.pt",
                     "serialized_example_inputs.pt", "version"):
            archive.writestr(name, b"{}")
    assert main(["evaluate", "--checkpoint", str(out), "--data-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().startswith(f"error: {out}: a PT2 (torch.export) export, for your own code")


def test_a_zip_archive_as_input_says_how_to_unzip_it(tmp_path, checkpoint, capsys):
    """predict read a zip as a broken image ('cannot be read as an image ... re-download it or
    delete it'), and evaluate found no case in it."""
    import zipfile

    archive = tmp_path / "scans.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("case/flair.nii.gz", b"")
    for command in ("predict", "evaluate"):
        assert main([command, "--checkpoint", str(checkpoint), "--input", str(archive),
                     *(["--output", str(tmp_path / "out")] if command == "predict" else [])]) == 2
        assert capsys.readouterr().err.strip() == (f"error: {archive}: a zip archive; unzip it ('unzip {archive} -d "
                                                   f"{tmp_path / 'scans'}') and pass the folder inside it")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scans.zip"]


def test_onnx_export_parity(tmp_path, checkpoint, capsys):
    """torch.onnx's torch.export-based exporter; the batch axis stays dynamic (traced on 2, checked on 3)."""
    pytest.importorskip("onnxscript")
    onnxruntime = pytest.importorskip("onnxruntime")
    out = tmp_path / "unet.onnx"
    assert main(["export", "--checkpoint", str(checkpoint), "--format", "onnx", "--output", str(out)]) == 0
    captured = capsys.readouterr()
    diff = float(captured.out.split("eager PyTorch on a batch of 3: ")[1].split()[0])
    assert diff < 1e-4 and captured.err == ""  # nor the exporter's progress lines, nor torch 2.5's warnings
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.run(None, {"image": np.zeros((5, 3, 32, 32), np.float32)})[0].shape == (5, 1, 32, 32)
    # Written whole, no temporary file left (onnxruntime keeps a device id under XDG_CACHE_HOME).
    assert [p.name for p in tmp_path.iterdir() if p.name != "xdg-cache"] == ["unet.onnx"]


def test_onnx_missing_gives_install_advice(tmp_path, checkpoint, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "onnxscript", None)
    assert main(["export", "--checkpoint", str(checkpoint), "--format", "onnx", "--output", str(tmp_path / "m.onnx")]) == 2
    assert "pip install onnx onnxscript onnxruntime" in capsys.readouterr().err


def test_predict_buda_crops_each_slice_size_of_a_mixed_folder(tmp_path, monkeypatch, capsys):
    """Bug 5: with --normalization buda a folder of mixed sizes skipped the brain crop without a word.
    Now each size is a volume of its own, cropped and normalized as if it were alone."""
    import data_files

    torch.manual_seed(0)
    config = {"features": 4, "image_size": 32, "channels_last": False, "threshold": 0.5,
              "normalization": "buda", "tta": False}
    ckpt = tmp_path / "buda.pt"
    torch.save({"model": UNet(features=4).state_dict(), "config": config, "epoch": 1}, ckpt)
    rng = np.random.default_rng(1)
    sizes = {"A": (40, 48), "B": (36, 30)}
    slices = {"A": (1, 2), "B": (3, 4)}  # one patient, P, whose slices come in two sizes
    for name, (h, w) in sizes.items():
        for i in slices[name]:
            image = np.zeros((h, w, 3), np.uint8)
            image[5 : h - 6, 7 : w - 5] = rng.integers(60, 255, (h - 11, w - 12, 3), dtype=np.uint8)  # the "head"
            for folder in (tmp_path / "mixed", tmp_path / name):
                write_slice(folder, "P", i, image, np.zeros((h, w), np.uint8))
    boxes = []
    real_box = data_files.brain_box
    monkeypatch.setattr(data_files, "brain_box", lambda v, *a, **k: boxes.append(v.shape) or real_box(v, *a, **k))
    run = ["predict", "--checkpoint", str(ckpt), "--device", "cpu", "--amp", "off"]
    assert main([*run, "--input", str(tmp_path / "mixed"), "--output", str(tmp_path / "out")]) == 0
    assert sorted(b[1:3] for b in boxes) == sorted(sizes.values())  # one crop per size
    assert "slices of 2 sizes" in capsys.readouterr().err
    for name in sizes:  # the same masks as predicting each size's slices on their own
        assert main([*run, "--input", str(tmp_path / name), "--output", str(tmp_path / f"out-{name}")]) == 0
        for i in slices[name]:
            alone = cv2.imread(str(tmp_path / f"out-{name}" / "masks" / name / f"P_{i}_pred.png"), cv2.IMREAD_UNCHANGED)
            mixed = cv2.imread(str(tmp_path / "out" / "masks" / "mixed" / f"P_{i}_pred.png"), cv2.IMREAD_UNCHANGED)
            assert alone.shape == sizes[name] and np.array_equal(alone, mixed)


def test_predict_on_what_users_feed_it(tmp_path, checkpoint, capsys):
    """One file; RGBA, grayscale and 16-bit slices; an empty folder; an output that holds results."""
    rng = np.random.default_rng(3)
    folder = tmp_path / "in"
    folder.mkdir()
    rgb = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
    cv2.imwrite(str(folder / "rgba.png"), np.dstack([rgb, np.full((40, 40), 255, np.uint8)]))
    cv2.imwrite(str(folder / "gray.png"), rgb[..., 1])
    cv2.imwrite(str(folder / "deep.tif"), rgb.astype(np.uint16) * 257)  # 16-bit: the same image, scaled
    cv2.imwrite(str(folder / "plain.tif"), rgb)
    run = ["predict", "--checkpoint", str(checkpoint), "--device", "cpu", "--amp", "off"]
    assert main([*run, "--input", str(folder), "--output", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "2 sizes or bit depths (40x40 16-bit (1), 40x40 8-bit (3))" in err and "Traceback" not in err
    masks = {m.name for m in (tmp_path / "out" / "masks" / "in").glob("*.png")}
    assert masks == {"rgba_pred.png", "gray_pred.png", "deep_pred.png", "plain_pred.png"}
    # A single file works on its own.
    assert main([*run, "--input", str(folder / "plain.tif"), "--output", str(tmp_path / "one")]) == 0
    assert len(list((tmp_path / "one" / "masks").rglob("*.png"))) == 1
    assert capsys.readouterr().out.startswith("predicted 1 slice (")
    # A ground-truth mask given as the one file was predicted on as if it were a slice.
    cv2.imwrite(str(folder / "plain_mask.tif"), np.zeros((40, 40), np.uint8))
    assert main([*run, "--input", str(folder / "plain_mask.tif"), "--output", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "plain_mask.tif: a mask (named *_mask), not an MRI slice" in err
    assert "(plain.tif)" in err and not (tmp_path / "m").exists()
    # An output folder that already holds results is refused, and they are left as they were.
    before = (tmp_path / "one" / "predictions.csv").read_bytes()
    assert main([*run, "--input", str(folder), "--output", str(tmp_path / "one")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "already holds predictions" in err
    assert (tmp_path / "one" / "predictions.csv").read_bytes() == before
    # An empty folder, or one with nothing readable: one line, nothing written.
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    for name in ("empty", "junk"):
        assert main([*run, "--input", str(tmp_path / name), "--output", str(tmp_path / f"o-{name}")]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert lines[-1].startswith("error:") and "no readable slice" in lines[-1]
        assert not (tmp_path / f"o-{name}").exists()


def test_predict_normalizes_as_the_checkpoint_says(tmp_path, checkpoint, monkeypatch, capsys):
    """A model trained with --normalization buda gets its inputs normalized by the authors' pipeline in predict."""
    import data_files

    seen = []
    real = data_files.set_normalization
    monkeypatch.setattr(data_files, "set_normalization",
                        lambda v, method, size: seen.append(method) or real(v, method, size))
    ckpt = torch.load(checkpoint, weights_only=False)
    ckpt["config"]["normalization"] = "buda"
    path = tmp_path / "buda.pt"
    torch.save(ckpt, path)
    folder = tmp_path / "in"
    rng = np.random.default_rng(0)
    for i in (1, 2):
        write_slice(folder, "P", i, rng.integers(0, 255, (32, 32, 3), dtype=np.uint8), np.zeros((32, 32), np.uint8))
    assert main(["predict", "--checkpoint", str(path), "--input", str(folder), "--output", str(tmp_path / "out"),
                 "--device", "cpu"]) == 0
    assert seen == ["buda"]
    assert "warning" not in capsys.readouterr().err
    # Another normalization or size than the checkpoint's is used as asked, and said (it was silent).
    assert main(["predict", "--checkpoint", str(path), "--input", str(folder), "--output", str(tmp_path / "out2"),
                 "--device", "cpu", "--normalization", "volume", "--image-size", "64"]) == 0
    assert seen == ["buda", "volume"]
    err = capsys.readouterr().err
    assert f"warning: {path} was trained with --normalization buda; using --normalization volume as asked" in err
    assert f"warning: {path} was trained with --image-size {ckpt['config']['image_size']}; using --image-size 64" in err


def test_values_no_command_can_use_are_refused_in_one_line_before_any_work(tmp_path, checkpoint, capsys):
    """Each of these broke far from its flag (a division by zero in the loader, a mkdir on a file
    after the whole evaluation, a shape check inside the UNet) with a traceback."""
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    ckpt = str(checkpoint)
    cases = [
        (["evaluate", "--checkpoint", ckpt, "--batch-size", "0"], "--batch-size must be at least 1, got 0"),
        (["evaluate", "--checkpoint", ckpt, "--image-size", "100"], "--image-size must be a positive multiple of 16"),
        (["evaluate", "--checkpoint", ckpt, "--out-dir", str(a_file)], f"{a_file}: is a file, not a folder"),
        (["predict", "--checkpoint", ckpt, "--input", str(tmp_path), "--output", str(a_file)],
         f"{a_file}: is a file, not a folder; choose another --output"),
        (["predict", "--checkpoint", ckpt, "--input", str(tmp_path), "--output", str(tmp_path / "p"),
          "--batch-size", "-2"], "--batch-size must be at least 1, got -2"),
        (["export", "--checkpoint", ckpt, "--format", "torchscript", "--output", str(a_file / "unet.ts")],
         f"{a_file / 'unet.ts'}: {a_file} is a file, not a folder; choose another --output"),
        (["export", "--checkpoint", ckpt, "--format", "state_dict", "--output", str(a_file)], "is a file"),
        # Ignored in silence: the export kept the checkpoint's own record.
        (["export", "--checkpoint", ckpt, "--format", "torchscript", "--output", str(tmp_path / "u.ts"),
          "--image-size", "64"], f"--image-size 64: {ckpt} records --image-size 32, which the export keeps"),
        (["export", "--checkpoint", ckpt, "--format", "state_dict", "--output", str(tmp_path / "rel"),
          "--normalization", "buda"], f"--normalization buda: {ckpt} records --normalization volume"),
        (["benchmark", "--data-dir", str(tmp_path), "--batch-size", "0"], "--batch-size must be at least 1"),
        (["benchmark", "--data-dir", str(tmp_path), "--repeats", "0"], "--repeats must be at least 1, got 0"),
        (["benchmark", "--data-dir", str(tmp_path), "--batch-size", "1", "--image-size", "16"],
         "--batch-size 1 at --image-size 16 leaves BatchNorm one value per channel"),
        (["compare", str(tmp_path), str(tmp_path), "--seed", "-1"], "--seed must be in [0, 2^32)"),
        (["compare", str(tmp_path), str(tmp_path), "--resamples", "0"], "--resamples must be at least 1, got 0"),
        # A report file already there is kept, and a folder is not taken for the file.
        (["data", "--data-dir", str(tmp_path), "--out", str(a_file)],
         f"{a_file}: already exists and is left as it is; choose another --out"),
        (["benchmark", "--data-dir", str(tmp_path), "--out", str(a_file)], f"{a_file}: already exists"),
        (["compare", str(tmp_path), str(tmp_path), "--out", str(tmp_path)],
         f"{tmp_path}: a folder; --out is the file to write, such as {tmp_path / 'paired.csv'}"),
    ]
    for argv, expected in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and expected in err and err.count("\n") == 0, (argv, err)
    assert a_file.read_text() == "not a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]  # nothing was made


def test_torch_hub_takes_the_width_of_the_weights(tmp_path, checkpoint):
    """The hub entry built a width-32 UNet whatever the weights, so this package's own width-24 (CPU
    preset) checkpoints failed in a 50-line size-mismatch error."""
    model = torch.hub.load(str(ROOT), "unet", source="local", pretrained=str(checkpoint), trust_repo=True)
    weights = torch.load(checkpoint, weights_only=True)["model"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())  # features 4, as trained
    with pytest.raises(ValueError, match=r"these weights are --features 4; pass features=4 or leave it out") as err:
        torch.hub.load(str(ROOT), "unet", source="local", pretrained=str(checkpoint), features=8, trust_repo=True)
    assert str(err.value).count("\n") == 0


def test_slices_of_several_patients_in_one_folder_are_volumes_of_their_own(tmp_path, checkpoint, capsys):
    """A folder holding TCGA_A_<N> and TCGA_B_<N> was one volume: the two patients' slices
    interleaved by number, normalized together and post-processed in 3D together (on real slices,
    lcc kept one slice of one patient and erased the other's tumor)."""
    rng = np.random.default_rng(4)
    head = np.zeros((40, 48), bool)
    head[4:36, 6:42] = True
    for patient, scale in (("TCGA_A", 0.5), ("TCGA_B", 1.0)):
        for i in (1, 2, 3, 4):
            rgb = (np.where(head[..., None], rng.integers(60, 200, (40, 48, 3)), 0) * scale).astype(np.uint8)
            for folder in (tmp_path / "mixed", tmp_path / "apart" / patient):
                write_slice(folder, patient, i, rgb, np.zeros((40, 48), np.uint8))
    masks = {}
    for name in ("mixed", "apart"):
        assert main(["predict", "--checkpoint", str(checkpoint), "--input", str(tmp_path / name), "--output",
                     str(tmp_path / f"out-{name}"), "--device", "cpu", "--postprocess", "lcc"]) == 0
        table = pd.read_csv(tmp_path / f"out-{name}" / "predictions.csv")
        assert sorted(table.loc[table["level"] == "patient", "patient"]) == ["TCGA_A", "TCGA_B"]
        masks[name] = {Path(p).name: cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
                       for p in sorted((tmp_path / f"out-{name}" / "masks").rglob("*_pred.png"))}
    assert len(masks["apart"]) == 8 and any(m.any() for m in masks["apart"].values())
    assert masks["mixed"].keys() == masks["apart"].keys()
    assert all(np.array_equal(masks["mixed"][k], masks["apart"][k]) for k in masks["apart"]), "not the same volumes"
    assert "mixed: slices of 2 patients (TCGA_A, TCGA_B)" in capsys.readouterr().err
