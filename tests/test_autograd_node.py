"""The autograd node of lora_forward (csrc/autograd.cpp): x·Aᵀ, its second output, is not differentiable, and its
gradient is never materialized (no zero tensor filled per backward); a node reached with no gradient for y gives
no gradients; the gradients themselves are the float64 reference's."""

import pytest
import torch

from conftest import DEVICES, assert_rel_close, make_params

import lora_ext
from lora_ext import ops


def _zero_fills_in_backward(device):
    torch.manual_seed(0)
    layer = lora_ext.LoRALinear(64, 48, r=8, alpha=16, device=device, dtype=torch.float32)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)
    x = torch.randn(40, 64, device=device, requires_grad=True)
    y = layer(x)
    dy = torch.randn_like(y)
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities) as prof:
        y.backward(dy)
    return [e.name for e in prof.events() if e.name in ("aten::zeros", "aten::zero_", "aten::fill_", "aten::zeros_like")]


@pytest.mark.parametrize("device", DEVICES)
def test_backward_fills_no_zeros_for_the_activation(device):
    """Before: every backward filled a (tokens × r) zero tensor as x·Aᵀ's gradient (a kernel per step on CUDA)."""
    assert _zero_fills_in_backward(device) == []


@pytest.mark.parametrize("device", DEVICES)
def test_node_without_gradient_for_y_returns_none(device):
    weight, bias, lora_A, lora_B = make_params(32, 24, 4, torch.float32, torch.float32, device)
    x = torch.randn(10, 32, device=device, requires_grad=True)
    lora_A.requires_grad_(True)
    lora_B.requires_grad_(True)
    y, activation = torch.ops.lora_ext.lora_forward(x, weight, bias, lora_A, lora_B, 0.5, 0.0, None)
    assert not activation.requires_grad
    grads = y.grad_fn(None, None)  # the node called with no gradient for either output
    assert all(g is None for g in grads), grads


@pytest.mark.parametrize("device", DEVICES)
def test_gradients_match_the_reference(device):
    torch.manual_seed(1)
    weight, bias, lora_A, lora_B = make_params(32, 24, 4, torch.float32, torch.float32, device)
    x = torch.randn(10, 32, device=device, requires_grad=True)
    lora_A.requires_grad_(True)
    lora_B.requires_grad_(True)
    dy = torch.randn(10, 24, device=device)
    ops.lora_linear(x, weight, bias, lora_A, lora_B, 0.5).backward(dy)

    x64, A64, B64 = (t.detach().double().cpu().requires_grad_(True) for t in (x, lora_A, lora_B))
    y64 = x64 @ weight.double().cpu().t() + bias.double().cpu() + 0.5 * (x64 @ A64.t()) @ B64.t()
    y64.backward(dy.double().cpu())
    for name, got, expected in (("dx", x.grad, x64.grad), ("dA", lora_A.grad, A64.grad), ("dB", lora_B.grad, B64.grad)):
        assert_rel_close(got, expected, torch.float32, name=name)
