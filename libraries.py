"""Shared environment helpers: seeding, device and precision choice, environment report, safe file writes.

Every module imports what it uses from here by name; nothing here runs at import time.
"""

from __future__ import annotations

import json
import os
import platform
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.distributed as dist


class UserError(Exception):
    """A problem the user can fix. Its message names the file or flag and what to do; no traceback is shown."""


def quiet_opencv() -> None:
    """Silence OpenCV's own log lines (libtiff errors on bad files): the package reports them itself."""
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)


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


def init_distributed(device_name: str) -> Distributed:
    """Join the torchrun job described by the environment, if any.

    The backend is nccl when this process will use a CUDA GPU (one per local rank), else gloo.
    On the CPU each process takes an equal share of the cores.
    """
    if "WORLD_SIZE" not in os.environ:  # not launched by torchrun
        return Distributed()
    world = int(os.environ["WORLD_SIZE"])
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
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


def atomic_write(path: Path, write: Any) -> None:
    """Write a file through ``write(tmp_path)`` into a temporary file beside it, then rename.

    The rename is atomic on one filesystem, so readers and crashes see the old file or the
    new one, never half of one.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n"))


def save_torch(path: Path, obj: Any) -> None:
    """torch.save ``obj`` atomically."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))
