"""UNet shape, size and gradient flow."""

import pytest
import torch

from model import UNet, count_parameters


def test_parameter_count_matches_published_unet():
    assert count_parameters(UNet(in_channels=3, out_channels=1, features=32)) == 7_763_041


def test_output_shape_and_logits():
    model = UNet(features=8).eval()
    x = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, 1, 48, 64)
    assert not any(isinstance(m, (torch.nn.Sigmoid,)) for m in model.modules())


def test_gradient_reaches_every_parameter():
    torch.manual_seed(0)
    model = UNet(features=4)
    x = torch.randn(2, 3, 32, 32)
    target = (torch.rand(2, 1, 32, 32) > 0.8).float()
    torch.nn.functional.binary_cross_entropy_with_logits(model(x), target).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_input_size_not_multiple_of_16_is_refused():
    with pytest.raises(ValueError, match="multiple of 16"):
        UNet(features=4)(torch.zeros(1, 3, 40, 40))


def test_fused_inference_copy_computes_the_same_function():
    from model import fuse_conv_bn

    torch.manual_seed(0)
    model = UNet(features=4)
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, 32, 32))  # non-trivial running statistics
    model.eval()
    fused = fuse_conv_bn(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # original untouched
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-4, atol=1e-5)


def test_sync_batchnorm_is_folded_like_batchnorm():
    from model import fuse_conv_bn

    torch.manual_seed(0)
    model = UNet(features=4).eval()
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(UNet(features=4)).eval()
    synced.load_state_dict(model.state_dict())
    for m in (fuse_conv_bn(model), fuse_conv_bn(synced)):
        assert not any(isinstance(x, torch.nn.modules.batchnorm._BatchNorm) for x in m.modules())
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fuse_conv_bn(synced)(x), fuse_conv_bn(model)(x))
