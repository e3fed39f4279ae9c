"""The Hopper dA reduction (csrc/cuda/lora_token_reduce_sm90.cu), with dropout and without:
dAᵀ = Σ_t keep(x)ᵀ · (keep_scale·dxa), x and the dx GEMM's operand streamed by the copy engine through warpgroup MMAs
(both read as they lie: x's tile the MN-major A operand, dxa's the N-major B), the mask drawn in shared memory and its
keep bytes written for the fused dx GEMM. LORA_EXT_TOKEN_REDUCE_SM90=force takes it at every size and rank (unset or
=auto: dropout, r 17–64, from 4096 tokens) and LORA_EXT_FUSED_GEMM=force the fused dx GEMM that reads
the keep bytes, so small shapes reach the edges: one column
group and partial ones (a last group of 8 columns), partial token blocks, token splits, the 12-stage ring wrapping
(26 token blocks per block), ranks 1–64, float32 adapters, x with a row pitch and an offset.

On small-integer inputs (every sum exact) dA and dx equal the float64 reference bit for bit; on random inputs the
gradients are checked against the float64 reference with the mask dropout_keep_mask reports for the seed, dx bit for
bit against the tensor-core reduction's path (LORA_EXT_TOKEN_REDUCE_SM90=0), which checks the keep bytes the fused GEMM
read, and every result bit for bit across two calls."""

import zlib

import pytest
import torch

from conftest import (assert_bit_identical, assert_rel_close, fused_gemm_serves, lora_reference, make_params,
                      make_x, requires_cuda, run_and_list_cuda_kernels)

pytestmark = [
    requires_cuda,
    pytest.mark.skipif(not (torch.cuda.is_available() and fused_gemm_serves()),
                       reason="needs an H100/H200 and an sm_90a build"),
]

SCALING = 0.75
P = 0.1
KERNEL = "lora_token_reduce_sm90_kernel"

# (tokens, in_features, out_features, rank)
SHAPES = [
    pytest.param((65, 64, 96, 16), id="one-column-group-token-tail"),
    pytest.param((300, 8, 96, 5), id="in-8-r5"),
    pytest.param((1000, 4096, 96, 64), id="64-column-groups-r64-splits"),
    pytest.param((4099, 520, 136, 32), id="column-tail-8-token-tail-r32"),
    pytest.param((200, 1032, 264, 1), id="r1"),
    pytest.param((2048, 256, 128, 8), id="r8-many-splits"),
    pytest.param((2000, 9216, 96, 40), id="144-column-groups"),
    # one column group, 8 splits of 26 token blocks: the 12-stage ring wraps twice (as in a training step's 64)
    pytest.param((13000, 64, 96, 32), id="ring-wraps-26-token-blocks"),
]

DTYPES = [
    pytest.param(torch.bfloat16, torch.bfloat16, id="bf16"),
    pytest.param(torch.float16, torch.float16, id="f16"),
    pytest.param(torch.bfloat16, torch.float32, id="bf16-adapters_f32"),
]


def _backward(x, weight, bias, lora_A, lora_B, grad_y, seed):
    _, xa = torch.ops.lora_ext.lora_forward(x, weight, bias, lora_A, lora_B, SCALING, P, seed)
    return torch.ops.lora_ext.lora_backward(grad_y, x, weight, lora_A, lora_B, xa, SCALING, P, seed, True)


def _seed_of(*case):
    return torch.tensor([zlib.crc32(repr(case).encode())], dtype=torch.int64, device="cuda")


def _small_integers(shape, low, high, dtype):
    return torch.randint(low, high + 1, shape, device="cuda").to(dtype)


EXACT_SHAPES = [
    pytest.param((65, 64, 32, 16), id="one-column-group-token-tail"),
    pytest.param((4099, 520, 32, 32), id="column-tail-8-token-tail-r32"),
    pytest.param((2000, 9216, 32, 40), id="144-column-groups"),
    pytest.param((700, 1024, 32, 64), id="r64"),
    pytest.param((13000, 64, 32, 32), id="ring-wraps-26-token-blocks"),
]


@pytest.mark.parametrize("p", [0.5, 0.0], ids=["dropout", "no-dropout"])
@pytest.mark.parametrize("dtype,adapter_dtype", DTYPES)
@pytest.mark.parametrize("shape", EXACT_SHAPES)
def test_exact_on_integer_inputs(shape, dtype, adapter_dtype, p, monkeypatch):
    """Small integers in x, dy, W, A and B and p = 0.5 (keep scale 2): every product and float32 sum in dA and dx is
    exact, so both equal the float64 reference rounded once, bit for bit. A wrong mask element, keep byte, tile or
    partial sum anywhere shows."""
    import lora_ext

    tokens, in_features, out_features, rank = shape
    if p == 0.0 and tokens < 512:
        pytest.skip("without dropout the kernel is reached from 512 tokens (through the path it shares with cuBLAS)")
    x = _small_integers((tokens, in_features), -2, 2, dtype)
    weight = _small_integers((out_features, in_features), -1, 1, dtype)
    lora_A = _small_integers((rank, in_features), -1, 1, adapter_dtype)
    lora_B = _small_integers((out_features, rank), -1, 1, adapter_dtype)
    grad_y = _small_integers((tokens, out_features), -2, 2, dtype)
    seed = _seed_of(shape, dtype, adapter_dtype, "exact")
    monkeypatch.setenv("LORA_EXT_FUSED_GEMM", "force")
    monkeypatch.setenv("LORA_EXT_TOKEN_REDUCE_SM90", "force")
    if p == 0.0:
        monkeypatch.setenv("LORA_EXT_CUBLAS_MIN_RANK", "1")  # the fused operand path that the kernel shares with cuBLAS
    _, xa = torch.ops.lora_ext.lora_forward(x, weight, None, lora_A, lora_B, SCALING, p, seed if p else None)
    step = lambda: torch.ops.lora_ext.lora_backward(grad_y, x, weight, lora_A, lora_B, xa, SCALING, p,
                                                    seed if p else None, True)
    (grad_x, grad_A, _), kernels = run_and_list_cuda_kernels(step)
    variant = ", true>" if p else ", false>"
    assert any(KERNEL in name and variant in name for name in kernels), kernels
    keep = lora_ext.ops.dropout_keep_mask(seed, tokens, in_features, p) if p else None
    reference = lora_reference(x, weight, None, lora_A, lora_B, SCALING, p, keep, grad_y)
    assert_bit_identical(grad_A, reference["grad_A"].to(adapter_dtype).cuda(), "dA")
    assert_bit_identical(grad_x, reference["grad_x"].to(dtype).cuda(), "dx")


@pytest.mark.parametrize("layout", ["contiguous", "pitched"])
@pytest.mark.parametrize("dtype,adapter_dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_dropout_gradients(shape, dtype, adapter_dtype, layout, monkeypatch):
    import lora_ext

    tokens, in_features, out_features, rank = shape
    x = make_x(tokens, in_features, dtype, "cuda", layout)
    weight, bias, lora_A, lora_B = make_params(in_features, out_features, rank, dtype, adapter_dtype, "cuda")
    grad_y = torch.randn(tokens, out_features, device="cuda").to(dtype)
    # A seed of its own per case, so that keep bytes a case leaves unwritten cannot be found right in memory an earlier
    # case freed.
    seed = _seed_of(shape, dtype, adapter_dtype, layout)
    monkeypatch.setenv("LORA_EXT_FUSED_GEMM", "force")
    step = lambda: _backward(x, weight, bias, lora_A, lora_B, grad_y, seed)

    monkeypatch.setenv("LORA_EXT_TOKEN_REDUCE_SM90", "force")
    (grad_x, grad_A, grad_B), kernels = run_and_list_cuda_kernels(step)
    assert any(KERNEL in name for name in kernels), f"the Hopper token reduction did not run: {kernels}"
    for name, first, second in zip(("dx", "dA", "dB"), (grad_x, grad_A, grad_B), step()):
        assert_bit_identical(first, second, f"{name}, two calls")

    keep = lora_ext.ops.dropout_keep_mask(seed, tokens, in_features, P)
    reference = lora_reference(x, weight, bias, lora_A, lora_B, SCALING, P, keep, grad_y)
    assert_rel_close(grad_x, reference["grad_x"], dtype, adapter_dtype, name="dx")
    assert_rel_close(grad_A, reference["grad_A"], dtype, adapter_dtype, name="dA")
    assert_rel_close(grad_B, reference["grad_B"], dtype, adapter_dtype, name="dB")

    monkeypatch.setenv("LORA_EXT_TOKEN_REDUCE_SM90", "0")
    (other_x, other_A, other_B), kernels = run_and_list_cuda_kernels(step)
    assert not any(KERNEL in name for name in kernels)
    # The fused dx GEMM read the keep bytes this kernel wrote: the same bytes as the tensor-core reduction's.
    assert_bit_identical(grad_x, other_x, "dx against the tensor-core reduction's path")
    assert_bit_identical(grad_B, other_B, "dB against the tensor-core reduction's path")
    assert_rel_close(grad_A, other_A.double(), dtype, adapter_dtype, name="dA against the tensor-core reduction")


@pytest.mark.parametrize("setting", [None, "auto", "0"], ids=["unset", "auto", "off"])
@pytest.mark.parametrize("rank,dropout_p,tokens,pays", [
    (32, 0.05, 4096, True), (32, 0.05, 4095, False), (16, 0.05, 4096, False), (32, 0.0, 4096, False)],
    ids=["r32-4096", "r32-4095", "r16-4096", "r32-no-dropout"])
def test_routing(setting, rank, dropout_p, tokens, pays, monkeypatch):
    """Unset or =auto, the switch takes the Hopper reduction where it pays, with dropout at ranks 17–64 from 4096 tokens
    (not at r ≤ 16, below 4096 tokens or without dropout); =0 never takes it.
    The gradients match the other path: dx and dB bit for bit, dA within rounding."""
    weight, bias, lora_A, lora_B = make_params(256, 512, rank, torch.bfloat16, torch.bfloat16, "cuda")
    seed = torch.tensor([42 + tokens], dtype=torch.int64, device="cuda") if dropout_p else None
    monkeypatch.setenv("LORA_EXT_FUSED_GEMM", "force")
    x = torch.randn(tokens, 256, device="cuda").to(torch.bfloat16)
    grad_y = torch.randn(tokens, 512, device="cuda").to(torch.bfloat16)

    def step():
        _, xa = torch.ops.lora_ext.lora_forward(x, weight, bias, lora_A, lora_B, SCALING, dropout_p, seed)
        return torch.ops.lora_ext.lora_backward(grad_y, x, weight, lora_A, lora_B, xa, SCALING, dropout_p, seed, True)

    if setting is None:
        monkeypatch.delenv("LORA_EXT_TOKEN_REDUCE_SM90", raising=False)
    else:
        monkeypatch.setenv("LORA_EXT_TOKEN_REDUCE_SM90", setting)
    (grad_x, grad_A, grad_B), kernels = run_and_list_cuda_kernels(step)
    assert any(KERNEL in name for name in kernels) == (pays and setting != "0"), kernels
    monkeypatch.setenv("LORA_EXT_TOKEN_REDUCE_SM90", "0")
    other_x, other_A, other_B = step()
    assert_bit_identical(grad_x, other_x, "dx")
    assert_bit_identical(grad_B, other_B, "dB")
    assert_rel_close(grad_A, other_A.double(), torch.bfloat16, name="dA")


def test_declines_what_the_copy_engine_cannot_read(monkeypatch):
    """x's rows not 16-byte aligned (a pitch of in + 4): the tensor-core reduction serves, with the same result."""
    import lora_ext

    tokens, in_features, out_features, rank = 300, 128, 96, 16
    x = torch.randn(tokens, in_features + 4, device="cuda").to(torch.bfloat16)[:, :in_features]
    weight, bias, lora_A, lora_B = make_params(in_features, out_features, rank, torch.bfloat16, torch.bfloat16, "cuda")
    grad_y = torch.randn(tokens, out_features, device="cuda").to(torch.bfloat16)
    seed = torch.tensor([5], dtype=torch.int64, device="cuda")
    monkeypatch.setenv("LORA_EXT_FUSED_GEMM", "force")
    monkeypatch.setenv("LORA_EXT_TOKEN_REDUCE_SM90", "force")
    (grad_x, grad_A, grad_B), kernels = run_and_list_cuda_kernels(
        lambda: _backward(x, weight, bias, lora_A, lora_B, grad_y, seed))
    assert not any(KERNEL in name for name in kernels)
    keep = lora_ext.ops.dropout_keep_mask(seed, tokens, in_features, P)
    reference = lora_reference(x, weight, bias, lora_A, lora_B, SCALING, P, keep, grad_y)
    assert_rel_close(grad_A, reference["grad_A"], torch.bfloat16, name="dA")
    assert_rel_close(grad_x, reference["grad_x"], torch.bfloat16, name="dx")
