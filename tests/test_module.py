"""LoRALinear: construction, init, scaling, from_linear, forward/backward, merge, state_dict."""

import math

import pytest
import torch
import torch.nn.functional as F

import lora_ext
from conftest import DEVICE_BASE_DTYPES, DEVICES, assert_rel_close, lora_reference
from lora_ext import LoRALinear


def _randomise_B(layer):
    """A fresh layer has lora_B = 0, which hides every LoRA bug; give it values."""
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape) * layer.r**-0.5)
    return layer


# ----------------------------------------------------------------------------
# Construction and init
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("device,dtype", DEVICE_BASE_DTYPES)
def test_construction(device, dtype):
    layer = LoRALinear(32, 20, r=4, alpha=8, dropout=0.1, device=device, dtype=dtype)
    assert layer.in_features == 32 and layer.out_features == 20
    assert layer.r == 4 and layer.lora_alpha == 8
    assert isinstance(layer.lora_dropout, float) and layer.lora_dropout == pytest.approx(0.1)
    assert layer.scaling == pytest.approx(2.0)
    assert layer.weight.shape == (20, 32) and layer.bias.shape == (20,)
    assert layer.lora_A.shape == (4, 32) and layer.lora_B.shape == (20, 4)
    for p in (layer.weight, layer.bias, layer.lora_A, layer.lora_B):
        assert p.device.type == device
    assert layer.weight.dtype == dtype and layer.bias.dtype == dtype
    # Adapters are in the base dtype or float32 (PEFT's default on half bases), both alike.
    assert layer.lora_A.dtype in (dtype, torch.float32)
    assert layer.lora_B.dtype == layer.lora_A.dtype
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert layer.lora_A.requires_grad and layer.lora_B.requires_grad
    assert torch.count_nonzero(layer.lora_B) == 0
    assert torch.count_nonzero(layer.lora_A) > 0
    assert not layer.merged
    trainable = {name for name, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"adapters.default.lora_A", "adapters.default.lora_B"}


def test_defaults():
    layer = LoRALinear(16, 8)
    assert layer.r == 8 and layer.lora_alpha == 16
    assert layer.lora_dropout == 0.0
    assert layer.scaling == pytest.approx(2.0)
    assert layer.bias is not None
    assert layer.weight.dtype == torch.get_default_dtype()


def test_no_bias():
    layer = LoRALinear(16, 8, r=2, bias=False)
    assert layer.bias is None
    x = torch.randn(3, 16)
    _randomise_B(layer)
    ref = lora_reference(x, layer.weight, None, layer.lora_A, layer.lora_B, layer.scaling)
    assert_rel_close(layer(x), ref["y"], torch.float32)


@pytest.mark.parametrize("r,alpha", [(1, 1), (4, 8), (8, 16), (16, 8), (64, 128), (256, 16)])
def test_scaling(r, alpha):
    assert LoRALinear(8, 8, r=r, alpha=alpha).scaling == pytest.approx(alpha / r)
    rs = LoRALinear(8, 8, r=r, alpha=alpha, use_rslora=True)
    assert rs.scaling == pytest.approx(alpha / math.sqrt(r))


def test_init_kaiming():
    """kaiming_uniform_(a=sqrt(5)) on A (r, in): uniform on [-1/sqrt(in), 1/sqrt(in)]."""
    in_features, r = 1024, 4
    a = LoRALinear(in_features, 8, r=r, init="kaiming").lora_A.detach().double()
    bound = 1 / math.sqrt(in_features)
    assert a.abs().max() <= bound * (1 + 1e-6)
    assert a.max() >= 0.95 * bound and a.min() <= -0.95 * bound
    # Uniform: std = bound / sqrt(3); 4096 samples give ~1.1% relative spread.
    assert a.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.06)
    assert abs(a.mean().item()) <= 6 * bound / math.sqrt(3) / math.sqrt(a.numel())


@pytest.mark.parametrize("r", [2, 8])
def test_init_gaussian(r):
    """init="gaussian": A ~ N(0, (1/r)^2), i.e. std 1/r as in PEFT."""
    a = LoRALinear(2048, 8, r=r, init="gaussian").lora_A.detach().double()
    assert a.std().item() == pytest.approx(1 / r, rel=0.06)
    assert abs(a.mean().item()) <= 6 * (1 / r) / math.sqrt(a.numel())
    # Gaussian, not uniform: some values beyond 2 standard deviations.
    assert (a.abs() > 2 / r).float().mean().item() == pytest.approx(0.0455, abs=0.02)
    layer = LoRALinear(2048, 8, r=r, init="gaussian")
    assert torch.count_nonzero(layer.lora_B) == 0


# ----------------------------------------------------------------------------
# from_linear
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("device,dtype", DEVICE_BASE_DTYPES)
def test_from_linear_shares_parameters(device, dtype, bias):
    linear = torch.nn.Linear(24, 16, bias=bias, device=device, dtype=dtype)
    x = torch.randn(5, 24).to(device, dtype)
    with torch.no_grad():
        expected = linear(x)
    layer = LoRALinear.from_linear(linear, r=4, alpha=12, dropout=0.0, use_rslora=True)
    assert layer.weight is linear.weight
    if bias:
        assert layer.bias is linear.bias
    else:
        assert layer.bias is None
    assert not layer.weight.requires_grad
    assert layer.in_features == 24 and layer.out_features == 16
    assert layer.r == 4 and layer.lora_alpha == 12
    assert layer.scaling == pytest.approx(12 / 2)
    assert layer.lora_A.shape == (4, 24) and layer.lora_B.shape == (16, 4)
    assert layer.lora_A.device.type == device
    assert layer.lora_A.dtype in (dtype, torch.float32)
    # lora_B = 0 at init: the adapted layer starts as the linear layer.
    assert_rel_close(layer(x), expected, dtype, name="fresh adapter output")
    # Sharing, not copying: a change to the linear's weight shows in the layer.
    with torch.no_grad():
        linear.weight.mul_(2)
    assert torch.equal(layer.weight, linear.weight)


def test_from_linear_init_gaussian():
    linear = torch.nn.Linear(2048, 8)
    layer = LoRALinear.from_linear(linear, r=4, init="gaussian")
    assert layer.lora_A.detach().std().item() == pytest.approx(0.25, rel=0.06)


# ----------------------------------------------------------------------------
# Forward and backward against the float64 reference
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("leading", [(), (7,), (2, 5)], ids=str)
@pytest.mark.parametrize("use_rslora", [False, True], ids=["alpha_r", "rslora"])
@pytest.mark.parametrize("device,dtype", DEVICE_BASE_DTYPES)
def test_forward_backward_matches_reference(device, dtype, use_rslora, leading):
    layer = _randomise_B(
        LoRALinear(24, 20, r=4, alpha=6, use_rslora=use_rslora, device=device, dtype=dtype)
    )
    x = torch.randn(*leading, 24).to(device, dtype).requires_grad_(True)
    y = layer(x)
    assert y.shape == (*leading, 20) and y.dtype == dtype
    grad_y = torch.randn(y.shape).to(device, dtype)
    y.backward(grad_y)

    adapter_dtype = layer.lora_A.dtype
    ref = lora_reference(
        x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling, grad_y=grad_y
    )
    assert_rel_close(y, ref["y"], dtype, adapter_dtype, name="y")
    assert_rel_close(x.grad, ref["grad_x"], dtype, adapter_dtype, name="x.grad")
    assert_rel_close(layer.lora_A.grad, ref["grad_A"], dtype, adapter_dtype, name="lora_A.grad")
    assert_rel_close(layer.lora_B.grad, ref["grad_B"], dtype, adapter_dtype, name="lora_B.grad")
    # Gradients land only on the adapters.
    assert layer.weight.grad is None and layer.bias.grad is None


@pytest.mark.parametrize("device", DEVICES)
def test_fresh_layer_gradients(device):
    """At init (B = 0) only lora_B gets a nonzero gradient, as in PEFT."""
    layer = LoRALinear(16, 12, r=4, device=device)
    x = torch.randn(6, 16, device=device)
    layer(x).square().sum().backward()
    assert torch.count_nonzero(layer.lora_A.grad) == 0
    assert torch.count_nonzero(layer.lora_B.grad) > 0


@pytest.mark.parametrize("device", DEVICES)
def test_optimizer_step_changes_only_adapters(device):
    layer = _randomise_B(LoRALinear(16, 12, r=4, device=device))
    weight, bias = layer.weight.clone(), layer.bias.clone()
    lora_A, lora_B = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
    optimizer = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    layer(torch.randn(6, 16, device=device)).square().sum().backward()
    optimizer.step()
    assert torch.equal(layer.weight, weight) and torch.equal(layer.bias, bias)
    assert not torch.equal(layer.lora_A, lora_A) and not torch.equal(layer.lora_B, lora_B)


# ----------------------------------------------------------------------------
# merge / unmerge
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("device,dtype", DEVICE_BASE_DTYPES)
def test_merge_unmerge_roundtrip(device, dtype):
    layer = _randomise_B(LoRALinear(24, 20, r=4, alpha=8, device=device, dtype=dtype))
    layer.eval()
    adapter_dtype = layer.lora_A.dtype
    x = torch.randn(3, 5, 24).to(device, dtype)
    original_weight = layer.weight.detach().clone()
    original_bias = layer.bias.detach().clone()
    lora_A, lora_B = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
    with torch.no_grad():
        unmerged_y = layer(x)

    layer.merge()
    assert layer.merged
    delta = layer.scaling * (lora_B.to("cpu", torch.float64) @ lora_A.to("cpu", torch.float64))
    assert_rel_close(
        layer.weight, original_weight.to("cpu", torch.float64) + delta, dtype, name="merged weight"
    )
    assert torch.equal(layer.bias, original_bias)
    assert torch.equal(layer.lora_A, lora_A) and torch.equal(layer.lora_B, lora_B)
    with torch.no_grad():
        merged_y = layer(x)
        plain_y = F.linear(x, layer.weight, layer.bias)
    # The merged forward is a plain linear with the merged weight ...
    torch.testing.assert_close(merged_y, plain_y)
    # ... and computes what the unmerged layer did, within the dtype's precision.
    assert_rel_close(merged_y, unmerged_y, dtype, adapter_dtype, name="merged output")
    ref = lora_reference(x, original_weight, original_bias, lora_A, lora_B, layer.scaling)
    assert_rel_close(merged_y, ref["y"], dtype, adapter_dtype, name="merged output vs reference")

    layer.unmerge()
    assert not layer.merged
    assert_rel_close(layer.weight, original_weight, dtype, adapter_dtype, name="unmerged weight")
    with torch.no_grad():
        assert_rel_close(layer(x), ref["y"], dtype, adapter_dtype, name="unmerged output")


@pytest.mark.parametrize("device", DEVICES)
def test_merged_layer_in_no_grad_training_mode(device):
    """Merged inference under no_grad works whatever the module's mode."""
    layer = _randomise_B(LoRALinear(16, 12, r=4, device=device))
    x = torch.randn(4, 16, device=device)
    layer.merge()
    layer.eval()
    with torch.no_grad():
        y = layer(x)
    torch.testing.assert_close(y, F.linear(x, layer.weight, layer.bias))


def test_from_linear_merge_writes_into_the_linear():
    """from_linear shares the weight, so merging changes the linear layer's weight too."""
    linear = torch.nn.Linear(16, 12)
    layer = _randomise_B(LoRALinear.from_linear(linear, r=4))
    x = torch.randn(3, 16)
    with torch.no_grad():
        expected = layer(x)
    layer.merge()
    assert layer.weight is linear.weight
    with torch.no_grad():
        assert_rel_close(linear(x), expected, torch.float32, name="linear after merge")
    layer.unmerge()


# ----------------------------------------------------------------------------
# state_dict
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_state_dict(bias):
    layer = _randomise_B(LoRALinear(16, 12, r=4, alpha=8, bias=bias))
    state = layer.state_dict()
    expected = {"weight", "adapters.default.lora_A", "adapters.default.lora_B"} | ({"bias"} if bias else set())
    assert expected <= set(state)
    assert torch.equal(state["adapters.default.lora_A"], layer.lora_A)
    assert torch.equal(state["adapters.default.lora_B"], layer.lora_B)

    fresh = LoRALinear(16, 12, r=4, alpha=8, bias=bias)
    fresh.load_state_dict(state)
    x = torch.randn(5, 16)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=0)
    assert fresh.lora_A.requires_grad and not fresh.weight.requires_grad
