"""The Hopper forward GEMM with the LoRA expand folded in (csrc/cuda/lora_gemm_sm90.cu): y = x·Wᵀ + b + (s·xa)·Bᵀ
as one GEMM over in + r, and the backward's dx = dy·W + keep ⊙ (s·dy·B)·A/(1 − p) by the same kernel over out + r.
It serves 16-bit x on compute capability 9.0 when the build carries sm_90a, on shapes where it pays (forward:
≥ 4096 tokens, out ≥ 2048 and in ≤ 4096, or ≤ 6144 for r > 16; dx: ≥ 1024 tokens, in ≥ 2048, out ≤ 11008;
LORA_EXT_FUSED_GEMM=force lifts that, as here; =0 turns it off). These shapes sit on its tile edges (tokens % 128,
in % 64, out % 256, r across the 64-wide K blocks). Each is checked against the float64 reference twice: the
general tolerance (test_ops' forward and backward checks) and a bound from its rounding, since the GEMM rounds y once:
‖y − ref‖/‖ref‖ ≤ 2u (u = 2⁻⁸ for bfloat16, 2⁻¹¹ for float16: one rounding of y, and at most one of the rank-r term
through s·xa in x's dtype). Then against the cuBLAS + expand path (LORA_EXT_FUSED_GEMM=0), which must agree within
the same bound."""

import pytest
import torch

import lora_ext
from conftest import (assert_bit_identical, capture_cuda_graph, fused_gemm_serves, lora_reference, make_params, make_x,
                      relative_error, requires_cuda, seed_tensor)
from test_ops import SCALING, _check_backward

pytestmark = requires_cuda

UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


# (tokens, in_features, out_features, rank)
FUSED_SHAPES = [
    pytest.param((1024, 512, 512, 16), id="aligned"),
    pytest.param((1031, 520, 264, 8), id="edges-everywhere"),
    pytest.param((1100, 256, 136, 24), id="r24-out136"),
    pytest.param((1024, 128, 512, 64), id="r64-one-block"),
    pytest.param((1153, 192, 256, 72), id="r72-two-blocks"),
    pytest.param((1280, 64, 8, 128), id="out8-r128"),
    pytest.param((2053, 1024, 1000, 12), id="r12-padded"),
    # 17 row pairs × 17 column tiles = 289 tiles of two: more than an H100's ~66 resident clusters, so each cluster
    # walks several tiles (stages and barrier phases carried across tiles, the producer running ahead into the next
    # tile during the epilogue, the staging buffer reused between tiles).
    pytest.param((4229, 136, 4104, 12), id="persistent-many-tiles"),
]

DTYPES = [
    pytest.param(torch.bfloat16, torch.bfloat16, id="bf16"),
    pytest.param(torch.bfloat16, torch.float32, id="bf16-adapters_f32"),
    pytest.param(torch.float16, torch.float16, id="f16"),
]


def _forward(monkeypatch, x, weight, bias, lora_A, lora_B, dropout_p, fused):
    seed = seed_tensor(1234, x.device) if dropout_p > 0 else None
    monkeypatch.setenv("LORA_EXT_FUSED_GEMM", "force" if fused else "0")  # force: these shapes are below its cutoff
    y, xa = torch.ops.lora_ext.lora_forward(x, weight, bias, lora_A, lora_B, SCALING, dropout_p, seed)
    keep = None if seed is None else torch.ops.lora_ext.dropout_keep_mask(seed, x.shape[0], x.shape[1], dropout_p)
    return y, xa, keep


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("shape", FUSED_SHAPES)
@pytest.mark.parametrize("dtype,adapter_dtype", DTYPES)
def test_fused_forward_within_one_rounding(monkeypatch, dtype, adapter_dtype, shape, bias, dropout_p):
    tokens, in_features, out_features, rank = shape
    x = make_x(tokens, in_features, dtype, "cuda")
    weight, bias_t, lora_A, lora_B = make_params(in_features, out_features, rank, dtype, adapter_dtype, "cuda", bias)
    y, xa, keep = _forward(monkeypatch, x, weight, bias_t, lora_A, lora_B, dropout_p, fused=True)
    ref = lora_reference(x, weight, bias_t, lora_A, lora_B, SCALING, dropout_p, keep)
    # float32 adapters are rounded to x's dtype on the way in (A by the shrink, B for the GEMM): two roundings more.
    bound = (2 if adapter_dtype == dtype else 4) * UNIT_ROUNDOFF[dtype]
    assert torch.isfinite(y).all()
    assert relative_error(y, ref["y"]) <= bound
    if adapter_dtype == dtype:  # float32 sums of exact products; float32 adapters are rounded to x's dtype first
        assert relative_error(xa, ref["xa"]) <= 1e-5

    y_unfused, xa_unfused, _ = _forward(monkeypatch, x, weight, bias_t, lora_A, lora_B, dropout_p, fused=False)
    assert torch.equal(xa, xa_unfused)  # the same shrink kernel feeds both
    assert relative_error(y, y_unfused) <= bound


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("shape", FUSED_SHAPES[:3])
@pytest.mark.parametrize("dtype,adapter_dtype", DTYPES)
def test_fused_forward_then_backward(monkeypatch, dtype, adapter_dtype, shape, dropout_p):
    monkeypatch.setenv("LORA_EXT_FUSED_GEMM", "force")
    tokens, in_features, out_features, rank = shape
    x = make_x(tokens, in_features, dtype, "cuda")
    _check_backward(x, *make_params(in_features, out_features, rank, dtype, adapter_dtype, "cuda"), dropout_p)


def _grad_x(monkeypatch, grad_y, x, weight, lora_A, lora_B, xa, dropout_p, fused):
    seed = seed_tensor(1234, x.device) if dropout_p > 0 else None  # the seed _forward drew xa with
    monkeypatch.setenv("LORA_EXT_FUSED_GEMM", "force" if fused else "0")  # force: these shapes are below its cutoff
    return torch.ops.lora_ext.lora_backward(grad_y, x, weight, lora_A, lora_B, xa, SCALING, dropout_p, seed, True)


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("grad_y_layout", ["contiguous", "offset"])
@pytest.mark.parametrize("shape", FUSED_SHAPES)
@pytest.mark.parametrize("dtype,adapter_dtype", DTYPES)
def test_fused_grad_x_within_one_rounding(monkeypatch, dtype, adapter_dtype, shape, grad_y_layout, dropout_p):
    """The backward's dx = dy·W + keep ⊙ ((s·dy·B)·A)/(1 − p) as the same GEMM with W read along its rows (K = out,
    N = in), the mask applied to the rank-r K blocks' partial sum in the accumulators: within one rounding of the
    float64 reference and of the cuBLAS + expand path; the adapter gradients are the same bits on both paths (they do
    not depend on how dx is made). An offset dy (rows 16-byte aligned only where out allows it) takes whichever path
    its layout allows, with the same answer. The persistent shape's clusters walk several tiles, so the keep bits
    drawn ahead for the next tile are checked there."""
    tokens, in_features, out_features, rank = shape
    x = make_x(tokens, in_features, dtype, "cuda")
    weight, bias, lora_A, lora_B = make_params(in_features, out_features, rank, dtype, adapter_dtype, "cuda")
    _, xa, keep = _forward(monkeypatch, x, weight, bias, lora_A, lora_B, dropout_p, fused=True)
    grad_y = make_x(tokens, out_features, dtype, "cuda", layout=grad_y_layout)
    grad_y_before = grad_y.clone()
    grad_x, grad_A, grad_B = _grad_x(monkeypatch, grad_y, x, weight, lora_A, lora_B, xa, dropout_p, fused=True)
    assert torch.equal(grad_y, grad_y_before)
    ref = lora_reference(x, weight, bias, lora_A, lora_B, SCALING, dropout_p, keep, grad_y=grad_y)
    # dxa = s·dy·B is rounded to dy's dtype for the GEMM, as s·xa is in the forward; float32 adapters are rounded too.
    bound = (2 if adapter_dtype == dtype else 4) * UNIT_ROUNDOFF[dtype]
    assert grad_x.shape == (tokens, in_features) and grad_x.dtype == dtype
    assert torch.isfinite(grad_x).all()
    assert relative_error(grad_x, ref["grad_x"]) <= bound

    unfused_x, unfused_A, unfused_B = _grad_x(monkeypatch, grad_y, x, weight, lora_A, lora_B, xa, dropout_p, fused=False)
    assert relative_error(grad_x, unfused_x) <= bound
    assert torch.equal(grad_A, unfused_A) and torch.equal(grad_B, unfused_B)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_fused_grad_x_dropout_when_the_reduction_cannot_draw_the_mask(monkeypatch, dtype):
    """The fused dx reads x's dropout mask as keep bytes that the dA reduction writes as it draws the mask. x at an
    8-byte offset sends that reduction to its general kernel, which writes none: a kernel of their own draws them,
    and dx is the same as the cuBLAS + expand path's, and within one rounding of the reference."""
    tokens, in_features, out_features, rank = 1031, 520, 264, 8
    wide = make_x(tokens, in_features + 8, dtype, "cuda")
    x = wide[:, 4 : 4 + in_features]  # rows 16-byte aligned in pitch, the start only 8
    assert x.data_ptr() % 16 == 8
    weight, bias, lora_A, lora_B = make_params(in_features, out_features, rank, dtype, dtype, "cuda")
    _, xa, keep = _forward(monkeypatch, x, weight, bias, lora_A, lora_B, 0.3, fused=True)
    grad_y = make_x(tokens, out_features, dtype, "cuda")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        grad_x, _, _ = _grad_x(monkeypatch, grad_y, x, weight, lora_A, lora_B, xa, 0.3, fused=True)
        torch.cuda.synchronize()
    kernels = [event.name for event in profile.events() if event.device_type == torch.autograd.DeviceType.CUDA]
    if fused_gemm_serves(x.device):
        assert any("dropout_keep_bytes_kernel" in name for name in kernels), kernels
        assert any("lora_gemm_sm90_kernel" in name for name in kernels), kernels
    unfused_x, _, _ = _grad_x(monkeypatch, grad_y, x, weight, lora_A, lora_B, xa, 0.3, fused=False)
    ref = lora_reference(x, weight, bias, lora_A, lora_B, SCALING, 0.3, keep, grad_y=grad_y)
    assert relative_error(grad_x, ref["grad_x"]) <= 2 * UNIT_ROUNDOFF[dtype]
    assert relative_error(grad_x, unfused_x) <= 2 * UNIT_ROUNDOFF[dtype]


@pytest.mark.parametrize(
    "settings,tokens,in_features,out_features,dropout_p,fused",
    [({"LORA_EXT_FUSED_GEMM": "force"}, 2048, 256, 512, 0.0, True),
     ({}, 8192, 2048, 4096, 0.0, True),
     ({}, 1024, 2048, 11008, 0.0, True),  # the smallest token count and the largest K it serves
     ({}, 2048, 2048, 11264, 0.0, False),  # K = out past the measured 11008
     ({}, 2048, 1024, 4096, 0.0, False),  # N = in under 2048
     ({}, 512, 2048, 4096, 0.0, False),  # too few tokens
     ({"LORA_EXT_FUSED_GEMM": "force"}, 2048, 256, 512, 0.1, True),  # the mask applied inside the GEMM
     ({"LORA_EXT_FUSED_GEMM": "force", "LORA_EXT_FUSED_GRAD_X": "0"}, 2048, 256, 512, 0.0, False),
     ({"LORA_EXT_FUSED_GEMM": "0"}, 8192, 2048, 4096, 0.0, False)],
    ids=["forced-small", "auto", "auto-edge", "auto-out11264", "auto-in1024", "auto-few-tokens", "dropout", "grad-x-off",
         "off"],
)
def test_which_path_serves_grad_x(monkeypatch, settings, tokens, in_features, out_features, dropout_p, fused):
    """dx comes from our GEMM (its W-along-K instantiation) and no cuBLAS GEMM where the fused path serves, and from
    cuBLAS (then the expand) where it does not."""
    if not fused_gemm_serves(torch.cuda.current_device()):
        pytest.skip("the fused GEMM needs compute capability 9.0 and an sm_90a build")
    for name in ("LORA_EXT_FUSED_GEMM", "LORA_EXT_FUSED_GRAD_X"):
        monkeypatch.delenv(name, raising=False)
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    x = make_x(tokens, in_features, torch.bfloat16, "cuda")
    weight, bias, lora_A, lora_B = make_params(in_features, out_features, 16, torch.bfloat16, torch.bfloat16, "cuda")
    seed = seed_tensor(7, x.device) if dropout_p > 0 else None
    _, xa = torch.ops.lora_ext.lora_forward(x, weight, bias, lora_A, lora_B, SCALING, dropout_p, seed)
    grad_y = make_x(tokens, out_features, torch.bfloat16, "cuda")
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        torch.ops.lora_ext.lora_backward(grad_y, x, weight, lora_A, lora_B, xa, SCALING, dropout_p, seed, True)
        torch.cuda.synchronize()
    kernels = [event.name for event in profile.events() if event.device_type == torch.autograd.DeviceType.CUDA]
    ours = any("lora_gemm_sm90_kernel" in name for name in kernels)
    cublas = any(("gemm" in name.lower() or "nvjet" in name.lower()) and "lora" not in name.lower() for name in kernels)
    assert (ours, cublas) == (fused, not fused), kernels


def test_fused_grad_x_in_a_cuda_graph(monkeypatch):
    """The backward with the fused dx captured in a CUDA graph and replayed on new dy: the eager result."""
    monkeypatch.setenv("LORA_EXT_FUSED_GEMM", "force")
    x = make_x(1031, 520, torch.bfloat16, "cuda")
    weight, bias, lora_A, lora_B = make_params(520, 264, 24, torch.bfloat16, torch.bfloat16, "cuda")
    _, xa = torch.ops.lora_ext.lora_forward(x, weight, bias, lora_A, lora_B, SCALING, 0.0, None)
    static_dy = make_x(1031, 264, torch.bfloat16, "cuda")

    def call(dy):
        return torch.ops.lora_ext.lora_backward(dy, x, weight, lora_A, lora_B, xa, SCALING, 0.0, None, True)

    graph, static_grads = capture_cuda_graph(lambda: call(static_dy))
    for _ in range(2):
        fresh = make_x(1031, 264, torch.bfloat16, "cuda")
        static_dy.copy_(fresh)
        graph.replay()
        torch.cuda.synchronize()
        eager = call(fresh)
        assert all(torch.equal(a, b) for a, b in zip(static_grads, eager))
        ref = lora_reference(x, weight, bias, lora_A, lora_B, SCALING, grad_y=fresh)
        assert relative_error(static_grads[0], ref["grad_x"]) <= 2 * UNIT_ROUNDOFF[torch.bfloat16]


@pytest.mark.parametrize(
    "setting,tokens,in_features,rank,fused",
    [("force", 2048, 256, 16, True), (None, 8192, 4096, 16, True), (None, 8192, 6144, 32, True),
     (None, 8192, 6144, 16, False), (None, 2048, 256, 32, False), ("0", 8192, 256, 32, False)],
    ids=["forced-small", "auto-in4096", "auto-in6144-r32", "auto-in6144-r16", "auto-few-tokens", "off"],
)
def test_which_path_serves(monkeypatch, setting, tokens, in_features, rank, fused):
    """On an H100/H200 with an sm_90a build, the profiler sees our GEMM and no cuBLAS GEMM where the fused path
    serves (≥ 4096 tokens, out ≥ 2048 and in ≤ 4096, or ≤ 6144 for r > 16, or forced), and cuBLAS where it does
    not. (The shrink's own cuBLAS product at r > 16 is kept out: LORA_EXT_CUBLAS_MIN_RANK.)"""
    if not fused_gemm_serves(torch.cuda.current_device()):
        pytest.skip("the fused GEMM needs compute capability 9.0 and an sm_90a build")
    monkeypatch.setenv("LORA_EXT_CUBLAS_MIN_RANK", "1000")
    if setting is None:
        monkeypatch.delenv("LORA_EXT_FUSED_GEMM", raising=False)
    else:
        monkeypatch.setenv("LORA_EXT_FUSED_GEMM", setting)
    x = make_x(tokens, in_features, torch.bfloat16, "cuda")
    params = make_params(in_features, 2048, rank, torch.bfloat16, torch.bfloat16, "cuda")  # out ≥ 2048: it pays
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        torch.ops.lora_ext.lora_forward(x, *params, SCALING, 0.0, None)
        torch.cuda.synchronize()
    kernels = [event.name for event in profile.events() if event.device_type == torch.autograd.DeviceType.CUDA]
    ours = any("lora_gemm_sm90_kernel" in name for name in kernels)
    cublas = any(("gemm" in name.lower() or "nvjet" in name.lower()) and "lora" not in name.lower() for name in kernels)
    assert (ours, cublas) == (fused, not fused), kernels


@pytest.mark.parametrize(
    "case", ["x-in-not-multiple-of-8", "x-transposed", "float32"], ids=lambda c: c
)
def test_unsuited_operands_take_the_general_path(monkeypatch, case):
    """Operands the copy engine cannot read (rows not 16-byte aligned, a column stride) or float32 go to cuBLAS and
    the expand kernel, with the same answer."""
    in_features = 516 if case == "x-in-not-multiple-of-8" else 512
    dtype = torch.float32 if case == "float32" else torch.bfloat16
    x = make_x(1024, in_features, dtype, "cuda", layout="transposed" if case == "x-transposed" else "contiguous")
    params = make_params(in_features, 256, 16, dtype, dtype, "cuda")
    y, _, _ = _forward(monkeypatch, x, *params, 0.0, fused=True)
    ref = lora_reference(x, *params, SCALING)
    assert relative_error(y, ref["y"]) <= (1e-5 if dtype == torch.float32 else 2 * UNIT_ROUNDOFF[dtype])


def test_fused_forward_in_a_cuda_graph_and_on_a_side_stream(monkeypatch):
    """Captured in a CUDA graph and replayed on new input (the tensor maps hold addresses: the graph's own), and run
    on a non-default stream: the same result as eager calls on the default stream."""
    monkeypatch.setenv("LORA_EXT_FUSED_GEMM", "force")
    weight, bias, lora_A, lora_B = make_params(520, 264, 24, torch.bfloat16, torch.bfloat16, "cuda")
    static_x = make_x(1031, 520, torch.bfloat16, "cuda")

    def call(x):
        return torch.ops.lora_ext.lora_forward(x, weight, bias, lora_A, lora_B, SCALING, 0.0, None)

    graph, (static_y, static_xa) = capture_cuda_graph(lambda: call(static_x))
    for _ in range(2):
        fresh = make_x(1031, 520, torch.bfloat16, "cuda")
        static_x.copy_(fresh)
        graph.replay()
        torch.cuda.synchronize()
        eager_y, eager_xa = call(fresh)
        assert torch.equal(static_y, eager_y) and torch.equal(static_xa, eager_xa)
        ref = lora_reference(fresh, weight, bias, lora_A, lora_B, SCALING)
        assert relative_error(static_y, ref["y"]) <= 2 * UNIT_ROUNDOFF[torch.bfloat16]


# (tokens, in_features, out_features, rank): a tail of tokens % 16 rows that the shrink's tensor-core kernel leaves to
# the general one (and so to finish_lora_gemm_operand), several dy-pass column groups, and r below 8.
ROUNDED_COPY_SHAPES = [
    pytest.param((1031, 520, 1032, 8), id="token-tail"),
    pytest.param((1024, 512, 2048, 16), id="aligned-r16"),
    pytest.param((2053, 1024, 1000, 5), id="r5-tail"),
]


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("shape", ROUNDED_COPY_SHAPES)
@pytest.mark.parametrize("dtype,adapter_dtype", DTYPES)
def test_rank_operands_written_by_their_kernels_match_the_separate_rounding(monkeypatch, dtype, adapter_dtype, shape,
                                                                            dropout_p):
    """The fused GEMMs' rank-r operands (s·xa in the forward, keep_scale·dxa for dx) are written by the shrink and the
    dy pass as they produce the float32 values (rounded_copy.cuh); LORA_EXT_ROUNDED_COPY=0 makes them with a separate
    multiply-and-round kernel instead. Both must give the same operands, so y, dx, dA and dB bit for bit."""
    if not fused_gemm_serves("cuda"):
        pytest.skip("the fused GEMMs do not serve on this GPU or build: no rank-r operand is made")
    monkeypatch.setenv("LORA_EXT_FUSED_GEMM", "force")
    monkeypatch.setenv("LORA_EXT_DY_PASS", "force")
    tokens, in_features, out_features, rank = shape
    x = make_x(tokens, in_features, dtype, "cuda")
    weight, bias, lora_A, lora_B = make_params(in_features, out_features, rank, dtype, adapter_dtype, "cuda")
    grad_y = torch.randn(tokens, out_features, device="cuda", dtype=dtype)
    seed = seed_tensor(99, x.device) if dropout_p > 0 else None
    results = {}
    for setting in ("1", "0"):
        monkeypatch.setenv("LORA_EXT_ROUNDED_COPY", setting)
        y, xa = torch.ops.lora_ext.lora_forward(x, weight, bias, lora_A, lora_B, SCALING, dropout_p, seed)
        grads = torch.ops.lora_ext.lora_backward(grad_y, x, weight, lora_A, lora_B, xa, SCALING, dropout_p, seed, True)
        results[setting] = (y, xa, *grads)
    for name, with_copy, without in zip(("y", "xa", "dx", "dA", "dB"), results["1"], results["0"]):
        assert_bit_identical(with_copy, without, name)


def test_rank_operand_copies_replace_the_rounding_kernels(monkeypatch):
    """Where the shrink's tensor-core kernel and the dy pass serve every row, a forward and backward on the fused GEMMs
    launch no elementwise kernel of PyTorch's (the multiply-and-round that LORA_EXT_ROUNDED_COPY=0 brings back)."""
    if not fused_gemm_serves("cuda"):
        pytest.skip("the fused GEMMs do not serve on this GPU or build")
    monkeypatch.setenv("LORA_EXT_FUSED_GEMM", "force")
    monkeypatch.setenv("LORA_EXT_DY_PASS", "force")
    x = make_x(1024, 512, torch.bfloat16, "cuda")
    weight, bias, lora_A, lora_B = make_params(512, 1024, 16, torch.bfloat16, torch.bfloat16, "cuda")
    grad_y = torch.randn(1024, 1024, device="cuda", dtype=torch.bfloat16)

    def elementwise_kernels(setting):
        monkeypatch.setenv("LORA_EXT_ROUNDED_COPY", setting)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            y, xa = torch.ops.lora_ext.lora_forward(x, weight, bias, lora_A, lora_B, SCALING, 0.0, None)
            torch.ops.lora_ext.lora_backward(grad_y, x, weight, lora_A, lora_B, xa, SCALING, 0.0, None, True)
            torch.cuda.synchronize()
        return [e.name for e in prof.events()
                if e.device_type == torch.autograd.DeviceType.CUDA and "elementwise" in e.name]

    assert elementwise_kernels("1") == []
    assert len(elementwise_kernels("0")) == 2  # the two it replaces, forward and backward


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("shape", FUSED_SHAPES)
def test_rank_blocks_stop_at_the_rank(monkeypatch, shape, dropout_p):
    """The rank K blocks' MMAs end at r rounded up to 16 (their rows past r are the copy's zeros): y and dx equal,
    value for value, those of the GEMM running all four MMAs of every rank block (LORA_EXT_GEMM_RANK_STEPS=0)."""
    if not fused_gemm_serves():
        pytest.skip("the fused GEMM serves only on a Hopper GPU with an sm_90a build")
    tokens, in_features, out_features, rank = shape
    weight, bias, lora_A, lora_B = make_params(in_features, out_features, rank, torch.bfloat16, torch.bfloat16, "cuda")
    x = make_x(tokens, in_features, torch.bfloat16, "cuda")
    grad_y = torch.randn(tokens, out_features, device="cuda").to(torch.bfloat16)
    seed = seed_tensor(99, x.device) if dropout_p > 0 else None
    monkeypatch.setenv("LORA_EXT_FUSED_GEMM", "force")
    results = {}
    for setting in ("0", None):
        if setting is None:
            monkeypatch.delenv("LORA_EXT_GEMM_RANK_STEPS", raising=False)
        else:
            monkeypatch.setenv("LORA_EXT_GEMM_RANK_STEPS", setting)
        y, xa = torch.ops.lora_ext.lora_forward(x, weight, bias, lora_A, lora_B, SCALING, dropout_p, seed)
        grad_x, _, _ = torch.ops.lora_ext.lora_backward(grad_y, x, weight, lora_A, lora_B, xa, SCALING, dropout_p,
                                                        seed, True)
        results[setting] = (y, grad_x)
    # torch.equal: a sum that ends at −0.0 on one side and +0.0 on the other (zeros added or not) still counts equal.
    assert torch.equal(results["0"][0], results[None][0]), "y"
    assert torch.equal(results["0"][1], results[None][1]), "dx"
