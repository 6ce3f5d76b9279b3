"""Resuming after SIGKILL, refusing unsafe pickles, bad data, NaN losses and out-of-memory errors."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import engine
import reports
import training
from synthetic_data import make_synthetic_dataset
from engine import main
from model import UNet

ROOT = Path(__file__).resolve().parents[1]


def tiny(tmp_path, data, run, *extra):
    """A tiny run; a quarter of the patients validate unless ``extra`` chooses them otherwise."""
    chooses = {"--val-patients", "--split", "--folds"} & set(extra)
    return ["--data-dir", str(data), "--image-size", "32", "--features", "4", "--batch-size", "4",
            "--device", "cpu", "--out-dir", str(run), *([] if chooses else ["--val-fraction", "0.25"]), *extra]


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    # 4 patients x 6 slices: 3 train patients = 18 slices = 5 steps of 4 (the last one of 2).
    return make_synthetic_dataset(tmp_path_factory.mktemp("syn") / "kaggle_3m", patients=4, slices=6, size=64)


KILLER = """
import os, signal, sys
sys.path.insert(0, {root!r})
import engine, training
calls = 0
real_step = training.optimizer_step
def step(*args, **kwargs):
    global calls
    calls += 1
    if calls == {kill_at}:
        os.kill(os.getpid(), signal.SIGKILL)  # mid-epoch, no chance to clean up
    return real_step(*args, **kwargs)
training.optimizer_step = step
sys.exit(engine.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("extra", [[], ["--deep-supervision"], ["--num-workers", "2", "--tumor-weight", "2"]],
                         ids=["plain", "deep-supervision", "workers"])
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(tmp_path, syn, extra):
    # With deep supervision the checkpoint must also carry the heads, or the resumed run diverges.
    # Workers persist across epochs: the resumed run's start at epoch 2 must not shift that epoch's
    # order or augmentation away from the uninterrupted run's second pass through the same workers.
    reference = tmp_path / "reference"
    assert main(tiny(tmp_path, syn, reference, "--epochs", "3", *extra)) == 0

    run = tmp_path / "killed"
    code = KILLER.format(root=str(ROOT), kill_at=5 + 3)  # the 3rd step of epoch 2
    proc = subprocess.run([sys.executable, "-c", code, *tiny(tmp_path, syn, run, "--epochs", "3", *extra)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "metrics.json").exists()
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 1  # the last complete epoch
    assert not list(run.glob("*.tmp"))  # no half-written file left behind

    assert main(["--resume", str(run)]) == 0
    assert (run / "metrics.json").read_bytes() == (reference / "metrics.json").read_bytes()
    history = (run / "history.csv").read_text().splitlines()
    assert len(history) == 4  # header + epochs 1, 2, 3
    assert "training minutes, all epochs" in (run / "summary.md").read_text()  # epoch 1 ran before the kill


def test_a_crash_between_the_last_checkpoint_and_its_history_is_mended_by_the_resume(tmp_path, syn, monkeypatch):
    """last.pt is written before history.csv and curves.png (a full disk must not cost the epoch).
    A crash between them after the last epoch left both an epoch behind for good: the resume had no
    epoch left to train. It draws them from the checkpoint now, once: the reports link curves.png."""
    run = tmp_path / "run"
    real_write = training.write_history

    def write(run_dir, history):
        if len(history) == 3:
            raise RuntimeError("killed")  # after last.pt of the last epoch, before its history
        real_write(run_dir, history)

    monkeypatch.setattr(training, "write_history", write)
    with pytest.raises(RuntimeError, match="killed"):
        main(tiny(tmp_path, syn, run, "--epochs", "3"))
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 3
    assert len((run / "history.csv").read_text().splitlines()) == 1 + 2  # an epoch behind

    monkeypatch.undo()
    drawn, real_plot = [], reports.plot_curves
    monkeypatch.setattr(reports, "plot_curves", lambda *args: drawn.append(args) or real_plot(*args))
    assert main(["--resume", str(run)]) == 0
    epochs = [line.split(",")[0] for line in (run / "history.csv").read_text().splitlines()[1:]]
    assert epochs == ["1", "2", "3"] and len(drawn[0][1]) == 3
    assert len(drawn) == 1  # the final reports link curves.png, they do not draw it again
    assert "curves.png" in (run / "summary.md").read_text()


def test_unsafe_pickle_is_refused_and_never_runs(tmp_path, capsys):
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pt"
    torch.save({"model": Payload(), "config": {}}, evil)  # a pickle that runs a command when loaded
    assert main(["evaluate", "--checkpoint", str(evil)]) == 2
    err = capsys.readouterr().err
    assert "refused" in err and "evil.pt" in err and "Traceback" not in err
    assert not marker.exists()


def test_damaged_checkpoint_is_named(tmp_path, capsys):
    ckpt = tmp_path / "half.pt"
    torch.save({"model": {}, "config": {}}, ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[:50])
    assert main(["evaluate", "--checkpoint", str(ckpt)]) == 2
    assert "half.pt" in capsys.readouterr().err


@pytest.mark.parametrize("content", [b"hello\n", b'{"model": {}}', bytes(range(256)) * 4],
                         ids=["text", "json", "bytes"])
@pytest.mark.parametrize("command", ["evaluate", "export", "pretrained"])
def test_a_file_that_is_no_torch_file_is_named_as_such_in_one_line(tmp_path, syn, capsys, content, command):
    # Unpickling text raises KeyError, and other bytes UnpicklingError: neither holds Python
    # objects, so neither may be called a pickle that could run code, nor end in a traceback.
    ckpt = tmp_path / "weights.pt"
    ckpt.write_bytes(content)
    argv = {"evaluate": ["evaluate", "--checkpoint", str(ckpt)],
            "export": ["export", "--checkpoint", str(ckpt), "--format", "torchscript",
                       "--output", str(tmp_path / "m.ts")],
            "pretrained": tiny(tmp_path, syn, tmp_path / "run", "--pretrained", str(ckpt))}[command]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{ckpt}: not a loadable checkpoint" in err and "could run code" not in err
    assert not (tmp_path / "run").exists()


def test_a_folder_as_checkpoint_to_export_or_pretrained_says_it_is_a_folder(tmp_path, syn, capsys):
    (tmp_path / "run0").mkdir()
    for argv in (["export", "--checkpoint", str(tmp_path / "run0"), "--format", "torchscript",
                  "--output", str(tmp_path / "m.ts")],
                 tiny(tmp_path, syn, tmp_path / "run", "--pretrained", str(tmp_path / "run0"))):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and f"{tmp_path / 'run0'}: a folder; pass a checkpoint file" in err


def test_pretrained_weights_of_another_network_are_not_blamed_on_the_width(tmp_path, syn, capsys):
    # Before: "these weights are of an unknown layout, but this run asks for --features 4; pass the
    # weights' value", which no value of --features could satisfy.
    other = tmp_path / "other.pt"
    torch.save({"head.weight": torch.zeros(2)}, other)
    assert main(tiny(tmp_path, syn, tmp_path / "run", "--pretrained", str(other))) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not this package's UNet" in err and "--features" not in err
    # A width that differs is still named, with the weights' own value.
    wide = tmp_path / "wide.pt"
    torch.save(UNet(features=8).state_dict(), wide)
    assert main(tiny(tmp_path, syn, tmp_path / "run", "--pretrained", str(wide))) == 2
    assert "these weights are --features 8, but this run asks for --features 4" in capsys.readouterr().err


def test_nan_loss_stops_with_epoch_and_step_and_keeps_last_checkpoint(tmp_path, syn, monkeypatch, capsys):
    calls = {"n": 0}
    real = training.forward_loss

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 5 + 2 else loss  # step 1 of epoch 2

    monkeypatch.setattr(training, "forward_loss", poisoned)
    run = tmp_path / "run"
    assert main(tiny(tmp_path, syn, run, "--epochs", "3")) == 2
    err = capsys.readouterr().err
    assert "epoch 2, step 1" in err and "Traceback" not in err
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_out_of_memory_gets_advice(tmp_path, syn, monkeypatch, capsys):
    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(training, "forward_loss", oom)
    assert main(tiny(tmp_path, syn, tmp_path / "run", "--epochs", "1")) == 2
    err = capsys.readouterr().err
    assert "--batch-size" in err and "Traceback" not in err


def test_default_run_dirs_never_collide(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = engine.new_run_dir("")
    (first / "metrics.json").write_text("{}")
    second = engine.new_run_dir("")
    assert first != second and (first / "metrics.json").read_text() == "{}"


# ------------------------------------------------------------------------------------- bad data


@pytest.fixture
def bad_tree(tmp_path, syn):
    """A copy of the synthetic tree with one planted problem of every kind."""
    root = tmp_path / "bad" / "kaggle_3m"
    root.parent.mkdir()
    import shutil

    shutil.copytree(syn, root)
    patients = sorted(p for p in root.iterdir() if p.is_dir())
    a, b, c = patients[0], patients[1], patients[2]
    (a / f"{a.name}_1_mask.tif").unlink()  # image without mask
    (a / f"{a.name}_2.tif").unlink()  # mask without image
    (b / f"{b.name}_3.tif").write_bytes(b"")  # zero-byte TIFF
    data = (b / f"{b.name}_4.tif").read_bytes()
    (b / f"{b.name}_4.tif").write_bytes(data[: len(data) // 3])  # truncated TIFF
    img = cv2.imread(str(c / f"{c.name}_2.tif"))
    cv2.imwrite(str(c / f"{c.name}_2.tif"), cv2.resize(img, (48, 48)))  # another size
    cv2.imwrite(str(c / f"{c.name}_3.tif"), img[..., 1])  # grayscale
    mask = cv2.imread(str(c / f"{c.name}_4_mask.tif"), cv2.IMREAD_UNCHANGED)
    cv2.imwrite(str(c / f"{c.name}_4_mask.tif"), np.where(mask > 0, 200, 3).astype(np.uint8))  # not 0/255
    (root / "TCGA_EMPTY_0000").mkdir()  # patient folder with no slices
    (a / "notes.txt").write_text("not an image")  # a non-image file
    (c / f"{c.name}_99.tif").write_text("not an image either")  # non-image named like a slice
    (c / f"{c.name}_99_mask.tif").write_text("nor this")
    return root


def test_bad_data_is_skipped_or_fixed_with_a_counted_warning(tmp_path, bad_tree, capsys):
    run = tmp_path / "run"
    assert main(tiny(tmp_path, bad_tree, run, "--epochs", "1")) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "data problems worked around" in err
    summary = next(line for line in err.splitlines() if "data problems worked around" in line)
    # Unreadable: the zero-byte TIFF, the truncated one and the text file named like a slice.
    for kind in ("3 skipped: unreadable file", "1 skipped: image without mask", "1 skipped: mask without image",
                 "1 skipped: patient folder without slices", "1 fixed: resized",
                 "1 fixed: grayscale copied to 3 channels", "1 fixed: mask binarized"):
        assert kind in summary, kind
    listed = (run / "data_issues.txt").read_text()
    assert "_1.tif: image has no mask" in listed and "TCGA_EMPTY_0000" in listed
    assert json.loads((run / "metrics.json").read_text())["slices"] > 0
    # The patient whose two tumor slices were destroyed has none left: worth a warning of its own.
    assert "1 patient without tumor in any mask" in err


def test_the_data_report_lists_every_problem_training_works_around(tmp_path, bad_tree, capsys):
    # 'python engine.py data' is where a user checks a copy before training: it missed slices of
    # another size (resized in training) and grayscale slices (copied to 3 channels).
    from data_commands import summarize_dataset

    reported = summarize_dataset(bad_tree)["problem_summary"]
    assert main(tiny(tmp_path, bad_tree, tmp_path / "run", "--epochs", "1")) == 0
    summary = next(line for line in capsys.readouterr().err.splitlines() if "data problems worked around" in line)
    kinds = summary.split("worked around: ", 1)[1].split("; ")
    assert kinds and "1 fixed: resized" in kinds
    for kind in kinds:
        assert kind in reported, kind


def test_strict_turns_the_first_problem_into_an_error(tmp_path, bad_tree, capsys):
    assert main(tiny(tmp_path, bad_tree, tmp_path / "run", "--epochs", "1", "--strict")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "--strict" in err and err.count("\n") == 0 and "Traceback" not in err


def test_resuming_from_an_earlier_checkpoint_of_the_run_is_refused(tmp_path, syn, capsys):
    # best.pt of epoch 1 beside last.pt of epoch 3: --resume run/best.pt trained epochs 2-3 again
    # and wrote them over the run's own, without a word.
    run = tmp_path / "run"
    assert main(tiny(tmp_path, syn, run, "--epochs", "3", "--lr", "0")) == 0  # nothing improves after epoch 1
    assert torch.load(run / "best.pt", weights_only=True)["epoch"] == 1
    kept = {name: (run / name).read_bytes() for name in ("last.pt", "best.pt", "metrics.json")}
    assert main(["--resume", str(run / "best.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{run / 'best.pt'} is epoch 1, and {run / 'last.pt'} holds epoch 3" in err
    assert f"--pretrained {run / 'best.pt'}" in err
    assert all((run / name).read_bytes() == data for name, data in kept.items())
    # last.pt itself, named as a file, still resumes (here: a finished run, scored again).
    assert main(["--resume", str(run / "last.pt")]) == 0


def test_resuming_after_a_patient_joined_the_data_is_refused(tmp_path, syn, capsys):
    # The validation patients were compared, not the training ones: a patient copied into the
    # folder (the shared subset grew from 36 to 66) joined training midway, without a word.
    import shutil

    data = tmp_path / "data"
    shutil.copytree(syn, data)
    newcomer = sorted(p for p in data.iterdir() if p.is_dir())[-1]
    shutil.move(newcomer, tmp_path / newcomer.name)
    first = sorted(p.name for p in data.iterdir() if p.is_dir())[0]
    run = tmp_path / "run"
    assert main(tiny(tmp_path, data, run, "--epochs", "1", "--val-patients", first)) == 0
    shutil.move(tmp_path / newcomer.name, data / newcomer.name)
    capsys.readouterr()
    assert main(["--resume", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "the data no longer gives the run's patients (train" in err
    shutil.move(data / newcomer.name, tmp_path / newcomer.name)
    assert main(["--resume", str(run)]) == 0  # the data it began with


def test_bad_val_patients_and_empty_dir_keep_the_previous_run(tmp_path, syn, capsys):
    run = tmp_path / "run"
    assert main(tiny(tmp_path, syn, run, "--epochs", "1")) == 0
    before = (run / "last.pt").read_bytes()
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (tiny(tmp_path, syn, run, "--epochs", "1"), f"{run}: already holds files; choose another --out-dir or "
         f"remove it; if it was interrupted, continue it with: python engine.py --resume {run}"),
        (["--resume", str(run), "--epochs", "3", "--lr", "0.001", "--batch-size", "4"],
         f"--resume {run} keeps the run's own settings, so --epochs 3 (the run's: 1) would be ignored; drop it"),
        (["--resume", str(run), "--pretrained", str(run / "last.pt")],
         f"--pretrained {run / 'last.pt'} (the run's: none) would be ignored"),
        (tiny(tmp_path, syn, tmp_path / "r2", "--val-patients", "SYN_77"), "SYN_77"),
        (tiny(tmp_path, syn, tmp_path / "r2", "--val-patients", str(tmp_path / "val.txt")),
         f"--val-patients {tmp_path / 'val.txt'}: no such file"),
        (tiny(tmp_path, empty, tmp_path / "r3"), "no patient folders"),
        (tiny(tmp_path, syn, tmp_path / "r4", "--split", "buda"), "TCGA_HT_7616"),
        (tiny(tmp_path, syn, tmp_path / "r5", "--modality-dropout", "1.5"), "--modality-dropout"),
        (tiny(tmp_path, syn, tmp_path / "r6", "--batch-size", "0"), "--batch-size must be at least 1, got 0"),
        (tiny(tmp_path, syn, tmp_path / "r7", "--lr", "-1"), "--lr must be >= 0, got -1"),
        (tiny(tmp_path, syn, tmp_path / "r8", "--features", "0"), "--features must be at least 1, got 0"),
        (tiny(tmp_path, syn, tmp_path / "r9", "--weight-decay", "-0.1"), "--weight-decay must be >= 0"),
        (tiny(tmp_path, syn, tmp_path / "r10", "--warmup-epochs", "-1"), "--warmup-epochs must be >= 0"),
        (tiny(tmp_path, syn, tmp_path / "r11", "--patience", "-2"), "--patience must be >= 0"),
        (tiny(tmp_path, syn, tmp_path / "r12", "--tumor-weight", "0"), "--tumor-weight must be > 0, got 0"),
        # scikit-learn's split raised InvalidParameterError with a traceback.
        (tiny(tmp_path, syn, tmp_path / "r13", "--seed", "-1"), "--seed must be in [0, 2^32)"),
        (tiny(tmp_path, syn, tmp_path / "r14", "--seed", str(2**32)), f"got {2**32}"),
        # BatchNorm's ValueError from inside the first step: one slice at a 1x1 bottleneck.
        (tiny(tmp_path, syn, tmp_path / "r15", "--batch-size", "1", "--image-size", "16"),
         "--batch-size 1 at --image-size 16 leaves BatchNorm one value per channel"),
        (tiny(tmp_path, syn, tmp_path / "README.md", "--epochs", "1"), "README.md: is a file, not a folder"),
        (tiny(tmp_path, syn, tmp_path / "README.md" / "run", "--epochs", "1"),
         f"README.md/run: {tmp_path / 'README.md'} is a file, not a folder; choose another --out-dir"),
    ]
    (tmp_path / "README.md").write_text("a file where the run folder would go")
    for argv, expected in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert expected in err and err.count("\n") == 0 and "Traceback" not in err, (argv, err)
    assert (run / "last.pt").read_bytes() == before
    torch.load(run / "last.pt", weights_only=True)
    # Nor did a refused run leave an empty folder behind (which a second try would find in its way).
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith("r") and p.name != "run"]


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc, where no one can create a file")
def test_an_output_where_nothing_can_be_written_is_refused_before_any_work(tmp_path, syn, capsys, monkeypatch):
    """Bug: a run folder or --out under a folder that takes no files (/proc here; a read-only disk or
    another user's folder alike) ended in a traceback, and benchmark's only after all its timing."""
    import benchmark

    monkeypatch.setattr(benchmark, "time_paths", lambda *a, **k: pytest.fail("timed before the check"))
    run = tmp_path / "run"
    assert main(tiny(tmp_path, syn, run, "--epochs", "1")) == 0
    capsys.readouterr()
    cases = [
        (tiny(tmp_path, syn, "/proc/lgg-run", "--epochs", "1"), "/proc/lgg-run", "--out-dir"),
        (["cv", *tiny(tmp_path, syn, "/proc/lgg-cv", "--folds", "2")], "/proc/lgg-cv", "--out-dir"),
        (["benchmark", "--data-dir", str(syn), "--out", "/proc/b.json"], "/proc/b.json", "--out"),
        (["benchmark", "--data-dir", str(syn), "--out-dir", "/proc/bench"], "/proc/bench/benchmark-", "--out-dir"),
        (["data", "--data-dir", str(syn), "--out", "/proc/d.json"], "/proc/d.json", "--out"),
        (["compare", str(run), str(run), "--out", "/proc/p.csv"], "/proc/p.csv", "--out"),
        (["evaluate", "--checkpoint", str(run / "last.pt"), "--out-dir", "/proc/ev"], "/proc/ev", "--out-dir"),
        (["predict", "--checkpoint", str(run / "last.pt"), "--input", str(syn), "--output", "/proc/pr"],
         "/proc/pr", "--output"),
    ]
    for argv, named, flag in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {named}") and err.count("\n") == 0, err
        assert ": nothing can be written in /proc (" in err
        assert err.endswith(f"choose another {flag}"), err

    # Where the folder refuses for want of permission (which root, running this, never lacks).
    import libraries

    def denied(dir=None):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(libraries.tempfile, "TemporaryFile", denied)
    assert main(tiny(tmp_path, syn, tmp_path / "new" / "run", "--epochs", "1")) == 2
    assert capsys.readouterr().err.strip() == (f"error: {tmp_path / 'new' / 'run'}: nothing can be written in "
                                               f"{tmp_path} (Permission denied); choose another --out-dir")
    assert not (tmp_path / "new").exists()


def test_disk_full_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, syn, monkeypatch, capsys):
    """The write of epoch 2's last.pt fails as a full disk makes torch.save fail: one line, and
    epoch 1's last.pt is left whole."""
    import libraries

    real_save, calls = torch.save, []

    def failing_save(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) == 3:  # epoch 1 wrote last.pt and best.pt; this is epoch 2's last.pt
            with open(f, "wb") as half:
                half.write(b"PK\x03\x04 half a zip")
            raise RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file "
                               "data/12: file write failed")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(libraries.torch, "save", failing_save)
    run = tmp_path / "run"
    assert main(tiny(tmp_path, syn, run, "--epochs", "2")) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "last.pt: could not be written" in err and "is intact" in err
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 1
    assert not list(run.glob(".*.tmp"))  # the half-written temporary file is gone
    assert "run the command again (a training run continues with --resume)" in err

    # A release export whose write fails: one line, and no file left in its folder (it was a
    # traceback, and a .unet-export.tmp stayed).
    monkeypatch.setattr(libraries.torch, "save", real_save)

    def disk_full(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(libraries.os, "replace", disk_full)
    release = tmp_path / "release"
    assert main(["export", "--checkpoint", str(run / "last.pt"), "--format", "state_dict",
                 "--output", str(release)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "could not be written (No space left on device)" in err, err
    assert list(release.iterdir()) == []


def test_a_full_disk_anywhere_is_one_line_that_says_what_to_do(tmp_path, syn, monkeypatch, capsys):
    """A report, chart or mask written without atomic_write (pandas, matplotlib, OpenCV) met a full
    disk with a traceback from deep inside the library, or, for OpenCV, without a word."""
    import errno

    import cv2
    import reports

    def full(run_dir, history):
        raise OSError(errno.ENOSPC, "No space left on device", str(run_dir / "curves.png"))

    monkeypatch.setattr(reports, "plot_curves", full)
    run = tmp_path / "run"
    assert main(tiny(tmp_path, syn, run, "--epochs", "1")) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {run / 'curves.png'}: No space left on device; free some disk space, then run the command "
                   "again (checkpoints already written are kept; a training run continues with --resume)")
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 1  # written before the history
    # Any other OSError is a bug, and keeps its traceback.
    monkeypatch.setattr(reports, "plot_curves", lambda *a: open(tmp_path / "no" / "such" / "file"))
    with pytest.raises(FileNotFoundError):
        main(tiny(tmp_path, syn, tmp_path / "run2", "--epochs", "1"))
    monkeypatch.undo()

    # A mask that could not be written (cv2.imwrite said so only by returning False: predict wrote no
    # mask and said it had), or that OpenCV could not encode.
    def disk_full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    for i, (patch, reason) in enumerate([((Path, "write_bytes", disk_full), "No space left on device"),
                                         ((cv2, "imencode", lambda ext, image, *a: (False, None)),
                                          "OpenCV could not encode it as .png")]):
        monkeypatch.setattr(*patch)
        out = tmp_path / f"pred{i}"
        assert main(["predict", "--checkpoint", str(run / "last.pt"), "--input", str(syn / "SYN_00_20000101"),
                     "--output", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {out / 'masks' / 'SYN_00_20000101'}") and err.count("\n") == 0, err
        assert f"could not be written ({reason})" in err
        monkeypatch.undo()
        # Run again, it names what the failed run left (it named predictions.csv, which was not there).
        assert main(["predict", "--checkpoint", str(run / "last.pt"), "--input", str(syn / "SYN_00_20000101"),
                     "--output", str(out)]) == 2
        assert f"{out}: already holds predictions (masks/); choose" in capsys.readouterr().err


def test_weights_of_another_configuration_name_both_values(tmp_path, syn, capsys):
    ckpt = tmp_path / "w.pt"
    from model import UNet
    torch.save(UNet(features=4).state_dict(), ckpt)
    assert main(tiny(tmp_path, syn, tmp_path / "run", "--pretrained", str(ckpt), "--features", "8")) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "weights are --features 4" in err and "--features 8" in err


def test_a_weights_file_whose_name_carries_a_hash_is_checked(tmp_path, syn, capsys):
    import hashlib

    from model import UNet
    good = tmp_path / "w.pt"
    torch.save(UNet(features=4).state_dict(), good)
    digest = hashlib.sha256(good.read_bytes()).hexdigest()
    named = tmp_path / f"unet-{digest[:8]}.pt"
    good.rename(named)
    assert main(tiny(tmp_path, syn, tmp_path / "ok", "--pretrained", str(named), "--epochs", "1")) == 0
    wrong = tmp_path / f"unet-{'0' * 8 if digest[:8] != '0' * 8 else '1' * 8}.pt"
    wrong.write_bytes(named.read_bytes())
    assert main(tiny(tmp_path, syn, tmp_path / "bad", "--pretrained", str(wrong))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "its name says sha256" in err[0] and f"has {digest[:8]}" in err[0]


def test_output_piped_to_a_reader_that_left_ends_quietly(tmp_path):
    """`engine.py compare A B | head -1`: head exits after a line, and the rest of the output meets a
    closed pipe. That ends the command with status 1 and no traceback."""
    for name, dice in (("a", 0.5), ("b", 0.7)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps(
            {"postprocessing": {"none": {"dice_per_patient": {"P1": dice, "P2": dice + 0.1}}}}))
    proc = subprocess.Popen([sys.executable, str(ROOT / "engine.py"), "compare", "a", "b"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # the reader is gone before the first line is written
    err = proc.stderr.read()
    assert proc.wait() == 1
    assert "Traceback" not in err and "Exception ignored" not in err and "BrokenPipeError" not in err


def test_the_recorded_dataset_is_found_from_any_folder_and_named_when_it_moved(tmp_path, syn, monkeypatch, capsys):
    """A run records its data folder for evaluate and --resume. It was recorded as given, so a
    relative --data-dir broke both from another working folder, with an error about a --data-dir
    the user never passed."""
    import shutil

    shutil.copytree(syn, tmp_path / "data" / "kaggle_3m")
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    assert main(tiny(tmp_path, "data/kaggle_3m", run, "--epochs", "1")) == 0
    monkeypatch.chdir(run)
    assert main(["evaluate", "--checkpoint", str(run / "last.pt"), "--out-dir", str(tmp_path / "ev")]) == 0
    scored, trained = (json.loads((d / "metrics.json").read_text()) for d in (tmp_path / "ev", run))
    assert scored["per_patient"] == trained["per_patient"]
    (tmp_path / "data").rename(tmp_path / "moved")
    capsys.readouterr()
    for argv, record in ((["evaluate", "--checkpoint", str(run / "last.pt")], run / "last.pt"),
                         (["--resume", str(run)], run / "last.pt")):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err == (f"error: {tmp_path / 'data' / 'kaggle_3m'} (recorded in {record}): no such folder; the data "
                       "has moved or this is another machine: pass --data-dir"), err
    assert main(["evaluate", "--checkpoint", str(run / "last.pt"), "--data-dir", str(tmp_path / "moved" / "kaggle_3m"),
                 "--out-dir", str(tmp_path / "ev2")]) == 0


def test_a_cache_that_cannot_be_written_is_skipped_with_one_warning(tmp_path, syn, monkeypatch, capsys):
    """The decoded-slice cache only saves time: a cache folder that cannot be made (here a file
    stands in its way, as a read-only home would) ended the run in a traceback before training."""
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the cache folder would go")
    monkeypatch.setenv("LGG_CACHE_DIR", str(blocker / "cache"))
    assert main(tiny(tmp_path, syn, tmp_path / "blocked", "--epochs", "1")) == 0
    err = capsys.readouterr().err
    assert err.count("the decoded-slice cache cannot be written") == 1, err
    assert "Traceback" not in err and blocker.read_text().startswith("a file")
    monkeypatch.setenv("LGG_CACHE_DIR", "off")
    assert main(tiny(tmp_path, syn, tmp_path / "off", "--epochs", "1")) == 0
    blocked, off = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("blocked", "off"))
    assert blocked["per_patient"] == off["per_patient"]  # the same run, only slower


def test_evaluate_never_overwrites_an_earlier_evaluation_or_the_run_itself(tmp_path, syn, capsys):
    run = tmp_path / "run"
    assert main(tiny(tmp_path, syn, run, "--epochs", "1")) == 0
    trained = (run / "metrics.json").read_bytes()
    evaluate = ["evaluate", "--checkpoint", str(run / "last.pt")]
    assert main([*evaluate, "--threshold", "0.3"]) == 0
    first = (run / "evaluate-last" / "metrics.json").read_bytes()
    assert main([*evaluate, "--threshold", "0.7"]) == 0  # again, with the default folder: a new one beside it
    assert (run / "evaluate-last" / "metrics.json").read_bytes() == first
    assert json.loads((run / "evaluate-last-2" / "metrics.json").read_text())["threshold"] == 0.7
    assert f"wrote {run / 'evaluate-last-2'}/" in capsys.readouterr().out
    assert main([*evaluate, "--out-dir", str(run)]) == 2  # the run's own metrics.json
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {run}: already holds results (metrics.json); choose another --out-dir or remove "
                   "them: earlier results are never overwritten"), err
    assert (run / "metrics.json").read_bytes() == trained


def test_ctrl_c_is_one_line_that_says_how_to_go_on(tmp_path, syn, monkeypatch, capsys):
    """Ctrl-C in training printed a traceback from inside a convolution."""
    real_run_epoch, epochs = engine.run_epoch, []

    def interrupted_in_epoch_2(epoch, *args, **kwargs):
        epochs.append(epoch)
        if epoch == 2:
            raise KeyboardInterrupt
        return real_run_epoch(epoch, *args, **kwargs)

    monkeypatch.setattr(engine, "run_epoch", interrupted_in_epoch_2)
    run = tmp_path / "run"
    assert main(tiny(tmp_path, syn, run, "--epochs", "3")) == 130
    err = capsys.readouterr().err.strip()
    assert err == (f"interrupted; the epochs finished are in {run / 'last.pt'}: continue with "
                   f"python engine.py --resume {run}"), err
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 1
    monkeypatch.setattr(engine, "run_epoch", real_run_epoch)
    assert main(["--resume", str(run)]) == 0
    assert json.loads((run / "metrics.json").read_text())["epoch"] == 3

    # In cv, the fold's own --resume would continue that fold alone: the line names cv --resume.
    monkeypatch.setattr(engine, "run_epoch", interrupted_in_epoch_2)
    cv_dir = tmp_path / "cv"
    assert main(["cv", *tiny(tmp_path, syn, cv_dir, "--folds", "2", "--epochs", "3")]) == 130
    assert capsys.readouterr().err.strip().endswith(f"continue with python engine.py cv --resume {cv_dir}")


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_atomic_writes_get_the_permissions_open_would_give(tmp_path):
    """mkstemp makes its file private (0600), so every checkpoint, metrics.json and exported model
    was unreadable to the rest of a lab's group, or to a server running under another user."""
    from libraries import save_json

    old = os.umask(0o027)
    try:
        save_json(tmp_path / "atomic.json", {"a": 1})
        (tmp_path / "plain.json").write_text("{}")
        mode = lambda name: (tmp_path / name).stat().st_mode & 0o777
        assert mode("atomic.json") == mode("plain.json") == 0o640
        (tmp_path / "atomic.json").chmod(0o604)  # replacing a file keeps the permissions it was given
        save_json(tmp_path / "atomic.json", {"a": 2})
        assert mode("atomic.json") == 0o604 and json.loads((tmp_path / "atomic.json").read_text()) == {"a": 2}
    finally:
        os.umask(old)


def test_a_run_logged_to_a_file_shows_each_line_as_it_is_printed(tmp_path, syn):
    """Python buffers stdout in 8 KB blocks when it is not a terminal: a CPU preset's 1.7 hours
    logged with '> train.log' showed nothing until the run ended."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(ROOT / "engine.py"), *tiny(tmp_path, syn, run, "--epochs", "3")],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=tmp_path)
    try:
        first = proc.stdout.readline()
        assert first.startswith("data: ") and not (run / "metrics.json").exists()  # before the run's end
    finally:  # the rest of the run shows nothing more: the test ends it
        proc.kill()
        proc.wait()


NON_ASCII = "Łódź"  # 'ł' is in neither Windows' Western code page (cp1252) nor ASCII

UNDER_C_LOCALE = """
import sys
if sys.getfilesystemencoding() != "ascii":
    sys.exit(77)
sys.path.insert(0, {root!r})
import engine
home, tiny = sys.argv[1], ["--image-size", "32", "--features", "4", "--batch-size", "4", "--device", "cpu"]
assert engine.main(["--data-dir", home + "/kaggle_3m", "--epochs", "1", "--out-dir", home + "/run", *tiny]) == 0
assert engine.main(["predict", "--checkpoint", home + "/run/last.pt", "--input", home + "/kaggle_3m",
                    "--output", home + "/pred"]) == 0
assert engine.main(["export", "--checkpoint", home + "/run/last.pt", "--format", "torchscript",
                    "--output", home + "/unet.ts"]) == 0
"""


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")  # the user's side, not ours
def test_a_folder_name_the_locale_cannot_encode_trains_predicts_and_exports(tmp_path, syn):
    """cv2.imread and cv2.imwrite pass the path to the C library: on Windows they fail on a name
    outside the ANSI code page (opencv/opencv#4292), and where the locale's encoding lacks a
    character of the name (the C locale here, as 'ł' on a cp1252 system) OpenCV crashed the
    process with SIGSEGV. TorchScript's writer, the slice cache's key, summary.md and the CSVs
    failed on it too."""
    import shutil

    home = tmp_path / NON_ASCII
    shutil.copytree(syn, home / "kaggle_3m")
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    done = subprocess.run([sys.executable, "-c", UNDER_C_LOCALE.format(root=str(ROOT)), str(home)], env=env,
                          cwd=tmp_path, capture_output=True)
    if done.returncode == 77:
        pytest.skip("this Python decodes file names as UTF-8 even in the C locale")
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    assert f"`{home / 'kaggle_3m'}`".encode() in (home / "run" / "summary.md").read_bytes()  # UTF-8, as on disk
    slices = sorted(p.name for p in (home / "kaggle_3m").rglob("*.tif") if not p.stem.endswith("_mask"))
    assert sorted(p.name.replace("_pred.png", ".tif") for p in (home / "pred" / "masks").rglob("*.png")) == slices
    assert str(home).encode() in (home / "pred" / "predictions.csv").read_bytes()
    assert torch.jit.load(str(home / "unet.ts"))(torch.zeros(1, 3, 32, 32)).shape == (1, 1, 32, 32)


def test_a_path_that_stdout_cannot_encode_is_escaped_not_a_crash(tmp_path, syn):
    """print raised UnicodeEncodeError on a path outside stdout's encoding: on Windows, output
    redirected to a file is written in the code page (PYTHONIOENCODING=ascii stands in for it)."""
    import shutil

    shutil.copytree(syn, tmp_path / NON_ASCII / "kaggle_3m")
    done = subprocess.run([sys.executable, str(ROOT / "engine.py"), "data", "--data-dir", NON_ASCII + "/kaggle_3m"],
                          env={**os.environ, "PYTHONIOENCODING": "ascii"}, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "\\u0141\\xf3d\\u017a/kaggle_3m" in done.stdout  # backslash escapes: Łódź
