"""The one-launch decoding path (csrc/cuda/lora_decode_gemv.cuh): y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ and xa = x·Aᵀ for 1–16
tokens in one kernel, base product included. It serves 16-bit x with adapters of x's dtype, no dropout, rank ≤ 64 and
a multiple of 8, 16-byte aligned rows, on GPUs with thread-block clusters (compute capability ≥ 9.0);
LORA_EXT_DECODE_GEMV=0 turns it off, and everything else takes cuBLAS + the decode kernel (lora_decode.cuh).

The shapes sit on its edges: tokens across the 8-token mma tiles (1, 7, 8, 9, 16; 17 and more take the other path), in across the 32-wide
chunks and the four-way K split across a cluster's blocks (8 gives three blocks nothing to do), out across the 16-row
warps and the 128-row clusters of four blocks (37, 129, 300, 1000, 2050), ranks across the 16-rank warps (8, 24, 40, 48, 64), and x slices that need more than the 48 KB of shared memory a launch gets unasked. y is rounded once, so it
must lie within one rounding of the float64 reference: ‖y − ref‖/‖ref‖ ≤ 2u (u = 2⁻⁸ for bfloat16, 2⁻¹¹ for float16).
xa is a float32 sum of exact products: within 1e-5. Then against the path it replaces, which must agree within the
same bound."""

import pytest
import torch

import lora_ext
from conftest import lora_reference, make_params, make_x, relative_error, requires_cuda
from test_ops import SCALING, _check_backward

pytestmark = requires_cuda

UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def decode_gemv_serves():
    return torch.cuda.get_device_capability()[0] >= 9


# (tokens, in_features, out_features, rank)
SHAPES = [
    pytest.param((1, 256, 128, 16), id="1tok"),
    pytest.param((1, 8, 16, 8), id="in8-one-chunk"),
    pytest.param((7, 40, 37, 8), id="in40-out37"),
    pytest.param((8, 4104, 300, 16), id="8tok-in4104"),
    pytest.param((9, 520, 264, 24), id="9tok-r24"),
    pytest.param((16, 4096, 4096, 16), id="16tok-llama"),
    pytest.param((16, 264, 1000, 32), id="16tok-r32"),
    pytest.param((13, 1032, 129, 40), id="13tok-r40"),
    pytest.param((16, 136, 4104, 64), id="16tok-r64"),
    pytest.param((5, 16, 2050, 48), id="out2050-r48"),
    pytest.param((17, 264, 1000, 32), id="17tok-other-path"),
    # x slices over 48 KB with the static buffers: each kernel instantiation needs its own shared-memory limit raised
    # (after the instantiations above have run in this process).
    pytest.param((16, 8192, 136, 64), id="16tok-in8192-r64"),
    pytest.param((12, 16384, 100, 16), id="12tok-in16384"),
    # The largest x slice it takes (16 tokens × 157 chunks of 64 bytes ≈ 157 KB of 160), and one past it (the other path).
    pytest.param((16, 39936, 40, 16), id="in39936-largest-slice"),
    pytest.param((16, 40960, 40, 16), id="in40960-other-path"),
]
DTYPES = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="f16")]


def _forward(monkeypatch, enabled, x, weight, bias, lora_A, lora_B):
    monkeypatch.setenv("LORA_EXT_DECODE_GEMV", "1" if enabled else "0")
    return torch.ops.lora_ext.lora_forward(x, weight, bias, lora_A, lora_B, SCALING, 0.0, None)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_gemv_within_one_rounding(monkeypatch, dtype, shape, bias):
    tokens, in_features, out_features, rank = shape
    x = make_x(tokens, in_features, dtype, "cuda")
    weight, bias_t, lora_A, lora_B = make_params(in_features, out_features, rank, dtype, dtype, "cuda", bias)
    y, xa = _forward(monkeypatch, True, x, weight, bias_t, lora_A, lora_B)
    ref = lora_reference(x, weight, bias_t, lora_A, lora_B, SCALING)
    bound = 2 * UNIT_ROUNDOFF[dtype]
    assert y.shape == (tokens, out_features) and y.dtype == dtype and y.is_contiguous()
    assert torch.isfinite(y).all()
    assert relative_error(y, ref["y"]) <= bound
    assert relative_error(xa, ref["xa"]) <= 1e-5

    y_old, xa_old = _forward(monkeypatch, False, x, weight, bias_t, lora_A, lora_B)
    assert relative_error(y, y_old) <= bound
    assert relative_error(xa, xa_old) <= 1e-5


@pytest.mark.parametrize("layout", ["row-padded", "offset-rows", "unaligned"])
def test_decode_gemv_views(monkeypatch, layout):
    """Views: x and W rows with padding between them, operands starting part-way into their storage (16-byte aligned,
    so the one-launch path serves), and x starting one element in (not aligned: the other path serves)."""
    tokens, in_features, out_features, rank = 12, 264, 200, 16
    dtype = torch.bfloat16
    weight, bias, lora_A, lora_B = make_params(in_features, out_features, rank, dtype, dtype, "cuda")
    if layout == "row-padded":
        x = make_x(tokens, in_features + 24, dtype, "cuda")[:, 8:8 + in_features]
        weight = torch.cat([weight, torch.randn_like(weight[:, :16])], dim=1)[:, :in_features]
    elif layout == "offset-rows":
        x = make_x(tokens + 3, in_features, dtype, "cuda")[3:]
        weight = torch.cat([torch.randn_like(weight[:5]), weight])[5:]
        lora_B = torch.cat([torch.randn_like(lora_B[:2]), lora_B])[2:]
    else:
        x = make_x(tokens * in_features + 1, 1, dtype, "cuda").view(-1)[1:].view(tokens, in_features)
    assert not x.is_contiguous() or x.storage_offset() > 0
    weight_before = weight.clone()
    y, xa = _forward(monkeypatch, True, x, weight, bias, lora_A, lora_B)
    ref = lora_reference(x, weight, bias, lora_A, lora_B, SCALING)
    assert relative_error(y, ref["y"]) <= 2 * UNIT_ROUNDOFF[dtype]
    assert relative_error(xa, ref["xa"]) <= 1e-5
    assert torch.equal(weight, weight_before)


@pytest.mark.parametrize("tokens", [1, 6, 16])
def test_decode_gemv_backward(monkeypatch, tokens):
    """Training at p = 0 with a few tokens: the xa this path saves feeds the backward kernels."""
    monkeypatch.delenv("LORA_EXT_DECODE_GEMV", raising=False)
    x = make_x(tokens, 520, torch.bfloat16, "cuda")
    _check_backward(x, *make_params(520, 264, 16, torch.bfloat16, torch.bfloat16, "cuda"), 0.0)


def _kernels(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        fn()
        torch.cuda.synchronize()
    return [event.name for event in profile.events() if event.device_type == torch.autograd.DeviceType.CUDA]


@pytest.mark.parametrize(
    "case,serves",
    [("1tok", True), ("16tok", True), ("17tok", False), ("dropout", False), ("adapters-f32", False),
     ("r72", False), ("off", False)],
)
def test_which_path_serves(monkeypatch, case, serves):
    """One kernel and no cuBLAS where the path serves; cuBLAS and the decode kernel where it does not."""
    if not decode_gemv_serves():
        pytest.skip("the one-launch decoding path needs thread-block clusters (compute capability 9.0+)")
    monkeypatch.setenv("LORA_EXT_DECODE_GEMV", "0" if case == "off" else "1")
    tokens = {"16tok": 16, "17tok": 17}.get(case, 1)
    rank = 72 if case == "r72" else 16
    adapter_dtype = torch.float32 if case == "adapters-f32" else torch.bfloat16
    dropout_p = 0.1 if case == "dropout" else 0.0
    seed = torch.tensor([7], dtype=torch.int64, device="cuda") if dropout_p else None
    x = make_x(tokens, 512, torch.bfloat16, "cuda")
    params = make_params(512, 256, rank, torch.bfloat16, adapter_dtype, "cuda")
    kernels = _kernels(lambda: torch.ops.lora_ext.lora_forward(x, *params, SCALING, dropout_p, seed))
    ours = [name for name in kernels if "lora_decode_gemv_kernel" in name]
    assert (len(ours) == 1 and len(kernels) == 1) == serves, kernels
    assert bool(ours) == serves, kernels


def test_decode_gemv_in_a_cuda_graph(monkeypatch):
    """Captured once and replayed on new inputs, it gives the eager result (no host sync, no allocation per replay)."""
    monkeypatch.delenv("LORA_EXT_DECODE_GEMV", raising=False)
    dtype = torch.bfloat16
    weight, bias, lora_A, lora_B = make_params(1024, 1024, 16, dtype, dtype, "cuda")
    static_x = make_x(4, 1024, dtype, "cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on a side stream, as torch.cuda.graphs recommends
        torch.ops.lora_ext.lora_forward(static_x, weight, bias, lora_A, lora_B, SCALING, 0.0, None)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y, static_xa = torch.ops.lora_ext.lora_forward(static_x, weight, bias, lora_A, lora_B, SCALING, 0.0,
                                                              None)
    for _ in range(3):
        static_x.copy_(make_x(4, 1024, dtype, "cuda"))
        graph.replay()
        y, xa = torch.ops.lora_ext.lora_forward(static_x, weight, bias, lora_A, lora_B, SCALING, 0.0, None)
        torch.cuda.synchronize()
        assert torch.equal(static_y, y) and torch.equal(static_xa, xa)


def test_decode_gemv_through_the_module(monkeypatch):
    """LoRALinear at decoding size in eval mode serves through this path and matches its merged weight."""
    monkeypatch.delenv("LORA_EXT_DECODE_GEMV", raising=False)
    torch.manual_seed(0)
    layer = lora_ext.LoRALinear(512, 384, r=16, alpha=32, device="cuda", dtype=torch.bfloat16).eval()
    torch.nn.init.normal_(layer.lora_B, std=0.02)
    x = torch.randn(3, 512, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        y = layer(x)
        ref = lora_reference(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling)
    assert relative_error(y, ref["y"]) <= 2 * UNIT_ROUNDOFF[torch.bfloat16]
