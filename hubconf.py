"""torch.hub entry points: ``torch.hub.load('<owner>/<repo>', 'unet', pretrained=True)``."""

dependencies = ["torch"]

from model import UNet, load_weights  # noqa: E402  (torch.hub reads `dependencies` first)


def unet(pretrained: bool | str = False, in_channels: int = 3, out_channels: int = 1, features: int = 32) -> UNet:
    """The LGG UNet (7.76M parameters at the defaults); it returns logits, apply a sigmoid for probabilities.

    Args:
        pretrained: False for random weights; True for Buda et al.'s published weights (downloaded
            once into torch.hub's cache; they expect the 'buda' preprocessing, see the README); or a
            path or URL to one of this package's checkpoints or a state_dict in either key layout.
        in_channels, out_channels, features: the UNet's size (the published weights need the defaults).
    """
    model = UNet(in_channels=in_channels, out_channels=out_channels, features=features)
    if pretrained:
        state_dict, _, _ = load_weights("buda" if pretrained is True else str(pretrained))
        model.load_state_dict(state_dict)
    return model
