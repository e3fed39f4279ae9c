"""Shared parametrisation, tolerance helper and float64 reference for the lora_ext tests.

Every numerical test compares the extension against `lora_reference`: the plain
LoRA formula evaluated with torch autograd in float64 on the CPU, fed the exact
values the extension saw (upcast, never regenerated) and, with dropout, the keep
mask that `dropout_keep_mask` reports for the same seed.
"""

import zlib

import pytest
import torch

import lora_ext

CUDA_OK = torch.cuda.is_available() and lora_ext.cuda_kernels_available()
requires_cuda = pytest.mark.skipif(
    not CUDA_OK, reason="needs a CUDA device and lora_ext built with CUDA kernels"
)

def fused_gemm_serves(device="cuda"):
    """True where this build and GPU take the fused Hopper GEMM path (a Hopper GPU and an sm_90a build)."""
    return torch.cuda.get_device_capability(device) == (9, 0) and lora_ext.built_with_sm90a()


# Every device the extension supports; CUDA is skipped where it cannot run.
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]

# Base (x, weight) dtypes each backend supports.
BASE_DTYPES = {
    "cpu": [torch.float32, torch.float64, torch.bfloat16, torch.float16],
    "cuda": [torch.float32, torch.float16, torch.bfloat16],
}

_SHORT = {
    torch.float64: "f64",
    torch.float32: "f32",
    torch.bfloat16: "bf16",
    torch.float16: "f16",
}


def dtype_name(dtype):
    return _SHORT[dtype]


def _device_dtype_cases():
    cases = []
    for device in ("cpu", "cuda"):
        marks = [requires_cuda] if device == "cuda" else []
        for dtype in BASE_DTYPES[device]:
            # Adapters share x's dtype or are float32 (PEFT's default on a half base).
            for adapter_dtype in dict.fromkeys([dtype, torch.float32]):
                cases.append(
                    pytest.param(
                        device,
                        dtype,
                        adapter_dtype,
                        marks=marks,
                        id=f"{device}-{dtype_name(dtype)}-adapters_{dtype_name(adapter_dtype)}",
                    )
                )
    return cases


# parametrize("device,dtype,adapter_dtype", DEVICE_DTYPES)
DEVICE_DTYPES = _device_dtype_cases()


def _device_base_dtype_cases():
    cases = []
    for device in ("cpu", "cuda"):
        marks = [requires_cuda] if device == "cuda" else []
        for dtype in BASE_DTYPES[device]:
            cases.append(
                pytest.param(device, dtype, marks=marks, id=f"{device}-{dtype_name(dtype)}")
            )
    return cases


# parametrize("device,dtype", DEVICE_BASE_DTYPES): one case per supported base dtype.
DEVICE_BASE_DTYPES = _device_base_dtype_cases()


@pytest.fixture(autouse=True)
def _seed_per_test(request):
    """Fresh random inputs for every test, reproducible from the test's id."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield


# ----------------------------------------------------------------------------
# Tolerance helper
# ----------------------------------------------------------------------------

# Bound on the relative error norm ||out - ref|| / ||ref|| against float64.
REL_TOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.bfloat16: 1e-2,
    torch.float16: 1e-2,
}


def rel_tol(*dtypes):
    """The tolerance of the least precise dtype that took part in the computation."""
    return max(REL_TOL[d] for d in dtypes)


def relative_error(out, ref):
    out64 = out.detach().to("cpu", torch.float64)
    ref64 = ref.detach().to("cpu", torch.float64)
    err = (out64 - ref64).norm().item()
    ref_norm = ref64.norm().item()
    # An all-zero reference (zero tokens feeding a reduction) needs an all-zero answer.
    return err / ref_norm if ref_norm > 0 else err


def assert_rel_close(out, ref, *dtypes, name="output"):
    """Assert ||out - ref|| / ||ref|| <= tolerance of the least precise of `dtypes`."""
    assert tuple(out.shape) == tuple(ref.shape), (
        f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    )
    if out.numel() == 0:
        return
    out64 = out.detach().to("cpu", torch.float64)
    assert torch.isfinite(out64).all(), f"{name}: non-finite values"
    tol = rel_tol(*dtypes)
    err = relative_error(out, ref)
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.0e} ({[dtype_name(d) for d in dtypes]})"


def assert_bit_identical(a, b, name="tensor"):
    """Bitwise equality (NaN-safe, unlike torch.equal on floats)."""
    assert a.dtype == b.dtype and a.shape == b.shape and a.device == b.device, name
    if a.is_floating_point():
        ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        a, b = a.contiguous().view(ints), b.contiguous().view(ints)
    assert torch.equal(a, b), f"{name} changed"


# ----------------------------------------------------------------------------
# Inputs and the float64 reference
# ----------------------------------------------------------------------------


def make_x(tokens, in_features, dtype, device, layout="contiguous"):
    """Random x of shape (tokens, in_features) in one of several memory layouts.

    The tensor is created in its final dtype and device first and sliced after,
    so the layout survives (a .to() of a non-dense view would make it contiguous).
    """
    def rand(*shape):
        return torch.randn(*shape, dtype=torch.float32).to(device=device, dtype=dtype)

    if layout == "contiguous":
        return rand(tokens, in_features)
    if layout == "transposed":
        return rand(in_features, tokens).t()
    if layout == "offset":
        big = rand(tokens + 2, in_features + 5)
        return big[1 : 1 + tokens, 3 : 3 + in_features]
    if layout == "strided":
        big = rand(2 * tokens + 1, 2 * in_features + 1)
        return big[1::2, 1::2][:tokens, :in_features]
    if layout == "pitched":
        # A row pitch of in + 8 elements and one row of offset: rows still 16-byte aligned, as the copy engine
        # (TMA) needs them.
        big = rand(tokens + 1, in_features + 8)
        return big[1:, :in_features]
    raise ValueError(layout)


def run_and_list_cuda_kernels(call):
    """call()'s result and the names of the CUDA kernels it ran (torch.profiler), in launch order."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        result = call()
        torch.cuda.synchronize()
    return result, [event.name for event in profile.events() if event.device_type == torch.autograd.DeviceType.CUDA]


def make_params(in_features, out_features, rank, dtype, adapter_dtype, device, bias=True):
    """weight, bias, lora_A, lora_B, all random (lora_B too, unlike a fresh layer).

    Scaled so that the base and the LoRA part of y are both of order one.
    """
    def rand(*shape, scale, dt):
        return (torch.randn(*shape, dtype=torch.float32) * scale).to(device=device, dtype=dt)

    weight = rand(out_features, in_features, scale=in_features**-0.5, dt=dtype)
    bias_t = rand(out_features, scale=1.0, dt=dtype) if bias else None
    lora_A = rand(rank, in_features, scale=in_features**-0.5, dt=adapter_dtype)
    lora_B = rand(out_features, rank, scale=rank**-0.5, dt=adapter_dtype)
    return weight, bias_t, lora_A, lora_B


def seed_tensor(value, device):
    return torch.tensor([value], dtype=torch.int64, device=device)


def capture_cuda_graph(call):
    """call() warmed up twice on a side stream (as torch.cuda.graphs asks), then captured: (graph, call's outputs)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = call()
    return graph, outputs


def _leaf64(t):
    if t is None:
        return None
    return t.detach().to("cpu", torch.float64).requires_grad_(True)


def lora_reference(x, weight, bias, lora_A, lora_B, scaling, dropout_p=0.0, keep=None, grad_y=None):
    """float64 CPU autograd on the plain formula.

    y  = x W^T + b + s * dropout(x) A^T B^T,   dropout(x) = x * keep * keep_scale(p) (≈ 1 / (1 - p))
    xa = dropout(x) A^T
    `keep` is a bool mask of x's flattened shape (rows, in) or x's shape.
    Returns a dict with y, xa and, when grad_y is given, grad_x, grad_weight,
    grad_bias, grad_A, grad_B (float64, CPU).
    """
    x64, w64, b64, a64, bb64 = (_leaf64(t) for t in (x, weight, bias, lora_A, lora_B))
    if keep is not None:
        keep64 = keep.detach().to("cpu").reshape(x64.shape).to(torch.float64)
        x_dropped = x64 * keep64 * lora_ext.ops.dropout_keep_scale(dropout_p)
    else:
        assert dropout_p == 0.0
        x_dropped = x64
    xa = x_dropped @ a64.t()
    y = x64 @ w64.t() + scaling * (xa @ bb64.t())
    if b64 is not None:
        y = y + b64
    result = {"y": y.detach(), "xa": xa.detach()}
    if grad_y is not None:
        y.backward(grad_y.detach().to("cpu", torch.float64))
        result.update(
            grad_x=x64.grad,
            grad_weight=w64.grad,
            grad_bias=None if b64 is None else b64.grad,
            grad_A=a64.grad,
            grad_B=bb64.grad,
        )
    return result


def xa_dtype_for(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@pytest.fixture
def float32_matmuls():
    """float32 CUDA GEMMs without TF32 for the test (restored after it), where a bound assumes float32 products."""
    saved = torch.backends.cuda.matmul.allow_tf32  # (monkeypatch cannot patch this module's attributes)
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved
