"""Train a UNet that segments the FLAIR abnormality of low-grade gliomas (LGG MRI Segmentation).

    python engine.py                                   # train with the settings below
    python engine.py --epochs 20 --image-size 256      # any setting, as a flag
    python engine.py evaluate --checkpoint runs/X/best.pt

Edit the defaults in ``Config`` or pass them as flags: every field below is also a command-line
flag with the same default (``image_size`` -> ``--image-size``), generated from the dataclass.

This file holds the settings, the command line, the training run and the dispatch to the other
commands, each of which lives in a module of its own: evaluation.py (evaluate), inference.py
(predict, export), benchmark.py, cv.py (cv, compare) and data_commands.py (data, download).
"""

from __future__ import annotations

import argparse
import difflib
import errno
import functools
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

import benchmark
import cv
import evaluation
import inference
from data_cache import load_dataset, resolve_cache_dir
from data_commands import add_data_arguments, add_download_arguments, download_dataset, data_command
from data_files import (DATA_ENV_VAR, NORMALIZATIONS, DataIssues, PatientVolume, describe_masks, read_clinical,
                        recorded_data_dir, report_issues)
from data_loaders import (LGGSlices, check_fold, check_val_fraction, choose_split, default_num_workers, locate_data,
                          make_loader)
from data_preprocessing import train_preprocess
from libraries import (CHANNELS_LAST, FLAG_RANGES, Distributed, Interrupted, UserError, add_bool_flag,
                       check_flag_ranges, check_new_file, check_run_dir, counted, environment_report, init_distributed,
                       launched_rank, new_run_dir, printer, quiet_opencv, save_json, seed_everything, setup_device)
from metrics import parse_spacing
from model import count_parameters, load_checkpoint
from reports import epoch_line, format_metrics, seconds_left, training_time, write_history, write_reports
from training import (NetworkSpec, TrainingParts, build_training, check_trainable_batch, load_pretrained,
                      make_scheduler, pretrained_overlap, restore, run_epoch, save_epoch, width_of_weights)


SPLITS = ("random", "buda", "none")
AMP_MODES = ("auto", "off", "bf16", "fp16")


def _opt(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    """A Config field whose help text (and choices) become the flag's."""
    return field(default=default, metadata={"help": help, "choices": choices})


# =============================================================================================
# Hyperparameters. Each one is also a flag: --data-dir, --image-size, --epochs, ...
# =============================================================================================
@dataclass
class Config:
    # ---- data: where it is, which patients validate ----
    data_dir: str = _opt("", "kaggle_3m folder, or 'synthetic'; empty: $LGG_DATA_DIR, ./kaggle_3m, ...")
    split: str = _opt("random", "validation patients: random, buda (the authors' 10), none", SPLITS)
    val_fraction: float = _opt(0.2, "--split random: share of patients held out")
    val_patients: str = _opt("", "validation patients: a comma list or a file of names (instead of --split)")
    folds: int = _opt(0, "patient-level K-fold split: K (0: off)")
    fold: int = _opt(0, "with --folds: which fold (0..K-1) validates")
    # ---- slices -> tensors ----
    image_size: int = _opt(128, "slices are resized to this square size (a multiple of 16)")
    normalization: str = _opt("volume", "volume: per patient; buda: the authors' (their weights)", NORMALIZATIONS)
    tumor_weight: float = _opt(1.0, "training draws slices with tumor this many times as often")
    modality_dropout: float = _opt(0.0, "training: chance a contrast channel is replaced by FLAIR")
    # ---- model ----
    features: int = _opt(32, "UNet channels at the first level (32: 7.76M parameters)")
    deep_supervision: bool = _opt(False, "training: also score the decoder at 1/2 and 1/4 size")
    pretrained: str = _opt("", "start from weights: a checkpoint, a state_dict, a URL or 'buda'")
    encoder_lr_scale: float = _opt(1.0, "fine-tuning: the encoder's lr is --lr times this; 0 freezes it")
    # ---- optimization: AdamW, Dice + BCE, warmup then cosine ----
    epochs: int = _opt(5, "training epochs")
    steps_per_epoch: int = _opt(0, "optimizer steps an epoch, whatever the data's size; 0: one pass over it")
    batch_size: int = _opt(16, "slices per step")
    lr: float = _opt(1e-3, "peak learning rate")
    weight_decay: float = _opt(1e-4, "AdamW's decoupled weight decay")
    warmup_epochs: float = _opt(0.0, "linear learning-rate warmup, in epochs")
    patience: int = _opt(0, "stop after this many validations in a row without a better Dice (0: off)")
    val_every: int = _opt(1, "validate every N epochs and after the last; training is unchanged")
    # ---- evaluation ----
    postprocess: str = _opt("none", "per patient: none, lcc, brain-multi (docs/method.md)",
                            evaluation.POSTPROCESSING)
    spacing: str = _opt("", "voxel spacing 'dz,dy,dx' in mm, for HD95 and volumes in mm")
    # ---- hardware ----
    device: str = _opt("auto", "auto: CUDA if available, else CPU", ("auto", "cpu", "cuda"))
    amp: str = _opt("auto", "mixed precision; auto: bf16 where fast, else fp16 on GPUs", AMP_MODES)
    num_workers: int = _opt(-1, "DataLoader workers; -1: 0 on <=2 cores or for a CPU model without fork, else up to 4")
    sync_bn: bool = _opt(False, "under torchrun on GPUs: synchronize BatchNorm across processes")
    compile: bool = _opt(False, "torch.compile the model (measure it first: benchmark --compile)")
    # ---- run ----
    strict: bool = _opt(False, "make every data problem an error instead of skipping or fixing it")
    out_dir: str = _opt("", "run folder; empty: runs/<date-time>")
    resume: str = _opt("", "continue a run from its folder or last.pt")
    seed: int = _opt(42, "one seed for the split, initialization, augmentation and order")
    preset: str = _opt("none", "a tested recipe: cpu (2 CPU cores), full (a GPU); flags win", ("none", "cpu", "full"))


# Recipes selected with --preset. Each replaces the defaults above, not the flags you pass.
PRESETS: dict[str, dict[str, Any]] = {
    "none": {},
    # 2 CPU cores (bf16): 128 px, 20 epochs of 150 steps (3,000 steps, 48,000 slices) whatever the
    # number of patients. Width 24 (4.4M parameters): 0.56x width 32's FLOPs, +0.023 (+0.006 to
    # +0.041) on the 66-patient CV. Measurements behind each setting: docs/results.md.
    "cpu": dict(image_size=128, features=24, epochs=20, steps_per_epoch=150, batch_size=16, lr=1e-3,
                weight_decay=1e-4, warmup_epochs=1.0, tumor_weight=2.0, modality_dropout=0.2,
                deep_supervision=True, postprocess="brain-multi"),
    # A GPU: full resolution, longer; 250 steps an epoch, about one pass over all 110 patients.
    "full": dict(image_size=256, epochs=60, steps_per_epoch=250, batch_size=16, lr=1e-3,
                 weight_decay=1e-4, warmup_epochs=2.0, tumor_weight=2.0, modality_dropout=0.2,
                 patience=20, postprocess="brain-multi"),
}


# The Python type each annotation above names (annotations are strings here: __future__), and
# the values a line may hold: a whole number is a number too, but True is no number here.
FIELD_TYPES = {"int": int, "float": float, "str": str, "bool": bool}
ACCEPTED = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}
TYPE_WORDS = {"int": "a whole number", "float": "a number", "str": "text in quotes", "bool": "True or False"}


def check_hyperparameters() -> None:
    """Refuse, in one line, a value edited into Config or PRESETS above that no flag could give:
    another type ('32' or 2.5 where a whole number goes), a choice that does not exist, a value
    out of its range, or a preset setting that is not a field."""
    kinds = {f.name: f for f in fields(Config)}
    for where, values in [("Config", asdict(Config())), *((f"PRESETS['{n}']", p) for n, p in PRESETS.items())]:
        for name, value in values.items():
            if name not in kinds:
                raise UserError(f"engine.py: {where} sets {name}, which is no setting; choose one of Config's fields")
            kind, choices = kinds[name].type, kinds[name].metadata["choices"]
            typed = isinstance(value, ACCEPTED[kind]) and isinstance(value, bool) == (kind == "bool")
            valid, rule = FLAG_RANGES.get(name, (lambda v: True, ""))
            problem = (TYPE_WORDS[kind] if not typed
                       else f"one of {', '.join(choices)}" if choices and value not in choices
                       else rule if not valid(value) else "")
            if problem:
                raise UserError(f"engine.py: {name} = {value!r} in {where} must be {problem}; fix it at the top of "
                                "engine.py")


# =============================================================================================
# Command line
# =============================================================================================


def add_config_flags(parser: argparse.ArgumentParser, defaults: Config | None = None,
                     only: tuple[str, ...] | None = None, helps: dict[str, str] | None = None) -> None:
    """Add one flag per Config field (or per field in ``only``), with its default, type, help (or
    the command's own, from ``helps``) and choices."""
    defaults = defaults or Config()
    for f in fields(Config):
        if only is not None and f.name not in only:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        text = (helps or {}).get(f.name, f.metadata["help"])
        if isinstance(default, bool):
            add_bool_flag(parser, f.name, default, text + f" (default: {'on' if default else 'off'})")
        else:
            parser.add_argument(flag, type=FIELD_TYPES[f.type], default=default, choices=f.metadata["choices"],
                                help=text + " (default: %(default)s)")


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The command line's parser, and each command's own parser by name."""
    # allow_abbrev=False: '--epoch 3' would otherwise be taken for --epochs, and a preset could not
    # tell that the user gave it. Every parser refuses abbreviations.
    parser = argparse.ArgumentParser(
        prog="engine.py", allow_abbrev=False,
        description="Train (default) or evaluate a UNet for LGG FLAIR-abnormality segmentation.",
        epilog="'python engine.py train --help' lists every training setting.",
    )
    sub = parser.add_subparsers(dest="command")
    command = functools.partial(sub.add_parser, allow_abbrev=False)
    add_config_flags(command("train", help="train and validate (the default command)"))
    evaluation.add_arguments(command("evaluate", help="score a checkpoint on its validation patients, or on others"))
    inference.add_predict_arguments(command(
        "predict", help="segment new slices or NIfTI/DICOM scans: masks, overlays, tumor sizes"))
    inference.add_export_arguments(command(
        "export", help="export a checkpoint for torch.export, TorchScript or ONNX (checking parity), or weights "
        "for release"))
    add_download_arguments(command("download", help="fetch the dataset from Kaggle with kagglehub (optional)"))
    add_data_arguments(command("data", help="report on a copy of the dataset: counts, checks, problems"))
    add_study_commands(command)
    return parser, sub.choices


def add_study_commands(command: Callable[..., argparse.ArgumentParser]) -> None:
    """cv, compare and benchmark: commands that measure recipes and speed (cv's flags are Config's)."""
    add_config_flags(command("cv", help="patient-level K-fold cross-validation: train every fold, summarize",
                             description=cv.CV_DESCRIPTION), Config(folds=5))
    cv.add_compare_arguments(command("compare", help="paired per-patient comparison of two runs' held-out Dice, "
                                     "with a bootstrap interval", description=cv.COMPARE_DESCRIPTION),
                             evaluation.POSTPROCESSING)
    bench = command(
        "benchmark", help="time the reference fp32 path against the fast default path, or estimate a preset's "
        "training time here",
        description="Times training steps and inference for (a) the reference path (fp32, contiguous "
        "NCHW, eager) and (b) the fast default path (--amp, channels_last, --compile), then the "
        "end-to-end training throughput through the real DataLoader, all with the network asked for.",
    )
    add_config_flags(bench, only=benchmark.FIELDS, helps=benchmark.HELPS)
    benchmark.add_arguments(bench)


COMMANDS = ("train", "evaluate", "predict", "export", "benchmark", "cv", "compare", "download", "data")


# The flags that name files or folders. The shell leaves a '~' it does not expand (--out-dir=~/runs,
# a quoted path, an IDE's run configuration) for the package to expand, as --data-dir always did.
PATH_FLAGS = ("data_dir", "checkpoint", "pretrained", "resume", "input", "flair", "t1", "t1ce", "output", "out_dir",
              "out", "to", "val_patients", "patients", "run_a", "run_b")


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse ``argv``; with no command (or only flags) the command is ``train``. A path flag's
    leading '~' is the home folder."""
    parser, commands = build_parser()
    if argv and not argv[0].startswith("-") and argv[0] not in COMMANDS:  # train takes no positional argument
        close = difflib.get_close_matches(argv[0], COMMANDS, n=1)
        parser.error(f"{argv[0]!r} is not a command" + (f"; did you mean {close[0]!r}?" if close else
                                                        f" ({', '.join(COMMANDS)})"))
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help")):
        argv = ["train", *argv]
    # Flags first: argparse would report a missing required flag (export's --output) before the
    # mistyped one that was meant for it (--out). What is left (a stray word) comes after parsing.
    unknown = unknown_flags(commands.get(argv[0]), argv[1:])
    if not unknown:
        args, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}{flag_suggestion(commands[argv[0]], unknown)}")
    for name in PATH_FLAGS:
        if isinstance(value := getattr(args, name, None), str) and value.startswith("~"):
            setattr(args, name, os.path.expanduser(value))
    return args


def command_flags(command: argparse.ArgumentParser) -> list[str]:
    """The long flags ``command`` takes: its usage line lists them all but the hidden --no-x twins."""
    return re.findall(r"--[a-z0-9][a-z0-9-]*", command.format_usage()) + ["--help"]


def unknown_flags(command: argparse.ArgumentParser | None, words: list[str]) -> list[str]:
    """The words before any '--' that look like long flags ``command`` does not take. A --no-x is
    taken for x's twin here; argparse still refuses it after this if x is no on/off setting."""
    if command is None:
        return []
    flags = set(command_flags(command))
    words = words[:words.index("--")] if "--" in words else words
    return [w for w in words if w.startswith("--")
            and not {w.split("=")[0], w.split("=")[0].replace("--no-", "--", 1)} & flags]


def flag_suggestion(command: argparse.ArgumentParser, unknown: list[str]) -> str:
    """'; did you mean --batch-size?' for the first unknown flag close to one of ``command``'s
    (--batch_size, --epoch), else ''."""
    flags = command_flags(command)
    for word in (w for w in unknown if w.startswith("--")):
        if close := difflib.get_close_matches(word.split("=")[0].replace("_", "-"), flags, n=1):
            return f"; did you mean {close[0]}?"
    return ""


def given_flags(argv: list[str] | None) -> set[str]:
    """The Config fields whose flags appear in ``argv`` (``--no-x`` and ``--x=v`` included).

    Exact, because abbreviations are refused (allow_abbrev=False): a flag is given only in full.
    """
    return {a.split("=")[0].removeprefix("--").removeprefix("no-").replace("-", "_")
            for a in (argv or []) if a.startswith("--")}


def preset_settings(preset: str, argv: list[str] | None) -> dict[str, Any]:
    """The settings of --preset ``preset`` whose flags are not in ``argv``: flags win."""
    given = given_flags(argv)
    return {name: value for name, value in PRESETS[preset].items() if name not in given}


def config_from_args(args: argparse.Namespace, argv: list[str] | None = None) -> Config:
    """The Config for parsed flags; a --preset fills in every field whose flag is not in ``argv``."""
    values = {f.name: getattr(args, f.name) for f in fields(Config)}
    return Config(**{**values, **preset_settings(values["preset"], argv)})


def benchmark_settings(args: argparse.Namespace, argv: list[str]) -> tuple[argparse.Namespace, int]:
    """benchmark's flags with its --preset's settings filled in where no flag is given (as a run
    would have them), and that preset's training steps (0 without a preset)."""
    for name, value in preset_settings(args.preset, argv).items():
        if name in benchmark.FIELDS:
            setattr(args, name, value)
    preset = PRESETS[args.preset]
    return args, preset.get("epochs", 0) * preset.get("steps_per_epoch", 0)


def run_config(command: str, args: argparse.Namespace, argv: list[str]) -> Config:
    """The Config of a train or cv command: the flags, the preset, the --pretrained weights' width
    where --features is not given, and the flags checked before any folder is made (a resumed
    run's settings come from its folder and are checked once read: train)."""
    given = given_flags(argv)
    cfg = width_of_weights(config_from_args(args, argv), given, printer(launched_rank() == 0))  # before the ranks join
    if cfg.resume:
        check_resume_flags(command, cfg, given)
    else:
        check_split_flags(command, cfg, given)
        check_config(cfg)
    return cfg


def check_resume_flags(command: str, cfg: Config, given: set[str]) -> None:
    """Refuse, in one line, a flag given with --resume that the run would ignore: one whose value
    differs from the run's own setting. (The run's own command line with --resume added passes.)"""
    fixed = given & {f.name for f in fields(Config)} - {"resume", *RESUMABLE_OVERRIDES}
    if not fixed:
        return  # the run's settings are read once, by the resume itself
    stored = cv.resolve_cv_resume(cfg, {})[0] if command == "cv" else resolve_resume(cfg)[0]
    ignored = [f"--{name.replace('_', '-')} {getattr(cfg, name)} (the run's: {str(getattr(stored, name)) or 'none'})"
               for name in sorted(fixed) if getattr(cfg, name) != getattr(stored, name)]
    if ignored:
        may = ", ".join("--" + name.replace("_", "-") for name in RESUMABLE_OVERRIDES)
        other = ("to cross-validate other settings, start a new cv in another --out-dir" if command == "cv" else
                 "to train on from its weights with other settings, start a new run with --pretrained <its last.pt>")
        raise UserError(f"--resume {cfg.resume} keeps the run's own settings, so {', '.join(ignored)} would be "
                        f"ignored; drop {'it' if len(ignored) == 1 else 'them'} (only {may} may change; {other})")


def check_split_flags(command: str, cfg: Config, given: set[str]) -> None:
    """Refuse, in one line, the flag combinations that choose validation patients in two ways, and
    the split flags that the chosen split would ignore."""
    if command == "cv":
        if cfg.val_patients:
            raise UserError("cv chooses each fold's validation patients itself; drop --val-patients "
                            "(or train once with --val-patients and no cv)")
        for name in ("split", "val_fraction"):
            if name in given:
                flag = "--" + name.replace("_", "-")
                raise UserError(f"cv chooses each fold's validation patients itself (a 1/K share each), so {flag} "
                                f"would be ignored; drop {flag}")
        if "fold" in given or cfg.fold:
            raise UserError("cv trains every fold; drop --fold (to train one fold alone: "
                            "python engine.py --folds K --fold I)")
        return
    # The split's own checks, before minutes of loading rather than after.
    if cfg.folds:
        check_fold(cfg.folds, cfg.fold)
    check_val_fraction(cfg.val_fraction)
    if cfg.val_patients and cfg.folds:
        raise UserError("--val-patients and --folds both choose the validation patients; give one of them")
    if ("fold" in given or cfg.fold) and not cfg.folds:
        raise UserError("--fold picks a fold of --folds K; add --folds (or drop --fold)")
    if "split" in given and (cfg.val_patients or cfg.folds):
        raise UserError(f"--split {cfg.split} and {'--val-patients' if cfg.val_patients else '--folds'} both "
                        "choose the validation patients; give one of them")
    chooser = "--val-patients" if cfg.val_patients else "--folds" if cfg.folds else f"--split {cfg.split}"
    if "val_fraction" in given and chooser != "--split random":
        raise UserError(f"--val-fraction is the share --split random holds out; {chooser} chooses the validation "
                        "patients instead: drop --val-fraction")
    if "val_every" in given and chooser == "--split none":
        raise UserError("--val-every sets how often validation runs, and --split none has no validation patients: "
                        "drop --val-every")


# =============================================================================================
# Training
# =============================================================================================

# Settings that may differ when a run is resumed (where and how it runs, not what it computes;
# --val-every changes which epochs are scored, never the weights).
RESUMABLE_OVERRIDES = ("device", "num_workers", "data_dir", "strict", "val_every")


def resumable_overrides(cfg: Config) -> dict[str, Any]:
    """The RESUMABLE_OVERRIDES given on the resuming command line."""
    return {name: getattr(cfg, name) for name in RESUMABLE_OVERRIDES
            if getattr(cfg, name) != getattr(Config(), name)}


# Training settings this version no longer has, their neutral value and the last commit with the
# code: a run recorded with another value cannot be resumed here without silently changing it.
REMOVED_SETTINGS = {"intensity_augment": (False, "ca34c2e"), "lesion_paste": (0.0, "6af5688"),
                    "lesion_fade": (0.0, "6af5688"), "spatial_augment": ("light", "6af5688"),
                    "crop_size": (0, "6af5688"), "balance_patients": (False, "6af5688"),
                    "dice_mode": ("sample", "6af5688"), "tversky_beta": (0.5, "6af5688"),
                    "optimizer": ("adamw", "6af5688"), "schedule": ("cosine", "6af5688"),
                    "ema_decay": (0.0, "4415e05")}


def resolve_resume(cfg: Config) -> tuple[Config, dict]:
    """For --resume: the run's own Config (with RESUMABLE_OVERRIDES from ``cfg``) and its checkpoint."""
    path = Path(cfg.resume)
    if (path / cv.CV_CONFIG).is_file():
        raise UserError(f"{path}: this is a cv folder; continue it with: python engine.py cv --resume {path}")
    ckpt_path = path / "last.pt" if path.is_dir() else path
    ckpt = load_checkpoint(ckpt_path)
    stored = {f.name: ckpt["config"][f.name] for f in fields(Config) if f.name in ckpt["config"]}
    if "history" not in ckpt or "rng" not in ckpt:
        raise UserError(f"{cfg.resume}: this checkpoint has no training state to resume from; use last.pt")
    last = ckpt_path.parent / "last.pt"
    if last.is_file() and last.resolve() != ckpt_path.resolve():  # best.pt, say: an earlier epoch of the run
        later = load_checkpoint(last)["epoch"]
        if later > ckpt["epoch"]:
            raise UserError(f"{cfg.resume} is epoch {ckpt['epoch']}, and {last} holds epoch {later}: resuming from it "
                            f"would train epochs {ckpt['epoch'] + 1}-{later} again over the run's later results; "
                            f"continue with --resume {ckpt_path.parent}, or start a new run from these weights "
                            f"with --pretrained {cfg.resume}")
    for name, (neutral, commit) in REMOVED_SETTINGS.items():
        if ckpt["config"].get(name, neutral) != neutral:
            raise UserError(f"{cfg.resume}: trained with {name} = {ckpt['config'][name]!r}, which this version no "
                            f"longer has (docs/results.md); resume it with commit {commit} of this package")
    stored.update(resumable_overrides(cfg))
    if not cfg.data_dir:
        stored["data_dir"] = recorded_data_dir(ckpt["config"]["resolved_data_dir"], ckpt_path)
    stored["out_dir"] = str(path if path.is_dir() else path.parent)
    stored["resume"] = cfg.resume
    return Config(**stored), ckpt


def validations_since_best(state: dict) -> int:
    """The validated epochs after the best one: what --patience counts (with --val-every N, one
    validation is N epochs)."""
    best = state["best_epoch"]
    return sum(1 for row in state["history"] if row["epoch"] > best and "val_dice_per_volume_mean" in row)


def check_config(cfg: Config) -> None:
    """Refuse settings that cannot train, before any data is read or folder made."""
    check_flag_ranges(asdict(cfg))  # main checked the flags; here also the presets and a resumed run
    if cfg.epochs < 1:
        raise UserError(f"--epochs must be at least 1, got {cfg.epochs}; to score weights without training, "
                        "use 'python engine.py evaluate --checkpoint ...' (or predict)")
    if cfg.encoder_lr_scale != 0:  # a frozen encoder's BatchNorm, the bottleneck's too, does not train
        check_trainable_batch(cfg.batch_size, cfg.image_size)
    if cfg.patience and cfg.split == "none" and not (cfg.val_patients or cfg.folds):
        raise UserError("--patience stops on validation Dice, and --split none has no validation patients; "
                        "drop --patience (choose the epochs by cross-validation first)")


@dataclass
class RunData:
    """Where a run's data came from, where it writes, and its patients, split."""

    root: Path
    synthetic: bool
    run_dir: Path | None  # None on ranks other than 0 until broadcast; every rank has it after setup
    volumes: dict[str, PatientVolume]
    train_names: list[str]
    val_names: list[str]


def setup_data(cfg: Config, ddp: Distributed, *, resumed: bool, progress: bool) -> RunData:
    """Find (or generate) the data, load every patient, split them, then make the run folder on
    rank 0: a run refused on the way leaves no empty folder behind."""
    if not resumed and cfg.out_dir:
        check_run_dir(Path(cfg.out_dir))  # before minutes of loading, not after
    if ddp.enabled and not ddp.main:
        dist.barrier()  # rank 0 generates synthetic data (if needed) first
    root, synthetic = locate_data(cfg.data_dir, seed=cfg.seed)
    if ddp.enabled and ddp.main:
        dist.barrier()
    issues = DataIssues(strict=cfg.strict)
    volumes = load_dataset(root, None, progress=progress, cache_dir=resolve_cache_dir(),
                           normalization=cfg.normalization, image_size=cfg.image_size, issues=issues)
    train_names, val_names = choose_split(
        sorted(volumes), split=cfg.split, val_fraction=cfg.val_fraction, seed=cfg.seed,
        val_patients=cfg.val_patients, folds=cfg.folds, fold=cfg.fold,
    )
    run_dir = Path(cfg.out_dir) if resumed else (new_run_dir(cfg.out_dir) if ddp.main else None)
    if ddp.enabled:
        shared = [run_dir]
        dist.broadcast_object_list(shared, src=0)  # every rank learns the run folder rank 0 made
        run_dir = shared[0]
    if ddp.main:
        report_issues(issues, run_dir)
    return RunData(root, synthetic, run_dir, volumes, train_names, val_names)


def make_loaders(
    cfg: Config, data: RunData, ddp: Distributed, device: torch.device, workers: int
) -> tuple[LGGSlices, torch.utils.data.DataLoader, torch.utils.data.DataLoader | None]:
    """The training set and loader, and the validation loader (None without validation patients).

    In a distributed job each rank predicts its share of the validation patients (whole volumes,
    so 3D metrics and post-processing need no cross-rank slices); ``evaluate`` gathers them.
    """
    train_set = LGGSlices([data.volumes[n] for n in data.train_names],
                          train_preprocess(cfg.image_size), modality_dropout=cfg.modality_dropout)
    train_loader = make_loader(train_set, batch_size=cfg.batch_size, train=True, seed=cfg.seed,
                               num_workers=workers, pin_memory=device.type == "cuda",
                               tumor_weight=cfg.tumor_weight,
                               steps=cfg.steps_per_epoch, rank=ddp.rank, world=ddp.world)
    if not data.val_names:
        return train_set, train_loader, None
    val_loader = evaluation.scoring_loader(
        [data.volumes[n] for n in data.val_names[ddp.rank :: ddp.world]], image_size=cfg.image_size,
        batch_size=cfg.batch_size, num_workers=workers, seed=cfg.seed, device=device)
    return train_set, train_loader, val_loader


def training_device(cfg: Config, ddp: Distributed) -> tuple[torch.device, torch.dtype | None]:
    """The device this process trains on (its own GPU under torchrun) and the autocast dtype."""
    device, amp_dtype = setup_device(cfg.device, cfg.amp)
    if ddp.enabled and device.type == "cuda":
        device = torch.device("cuda", ddp.local_rank)
    if cfg.sync_bn and not (ddp.enabled and device.type == "cuda"):
        raise UserError("--sync-bn needs a torchrun job on CUDA GPUs; drop it for single-process or CPU runs")
    return device, amp_dtype


def build_parts(cfg: Config, device: torch.device, amp_dtype: torch.dtype | None, weights: dict | None, *,
                distributed: bool, steps_per_epoch: int) -> tuple[TrainingParts, torch.optim.lr_scheduler.LRScheduler]:
    """The model, loss, optimizer and scaler of ``cfg`` (``training.build_training``), and its schedule."""
    parts = build_training(NetworkSpec.of(cfg), device=device, channels_last=CHANNELS_LAST, amp_dtype=amp_dtype,
                           distributed=distributed, weights=weights, weights_source=cfg.pretrained)
    scheduler = make_scheduler(parts.optimizer, total_steps=cfg.epochs * steps_per_epoch,
                               warmup_steps=round(cfg.warmup_epochs * steps_per_epoch))
    return parts, scheduler


def train(cfg: Config) -> dict:
    """Train and validate every epoch; write checkpoints, history and metrics; return final metrics."""
    resumed = None
    if cfg.resume:
        cfg, resumed = resolve_resume(cfg)
    check_config(cfg)
    spacing = parse_spacing(cfg.spacing)
    ddp = init_distributed(cfg.device)
    say = printer(ddp.main)  # rank 0 alone logs
    cfg, weights, weights_kind = load_pretrained(cfg, say) if not resumed else (cfg, None, "")
    check_config(cfg)  # again: Buda et al.'s weights switch to their normalization
    progress = ddp.main and sys.stderr.isatty()  # bars on a terminal, not in logs
    seed_everything(cfg.seed)
    device, amp_dtype = training_device(cfg, ddp)

    data = setup_data(cfg, ddp, resumed=resumed is not None, progress=progress)
    workers = default_num_workers(device) if cfg.num_workers < 0 else cfg.num_workers
    train_set, train_loader, val_loader = make_loaders(cfg, data, ddp, device, workers)
    env = environment_report(device)
    if ddp.enabled:
        env["distributed"] = f"{ddp.world} processes, {ddp.backend}"
    parts, scheduler = build_parts(cfg, device, amp_dtype, weights, distributed=ddp.enabled,
                                   steps_per_epoch=len(train_loader))
    val_slices = sum(len(data.volumes[n].images) for n in data.val_names)
    say(describe_run(cfg, data, env, parts, train_set, device=device, amp_dtype=amp_dtype, workers=workers,
                     val_slices=val_slices, steps_per_epoch=len(train_loader)))

    config_record = {**asdict(cfg), "channels_last": CHANNELS_LAST, "threshold": evaluation.THRESHOLD,
                     "resolved_data_dir": str(data.root.resolve()), "synthetic_data": data.synthetic,
                     "patients": {"train": data.train_names, "validation": data.val_names}, "environment": env,
                     "scored_patients_trained_on": pretrained_overlap(weights_kind, data.val_names, say)}
    state = {"history": [], "best_dice": -1.0, "best_epoch": 0, "epoch": 0, "metrics": None}
    if resumed:
        state = restore(resumed, parts, scheduler, {"train": data.train_names, "validation": data.val_names},
                        cfg.resume)
        say(f"resuming {data.run_dir} after epoch {state['epoch']} (best so far: epoch {state['best_epoch']}, "
            f"Dice per volume {state['best_dice']:.4f})")
    if ddp.main:
        save_json(data.run_dir / "config.json", config_record)
    validate = functools.partial(
        evaluation.evaluate, parts.model, val_loader, device, loss_fn=parts.loss_fn,
        threshold=evaluation.THRESHOLD, amp_dtype=amp_dtype, channels_last=CHANNELS_LAST, progress=progress,
        postprocess=cfg.postprocess,
        spacing=spacing, patients=data.val_names,
        gather=evaluation.gather_across_ranks if ddp.enabled else None,
    ) if val_loader is not None else None
    start, first_epoch = time.perf_counter(), state["epoch"]
    volumes = fit(cfg, parts, scheduler, train_loader, validate, state, ddp=ddp, device=device,
                  amp_dtype=amp_dtype, progress=progress, val_slices=val_slices, run_dir=data.run_dir,
                  config_record=config_record, say=say)
    timing = training_time(state["history"], time.perf_counter() - start, state["epoch"] - first_epoch)
    # What a cv compares with the final model's training (a CV proxy should take as many steps).
    state["training"] = {"train_slices": len(train_set), "steps_per_epoch": len(train_loader),
                         "optimizer_steps": len(train_loader) * state["epoch"]}
    if state["epoch"] == first_epoch and state["history"] and ddp.main:
        # Resumed after the last epoch: a crash between its last.pt and its history left history.csv
        # and curves.png an epoch behind; draw them from the checkpoint (the reports link curves.png).
        write_history(data.run_dir, state["history"])
    if validate is None:
        return finish_unvalidated(data, state, timing, ddp.main)
    if not volumes:  # resumed after the last epoch: nothing left to train, score the weights again
        _, state["metrics"], volumes = validate()
    return finish(data, state, volumes, config_record, env, timing, ddp.main)


def fit(
    cfg: Config, parts: TrainingParts, scheduler: torch.optim.lr_scheduler.LRScheduler,
    train_loader: torch.utils.data.DataLoader, validate: Callable[[], tuple] | None, state: dict, *,
    ddp: Distributed, device: torch.device, amp_dtype: torch.dtype | None, progress: bool, val_slices: int,
    run_dir: Path, config_record: dict, say: Callable[..., None],
) -> dict:
    """The epochs from ``state["epoch"] + 1`` on: train, validate, track the best, checkpoint, log.

    Updates ``state`` (history, best epoch, metrics) and returns the last epoch's predicted volumes.
    """
    volumes: dict = {}
    timed: list[dict] = []  # this process's epochs: a resumed run's earlier ones may have run elsewhere
    try:
        for epoch in range(state["epoch"] + 1, cfg.epochs + 1):
            validated = validate is not None and (epoch % cfg.val_every == 0 or epoch == cfg.epochs)
            row, metrics, volumes = run_epoch(
                epoch, parts, scheduler, train_loader, validate if validated else None, seed=cfg.seed, ddp=ddp,
                device=device, amp_dtype=amp_dtype, channels_last=CHANNELS_LAST, progress=progress,
                val_slices=val_slices)
            if validated:
                state["metrics"] = metrics
                if row["val_dice_per_volume_mean"] > state["best_dice"]:
                    state["best_dice"], state["best_epoch"] = row["val_dice_per_volume_mean"], epoch
            state["history"].append(row)
            state["epoch"] = epoch
            if ddp.main:
                save_epoch(run_dir, parts, scheduler, state, config_record)
            timed.append(row)
            validations_left = 0 if validate is None else sum(
                e % cfg.val_every == 0 or e == cfg.epochs for e in range(epoch + 1, cfg.epochs + 1))
            left = seconds_left(timed, val_slices, cfg.epochs - epoch, validations_left)
            say(epoch_line(epoch, cfg.epochs, row, state["best_epoch"] == epoch and validated, left))
            if validated and cfg.patience and epoch < cfg.epochs and validations_since_best(state) >= cfg.patience:
                say(f"early stop: no better validation Dice per volume in {counted(cfg.patience, 'validation')} "
                    f"since epoch {state['best_epoch']}")
                break
    except KeyboardInterrupt:  # Ctrl-C: the epochs finished are checkpointed; say how to go on
        if not state["epoch"]:
            raise Interrupted(f"interrupted before the first epoch finished; {run_dir} holds nothing to continue "
                              "from") from None
        raise Interrupted(f"interrupted; the epochs finished are in {run_dir / 'last.pt'}: continue with "
                          f"python engine.py --resume {run_dir}") from None
    return volumes


def describe_run(cfg: Config, data: RunData, env: dict, parts: TrainingParts, train_set: LGGSlices, *,
                 device: torch.device, amp_dtype: torch.dtype | None, workers: int, val_slices: int,
                 steps_per_epoch: int) -> str:
    """The lines printed before the first epoch: data, device and model."""
    return "\n".join([
        f"data: {data.root} ({'SYNTHETIC' if data.synthetic else 'real'}), {len(data.train_names)} train / "
        f"{len(data.val_names)} validation patients, normalization: {cfg.normalization}, "
        f"{describe_masks(data.volumes)}",
        f"device: {device}{' (' + env['gpu'] + ')' if 'gpu' in env else ''}, amp: {amp_dtype or 'off'}, "
        f"channels_last: {CHANNELS_LAST}, workers: {workers}, run: {data.run_dir}"
        + (f", {env['distributed']}" if "distributed" in env else ""),
        f"model: {type(parts.model).__name__}, {count_parameters(parts.model):,} trainable parameters"
        + (f" (and {count_parameters(parts.heads):,} in deep supervision's heads, for training only)"
           if parts.heads is not None else "") + "; "
        f"{len(train_set):,} train slices ({int(train_set.has_tumor.sum()):,} with tumor, weight "
        f"{cfg.tumor_weight:g}), {val_slices:,} validation slices",
        *([f"warning: --preset full is meant for a GPU: {counted(cfg.epochs * steps_per_epoch, 'step')} at "
           f"{cfg.image_size} px would take many hours on a CPU; --preset cpu is the recipe for CPUs (20-33 min "
           "on 2 cores with bf16 instructions, 1.7 h without; benchmark --preset cpu estimates it)"]
          if cfg.preset == "full" and cfg.image_size >= 256 and device.type == "cpu" else []),
        *(["note: this CPU has no bf16 instructions (AVX-512 BF16 or AMX), so --amp auto trains in fp32: the CPU "
           "preset takes about 1.7 h on 2 such cores instead of 20-33 min; --features 16 tied with width 24 in "
           "cross-validation at 0.55x the time"]
          if cfg.preset == "cpu" and cfg.features > 16 and cfg.amp == "auto" and amp_dtype is None
          and device.type == "cpu" else []),
        *([f"warning: --encoder-lr-scale {cfg.encoder_lr_scale:g} is for fine-tuning --pretrained weights; without them "
           "the encoder starts from random weights" + (" and stays so, frozen" if cfg.encoder_lr_scale == 0 else "")]
          if cfg.encoder_lr_scale != 1 and not cfg.pretrained else []),
        *([f"warning: --warmup-epochs {cfg.warmup_epochs:g} is not shorter than --epochs {cfg.epochs}: the learning "
           "rate rises for the whole run and never anneals; lower --warmup-epochs (0 for a quick check)"]
          if cfg.warmup_epochs >= cfg.epochs else []),
    ])


def finish_unvalidated(data: RunData, state: dict, timing: tuple[dict, str], main_rank: bool) -> dict:
    """The end of a --split none run: metrics.json without scores, and how to score the model.
    ``timing``: ``reports.training_time``'s minutes and words."""
    history = state["history"]
    final = {"epoch": state["epoch"], "train_loss": history[-1]["train_loss"] if history else None,
             "train_patients": len(data.train_names), "validation_patients": 0, **state["training"],
             "synthetic_data": data.synthetic}
    if main_rank:
        save_json(data.run_dir / "metrics.json", final)
        print(f"trained on {counted(len(data.train_names), 'patient')}, {counted(state['epoch'], 'epoch')}, "
              f"{timing[1]}; "
              f"wrote {data.run_dir}/: last.pt, history.csv, curves.png, metrics.json. There are no validation "
              "patients, so nothing was scored; score it on patients it never saw with:\n"
              f"  python engine.py evaluate --checkpoint {data.run_dir / 'last.pt'} --data-dir DIR --patients unseen")
    return final


def finish(data: RunData, state: dict, volumes: dict, config_record: dict, env: dict, timing: tuple[dict, str],
           main_rank: bool) -> dict:
    """The end of a validated run: metrics.json, the reports and the printed table (rank 0).
    ``timing``: ``reports.training_time``'s minutes and words."""
    overlap = config_record.get("scored_patients_trained_on", [])
    final = {**state["metrics"], "epoch": state["epoch"], "best_epoch": state["best_epoch"],
             "best_dice_per_volume_mean": state["best_dice"], **state["training"], "synthetic_data": data.synthetic,
             "scored_patients_trained_on": len(overlap), "scored_patients_trained_on_names": overlap}
    if not main_rank:
        return final
    save_json(data.run_dir / "metrics.json", final)
    history = state["history"]
    title = (f"Validation after epoch {state['epoch']} "
             f"({'SYNTHETIC data: not a result on MRI' if data.synthetic else 'real data'})")
    minutes, minutes_text = timing
    timing = {**minutes, "epochs": state["epoch"],
              "train images/s (mean)": float(np.mean([h["train_images_per_second"] for h in history])),
              "validation images/s (mean)": float(np.mean([h["val_images_per_second"] for h in history
                                                           if "val_images_per_second" in h]))}
    write_reports(data.run_dir, final, volumes=volumes, scans=[data.volumes[n] for n in data.val_names],
                  title=f"Training run {data.run_dir.name}: {title}", config=config_record, environment=env,
                  timing=timing, curves=data.run_dir / "curves.png", clinical=read_clinical(data.root))
    print(format_metrics(final, title))
    print(f"best epoch {state['best_epoch']} (Dice per volume {state['best_dice']:.4f}); {minutes_text}; "
          f"wrote {data.run_dir}/: metrics.json, summary.md, per_patient.csv, curves.png, dice_per_volume.png, "
          "overlays/, best.pt, last.pt, history.csv")
    return final


# =============================================================================================
# Dispatch
# =============================================================================================


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    quiet_opencv()
    if hasattr(sys.stdout, "reconfigure"):
        # A log file or pipe gets each line as it is printed, not at exit. A character that stdout's
        # encoding lacks (a path, on Windows with output redirected) is escaped, where print raised.
        sys.stdout.reconfigure(line_buffering=True, errors="backslashreplace" if sys.stdout.errors == "strict"
                               else sys.stdout.errors)
    try:
        check_hyperparameters()  # before the flags: a bad value at the top of this file is no flag's fault
        check_flag_ranges(vars(args))
        if getattr(args, "out", ""):  # compare, data and benchmark write this file at their end
            check_new_file(Path(args.out), "--out", "paired.csv" if args.command == "compare" else "report.json")
        if args.command == "evaluate":
            evaluation.evaluate_command(args)
        elif args.command == "benchmark":
            benchmark.benchmark_command(*benchmark_settings(args, argv))
        elif args.command == "cv":
            cfg = run_config("cv", args, argv)
            cv.cross_validate(cfg, train, resumable_overrides(cfg))
        elif args.command == "compare":
            cv.compare_command(args)
        elif args.command == "download":
            target = download_dataset(Path(args.to))
            print(f"dataset ready in {target}\nthe loader finds it from this folder; elsewhere run:\n"
                  f"  export {DATA_ENV_VAR}={target.resolve()}")
        elif args.command == "data":
            data_command(args.data_dir, args.out, args.strict)
        elif args.command == "predict":
            inference.predict_command(args)
        elif args.command == "export":
            inference.export_command(args)
        else:
            cfg = run_config("train", args, argv)
            train(cfg)
    except (UserError, FloatingPointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Interrupted as exc:
        print(exc, file=sys.stderr)
        return 130  # the shell's status for Ctrl-C
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except torch.cuda.OutOfMemoryError:
        print("error: the GPU ran out of memory; lower --batch-size or --image-size, or keep --amp on "
              "(checkpoints already written are kept)", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in FILE_SYSTEM_ADVICE:
            raise  # anything else is a bug to see whole
        print(f"error: {exc.filename or 'a file'}: {exc.strerror}; {FILE_SYSTEM_ADVICE[exc.errno]} (checkpoints "
              "already written are kept; a training run continues with --resume)", file=sys.stderr)
        return 2
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


# The file-system errors that any write (a report, a chart, a mask) can meet, with what to do:
# one line instead of a traceback from deep inside pandas or matplotlib.
FILE_SYSTEM_ADVICE = {
    errno.ENOSPC: "free some disk space, then run the command again",
    errno.EDQUOT: "free some of your disk quota, then run the command again",
    errno.EROFS: "the file system is read-only: choose a folder on another one",
    errno.EACCES: "check the permissions of that path, or choose another folder",
    errno.EPERM: "check the permissions of that path, or choose another folder",
}


def run_from_shell() -> int:
    """main(), ending quietly with status 1 when stdout's reader has left (`| head`): Python's
    documented recipe, which points stdout at /dev/null so that the exit's flush cannot raise again."""
    try:
        status = main()
        sys.stdout.flush()  # what is still buffered meets the closed pipe here, not at exit
        return status
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(run_from_shell())
