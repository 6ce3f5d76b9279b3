"""The fast path (channels_last + bf16 autocast) computes what the reference fp32 path computes,
and the benchmark command measures both. No absolute speeds are asserted here."""

import json

import pytest
from conftest import synthetic_tree
import torch
from torch import nn

from engine import main
from libraries import autocast
from model import UNet, count_flops


@pytest.fixture
def model_and_input():
    torch.manual_seed(0)
    model = UNet(features=8)
    # Non-trivial BatchNorm statistics, so eval mode does real normalization.
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 3, 32, 32))
    return model.eval(), torch.randn(2, 3, 32, 32)


def test_channels_last_alone_changes_nothing(model_and_input):
    model, x = model_and_input
    with torch.no_grad():
        ref = model(x)
        fast = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(fast.contiguous(), ref, rtol=1e-4, atol=1e-4)


def test_bf16_fast_path_matches_fp32_within_bf16_tolerance(model_and_input):
    model, x = model_and_input
    with torch.no_grad():
        ref = model(x)
        model = model.to(memory_format=torch.channels_last)
        with autocast(torch.device("cpu"), torch.bfloat16):
            fast = model(x.contiguous(memory_format=torch.channels_last)).float()
    scale = ref.abs().max().item()
    # bf16 keeps 8 significant bits (~0.4% per operation); a 23-layer net stays within a few %.
    assert (fast - ref).abs().max().item() <= 0.05 * scale
    # Decisions agree: the predicted mask is the same for nearly every pixel.
    assert ((fast > 0) == (ref > 0)).float().mean().item() >= 0.98
    # And the comparison is not vacuous: bf16 really ran (outputs are not bit-identical).
    assert not torch.equal(fast, ref)


@pytest.mark.parametrize("where", ["--out", "--out-dir"])
def test_benchmark_command_writes_valid_json(tmp_path, capsys, where):
    target = tmp_path / ("bench.json" if where == "--out" else "benchmarks")
    assert main([
        "benchmark", "--image-size", "32", "--batch-size", "2", "--features", "4", "--device", "cpu",
        "--warmup", "1", "--repeats", "2", "--e2e-batches", "2", "--data-dir", synthetic_tree(tmp_path / "syn", 2, 4),
        where, str(target),
    ]) == 0
    out = target if where == "--out" else next(target.glob("benchmark-*.json"))
    result = json.loads(out.read_text())
    ref, fast = result["paths"]
    assert ref["path"].startswith("reference") and fast["path"].startswith("fast")
    for row in (ref, fast):
        assert row["train_img_s"] > 0 and row["infer_img_s"] > 0
    assert result["train_speedup"] == pytest.approx(fast["train_img_s"] / ref["train_img_s"])
    forward, training = count_flops(UNet(features=4), 32)
    for row in (ref, fast):
        assert row["infer_tflop_s"] == pytest.approx(row["infer_img_s"] * forward / 1e12)
        assert row["train_tflop_s"] == pytest.approx(row["train_img_s"] * training / 1e12)
    e2e = result["end_to_end"]
    assert e2e["slices"] == 8 and e2e["train_img_s"] > 0 and e2e["first_batch_seconds_warm_cache"] > 0
    assert e2e["loader_img_s"] > 0
    assert result["end_to_end_vs_fast_step"] == pytest.approx(e2e["train_img_s"] / fast["train_img_s"])
    assert "speed-up" in capsys.readouterr().out


def test_count_flops_by_hand():
    # 8x8 input, two convs without bias. A conv costs 2 * (inputs per output) * outputs FLOPs.
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.Conv2d(4, 1, 1, bias=False))
    first, second = 2 * (3 * 3 * 3) * (4 * 8 * 8), 2 * 4 * (1 * 8 * 8)
    forward, training = count_flops(model, 8)
    assert forward == first + second
    # Backward: the second conv needs its input's and its weight's gradients (each as costly as
    # its forward); the first only its weight's, since the image needs no gradient.
    assert training == forward + 2 * second + first


def test_count_flops_counts_deep_supervision_heads_in_training_mode_only():
    from training import DeepSupervision

    unet_forward, unet_training = count_flops(UNet(features=4), 32)
    net = DeepSupervision(UNet(features=4), 4).train()
    # Each head is a 1x1 conv to 1 channel (bias adds are not counted): 8 channels at 16x16, 16 at
    # 8x8. Its backward needs its weight's and its input's gradients, each as costly as its forward.
    heads = 2 * 8 * (16 * 16) + 2 * 16 * (8 * 8)
    forward, training = count_flops(net, 32)
    assert (forward, training) == (unet_forward + heads, unet_training + 3 * heads)
    assert count_flops(net.eval(), 32)[0] == unet_forward


def test_count_flops_feeds_the_first_layer_its_own_channels():
    # A 5-channel first layer (2.5D input): 2 * (5 * 3 * 3) FLOPs per output, 4 * 8 * 8 outputs.
    model = nn.Sequential(nn.Conv2d(5, 4, 3, padding=1, bias=False))
    assert count_flops(model, 8)[0] == 2 * (5 * 3 * 3) * (4 * 8 * 8)


def test_benchmark_times_the_network_asked_for_and_refuses_flags_it_does_not_use(tmp_path, capsys, monkeypatch):
    """Bug 4: the step timing used the default UNet whatever the flags said, and --epochs etc. were accepted."""
    import benchmark

    built = []
    real = benchmark.build_training
    monkeypatch.setattr(benchmark, "build_training",
                        lambda spec, **kw: built.append(spec.features) or real(spec, **kw))
    common = ["--image-size", "32", "--batch-size", "2", "--device", "cpu",
              "--warmup", "0", "--repeats", "1", "--e2e-batches", "1",
              "--data-dir", synthetic_tree(tmp_path / "syn", 2, 4)]
    assert main(["benchmark", "--features", "4", *common, "--out", str(tmp_path / "b.json")]) == 0
    assert built == [4] * 3  # reference, fast, end to end
    assert json.loads((tmp_path / "b.json").read_text())["features"] == 4
    capsys.readouterr()
    for flag in (["--epochs", "3"], ["--lr", "0.1"], ["--folds", "3"], ["--steps-per-epoch", "5"]):
        with pytest.raises(SystemExit):
            main(["benchmark", *flag])
        assert "unrecognized arguments" in capsys.readouterr().err


def test_benchmark_times_a_presets_network_and_estimates_its_training_time(tmp_path, capsys, monkeypatch):
    """Bug: benchmark timed a plain width-32 UNet whatever --preset said (it had no --preset or
    --deep-supervision), so the CPU preset's speed could not be measured with it."""
    import benchmark
    from engine import PRESETS

    built = []
    real = benchmark.build_training
    monkeypatch.setattr(benchmark, "build_training", lambda spec, **kw: built.append(spec) or real(spec, **kw))
    out = tmp_path / "b.json"
    # The preset fills in what no flag gives (width 24, deep supervision); the flags given win.
    assert main(["benchmark", "--preset", "cpu", "--image-size", "32", "--batch-size", "2", "--device", "cpu",
                 "--warmup", "0", "--repeats", "1", "--e2e-batches", "1",
                 "--data-dir", synthetic_tree(tmp_path / "syn", 2, 4), "--out", str(out)]) == 0
    cpu = PRESETS["cpu"]
    assert [(s.features, s.deep_supervision) for s in built] == [(cpu["features"], True)] * 3
    result = json.loads(out.read_text())
    assert (result["features"], result["deep_supervision"], result["image_size"], result["batch_size"]) == (
        cpu["features"], True, 32, 2)
    steps = cpu["epochs"] * cpu["steps_per_epoch"]
    assert result["preset_training_steps"] == steps
    minutes = steps * 2 / result["end_to_end"]["train_img_s"] / 60
    assert result["preset_training_minutes_estimate"] == pytest.approx(minutes)
    assert f"its {steps:,} training steps would take about {minutes:.0f} min" in capsys.readouterr().out
    # Its help says what --out-dir and --preset do here, not what they do in a training run.
    with pytest.raises(SystemExit):
        main(["benchmark", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--out-dir OUT_DIR folder for the JSON report; empty: runs" in text and "runs/<date-time>" not in text
    assert "estimate its training time here" in text
