"""Shared environment helpers: seeding and RNG state, device, precision and memory format, environment
report, safe file writes and run folders.

Every module imports what it uses from here by name; nothing here runs at import time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import stat
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import torch
import torch.distributed as dist


class UserError(Exception):
    """A problem the user can fix. Its message names the file or flag and what to do; no traceback is shown."""


class Interrupted(Exception):
    """Ctrl-C in a run that can go on; its message says how (no traceback is shown)."""


def counted(n: int, noun: str) -> str:
    """'1 patient', '2 patients', '0 patients': a count and its noun, singular only for one."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def first_names(names: Sequence[str], shown: int = 3) -> str:
    """'a, b, c, ...': the first ``shown`` of ``names``, and an ellipsis where some are left out."""
    return ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")


def write_text(path: Path, text: str) -> None:
    """Write ``text`` as UTF-8 whatever the locale: Windows would write its code page, and fail on a
    path outside it. A name the locale could not decode (surrogates) goes back as its own bytes."""
    path.write_text(text, encoding="utf-8", errors="surrogateescape")


def write_csv(path: Path, frame: pd.DataFrame) -> None:
    """``frame`` as a CSV file without its index, in UTF-8 as write_text writes."""
    frame.to_csv(path, index=False, encoding="utf-8", errors="surrogateescape")


def write_image(path: Path, image: np.ndarray, params: Sequence[int] = ()) -> None:
    """Write ``image`` in the format of ``path``'s suffix (with OpenCV's encoder ``params``); a failed
    write (a full disk, a folder without permission) is an error naming the file.

    OpenCV encodes and Python writes: cv2.imwrite reports a failure only by returning False, and
    opens the path through the C library (see data_files.imread)."""
    ok, encoded = cv2.imencode(path.suffix, image, list(params))
    if not ok:
        raise UserError(f"{path}: could not be written (OpenCV could not encode it as {path.suffix})")
    try:
        path.write_bytes(encoded.tobytes())
    except OSError as exc:
        raise UserError(f"{path}: could not be written ({exc.strerror or exc}); check that its folder has free space "
                        "and can be written in, then run the command again") from None


def quiet_opencv() -> None:
    """Silence OpenCV's own log lines (libtiff errors on bad files): the package reports them itself.

    OpenCV 4.13 moved the call from ``cv2.setLogLevel`` (4.9-4.12, which albumentations 2.0 accepts)
    to ``cv2.utils.logging``; level 0 is LOG_LEVEL_SILENT in both."""
    logging = getattr(cv2.utils, "logging", None)
    (logging.setLogLevel if logging is not None else cv2.setLogLevel)(0)


@dataclass(frozen=True)
class Distributed:
    """This process's place in a torchrun job (rank 0 of 1 when not launched by torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str = ""
    enabled: bool = False  # launched by torchrun (even with one process): DDP and collectives on

    @property
    def main(self) -> bool:
        """Rank 0 alone logs and writes files."""
        return self.rank == 0


def launched_rank() -> int:
    """This process's rank in a torchrun job (0 when not launched by torchrun), readable before
    the processes join: what is said before ``init_distributed`` is said by rank 0 alone."""
    return int(os.environ.get("RANK", "0"))


def printer(main: bool) -> Callable[..., None]:
    """``print`` for the process that logs (rank 0), a no-op for the others."""
    return print if main else (lambda *_, **__: None)


def init_distributed(device_name: str) -> Distributed:
    """Join the torchrun job described by the environment, if any.

    The backend is nccl when this process will use a CUDA GPU (one per local rank), else gloo.
    On the CPU each process takes an equal share of the cores.
    """
    if "WORLD_SIZE" not in os.environ:  # not launched by torchrun
        return Distributed()
    world = int(os.environ["WORLD_SIZE"])
    rank, local_rank = launched_rank(), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    else:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return Distributed(rank=rank, world=world, local_rank=local_rank, backend=backend, enabled=True)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device) with one seed."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds all CUDA devices


def rng_state() -> dict:
    """Every global RNG state, in types that torch.load(weights_only=True) accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos,
                                                       has_gauss, gauss], "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what ``rng_state`` saved (a resumed run continues the same random streams)."""
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def resolve_device(name: str) -> torch.device:
    """'auto' -> CUDA when available, else CPU; 'cpu' and 'cuda' are taken as asked."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    if name not in ("cpu", "cuda"):
        raise UserError(f"--device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 in hardware (AVX-512 BF16 or AMX), where bf16 autocast pays off."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, c, lambda: False)() for c in checks)


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``--amp`` on ``device``, or None for full fp32.

    'auto' picks the fastest safe choice: bf16 on CUDA GPUs that support it, fp16 on older
    GPUs (the caller then uses a GradScaler), bf16 on CPUs with native bf16, else fp32.
    """
    if amp == "off":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        if device.type != "cuda":
            raise UserError("--amp fp16 needs a CUDA device; use --amp bf16 or off on the CPU")
        return torch.float16
    if amp != "auto":
        raise UserError(f"--amp must be auto, off, bf16 or fp16, got {amp!r}")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bf16() else None


def setup_device(name: str, amp: str) -> tuple[torch.device, torch.dtype | None]:
    """The device and autocast dtype for ``--device`` and ``--amp``; every command starts here.

    On CUDA, cuDNN may pick the fastest kernels for our fixed input size (cudnn.benchmark).
    """
    device = resolve_device(name)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if amp == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        print("warning: this CPU has no bf16 instructions (AVX-512 BF16 or AMX), so --amp bf16 is emulated: over "
              "3x slower than fp32 in training here (docs/results.md); --amp auto uses fp32 on such a CPU",
              file=sys.stderr)
    return device, resolve_amp(amp, device)


# Training and the benchmark's fast path run NHWC: faster convolutions on CPUs and GPUs (benchmark
# times it against the NCHW fp32 reference).
CHANNELS_LAST = True


def memory_format(channels_last: bool) -> torch.memory_format:
    """NHWC (channels_last, faster convolutions on CPU and GPU) or the default NCHW layout."""
    return torch.channels_last if channels_last else torch.contiguous_format


def autocast(device: torch.device, amp_dtype: torch.dtype | None) -> torch.autocast:
    """Mixed precision for the forward pass, or a no-op when ``amp_dtype`` is None (fp32)."""
    return torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)


def environment_report(device: torch.device) -> dict[str, Any]:
    """Versions and hardware, for the run's config.json and the printed header."""
    report: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": str(torch.__version__),  # TorchVersion is not a plain str
        "platform": platform.platform(),
        "device": str(device),
        "cpu_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    if device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(device)
        report["cuda"] = torch.version.cuda
        report["cudnn"] = torch.backends.cudnn.version()
    return report


def _file_mode(path: Path) -> int:
    """The permissions a file written at ``path`` should get: those of the file it replaces, or what
    ``open()`` would give a new one under the process's umask (read with the usual set-and-restore)."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def atomic_write(path: Path, write: Any) -> None:
    """Write a file through ``write(tmp_path)`` into a temporary file beside it, then rename.

    The rename is atomic on one filesystem, so readers and crashes see the old file or the
    new one, never half of one. A write that fails (a full disk, most often) leaves the old file
    as it was and becomes a UserError that says so.
    """
    path, tmp = Path(path), ""
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        os.chmod(tmp, _file_mode(path))  # mkstemp's file is private (0600); open() would give the umask's
        write(Path(tmp))
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # torch.save reports a failed write as a RuntimeError
        reason = (getattr(exc, "strerror", None) or str(exc)).splitlines()[0]
        raise UserError(f"{path}: could not be written ({reason}); the previous {path.name}, if any, is intact. "
                        "Free some disk space (a full disk is the usual cause), then run the command again (a "
                        "training run continues with --resume)") from exc
    finally:
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)


def save_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n"))


def save_torch(path: Path, obj: Any) -> None:
    """torch.save ``obj`` atomically."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def unused_path(stem: Path) -> Path:
    """``stem`` if nothing is there, else the first free ``stem-2``, ``stem-3``, ..."""
    path, n = stem, 1
    while path.exists():
        n += 1
        path = stem.with_name(f"{stem.name}-{n}")
    return path


def check_folder_path(path: Path, flag: str, named: Path | None = None) -> Path:
    """``path``, refused in one line where it or a folder above it is a file, or where nothing can
    be written in the nearest folder of it that exists (no permission, a read-only or virtual file
    system), before any work whose results would go there. The line starts with ``named`` (the
    file to be written in ``path``), else ``path``."""
    named = named or path
    for existing in (path, *path.parents):
        if existing.exists():
            if not existing.is_dir():
                where = "is a file, not a folder" if existing == named else f"{existing} is a file, not a folder"
                raise UserError(f"{named}: {where}; choose another {flag}")
            try:
                tempfile.TemporaryFile(dir=existing).close()  # the only sure test: os.access trusts root
            except OSError as exc:
                raise UserError(f"{named}: nothing can be written in {existing} ({exc.strerror or exc}); "
                                f"choose another {flag}") from None
            break
    return path


def check_new_file(path: Path, flag: str, example: str) -> Path:
    """``path`` if a new file may be written there: refused in one line where it is a folder, where
    it already exists (it is kept: nothing saved is overwritten) or where a folder above it is a file."""
    check_folder_path(path.parent, flag, named=path)
    if path.is_dir():
        raise UserError(f"{path}: a folder; {flag} is the file to write, such as {path / example}")
    if path.exists():
        raise UserError(f"{path}: already exists and is left as it is; choose another {flag} or delete it first")
    return path


CV_CONFIG = "cv_config.json"  # the settings of a cv run, which ``cv --resume`` continues with


def check_run_dir(path: Path) -> Path:
    """``path`` if a run may be written there: neither a file nor a folder that already holds files.
    A folder holding a run or a cv run is refused with the command that continues it."""
    check_folder_path(path, "--out-dir")
    if path.exists() and any(path.iterdir()):
        command = ("cv --resume" if (path / CV_CONFIG).is_file() else
                   "--resume" if (path / "last.pt").is_file() else "")
        hint = f"; if it was interrupted, continue it with: python engine.py {command} {path}" if command else ""
        raise UserError(f"{path}: already holds files; choose another --out-dir or remove it{hint}")
    return path


def new_run_dir(out_dir: str) -> Path:
    """The run folder, made: ``out_dir`` or a new runs/<date-time>[-N]; never one that already holds files."""
    # A suffix only when two runs start in the same second.
    path = Path(out_dir) if out_dir else unused_path(Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S"))
    check_run_dir(path).mkdir(parents=True, exist_ok=True)
    return path


# Command-line helpers shared by the commands' parsers.


def parse_bool(text: str) -> bool:
    """'on'/'off' (and true/false, yes/no, 1/0) for boolean flags such as ``--compile off``."""
    value = text.strip().lower()
    if value in ("on", "true", "yes", "1"):
        return True
    if value in ("off", "false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected on or off, got {text!r}")


# The range of each numeric flag that a command would otherwise break on far from the flag, with a
# traceback. One table for every command: train, cv, evaluate, predict, export and benchmark
# share --batch-size and --image-size.
FLAG_RANGES: dict[str, tuple[Callable[[float], bool], str]] = {
    "image_size": (lambda v: v >= 16 and v % 16 == 0, "a positive multiple of 16"),
    "batch_size": (lambda v: v >= 1, "at least 1"),
    "features": (lambda v: v >= 1, "at least 1"),
    "lr": (lambda v: v >= 0, ">= 0"),
    "weight_decay": (lambda v: v >= 0, ">= 0"),
    "warmup_epochs": (lambda v: v >= 0, ">= 0"),
    "patience": (lambda v: v >= 0, ">= 0 (0: off)"),
    "val_every": (lambda v: v >= 1, "at least 1 (validate after every N-th epoch)"),
    "steps_per_epoch": (lambda v: v >= 0, ">= 0 (0: one pass over the data)"),
    "tumor_weight": (lambda v: v > 0, "> 0"),
    "modality_dropout": (lambda v: 0 <= v <= 1, "a probability in [0, 1]"),
    "encoder_lr_scale": (lambda v: v >= 0, ">= 0 (0 freezes the encoder)"),
    "warmup": (lambda v: v >= 0, ">= 0"),  # benchmark's untimed steps
    "repeats": (lambda v: v >= 1, "at least 1"),
    "e2e_batches": (lambda v: v >= 1, "at least 1"),
    "resamples": (lambda v: v >= 1, "at least 1"),  # compare's bootstrap
    "seed": (lambda v: 0 <= v < 2**32, "in [0, 2^32) (scikit-learn's and NumPy's seed range)"),
}


def check_flag_ranges(values: dict[str, Any]) -> None:
    """Refuse, in one line, the first value in ``values`` (flag name -> value) outside its FLAG_RANGES
    range; names it does not list, and None (a command's "as trained"), pass."""
    for name, (valid, rule) in FLAG_RANGES.items():
        value = values.get(name)
        if value is not None and not valid(value):
            raise UserError(f"--{name.replace('_', '-')} must be {rule}, got "
                            + (f"{value:g}" if isinstance(value, float) else str(value)))


def add_bool_flag(parser: argparse.ArgumentParser, name: str, default: bool | None, help_text: str) -> None:
    """``--name``, ``--name on|off`` and ``--no-name``: the one way every boolean flag is made."""
    flag = "--" + name.replace("_", "-")
    parser.add_argument(flag, dest=name, nargs="?", const=True, type=parse_bool, default=default,
                        metavar="on|off", help=help_text)
    parser.add_argument("--no-" + flag[2:], dest=name, action="store_false", help=argparse.SUPPRESS)
