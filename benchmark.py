"""The ``benchmark`` command: how fast training and inference run, measured, never assumed.

It times (a) the reference path (fp32, contiguous NCHW, eager) against (b) the fast default path
(--amp, channels_last, --compile) on random inputs, in turns, and then training end to end
through the real DataLoader. Every measurement uses the network that was asked for
(--features, --deep-supervision, or a --preset's), built by the same ``training.build_training`` as a
training run; with a --preset it also estimates how long that preset's training steps take here.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from data_cache import load_dataset, resolve_cache_dir
from data_files import DataIssues
from data_loaders import LGGSlices, default_num_workers, locate_data, make_loader
from data_preprocessing import batch_to_device, train_preprocess
from libraries import CHANNELS_LAST, autocast, check_folder_path, counted, environment_report, save_json, setup_device
from model import count_flops, fuse_conv_bn
from training import NetworkSpec, TrainingParts, build_training, check_trainable_batch, forward_loss, optimizer_step

# The training settings the benchmark uses; the command line offers these and no others, so a
# flag that would change nothing here (--epochs, --lr, ...) is refused by the parser.
FIELDS = ("data_dir", "seed", "image_size", "batch_size", "features", "deep_supervision", "normalization",
          "modality_dropout", "device", "amp", "compile", "num_workers", "strict", "out_dir", "preset")
# Where those settings mean something else here than in a training run.
HELPS = {"out_dir": "folder for the JSON report; empty: runs",
         "preset": "time a tested recipe's network and estimate its training time here: cpu, full; flags win"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _interleaved_rates(fns: list[Any], images: int, device: torch.device, warmup: int, repeats: int) -> list[float]:
    """images / median seconds of each function in ``fns``, timed in turns (A, B, A, B, ...).

    Taking turns means a shared machine that slows down or speeds up mid-run (other tenants,
    clock changes) shifts every path alike, so the ratios between paths stay meaningful.
    """
    for fn in fns:
        for _ in range(warmup):
            fn()
    _sync(device)
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(max(1, repeats)):
        for fn, took in zip(fns, times):
            t = time.perf_counter()
            fn()
            _sync(device)
            took.append(time.perf_counter() - t)
    return [images / statistics.median(took) for took in times]


@dataclass
class _TimedPath:
    """One execution path under ``time_paths``: its own model copy, optimizer and inputs."""

    amp_dtype: torch.dtype | None
    parts: TrainingParts
    x: torch.Tensor
    y: torch.Tensor
    infer_net: nn.Module | None = None


def _parts(features: int, deep_supervision: bool, device: torch.device, amp_dtype: torch.dtype | None,
           channels_last: bool, compile_model: bool) -> TrainingParts:
    """A training setup as ``engine.train`` builds it, with the default loss and learning rate."""
    return build_training(NetworkSpec(features=features, deep_supervision=deep_supervision, compile=compile_model),
                          device=device, channels_last=channels_last, amp_dtype=amp_dtype)


def time_paths(
    paths: dict[str, dict], *, features: int, deep_supervision: bool, image_size: int, batch_size: int,
    device: torch.device, warmup: int, repeats: int,
) -> list[dict]:
    """Training-step and inference throughput of each execution path in ``paths``, on random inputs.

    ``paths`` maps a name to its options: amp_dtype, channels_last, compile_model, and fused
    (infer with BatchNorm folded into the convs, as evaluate does). Every path starts from the
    same weights and sees the same batch; the paths are timed in turns.
    """
    x = torch.randn(batch_size, 3, image_size, image_size,
                    generator=torch.Generator().manual_seed(0))
    y = (torch.rand(batch_size, 1, image_size, image_size, generator=torch.Generator().manual_seed(1)) > 0.95).float()
    runs = []
    for options in paths.values():
        torch.manual_seed(0)
        parts = _parts(features, deep_supervision, device, options["amp_dtype"], options["channels_last"],
                       options["compile_model"])
        fmt = torch.channels_last if options["channels_last"] else torch.contiguous_format
        runs.append(_TimedPath(amp_dtype=options["amp_dtype"], parts=parts,
                               x=x.to(device).contiguous(memory_format=fmt), y=y.to(device)))

    def train_step(r: _TimedPath) -> Callable[[], Any]:
        p = r.parts
        return lambda: optimizer_step(forward_loss(p.net, r.x, r.y, p.loss_fn, r.amp_dtype), p.optimizer, p.scaler)

    for r in runs:
        r.parts.net.train()
    train_ips = _interleaved_rates([train_step(r) for r in runs], batch_size, device, warmup, repeats)
    # Training runs deep supervision's heads too, where asked for; inference the UNet alone. (The
    # reference path's network is never compiled, so it can be copied to count.)
    train_flops = count_flops(runs[0].parts.net, image_size)[1]
    # Inference copies are made after training, so BatchNorm has real running statistics.
    for r, options in zip(runs, paths.values()):
        infer = fuse_conv_bn(r.parts.model) if options["fused"] else r.parts.model.eval()
        r.infer_net = torch.compile(infer) if options["compile_model"] else infer

    def infer_step(r: _TimedPath) -> Callable[[], None]:
        def run() -> None:
            with torch.inference_mode(), autocast(device, r.amp_dtype):
                r.infer_net(r.x)
        return run

    infer_ips = _interleaved_rates([infer_step(r) for r in runs], batch_size, device, warmup, repeats)
    forward_flops = count_flops(runs[0].parts.model, image_size)[0]
    return [
        {"path": name, "train_img_s": t, "infer_img_s": i,
         "train_tflop_s": t * train_flops / 1e12, "infer_tflop_s": i * forward_flops / 1e12}
        for name, t, i in zip(paths, train_ips, infer_ips)
    ]


def time_end_to_end(
    args: argparse.Namespace, device: torch.device, amp_dtype: torch.dtype | None, batches: int
) -> dict:
    """Training throughput through the real loader (decode/cache, augmentation, collation, step)."""
    root, synthetic = locate_data(args.data_dir, seed=args.seed)
    load = dict(progress=sys.stderr.isatty(), cache_dir=resolve_cache_dir(),
                normalization=args.normalization, image_size=args.image_size,
                issues=DataIssues(strict=args.strict))
    load_dataset(root, None, **load)  # fills the cache if it is cold
    t0 = time.perf_counter()  # from here on: a warm cache, as every run after the first sees it
    volumes = load_dataset(root, None, **load)
    dataset = LGGSlices(list(volumes.values()), train_preprocess(args.image_size),
                        modality_dropout=args.modality_dropout)
    workers = default_num_workers(device) if args.num_workers < 0 else args.num_workers
    loader = make_loader(dataset, batch_size=args.batch_size, train=True, seed=args.seed, num_workers=workers,
                         pin_memory=device.type == "cuda")
    parts = _parts(args.features, args.deep_supervision, device, amp_dtype, CHANNELS_LAST, args.compile)
    parts.net.train()

    def train_step(batch: dict) -> int:
        image, mask = batch_to_device(batch, device, CHANNELS_LAST)
        optimizer_step(forward_loss(parts.net, image, mask, parts.loss_fn, amp_dtype), parts.optimizer, parts.scaler)
        return len(image)

    def load_only(batch: dict) -> int:
        return len(batch_to_device(batch, device, CHANNELS_LAST)[0])

    first_at, train_img_s = _timed_batches(loader, device, batches, train_step)
    return {"data": str(root), "synthetic_data": synthetic, "slices": len(dataset), "workers": workers,
            "first_batch_seconds_warm_cache": first_at - t0, "train_img_s": train_img_s,
            # What the input pipeline alone delivers: the most training can reach with this loader.
            "loader_img_s": _timed_batches(loader, device, batches, load_only)[1]}


def _timed_batches(
    loader: torch.utils.data.DataLoader, device: torch.device, batches: int, work: Callable[[dict], int]
) -> tuple[float, float]:
    """Run ``work`` (returning the images it handled) on 1 + ``batches`` batches, cycling the loader.

    Returns when the first batch arrived (``time.perf_counter``) and the images/s of the other
    ``batches``: the first one, with worker start-up and warm-up, is not timed.
    """
    first_at, timed_from, images, done = 0.0, 0.0, 0, 0
    while done <= batches:
        for batch in loader:
            if done == 0:
                first_at = time.perf_counter()
            n = work(batch)
            if done == 0:
                _sync(device)
                timed_from = time.perf_counter()
            else:
                images += n
            done += 1
            if done > batches:
                break
    _sync(device)
    return first_at, images / (time.perf_counter() - timed_from)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``benchmark`` command's own flags (its training settings are Config's FIELDS)."""
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    parser.add_argument("--repeats", type=int, default=7, help="timed steps; the median is reported")
    parser.add_argument("--e2e-batches", type=int, default=20, help="batches timed through the DataLoader")
    parser.add_argument("--out", default="", help="JSON file (default: <out-dir or runs>/benchmark-<date-time>.json)")


def benchmark_command(args: argparse.Namespace, training_steps: int = 0) -> dict:
    """The ``benchmark`` command: reference vs fast path, then end to end; prints a table, writes JSON.

    ``args`` holds the FIELDS settings (a --preset's already filled in) and warmup, repeats,
    e2e_batches and out. With ``training_steps`` (a preset's), it also estimates how long those
    steps take at the end-to-end rate.
    """
    out = Path(args.out or Path(args.out_dir or "runs") / f"benchmark-{datetime.now():%Y%m%d-%H%M%S}.json")
    check_folder_path(out.parent, "--out" if args.out else "--out-dir", named=out)  # before minutes of timing
    check_trainable_batch(args.batch_size, args.image_size)
    device, amp_dtype = setup_device(args.device, args.amp)
    common = {"features": args.features, "deep_supervision": args.deep_supervision, "image_size": args.image_size,
              "batch_size": args.batch_size, "device": device, "warmup": args.warmup, "repeats": args.repeats}
    paths = {
        "reference (fp32, NCHW, eager)": dict(amp_dtype=None, channels_last=False, compile_model=False,
                                              fused=False),
        f"fast (amp {amp_dtype or 'off'}, channels_last {CHANNELS_LAST}, compile {args.compile})": dict(
            amp_dtype=amp_dtype, channels_last=CHANNELS_LAST, compile_model=args.compile, fused=True),
    }
    print(f"timing {len(paths)} paths in turns ...", flush=True)
    rows = time_paths(paths, **common)
    ref, fast = rows
    e2e = time_end_to_end(args, device, amp_dtype, args.e2e_batches)
    result = {
        "environment": environment_report(device), "image_size": args.image_size,
        "batch_size": args.batch_size, "features": args.features, "deep_supervision": args.deep_supervision,
        "preset": args.preset, "paths": rows,
        "train_speedup": fast["train_img_s"] / ref["train_img_s"],
        "infer_speedup": fast["infer_img_s"] / ref["infer_img_s"],
        "end_to_end": e2e, "end_to_end_vs_fast_step": e2e["train_img_s"] / fast["train_img_s"],
    }
    if training_steps:
        result["preset_training_steps"] = training_steps
        result["preset_training_minutes_estimate"] = training_steps * args.batch_size / e2e["train_img_s"] / 60
    out.parent.mkdir(parents=True, exist_ok=True)
    save_json(out, result)
    env = result["environment"]
    heads = ", deep supervision" if args.deep_supervision else ""
    print(f"\nUNet ({args.features} features{heads}), {args.image_size}x{args.image_size}, batch {args.batch_size}, "
          f"{env.get('gpu', env['device'])}, torch {env['torch']}")
    print(f"{'path':<58} {'train img/s':>12} {'infer img/s':>12} {'train TFLOP/s':>14} {'infer TFLOP/s':>14}")
    for r in rows:
        print(f"{r['path']:<58} {r['train_img_s']:>12.2f} {r['infer_img_s']:>12.2f} "
              f"{r['train_tflop_s']:>14.3f} {r['infer_tflop_s']:>14.3f}")
    print(f"{'speed-up, fast / reference':<58} {result['train_speedup']:>11.2f}x {result['infer_speedup']:>11.2f}x")
    print(f"{'end to end through the DataLoader (' + str(e2e['workers']) + ' workers)':<58} "
          f"{e2e['train_img_s']:>12.2f} {'':>12}  = {result['end_to_end_vs_fast_step']:.0%} of the bare fast step")
    print(f"{'input pipeline alone, no model (' + str(e2e['workers']) + ' workers)':<58} {e2e['loader_img_s']:>12.2f}")
    print(f"first batch {e2e['first_batch_seconds_warm_cache']:.2f} s after start with a warm cache "
          f"({counted(e2e['slices'], 'slice')}{', SYNTHETIC' if e2e['synthetic_data'] else ''}); wrote {out}")
    if training_steps:
        print(f"--preset {args.preset}: its {training_steps:,} training steps would take about "
              f"{result['preset_training_minutes_estimate']:.0f} min here at the end-to-end rate, "
              "plus validation and the final evaluation")
    return result

