"""The backward's one-pass dxa/dB kernel on tensor cores (csrc/cuda/lora_dy_pass.cuh), at every width it can take
(LORA_EXT_DY_PASS=force lifts the backward's lower limit of 1024 columns): column groups of 512 with partial last
groups and tiles, token splits of one and of two 128-token steps with partial last steps, ranks 1–16 (16-byte and
element-wise rows of xa and B), float32 adapters, dy rows with a stride, B as a view.

dB = s·dyᵀ·xa is checked against float64 sums of exactly the operands the kernel multiplies (xa rounded to dy's
dtype), so only the float32 summation is allowed to differ; dxa enters dA = dxaᵀ·x (rounded to x's dtype there), so dA
is checked against the float64 reference at the dtype's tolerance, and against the two-pass path."""

import pytest
import torch

from conftest import assert_bit_identical, assert_rel_close, make_params, make_x, requires_cuda

pytestmark = requires_cuda

SCALING = 0.75

# (tokens, out_features, rank)
SHAPES = [
    pytest.param((1030, 1160, 16), id="3-groups-last-of-136-columns"),
    pytest.param((700, 1032, 5), id="r5-last-tile-8-columns"),
    pytest.param((513, 4096, 16), id="8-groups-1-token-past-4-steps"),
    pytest.param((2000, 2056, 1), id="r1"),
    pytest.param((640, 11008, 12), id="mlp-width-r12"),
    pytest.param((520, 136, 8), id="one-partial-tile"),
    # A split takes ≥ tokens·groups / (2·SMs) tokens in 128-token steps: with 132 SMs (H100, H200) these two give
    # splits of 2 steps (both xa buffers, dxa written and cleared per step, dB summed over steps), the second with a
    # last group of one tile.
    pytest.param((5000, 4096, 16), id="2-steps-per-split"),
    pytest.param((12000, 1152, 7), id="2-steps-last-group-1-tile"),
]


def _backward(grad_y, x, weight, lora_A, lora_B, xa):
    _, grad_A, grad_B = torch.ops.lora_ext.lora_backward(grad_y, x, weight, lora_A, lora_B, xa, SCALING, 0.0, None,
                                                         False)
    return grad_A, grad_B


def _inputs(shape, dtype, adapter_dtype, in_features=64):
    tokens, out_features, rank = shape
    x = make_x(tokens, in_features, dtype, "cuda")
    weight, _, lora_A, lora_B = make_params(in_features, out_features, rank, dtype, adapter_dtype, "cuda")
    grad_y = torch.randn(tokens, out_features, device="cuda").to(dtype)
    xa = torch.randn(tokens, rank, device="cuda")  # float32, as the forward saves it
    return grad_y, x, weight, lora_A, lora_B, xa


def _check(grad_y, x, weight, lora_A, lora_B, xa, monkeypatch):
    dtype = grad_y.dtype
    monkeypatch.setenv("LORA_EXT_DY_PASS", "force")
    grad_A, grad_B = _backward(grad_y, x, weight, lora_A, lora_B, xa)
    again_A, again_B = _backward(grad_y, x, weight, lora_A, lora_B, xa)
    assert_bit_identical(grad_A, again_A, "dA, two calls")
    assert_bit_identical(grad_B, again_B, "dB, two calls")

    # dB: float64 sums of the products the kernel forms (dy, and xa rounded to dy's dtype), rounded once.
    dy64 = grad_y.double()
    expected_B = SCALING * dy64.t() @ xa.to(dtype).double()
    error = (grad_B.double() - expected_B).norm() / expected_B.norm()
    rounding = 2.0 ** -8 if lora_B.dtype == torch.bfloat16 else 2.0 ** -11 if lora_B.dtype == torch.float16 else 1e-6
    assert error.item() <= rounding, f"dB: relative error {error.item():.2e}"

    # dA = dxaᵀ·x with dxa = s·dy·B (B rounded to dy's dtype): the float64 reference at the dtype's tolerance.
    dxa = SCALING * dy64 @ lora_B.to(dtype).double()
    expected_A = dxa.t() @ x.double()
    assert_rel_close(grad_A, expected_A, dtype, lora_A.dtype, name="dA")

    # The two-pass path (the shrink and the token reduction) agrees.
    monkeypatch.setenv("LORA_EXT_DY_PASS", "0")
    two_pass_A, two_pass_B = _backward(grad_y, x, weight, lora_A, lora_B, xa)
    assert_rel_close(grad_B, two_pass_B.double(), dtype, lora_B.dtype, name="dB against two passes")
    assert_rel_close(grad_A, two_pass_A.double(), dtype, lora_A.dtype, name="dA against two passes")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    "dtype,adapter_dtype",
    [
        pytest.param(torch.bfloat16, torch.bfloat16, id="bf16"),
        pytest.param(torch.float16, torch.float16, id="f16"),
        pytest.param(torch.bfloat16, torch.float32, id="bf16-adapters_f32"),
        pytest.param(torch.float16, torch.float32, id="f16-adapters_f32"),
    ],
)
def test_dy_pass_against_float64(shape, dtype, adapter_dtype, monkeypatch):
    _check(*_inputs(shape, dtype, adapter_dtype), monkeypatch)


def test_dy_pass_strided_dy_and_b_view(monkeypatch):
    """dy rows 8 elements apart beyond its width (a column slice of a wider tensor), B a column slice whose rows
    are not 16-byte aligned (read rank by rank)."""
    grad_y, x, weight, lora_A, lora_B, xa = _inputs((777, 1544, 12), torch.bfloat16, torch.bfloat16)
    wide_dy = torch.randn(777, 1552, device="cuda").to(torch.bfloat16)
    wide_dy[:, :1544] = grad_y
    wide_B = torch.randn(1544, 15, device="cuda").to(torch.bfloat16)
    wide_B[:, 1:13] = lora_B
    _check(wide_dy[:, :1544], x, weight, lora_A, wide_B[:, 1:13], xa, monkeypatch)


def test_dy_pass_is_the_kernel_that_runs(monkeypatch):
    """At a routed shape the backward launches this kernel (not the shrink and the token reduction)."""
    monkeypatch.delenv("LORA_EXT_DY_PASS", raising=False)
    inputs = _inputs((1024, 2048, 16), torch.bfloat16, torch.bfloat16)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        _backward(*inputs)
        torch.cuda.synchronize()
    names = [event.name for event in prof.events() if event.device_type == torch.autograd.DeviceType.CUDA]
    assert any("lora_dy_pass_kernel" in name for name in names), names
