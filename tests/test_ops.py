"""Every operator against the float64 autograd reference.

Forward (y, xa), backward (grad_x, grad_A, grad_B), lora_linear through autograd
(any leading shape, optional dW/db), merge_/unmerge_, and gradcheck in float64.
"""

import pytest
import torch

import lora_ext
from conftest import (
    DEVICE_BASE_DTYPES,
    DEVICE_DTYPES,
    DEVICES,
    assert_rel_close,
    lora_reference,
    make_params,
    make_x,
    requires_cuda,
    seed_tensor,
    xa_dtype_for,
)

ops = torch.ops.lora_ext

# (tokens, in_features, out_features, rank)
SHAPES = [
    pytest.param((37, 64, 48, 8), id="typical"),
    pytest.param((1, 64, 48, 8), id="one_token"),
    pytest.param((7, 13, 11, 3), id="primes"),
    pytest.param((0, 16, 8, 4), id="zero_tokens"),
    pytest.param((5, 1, 8, 2), id="in1"),
    pytest.param((5, 16, 1, 2), id="out1"),
    pytest.param((9, 16, 12, 1), id="r1"),
    pytest.param((3, 40, 24, 256), id="r256"),
    pytest.param((65, 129, 67, 17), id="odd_tiles"),
]

LARGE_CUDA_SHAPES = [
    pytest.param((1000, 512, 384, 16), id="large_r16"),
    pytest.param((1000, 512, 384, 64), id="large_r64"),
]

LAYOUTS = ["transposed", "offset", "strided"]

DROPOUT_PS = [0.0, 0.3]

SCALING = 1.75


def _seed_for(dropout_p, device):
    return None if dropout_p == 0.0 else seed_tensor(20240611, device)


def _keep_for(seed, rows, cols, dropout_p):
    return None if seed is None else ops.dropout_keep_mask(seed, rows, cols, dropout_p)


def _check_forward(x, weight, bias, lora_A, lora_B, dropout_p):
    tokens, in_features = x.shape
    out_features, rank = lora_B.shape
    seed = _seed_for(dropout_p, x.device)
    y, xa = ops.lora_forward(x, weight, bias, lora_A, lora_B, SCALING, dropout_p, seed)

    assert y.dtype == x.dtype and y.device == x.device
    assert xa.dtype == xa_dtype_for(x.dtype) and xa.device == x.device
    assert y.shape == (tokens, out_features)
    assert xa.shape == (tokens, rank)

    keep = _keep_for(seed, tokens, in_features, dropout_p)
    ref = lora_reference(x, weight, bias, lora_A, lora_B, SCALING, dropout_p, keep)
    assert_rel_close(y, ref["y"], x.dtype, lora_A.dtype, name="y")
    assert_rel_close(xa, ref["xa"], x.dtype, lora_A.dtype, name="xa")
    return y, xa, seed, keep


def _check_backward(x, weight, bias, lora_A, lora_B, dropout_p):
    tokens, in_features = x.shape
    out_features = weight.shape[0]
    _, xa, seed, keep = _check_forward(x, weight, bias, lora_A, lora_B, dropout_p)
    grad_y = torch.randn(tokens, out_features, dtype=torch.float32).to(x.device, x.dtype)

    grad_x, grad_A, grad_B = ops.lora_backward(
        grad_y, x, weight, lora_A, lora_B, xa, SCALING, dropout_p, seed, True
    )
    assert grad_x.dtype == x.dtype and grad_x.device == x.device
    assert grad_A.dtype == lora_A.dtype and grad_B.dtype == lora_B.dtype

    ref = lora_reference(x, weight, bias, lora_A, lora_B, SCALING, dropout_p, keep, grad_y)
    assert_rel_close(grad_x, ref["grad_x"], x.dtype, lora_A.dtype, name="grad_x")
    assert_rel_close(grad_A, ref["grad_A"], x.dtype, lora_A.dtype, name="grad_A")
    assert_rel_close(grad_B, ref["grad_B"], x.dtype, lora_A.dtype, name="grad_B")

    # Without grad_x the adapter gradients are the same and grad_x is an empty placeholder.
    no_grad_x, grad_A2, grad_B2 = ops.lora_backward(
        grad_y, x, weight, lora_A, lora_B, xa, SCALING, dropout_p, seed, False
    )
    assert no_grad_x.shape == (0,)
    assert_rel_close(grad_A2, ref["grad_A"], x.dtype, lora_A.dtype, name="grad_A (no grad_x)")
    assert_rel_close(grad_B2, ref["grad_B"], x.dtype, lora_A.dtype, name="grad_B (no grad_x)")


# ----------------------------------------------------------------------------
# lora_forward / lora_backward
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("dropout_p", DROPOUT_PS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("device,dtype,adapter_dtype", DEVICE_DTYPES)
def test_forward(device, dtype, adapter_dtype, shape, bias, dropout_p):
    tokens, in_features, out_features, rank = shape
    x = make_x(tokens, in_features, dtype, device)
    params = make_params(in_features, out_features, rank, dtype, adapter_dtype, device, bias)
    _check_forward(x, *params, dropout_p)


@pytest.mark.parametrize("dropout_p", DROPOUT_PS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("device,dtype,adapter_dtype", DEVICE_DTYPES)
def test_backward(device, dtype, adapter_dtype, shape, bias, dropout_p):
    tokens, in_features, out_features, rank = shape
    x = make_x(tokens, in_features, dtype, device)
    params = make_params(in_features, out_features, rank, dtype, adapter_dtype, device, bias)
    _check_backward(x, *params, dropout_p)


@pytest.mark.parametrize("dropout_p", DROPOUT_PS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("device,dtype,adapter_dtype", DEVICE_DTYPES)
def test_forward_backward_non_contiguous_x(device, dtype, adapter_dtype, layout, dropout_p):
    tokens, in_features, out_features, rank = 37, 64, 48, 8
    x = make_x(tokens, in_features, dtype, device, layout)
    assert x.shape == (tokens, in_features)
    assert not x.is_contiguous()
    if layout == "offset":
        assert x.storage_offset() > 0
    params = make_params(in_features, out_features, rank, dtype, adapter_dtype, device)
    _check_backward(x, *params, dropout_p)


@pytest.mark.parametrize("dropout_p", DROPOUT_PS)
@pytest.mark.parametrize("shape", LARGE_CUDA_SHAPES)
@pytest.mark.parametrize(
    "dtype,adapter_dtype",
    [
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.bfloat16),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float16),
        (torch.float16, torch.float32),
    ],
    ids=["f32", "bf16", "bf16-adapters_f32", "f16", "f16-adapters_f32"],
)
@requires_cuda
def test_forward_backward_large_cuda(dtype, adapter_dtype, shape, dropout_p):
    tokens, in_features, out_features, rank = shape
    x = make_x(tokens, in_features, dtype, "cuda")
    params = make_params(in_features, out_features, rank, dtype, adapter_dtype, "cuda")
    _check_backward(x, *params, dropout_p)


# ----------------------------------------------------------------------------
# lora_linear: autograd, leading dimensions, dW/db
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("dropout_p", DROPOUT_PS)
@pytest.mark.parametrize("leading", [(), (6,), (2, 5), (3, 0), (2, 3, 4)], ids=str)
@pytest.mark.parametrize("device,dtype,adapter_dtype", DEVICE_DTYPES)
def test_lora_linear_autograd(device, dtype, adapter_dtype, leading, dropout_p):
    in_features, out_features, rank = 24, 20, 4
    x = torch.randn(*leading, in_features).to(device, dtype).requires_grad_(True)
    weight, bias, lora_A, lora_B = make_params(
        in_features, out_features, rank, dtype, adapter_dtype, device
    )
    lora_A.requires_grad_(True)
    lora_B.requires_grad_(True)
    rows = x[..., 0].numel()
    seed = None if dropout_p == 0.0 else lora_ext.ops.new_dropout_seed(device)

    y = lora_ext.ops.lora_linear(x, weight, bias, lora_A, lora_B, SCALING, dropout_p, seed)
    assert y.shape == (*leading, out_features) and y.dtype == dtype
    grad_y = torch.randn(y.shape).to(device, dtype)
    y.backward(grad_y)

    keep = None
    if seed is not None:
        keep = lora_ext.ops.dropout_keep_mask(seed, rows, in_features, dropout_p)
    ref = lora_reference(x, weight, bias, lora_A, lora_B, SCALING, dropout_p, keep, grad_y)
    assert_rel_close(y, ref["y"], dtype, adapter_dtype, name="y")
    assert_rel_close(x.grad, ref["grad_x"], dtype, adapter_dtype, name="x.grad")
    assert_rel_close(lora_A.grad, ref["grad_A"], dtype, adapter_dtype, name="lora_A.grad")
    assert_rel_close(lora_B.grad, ref["grad_B"], dtype, adapter_dtype, name="lora_B.grad")
    assert x.grad.dtype == dtype
    assert lora_A.grad.dtype == adapter_dtype and lora_B.grad.dtype == adapter_dtype
    # The frozen weight and bias get no gradient.
    assert weight.grad is None and bias.grad is None


@pytest.mark.parametrize("dropout_p", DROPOUT_PS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("device", DEVICES)
def test_lora_linear_non_contiguous_3d_x(device, layout, dropout_p):
    """A 3-D view that is not contiguous (permuted / sliced) goes through lora_linear."""
    in_features, out_features, rank = 24, 20, 4
    dtype = torch.float32
    base = make_x(2 * 7, in_features, dtype, device, layout)  # (14, in), not contiguous
    x = base.unflatten(0, (2, 7))
    x = x.transpose(0, 1)  # (7, 2, in): rows in a different order than memory
    assert not x.is_contiguous()
    x.requires_grad_(True)
    weight, bias, lora_A, lora_B = make_params(in_features, out_features, rank, dtype, dtype, device)
    lora_A.requires_grad_(True)
    lora_B.requires_grad_(True)
    seed = None if dropout_p == 0.0 else seed_tensor(99, device)

    y = lora_ext.ops.lora_linear(x, weight, bias, lora_A, lora_B, SCALING, dropout_p, seed)
    grad_y = torch.randn(y.shape).to(device, dtype)
    y.backward(grad_y)

    # Mask rows are the flattened (logical, row-major) token index of x's leading dims.
    keep = None
    if seed is not None:
        keep = lora_ext.ops.dropout_keep_mask(seed, 14, in_features, dropout_p)
    ref = lora_reference(x, weight, bias, lora_A, lora_B, SCALING, dropout_p, keep, grad_y)
    assert_rel_close(y, ref["y"], dtype, name="y")
    assert_rel_close(x.grad, ref["grad_x"], dtype, name="x.grad")
    assert_rel_close(lora_A.grad, ref["grad_A"], dtype, name="lora_A.grad")
    assert_rel_close(lora_B.grad, ref["grad_B"], dtype, name="lora_B.grad")


@pytest.mark.parametrize("dropout_p", DROPOUT_PS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("device,dtype", DEVICE_BASE_DTYPES)
def test_lora_linear_weight_and_bias_grads(device, dtype, bias, dropout_p):
    """dW and db are computed when someone turns requires_grad on for them."""
    in_features, out_features, rank = 24, 20, 4
    x = torch.randn(3, 5, in_features).to(device, dtype).requires_grad_(True)
    weight, bias_t, lora_A, lora_B = make_params(
        in_features, out_features, rank, dtype, dtype, device, bias
    )
    for t in (weight, bias_t, lora_A, lora_B):
        if t is not None:
            t.requires_grad_(True)
    seed = None if dropout_p == 0.0 else seed_tensor(7, device)

    y = lora_ext.ops.lora_linear(x, weight, bias_t, lora_A, lora_B, SCALING, dropout_p, seed)
    grad_y = torch.randn(y.shape).to(device, dtype)
    y.backward(grad_y)

    keep = None
    if seed is not None:
        keep = lora_ext.ops.dropout_keep_mask(seed, 15, in_features, dropout_p)
    ref = lora_reference(x, weight, bias_t, lora_A, lora_B, SCALING, dropout_p, keep, grad_y)
    assert weight.grad is not None, "weight.requires_grad is True but weight.grad is None"
    assert_rel_close(weight.grad, ref["grad_weight"], dtype, name="weight.grad")
    if bias:
        assert bias_t.grad is not None, "bias.requires_grad is True but bias.grad is None"
        assert_rel_close(bias_t.grad, ref["grad_bias"], dtype, name="bias.grad")
    assert_rel_close(x.grad, ref["grad_x"], dtype, name="x.grad")
    assert_rel_close(lora_A.grad, ref["grad_A"], dtype, name="lora_A.grad")
    assert_rel_close(lora_B.grad, ref["grad_B"], dtype, name="lora_B.grad")


@pytest.mark.parametrize("device,dtype,adapter_dtype", DEVICE_DTYPES)
def test_lora_linear_only_adapters_require_grad(device, dtype, adapter_dtype):
    """x without requires_grad: only lora_A and lora_B get gradients."""
    in_features, out_features, rank = 24, 20, 4
    x = torch.randn(4, 3, in_features).to(device, dtype)
    weight, bias, lora_A, lora_B = make_params(
        in_features, out_features, rank, dtype, adapter_dtype, device
    )
    lora_A.requires_grad_(True)
    lora_B.requires_grad_(True)
    y = lora_ext.ops.lora_linear(x, weight, bias, lora_A, lora_B, SCALING)
    grad_y = torch.randn(y.shape).to(device, dtype)
    y.backward(grad_y)
    ref = lora_reference(x, weight, bias, lora_A, lora_B, SCALING, grad_y=grad_y)
    assert x.grad is None and weight.grad is None and bias.grad is None
    assert_rel_close(lora_A.grad, ref["grad_A"], dtype, adapter_dtype, name="lora_A.grad")
    assert_rel_close(lora_B.grad, ref["grad_B"], dtype, adapter_dtype, name="lora_B.grad")


@pytest.mark.parametrize("dropout_p", DROPOUT_PS)
@pytest.mark.parametrize("with_base_grads", [False, True], ids=["adapters", "all"])
def test_gradcheck_float64(with_base_grads, dropout_p):
    """torch.autograd.gradcheck through lora_linear; a fixed seed keeps dropout deterministic."""
    in_features, out_features, rank = 5, 4, 3
    x = torch.randn(2, 3, in_features, dtype=torch.float64, requires_grad=True)
    weight, bias, lora_A, lora_B = make_params(
        in_features, out_features, rank, torch.float64, torch.float64, "cpu"
    )
    lora_A.requires_grad_(True)
    lora_B.requires_grad_(True)
    seed = None if dropout_p == 0.0 else seed_tensor(1234, "cpu")

    if with_base_grads:
        weight.requires_grad_(True)
        bias.requires_grad_(True)

        def fn(x, weight, bias, lora_A, lora_B):
            return lora_ext.ops.lora_linear(x, weight, bias, lora_A, lora_B, 0.8, dropout_p, seed)

        inputs = (x, weight, bias, lora_A, lora_B)
    else:

        def fn(x, lora_A, lora_B):
            return lora_ext.ops.lora_linear(x, weight, bias, lora_A, lora_B, 0.8, dropout_p, seed)

        inputs = (x, lora_A, lora_B)

    assert torch.autograd.gradcheck(fn, inputs)


# ----------------------------------------------------------------------------
# merge_ / unmerge_
# ----------------------------------------------------------------------------

MERGE_SHAPES = [
    pytest.param((48, 64, 8), id="typical"),
    pytest.param((11, 13, 3), id="primes"),
    pytest.param((1, 1, 1), id="ones"),
    pytest.param((24, 40, 256), id="r256"),
]


@pytest.mark.parametrize("shape", MERGE_SHAPES)
@pytest.mark.parametrize("device,dtype,adapter_dtype", DEVICE_DTYPES)
def test_merge_unmerge(device, dtype, adapter_dtype, shape):
    out_features, in_features, rank = shape
    weight, _, lora_A, lora_B = make_params(
        in_features, out_features, rank, dtype, adapter_dtype, device, bias=False
    )
    scaling = 0.6
    original = weight.clone()
    data_ptr = weight.data_ptr()
    delta = scaling * (lora_B.to("cpu", torch.float64) @ lora_A.to("cpu", torch.float64))

    assert ops.merge_(weight, lora_A, lora_B, scaling) is None
    assert weight.data_ptr() == data_ptr and weight.dtype == dtype
    assert_rel_close(weight, original.to("cpu", torch.float64) + delta, dtype, name="merged weight")
    merged = weight.clone()

    assert ops.unmerge_(weight, lora_A, lora_B, scaling) is None
    assert weight.data_ptr() == data_ptr
    assert_rel_close(weight, merged.to("cpu", torch.float64) - delta, dtype, name="unmerged weight")
    # The round trip brings back the original weight within the weight dtype's precision.
    assert_rel_close(weight, original, dtype, adapter_dtype, name="round-tripped weight")


@pytest.mark.parametrize("op_name", ["merge_", "unmerge_"])
@pytest.mark.parametrize(
    "device,dtype,adapter_dtype",
    [p for p in DEVICE_DTYPES if p.values[1] in (torch.bfloat16, torch.float16)],
)
def test_merge_rounds_once(device, dtype, adapter_dtype, op_name):
    """A half weight gets W +- s*B*A accumulated in float32 and rounded once.

    Rounding s*B*A to the weight dtype before adding would round twice and miss the
    correctly rounded value on a large share of elements; summing in float32 and
    rounding once agrees with the float64 value rounded once except on rare ties
    near a rounding boundary.
    """
    out_features, in_features, rank = 64, 96, 16
    weight, _, lora_A, lora_B = make_params(
        in_features, out_features, rank, dtype, adapter_dtype, device, bias=False
    )
    scaling = 1.3
    sign = 1.0 if op_name == "merge_" else -1.0
    exact = weight.to("cpu", torch.float64) + sign * scaling * (
        lora_B.to("cpu", torch.float64) @ lora_A.to("cpu", torch.float64)
    )
    expected = exact.to(dtype)
    getattr(ops, op_name)(weight, lora_A, lora_B, scaling)
    mismatched = (weight.cpu() != expected).float().mean().item()
    assert mismatched <= 0.01, f"{mismatched:.1%} of elements are not the once-rounded value"
    # And those that differ are off by no more than one unit in the last place
    # (1.5 ulp from the exact value; the ulp of a subnormal is eps * smallest_normal).
    finfo = torch.finfo(dtype)
    ulp = (finfo.eps * exact.abs()).clamp_min(finfo.eps * finfo.smallest_normal)
    assert ((weight.cpu().double() - exact).abs() <= 1.5 * ulp).all()
