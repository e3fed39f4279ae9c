"""The raw operators inside an autocast region compute in their inputs' dtypes, as their schemas and fake
implementations say (csrc/no_autocast.h). Autocast reaches the C++ implementations through a fallthrough with its
state still set; before the guard, their own base product (at::linear) and the CPU path's products came back in
bfloat16 for float32 inputs: a y of the wrong dtype on the CPU, and on CUDA a bfloat16 y that the kernels then wrote
as float32, past its end. LoRALinear applies autocast itself (test_model_features.py covers it)."""

import pytest
import torch

from conftest import DEVICES, assert_rel_close, lora_reference, make_params, make_x
from test_multi_adapter import make_stack, reference_by_slot
from test_ops import SCALING

ops = torch.ops.lora_ext

# (tokens, in, out, r): decoding sizes (on Hopper the one-launch GEMV, then the cluster kernel from 17 tokens) and
# enough tokens for the tensor-core kernels.
SHAPES = [(1, 256, 136, 16), (40, 256, 136, 16), (600, 256, 136, 24)]


@pytest.fixture(autouse=True)
def _float32_matmuls():
    saved = torch.backends.cuda.matmul.allow_tf32  # (monkeypatch cannot patch this module's attributes)
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


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
