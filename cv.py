"""Patient-level cross-validation and the paired comparison of two runs: the ``cv`` and ``compare``
commands.

``cv`` trains fold 0..K-1 with the training function it is given (``engine.train``), so that this
module never imports the entry point; ``compare`` pairs two runs' held-out Dice patient by patient.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

import pandas as pd

from data_loaders import dataset_inventory, pinned_data_dir, steps_per_epoch
from libraries import (CV_CONFIG, Interrupted, UserError, atomic_write, counted, first_names, new_run_dir, save_json,
                       unused_path, write_csv)
from reports import by_institution, compare_runs, dice_table, not_held_out, patient_scores, score_column

INVENTORY = "patients"  # cv_config.json's {patient: slices} of the dataset when the cv began


def resolve_cv_resume(cfg: Any, overrides: dict[str, Any]) -> tuple[Any, Path]:
    """For ``cv --resume DIR``: the cv run's own config (with the resumable ``overrides``) and DIR.

    ``cfg`` is the Config dataclass instance of the resuming command line; the stored settings
    are read into the same class."""
    base = Path(cfg.resume)
    path = base / CV_CONFIG
    if not path.is_file():
        raise UserError(f"{base}: no {CV_CONFIG} here; pass the folder a cv run wrote (the one holding fold-0, ...)")
    try:
        stored = json.loads(path.read_text())
        values = {f.name: stored[f.name] for f in fields(cfg) if f.name in stored}
        type(cfg)(**values)
    except (OSError, ValueError, TypeError) as exc:
        raise UserError(f"{path}: unreadable ({exc}); start the cross-validation again in a new --out-dir") from None
    resumed = type(cfg)(**{**values, **overrides, "out_dir": str(base), "resume": ""})
    check_same_patients(stored.get(INVENTORY), dataset_inventory(resumed.data_dir), resumed.data_dir)
    return resumed, base


def check_same_patients(then: dict[str, int] | None, now: dict[str, int] | None, data_dir: str) -> None:
    """Refuse to go on with a cv whose dataset changed since it began: each fold splits the patients
    it finds, so the folds still to run would split others than the finished ones did, and the
    pooled table would miss some patients and hold others that trained the model scoring them."""
    if then is None or now == then:  # a cv of synthetic data, or one from before the inventory
        return
    now = now or {}
    added, gone = sorted(set(now) - set(then)), sorted(set(then) - set(now))
    other = sorted(p for p in set(now) & set(then) if now[p] != then[p])
    parts = [f"{counted(len(names), 'patient')} {what} ({first_names(names)})"
             for what, names in (("added", added), ("gone", gone), ("with other slices", other)) if names]
    raise UserError(f"{data_dir or 'the dataset'}: changed since this cv began ({'; '.join(parts)}), so its "
                    "remaining folds would split other patients; finish it with --data-dir pointing at the data it "
                    "began with, or start a new cv")


def run_fold(cfg: Any, fold: int, fold_dir: Path, train: Callable[[Any], dict]) -> dict:
    """Train one fold of a cv run, or pick it up where an interrupted run left it.

    A fold with a metrics.json is finished and is read back; one with a last.pt is resumed
    from it (exactly, like ``--resume``); one stopped before its first checkpoint is moved
    aside to fold-<i>.incomplete and trained again.
    """
    if (fold_dir / "metrics.json").is_file():
        print(f"fold {fold}: finished earlier; reading {fold_dir / 'metrics.json'}")
        return json.loads((fold_dir / "metrics.json").read_text())
    if (fold_dir / "last.pt").is_file():
        return train(replace(cfg, fold=fold, out_dir="", resume=str(fold_dir)))
    if fold_dir.exists() and any(fold_dir.iterdir()):
        aside = unused_path(fold_dir.with_name(fold_dir.name + ".incomplete"))
        fold_dir.rename(aside)
        print(f"fold {fold}: {fold_dir} stopped before its first checkpoint; moved it to {aside.name}, "
              "training the fold again")
    return train(replace(cfg, fold=fold, out_dir=str(fold_dir)))


def cross_validate(cfg: Any, train: Callable[[Any], dict], overrides: dict[str, Any]) -> pd.DataFrame:
    """The ``cv`` command: train fold 0..K-1 of a patient-level K-fold split, then summarize.

    Writes <out-dir>/fold-<i>/ for each fold, <out-dir>/cv_patients.csv (every patient once, with
    its held-out Dice with and without LCC), <out-dir>/cv_institutions.csv (the mean by
    institution: ``reports.by_institution``) and <out-dir>/cv_summary.csv (one row per fold, the
    mean and std over folds, then the mean and median over all patients pooled, which is how
    Buda et al. report cross-validation), and prints the table. ``--resume DIR`` continues an
    interrupted cv run in DIR with its own settings: finished folds are read back, an unfinished
    one is resumed from its last.pt, and the summary is the one an uninterrupted run writes.

    ``cfg`` is a Config; ``train`` trains one run of it and returns its final metrics;
    ``overrides`` are the settings a resumed cv may change (where and how it runs).
    """
    fresh = not cfg.resume
    if cfg.resume:
        cfg, base = resolve_cv_resume(cfg, overrides)
    else:
        if cfg.folds < 2:
            raise UserError(f"cv needs --folds of at least 2, got {cfg.folds}")
        cfg = replace(cfg, data_dir=pinned_data_dir(cfg.data_dir))  # each fold, and cv --resume, read the same data
        inventory = dataset_inventory(cfg.data_dir)
        if inventory is not None and cfg.folds > len(inventory):  # before a folder or a fold's header
            raise UserError(f"--folds {cfg.folds} is more than the {counted(len(inventory), 'patient')} found in "
                            f"{cfg.data_dir}")
        base = new_run_dir(cfg.out_dir)
        save_json(base / CV_CONFIG, {**asdict(cfg), INVENTORY: inventory})
    folds = []
    try:
        for fold in range(cfg.folds):
            print(f"\n===== fold {fold + 1}/{cfg.folds} =====")
            folds.append(run_fold(cfg, fold, base / f"fold-{fold}", train))
    except Interrupted:  # a fold's own --resume would continue that fold alone, not the cv
        raise Interrupted(f"interrupted; the folds and epochs finished are kept: continue with python engine.py cv "
                          f"--resume {base}") from None
    except UserError:
        if fresh and not any(base.glob("fold-*")):  # refused before fold 0 made its folder (too many folds):
            (base / CV_CONFIG).unlink()  # take back what was written above, so the same --out-dir works again
            if not any(base.iterdir()):
                base.rmdir()
        raise
    summary, patients = summarize_folds(folds, base)
    print_summary(cfg, folds, summary, patients, base)
    return summary


def fold_row(fold: int, m: dict) -> dict:
    """One fold's row of cv_summary.csv: Dice per volume by post-processing, pooled Dice, HD95, steps."""
    raw = m["postprocessing"]["none"]
    return {"fold": fold, "patients": m["patients"],
            **{f"dice_per_volume_{stat}{'' if name == 'none' else '_' + name}": v[f"dice_per_volume_{stat}"]
               for name, v in m["postprocessing"].items() for stat in ("mean", "median")},
            "dice_global": raw["dice_global"], "hd95_px_mean": raw["hd95_px_mean"],
            "optimizer_steps": m.get("optimizer_steps", float("nan"))}


def summarize_folds(folds: list[dict], base: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """cv_summary.csv (per fold, mean and std over folds, all patients pooled) and cv_patients.csv."""
    table = pd.DataFrame([fold_row(fold, m) for fold, m in enumerate(folds)])
    numeric = table.drop(columns=["fold"])
    patients = pd.concat([dice_table(m).assign(fold=fold) for fold, m in enumerate(folds)], ignore_index=True)
    scores = [c for c in patients.columns if c.startswith("dice")]  # dice, dice_lcc, ...: one per post-processing
    patients = patients[["fold", "patient", *scores, *(c for c in ("flair_contrast",) if c in patients)]]
    write_csv(base / "cv_patients.csv", patients)
    pooled = {"fold": "all patients", "patients": len(patients),
              **{f"dice_per_volume_{stat}{c.removeprefix('dice')}": getattr(patients[c], stat)()
                 for c in scores for stat in ("mean", "median")}}
    summary = pd.concat([table, numeric.mean().to_frame().T.assign(fold="mean"),
                         numeric.std(ddof=1).to_frame().T.assign(fold="std"), pd.DataFrame([pooled])],
                        ignore_index=True)
    write_csv(base / "cv_summary.csv", summary)
    return summary, patients


def print_summary(cfg: Any, folds: list[dict], summary: pd.DataFrame, patients: pd.DataFrame, base: Path) -> None:
    """The table, the headline with the configured post-processing, institutions and step advice."""
    data = "SYNTHETIC data" if any(m.get("synthetic_data") for m in folds) else cfg.data_dir or "auto data"
    print(f"\n{cfg.folds}-fold patient-level cross-validation ({data}):")
    counts = {name: _count for name in ("patients", "optimizer_steps")}  # 3, not 3.0000; a mean may be 3.5
    print(summary.to_string(index=False, float_format=lambda v: f"{v:.4f}", na_rep="", formatters=counts))
    # The headline is scored as the runs are configured to post-process, as each epoch's line is.
    chosen = score_column(cfg.postprocess).removeprefix("dice")
    per_fold = summary.loc[summary["fold"].isin(range(cfg.folds)), f"dice_per_volume_mean{chosen}"].astype(float)
    pooled = summary.iloc[-1]
    print(f"Dice per volume with --postprocess {cfg.postprocess}: "
          f"{per_fold.mean():.4f} +/- {per_fold.std(ddof=1):.4f} (mean +/- std over folds); "
          f"over all {len(patients)} patients mean {pooled[f'dice_per_volume_mean{chosen}']:.4f}, "
          f"median {pooled[f'dice_per_volume_median{chosen}']:.4f} (raw {pooled['dice_per_volume_mean']:.4f} / "
          f"{pooled['dice_per_volume_median']:.4f}); wrote {base / 'cv_summary.csv'} and cv_patients.csv")
    sites = by_institution(patients.drop(columns=["fold"]))
    write_csv(base / "cv_institutions.csv", sites)
    print("\nMean Dice per volume by institution (cv_institutions.csv):")
    print(sites.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print("For the final model, train once more with the same settings on every patient (--split none) "
          "and score it on other patients with 'evaluate --patients unseen'.")
    advice = step_advice(folds, epochs=cfg.epochs, batch_size=cfg.batch_size, steps=cfg.steps_per_epoch)
    if advice:
        print(advice)


def _count(value: float) -> str:
    """A count column of cv_summary.csv as printed: whole numbers without decimals, '' where empty."""
    return "" if pd.isna(value) else f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"


def step_advice(folds: list[dict], *, epochs: int, batch_size: int, steps: int = 0) -> str | None:
    """How many epochs of the final model (every patient, --split none) the folds' optimizer steps
    amount to, and the --epochs that would match a final model of ``epochs`` (None for folds written
    before steps were recorded).

    Each fold trains on (K-1)/K of the slices, so in the same epochs it takes fewer steps than
    the final model; a CV whose models are trained less estimates a different model (the loss
    of this task changes regime after enough steps: docs/results.md). With ``steps`` per epoch
    fixed (the presets), folds and final model take the same steps and nothing needs matching.
    """
    if not folds or any(m.get("train_slices") is None for m in folds):
        return None
    slices = folds[0]["train_slices"] + folds[0]["slices"]  # every patient: one fold's train + validation
    final = steps or steps_per_epoch(slices, batch_size)  # fixed steps: the same for folds and final model
    per_epoch = sum(m["steps_per_epoch"] for m in folds) / len(folds)
    trained = sum(m["optimizer_steps"] for m in folds) / len(folds)
    matched = max(1, round(epochs * final / per_epoch))
    line = (f"Steps: each fold trained {counted(round(trained), 'optimizer step')} on average ({per_epoch:.0f} per "
            "epoch), as many "
            f"as a final model on all {slices:,} slices ({final} per epoch) trains in {trained / final:.1f} epochs.")
    if matched != epochs:
        line += (f" A final model of {counted(epochs, 'epoch')} ({final * epochs:,} steps) is matched "
                 f"by folds of --epochs {matched}.")
    return line


SITE_CI_MIN = 5  # compare gives an interval for at least this many patients (all, or an institution's)


CV_DESCRIPTION = (
    "Runs training once per fold (--folds K, default 5) into <out-dir>/fold-<i>, then writes cv_summary.csv (per "
    "fold, mean and std over folds, and mean and median over all patients pooled) and cv_patients.csv (each "
    "patient's Dice). --resume DIR continues an interrupted cv run from where it stopped.")
COMPARE_DESCRIPTION = (
    "Pairs the held-out Dice per patient of run A and run B (cv folders, run or evaluation folders, folders of "
    "fold-<i> runs, or their cv_patients.csv / metrics.json) by patient name and prints, for each "
    "post-processing, the mean and median of each and the mean of B - A with a 95% bootstrap interval over "
    "patients. Patients scored by only one run are left out and counted.")


def add_compare_arguments(parser: argparse.ArgumentParser, postprocessing: tuple[str, ...]) -> None:
    """The ``compare`` command's flags; ``postprocessing`` names the rules a run is scored with."""
    parser.add_argument("run_a", help="the baseline")
    parser.add_argument("run_b", help="the change")
    parser.add_argument("--resamples", type=int, default=10_000, help="bootstrap resamples of the patients")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    parser.add_argument("--out", default="", help="also write the paired per-patient table to this CSV")
    parser.add_argument("--postprocess-a", choices=postprocessing, default=None,
                        help="with --postprocess-b: compare A with this post-processing against B with that one "
                             "(A and B may be the same run); default: each post-processing against itself")
    parser.add_argument("--postprocess-b", choices=postprocessing, default=None)
    parser.add_argument("--by-institution", action="store_true",
                        help="also compare the patients of each institution (TCGA site) on their own (with an "
                             f"interval where it has at least {SITE_CI_MIN})")


def compare_command(args: argparse.Namespace) -> pd.DataFrame:
    """The ``compare`` command: run B against run A, patient by patient (see ``compare_runs``)."""
    (a, source_a), (b, source_b) = patient_scores(Path(args.run_a)), patient_scores(Path(args.run_b))
    for side, frame, path in (("A", a, args.run_a), ("B", b, args.run_b)):
        # A model scored on patients it trained on (folds without the column: none of theirs).
        if "in_training" in frame and (trained := frame.loc[frame["in_training"].eq(True), "patient"].tolist()):
            print(f"warning: {side} ({path}): {not_held_out(trained, len(frame))}", file=sys.stderr)
    pairs = [(args.postprocess_a, args.postprocess_b)] if args.postprocess_a or args.postprocess_b else None
    if pairs and not (args.postprocess_a and args.postprocess_b):
        raise UserError("--postprocess-a and --postprocess-b go together: give both (or neither, to compare "
                        "every post-processing with itself)")
    summary, paired = compare_runs(a, b, resamples=args.resamples, seed=args.seed, pairs=pairs,
                                   per_institution=args.by_institution)
    only = {name: len(set(frame["patient"]) - set(paired["patient"])) for name, frame in (("A", a), ("B", b))}
    print(f"A: {args.run_a} ({source_a})\nB: {args.run_b} ({source_b})\n"
          f"{counted(len(paired), 'patient')} scored by both"
          + (f" (left out: {only['A']} only in A, {only['B']} only in B)" if any(only.values()) else ""))
    for row in summary.itertuples():
        # A bootstrap of a handful of patients gives an interval that means nothing (of one patient,
        # a width of 0): none below SITE_CI_MIN, for all patients as for an institution.
        interval = (f"95% CI {row.ci95_low:+.4f} to {row.ci95_high:+.4f}" if row.patients >= SITE_CI_MIN
                    else f"no interval under {SITE_CI_MIN} patients")
        if row.institution != "all":  # indented under its post-processing's line
            print(f"{row.institution + f' ({row.patients})':>20}: mean {row.mean_a:.4f} -> {row.mean_b:.4f}, B - A "
                  f"{row.difference:+.4f} ({interval}); better: {row.better}, worse: {row.worse}")
            continue
        label = "raw" if row.postprocess == "none" else row.postprocess
        print(f"{label:>8}: mean {row.mean_a:.4f} -> {row.mean_b:.4f}, "
              f"B - A {row.difference:+.4f} ({interval}); median "
              f"{row.median_a:.4f} -> {row.median_b:.4f}; patients better: {row.better}, worse: {row.worse} "
              "(by more than 0.005)")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(Path(args.out), lambda tmp: write_csv(tmp, paired))
        print(f"wrote {args.out}")
    return summary

