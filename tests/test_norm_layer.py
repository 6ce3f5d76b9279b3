"""--norm-layer group: GroupNorm in place of BatchNorm, each image normalized by its own features in
training and evaluation alike, and every path that must rebuild the same network from a file."""

import json

import pytest
import torch
from torch import nn

from engine import main
from model import GROUPS, UNet, count_parameters, network_from_checkpoint, scoring_checkpoint
from test_engine import tiny_args


def test_group_unet_has_groupnorm_only_and_the_same_parameters():
    model = UNet(features=8, norm="group")
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 18  # 9 DoubleConvs (inc, 4 down, 4 up), two convs each
    assert all(m.num_groups == GROUPS == 8 for m in norms)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    # A weight and a bias per channel, as BatchNorm has: the published size is kept.
    assert count_parameters(UNet(features=32, norm="group")) == 7_763_041


@pytest.mark.parametrize("norm, per_image", [("group", True), ("batch", False)])
def test_an_image_is_normalized_by_itself_whatever_the_batch_and_mode(norm, per_image):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    x[1:] = 5 * x[1:] + 3  # the other images of the batch sit elsewhere in intensity
    model = UNet(features=8, norm=norm).train()
    with torch.no_grad():
        alone = model(x[:1])
        in_batch = model(x)[:1]
        evaluated = model.eval()(x[:1])
    # GroupNorm: the same logits alone, in a batch and in evaluation; BatchNorm: none of these.
    assert torch.allclose(alone, in_batch, atol=1e-5) is per_image
    assert torch.allclose(alone, evaluated, atol=1e-5) is per_image


@pytest.fixture(scope="module")
def group_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("group")
    assert main(tiny_args(tmp_path, "run", "--norm-layer", "group", "--features", "8", "--epochs", "1")) == 0
    return tmp_path


def test_training_records_the_norm_layer(group_run):
    ckpt = torch.load(group_run / "run" / "last.pt", weights_only=True)
    assert ckpt["config"]["norm_layer"] == "group"
    assert json.loads((group_run / "run" / "config.json").read_text())["norm_layer"] == "group"
    assert not any(k.endswith("running_mean") for k in ckpt["model"])
    assert isinstance(network_from_checkpoint(ckpt).inc[1], nn.GroupNorm)


def test_evaluate_release_and_plain_weights_rebuild_the_group_network(group_run):
    run = group_run / "run"
    out = group_run / "eval"
    assert main(["evaluate", "--checkpoint", str(run / "last.pt"), "--device", "cpu", "--out-dir", str(out),
                 "--no-progress", "--cache-dir", "off"]) == 0
    trained = json.loads((run / "metrics.json").read_text())
    evaluated = json.loads((out / "metrics.json").read_text())
    for key in ("dice_per_volume_mean", "dice_global", "precision", "recall"):
        assert evaluated[key] == pytest.approx(trained[key], abs=1e-9), key

    assert main(["export", "--checkpoint", str(run / "last.pt"), "--format", "state_dict",
                 "--output", str(group_run / "release")]) == 0
    released = next((group_run / "release").glob("unet-*.pt"))
    assert torch.load(released, weights_only=True)["config"]["norm_layer"] == "group"

    plain = group_run / "weights.pt"  # no record at all: the layer is told by the weights' keys
    torch.save(torch.load(run / "last.pt", weights_only=True)["model"], plain)
    record = scoring_checkpoint(str(plain), image_size=32, normalization="volume")["config"]
    assert record["norm_layer"] == "group"


def test_checkpoints_from_before_the_option_are_batchnorm(tmp_path):
    model = UNet(features=8)
    ckpt = {"model": model.state_dict(), "config": {"encoder": "unet", "features": 8}}  # no norm_layer key
    rebuilt = network_from_checkpoint(ckpt)
    assert isinstance(rebuilt.inc[1], nn.BatchNorm2d)
    torch.save(model.state_dict(), tmp_path / "bn.pt")
    assert scoring_checkpoint(str(tmp_path / "bn.pt"), image_size=32, normalization="volume")["config"][
        "norm_layer"] == "batch"


def test_weights_of_the_other_norm_layer_are_one_line(group_run, tmp_path, capsys):
    bn = tmp_path / "bn.pt"
    torch.save(UNet(features=8).state_dict(), bn)
    assert main(tiny_args(tmp_path, "run", "--norm-layer", "group", "--features", "8", "--epochs", "1",
                          "--pretrained", str(bn))) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "asks for --encoder unet --features 8 --norm-layer group" in err
    # And the other way round: the weights' own flags name their GroupNorm.
    assert main(tiny_args(tmp_path, "run2", "--features", "8", "--epochs", "1",
                          "--pretrained", str(group_run / "run" / "last.pt"))) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "these weights are --encoder unet --features 8 --norm-layer group" in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "run2").exists()


@pytest.mark.parametrize("extra, says", [(["--features", "12"], "multiple of 8"),
                                         (["--encoder", "resnet34", "--features", "32"], "--encoder resnet34"),
                                         (["--features", "8", "--sync-bn"], "drop --sync-bn")])
def test_impossible_group_settings_are_refused_before_a_run_folder_exists(tmp_path, capsys, extra, says):
    assert main(tiny_args(tmp_path, "run", "--norm-layer", "group", *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--norm-layer group" in err and says in err
    assert not (tmp_path / "run").exists()
    if "--sync-bn" in extra:
        return  # the benchmark has no --sync-bn
    assert main(["benchmark", "--norm-layer", "group", *extra, "--synthetic", "--synthetic-dir", str(tmp_path / "syn"),
                 "--device", "cpu", "--out", str(tmp_path / "b.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and says in err
    assert not (tmp_path / "syn").exists() and not (tmp_path / "b.json").exists()
