"""The Hopper shrink (csrc/cuda/lora_shrink_sm90.cu): x·Aᵀ in the forward and s·dy·B in the backward, streamed by the
copy engine through warpgroup MMAs, with dropout's mask drawn in shared memory. LORA_EXT_SHRINK_SM90=force takes it
at every size and rank (by default it serves calls with dropout from 4096 tokens), so that small shapes reach its
edges: one row tile and partial ones, one K block with 8 valid columns, K splits over clusters of 2, 4 and 8 blocks,
ranks 1–64 (K-contiguous A padded to 16, 32 or 64; B read as it lies, r % 8 == 0), float32 adapters, x with a row
pitch and an offset, dropout's mask at K tails and partial row tiles.

xa is checked against float64 sums of exactly the operands the kernel multiplies (A rounded to x's dtype), so only the
float32 summation may differ; y and the gradients against the float64 reference at the dtype's tolerance; the fused
GEMMs' rank-r operand, which the kernel writes itself, bit for bit against the separate rounding kernel's."""

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
KERNEL = "lora_shrink_sm90_kernel"

# (tokens, in_features, rank)
FORWARD_SHAPES = [  # from 65 tokens: fewer go to the decoding kernels
    pytest.param((65, 64, 16), id="65-tokens"),
    pytest.param((100, 72, 5), id="r5-K-72"),
    pytest.param((333, 8, 1), id="r1-K-8"),
    pytest.param((128, 4096, 16), id="2-tiles-4-splits"),
    pytest.param((200, 8192, 8), id="r8-8-splits"),
    pytest.param((100, 520, 24), id="r24-partial-tile"),
    pytest.param((1000, 4096, 64), id="r64-4-splits"),
    pytest.param((4099, 2048, 32), id="r32-2-splits-token-tail"),
    pytest.param((9000, 1024, 40), id="r40-no-split"),
]

DTYPES = [
    pytest.param(torch.bfloat16, torch.bfloat16, id="bf16"),
    pytest.param(torch.float16, torch.float16, id="f16"),
    pytest.param(torch.bfloat16, torch.float32, id="bf16-adapters_f32"),
]


@pytest.mark.parametrize("layout", ["contiguous", "pitched"])
@pytest.mark.parametrize("dtype,adapter_dtype", DTYPES)
@pytest.mark.parametrize("shape", FORWARD_SHAPES)
def test_forward_shrink(shape, dtype, adapter_dtype, layout, monkeypatch):
    tokens, in_features, rank = shape
    x = make_x(tokens, in_features, dtype, "cuda", layout)
    weight, bias, lora_A, lora_B = make_params(in_features, 96, rank, dtype, adapter_dtype, "cuda")
    forward = lambda: torch.ops.lora_ext.lora_forward(x, weight, bias, lora_A, lora_B, SCALING, 0.0, None)

    monkeypatch.setenv("LORA_EXT_SHRINK_SM90", "force")
    (y, xa), kernels = run_and_list_cuda_kernels(forward)
    assert any(KERNEL in name for name in kernels), f"the Hopper shrink did not run: {kernels}"
    again_y, again_xa = forward()
    assert_bit_identical(xa, again_xa, "xa, two calls")
    assert_bit_identical(y, again_y, "y, two calls")

    # xa: float64 sums of the products the kernel forms (A rounded to x's dtype).
    expected_xa = x.double() @ lora_A.to(dtype).double().t()
    error = (xa.double() - expected_xa).norm() / expected_xa.norm()
    assert error.item() <= 1e-5, f"xa: relative error {error.item():.2e}"
    reference = lora_reference(x, weight, bias, lora_A, lora_B, SCALING)
    assert_rel_close(y, reference["y"], dtype, adapter_dtype, name="y")

    monkeypatch.setenv("LORA_EXT_SHRINK_SM90", "0")
    (other_y, other_xa), kernels = run_and_list_cuda_kernels(forward)
    assert not any(KERNEL in name for name in kernels)
    # (below 512 tokens the other path keeps float32 adapters unrounded: it then differs by A's rounding)
    assert_rel_close(xa, other_xa.double(), torch.float32 if adapter_dtype == dtype else dtype,
                     name="xa against the other shrinks")


@pytest.mark.parametrize("dtype,adapter_dtype", DTYPES)
@pytest.mark.parametrize("shape", [(100, 256, 24), (1000, 4096, 64), (2100, 1024, 32), (1, 136, 8)],
                         ids=["r24", "r64-4-splits", "r32", "1-token-r8-K-136"])
def test_backward_dxa_from_b_as_it_lies(shape, dtype, adapter_dtype, monkeypatch):
    """s·dy·B with B (out × r) read as it lies (the N-major instantiation), at ranks above the one-pass dy kernel's 16
    (and r = 8 with that kernel off): the gradients against float64, the N-major kernel seen running."""
    tokens, out_features, rank = shape
    in_features = 264
    x = torch.randn(tokens, in_features, device="cuda").to(dtype)
    weight, bias, lora_A, lora_B = make_params(in_features, out_features, rank, dtype, adapter_dtype, "cuda")
    grad_y = torch.randn(tokens, out_features, device="cuda").to(dtype)
    monkeypatch.setenv("LORA_EXT_SHRINK_SM90", "force")
    monkeypatch.setenv("LORA_EXT_DY_PASS", "0")
    monkeypatch.setenv("LORA_EXT_CUBLAS_MIN_RANK", "1")  # Bᵀ stays a view, as above r = 16
    _, xa = torch.ops.lora_ext.lora_forward(x, weight, bias, lora_A, lora_B, SCALING, 0.0, None)
    backward = lambda: torch.ops.lora_ext.lora_backward(grad_y, x, weight, lora_A, lora_B, xa, SCALING, 0.0, None,
                                                        True)
    (grad_x, grad_A, grad_B), kernels = run_and_list_cuda_kernels(backward)
    assert any(KERNEL in name and ", true, false>" in name for name in kernels), f"B not read as it lies: {kernels}"

    reference = lora_reference(x, weight, bias, lora_A, lora_B, SCALING, grad_y=grad_y)
    assert_rel_close(grad_x, reference["grad_x"], dtype, adapter_dtype, name="dx")
    assert_rel_close(grad_A, reference["grad_A"], dtype, adapter_dtype, name="dA")
    assert_rel_close(grad_B, reference["grad_B"], dtype, adapter_dtype, name="dB")


@pytest.mark.parametrize("rank", [16, 64])
def test_rank_operands_match_the_rounding_kernel(rank, monkeypatch):
    """The fused GEMMs' rank-r operands (s·xa forward, dxa backward), written by the Hopper shrink as it stores its
    float32 sums, give y and dx bit for bit as the separate multiply-and-round kernel does (LORA_EXT_ROUNDED_COPY=0)."""
    tokens, in_features, out_features = 300, 512, 520
    dtype = torch.bfloat16
    x = torch.randn(tokens, in_features, device="cuda").to(dtype)
    weight, bias, lora_A, lora_B = make_params(in_features, out_features, rank, dtype, dtype, "cuda")
    grad_y = torch.randn(tokens, out_features, device="cuda").to(dtype)
    monkeypatch.setenv("LORA_EXT_SHRINK_SM90", "force")
    monkeypatch.setenv("LORA_EXT_FUSED_GEMM", "force")
    monkeypatch.setenv("LORA_EXT_DY_PASS", "0")

    def step():
        y, xa = torch.ops.lora_ext.lora_forward(x, weight, bias, lora_A, lora_B, SCALING, 0.0, None)
        grad_x, grad_A, grad_B = torch.ops.lora_ext.lora_backward(grad_y, x, weight, lora_A, lora_B, xa, SCALING, 0.0,
                                                                  None, True)
        return y, grad_x, grad_A, grad_B

    (y, grad_x, grad_A, grad_B), kernels = run_and_list_cuda_kernels(step)
    assert sum(KERNEL in name for name in kernels) == 2, kernels
    monkeypatch.setenv("LORA_EXT_ROUNDED_COPY", "0")
    separate = step()
    for name, ours, theirs in zip(("y", "dx", "dA", "dB"), (y, grad_x, grad_A, grad_B), separate):
        assert_bit_identical(ours, theirs, name)
    reference = lora_reference(x, weight, bias, lora_A, lora_B, SCALING, grad_y=grad_y)
    assert_rel_close(y, reference["y"], dtype, name="y")
    assert_rel_close(grad_x, reference["grad_x"], dtype, name="dx")


def test_declines_what_the_copy_engine_cannot_read(monkeypatch):
    """Rows not 16-byte aligned (a pitch of in + 5): the other shrinks serve, with the same result."""
    tokens, in_features, rank = 200, 128, 16
    big = torch.randn(tokens, in_features + 5, device="cuda").to(torch.bfloat16)
    x = big[:, :in_features]
    weight, bias, lora_A, lora_B = make_params(in_features, 64, rank, torch.bfloat16, torch.bfloat16, "cuda")
    monkeypatch.setenv("LORA_EXT_SHRINK_SM90", "force")
    (y, xa), kernels = run_and_list_cuda_kernels(
        lambda: torch.ops.lora_ext.lora_forward(x, weight, bias, lora_A, lora_B, SCALING, 0.0, None))
    assert not any(KERNEL in name for name in kernels)
    expected_xa = x.double() @ lora_A.double().t()
    assert_rel_close(xa, expected_xa, torch.float32, name="xa")


DROPOUT_SHAPES = [
    pytest.param((100, 72, 5), id="r5-K-72"),
    pytest.param((333, 8, 16), id="K-8"),
    pytest.param((200, 8192, 8), id="r8-8-splits"),
    pytest.param((1000, 4096, 64), id="r64-4-splits"),
    pytest.param((4099, 520, 32), id="r32-token-tail-K-tail"),
]


@pytest.mark.parametrize("stages", [None, "10", "13"], ids=["default-stages", "stages-10", "stages-13"])
@pytest.mark.parametrize("dtype,adapter_dtype", DTYPES)
@pytest.mark.parametrize("shape", DROPOUT_SHAPES)
def test_forward_shrink_with_dropout(shape, dtype, adapter_dtype, stages, monkeypatch):
    """xa = dropout(x)·Aᵀ with the mask that dropout_keep_mask reports for the seed (the one the backward redraws):
    against float64 sums of the kept products, against the float64 reference for y, and the same mask as the other
    shrinks draw (their xa agrees)."""
    import lora_ext

    tokens, in_features, rank = shape
    p = 0.1
    x = torch.randn(tokens, in_features, device="cuda").to(dtype)
    weight, bias, lora_A, lora_B = make_params(in_features, 96, rank, dtype, adapter_dtype, "cuda")
    seed = torch.tensor([1234567], dtype=torch.int64, device="cuda")
    forward = lambda: torch.ops.lora_ext.lora_forward(x, weight, bias, lora_A, lora_B, SCALING, p, seed)

    monkeypatch.setenv("LORA_EXT_SHRINK_SM90", "force")
    if stages is not None:
        # Stage counts that are not a multiple of the four consumer warpgroups: rounded down by the launcher (a stage
        # passing between warpgroups would break the barriers' phases).
        monkeypatch.setenv("LORA_EXT_SHRINK_SM90_STAGES", stages)
    (y, xa), kernels = run_and_list_cuda_kernels(forward)
    assert any(KERNEL in name and ", false, true>" in name for name in kernels), f"no dropout variant: {kernels}"
    again_y, again_xa = forward()
    assert_bit_identical(xa, again_xa, "xa, two calls")

    keep = lora_ext.ops.dropout_keep_mask(seed, tokens, in_features, p)
    kept = x.double() * keep.double() * lora_ext.ops.dropout_keep_scale(p)
    expected_xa = kept @ lora_A.to(dtype).double().t()
    error = (xa.double() - expected_xa).norm() / expected_xa.norm()
    assert error.item() <= 1e-5, f"xa: relative error {error.item():.2e}"
    reference = lora_reference(x, weight, bias, lora_A, lora_B, SCALING, dropout_p=p, keep=keep)
    assert_rel_close(y, reference["y"], dtype, adapter_dtype, name="y")

    monkeypatch.setenv("LORA_EXT_SHRINK_SM90", "0")
    other_y, other_xa = forward()
    assert_rel_close(xa, other_xa.double(), torch.float32 if adapter_dtype == dtype else dtype,
                     name="xa against the other shrinks")


def test_training_step_with_dropout_matches_the_reference(monkeypatch):
    """A whole training step with dropout where the Hopper shrink serves by default (≥ 4096 tokens): the backward
    redraws the forward's mask (its dA and dx agree with the float64 reference built on dropout_keep_mask)."""
    import lora_ext

    monkeypatch.delenv("LORA_EXT_SHRINK_SM90", raising=False)
    tokens, in_features, out_features, rank, p = 4096, 512, 640, 16, 0.05
    dtype = torch.bfloat16
    x = torch.randn(tokens, in_features, device="cuda").to(dtype)
    weight, bias, lora_A, lora_B = make_params(in_features, out_features, rank, dtype, dtype, "cuda")
    grad_y = torch.randn(tokens, out_features, device="cuda").to(dtype)
    seed = torch.tensor([98765], dtype=torch.int64, device="cuda")

    def step():
        y, xa = torch.ops.lora_ext.lora_forward(x, weight, bias, lora_A, lora_B, SCALING, p, seed)
        grads = torch.ops.lora_ext.lora_backward(grad_y, x, weight, lora_A, lora_B, xa, SCALING, p, seed, True)
        return (y, *grads)

    (y, grad_x, grad_A, grad_B), kernels = run_and_list_cuda_kernels(step)
    assert any(KERNEL in name for name in kernels), kernels
    keep = lora_ext.ops.dropout_keep_mask(seed, tokens, in_features, p)
    reference = lora_reference(x, weight, bias, lora_A, lora_B, SCALING, dropout_p=p, keep=keep, grad_y=grad_y)
    for name, ours in (("y", y), ("grad_x", grad_x), ("grad_A", grad_A), ("grad_B", grad_B)):
        assert_rel_close(ours, reference[name], dtype, name=name)
