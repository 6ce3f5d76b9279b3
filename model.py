"""The networks, and the weights on disk that fill them.

A hand-written UNet (Ronneberger et al. 2015) sized like the published LGG model: at the
defaults (3 input channels, 1 output channel, 32 base features) it has 7,763,041 parameters,
the same as the UNet of Buda et al. (2019) for this dataset. The model returns logits; apply a
sigmoid (or threshold at 0) to get a mask. Also: a UNet on torchvision's ResNet-34, the mapping
of Buda et al.'s published weights onto ours, and the loading of this package's checkpoints.
"""

from __future__ import annotations

import copy
import hashlib
import pickle
import re
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torch.utils.flop_counter import FlopCounterMode

from libraries import UserError


NORM_LAYERS = ("batch", "group")
GROUPS = 8  # GroupNorm's groups (Wu and He 2018 use 32; 8 keeps 4 channels a group at 32 features)


def norm2d(kind: str, channels: int) -> nn.Module:
    """The normalization layer after each conv: BatchNorm (statistics of the batch in training, of the
    training set in evaluation) or GroupNorm (statistics of each image, the same in both)."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(GROUPS, channels)
    raise ValueError(f"--norm-layer must be one of {', '.join(NORM_LAYERS)}, got {kind!r}")


class DoubleConv(nn.Sequential):
    """Two 3x3 conv -> norm -> ReLU layers; spatial size is kept."""

    def __init__(self, in_channels: int, out_channels: int, norm: str = "batch") -> None:
        super().__init__(
            # No conv bias: the normalization that follows has its own shift.
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            norm2d(norm, out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
            norm2d(norm, out_channels),
            nn.ReLU(inplace=True),
        )


class Down(nn.Sequential):
    """2x2 max-pool that halves H and W, then a DoubleConv."""

    def __init__(self, in_channels: int, out_channels: int, norm: str = "batch") -> None:
        super().__init__(nn.MaxPool2d(2), DoubleConv(in_channels, out_channels, norm))


class Up(nn.Module):
    """2x2 transposed conv that doubles H and W, concatenation with the skip, then a DoubleConv."""

    def __init__(self, in_channels: int, out_channels: int, norm: str = "batch") -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2)
        # After concatenation the channels are out_channels (upsampled) + out_channels (skip).
        self.conv = DoubleConv(2 * out_channels, out_channels, norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        return self.conv(torch.cat([x, skip], dim=1))


class OutConv(nn.Conv2d):
    """1x1 conv from features to one logit map per class."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels, kernel_size=1)


class FreezableEncoder(nn.Module):
    """A network whose ``encoder()`` modules can be frozen for fine-tuning."""

    frozen_encoder = False

    def encoder(self) -> list[nn.Module]:
        raise NotImplementedError

    def freeze_encoder(self) -> None:
        """Fine-tuning: no gradient for the encoder, and its BatchNorm statistics stay fixed."""
        self.frozen_encoder = True
        for module in self.encoder():
            module.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> FreezableEncoder:
        super().train(mode)
        if self.frozen_encoder:
            for module in self.encoder():
                module.eval()
        return self


class UNet(FreezableEncoder):
    """Encoder-decoder with 4 down levels and skip connections by concatenation.

    Args:
        in_channels: input channels (3: pre-contrast, FLAIR, post-contrast).
        out_channels: output logit maps (1 for binary tumor segmentation).
        features: channels of the first level; each level down doubles them.
        norm: the layer after each conv, ``"batch"`` or ``"group"`` (``norm2d``).

    Shape:
        input (N, in_channels, H, W) with H and W divisible by 16;
        output (N, out_channels, H, W) logits.
    """

    levels = 4

    def __init__(self, in_channels: int = 3, out_channels: int = 1, features: int = 32, norm: str = "batch") -> None:
        super().__init__()
        f = features
        if norm == "group" and f % GROUPS:
            raise ValueError(f"--norm-layer group splits the channels into {GROUPS} groups, so --features must be a "
                             f"multiple of {GROUPS}, got {f}")
        self.inc = DoubleConv(in_channels, f, norm)
        self.down1 = Down(f, 2 * f, norm)
        self.down2 = Down(2 * f, 4 * f, norm)
        self.down3 = Down(4 * f, 8 * f, norm)
        self.down4 = Down(8 * f, 16 * f, norm)  # bottleneck at H/16
        self.up1 = Up(16 * f, 8 * f, norm)
        self.up2 = Up(8 * f, 4 * f, norm)
        self.up3 = Up(4 * f, 2 * f, norm)
        self.up4 = Up(2 * f, f, norm)
        self.outc = OutConv(f, out_channels)

    def encoder(self) -> list[nn.Module]:
        """The contracting path, bottleneck included."""
        return [self.inc, self.down1, self.down2, self.down3, self.down4]

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
    """(forward, forward + backward) FLOPs of one image, counted on the meta device (no compute)."""
    meta = copy.deepcopy(model).to("meta")
    x = torch.zeros(1, input_width(model), image_size, image_size, device="meta")
    with FlopCounterMode(display=False) as forward:
        meta(x)
    with FlopCounterMode(display=False) as training:
        meta(x).sum().backward()
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


def unet_to_buda(state_dict: dict) -> dict:
    """The inverse of buda_to_unet (for export to their code, and for tests)."""
    inverse = {ours: theirs for theirs, ours in _buda_key_map().items()}
    out = {}
    for key, value in state_dict.items():
        prefix, _, leaf = key.rpartition(".")
        out[f"{inverse[prefix]}.{leaf}"] = value
    return out


def weights_layout(state_dict: dict) -> dict | None:
    """The network a state_dict fits, told by its keys and shapes: its encoder, features,
    context_slices and norm_layer; None if it fits neither network."""
    if "inc.0.weight" in state_dict:
        out_channels, in_channels = state_dict["inc.0.weight"].shape[:2]
        return {"encoder": "unet", "features": out_channels, "context_slices": (in_channels - 3) // 2,
                # GroupNorm keeps no running statistics; every BatchNorm does.
                "norm_layer": "batch" if "inc.1.running_mean" in state_dict else "group"}
    if "stem.0.weight" in state_dict:
        return {"encoder": "resnet34", "features": 32, "context_slices": 0, "norm_layer": "batch"}
    return None


def describe_weights(state_dict: dict) -> str:
    """The network a state_dict fits, in flags: '--encoder unet --features 32', or what is unknown."""
    layout = weights_layout(state_dict)
    if layout is None:
        return "of an unknown layout"
    if layout["encoder"] != "unet":
        return f"--encoder {layout['encoder']}"
    context = f" --context-slices {layout['context_slices']}" if layout["context_slices"] else ""
    norm = f" --norm-layer {layout['norm_layer']}" if layout["norm_layer"] != "batch" else ""
    return f"--encoder unet --features {layout['features']}{context}{norm}"


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


# ---------------------------------------------------------------------------------------------
# A UNet with a torchvision ResNet-34 encoder
# ---------------------------------------------------------------------------------------------


class ResNetUNet(FreezableEncoder):
    """UNet decoder on torchvision's ResNet-34 encoder (optionally ImageNet-pretrained).

    Skips come from the stem (H/2), layer1 (H/4), layer2 (H/8) and layer3 (H/16); the bottleneck
    is layer4 (H/32). Returns logits.

    Shape:
        input (N, 3, H, W) with H and W divisible by 32; output (N, out_channels, H, W).
    """

    def __init__(self, out_channels: int = 1, weights: str = "none") -> None:
        super().__init__()
        from torchvision.models import ResNet34_Weights, resnet34

        backbone = resnet34(weights=ResNet34_Weights.IMAGENET1K_V1 if weights == "imagenet" else None)
        self.stem = nn.Sequential(backbone.conv1, backbone.bn1, backbone.relu)  # 64 @ H/2
        self.pool = backbone.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4  # 64, 128, 256, 512
        )
        self.up1 = _SkipUp(512, 256, 256)  # H/16
        self.up2 = _SkipUp(256, 128, 128)  # H/8
        self.up3 = _SkipUp(128, 64, 64)  # H/4
        self.up4 = _SkipUp(64, 64, 64)  # H/2
        self.final = nn.Sequential(nn.ConvTranspose2d(64, 32, kernel_size=2, stride=2), DoubleConv(32, 32))
        self.outc = OutConv(32, out_channels)

    def encoder(self) -> list[nn.Module]:
        return [self.stem, self.layer1, self.layer2, self.layer3, self.layer4]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 32 or x.shape[-2] % 32:
            raise ValueError(f"ResNet-34 UNet input height and width must be divisible by 32, got "
                             f"{tuple(x.shape[-2:])}; choose an --image-size that is a multiple of 32")
        s0 = self.stem(x)  # (N, 64, H/2, W/2)
        s1 = self.layer1(self.pool(s0))  # (N, 64, H/4, W/4)
        s2 = self.layer2(s1)  # (N, 128, H/8, W/8)
        s3 = self.layer3(s2)  # (N, 256, H/16, W/16)
        x = self.layer4(s3)  # (N, 512, H/32, W/32)
        x = self.up4(self.up3(self.up2(self.up1(x, s3), s2), s1), s0)  # (N, 64, H/2, W/2)
        return self.outc(self.final(x))  # (N, out_channels, H, W)


class _SkipUp(nn.Module):
    """2x transposed-conv upsampling, concatenation with a skip of ``skip_channels``, DoubleConv."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2)
        self.conv = DoubleConv(out_channels + skip_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([self.up(x), skip], dim=1))


ENCODERS = ("unet", "resnet34")


# A volume has 20-88 slices; more context than this mostly repeats its end slices.
MAX_CONTEXT = 4


def input_channels(context_slices: int) -> int:
    """The network's input channels: pre-contrast, FLAIR, post-contrast, and the FLAIR of
    ``context_slices`` neighbouring slices on each side (``LGGSlices``' context)."""
    return 3 + 2 * context_slices


def check_context(context_slices: int, encoder: str) -> None:
    """Refuse a --context-slices the network cannot take (training and benchmark), in one line."""
    if not 0 <= context_slices <= MAX_CONTEXT:
        raise UserError(f"--context-slices is a number of slices on each side, 0 to {MAX_CONTEXT}; "
                        f"got {context_slices}")
    if context_slices and encoder != "unet":
        raise UserError(f"--context-slices needs the hand-written UNet, whose first layer takes any number of "
                        f"channels; --encoder {encoder}'s stem takes 3: drop one of them")


def check_norm_layer(norm_layer: str, encoder: str, features: int, sync_bn: bool = False) -> None:
    """Refuse a --norm-layer the network cannot take (training and benchmark), in one line."""
    if norm_layer == "batch":
        return
    if encoder != "unet":
        raise UserError(f"--norm-layer {norm_layer} needs the hand-written UNet; --encoder {encoder} comes with "
                        "BatchNorm: drop one of them")
    if features % GROUPS:
        raise UserError(f"--norm-layer group splits the channels into {GROUPS} groups: --features must be a multiple "
                        f"of {GROUPS}, got {features}")
    if sync_bn:
        raise UserError(f"--sync-bn synchronizes BatchNorm statistics, and --norm-layer {norm_layer} keeps none: "
                        "drop --sync-bn")


def input_width(model: nn.Module) -> int:
    """The channels a network takes: those of its first convolution."""
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels


def build_model(encoder: str = "unet", features: int = 32, encoder_weights: str = "none",
                in_channels: int = 3, norm_layer: str = "batch") -> nn.Module:
    """The segmentation network for a config: the hand-written UNet or the ResNet-34 UNet.

    ``in_channels`` above 3 (2.5D input: neighbouring slices' FLAIR) and ``norm_layer`` other than
    BatchNorm are for the UNet only: the ResNet's stem and its ImageNet weights take three channels
    and come with BatchNorm.
    """
    if encoder == "unet":
        return UNet(in_channels=in_channels, out_channels=1, features=features, norm=norm_layer)
    if encoder == "resnet34":
        if in_channels != 3:
            raise ValueError(f"--encoder resnet34 takes 3 input channels, not {in_channels}: use --encoder unet "
                             "for --context-slices")
        if norm_layer != "batch":
            raise ValueError(f"--encoder resnet34 has BatchNorm; --norm-layer {norm_layer} is for --encoder unet")
        return ResNetUNet(out_channels=1, weights=encoder_weights)
    raise ValueError(f"--encoder must be one of {', '.join(ENCODERS)}, got {encoder!r}")


# ---------------------------------------------------------------------------------------------
# Building a network for a config or a checkpoint, with user-facing errors
# ---------------------------------------------------------------------------------------------


def make_network(encoder: str, features: int, encoder_weights: str = "none", in_channels: int = 3,
                 norm_layer: str = "batch") -> nn.Module:
    """build_model with user-facing errors: ImageNet weights that cannot be downloaded, or an input
    width or normalization layer the encoder cannot take."""
    try:
        return build_model(encoder, features, encoder_weights, in_channels, norm_layer)
    except ValueError as exc:  # a setting the network cannot take
        raise UserError(str(exc)) from None
    except (OSError, RuntimeError) as exc:  # URLError is an OSError
        raise UserError(f"--encoder-weights {encoder_weights}: torchvision could not fetch the ImageNet weights "
                        f"({type(exc).__name__}); put resnet34-b627a593.pth in {torch.hub.get_dir()}/checkpoints/ "
                        "or use --encoder-weights none") from None


def pretrained_weights(spec: str) -> tuple[dict, str, str | None]:
    """load_weights with user-facing errors."""
    try:
        return load_weights(spec)
    except (OSError, ValueError, RuntimeError, KeyError, pickle.UnpicklingError) as exc:
        raise UserError(f"--pretrained {spec}: {exc}") from None


def read_torch_file(path: Path) -> object:
    """torch.load ``path`` without running any pickled code, with user-facing errors."""
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint; pass a best.pt or last.pt from a run folder")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # weights_only met a Python object it will not build
        raise UserError(f"{path}: refused: it holds pickled Python objects, which could run code when "
                        "loaded; only tensors and plain data are accepted (re-save just its state_dict "
                        "where you trust its source)") from exc
    except (RuntimeError, OSError, EOFError, ValueError) as exc:  # truncated or not a torch file
        raise UserError(f"{path}: not a loadable checkpoint ({type(exc).__name__}: damaged or not written "
                        "by torch.save); pass a best.pt or last.pt written by engine.py") from exc
    return ckpt


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
        raise UserError(f"{spec}: these weights are {describe_weights(state_dict)}, neither this package's UNet nor "
                        "its ResNet-34 UNet; pass a checkpoint or state_dict written by engine.py, or Buda et al.'s")
    record = {**layout, "image_size": image_size, "normalization": normalization, "threshold": 0.5,
              "channels_last": True, "tta": False, "postprocess": "none", "batch_size": 16, "seed": 0,
              "dice_weight": 1.0, "bce_weight": 1.0, "dice_mode": "sample", "patients": {"train": [], "validation": []},
              "trained_on": "buda" if kind == "buda" else "unknown", "synthetic_data": False,
              "resolved_data_dir": "", "weights": spec}
    return {"model": state_dict, "config": record, "epoch": None}


def network_from_checkpoint(ckpt: dict) -> nn.Module:
    """The network a checkpoint was trained with, holding its weights (on the CPU)."""
    record = ckpt["config"]
    model = make_network(record.get("encoder", "unet"), record["features"],
                         in_channels=input_channels(record.get("context_slices", 0)),
                         norm_layer=record.get("norm_layer", "batch"))  # checkpoints before --norm-layer: BatchNorm
    model.load_state_dict(ckpt["model"])
    return model
