"""--ema-decay: the bias-corrected average by hand, an unchanged training, the average saved and scored."""

from __future__ import annotations

import json

import pytest
from conftest import synthetic_tree
import torch
from torch import nn

from engine import main
from training import WeightAverage


def _set(net: nn.Sequential, weight: float, running_mean: float, batches: int) -> None:
    with torch.no_grad():
        net[0].weight.fill_(weight)
    net[1].running_mean.fill_(running_mean)
    net[1].num_batches_tracked.fill_(batches)


def test_weight_average_by_hand():
    net = nn.Sequential(nn.Linear(1, 1, bias=False), nn.BatchNorm1d(1))
    _set(net, 1.0, 2.0, 5)
    average = WeightAverage(net, decay=0.5)
    assert average.averaged(net)[0].weight.item() == 1.0  # before any step: the model's own weights
    average.update(net)
    _set(net, 3.0, 4.0, 7)
    average.update(net)
    # Sums from zero: 0.5 * (0.5 * 1) + 0.5 * 3 = 1.75, divided by 1 - 0.5**2 = 0.75: 7/3, i.e. the
    # weights 1/3 and 2/3 on the two steps. Without the correction it would be 1.75, pulled toward 0.
    averaged = average.averaged(net)
    assert averaged[0].weight.item() == pytest.approx(7 / 3)
    assert averaged[1].running_mean.item() == pytest.approx((0.25 * 2 + 0.5 * 4) / 0.75)  # 10/3
    assert averaged[1].num_batches_tracked.item() == 7  # an integer buffer is the model's own
    assert net[0].weight.item() == 3.0  # the trained model is left alone
    # What a checkpoint keeps restores the same average.
    restored = WeightAverage(net, decay=0.9)
    restored.load_state_dict(average.state_dict())
    assert restored.averaged(net)[0].weight.item() == pytest.approx(7 / 3)


def _run(tmp_path, name: str, *extra: str) -> dict:
    args = ["--data-dir", synthetic_tree(tmp_path / "syn", 5, 6), "--image-size", "32", "--features", "4",
            "--epochs", "2", "--batch-size", "4", "--val-fraction", "0.4", "--out-dir", str(tmp_path / name),
            *extra]
    assert main(args) == 0
    return torch.load(tmp_path / name / "last.pt", weights_only=True)


def test_the_average_changes_no_training_step_and_is_what_is_scored(tmp_path):
    plain = _run(tmp_path, "plain")
    averaged = _run(tmp_path, "ema", "--ema-decay", "0.5")
    # The trained weights are bit for bit those of a run without the average.
    assert plain["model"].keys() == averaged["trained"].keys()
    assert all(torch.equal(plain["model"][k], averaged["trained"][k]) for k in plain["model"])
    # The checkpoint's model is the average, not the last weights...
    assert not all(torch.equal(averaged["model"][k], averaged["trained"][k]) for k in averaged["model"])
    # ... and it is what the run scored: evaluate of last.pt reproduces metrics.json.
    assert main(["evaluate", "--checkpoint", str(tmp_path / "ema" / "last.pt"), "--out-dir", str(tmp_path / "eval")]) == 0
    run = json.loads((tmp_path / "ema" / "metrics.json").read_text())
    again = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert again["dice_per_volume_mean"] == pytest.approx(run["dice_per_volume_mean"], abs=1e-6)
    # A decay near 0 averages nothing but the last step: the average is the trained weights.
    last = _run(tmp_path, "ema-last", "--ema-decay", "1e-9")
    assert all(torch.allclose(last["model"][k].float(), last["trained"][k].float(), atol=1e-6) for k in last["model"])


@pytest.mark.parametrize("decay", ["1", "-0.1"])
def test_a_decay_outside_0_to_1_is_refused_in_one_line(tmp_path, capsys, decay):
    assert main(["--data-dir", "synthetic", "--ema-decay", decay, "--out-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "--ema-decay" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
