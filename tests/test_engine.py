"""The command line, a one-epoch smoke run on tiny synthetic data, and evaluate reproducing it."""

import csv
import json
import shutil
from dataclasses import fields

import matplotlib.image as plt
import pandas as pd
import pytest
from conftest import synthetic_tree
import torch

import evaluation
from synthetic_data import make_synthetic_dataset
from data_files import scan_dataset as scan
from engine import COMMANDS, Config, config_from_args, main, parse_args
from libraries import UserError


@pytest.mark.parametrize("command", COMMANDS)
def test_every_commands_help_prints_percent_signs_and_on_off_defaults_as_typed(command, capsys):
    """argparse formats help strings with %, but not descriptions: '%%' must appear only in the former,
    so that '95%' reads as 95% wherever it is printed. An on|off flag's default reads on or off."""
    with pytest.raises(SystemExit) as done:
        parse_args([command, "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert "usage: engine.py" in text and "%%" not in text
    assert "(default: False)" not in text and "(default: True)" not in text
    if command in ("train", "cv"):
        assert "[--deep-supervision [on|off]]" in text and "1/4 size (default: off)" in " ".join(text.split())


def test_every_config_field_is_a_flag_with_the_same_default():
    args = parse_args([])
    assert args.command == "train"
    assert config_from_args(args) == Config()
    flags = parse_args(["--image-size", "64", "--no-deep-supervision", "--data-dir", "synthetic", "--lr", "0.01"])
    cfg = config_from_args(flags)
    assert (cfg.image_size, cfg.deep_supervision, cfg.data_dir, cfg.lr) == (64, False, "synthetic", 0.01)
    assert 20 <= len(fields(Config)) <= 35  # a config that reads at a glance (issue 38)
    on = config_from_args(parse_args(["--deep-supervision", "on", "--compile"]))
    assert (on.deep_supervision, on.compile, on.sync_bn) == (True, True, False)


def test_compile_and_sync_bn_change_the_network_and_sync_bn_is_refused_off_torchrun(tmp_path, capsys):
    """--compile wraps what trains in torch.compile, --sync-bn turns BatchNorm into SyncBatchNorm; the
    checkpointed model stays the plain UNet. A CPU run with --sync-bn is refused in one line."""
    from training import NetworkSpec, build_training

    def parts(**kw):
        return build_training(NetworkSpec(features=4, **kw), device=torch.device("cpu"), channels_last=False,
                              amp_dtype=None)

    def synced(m):
        return any(isinstance(x, torch.nn.SyncBatchNorm) for x in m.modules())

    plain, compiled, sync = parts(), parts(compile=True), parts(sync_bn=True)
    assert not hasattr(plain.net, "_orig_mod") and compiled.net._orig_mod is compiled.model
    assert synced(sync.model) and not synced(plain.model)
    assert main([*tiny_args(tmp_path), "--sync-bn"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--sync-bn needs a torchrun job" in err


def test_bad_choice_is_refused(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--device", "tpu"])
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize("argv, said", [
    (["evalute", "--checkpoint", "x.pt"], "'evalute' is not a command; did you mean 'evaluate'?"),
    (["fit"], f"'fit' is not a command ({', '.join(COMMANDS)})"),
    (["--batch_size", "8"], "unrecognized arguments: --batch_size; did you mean --batch-size?"),
    (["cv", "--epoch=3"], "unrecognized arguments: --epoch=3; did you mean --epochs?"),
    (["--wobble", "3"], "unrecognized arguments: --wobble"),
    (["evaluate", "--checkpoint", "x.pt", "--batch_size", "8"], "unrecognized arguments: --batch_size; did you "
                                                                 "mean --batch-size?"),
    (["compare", "a", "b", "--by_institution"], "unrecognized arguments: --by_institution; did you mean "
                                                 "--by-institution?"),
    # argparse named the missing --output first, with no hint that --out was meant for it
    (["export", "--checkpoint", "x.pt", "--out", "y.pt2"], "unrecognized arguments: --out; did you mean --output?"),
    (["evaluate", "--checkpoint", "x.pt", "stray"], "unrecognized arguments: stray"),
], ids=["command", "no-close-command", "underscore", "cv-flag", "no-close-flag", "evaluate", "compare", "required",
        "positional"])
def test_a_mistyped_command_or_setting_is_named_with_the_closest_one(argv, said, capsys):
    """A misspelled command came back as 'unrecognized arguments: evalute --checkpoint x.pt', and a
    setting typed with underscores or without its plural gave no hint of the flag meant."""
    with pytest.raises(SystemExit) as done:
        parse_args(argv)
    assert done.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"engine.py: error: {said}"


def test_a_bad_value_edited_at_the_top_of_engine_py_is_named_in_one_line(tmp_path):
    """Users edit the hyperparameters in engine.py itself: a value no flag could give is refused,
    naming where it is, before any work (it was a TypeError traceback, or blamed on a flag)."""
    import subprocess
    import sys
    from pathlib import Path

    for module in Path(__file__).resolve().parents[1].glob("*.py"):
        shutil.copy(module, tmp_path)
    source = (tmp_path / "engine.py").read_text()
    assert source.count("epochs: int = _opt(5,") == 1
    (tmp_path / "engine.py").write_text(source.replace("epochs: int = _opt(5,", "epochs: int = _opt(2.5,"))
    proc = subprocess.run([sys.executable, "engine.py", "--data-dir", "synthetic", "--out-dir", "run"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    says = "error: engine.py: epochs = 2.5 in Config must be a whole number; fix it at the top of engine.py\n"
    assert proc.returncode == 2 and proc.stderr == says, proc.stderr
    assert not (tmp_path / "run").exists()


def test_hyperparameters_edited_in_engine_py_are_checked_by_their_annotation(monkeypatch):
    # 'lr: float = _opt(1, ...)' at the top of engine.py: --lr 0.0005 was 'invalid int value'.
    import argparse

    import engine

    parser = argparse.ArgumentParser()
    engine.add_config_flags(parser, Config(lr=1))
    assert parser.parse_args(["--lr", "0.0005"]).lr == 0.0005 and parser.parse_args([]).lr == 1
    cpu = dict(engine.PRESETS["cpu"])
    monkeypatch.setitem(engine.PRESETS, "cpu", {**cpu, "lr": 1})
    engine.check_hyperparameters()  # a whole number is a number
    for name, value, says in (("lr", "1e-3", "must be a number"), ("deep_supervision", 1, "must be True or False"),
                              ("postprocess", "brain", "must be one of none, lcc, brain-multi"),
                              ("image_size", 100, "must be a positive multiple of 16")):
        monkeypatch.setitem(engine.PRESETS, "cpu", {**cpu, name: value})
        with pytest.raises(UserError, match=rf"{name} = {value!r} in PRESETS\['cpu'\] {says}"):
            engine.check_hyperparameters()
    monkeypatch.setitem(engine.PRESETS, "cpu", {**cpu, "feature": 24})  # a misspelt setting
    with pytest.raises(UserError, match=r"PRESETS\['cpu'\] sets feature, which is no setting"):
        engine.check_hyperparameters()


def tiny_args(tmp_path, run="run", *extra):
    return [
        "--data-dir", synthetic_tree(tmp_path / "syn", 5, 6), "--image-size", "32", "--features", "4",
        "--epochs", "2", "--batch-size", "4", "--device", "cpu", "--out-dir", str(tmp_path / run), *extra,
    ]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("smoke")
    assert main(tiny_args(tmp_path)) == 0
    return tmp_path


def test_smoke_run_writes_metrics_history_and_checkpoints(smoke_run):
    run = smoke_run / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("dice_per_volume_mean", "dice_per_volume_median", "dice_global", "iou_per_volume_mean",
                "iou_global", "dice_per_slice_tumor_mean", "precision", "recall"):
        assert 0.0 <= metrics[key] <= 1.0, key
    config = json.loads((run / "config.json").read_text())
    assert config["synthetic_data"] is True and metrics["synthetic_data"] is True
    # Validation patients are exactly the held-out ones, each with all 6 of its slices.
    assert [p["patient"] for p in metrics["per_patient"]] == config["patients"]["validation"]
    assert set(config["patients"]["validation"]).isdisjoint(config["patients"]["train"])
    assert all(p["slices"] == 6 and {"dice", "iou"} <= p.keys() for p in metrics["per_patient"])
    assert metrics["slices"] == 6 * len(config["patients"]["validation"])
    # The per-volume mean really is the mean of the per-patient values.
    dices = [p["dice"] for p in metrics["per_patient"]]
    assert metrics["dice_per_volume_mean"] == pytest.approx(sum(dices) / len(dices))
    with open(run / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert float(rows[-1]["val_dice_per_volume_mean"]) == pytest.approx(metrics["dice_per_volume_mean"])
    for name in ("best.pt", "last.pt"):
        ckpt = torch.load(run / name, map_location="cpu", weights_only=True)
        assert {"model", "optimizer", "scheduler", "epoch", "config"} <= ckpt.keys()
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 2
    curves = plt.imread(run / "curves.png")
    assert curves.ndim == 3 and curves.std() > 0.01  # decodes and is not blank


def test_evaluate_reproduces_the_training_metrics(smoke_run, capsys):
    run = smoke_run / "run"
    out = smoke_run / "eval"
    assert main(["evaluate", "--checkpoint", str(run / "last.pt"), "--device", "cpu",
                 "--out-dir", str(out), "--batch-size", "3"]) == 0
    trained = json.loads((run / "metrics.json").read_text())
    evaluated = json.loads((out / "metrics.json").read_text())
    for key in ("dice_per_volume_mean", "dice_global", "iou_global", "precision", "recall"):
        assert evaluated[key] == pytest.approx(trained[key], abs=1e-9), key
    assert "SYNTHETIC" in capsys.readouterr().out


def test_evaluate_threshold_flag_overrides_the_trained_one(smoke_run, capsys):
    # A lower threshold calls a superset of pixels tumor, patient by patient; the default is the run's 0.5.
    run, predicted = smoke_run / "run", {}
    for t in (0.2, 0.8):
        out = smoke_run / f"eval-t{t}"
        assert main(["evaluate", "--checkpoint", str(run / "last.pt"), "--device", "cpu", "--out-dir", str(out),
                     "--postprocess", "none", "--threshold", str(t)]) == 0
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["threshold"] == t and f"threshold: {t:g}" in capsys.readouterr().out
        predicted[t] = {p["patient"]: p["predicted_pixels"] for p in metrics["per_patient"]}
    assert all(predicted[0.2][name] >= n for name, n in predicted[0.8].items())
    assert sum(predicted[0.2].values()) > sum(predicted[0.8].values())
    trained = json.loads((run / "metrics.json").read_text())
    assert trained["threshold"] == json.loads((run / "config.json").read_text())["threshold"] == 0.5


@pytest.mark.parametrize("threshold", ["0", "1", "1.5"])
def test_threshold_outside_zero_one_is_one_line(smoke_run, capsys, threshold):
    out = smoke_run / f"eval-bad-{threshold}"
    assert main(["evaluate", "--checkpoint", str(smoke_run / "run" / "last.pt"), "--device", "cpu",
                 "--out-dir", str(out), "--threshold", threshold]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--threshold" in err and "between 0 and 1" in err
    assert not out.exists()  # refused before anything was written


def test_same_seed_gives_identical_metrics_json(smoke_run):
    # Timings live in history.csv, so metrics.json is a pure function of data, config and seed.
    assert main(tiny_args(smoke_run, "again")) == 0
    assert (smoke_run / "again" / "metrics.json").read_bytes() == (smoke_run / "run" / "metrics.json").read_bytes()


def test_existing_run_dir_is_never_overwritten(smoke_run, capsys):
    run = smoke_run / "run"
    before = (run / "metrics.json").read_bytes()
    assert main(tiny_args(smoke_run)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(run) in err and "Traceback" not in err
    assert (run / "metrics.json").read_bytes() == before
    torch.load(run / "best.pt", weights_only=True)  # still loadable


def test_missing_data_dir_is_one_clear_line(tmp_path, capsys):
    assert main(["--data-dir", str(tmp_path / "nowhere"), "--out-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "nowhere" in err and "no such folder" in err


def test_bad_checkpoint_is_one_clear_line(tmp_path, capsys):
    bad = tmp_path / "junk.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["evaluate", "--checkpoint", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "junk.pt" in err


def test_split_none_model_is_scored_on_unseen_patients_only(tmp_path, capsys, monkeypatch):
    # Train on 4 of 6 patients with no validation, then score the 6-patient tree: 'unseen' must
    # pick exactly the 2 left out, with the same per-patient Dice as when all 6 are scored.
    full = make_synthetic_dataset(tmp_path / "full" / "kaggle_3m", patients=6, slices=6, size=64, seed=3)
    names = sorted(p.name for p in full.iterdir() if p.is_dir())
    four = tmp_path / "four" / "kaggle_3m"
    shutil.copytree(full, four)
    for name in names[4:]:
        shutil.rmtree(four / name)
    common = ["--image-size", "32", "--features", "4", "--batch-size", "4", "--device", "cpu"]
    run = tmp_path / "run"
    assert main(["--data-dir", str(four), "--split", "none", "--epochs", "2", "--out-dir", str(run), *common]) == 0
    assert "--patients unseen" in capsys.readouterr().out  # the run says how to score it
    config = json.loads((run / "config.json").read_text())
    assert config["patients"] == {"train": names[:4], "validation": []}
    final = json.loads((run / "metrics.json").read_text())
    # 4 patients x 6 slices = 24, batch 4: 6 steps per epoch, 12 in 2 epochs.
    assert (final["train_patients"], final["train_slices"], final["steps_per_epoch"], final["optimizer_steps"]) \
        == (4, 24, 6, 12)
    assert (run / "last.pt").is_file() and not (run / "best.pt").exists()  # "best" needs validation
    with open(run / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2] and not any(k.startswith("val_") for k in rows[0])
    assert plt.imread(run / "curves.png").std() > 0.01

    evaluate = ["evaluate", "--checkpoint", str(run / "last.pt"), "--data-dir", str(full), "--device", "cpu"]
    listed = []  # choosing the unseen patients and loading them share one listing of the folder
    monkeypatch.setattr(evaluation, "scan_dataset",
                        lambda root, issues=None: listed.append(root) or scan(root, issues))
    assert main([*evaluate, "--patients", "unseen", "--out-dir", str(tmp_path / "unseen")]) == 0
    assert listed == [full]
    unseen = json.loads((tmp_path / "unseen" / "metrics.json").read_text())
    assert [p["patient"] for p in unseen["per_patient"]] == names[4:]
    assert unseen["scored_patients_trained_on"] == 0 and "warning" not in capsys.readouterr().err
    assert main([*evaluate, "--patients", "all", "--out-dir", str(tmp_path / "all")]) == 0
    scored_all = json.loads((tmp_path / "all" / "metrics.json").read_text())
    assert [p["patient"] for p in scored_all["per_patient"]] == names
    assert scored_all["scored_patients_trained_on"] == 4
    assert "4 of the 6 patients scored were used to train" in capsys.readouterr().err
    dice_all = {p["patient"]: p["dice"] for p in scored_all["per_patient"]}
    assert {p["patient"]: p["dice"] for p in unseen["per_patient"]} == {n: dice_all[n] for n in names[4:]}
    # The reports say so too (they are what gets shared), and so does compare, which pairs held-out scores.
    assert "**Not held out**: 4 of the 6 patients scored were used" in (tmp_path / "all" / "summary.md").read_text()
    table = pd.read_csv(tmp_path / "all" / "per_patient.csv")
    assert table.loc[table["in_training"], "patient"].tolist() == names[:4]
    assert "in_training" not in pd.read_csv(tmp_path / "unseen" / "per_patient.csv")
    assert main(["compare", str(tmp_path / "unseen"), str(tmp_path / "all")]) == 0
    err = capsys.readouterr().err
    assert f"warning: B ({tmp_path / 'all'}): 4 of the 6 patients scored were used to train" in err and "A (" not in err

    # A run without validation patients has none to score, and its own data has no unseen ones.
    assert main([*evaluate[:3]]) == 2
    assert "--patients unseen" in capsys.readouterr().err
    assert main([*evaluate[:3], "--data-dir", str(four), "--patients", "unseen"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "trained on every patient here" in err
    assert not (run / "evaluate-last").exists()  # refused before any folder was made


def test_patience_without_validation_is_refused_before_a_run_folder_exists(tmp_path, capsys):
    assert main(tiny_args(tmp_path, "run", "--split", "none", "--patience", "3")) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--patience" in err and "--split none" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag, value, says", [("--image-size", "24", "multiple of 16"),
                                               ("--encoder-lr-scale", "-1", ">= 0"),
                                               ("--steps-per-epoch", "-1", ">= 0"),
                                               ("--modality-dropout", "1.5", "[0, 1]")])
def test_out_of_range_settings_are_refused_before_a_run_folder_exists(tmp_path, capsys, flag, value, says):
    assert main(tiny_args(tmp_path, "run", flag, value)) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and flag in err and says in err
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ flags the user gave, and contradictions


def test_preset_never_overrides_a_flag_the_user_gave(capsys):
    """Bug 1: '--preset cpu --epoch 3' trained 20 epochs; abbreviations are now refused, full flags win."""
    with pytest.raises(SystemExit):
        parse_args(["--preset", "cpu", "--epoch", "3"])
    assert "unrecognized arguments: --epoch" in capsys.readouterr().err
    argv = ["--preset", "cpu", "--epochs", "3", "--no-deep-supervision", "--lr=0.01", "--features", "32"]
    cfg = config_from_args(parse_args(argv), argv)
    # the preset's 20, True and 24, overridden; --features 32 is also the Config default, so this
    # catches a preset that wins whenever a flag equals its default
    assert (cfg.epochs, cfg.deep_supervision, cfg.lr, cfg.features) == (3, False, 0.01, 32)
    assert (cfg.image_size, cfg.modality_dropout) == (128, 0.2)  # the preset's, where nothing was given
    assert config_from_args(parse_args(["--preset", "cpu"]), ["--preset", "cpu"]).deep_supervision


@pytest.mark.parametrize("argv, says", [
    (["cv", "--folds", "3", "--val-patients", "TCGA_A"], "drop --val-patients"),
    (["cv", "--folds", "3", "--fold", "1"], "drop --fold"),
    (["cv", "--folds", "3", "--fold", "0"], "drop --fold"),
    # cv ignored these without a word: each fold validates on its own 1/K share.
    (["cv", "--folds", "3", "--split", "buda"], "so --split would be ignored; drop --split"),
    (["cv", "--folds", "3", "--split", "random"], "so --split would be ignored; drop --split"),
    (["cv", "--folds", "3", "--val-fraction", "0.5"], "so --val-fraction would be ignored; drop --val-fraction"),
    (["--fold", "1"], "add --folds"),
    (["--folds", "3", "--val-patients", "TCGA_A"], "give one of them"),
    (["--folds", "3", "--split", "buda"], "give one of them"),
    (["--split", "buda", "--val-fraction", "0.3"], "drop --val-fraction"),
    (["--split", "none", "--val-fraction", "0.3"], "drop --val-fraction"),
    (["--folds", "3", "--val-fraction", "0.3"], "drop --val-fraction"),
    (["--split", "none", "--val-every", "2"], "drop --val-every"),
    # Out of range: refused before the data is read, not after minutes of loading it.
    (["--folds", "1"], "--folds must be at least 2 (0: no folds), got 1"),
    (["--folds", "-3"], "--folds must be at least 2 (0: no folds), got -3"),
    (["--folds", "3", "--fold", "3"], "--fold must be in 0..2 for --folds 3, got 3"),
    (["--folds", "3", "--fold", "-1"], "--fold must be in 0..2 for --folds 3, got -1"),
    (["--val-fraction", "0"], "--val-fraction must be between 0 and 1, got 0"),
    (["--val-fraction", "1"], "--val-fraction must be between 0 and 1, got 1"),
])
def test_contradictory_or_out_of_range_split_flags_are_refused_in_one_line(tmp_path, capsys, argv, says):
    """Bug 3: these combinations silently ignored one of the flags; nothing may be made before refusing."""
    out = tmp_path / "out"
    assert main([*argv, "--data-dir", str(tmp_path / "syn"), "--out-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and says in err
    assert not out.exists() and not (tmp_path / "syn").exists()


def test_val_every_skips_validation_but_not_training(tmp_path, capsys):
    """--val-every 2 over 3 epochs validates after epochs 2 and 3 only, and trains the very same weights
    as validating every epoch: the final scores and last.pt agree exactly. Every epoch line but the
    last says how long the rest should take."""
    assert main(tiny_args(tmp_path, "every", "--epochs", "3", "--val-fraction", "0.4")) == 0
    capsys.readouterr()
    assert main(tiny_args(tmp_path, "second", "--epochs", "3", "--val-fraction", "0.4", "--val-every", "2")) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch ")]
    assert [line.split()[1] for line in lines] == ["1/3", "2/3", "3/3"]
    assert [" left" in line for line in lines] == [True, True, False]
    every, second = tmp_path / "every", tmp_path / "second"
    history = pd.read_csv(second / "history.csv")
    assert history["val_loss"].isna().tolist() == [True, False, False]
    assert pd.read_csv(every / "history.csv")["val_loss"].notna().all()
    a, b = (torch.load(run / "last.pt", weights_only=True) for run in (every, second))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    ma, mb = (json.loads((run / "metrics.json").read_text()) for run in (every, second))
    assert mb["dice_per_volume_mean"] == ma["dice_per_volume_mean"]
    assert torch.load(second / "best.pt", weights_only=True)["epoch"] in (2, 3)


def test_val_every_below_one_is_refused(tmp_path, capsys):
    assert main(tiny_args(tmp_path, "run", "--val-every", "0")) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--val-every" in err
    assert not (tmp_path / "run").exists()


def test_a_resumed_run_takes_a_new_val_every_and_keeps_its_other_settings(tmp_path):
    from engine import resolve_resume

    assert main(tiny_args(tmp_path, "run", "--epochs", "1", "--val-fraction", "0.4")) == 0
    cfg, _ = resolve_resume(Config(resume=str(tmp_path / "run"), val_every=5, lr=0.5))
    assert (cfg.val_every, cfg.lr, cfg.epochs) == (5, 1e-3, 1)
    # A run recorded with a setting this version removed is refused, naming the commit that has it.
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    ckpt["config"]["intensity_augment"] = True
    torch.save(ckpt, tmp_path / "run" / "last.pt")
    with pytest.raises(UserError, match="intensity_augment = True, which this version no longer has.*commit"):
        resolve_resume(Config(resume=str(tmp_path / "run")))
    ckpt["config"].update(intensity_augment=False, ema_decay=0.998)  # the moving average, removed later
    torch.save(ckpt, tmp_path / "run" / "last.pt")
    with pytest.raises(UserError, match="ema_decay = 0.998, which this version no longer has.*commit 4415e05"):
        resolve_resume(Config(resume=str(tmp_path / "run")))


@pytest.mark.parametrize("tumor_weight", ["1", "2"])  # a shuffled pass, and weighted draws with replacement
def test_steps_per_epoch_fixes_the_training_length_whatever_the_number_of_patients(tmp_path, tumor_weight):
    """The presets' budget: --steps-per-epoch S trains exactly S steps an epoch on 5 patients and on
    10 (more slices than one pass of S batches holds on the first, fewer on the second); without
    it an epoch is one pass, so the steps follow the data."""
    steps = {}
    for patients in ("5", "10"):
        for fixed in ("0", "7"):
            run = f"p{patients}-s{fixed}"
            data = synthetic_tree(tmp_path / f"syn{patients}", int(patients), 6)
            args = tiny_args(tmp_path, run, "--data-dir", data, "--split", "none", "--epochs", "2",
                             "--steps-per-epoch", fixed, "--tumor-weight", tumor_weight)
            assert main(args) == 0
            metrics = json.loads((tmp_path / run / "metrics.json").read_text())
            steps[patients, fixed] = (metrics["steps_per_epoch"], metrics["optimizer_steps"])
            assert len(pd.read_csv(tmp_path / run / "history.csv")) == 2
    assert steps["5", "7"] == steps["10", "7"] == (7, 14)
    # One pass: 5 x 6 = 30 slices in batches of 4 (the last batch of 2 kept) -> 8; 60 slices -> 15.
    assert steps["5", "0"] == (8, 16) and steps["10", "0"] == (15, 30)


def test_cpu_preset_loader_has_the_same_length_for_3_and_30_patients():
    from conftest import lesion_volume
    from data_loaders import LGGSlices, make_loader
    from data_preprocessing import train_preprocess
    from engine import PRESETS

    cpu = PRESETS["cpu"]
    lengths = []
    for patients in (3, 30):
        volumes = [lesion_volume(chr(65 + i), 10, 10, (3, 4)) for i in range(patients)]
        dataset = LGGSlices(volumes, train_preprocess(32))
        loader = make_loader(dataset, batch_size=cpu["batch_size"], train=True, seed=0, num_workers=0,
                             tumor_weight=cpu["tumor_weight"], steps=cpu["steps_per_epoch"])
        lengths.append((len(loader), len(loader.sampler)))
    assert lengths[0] == lengths[1] == (cpu["steps_per_epoch"], cpu["steps_per_epoch"] * cpu["batch_size"])


def test_the_gpu_preset_on_a_cpu_says_so_before_the_first_epoch(tmp_path, capsys):
    """--preset full on a CPU gave no hint until its first epoch, 4,000 slices at 256 px later."""
    import engine

    data = synthetic_tree(tmp_path / "syn", 4, 5)
    assert main(["--preset", "full", "--data-dir", data, "--features", "4", "--epochs", "1", "--steps-per-epoch", "1",
                 "--batch-size", "2", "--device", "cpu", "--out-dir", str(tmp_path / "run")]) == 0
    assert "warning: --preset full is meant for a GPU: 1 step at 256 px" in capsys.readouterr().out
    assert engine.PRESETS["full"]["image_size"] >= 256  # what the warning is keyed on
    # With --steps-per-epoch 0 an epoch is one pass: 20 slices in batches of 2, 10 steps (it said 1).
    assert main(["--preset", "full", "--data-dir", data, "--features", "4", "--epochs", "1", "--steps-per-epoch", "0",
                 "--batch-size", "2", "--image-size", "256", "--device", "cpu", "--split", "none", "--patience", "0",
                 "--out-dir", str(tmp_path / "run-pass")]) == 0
    assert "meant for a GPU: 10 steps at 256 px" in capsys.readouterr().out
    assert main(["--preset", "cpu", "--data-dir", data, "--features", "4", "--epochs", "1", "--steps-per-epoch", "1",
                 "--batch-size", "2", "--device", "cpu", "--out-dir", str(tmp_path / "run-cpu")]) == 0
    assert "meant for a GPU" not in capsys.readouterr().out


def test_the_cpu_preset_without_bf16_instructions_says_what_it_costs(tmp_path, capsys, monkeypatch):
    """On an AVX2-only CPU --amp auto trains in fp32 and the preset takes about 1.7 h, not 20-33 min;
    the run said nothing until its first epoch line."""
    import libraries

    data = synthetic_tree(tmp_path / "syn", 4, 5)

    def printed(native: bool, features: int) -> str:
        monkeypatch.setattr(libraries, "cpu_has_native_bf16", lambda: native)
        assert main(["--preset", "cpu", "--data-dir", data, "--features", str(features), "--epochs", "2",
                     "--steps-per-epoch", "1", "--batch-size", "2", "--device", "cpu", "--image-size", "32",
                     "--out-dir", str(tmp_path / f"r-{native}-{features}")]) == 0
        return capsys.readouterr().out

    fp32, bf16 = printed(False, 20), printed(True, 20)
    assert "note: this CPU has no bf16 instructions" in fp32 and "amp: off" in fp32
    assert "bf16 instructions" not in bf16 and "amp: torch.bfloat16" in bf16
    assert "bf16 instructions" not in printed(False, 16)  # width 16 is the advice already taken


@pytest.mark.parametrize("native", [False, True])
def test_forced_bf16_on_a_cpu_without_bf16_instructions_is_named_as_emulated(capsys, monkeypatch, native):
    """--amp bf16 on an AVX2-only CPU trained over 3x slower than fp32 (docs/results.md), without a word."""
    import libraries

    monkeypatch.setattr(libraries, "cpu_has_native_bf16", lambda: native)
    assert libraries.setup_device("cpu", "bf16") == (torch.device("cpu"), torch.bfloat16)  # as asked, still
    assert libraries.setup_device("cpu", "auto")[1] == (torch.bfloat16 if native else None)
    warned = "warning: this CPU has no bf16 instructions (AVX-512 BF16 or AMX), so --amp bf16 is emulated"
    assert capsys.readouterr().err.count(warned) == (0 if native else 1)  # for bf16 asked for, not for auto


def test_settings_that_undo_themselves_are_named_before_the_first_epoch(tmp_path, capsys):
    """--preset cpu --epochs 1 kept the preset's 1-epoch warmup: the learning rate rose to the last step
    and never annealed, without a word. --encoder-lr-scale 0 without --pretrained froze a random encoder."""
    data = synthetic_tree(tmp_path / "syn", 4, 5)
    common = ["--data-dir", data, "--features", "4", "--steps-per-epoch", "1", "--batch-size", "2",
              "--device", "cpu", "--image-size", "32"]
    assert main(["--preset", "cpu", "--epochs", "1", "--out-dir", str(tmp_path / "a"), *common]) == 0
    assert "warning: --warmup-epochs 1 is not shorter than --epochs 1" in capsys.readouterr().out
    assert main(["--preset", "cpu", "--epochs", "2", "--out-dir", str(tmp_path / "b"), *common]) == 0
    assert "--warmup-epochs" not in capsys.readouterr().out
    # A frozen encoder without --pretrained weights stays random for the whole run.
    assert main(["--epochs", "1", "--encoder-lr-scale", "0", "--out-dir", str(tmp_path / "c"), *common]) == 0
    assert ("warning: --encoder-lr-scale 0 is for fine-tuning --pretrained weights; without them the encoder "
            "starts from random weights and stays so, frozen") in capsys.readouterr().out
    # Frozen, the 1x1 bottleneck's BatchNorm does not train, so one slice a batch at 16 px trains
    # (unfrozen it is refused: test_reliability).
    assert main(["--epochs", "1", "--encoder-lr-scale", "0", "--out-dir", str(tmp_path / "d"), *common,
                 "--batch-size", "1", "--image-size", "16"]) == 0


def test_starting_a_command_does_not_import_what_only_charts_overlays_and_splits_use():
    """torchvision.utils (which pulls in torch._dynamo), scikit-learn and matplotlib took 3.5 s of the
    8 s that '--help', and every one-line error, needed before its first line; only the overlays,
    the patient split and the charts use them, so they are imported there."""
    import subprocess
    import sys
    from pathlib import Path

    heavy = ("torchvision", "sklearn", "matplotlib", "torch._dynamo")
    code = f"import sys, engine; print([m for m in {heavy!r} if m in sys.modules])"
    result = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                            capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", result.stdout
