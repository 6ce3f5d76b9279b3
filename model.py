"""The networks, and the weights on disk that fill them.

A hand-written UNet (Ronneberger et al. 2015) sized like the published LGG model: at the
defaults (3 input channels, 1 output channel, 32 base features) it has 7,763,041 parameters,
the same as the UNet of Buda et al. (2019) for this dataset. The model returns logits; apply a
sigmoid (or threshold at 0) to get a mask. Also: the mapping of Buda et al.'s published weights
onto ours, and the loading of this package's checkpoints.
"""

from __future__ import annotations

import copy
import hashlib
import pickle
import re
import zipfile
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torch.utils.flop_counter import FlopCounterMode

from libraries import UserError


class DoubleConv(nn.Sequential):
    """Two 3x3 conv -> BatchNorm -> ReLU layers; spatial size is kept."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            # No conv bias: the BatchNorm that follows has its own shift.
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class Down(nn.Sequential):
    """2x2 max-pool that halves H and W, then a DoubleConv."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(nn.MaxPool2d(2), DoubleConv(in_channels, out_channels))


class Up(nn.Module):
    """2x2 transposed conv that doubles H and W, concatenation with the skip, then a DoubleConv."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2)
        # After concatenation the channels are out_channels (upsampled) + out_channels (skip).
        self.conv = DoubleConv(2 * out_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        return self.conv(torch.cat([x, skip], dim=1))


class OutConv(nn.Conv2d):
    """1x1 conv from features to one logit map per class."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels, kernel_size=1)


class UNet(nn.Module):
    """Encoder-decoder with 4 down levels and skip connections by concatenation.

    Args:
        in_channels: input channels (3: pre-contrast, FLAIR, post-contrast).
        out_channels: output logit maps (1 for binary tumor segmentation).
        features: channels of the first level; each level down doubles them.

    Shape:
        input (N, in_channels, H, W) with H and W divisible by 16;
        output (N, out_channels, H, W) logits.
    """

    levels = 4
    frozen_encoder = False

    def __init__(self, in_channels: int = 3, out_channels: int = 1, features: int = 32) -> None:
        super().__init__()
        f = features
        self.inc = DoubleConv(in_channels, f)
        self.down1 = Down(f, 2 * f)
        self.down2 = Down(2 * f, 4 * f)
        self.down3 = Down(4 * f, 8 * f)
        self.down4 = Down(8 * f, 16 * f)  # bottleneck at H/16
        self.up1 = Up(16 * f, 8 * f)
        self.up2 = Up(8 * f, 4 * f)
        self.up3 = Up(4 * f, 2 * f)
        self.up4 = Up(2 * f, f)
        self.outc = OutConv(f, out_channels)

    def encoder(self) -> list[nn.Module]:
        """The contracting path, bottleneck included."""
        return [self.inc, self.down1, self.down2, self.down3, self.down4]

    def freeze_encoder(self) -> None:
        """Fine-tuning: no gradient for the encoder, and its BatchNorm statistics stay fixed."""
        self.frozen_encoder = True
        for module in self.encoder():
            module.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> UNet:
        super().train(mode)
        if self.frozen_encoder:
            for module in self.encoder():
                module.eval()
        return self

    def forward(self, x: torch.Tensor, decoder_outputs: bool = False) -> torch.Tensor | tuple[torch.Tensor, list]:
        """Logits; with ``decoder_outputs``, also the decoder's features at H/2 (2f channels) and
        H/4 (4f), for deep supervision (``training.DeepSupervision``)."""
        factor = 2**self.levels
        if x.shape[-1] % factor or x.shape[-2] % factor:
            raise ValueError(
                f"UNet input height and width must be divisible by {factor}, got {tuple(x.shape[-2:])}; "
                "choose an --image-size that is a multiple of 16"
            )
        x1 = self.inc(x)  # (N, f, H, W)
        x2 = self.down1(x1)  # (N, 2f, H/2, W/2)
        x3 = self.down2(x2)  # (N, 4f, H/4, W/4)
        x4 = self.down3(x3)  # (N, 8f, H/8, W/8)
        x5 = self.down4(x4)  # (N, 16f, H/16, W/16)
        x = self.up1(x5, x4)
        quarter = self.up2(x, x3)  # (N, 4f, H/4, W/4)
        half = self.up3(quarter, x2)  # (N, 2f, H/2, W/2)
        x = self.up4(half, x1)  # (N, f, H, W)
        logits = self.outc(x)  # (N, out_channels, H, W)
        return (logits, [half, quarter]) if decoder_outputs else logits


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def count_flops(model: nn.Module, image_size: int) -> tuple[float, float]:
    """(forward, forward + backward) FLOPs of one image, counted on the meta device (no compute),
    in ``model``'s own mode: a deep-supervision network in training mode counts its heads too."""
    meta = copy.deepcopy(model).to("meta")
    x = torch.zeros(1, input_width(model), image_size, image_size, device="meta")
    with FlopCounterMode(display=False) as forward:
        meta(x)
    with FlopCounterMode(display=False) as training:
        outputs = meta(x)
        sum(o.sum() for o in (outputs if isinstance(outputs, (list, tuple)) else [outputs])).backward()
    return float(forward.get_total_flops()), float(training.get_total_flops())


def fuse_conv_bn(model: nn.Module) -> nn.Module:
    """An inference copy of ``model`` with each BatchNorm folded into the conv before it.

    In eval mode BatchNorm is a fixed per-channel affine map, so it can be merged into the
    conv's weights and bias: the same function with one pass over memory less per block
    (about 10% faster inference on a CPU). The original model is left untouched.
    """
    fused = copy.deepcopy(model).eval()
    for module in fused.modules():
        if not isinstance(module, nn.Sequential):
            continue
        names = list(module._modules)
        for first, second in zip(names, names[1:]):
            conv, bn = module._modules[first], module._modules[second]
            # _BatchNorm also covers SyncBatchNorm (--sync-bn), which is a BatchNorm2d in eval mode.
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.modules.batchnorm._BatchNorm):
                module._modules[first] = fuse_conv_bn_eval(conv, bn)
                module._modules[second] = nn.Identity()
    return fused


# ---------------------------------------------------------------------------------------------
# Published weights
# ---------------------------------------------------------------------------------------------

# Buda et al.'s release (mateuszbuda/brain-segmentation-pytorch, v1.0). Their model ends with a
# sigmoid; ours returns logits, so the same weights give sigmoid(ours) == theirs.
BUDA_WEIGHTS_URL = (
    "https://github.com/mateuszbuda/brain-segmentation-pytorch/releases/download/v1.0/unet-e012d006.pt"
)
# Their block names -> ours, in network order.
_BUDA_BLOCKS = {
    "encoder1.enc1": "inc", "encoder2.enc2": "down1.1", "encoder3.enc3": "down2.1",
    "encoder4.enc4": "down3.1", "bottleneck.bottleneck": "down4.1", "decoder4.dec4": "up1.conv",
    "decoder3.dec3": "up2.conv", "decoder2.dec2": "up3.conv", "decoder1.dec1": "up4.conv",
}
_BUDA_LAYERS = {"conv1": "0", "norm1": "1", "conv2": "3", "norm2": "4"}  # inside a DoubleConv
_BUDA_OTHERS = {"upconv4": "up1.up", "upconv3": "up2.up", "upconv2": "up3.up", "upconv1": "up4.up", "conv": "outc"}


def _buda_key_map() -> dict[str, str]:
    """Their state_dict prefixes -> ours, e.g. 'encoder1.enc1conv1' -> 'inc.0'."""
    mapping = {}
    for theirs, ours in _BUDA_BLOCKS.items():
        for layer, index in _BUDA_LAYERS.items():
            mapping[f"{theirs}{layer}"] = f"{ours}.{index}"
    mapping.update(_BUDA_OTHERS)
    return mapping


def is_buda_state_dict(state_dict: dict) -> bool:
    return "encoder1.enc1conv1.weight" in state_dict


def buda_to_unet(state_dict: dict) -> dict:
    """Rename a Buda et al. state_dict (118 entries) to this UNet's keys; the tensors are unchanged."""
    mapping = _buda_key_map()
    out = {}
    for key, value in state_dict.items():
        prefix, _, leaf = key.rpartition(".")
        if prefix not in mapping:
            raise KeyError(f"unexpected key {key!r} in a Buda et al. state_dict")
        out[f"{mapping[prefix]}.{leaf}"] = value
    return out


def weights_layout(state_dict: dict) -> dict | None:
    """The UNet a state_dict fits, told by its keys and shapes ({'features': f}); None if it does
    not fit this UNet (another network, or one of the removed variants: docs/results.md)."""
    if "inc.0.weight" not in state_dict or "inc.1.running_mean" not in state_dict:
        return None
    out_channels, in_channels = state_dict["inc.0.weight"].shape[:2]
    return {"features": out_channels} if in_channels == 3 else None


NOT_OUR_UNET = "not this package's UNet; pass a checkpoint or state_dict written by engine.py, or Buda et al.'s"


def describe_weights(state_dict: dict) -> str:
    """The network a state_dict fits, in flags ('--features 32'), or 'of an unknown layout'."""
    layout = weights_layout(state_dict)
    return "of an unknown layout" if layout is None else f"--features {layout['features']}"


_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.pth?$")


def check_hash_in_name(path: Path) -> None:
    """A weights file named like unet-e012d006.pt must have a sha256 that starts with e012d006
    (torchvision's and torch.hub's convention): a damaged or swapped file is refused."""
    match = _HASH_IN_NAME.search(path.name)
    if match is None:
        return
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if not digest.startswith(match[1]):
        raise ValueError(f"{path}: its name says sha256 {match[1]}..., its content has {digest[:len(match[1])]}...: "
                         "the file is damaged or not the one its name says; download it again")


def download_weights(spec: str) -> object:
    """The torch file behind 'buda' or a URL, downloaded once into torch.hub's cache.

    A file named like unet-e012d006.pt must have a sha256 starting with e012d006 (check_hash).
    """
    url = BUDA_WEIGHTS_URL if spec == "buda" else spec
    try:
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", weights_only=True, check_hash=True)
    except Exception as exc:  # URLError, HTTPError, hash mismatch... many types
        raise OSError(f"{url}: download failed ({type(exc).__name__}); download the file by hand, "
                      f"put it in {torch.hub.get_dir()}/checkpoints/ or pass its local path") from None


def is_remote(spec: str) -> bool:
    """'buda' and URLs are downloaded; anything else is a local path."""
    return spec == "buda" or spec.startswith(("http://", "https://"))


def state_dict_from(loaded: object, spec: str) -> tuple[dict, str, str | None]:
    """(state_dict in our key names, kind, normalization) of a loaded weights file; kind is 'buda'
    for Buda et al.'s key names, else 'package'; normalization is what the weights expect when
    known ('buda' for theirs, a package checkpoint's own setting), else None."""
    normalization = None
    if isinstance(loaded, dict) and "model" in loaded and isinstance(loaded["model"], dict):
        normalization = (loaded.get("config") or {}).get("normalization")
        loaded = loaded["model"]
    if not isinstance(loaded, dict):
        raise ValueError(f"{spec}: not a state_dict or checkpoint")
    if is_buda_state_dict(loaded):
        return buda_to_unet(loaded), "buda", "buda"
    return loaded, "package", normalization


def load_weights(spec: str) -> tuple[dict, str, str | None]:
    """A state_dict for this UNet from a path, a URL or 'buda', and where it came from.

    Accepts this package's checkpoints (their 'model' entry), plain state_dicts in our key names
    or in Buda et al.'s. URLs (and 'buda') are downloaded once into torch.hub's cache. Every file
    is read with weights_only=True, and one named with its hash is checked. Returns
    ``state_dict_from``'s (state_dict, kind, normalization).
    Raises ValueError, OSError or UserError with a message naming the source.
    """
    return state_dict_from(fetch_weights(spec), spec)


def fetch_weights(spec: str) -> object:
    """What the file behind ``spec`` holds: 'buda' or a URL downloaded once (``download_weights``),
    a local path read without running pickled code (``read_torch_file``); a hash in the name is checked."""
    if is_remote(spec):
        return download_weights(spec)
    check_hash_in_name(Path(spec))
    return read_torch_file(Path(spec))


def input_width(model: nn.Module) -> int:
    """The channels a network takes: those of its first convolution."""
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels


# The last commit with the variants that lost their experiments (docs/results.md): a checkpoint
# trained with one of them is refused with this commit's name, where it still loads.
REMOVED_IN = "6af5688"
REMOVED_SETTINGS = {"encoder": "unet", "context_slices": 0, "norm_layer": "batch"}


def check_network_settings(record: dict, source: str) -> None:
    """Refuse, in one line, a checkpoint made with a network variant this package no longer builds."""
    for key, default in REMOVED_SETTINGS.items():
        if record.get(key, default) != default:
            raise UserError(f"{source}: trained with --{key.replace('_', '-')} {record[key]}, which this version "
                            f"no longer builds; use commit {REMOVED_IN} of this package to load it")


def pretrained_weights(spec: str) -> tuple[dict, str, str | None]:
    """load_weights with user-facing errors."""
    try:
        return load_weights(spec)
    except (OSError, ValueError) as exc:  # read_torch_file raises UserError itself
        raise UserError(f"--pretrained {spec}: {exc}") from None


def read_torch_file(path: Path) -> object:
    """torch.load ``path`` without running any pickled code, with user-facing errors."""
    if path.is_dir():
        raise UserError(f"{path}: a folder; pass a checkpoint file (a run's best.pt or last.pt, a cv fold's "
                        "fold-K/last.pt)")
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint; pass a best.pt or last.pt from a run folder")
    export = export_format(path)
    if export:
        reader = {"TorchScript": "torch.jit.load", "PT2 (torch.export)": "torch.export.load"}.get(export, "onnxruntime")
        raise UserError(f"{path}: a {export} export, for your own code ({reader}); pass the checkpoint it was "
                        "exported from (a run's best.pt)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, or not a torch file: unpickling junk raises KeyError, IndexError, ...
        if isinstance(exc, pickle.UnpicklingError) and "Unsupported global" in str(exc):  # a Python object
            raise UserError(f"{path}: refused: it holds pickled Python objects, which could run code when "
                            "loaded; only tensors and plain data are accepted (re-save just its state_dict "
                            "where you trust its source)") from exc
        raise UserError(f"{path}: not a loadable checkpoint ({type(exc).__name__}: damaged or not written by "
                        "torch.save); pass a best.pt or last.pt written by engine.py") from exc
    return ckpt


def export_format(path: Path) -> str:
    """'TorchScript', 'PT2 (torch.export)' or 'ONNX' for a file ``export`` writes in those formats, else ''.
    A TorchScript archive is a zip holding constants.pkl (what torch.load itself checks), a
    torch.export one a zip holding archive_format or, in the older layout that torch 2.5 writes,
    serialized_exported_program.json; ONNX files are named .onnx."""
    if path.suffix.lower() == ".onnx":
        return "ONNX"
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return ""
    if any(n.endswith("constants.pkl") for n in names):
        return "TorchScript"
    pt2 = ("/archive_format", "serialized_exported_program.json")
    return "PT2 (torch.export)" if any(n.endswith(pt2) for n in names) else ""


def is_package_checkpoint(obj: object) -> bool:
    """A dict written by this package: weights under 'model' and the settings under 'config'."""
    return isinstance(obj, dict) and isinstance(obj.get("model"), dict) and isinstance(obj.get("config"), dict)


def load_checkpoint(path: Path) -> dict:
    """Load a checkpoint written by ``train`` (or ``export --format state_dict``) safely."""
    ckpt = read_torch_file(path)
    if not is_package_checkpoint(ckpt):
        raise UserError(f"{path}: not a checkpoint written by engine.py (no model/config entries)")
    return ckpt


def scoring_checkpoint(spec: str, *, image_size: int | None = None, normalization: str | None = None) -> dict:
    """A checkpoint for evaluate, predict and export from anything ``--pretrained`` accepts.

    This package's checkpoints are read as they are. Published weights (``buda``, a URL, a plain
    state_dict in our key names or in Buda et al.'s) get a record of how to prepare their inputs:
    Buda et al.'s use their normalization at 256 px unless ``image_size``/``normalization`` say
    otherwise; a plain state_dict of ours records neither, so both must be given. Their record
    says which patients they were trained on (``trained_on``), for the overlap warnings.
    """
    try:
        loaded = fetch_weights(spec)
        if is_package_checkpoint(loaded):
            return loaded
        state_dict, kind, _ = state_dict_from(loaded, spec)
    except (OSError, ValueError) as exc:
        raise UserError(str(exc)) from None
    if kind == "buda":
        image_size, normalization = image_size or 256, normalization or "buda"
    elif image_size is None or normalization is None:
        raise UserError(f"{spec}: a plain state_dict records neither the image size nor the normalization its "
                        "model was trained with; pass --image-size and --normalization")
    layout = weights_layout(state_dict)
    if layout is None:
        raise UserError(f"{spec}: these weights are {describe_weights(state_dict)}, {NOT_OUR_UNET}")
    record = {**layout, "image_size": image_size, "normalization": normalization, "threshold": 0.5,
              "channels_last": True, "postprocess": "none", "batch_size": 16, "seed": 0,
              "patients": {"train": [], "validation": []},
              "trained_on": "buda" if kind == "buda" else "unknown", "synthetic_data": False,
              "resolved_data_dir": "", "weights": spec}
    return {"model": state_dict, "config": record, "epoch": None}


def overridden_settings(
    record: dict, *, image_size: int | None, normalization: str | None
) -> list[tuple[str, object, object]]:
    """(flag, recorded, given) for each of --image-size and --normalization given with a value
    other than the one the checkpoint's record holds (published weights record what was given)."""
    given = {"image_size": image_size, "normalization": normalization}
    return [("--" + key.replace("_", "-"), record[key], value) for key, value in given.items()
            if value and record.get(key) not in (None, value)]


def network_from_checkpoint(ckpt: dict, source: str = "checkpoint") -> nn.Module:
    """The network a checkpoint was trained with, holding its weights (on the CPU)."""
    record = ckpt["config"]
    check_network_settings(record, source)
    model = UNet(features=record["features"])
    model.load_state_dict(ckpt["model"])
    return model
