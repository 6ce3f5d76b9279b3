"""Training steps and what they need: the model with its loss, optimizer and scaler, the
learning-rate schedule, an epoch of steps, the checkpoint that lets a run resume exactly, and
--pretrained weights.

``engine.train`` runs these steps epoch after epoch; ``benchmark`` times the very same ones,
so a speed measured there is the speed of training.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from tqdm import tqdm

from data_loaders import start_epoch
from data_preprocessing import batch_to_device
from evaluation import trained_patients
from libraries import Distributed, UserError, autocast, memory_format, rng_state, save_torch, set_rng_state
from loss_fun import DiceBCELoss
from model import NOT_OUR_UNET, OutConv, UNet, describe_weights, pretrained_weights, weights_layout
from reports import validation_row, write_history


@dataclass
class TrainingParts:
    """What a training step uses; checkpoints hold ``model``'s state_dict, never a wrapper's."""

    model: nn.Module  # the plain network
    net: nn.Module  # what runs the steps: the model, or its deep-supervision, DDP and compiled wrappers
    loss_fn: DiceBCELoss
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    heads: nn.Module | None = None  # --deep-supervision's extra output layers (saved apart from the model)


# Deep supervision (nnU-Net's scheme, on a UNet of 4 levels): the loss is a weighted mean of the
# losses at full, half and quarter resolution, weights 1, 1/2, 1/4 normalized to sum 1; nnU-Net
# gives the next level down (H/8) weight 0, so it has no head here. Masks are shrunk by area, to
# the tumor fraction of each coarse pixel: nnU-Net's nearest neighbour (it has several classes) would
# misplace each level's target by half a pixel of the level above.
DEEP_SUPERVISION_WEIGHTS = (4 / 7, 2 / 7, 1 / 7)


class DeepSupervision(nn.Module):
    """A UNet with 1x1 output heads on its decoder at H/2 and H/4. In training mode it returns
    [full, half, quarter] logits (``forward_loss`` weighs them); in eval mode the UNet's logits
    alone, so validation, checkpoints and inference see the plain network."""

    def __init__(self, model: nn.Module, features: int) -> None:
        super().__init__()
        self.model = model
        self.heads = nn.ModuleList([OutConv(2 * features, 1), OutConv(4 * features, 1)])  # H/2, H/4

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        if not self.training:
            return self.model(x)
        logits, decoder = self.model(x, decoder_outputs=True)
        return [logits, *(head(f) for head, f in zip(self.heads, decoder))]


def supervised_loss(outputs: torch.Tensor | list[torch.Tensor], mask: torch.Tensor, loss_fn: nn.Module) -> torch.Tensor:
    """``loss_fn`` of the logits, or, for deep supervision's [full, half, quarter] logits, the mean of
    its losses against the mask shrunk to each size, weighted by DEEP_SUPERVISION_WEIGHTS."""
    if not isinstance(outputs, (list, tuple)):
        return loss_fn(outputs.float(), mask)
    return sum(w * loss_fn(out.float(), nn.functional.interpolate(mask, size=out.shape[-2:], mode="area"))
               for w, out in zip(DEEP_SUPERVISION_WEIGHTS, outputs, strict=True))


@dataclass(frozen=True)
class NetworkSpec:
    """The settings ``build_training`` turns into a network, its wrappers and its optimizer."""

    features: int = 32  # UNet channels at the first level
    lr: float = 1e-3
    weight_decay: float = 1e-4
    deep_supervision: bool = False
    encoder_lr_scale: float = 1.0  # fine-tuning: the encoder's lr is lr times this; 0 freezes it
    sync_bn: bool = False
    compile: bool = False

    @classmethod
    def of(cls, settings: Any) -> NetworkSpec:
        """The spec of an object with these fields under the same names (a Config, an argparse Namespace)."""
        return cls(**{f.name: getattr(settings, f.name) for f in fields(cls)})


def build_training(
    spec: NetworkSpec, *, device: torch.device, channels_last: bool, amp_dtype: torch.dtype | None,
    distributed: bool = False, weights: dict | None = None, weights_source: str = "",
) -> TrainingParts:
    """The network of ``spec`` on ``device`` (optionally from ``weights``), its wrappers, the
    Dice + BCE loss, AdamW and the scaler.

    The encoder's parameters form their own group at ``lr * encoder_lr_scale`` (fine-tuning); at 0
    the encoder is frozen and its parameters are left out of the optimizer. The scaler is active for fp16 only. With
    ``deep_supervision`` the network is wrapped in ``DeepSupervision``, whose heads train with
    the decoder.
    """
    model = UNet(features=spec.features).to(device, memory_format=memory_format(channels_last))
    if weights is not None:
        load_weights_into(model, weights, weights_source, features=spec.features)
    if spec.encoder_lr_scale == 0:  # frozen: no gradient, and its BatchNorm statistics stay fixed
        model.freeze_encoder()
    if spec.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    net, heads = model, None
    if spec.deep_supervision:
        net = DeepSupervision(model, spec.features).to(device, memory_format=memory_format(channels_last))
        heads = net.heads
    net = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None) \
        if distributed else net
    net = torch.compile(net) if spec.compile else net
    trained = [*model.parameters(), *(heads.parameters() if heads is not None else ())]
    encoder_params = {id(p) for m in model.encoder() for p in m.parameters()}
    groups = [{"params": [p for p in trained if p.requires_grad and id(p) in encoder_params],
               "lr": spec.lr * spec.encoder_lr_scale},
              {"params": [p for p in trained if p.requires_grad and id(p) not in encoder_params],
               "lr": spec.lr}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=spec.lr, weight_decay=spec.weight_decay)
    return TrainingParts(model=model, net=net, loss_fn=DiceBCELoss(), optimizer=optimizer,
                         scaler=torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16), heads=heads)


def check_trainable_batch(batch_size: int, image_size: int) -> None:
    """Refuse a training batch that leaves BatchNorm one value per channel: a single slice at a
    1x1 bottleneck (16 px, the UNet halving it four times), which training cannot normalize."""
    if batch_size == 1 and image_size // 16 == 1:
        raise UserError(f"--batch-size 1 at --image-size {image_size} leaves BatchNorm one value per channel at the "
                        "UNet's 1x1 bottleneck, which training cannot normalize; use --batch-size 2 or more, or "
                        "--image-size 32 or more")


def forward_loss(
    model: nn.Module, image: torch.Tensor, mask: torch.Tensor, loss_fn: nn.Module, amp_dtype: torch.dtype | None
) -> torch.Tensor:
    """Forward pass under autocast; the loss itself is computed in fp32 (``supervised_loss``)."""
    with autocast(image.device, amp_dtype):
        outputs = model(image)
    return supervised_loss(outputs, mask, loss_fn)


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
    """Backward and update; the scaler is a no-op unless fp16 is used."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


def make_scheduler(
    optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step learning rate: linear warmup from lr/100 to lr over ``warmup_steps``, then cosine
    decay to 0 at ``total_steps`` (each parameter group from its own lr)."""
    total_steps, warmup_steps = max(1, total_steps), min(max(0, warmup_steps), max(0, total_steps - 1))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return 0.01 + 0.99 * step / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_one_epoch(
    parts: TrainingParts,
    loader: torch.utils.data.DataLoader,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    device: torch.device,
    *,
    amp_dtype: torch.dtype | None,
    channels_last: bool,
    epoch: int,
    progress: bool,
) -> tuple[float, int]:
    """One pass over the training loader; returns the summed per-sample loss and the sample count."""
    parts.net.train()
    total, seen = 0.0, 0
    bar = tqdm(loader, desc=f"epoch {epoch} train", leave=False, disable=not progress)
    for step, batch in enumerate(bar):
        image, mask = batch_to_device(batch, device, channels_last)
        loss = forward_loss(parts.net, image, mask, parts.loss_fn, amp_dtype)
        value = loss.item()
        if not math.isfinite(value):  # checked before the update, so the weights stay finite
            raise FloatingPointError(
                f"loss is {value} at epoch {epoch}, step {step}; "
                "lower --lr or use --amp off (the last good checkpoint is kept)"
            )
        optimizer_step(loss, parts.optimizer, parts.scaler)
        scheduler.step()
        total += value * len(image)
        seen += len(image)
        bar.set_postfix(loss=f"{total / seen:.4f}")
    return total, seen


def run_epoch(
    epoch: int, parts: TrainingParts, scheduler: torch.optim.lr_scheduler.LRScheduler,
    train_loader: torch.utils.data.DataLoader, validate: Callable[[], tuple] | None, *, seed: int,
    ddp: Distributed, device: torch.device, amp_dtype: torch.dtype | None, channels_last: bool,
    progress: bool, val_slices: int,
) -> tuple[dict[str, Any], dict | None, dict]:
    """Train one epoch and validate (unless ``validate`` is None); return its history row, the metrics
    and the predicted volumes (None and {} without validation)."""
    # The data order and augmentation of an epoch depend only on (seed, epoch), so a resumed
    # run repeats an interrupted epoch exactly.
    start_epoch(train_loader, epoch=epoch, seed=seed, stream=seed * 1_000_003 + epoch + 7919 * ddp.rank)
    t0 = time.perf_counter()
    loss_sum, seen = train_one_epoch(parts, train_loader, scheduler, device, amp_dtype=amp_dtype,
                                     channels_last=channels_last, epoch=epoch, progress=progress)
    if ddp.enabled:
        loss_sum, seen = sync_across_ranks(parts.model, loss_sum, seen, device)
    t1 = time.perf_counter()
    row: dict[str, Any] = {"epoch": epoch, "train_loss": loss_sum / max(seen, 1)}
    metrics, volumes = None, {}
    if validate is not None:
        val_loss, metrics, volumes = validate()
        row.update(validation_row(val_loss, metrics))
    t2 = time.perf_counter()
    row.update(lr=scheduler.get_last_lr()[0], seconds=t2 - t0, train_images_per_second=seen / (t1 - t0))
    if validate is not None:
        row["val_images_per_second"] = val_slices / (t2 - t1)
    return row, metrics, volumes


def sync_across_ranks(model: torch.nn.Module, loss_sum: float, seen: int, device: torch.device) -> tuple[float, int]:
    """After a distributed epoch: rank 0's buffers on every rank, and the loss over all ranks' samples.

    DDP keeps the weights equal, but each rank's last forward pass updated its own BatchNorm
    running statistics. Rank 0's are the ones the checkpoint saves, so every rank validates with them.
    """
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)
    sums = torch.tensor([loss_sum, seen], dtype=torch.float64, device=device)
    dist.all_reduce(sums)
    return sums[0].item(), int(sums[1].item())


def restore(resumed: dict, parts: TrainingParts, scheduler: torch.optim.lr_scheduler.LRScheduler,
            names: dict[str, list[str]], source: str) -> dict:
    """Load a resumed run's weights, optimizer, scheduler, scaler and RNG states; return its progress.

    ``names`` are the patients the data gives now ({'train': [...], 'validation': [...]}), which
    must be the run's own: a patient added to the folder would otherwise join training midway."""
    recorded = resumed["config"]["patients"]
    changed = [f"{side} {len(recorded[side])} -> {len(names[side])}" for side in ("train", "validation")
               if recorded[side] != names[side]]
    if changed:
        raise UserError(f"{source}: the data no longer gives the run's patients ({', '.join(changed)}): its "
                        "folder has changed since the run began; resume with the data it began with (--data-dir)")
    parts.model.load_state_dict(resumed["model"])
    if parts.heads is not None:
        parts.heads.load_state_dict(resumed["heads"])
    parts.optimizer.load_state_dict(resumed["optimizer"])
    scheduler.load_state_dict(resumed["scheduler"])
    parts.scaler.load_state_dict(resumed["scaler"])
    set_rng_state(resumed["rng"])
    return {"history": resumed["history"], "best_dice": resumed["best_dice"], "best_epoch": resumed["best_epoch"],
            "epoch": resumed["epoch"], "metrics": resumed["metrics"]}


def save_epoch(run_dir: Path, parts: TrainingParts, scheduler: torch.optim.lr_scheduler.LRScheduler,
               state: dict, config_record: dict) -> None:
    """last.pt every epoch, best.pt when the epoch is the best so far, history.csv and curves.png.

    One checkpoint dict holds the model, optimizer, scheduler, scaler, epoch, metrics, config,
    history and RNG states: everything ``--resume`` needs to continue exactly.
    """
    checkpoint = {
        "model": parts.model.state_dict(), "optimizer": parts.optimizer.state_dict(),
        "scheduler": scheduler.state_dict(), "scaler": parts.scaler.state_dict(), "epoch": state["epoch"],
        "metrics": state["metrics"], "config": config_record, "history": state["history"],
        "best_dice": state["best_dice"], "best_epoch": state["best_epoch"], "rng": rng_state(),
    }
    if parts.heads is not None:  # only --resume needs them; scoring uses the model alone
        checkpoint["heads"] = parts.heads.state_dict()
    # last.pt first: a crash between the two writes leaves a best.pt no newer than last.pt.
    save_torch(run_dir / "last.pt", checkpoint)
    if state["best_epoch"] == state["epoch"]:
        save_torch(run_dir / "best.pt", checkpoint)
    write_history(run_dir, state["history"])


def load_weights_into(model: nn.Module, weights: dict, source: str, *, features: int) -> None:
    """``model.load_state_dict(weights)``, or a one-line error naming the flags each side has."""
    layout = weights_layout(weights)
    if layout is not None and layout["features"] != features:
        raise UserError(f"--pretrained {source}: these weights are {describe_weights(weights)}, but this "
                        f"run asks for --features {features}; pass the weights' value")
    try:
        model.load_state_dict(weights)
    except RuntimeError:  # another network's keys or shapes (a width mismatch is caught above)
        raise UserError(f"--pretrained {source}: these weights are {NOT_OUR_UNET}") from None


def load_pretrained(cfg: Any, say: Callable[..., None]) -> tuple[Any, dict | None, str]:
    """The --pretrained weights, ``cfg`` (a Config) with the normalization they expect, and their kind
    ('buda' for Buda et al.'s, trained on all but the --split buda patients; else 'package').

    The weights are tried on the network ``cfg`` asks for here, before any run folder exists, so a
    mismatch leaves nothing behind."""
    if not cfg.pretrained:
        return cfg, None, ""
    weights, kind, expected = pretrained_weights(cfg.pretrained)
    if expected and expected != cfg.normalization:
        say(f"{cfg.pretrained}: these weights expect --normalization {expected}; using it")
        cfg = replace(cfg, normalization=expected)
    load_weights_into(UNet(features=cfg.features), weights, cfg.pretrained, features=cfg.features)
    return cfg, weights, kind


def width_of_weights(cfg: Any, given: set[str], say: Callable[..., None]) -> Any:
    """``cfg`` with the width of its --pretrained weights, unless the user gave --features.

    A preset's width (the CPU preset's 24) must not refuse weights of another (Buda et al.'s 32)
    when the user never asked for it; a --features the user gave that the weights do not fit stays
    an error (load_pretrained)."""
    if not cfg.pretrained or "features" in given:
        return cfg
    layout = weights_layout(pretrained_weights(cfg.pretrained)[0])
    if layout is None or layout["features"] == cfg.features:
        return cfg
    say(f"{cfg.pretrained}: these weights are --features {layout['features']}; using it")
    return replace(cfg, features=layout["features"])


def pretrained_overlap(kind: str, val_names: list[str], say: Callable[..., None]) -> list[str]:
    """The validation patients that published weights were trained on, warned about once."""
    overlap = trained_patients({"trained_on": kind, "patients": {"train": []}}, val_names) \
        if kind == "buda" else []
    if overlap:
        say(f"warning: Buda et al.'s weights were trained on {len(overlap)} of the {len(val_names)} validation "
            f"patients ({', '.join(overlap)}), so their scores are not held out; --split buda validates on "
            "the 10 they held out")
    return overlap
