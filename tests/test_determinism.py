"""Run-to-run determinism: the same inputs and seed give bit-identical outputs and gradients, on every device.

No lora_ext kernel uses floating-point atomics (docs/reliability.md, "Determinism"): the CUDA reductions
that split work across blocks (split-K in lora_gemm_launch.cuh, the token splits of lora_token_reduce*.cuh)
write float32 partials that are summed in a fixed order, and the CPU path is ATen BLAS plus elementwise ops.
So repeated calls must agree bit for bit, with dropout too (the mask is a pure function of the seed), and
torch.use_deterministic_algorithms(True) must neither raise on our operators nor change their results.

The shapes include ones that take the CUDA split-K / token-split paths (many tokens, few output tiles) and
the tensor-core paths (16-bit x, r % 8 == 0, >= 512 tokens); on the CPU they are just more shapes.
"""

import pytest
import torch

import lora_ext
from conftest import (
    DEVICE_DTYPES,
    DEVICES,
    assert_bit_identical,
    make_params,
    make_x,
    seed_tensor,
)

ops = torch.ops.lora_ext

REPEATS = 3

# (tokens, in_features, out_features, rank) per device: on CUDA, "split_tokens" takes the split-K and
# token-split reductions and the tensor-core paths; on the CPU (16-bit matmuls are slow there) it is smaller.
_SHAPES = {
    "primes": {"cpu": (7, 13, 11, 3), "cuda": (7, 13, 11, 3)},
    "decode": {"cpu": (1, 64, 48, 8), "cuda": (1, 64, 48, 8)},
    "split_tokens": {"cpu": (130, 64, 40, 16), "cuda": (600, 256, 128, 16)},
    # CUDA: the one-pass dxa/dB kernel (lora_dy_pass.cuh): two column groups, many token splits
    "dy_pass": {"cpu": (40, 32, 24, 8), "cuda": (1100, 128, 1032, 16)},
}
SHAPES = list(_SHAPES)


def _inputs(device, dtype, adapter_dtype, shape, layout="contiguous"):
    if isinstance(shape, str):
        shape = _SHAPES[shape][device]
    tokens, in_f, out_f, rank = shape
    x = make_x(tokens, in_f, dtype, device, layout)
    weight, bias, lora_A, lora_B = make_params(in_f, out_f, rank, dtype, adapter_dtype, device)
    grad_y = torch.randn(tokens, out_f).to(device, dtype)
    return x, weight, bias, lora_A, lora_B, grad_y


def _ops_once(x, weight, bias, lora_A, lora_B, grad_y, scaling, p, seed):
    y, xa = ops.lora_forward(x, weight, bias, lora_A, lora_B, scaling, p, seed)
    grads = ops.lora_backward(grad_y, x, weight, lora_A, lora_B, xa, scaling, p, seed, True)
    return (y, xa, *grads)


def _autograd_once(x0, weight, bias, lora_A0, lora_B0, grad_y, scaling, p, seed):
    x = x0.detach().clone().requires_grad_(True)
    lora_A = lora_A0.detach().clone().requires_grad_(True)
    lora_B = lora_B0.detach().clone().requires_grad_(True)
    y = lora_ext.ops.lora_linear(x, weight, bias, lora_A, lora_B, scaling, p, seed)
    y.backward(grad_y)
    return (y.detach(), x.grad, lora_A.grad, lora_B.grad)


def _merge_once(weight0, lora_A, lora_B, scaling):
    weight = weight0.clone()
    ops.merge_(weight, lora_A, lora_B, scaling)
    merged = weight.clone()
    ops.unmerge_(weight, lora_A, lora_B, scaling)
    return (merged, weight)


def _assert_all_identical(runs, names):
    first = runs[0]
    for run in runs[1:]:
        for name, a, b in zip(names, first, run):
            assert_bit_identical(a, b, name=f"{name} (repeat)")


OP_NAMES = ("y", "xa", "grad_x", "grad_A", "grad_B")
AUTOGRAD_NAMES = ("y", "x.grad", "lora_A.grad", "lora_B.grad")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("device,dtype,adapter_dtype", DEVICE_DTYPES)
def test_ops_repeat_bitwise(device, dtype, adapter_dtype, dropout_p, shape):
    x, weight, bias, lora_A, lora_B, grad_y = _inputs(device, dtype, adapter_dtype, shape)
    seed = seed_tensor(1234, device) if dropout_p else None
    runs = [_ops_once(x, weight, bias, lora_A, lora_B, grad_y, 1.5, dropout_p, seed) for _ in range(REPEATS)]
    _assert_all_identical(runs, OP_NAMES)


@pytest.mark.parametrize("layout", ["transposed", "offset", "strided"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("device", DEVICES)
def test_lora_linear_autograd_repeat_bitwise(device, dropout_p, layout):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    x, weight, bias, lora_A, lora_B, grad_y = _inputs(device, dtype, dtype, (37, 64, 48, 8), layout)
    seed = seed_tensor(99, device) if dropout_p else None
    runs = [_autograd_once(x, weight, bias, lora_A, lora_B, grad_y, 2.0, dropout_p, seed) for _ in range(REPEATS)]
    _assert_all_identical(runs, AUTOGRAD_NAMES)


@pytest.mark.parametrize("device", DEVICES)
def test_lora_linear_manual_seed_repeats_drawn_dropout_seed(device):
    """With no explicit seed, lora_linear draws one from torch's generator: manual_seed makes it repeat."""
    x, weight, bias, lora_A, lora_B, grad_y = _inputs(device, torch.float32, torch.float32, (9, 32, 24, 4))
    runs = []
    for _ in range(2):
        torch.manual_seed(5)
        if device == "cuda":
            torch.cuda.manual_seed(5)
        runs.append(_autograd_once(x, weight, bias, lora_A, lora_B, grad_y, 2.0, 0.5, None))
    _assert_all_identical(runs, AUTOGRAD_NAMES)


@pytest.mark.parametrize("shape", [(48, 64, 8), (11, 13, 3), (256, 1024, 16)], ids=str)
@pytest.mark.parametrize("device,dtype,adapter_dtype", DEVICE_DTYPES)
def test_merge_repeat_bitwise(device, dtype, adapter_dtype, shape):
    out_f, in_f, rank = shape
    weight, _, lora_A, lora_B = make_params(in_f, out_f, rank, dtype, adapter_dtype, device, bias=False)
    runs = [_merge_once(weight, lora_A, lora_B, 0.7) for _ in range(REPEATS)]
    _assert_all_identical(runs, ("merged", "unmerged"))


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_keep_mask_repeat(device):
    seed = seed_tensor(2024, device)
    masks = [ops.dropout_keep_mask(seed, 65, 129, 0.4) for _ in range(REPEATS)]
    _assert_all_identical([(m,) for m in masks], ("mask",))


# ----------------------------------------------------------------------------
# torch.use_deterministic_algorithms(True)
# ----------------------------------------------------------------------------


@pytest.fixture
def deterministic_mode():
    """torch.use_deterministic_algorithms(True) (and NaN-filled torch.empty) inside the test, restored after."""
    was = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn_only)
        torch.utils.deterministic.fill_uninitialized_memory = fill


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("shape", ["primes", "split_tokens"])
@pytest.mark.parametrize("device,dtype,adapter_dtype", DEVICE_DTYPES)
def test_deterministic_algorithms_mode_same_bits(device, dtype, adapter_dtype, shape, dropout_p, request):
    """Our operators raise no 'nondeterministic' error in deterministic mode, and give the same bits as
    outside it: no kernel consults the flag, and the uninitialized-memory fill (NaN in every torch.empty)
    never reaches a result, so no kernel reads memory it has not written."""
    x, weight, bias, lora_A, lora_B, grad_y = _inputs(device, dtype, adapter_dtype, shape)
    seed = seed_tensor(7, device) if dropout_p else None
    _, in_f, out_f, rank = _SHAPES[shape][device]
    w_merge, _, a_merge, b_merge = make_params(in_f, out_f, rank, dtype, adapter_dtype, device, bias=False)

    def everything():
        return (
            *_ops_once(x, weight, bias, lora_A, lora_B, grad_y, 1.5, dropout_p, seed),
            *_autograd_once(x, weight, bias, lora_A, lora_B, grad_y, 1.5, dropout_p, seed),
            *_merge_once(w_merge, a_merge, b_merge, 0.7),
        )

    names = OP_NAMES + AUTOGRAD_NAMES + ("merged", "unmerged")
    reference = everything()
    request.getfixturevalue("deterministic_mode")
    assert torch.are_deterministic_algorithms_enabled()
    runs = [everything() for _ in range(2)]
    _assert_all_identical([reference, *runs], names)
