"""Deep supervision: the weighted loss by hand, the heads in training only, a plain model saved."""

from __future__ import annotations

import json

import pytest
from conftest import synthetic_tree
import torch

from engine import main
from model import UNet, count_parameters, network_from_checkpoint
from training import DEEP_SUPERVISION_WEIGHTS, DeepSupervision, supervised_loss


def _abs_error(out: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (out - mask).abs().mean()


def _squared_error(out: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return ((out - mask) ** 2).mean()


def test_supervised_loss_by_hand():
    # Zero logits and a squared error, so each level's loss is the mean squared tumor fraction of
    # its mask. The 4 x 4 mask has a 2 x 2 block at the top left and one more pixel at (2, 2):
    # 5/16. Shrunk by area to 2 x 2, the fractions are 1, 0, 0 and 1/4: (1 + 1/16) / 4 = 17/64; to
    # 1 x 1, 5/16, squared 25/256. Weights 4/7, 2/7, 1/7:
    # 4/7 * 5/16 + 2/7 * 17/64 + 1/7 * 25/256 = 481/1792. (Nearest neighbour, which keeps pixels
    # (0,0), (0,2), (2,0), (2,2), would give 1/2 and 1 at the coarse levels: 13/28.)
    mask = torch.zeros(1, 1, 4, 4)
    mask[0, 0, :2, :2] = 1
    mask[0, 0, 2, 2] = 1
    outputs = [torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 1, 1)]
    assert DEEP_SUPERVISION_WEIGHTS == pytest.approx((4 / 7, 2 / 7, 1 / 7)) and sum(DEEP_SUPERVISION_WEIGHTS) == 1
    assert supervised_loss(outputs, mask, _squared_error).item() == pytest.approx(481 / 1792)
    # Plain logits: the loss itself, unchanged.
    assert supervised_loss(outputs[0], mask, _abs_error).item() == pytest.approx(5 / 16)
    with pytest.raises(ValueError):  # a missing level is an error, not a silently lighter loss
        supervised_loss(outputs[:2], mask, _abs_error)


def test_heads_speak_in_training_only():
    torch.manual_seed(0)
    net = DeepSupervision(UNet(features=4), features=4)
    x = torch.randn(2, 3, 32, 32)
    full, half, quarter = net.train()(x)
    assert (full.shape, half.shape, quarter.shape) == ((2, 1, 32, 32), (2, 1, 16, 16), (2, 1, 8, 8))
    net.eval()
    assert torch.equal(net(x), net.model(x))  # evaluation sees the plain UNet
    # The heads' parameters are not the model's: checkpoints of the model stay plain.
    assert not any(k.startswith("heads") for k in net.model.state_dict())


def test_deep_supervision_run_saves_a_plain_model_that_evaluate_reproduces(tmp_path, capsys):
    args = ["--data-dir", synthetic_tree(tmp_path / "syn", 5, 6), "--image-size", "32", "--features", "4",
            "--epochs", "2", "--batch-size", "4", "--deep-supervision", "--val-fraction", "0.4",
            "--out-dir", str(tmp_path / "run")]
    assert main(args) == 0
    # The heads are 1x1 convolutions of the 8 and 16 channels at H/2 and H/4 (width 4), with a bias each.
    assert f"{count_parameters(UNet(features=4)):,} trainable parameters (and {8 + 1 + 16 + 1} in deep " \
           "supervision's heads, for training only)" in capsys.readouterr().out
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert set(ckpt["heads"]) == {"0.weight", "0.bias", "1.weight", "1.bias"}
    network_from_checkpoint(ckpt)  # the model's weights load into a plain UNet (strict)
    assert main(["evaluate", "--checkpoint", str(tmp_path / "run" / "last.pt"), "--out-dir", str(tmp_path / "eval")]) == 0
    run = json.loads((tmp_path / "run" / "metrics.json").read_text())
    again = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert again["dice_per_volume_mean"] == pytest.approx(run["dice_per_volume_mean"], abs=1e-6)
    # Released weights record what inference reads, not how they were trained: no deep_supervision,
    # which nothing downstream would read.
    assert main(["export", "--checkpoint", str(tmp_path / "run" / "last.pt"), "--format", "state_dict",
                 "--output", str(tmp_path / "release")]) == 0
    [released] = (tmp_path / "release").glob("unet-*.pt")
    record = torch.load(released, weights_only=True)["config"]
    assert "deep_supervision" not in record and record["features"] == 4 and record["image_size"] == 32
