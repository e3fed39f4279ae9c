"""Single-adapter decoding on the multi-adapter cluster kernel (csrc/cuda/one_adapter_decode.h): lora_forward without
dropout, at up to 64 tokens, adds its low-rank terms to cuBLAS's y with multi_lora_forward's decoding kernel
(multi_lora_cluster.cuh) on one slot, and writes xa = x·Aᵀ for backward. On GPUs with thread-block clusters
(compute capability ≥ 9.0) it serves x rows of unit column stride on 16-byte boundaries, contiguous 16-byte aligned
A and B, in and out multiples of 8 and rank ≤ 64 (ranks above 32 up to 48 tokens); 1–16 tokens go to the one-launch
GEMV first where it serves (test_decode_gemv_cuda.py). Everything else, and LORA_EXT_DECODE_CLUSTER=0, takes lora_decode.cuh's kernel (≤ 32
tokens, r % 8 == 0, r ≤ 32) or the general shrink and expand.

y is rounded once from a float32 sum, so it must lie within one rounding of the float64 reference:
‖y − ref‖/‖ref‖ ≤ 2u (u = 2⁻⁸ for bfloat16, 2⁻¹¹ for float16, 2⁻²⁴ for float32 with a float32 GEMM's error on top);
xa within 1e-5. The kernel is the multi-adapter op's: its rows equal that op's with a one-slot stack, bit for bit."""

import pytest
import torch

from conftest import assert_bit_identical, capture_cuda_graph, lora_reference, make_params, make_x, relative_error, \
    requires_cuda
from test_ops import SCALING, _check_backward

pytestmark = [requires_cuda, pytest.mark.usefixtures("float32_matmuls")]  # conftest: no TF32, as the bounds assume

ops = torch.ops.lora_ext
Y_BOUND = {torch.bfloat16: 2 * 2.0**-8, torch.float16: 2 * 2.0**-11, torch.float32: 1e-5}


def cluster_serves(tokens=1, rank=16):
    """Whether this GPU takes the cluster path for these sizes (ranks above 32: up to 48 tokens)."""
    return torch.cuda.get_device_capability()[0] >= 9 and tokens <= 64 and rank <= 64 and (rank <= 32 or tokens <= 48)


def forward(monkeypatch, path, x, weight, bias, lora_A, lora_B):
    """lora_forward with the one-launch GEMV off (so that 1–16 tokens reach this path too), on the cluster path or
    (path = "old") the one it replaces."""
    monkeypatch.setenv("LORA_EXT_DECODE_GEMV", "0")
    monkeypatch.setenv("LORA_EXT_DECODE_CLUSTER", "0" if path == "old" else "1")
    return ops.lora_forward(x, weight, bias, lora_A, lora_B, SCALING, 0.0, None)


def one_slot(x, weight, bias, lora_A, lora_B):
    """The multi-adapter op with lora_A and lora_B as its only slot and every token on it."""
    ids = torch.zeros(x.shape[0], dtype=torch.int32, device=x.device)
    scalings = torch.tensor([SCALING], dtype=torch.float32, device=x.device)
    return ops.multi_lora_forward(x, weight, bias, lora_A[None], lora_B[None], scalings, ids)


def assert_within_one_rounding(y, xa, x, weight, bias, lora_A, lora_B):
    ref = lora_reference(x, weight, bias, lora_A, lora_B, SCALING)
    assert relative_error(y, ref["y"]) <= Y_BOUND[x.dtype], relative_error(y, ref["y"])
    assert relative_error(xa, ref["xa"]) <= 1e-5, relative_error(xa, ref["xa"])


# (tokens, in_features, out_features, rank): tokens across the old paths' edges (16 / 17, 32 / 33) up to the
# kernel's 64; ranks across its buckets (≤ 16, ≤ 32, ≤ 64), below 8 and not a multiple of 8 (B's rows read element by
# element); in and out across the cluster's 8 blocks (24: blocks without K or output columns) and the stages' chunks.
SHAPES = [
    pytest.param((1, 256, 128, 16), id="1tok"),
    pytest.param((16, 264, 136, 8), id="16tok-r8"),
    pytest.param((17, 4096, 4096, 16), id="17tok-llama"),
    pytest.param((24, 520, 1000, 24), id="24tok-r24"),
    pytest.param((32, 1032, 264, 32), id="32tok-r32"),
    pytest.param((33, 256, 128, 16), id="33tok"),
    pytest.param((40, 2056, 2056, 40), id="40tok-r40"),
    pytest.param((48, 4616, 2056, 12), id="48tok-r12-A-chunks"),
    pytest.param((53, 24, 16, 5), id="53tok-tiny-r5"),
    pytest.param((48, 4096, 4096, 64), id="48tok-r64"),
    pytest.param((49, 1032, 520, 40), id="49tok-r40-other-path"),
    pytest.param((64, 4096, 4096, 32), id="64tok-r32"),
    pytest.param((61, 136, 8200, 1), id="61tok-wide-out-r1"),
]
DTYPES = [
    pytest.param(torch.bfloat16, torch.bfloat16, id="bf16"),
    pytest.param(torch.float16, torch.float16, id="f16"),
    pytest.param(torch.bfloat16, torch.float32, id="bf16-adapters_f32"),
    pytest.param(torch.float32, torch.float32, id="f32"),
]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype,adapter_dtype", DTYPES)
def test_decode_cluster_within_one_rounding(monkeypatch, dtype, adapter_dtype, shape, bias):
    tokens, in_f, out_f, rank = shape
    torch.manual_seed(tokens * 1000 + rank)
    x = make_x(tokens, in_f, dtype, "cuda")
    weight, bias_t, lora_A, lora_B = make_params(in_f, out_f, rank, dtype, adapter_dtype, "cuda", bias)
    y, xa = forward(monkeypatch, "cluster", x, weight, bias_t, lora_A, lora_B)
    assert_within_one_rounding(y, xa, x, weight, bias_t, lora_A, lora_B)
    # The path it replaces agrees within the same bound.
    y_old, xa_old = forward(monkeypatch, "old", x, weight, bias_t, lora_A, lora_B)
    assert_within_one_rounding(y_old, xa_old, x, weight, bias_t, lora_A, lora_B)
    if cluster_serves(tokens, rank):
        # The multi-adapter kernel with one slot: the same bits (this is the path taken).
        assert_bit_identical(y, one_slot(x, weight, bias_t, lora_A, lora_B), "y against the one-slot multi op")


@pytest.mark.parametrize("shape", [(40, 264, 136, 16), (48, 512, 520, 40), (33, 264, 520, 12)],
                         ids=["40tok-r16", "48tok-r40", "33tok-r12"])
@pytest.mark.parametrize("dtype,adapter_dtype", DTYPES)
def test_decode_cluster_backward(monkeypatch, dtype, adapter_dtype, shape):
    """Training at decoding sizes without dropout: the saved xa comes from the cluster kernel; forward and the
    gradients against the float64 reference (test_ops' checks)."""
    monkeypatch.delenv("LORA_EXT_DECODE_GEMV", raising=False)
    monkeypatch.delenv("LORA_EXT_DECODE_CLUSTER", raising=False)
    tokens, in_f, out_f, rank = shape
    if cluster_serves():
        assert cluster_serves(tokens, rank), "each shape here is one the cluster path takes"
    x = make_x(tokens, in_f, dtype, "cuda")
    _check_backward(x, *make_params(in_f, out_f, rank, dtype, adapter_dtype, "cuda"), 0.0)


@pytest.mark.parametrize("layout", ["offset", "strided", "transposed", "A-transposed", "B-slice", "rank-65"])
def test_decode_cluster_views_take_the_other_paths(monkeypatch, layout):
    """Operands the kernel cannot read as they lie (x rows off 16-byte boundaries or strided, A or B not contiguous,
    rank > 64) go to the other kernels, untouched, and stay within the bound."""
    tokens, in_f, out_f = 40, 256, 136
    rank = 65 if layout == "rank-65" else 16
    x = make_x(tokens, in_f, torch.bfloat16, "cuda", layout if layout in ("offset", "strided", "transposed") else
               "contiguous")
    weight, bias, lora_A, lora_B = make_params(in_f, out_f, rank, torch.bfloat16, torch.bfloat16, "cuda")
    if layout == "A-transposed":
        lora_A = lora_A.t().contiguous().t()
    if layout == "B-slice":
        wide = torch.randn(out_f, rank + 8, device="cuda").to(torch.bfloat16)
        wide[:, 8:] = lora_B
        lora_B = wide[:, 8:]
    before = [t.clone() for t in (x, weight, bias, lora_A, lora_B)]
    y, xa = forward(monkeypatch, "cluster", x, weight, bias, lora_A, lora_B)
    assert_within_one_rounding(y, xa, x, weight, bias, lora_A, lora_B)
    for t, b in zip((x, weight, bias, lora_A, lora_B), before):
        assert_bit_identical(t, b, "an input")


def test_decode_cluster_in_a_cuda_graph(monkeypatch):
    """Captured and replayed (the kernel is the GEMM's programmatic dependent: it must read y only after it): each
    replay equals an eager call on the new x, bit for bit."""
    monkeypatch.delenv("LORA_EXT_DECODE_GEMV", raising=False)
    monkeypatch.delenv("LORA_EXT_DECODE_CLUSTER", raising=False)
    x = make_x(48, 2048, torch.bfloat16, "cuda")
    weight, bias, lora_A, lora_B = make_params(2048, 2056, 16, torch.bfloat16, torch.bfloat16, "cuda")

    def call():
        return ops.lora_forward(x, weight, bias, lora_A, lora_B, SCALING, 0.0, None)

    graph, (y_graph, xa_graph) = capture_cuda_graph(call)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        y, xa = call()
        assert_bit_identical(y_graph, y, "y after replay")
        assert_bit_identical(xa_graph, xa, "xa after replay")
        assert_within_one_rounding(y, xa, x, weight, bias, lora_A, lora_B)


@pytest.mark.parametrize("tokens", [17, 32, 64])
def test_decode_cluster_is_one_launch_after_the_gemm(monkeypatch, tokens):
    """On Hopper, LoRALinear at 17–64 tokens in inference adds one kernel to the base GEMM: the cluster kernel."""
    if not cluster_serves():
        pytest.skip("thread-block clusters need compute capability 9.0+")
    monkeypatch.delenv("LORA_EXT_DECODE_GEMV", raising=False)
    monkeypatch.delenv("LORA_EXT_DECODE_CLUSTER", raising=False)
    import lora_ext

    layer = lora_ext.LoRALinear(1024, 1032, r=16, alpha=32, device="cuda", dtype=torch.bfloat16).eval()
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(tokens, 1024, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        y = layer(x)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
            layer(x)
            torch.cuda.synchronize()
    kernels = [e.name for e in profile.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    ours = [name for name in kernels if "lora" in name]
    assert len(ours) == 1 and "multi_lora_gather_cluster_kernel" in ours[0], kernels
    ref = lora_reference(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling)
    assert relative_error(y, ref["y"]) <= Y_BOUND[torch.bfloat16]
