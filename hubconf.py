"""torch.hub entry points: ``torch.hub.load('<owner>/<repo>', 'unet', pretrained=True)``."""

dependencies = ["torch"]

# torch.hub reads `dependencies` before the imports.
from model import UNet, describe_weights, load_weights, weights_layout  # noqa: E402


def unet(pretrained: bool | str = False, in_channels: int = 3, out_channels: int = 1,
         features: int | None = None) -> UNet:
    """The LGG UNet (7.76M parameters at width 32); it returns logits, apply a sigmoid for probabilities.

    Args:
        pretrained: False for random weights; True for Buda et al.'s published weights (downloaded
            once into torch.hub's cache; they expect the 'buda' preprocessing, see the README); or a
            path or URL to one of this package's checkpoints or a state_dict in either key layout.
        in_channels, out_channels: the UNet's inputs and outputs (the published weights need the defaults).
        features: channels at the first level; None: the weights' own (24 for the CPU preset's), else 32.
    """
    state_dict = None
    if pretrained:
        state_dict, _, _ = load_weights("buda" if pretrained is True else str(pretrained))
        layout = weights_layout(state_dict)
        if features is None and layout is not None:
            features = layout["features"]
    model = UNet(in_channels=in_channels, out_channels=out_channels, features=features or 32)
    if state_dict is not None:
        try:
            model.load_state_dict(state_dict)
        except RuntimeError:
            hint = f"pass features={layout['features']} or leave it out" if layout else "not this package's UNet"
            raise ValueError(f"{pretrained}: these weights are {describe_weights(state_dict)}; {hint}") from None
    return model
