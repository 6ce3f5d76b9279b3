"""Reports are written headless: files exist, images decode and show something, tables are complete."""

import csv
import json

import matplotlib.image as mpimg
import numpy as np
import pytest
from conftest import synthetic_tree

from engine import main
import pandas as pd

from data_files import institution
from reports import (PRED_COLOR, TRUTH_COLOR, by_institution, epoch_line, format_duration, overlay_slice,
                     paired_difference, seconds_left, training_time)


def test_overlay_slice_draws_both_outlines_exactly():
    flair = np.tile(np.arange(16, dtype=np.uint8) * 10, (16, 1))
    truth = np.zeros((16, 16), bool)
    truth[4:8, 4:8] = True
    pred = np.zeros((16, 16), bool)
    pred[9:14, 9:14] = True
    out = overlay_slice(flair, truth, pred)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert tuple(out[4, 4]) == TRUTH_COLOR and tuple(out[7, 5]) == TRUTH_COLOR  # border
    assert tuple(out[9, 13]) == PRED_COLOR
    assert out[5, 5, 0] == out[5, 5, 1] == out[5, 5, 2]  # inside the outline: gray FLAIR
    assert out[0, 0, 0] == out[0, 0, 1] == out[0, 0, 2]  # gray background


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reports")
    argv = ["--data-dir", synthetic_tree(tmp / "syn", 5, 8), "--image-size", "32", "--features", "4",
            "--epochs", "2", "--batch-size", "4", "--device", "cpu",
            "--out-dir", str(tmp / "run")]
    assert main(argv) == 0
    return tmp / "run"


def _has_color(image: np.ndarray, rgb: tuple[int, int, int], tol: int = 60) -> bool:
    pixels = (image[..., :3] * 255 if image.dtype != np.uint8 else image[..., :3]).astype(int)
    return bool((np.abs(pixels - np.array(rgb)).max(axis=-1) <= tol).any())


def test_run_writes_every_report(run):
    metrics = json.loads((run / "metrics.json").read_text())
    val = [p["patient"] for p in metrics["per_patient"]]
    for name in ("curves.png", "dice_per_volume.png", *(f"overlays/{p}.png" for p in val)):
        image = mpimg.imread(run / name)
        assert image.ndim == 3 and image[..., :3].std() > 0.02, name  # decodes, not blank
    for p in val:
        # Every synthetic patient has tumor slices: the truth outline (green) is drawn.
        assert _has_color(mpimg.imread(run / "overlays" / f"{p}.png"), TRUTH_COLOR), p
    with open(run / "per_patient.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["patient"] for r in rows] == val
    for r, m in zip(rows, metrics["per_patient"]):
        assert float(r["dice"]) == pytest.approx(m["dice"]) and int(r["slices"]) == 8
        assert int(r["true_area_px"]) == m["tumor_pixels"] > 0 and int(r["pred_area_px"]) == m["predicted_pixels"]
        assert {"iou", "hd95_px", "tumor_slices"} <= r.keys()
    assert [r["institution"] for r in rows] == [institution(p) for p in val]
    # The synthetic lesions are FLAIR-bright by construction: a clearly positive contrast.
    assert all(float(r["flair_contrast"]) > 0.5 for r in rows), [r["flair_contrast"] for r in rows]
    summary = (run / "summary.md").read_text()
    # Each institution's row holds the mean raw Dice of its patients.
    raw = metrics["postprocessing"]["none"]["dice_per_patient"]
    assert "Mean Dice per volume by institution" in summary
    for site in {institution(p) for p in val}:
        mine = [raw[p] for p in val if institution(p) == site]
        assert f"| {site} | {len(mine)} | {np.mean(mine):.4f} |" in summary
    for text in ("Synthetic data", "dice_per_volume_mean", "overlays/", "curves.png", "torch", "Worst and best",
                 f"{metrics['dice_per_volume_mean']:.4f}"):
        assert text in summary, text


def test_evaluate_writes_the_same_reports(run, tmp_path):
    out = tmp_path / "eval"
    assert main(["evaluate", "--checkpoint", str(run / "best.pt"), "--device", "cpu", "--out-dir", str(out)]) == 0
    for name in ("metrics.json", "per_patient.csv", "dice_per_volume.png", "summary.md"):
        assert (out / name).is_file(), name
    assert len(list((out / "overlays").glob("*.png"))) == len(json.loads((out / "metrics.json").read_text())["per_patient"])


def test_all_rules_is_for_evaluate_and_predict_refuses_it(run, tmp_path):
    """--all-rules scores every post-processing rule in evaluate; predict accepted it and did nothing."""
    from evaluation import POSTPROCESSING

    reported = {}
    for flag in ("on", "off"):
        out = tmp_path / f"eval-{flag}"
        assert main(["evaluate", "--checkpoint", str(run / "best.pt"), "--device", "cpu", "--all-rules", flag,
                     "--postprocess", "lcc", "--out-dir", str(out)]) == 0
        reported[flag] = set(json.loads((out / "metrics.json").read_text())["postprocessing"])
    assert reported == {"on": set(POSTPROCESSING), "off": {"none", "lcc"}}
    with pytest.raises(SystemExit):  # argparse: unrecognized arguments
        main(["predict", "--checkpoint", str(run / "best.pt"), "--input", str(tmp_path), "--output",
              str(tmp_path / "p"), "--all-rules"])


def test_paired_difference_by_hand():
    a, b = [0.5, 0.6, 0.7], [0.6, 0.6, 0.9]  # B - A = 0.1, 0.0, 0.2
    r = paired_difference(a, b, resamples=2000, seed=1)
    assert r["patients"] == 3 and r["difference"] == pytest.approx(0.1)
    assert (r["mean_a"], r["median_a"], r["mean_b"], r["median_b"]) == pytest.approx((0.6, 0.6, 0.7, 0.6))
    assert (r["better"], r["worse"]) == (2, 0)
    # Resampled means of {0, 0.1, 0.2} lie in [0, 0.2]. Three draws of 0 (or of 0.2) have chance
    # 1/27 > 2.5%, so the 2.5th and 97.5th percentiles are the ends themselves.
    assert (r["ci95_low"], r["ci95_high"]) == pytest.approx((0.0, 0.2))
    assert paired_difference(a, b, resamples=2000, seed=1) == r  # seeded
    # The same change for every patient leaves nothing to resample: the interval is that change.
    same = paired_difference(a, [x - 0.05 for x in a])
    assert (same["difference"], same["ci95_low"], same["ci95_high"]) == pytest.approx((-0.05,) * 3)
    assert (same["better"], same["worse"]) == (0, 3)


def test_seconds_left_by_hand():
    """Epochs of 100 s and 130 s, the second with a validation of 200 slices at 10 img/s (20 s):
    training phases of 100 and 110 s. Three epochs and one validation left: 3 x 105 + 20 = 335 s."""
    rows = [{"seconds": 100.0, "train_loss": 1.0, "train_images_per_second": 24.0},
            {"seconds": 130.0, "train_loss": 0.9, "train_images_per_second": 21.8, "val_images_per_second": 10.0}]
    assert seconds_left(rows, 200, 3, 1) == pytest.approx(335.0)
    assert seconds_left(rows[:1], 200, 2, 1) == pytest.approx(200.0)  # no validation timed yet: none counted
    assert seconds_left(rows, 200, 0, 0) == 0.0
    assert (format_duration(335.0), format_duration(89.0), format_duration(2700.0)) == ("6 min", "89 s", "45 min")
    assert epoch_line(2, 5, rows[0], best=False, left=335.0).endswith("100s (24.0 img/s)  ~6 min left")
    assert "left" not in epoch_line(5, 5, rows[0], best=False, left=0.0)  # the last epoch
    assert "left" not in epoch_line(2, 5, rows[0], best=False)


def test_training_time_of_a_resumed_run_counts_the_epochs_before_the_resume():
    """Epochs of 60, 90 and 150 s; the process resumed after epoch 1 and ran 4 min (240 s): 5 min in all."""
    rows = [{"seconds": 60.0}, {"seconds": 90.0}, {"seconds": 150.0}]
    minutes, text = training_time(rows, 240.0, epochs_here=2)
    assert minutes == pytest.approx({"training minutes, all epochs": 5.0, "training minutes, since the resume": 4.0})
    assert text == "5.0 min, 4.0 of them since the resume"
    # A run that never stopped: its own clock, which also counts the checkpoints between epochs.
    assert training_time(rows, 306.0, epochs_here=3) == ({"training minutes": 5.1}, "5.1 min")
    # Resumed after its last epoch, to score it again: nothing trained since.
    assert training_time(rows, 0.0, epochs_here=0)[1] == "5.0 min, 0.0 of them since the resume"


def write_scores(folder, scores: dict) -> None:
    """A metrics.json as evaluation writes it, for {patient: (dice, dice with LCC)}."""
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({"postprocessing": {
        "none": {"dice_per_patient": {k: v[0] for k, v in scores.items()}},
        "lcc": {"dice_per_patient": {k: v[1] for k, v in scores.items()}}}}))


def test_compare_a_rule_only_the_newer_run_reports(tmp_path, capsys):
    """An older cv folder lacks the newer rules' columns: comparing its 'lcc' with the newer run's
    'brain-multi' pairs them (a traceback before), and a rule A lacks is refused in one line."""
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    new.mkdir()
    (old / "cv_patients.csv").write_text("fold,patient,dice,dice_lcc\n0,P1,0.5,0.6\n0,P2,0.8,0.8\n")
    (new / "cv_patients.csv").write_text("fold,patient,dice,dice_lcc,dice_brain-multi\n0,P1,0.5,0.5,0.9\n"
                                         "0,P2,0.7,0.7,0.9\n")
    assert main(["compare", str(old), str(new), "--postprocess-a", "lcc", "--postprocess-b", "brain-multi"]) == 0
    # P1 0.6 -> 0.9, P2 0.8 -> 0.9: mean 0.7 -> 0.9.
    assert "lcc -> brain-multi: mean 0.7000 -> 0.9000, B - A +0.2000" in capsys.readouterr().out
    assert main(["compare", str(new), str(old), "--postprocess-a", "brain-multi", "--postprocess-b",
                 "brain-multi"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "run B has no Dice with post-processing 'brain-multi'; it has none, lcc" in err
    # --out is checked before the runs are read, and its folders are made.
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    assert main(["compare", str(old), str(new), "--out", str(a_file / "paired.csv")]) == 2
    assert capsys.readouterr().err.strip() == (f"error: {a_file / 'paired.csv'}: {a_file} is a file, not a folder; "
                                               "choose another --out")
    assert main(["compare", str(old), str(new), "--out", str(tmp_path / "new" / "dir" / "paired.csv")]) == 0
    assert pd.read_csv(tmp_path / "new" / "dir" / "paired.csv")["patient"].tolist() == ["P1", "P2"]


def test_compare_pairs_a_cv_folder_with_an_evaluation_by_patient(tmp_path, capsys):
    cv = tmp_path / "cv"
    cv.mkdir()
    (cv / "cv_patients.csv").write_text("fold,patient,dice,dice_lcc\n0,P1,0.5,0.6\n0,P2,0.8,0.8\n1,P3,0.4,0.5\n")
    evaluation = tmp_path / "evaluate-last"
    write_scores(evaluation, {"P3": (0.7, 0.9), "P4": (0.1, 0.1), "P2": (0.6, 0.8)})  # P4 only here
    out = tmp_path / "paired.csv"
    assert main(["compare", str(cv), str(evaluation), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "2 patients scored by both (left out: 1 only in A, 1 only in B)" in text
    # P2, P3: raw 0.8 -> 0.6, 0.4 -> 0.7 (mean B - A +0.05); LCC 0.8 -> 0.8, 0.5 -> 0.9 (+0.2).
    assert "mean 0.6000 -> 0.6500, B - A +0.0500" in text and "mean 0.6500 -> 0.8500, B - A +0.2000" in text
    with open(out) as f:
        rows = list(csv.DictReader(f))
    paired = [(r["patient"], float(r["dice_a"]), float(r["dice_b"])) for r in rows]
    assert paired == [("P2", 0.8, 0.6), ("P3", 0.4, 0.7)]

    # The same scores as a cv that has not written cv_patients.csv yet: its finished folds count,
    # a fold still training (no metrics.json) and a set-aside incomplete fold do not.
    unfinished = tmp_path / "cv-running"
    write_scores(unfinished / "fold-0", {"P1": (0.5, 0.6), "P2": (0.8, 0.8)})
    write_scores(unfinished / "fold-1", {"P3": (0.4, 0.5)})
    write_scores(unfinished / "fold-2.incomplete", {"P4": (0.0, 0.0)})
    (unfinished / "fold-3").mkdir()
    assert main(["compare", str(unfinished), str(evaluation)]) == 0
    again = capsys.readouterr().out
    assert "no cv_patients.csv; its finished folds: fold-0, fold-1" in again
    assert again.splitlines()[2:] == text.splitlines()[2:-1]  # all but the headers and the --out line


def test_compare_refuses_fold_folders_that_score_a_patient_twice(tmp_path, capsys):
    """Fold folders gathered by hand from two splits hold a patient twice; pairing by patient would
    count it twice (2 x 2 rows for P1 here) and shift the mean and its interval, so compare refuses."""
    gathered, other = tmp_path / "gathered", tmp_path / "other"
    write_scores(gathered / "fold-0", {"P1": (0.5, 0.6), "P2": (0.8, 0.8)})
    write_scores(gathered / "fold-1", {"P1": (0.4, 0.5), "P3": (0.7, 0.7)})
    write_scores(other, {"P1": (0.6, 0.6), "P2": (0.6, 0.6), "P3": (0.6, 0.6)})
    assert main(["compare", str(gathered), str(other)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "gathered" in err and "P1 scored twice" in err and "fold-0, fold-1" in err
    # The same two splits pasted into one cv_patients.csv.
    (tmp_path / "pasted.csv").write_text("fold,patient,dice\n0,P1,0.5\n0,P2,0.8\n1,P1,0.4\n1,P3,0.7\n")
    assert main(["compare", str(tmp_path / "pasted.csv"), str(other)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pasted.csv" in err and "P1 scored twice" in err


def test_compare_refuses_what_holds_no_scores_in_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "unscored").mkdir()  # a --split none run: metrics.json without scores
    (tmp_path / "unscored" / "metrics.json").write_text(json.dumps({"epoch": 20, "train_loss": 0.1}))
    for b in ("empty", "unscored"):
        assert main(["compare", str(tmp_path / "unscored"), str(tmp_path / b)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "unscored" in err
    assert main(["compare", str(tmp_path / "empty"), str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "holds no cv_patients.csv, metrics.json or finished fold" in err


def test_institution_is_the_tcga_site():
    assert institution("TCGA_CS_4941_19960909") == "TCGA_CS"
    assert institution("TCGA_HT_A61A_20000127") == "TCGA_HT"


def test_by_institution_by_hand():
    scores = pd.DataFrame({"patient": ["TCGA_DU_1_x", "TCGA_CS_1_x", "TCGA_DU_2_x"],
                           "dice": [0.5, 0.2, 0.7], "dice_lcc": [0.6, 0.0, 0.8]})
    table = by_institution(scores)
    assert table["institution"].tolist() == ["TCGA_CS", "TCGA_DU", "all"]
    assert table["patients"].tolist() == [1, 2, 3]
    assert table["dice"].tolist() == pytest.approx([0.2, 0.6, 1.4 / 3])
    assert table["dice_lcc"].tolist() == pytest.approx([0.0, 0.7, 1.4 / 3])


def test_compare_of_too_few_patients_gives_no_interval(tmp_path, capsys):
    # One patient's bootstrap is that patient's difference every time: '95% CI +0.1000 to +0.1000'
    # looked certain. Under five patients no interval is printed, as for an institution.
    write_scores(tmp_path / "a", {"TCGA_AA_1_x": (0.5, 0.5)})
    write_scores(tmp_path / "b", {"TCGA_AA_1_x": (0.6, 0.6)})
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2] == "1 patient scored by both"
    assert lines[3].strip() == ("raw: mean 0.5000 -> 0.6000, B - A +0.1000 (no interval under 5 patients); median "
                                "0.5000 -> 0.6000; patients better: 1, worse: 0 (by more than 0.005)")


def test_compare_by_institution_by_hand(tmp_path, capsys):
    # Five TCGA_AA patients gain 0.1 each, the one TCGA_BB patient loses 0.4: +0.1/6 in all.
    a = {f"TCGA_AA_{i}_x": (0.5, 0.5) for i in range(5)} | {"TCGA_BB_1_x": (0.8, 0.8)}
    b = {f"TCGA_AA_{i}_x": (0.6, 0.6) for i in range(5)} | {"TCGA_BB_1_x": (0.4, 0.4)}
    write_scores(tmp_path / "a", a)
    write_scores(tmp_path / "b", b)
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--by-institution"]) == 0
    lines = capsys.readouterr().out.splitlines()[3:]
    assert len(lines) == 6  # raw, its two institutions, lcc, its two institutions
    assert lines[0].strip().startswith("raw: mean 0.5500 -> 0.5667, B - A +0.0167")
    assert lines[1].strip() == ("TCGA_AA (5): mean 0.5000 -> 0.6000, B - A +0.1000 (95% CI +0.1000 to +0.1000); "
                                "better: 5, worse: 0")
    assert lines[2].strip() == ("TCGA_BB (1): mean 0.8000 -> 0.4000, B - A -0.4000 (no interval under 5 patients); "
                                "better: 0, worse: 1")
    assert lines[3].strip().startswith("lcc:") and lines[4:] == lines[1:3]


def test_counts_of_one_read_in_the_singular(tmp_path, capsys):
    """A run validated on one patient printed '1 patients'; every count goes through counted()."""
    from conftest import lesion_volume
    from data_files import describe_masks
    from libraries import counted

    assert [counted(n, "patient") for n in (0, 1, 2, 1234)] == ["0 patients", "1 patient", "2 patients",
                                                                "1,234 patients"]
    one, two = lesion_volume("A", 10, 10, (3,)), lesion_volume("B", 10, 10, (3,))
    assert describe_masks({"A": one}) == "masks 0/255 (1 patient)"
    assert describe_masks({"A": one, "B": two}) == "masks 0/255 (2 patients)"
    data = synthetic_tree(tmp_path / "syn", 4, 5)
    assert main(["--data-dir", data, "--features", "4", "--image-size", "32", "--epochs", "1", "--steps-per-epoch", "1",
                 "--batch-size", "2", "--device", "cpu", "--out-dir", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "  1 patient, 5 slices (" in out and "1 patients" not in out
    assert "1 patient, 5 slices (" in (tmp_path / "run" / "summary.md").read_text()


def test_first_names_lists_a_few_and_marks_the_rest():
    from libraries import first_names

    assert first_names(["a", "b", "c"]) == "a, b, c"  # all shown: no ellipsis
    assert first_names(["a", "b", "c", "d"]) == "a, b, c, ..."
    assert first_names(["a", "b", "c", "d"], shown=1) == "a, ..."
    assert first_names([]) == ""
