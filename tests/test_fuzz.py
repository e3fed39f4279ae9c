"""Property-based fuzzing (hypothesis) of every numerical operator against the float64 autograd reference.

Each example draws shapes (1, primes, zero tokens), a rank, the memory layout of x, W, b, A and B
(contiguous, transposed, sliced out of a larger buffer at a storage offset, stepped, broadcast rows with
stride 0), the base and adapter dtypes the backend supports (conftest.BASE_DTYPES), dropout p and seed,
and the scaling, then checks
  * lora_ext.ops.lora_linear forward and its autograd backward (x of any leading shape, optional dW/db),
  * the raw operators lora_forward / lora_backward (incl. compute_grad_x=False),
  * merge_ / unmerge_ in place through any strides,
with conftest's tolerances (never widened; an output whose sum cancels badly is held to the same tolerance
relative to the magnitude of its terms, see assert_close), and that nothing outside the written tensor
changed.

Examples are derandomized, so CI runs the same cases every time. The default of 300 examples per test
and device keeps the CPU run to seconds; LORA_EXT_FUZZ_EXAMPLES=2000 runs a deeper search
(profile "lora_ext_fuzz_deep"). A failure prints the drawn example, reproducible with @example or
by re-running (derandomized).
"""

import math
import os

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import lora_ext  # noqa: E402
from conftest import (  # noqa: E402
    BASE_DTYPES,
    DEVICES,
    assert_bit_identical,
    assert_rel_close,
    lora_reference,
    rel_tol,
    seed_tensor,
    xa_dtype_for,
)

ops = torch.ops.lora_ext

DEFAULT_EXAMPLES = 300
_COMMON = dict(
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile("lora_ext_fuzz", max_examples=DEFAULT_EXAMPLES, **_COMMON)
settings.register_profile(
    "lora_ext_fuzz_deep",
    max_examples=int(os.environ.get("LORA_EXT_FUZZ_EXAMPLES") or 2000),
    **_COMMON,
)
# The profile applies to this file's tests only (no settings.load_profile: other suites keep theirs).
FUZZ = settings.get_profile(
    "lora_ext_fuzz_deep" if os.environ.get("LORA_EXT_FUZZ_EXAMPLES") else "lora_ext_fuzz"
)

# ----------------------------------------------------------------------------
# Strategies
# ----------------------------------------------------------------------------

# Sizes that matter: 1, small primes, tile edges (8, 16, 32 and neighbours), and anything up to 70.
_EDGE_SIZES = [1, 2, 3, 5, 7, 8, 13, 15, 16, 17, 31, 32, 33, 37, 64, 67]
sizes = st.one_of(st.sampled_from(_EDGE_SIZES), st.integers(1, 70))
token_counts = st.one_of(st.just(0), sizes)
ranks = st.one_of(st.sampled_from([1, 2, 3, 4, 7, 8, 16, 17, 32, 64]), st.integers(1, 24))

# Read-only operands may also broadcast a row ("rows0": stride 0 along dim 0).
READ_LAYOUTS = ["contiguous", "transposed", "offset", "stepped", "transposed_offset", "rows0"]
WRITE_LAYOUTS = ["contiguous", "transposed", "offset", "stepped", "transposed_offset"]

dropout_ps = st.one_of(st.just(0.0), st.sampled_from([0.1, 0.5, 0.9]), st.floats(0.0, 0.95))
seeds = st.integers(0, 2**62)


@st.composite
def scalings(draw):
    kind = draw(st.sampled_from(["zero", "one", "value"]))
    if kind == "zero":
        return 0.0
    if kind == "one":
        return 1.0
    # |s| in [1/64, 8]: far from float16 underflow of the gradients, which is a range limit, not a bug.
    return draw(st.sampled_from([1.0, -1.0])) * draw(st.floats(1 / 64, 8.0))


@st.composite
def layouts(draw, kinds=READ_LAYOUTS):
    kind = draw(st.sampled_from(kinds))
    offset = (draw(st.integers(0, 3)), draw(st.integers(0, 3)))
    step = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    return kind, offset, step


def make_tensor(shape, dtype, device, layout, scale=1.0):
    """A tensor of `shape` with random values (scaled), stored in `layout`; returns (tensor, buffer).

    The buffer is the whole allocation the tensor views, so tests can check that nothing outside the
    view changed. Values are drawn in float32 and rounded to dtype once.
    """
    kind, (o0, o1), (s0, s1) = layout
    rows, cols = shape

    def rand(*buffer_shape):
        return (torch.randn(*buffer_shape) * scale).to(device=device, dtype=dtype)

    if kind == "contiguous":
        t = rand(rows, cols)
        return t, t
    if kind == "transposed":
        buf = rand(cols, rows)
        return buf.t(), buf
    if kind == "offset":
        buf = rand(rows + o0 + 1, cols + o1 + 1)
        return buf[o0 : o0 + rows, o1 : o1 + cols], buf
    if kind == "stepped":
        buf = rand(rows * s0 + o0, cols * s1 + o1)
        return buf[o0::s0, o1::s1][:rows, :cols], buf
    if kind == "transposed_offset":
        buf = rand(cols * s1 + o1 + 1, rows + o0 + 1)
        return buf[o1 :: s1, o0 : o0 + rows][:cols].t(), buf
    if kind == "rows0":
        buf = rand(1, cols + o1)
        return buf[:, o1 : o1 + cols].expand(rows, cols), buf
    raise ValueError(kind)


@st.composite
def lora_cases(draw, device):
    dtype = draw(st.sampled_from(BASE_DTYPES[device]))
    adapter_dtype = draw(st.sampled_from(list(dict.fromkeys([dtype, torch.float32]))))
    # On CUDA also ≥ 512 tokens, where the tensor-core shrink takes over (with a tail of tokens % 16 rows).
    tokens = draw(token_counts if device == "cpu" else st.one_of(token_counts, st.integers(500, 640)))
    in_f, out_f, rank = draw(sizes), draw(sizes), draw(ranks)
    p = draw(dropout_ps)
    return dict(
        dtype=dtype,
        adapter_dtype=adapter_dtype,
        tokens=tokens,
        in_f=in_f,
        out_f=out_f,
        rank=rank,
        bias=draw(st.booleans()),
        layouts={name: draw(layouts()) for name in ("x", "weight", "bias", "lora_A", "lora_B", "grad_y")},
        dropout_p=p,
        seed=draw(seeds) if p > 0 else None,
        scaling=draw(scalings()),
        torch_seed=draw(st.integers(0, 2**31 - 1)),
    )


def build(case, device):
    """x, weight, bias, lora_A, lora_B, grad_y with the drawn layouts, plus their buffers."""
    torch.manual_seed(case["torch_seed"])
    dt, adt, L = case["dtype"], case["adapter_dtype"], case["layouts"]
    tokens, in_f, out_f, rank = case["tokens"], case["in_f"], case["out_f"], case["rank"]
    # Scaled so that the base and the LoRA part of y are both of order one (as conftest.make_params).
    x, xb = make_tensor((tokens, in_f), dt, device, L["x"])
    w, wb = make_tensor((out_f, in_f), dt, device, L["weight"], in_f**-0.5)
    a, ab = make_tensor((rank, in_f), adt, device, L["lora_A"], in_f**-0.5)
    b, bb = make_tensor((out_f, rank), adt, device, L["lora_B"], rank**-0.5)
    bias = bias_buf = None
    if case["bias"]:
        bias_2d, bias_buf = make_tensor((1, out_f), dt, device, L["bias"])
        bias = bias_2d[0]
    gy, gyb = make_tensor((tokens, out_f), dt, device, L["grad_y"])
    tensors = dict(x=x, weight=w, bias=bias, lora_A=a, lora_B=b, grad_y=gy)
    buffers = [t for t in (xb, wb, ab, bb, bias_buf, gyb) if t is not None]
    return tensors, buffers


def seed_and_keep(case, device, rows):
    if case["dropout_p"] == 0.0:
        return None, None
    seed = seed_tensor(case["seed"], device)
    return seed, ops.dropout_keep_mask(seed, rows, case["in_f"], case["dropout_p"])


# ----------------------------------------------------------------------------
# Checking against the reference
# ----------------------------------------------------------------------------

# conftest's tolerances bound the normwise relative error ||out − ref|| / ||ref||, which holds for sums
# whose terms do not cancel much. The fuzzer also draws sums that cancel almost completely (e.g. a
# broadcast lora_B makes every row of grad_A the same scalar Σ_t c_t·x_t times a constant; with in_f = 1
# and 37 tokens it found one with condition 630, where plain float32 torch.matmul misses by 2e-5).
# The condition of an output is κ = || |terms| || / ||ref||, where |terms| is the reference evaluated on
# the absolute values of every operand (all outputs are sums of products). Up to KAPPA_MAX the check is
# conftest's assert_rel_close as is; beyond it the same tolerance applies to the error relative to
# || |terms| ||, the standard forward-error bound of a float sum, and the example is counted as an event.
KAPPA_MAX = 100.0


def reference_and_magnitude(x, weight, bias, lora_A, lora_B, scaling, dropout_p, keep, grad_y):
    ref = lora_reference(x, weight, bias, lora_A, lora_B, scaling, dropout_p, keep, grad_y=grad_y)
    absolute = [None if t is None else t.detach().to("cpu", torch.float64).abs()
                for t in (x, weight, bias, lora_A, lora_B, grad_y)]
    ax, aw, ab, aa, abb, agy = absolute
    magnitude = lora_reference(ax, aw, ab, aa, abb, abs(scaling), dropout_p, keep, grad_y=agy)
    return ref, magnitude


def assert_close(out, ref, magnitude, *dtypes, name):
    ref_norm, magnitude_norm = ref.norm().item(), magnitude.norm().item()
    kappa = magnitude_norm / ref_norm if ref_norm > 0 else (1.0 if magnitude_norm == 0 else math.inf)
    if kappa <= KAPPA_MAX:
        assert_rel_close(out, ref, *dtypes, name=name)
        return
    try:
        event(f"ill-conditioned output (kappa > {KAPPA_MAX:g})")
    except hypothesis.errors.InvalidArgument:  # called outside @given (the regression case)
        pass
    assert tuple(out.shape) == tuple(ref.shape), name
    out64 = out.detach().to("cpu", torch.float64)
    assert torch.isfinite(out64).all(), f"{name}: non-finite values"
    err = (out64 - ref).norm().item() / magnitude_norm
    tol = rel_tol(*dtypes)
    assert err <= tol, f"{name}: error {err:.3e} relative to || |terms| || > {tol:.0e} (kappa {kappa:.0f})"


class Unchanged:
    """Every buffer bit-identical at exit (the inputs of an operator are read-only)."""

    def __init__(self, buffers):
        self.buffers = buffers
        self.before = [b.clone() for b in buffers]

    def check(self):
        for i, (b, before) in enumerate(zip(self.buffers, self.before)):
            assert_bit_identical(b, before, name=f"input buffer {i}")


# ----------------------------------------------------------------------------
# lora_linear + autograd
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@FUZZ
@given(data=st.data())
def test_fuzz_lora_linear_autograd(device, data):
    case = data.draw(lora_cases(device), label="case")
    leading = data.draw(st.sampled_from(["2d", "3d", "1d"]) if case["tokens"] == 1 else
                        st.sampled_from(["2d", "3d"]), label="leading")
    base_grads = data.draw(st.booleans(), label="base_grads")
    t, buffers = build(case, device)
    dt, adt = case["dtype"], case["adapter_dtype"]
    tokens, in_f, out_f = case["tokens"], case["in_f"], case["out_f"]

    x2d = t["x"]
    if leading == "3d":  # split the token dim (always a view); 0 tokens -> (0, 3) leading dims
        split = next(d for d in (3, 2, 1) if tokens % d == 0)
        x_in = x2d.unflatten(0, (tokens // split, split)) if tokens else x2d.unflatten(0, (0, 3))
    elif leading == "1d":
        x_in = x2d[0]
    else:
        x_in = x2d
    x_leaf = x_in.detach().requires_grad_(True)  # a view of a no-grad buffer: a leaf
    a = t["lora_A"].detach().requires_grad_(True)
    b = t["lora_B"].detach().requires_grad_(True)
    w = t["weight"].detach().requires_grad_(base_grads)
    bias = None if t["bias"] is None else t["bias"].detach().requires_grad_(base_grads)
    seed, keep = seed_and_keep(case, device, tokens)
    unchanged = Unchanged(buffers)

    y = lora_ext.ops.lora_linear(x_leaf, w, bias, a, b, case["scaling"], case["dropout_p"], seed)
    assert y.dtype == dt and y.device.type == device
    assert y.shape == (*x_in.shape[:-1], out_f)
    grad_y = t["grad_y"].reshape(y.shape) if leading != "1d" else t["grad_y"][0]
    y.backward(grad_y)
    unchanged.check()

    ref, mag = reference_and_magnitude(x2d, t["weight"], t["bias"], t["lora_A"], t["lora_B"], case["scaling"],
                                       case["dropout_p"], keep, t["grad_y"])
    assert_close(y.reshape(tokens, out_f), ref["y"], mag["y"], dt, adt, name="y")
    assert x_leaf.grad.dtype == dt and a.grad.dtype == adt and b.grad.dtype == adt
    assert_close(x_leaf.grad.reshape(tokens, in_f), ref["grad_x"], mag["grad_x"], dt, adt, name="x.grad")
    assert_close(a.grad, ref["grad_A"], mag["grad_A"], dt, adt, name="lora_A.grad")
    assert_close(b.grad, ref["grad_B"], mag["grad_B"], dt, adt, name="lora_B.grad")
    if base_grads:
        assert_close(w.grad, ref["grad_weight"], mag["grad_weight"], dt, name="weight.grad")
        if bias is not None:
            assert_close(bias.grad, ref["grad_bias"], mag["grad_bias"], dt, name="bias.grad")


# ----------------------------------------------------------------------------
# Raw operators
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@FUZZ
@given(data=st.data())
def test_fuzz_forward_backward_ops(device, data):
    case = data.draw(lora_cases(device), label="case")
    compute_grad_x = data.draw(st.booleans(), label="compute_grad_x")
    check_forward_backward_ops(case, compute_grad_x, device)


# Found by the fuzzer (LORA_EXT_FUZZ_EXAMPLES=1500): a broadcast lora_B (stride 0 rows) and in_f = 1 make
# grad_A one scalar sum that cancels (kappa ≈ 630); float32 matmul, ours and torch's alike, is off by
# 2.0e-5 relative. Not a bug; kept as a regression case for the conditioned check.
ILL_CONDITIONED_CASE = {
    "dtype": torch.float32, "adapter_dtype": torch.float32, "tokens": 37, "in_f": 1, "out_f": 22, "rank": 6,
    "bias": False,
    "layouts": {"x": ("contiguous", (0, 0), (1, 1)), "weight": ("offset", (0, 1), (1, 1)),
                "bias": ("contiguous", (0, 0), (1, 1)), "lora_A": ("transposed_offset", (2, 1), (1, 3)),
                "lora_B": ("rows0", (0, 1), (1, 1)), "grad_y": ("offset", (1, 1), (1, 1))},
    "dropout_p": 0.0, "seed": None, "scaling": 1.0, "torch_seed": 279528710,
}


@pytest.mark.parametrize("device", DEVICES)
def test_ill_conditioned_case_found_by_fuzzing(device):
    check_forward_backward_ops(ILL_CONDITIONED_CASE, False, device)


def check_forward_backward_ops(case, compute_grad_x, device):
    t, buffers = build(case, device)
    dt, adt = case["dtype"], case["adapter_dtype"]
    tokens, in_f, out_f, rank = case["tokens"], case["in_f"], case["out_f"], case["rank"]
    s, p = case["scaling"], case["dropout_p"]
    seed, keep = seed_and_keep(case, device, tokens)
    unchanged = Unchanged(buffers)

    y, xa = ops.lora_forward(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], s, p, seed)
    assert y.shape == (tokens, out_f) and y.dtype == dt
    assert xa.shape == (tokens, rank) and xa.dtype == xa_dtype_for(dt)
    xa_before = xa.clone()
    grad_x, grad_A, grad_B = ops.lora_backward(
        t["grad_y"], t["x"], t["weight"], t["lora_A"], t["lora_B"], xa, s, p, seed, compute_grad_x
    )
    unchanged.check()
    assert_bit_identical(xa, xa_before, name="lora_activation")

    ref, mag = reference_and_magnitude(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], s, p, keep,
                                       t["grad_y"])
    assert_close(y, ref["y"], mag["y"], dt, adt, name="y")
    assert_close(xa, ref["xa"], mag["xa"], dt, adt, name="xa")
    assert grad_A.dtype == adt and grad_B.dtype == adt
    assert_close(grad_A, ref["grad_A"], mag["grad_A"], dt, adt, name="grad_A")
    assert_close(grad_B, ref["grad_B"], mag["grad_B"], dt, adt, name="grad_B")
    if compute_grad_x:
        assert grad_x.dtype == dt
        assert_close(grad_x, ref["grad_x"], mag["grad_x"], dt, adt, name="grad_x")
    else:
        assert grad_x.shape == (0,)


# ----------------------------------------------------------------------------
# merge_ / unmerge_
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@FUZZ
@given(data=st.data())
def test_fuzz_merge_unmerge(device, data):
    dtype = data.draw(st.sampled_from(BASE_DTYPES[device]), label="dtype")
    adapter_dtype = data.draw(st.sampled_from(list(dict.fromkeys([dtype, torch.float32]))), label="adapter")
    out_f, in_f, rank = data.draw(sizes, label="out"), data.draw(sizes, label="in"), data.draw(ranks, label="r")
    w_layout = data.draw(layouts(WRITE_LAYOUTS), label="weight_layout")
    a_layout, b_layout = data.draw(layouts(), label="A_layout"), data.draw(layouts(), label="B_layout")
    scaling = data.draw(scalings(), label="scaling")
    torch.manual_seed(data.draw(st.integers(0, 2**31 - 1), label="torch_seed"))

    weight, w_buf = make_tensor((out_f, in_f), dtype, device, w_layout, in_f**-0.5)
    lora_A, a_buf = make_tensor((rank, in_f), adapter_dtype, device, a_layout, in_f**-0.5)
    lora_B, b_buf = make_tensor((out_f, rank), adapter_dtype, device, b_layout, rank**-0.5)
    # Everything in weight's buffer outside the view must survive the in-place update.
    outside = torch.ones(w_buf.shape, dtype=torch.bool, device=device)
    outside_view = outside.as_strided(weight.shape, weight.stride(),
                                      weight.storage_offset() - w_buf.storage_offset())
    outside_view.fill_(False)
    w_buf_before = w_buf.clone()
    adapters = Unchanged([a_buf, b_buf])
    ptr, strides = weight.data_ptr(), weight.stride()
    delta = scaling * (lora_B.to("cpu", torch.float64) @ lora_A.to("cpu", torch.float64))
    original = weight.to("cpu", torch.float64, copy=True)
    delta_mag = abs(scaling) * (lora_B.to("cpu", torch.float64).abs() @ lora_A.to("cpu", torch.float64).abs())

    assert ops.merge_(weight, lora_A, lora_B, scaling) is None
    assert weight.data_ptr() == ptr and weight.stride() == strides and weight.dtype == dtype
    assert_close(weight, original + delta, original.abs() + delta_mag, dtype, adapter_dtype, name="merged weight")
    assert torch.equal(w_buf[outside], w_buf_before[outside]), "merge_ wrote outside the weight view"
    merged = weight.to("cpu", torch.float64, copy=True)

    assert ops.unmerge_(weight, lora_A, lora_B, scaling) is None
    assert weight.data_ptr() == ptr
    assert_close(weight, merged - delta, merged.abs() + delta_mag, dtype, adapter_dtype, name="unmerged weight")
    assert torch.equal(w_buf[outside], w_buf_before[outside]), "unmerge_ wrote outside the weight view"
    adapters.check()
