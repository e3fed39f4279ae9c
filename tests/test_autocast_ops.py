"""The raw operators inside an autocast region compute in their inputs' dtypes, as their schemas and fake
implementations say (csrc/no_autocast.h). Autocast reaches the C++ implementations through a fallthrough with its
state still set; before the guard, their own base product (at::linear) and the CPU path's products came back in
bfloat16 for float32 inputs: a y of the wrong dtype on the CPU, and on CUDA a bfloat16 y that the kernels then wrote
as float32, past its end. LoRALinear and lora_ext.ops.lora_linear apply autocast themselves, as F.linear does: x, W
and b in the autocast dtype, float32 adapters kept."""

import pytest
import torch

import lora_ext

from conftest import DEVICES, assert_rel_close, lora_reference, make_params, make_x
from test_multi_adapter import make_stack, reference_by_slot
from test_ops import SCALING

ops = torch.ops.lora_ext
pytestmark = pytest.mark.usefixtures("float32_matmuls")  # conftest: float32 products, as the bounds assume

# (tokens, in, out, r): decoding sizes (on Hopper the one-launch GEMV, then the cluster kernel from 17 tokens) and
# enough tokens for the tensor-core kernels.
SHAPES = [(1, 256, 136, 16), (40, 256, 136, 16), (600, 256, 136, 24)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}tok-r{s[3]}")
@pytest.mark.parametrize("device", DEVICES)
def test_lora_ops_in_an_autocast_region_keep_float32(device, shape):
    tokens, in_f, out_f, rank = shape
    x = make_x(tokens, in_f, torch.float32, device)
    weight, bias, lora_A, lora_B = make_params(in_f, out_f, rank, torch.float32, torch.float32, device)
    grad_y = make_x(tokens, out_f, torch.float32, device)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        y, xa = ops.lora_forward(x, weight, bias, lora_A, lora_B, SCALING, 0.0, None)
        grads = ops.lora_backward(grad_y, x, weight, lora_A, lora_B, xa, SCALING, 0.0, None, True)
    assert y.dtype == xa.dtype == torch.float32
    assert all(g.dtype == torch.float32 for g in grads)
    ref = lora_reference(x, weight, bias, lora_A, lora_B, SCALING, grad_y=grad_y)
    assert_rel_close(y, ref["y"], torch.float32, name="y")
    assert_rel_close(xa, ref["xa"], torch.float32, name="xa")
    for name, grad in zip(("grad_x", "grad_A", "grad_B"), grads):
        assert_rel_close(grad, ref[name], torch.float32, name=name)


@pytest.mark.parametrize("tokens", [5, 40, 300])
@pytest.mark.parametrize("device", DEVICES)
def test_multi_lora_forward_in_an_autocast_region_keeps_float32(device, tokens):
    A, B, s = make_stack([16, 8, 16], 256, 136, torch.float32, device)
    weight = (torch.randn(136, 256) * 256**-0.5).to(device)
    bias = torch.randn(136).to(device)
    x = make_x(tokens, 256, torch.float32, device)
    ids = torch.randint(-1, 3, (tokens,)).to(device)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        y = ops.multi_lora_forward(x, weight, bias, A, B, s, ids)
    assert y.dtype == torch.float32
    assert_rel_close(y, reference_by_slot(x, weight, bias, A, B, s, ids), torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_merge_in_an_autocast_region_is_unchanged(device):
    weight, _, lora_A, lora_B = make_params(64, 48, 8, torch.float32, torch.float32, device)
    expected = weight.double() + SCALING * lora_B.double() @ lora_A.double()
    merged = weight.clone()
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        ops.merge_(merged, lora_A, lora_B, SCALING)
    assert_rel_close(merged, expected, torch.float32)


@pytest.mark.parametrize("tokens", [3, 40, 600])
@pytest.mark.parametrize("device", DEVICES)
def test_lora_linear_follows_autocast_like_the_layer(device, tokens):
    """ops.lora_linear in an autocast region: y in the autocast dtype, the same bits as LoRALinear's autocast path on
    the same parameters (float32 adapters kept), gradients reaching the float32 adapters, and near the float64
    reference of the rounded operands."""
    layer = lora_ext.LoRALinear(256, 136, r=8, alpha=16, device=device)
    torch.nn.init.normal_(layer.lora_B, std=0.1)
    x = make_x(tokens, 256, torch.float32, device).requires_grad_(True)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        y_layer = layer(x)
        y = lora_ext.ops.lora_linear(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling)
    assert y.dtype == y_layer.dtype == torch.bfloat16
    assert torch.equal(y, y_layer)
    y.float().sum().backward()
    assert layer.lora_A.grad is not None and layer.lora_A.grad.dtype == torch.float32
    assert x.grad is not None and x.grad.dtype == torch.float32
    bf = torch.bfloat16
    ref = lora_reference(x.detach().to(bf), layer.weight.detach().to(bf), layer.bias.detach().to(bf),
                         layer.lora_A.detach(), layer.lora_B.detach(), layer.scaling)
    assert_rel_close(y, ref["y"], bf, name="y")
