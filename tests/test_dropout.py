"""Dropout: the keep mask, its statistics, and that forward and backward agree on it.

Statistical checks use bounds of 5 to 6 standard deviations; since every test is
seeded (conftest), a pass or failure is reproducible, not flaky.
"""

import math

import pytest
import torch

import lora_ext
from conftest import (
    CUDA_OK,
    DEVICES,
    assert_rel_close,
    lora_reference,
    make_params,
    rel_tol,
    requires_cuda,
    seed_tensor,
)

ops = torch.ops.lora_ext


def _float_dtype(device):
    # float64 where the backend has it, for exact comparisons.
    return torch.float64 if device == "cpu" else torch.float32


# ----------------------------------------------------------------------------
# The mask itself
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("rows,cols", [(37, 64), (1, 1), (0, 16), (5, 1), (3, 1000)])
@pytest.mark.parametrize("device", DEVICES)
def test_mask_shape_dtype_device(device, rows, cols):
    seed = seed_tensor(42, device)
    for mask in (
        ops.dropout_keep_mask(seed, rows, cols, 0.25),
        lora_ext.ops.dropout_keep_mask(seed, rows, cols, 0.25),
    ):
        assert mask.dtype == torch.bool
        assert mask.shape == (rows, cols)
        assert mask.device.type == device
    assert torch.equal(
        ops.dropout_keep_mask(seed, rows, cols, 0.25),
        lora_ext.ops.dropout_keep_mask(seed, rows, cols, 0.25),
    )


@pytest.mark.parametrize("device", DEVICES)
def test_mask_same_seed_same_mask(device):
    a = ops.dropout_keep_mask(seed_tensor(7, device), 64, 96, 0.4)
    b = ops.dropout_keep_mask(seed_tensor(7, device), 64, 96, 0.4)
    assert torch.equal(a, b)


@pytest.mark.parametrize("p", [0.01, 0.1, 0.5, 0.9])
@pytest.mark.parametrize("device", DEVICES)
def test_mask_keep_fraction(device, p):
    rows, cols = 256, 512
    n = rows * cols
    for seed_value in (0, 1, 123456789):
        mask = ops.dropout_keep_mask(seed_tensor(seed_value, device), rows, cols, p)
        kept = mask.double().mean().item()
        bound = 6 * math.sqrt(p * (1 - p) / n)
        assert abs(kept - (1 - p)) <= bound, f"seed {seed_value}: kept {kept:.4f}, expected {1 - p}"
        # Every row and every column drops its share too (no stripe of all-kept elements).
        row_frac = mask.double().mean(dim=1)
        col_frac = mask.double().mean(dim=0)
        # 8 sigma: hundreds of rows and columns, and binomial tails heavier than normal at p=0.01.
        row_bound = 8 * math.sqrt(p * (1 - p) / cols) + 1.0 / cols
        col_bound = 8 * math.sqrt(p * (1 - p) / rows) + 1.0 / rows
        assert (row_frac - (1 - p)).abs().max().item() <= row_bound
        assert (col_frac - (1 - p)).abs().max().item() <= col_bound


def _agreement_bound(p, n):
    """Expected agreement of two independent Bernoulli(1-p) masks and a 6-sigma bound."""
    q = p * p + (1 - p) * (1 - p)
    return q, 6 * math.sqrt(q * (1 - q) / n)


@pytest.mark.parametrize("p", [0.3, 0.5])
@pytest.mark.parametrize("device", DEVICES)
def test_mask_elements_independent(device, p):
    """Neighbouring elements, rows, and masks of neighbouring seeds look independent."""
    rows, cols = 256, 512
    mask = ops.dropout_keep_mask(seed_tensor(2024, device), rows, cols, p).cpu()

    pairs = {
        "next column": (mask[:, :-1], mask[:, 1:]),
        "column + 2": (mask[:, :-2], mask[:, 2:]),
        "column + 3": (mask[:, :-3], mask[:, 3:]),
        "column + 4": (mask[:, :-4], mask[:, 4:]),
        "next row": (mask[:-1], mask[1:]),
        "row + 2": (mask[:-2], mask[2:]),
    }
    other_seed = ops.dropout_keep_mask(seed_tensor(2025, device), rows, cols, p).cpu()
    pairs["seed + 1"] = (mask, other_seed)
    for name, (a, b) in pairs.items():
        expected, bound = _agreement_bound(p, a.numel())
        agreement = (a == b).double().mean().item()
        assert abs(agreement - expected) <= bound, (
            f"{name}: agreement {agreement:.4f}, independent masks give {expected:.4f}"
        )


@pytest.mark.parametrize("device", DEVICES)
def test_new_dropout_seed(device):
    seed = lora_ext.ops.new_dropout_seed(device)
    assert seed.dtype == torch.int64 and seed.shape == (1,) and seed.device.type == device
    torch.manual_seed(31)
    a = lora_ext.ops.new_dropout_seed(device)
    b = lora_ext.ops.new_dropout_seed(device)
    torch.manual_seed(31)
    a2 = lora_ext.ops.new_dropout_seed(device)
    b2 = lora_ext.ops.new_dropout_seed(device)
    assert torch.equal(a, a2) and torch.equal(b, b2)
    assert not torch.equal(a, b), "two draws from the generator gave the same seed"


def _philox4x32_10(c, k):
    """Philox4x32-10 (Salmon et al. 2011) in plain Python integers: the reference for csrc/dropout_mask.h."""
    c0, c1, c2, c3 = c
    k0, k1 = k
    mask32 = 0xFFFFFFFF
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & mask32, p1 & mask32, ((p0 >> 32) ^ c3 ^ k1) & mask32, p0 & mask32
        k0, k1 = (k0 + 0x9E3779B9) & mask32, (k1 + 0xBB67AE85) & mask32
    return c0, c1, c2, c3


def _reference_keep_mask(seed, rows, cols, p):
    """Element (row, col) is kept when its 16-bit half of Philox word (col % 8) // 2, counter (col // 8, row),
    key seed, is ≥ floor(p · 2^16)."""
    threshold = min(math.floor(p * 65536.0), 65535)
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for row in range(rows):
        for group in range((cols + 7) // 8):
            words = _philox4x32_10((group & 0xFFFFFFFF, group >> 32, row & 0xFFFFFFFF, row >> 32),
                                   (seed & 0xFFFFFFFF, seed >> 32))
            for e in range(min(8, cols - 8 * group)):
                half = (words[e // 2] >> (16 * (e % 2))) & 0xFFFF
                mask[row, 8 * group + e] = half >= threshold
    return mask


@pytest.mark.parametrize("p", [0.05, 0.5])
@pytest.mark.parametrize("rows,cols", [(3, 45), (17, 8), (2, 100), (3, 200)])
def test_mask_matches_python_philox_reference(rows, cols, p):
    """Pins the CPU mask's random stream to an independent implementation (the CUDA mask must equal the CPU
    one: test_mask_cpu_equals_cuda), so that a faster CPU generator cannot drift from it unnoticed."""
    for seed_value in (0, 12345, 2**40 + 3):
        cpu = ops.dropout_keep_mask(seed_tensor(seed_value, "cpu"), rows, cols, p)
        reference = _reference_keep_mask(seed_value, rows, cols, p)
        assert torch.equal(cpu, reference), f"seed {seed_value}: mask differs from the reference"


@requires_cuda
@pytest.mark.parametrize("p", [0.1, 0.3, 0.7])
@pytest.mark.parametrize("rows,cols", [(37, 13), (1, 1000), (513, 7), (256, 512)])
def test_mask_cpu_equals_cuda(rows, cols, p):
    for seed_value in (0, 5, 2**40 + 3):
        cpu = ops.dropout_keep_mask(seed_tensor(seed_value, "cpu"), rows, cols, p)
        cuda = ops.dropout_keep_mask(seed_tensor(seed_value, "cuda"), rows, cols, p)
        assert torch.equal(cpu, cuda.cpu()), f"seed {seed_value}: CPU and CUDA masks differ"


# ----------------------------------------------------------------------------
# Dropout inside the operators
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.2, 0.5])
@pytest.mark.parametrize("device", DEVICES)
def test_dropout_is_unbiased(device, p):
    """The mean over many seeds of the LoRA part is the no-dropout LoRA part.

    Per element, the LoRA part s * sum_j x_j keep_j / (1-p) M_jo (M = A^T B^T)
    has variance s^2 sum_j (x_j M_jo)^2 p / (1-p); the mean of N independent draws
    lies within 5 standard errors of the expectation, and the sample variance
    matches the predicted one.
    """
    dtype = _float_dtype(device)
    tokens, in_features, out_features, rank = 4, 16, 6, 4
    scaling = 1.5
    draws = 600
    x = torch.randn(tokens, in_features).to(device, dtype)
    weight, _, lora_A, lora_B = make_params(
        in_features, out_features, rank, dtype, dtype, device, bias=False
    )
    zero_weight = torch.zeros_like(weight)  # isolates the LoRA part: y = s * dropout(x) A^T B^T

    samples = []
    with torch.no_grad():
        for _ in range(draws):
            seed = lora_ext.ops.new_dropout_seed(device)
            y = lora_ext.ops.lora_linear(x, zero_weight, None, lora_A, lora_B, scaling, p, seed)
            samples.append(y.to("cpu", torch.float64))
    samples = torch.stack(samples)

    x64, a64, b64 = (t.to("cpu", torch.float64) for t in (x, lora_A, lora_B))
    m = a64.t() @ b64.t()  # (in, out)
    expected = scaling * x64 @ m
    variance = scaling**2 * (x64.pow(2) @ m.pow(2)) * p / (1 - p)
    z = (samples.mean(0) - expected) / (variance / draws).sqrt()
    assert z.abs().max().item() <= 5, f"mean over seeds is biased: max |z| = {z.abs().max():.2f}"
    ratio = samples.var(0).sum().item() / variance.sum().item()
    assert 0.75 <= ratio <= 1.33, f"sample variance / predicted variance = {ratio:.3f}"


@pytest.mark.parametrize("in_features", [48, 136], ids=["tail-only", "blocks-and-tail"])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("device", DEVICES)
def test_backward_uses_forward_mask(device, p, in_features):
    """Gradients are those of the mask dropout_keep_mask reports for the forward's seed.

    A backward that regenerated a different mask would be off by order one. 136 features take the CPU mask's
    64-column blocks and its 8-column tail (the backward draws the mask once for dA and dx together).
    """
    dtype = _float_dtype(device)
    out_features, rank = 40, 8
    x = torch.randn(3, 17, in_features).to(device, dtype).requires_grad_(True)
    weight, bias, lora_A, lora_B = make_params(in_features, out_features, rank, dtype, dtype, device)
    lora_A.requires_grad_(True)
    lora_B.requires_grad_(True)
    seed = lora_ext.ops.new_dropout_seed(device)

    y = lora_ext.ops.lora_linear(x, weight, bias, lora_A, lora_B, 1.25, p, seed)
    grad_y = torch.randn(y.shape).to(device, dtype)
    y.backward(grad_y)

    keep = lora_ext.ops.dropout_keep_mask(seed, 3 * 17, in_features, p)
    ref = lora_reference(x, weight, bias, lora_A, lora_B, 1.25, p, keep, grad_y)
    assert_rel_close(y, ref["y"], dtype, name="y")
    assert_rel_close(x.grad, ref["grad_x"], dtype, name="x.grad")
    assert_rel_close(lora_A.grad, ref["grad_A"], dtype, name="lora_A.grad")
    assert_rel_close(lora_B.grad, ref["grad_B"], dtype, name="lora_B.grad")


@pytest.mark.parametrize("device", DEVICES)
def test_same_seed_same_outputs(device):
    dtype = _float_dtype(device)
    in_features, out_features, rank = 32, 24, 4
    x0 = torch.randn(9, in_features).to(device, dtype)
    params = make_params(in_features, out_features, rank, dtype, dtype, device)
    seed = seed_tensor(77, device)

    def run(seed):
        x = x0.clone().requires_grad_(True)
        weight, bias, lora_A, lora_B = (t.clone() for t in params)
        lora_A.requires_grad_(True)
        lora_B.requires_grad_(True)
        y = lora_ext.ops.lora_linear(x, weight, bias, lora_A, lora_B, 2.0, 0.5, seed)
        y.backward(torch.ones_like(y))
        return y.detach(), x.grad, lora_A.grad, lora_B.grad

    first, second = run(seed), run(seed.clone())
    for name, a, b in zip(("y", "x.grad", "lora_A.grad", "lora_B.grad"), first, second):
        assert torch.equal(a, b), f"{name} differs between two runs with the same seed"
    other = run(seed_tensor(78, device))
    assert not torch.equal(first[0], other[0]), "a different seed gave the same output"


# ----------------------------------------------------------------------------
# Dropout inside LoRALinear
# ----------------------------------------------------------------------------


def _layer_with_random_B(in_features, out_features, rank, dropout, device, dtype, alpha=8):
    layer = lora_ext.LoRALinear(
        in_features, out_features, r=rank, alpha=alpha, dropout=dropout, device=device, dtype=dtype
    )
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape) * rank**-0.5)
    return layer


@pytest.mark.parametrize("device", DEVICES)
def test_layer_manual_seed_reproduces_training_step(device):
    dtype = torch.float32

    def run(k):
        torch.manual_seed(k)
        layer = _layer_with_random_B(16, 12, 4, 0.3, device, dtype)
        layer.train()
        x = torch.randn(2, 5, 16, device=device, dtype=dtype, requires_grad=True)
        y = layer(x)
        y.backward(torch.randn(y.shape, device=device, dtype=dtype))
        return y.detach(), x.grad, layer.lora_A.grad, layer.lora_B.grad

    first, second = run(5), run(5)
    for name, a, b in zip(("y", "x.grad", "lora_A.grad", "lora_B.grad"), first, second):
        assert torch.equal(a, b), f"{name} differs after the same torch.manual_seed"
    other = run(6)
    assert not torch.equal(first[0], other[0])


@pytest.mark.parametrize("device", DEVICES)
def test_layer_draws_a_new_mask_each_training_step(device):
    layer = _layer_with_random_B(16, 12, 4, 0.5, device, torch.float32)
    layer.train()
    x = torch.randn(6, 16, device=device)
    with torch.no_grad():
        y1 = layer(x)
        y2 = layer(x)
    assert not torch.equal(y1, y2), "two training forwards used the same dropout mask"


@pytest.mark.parametrize("device", DEVICES)
def test_layer_training_forward_and_backward_share_mask(device):
    """Recover the mask the layer used from its output, then check its gradients.

    With in_features <= r <= out_features, M = A^T B^T has full row rank, so
    dropout(x) = (y - x W^T - b) / s * pinv(M) is recoverable from y alone and
    tells which elements were kept. The gradients must be those of that mask.
    """
    dtype = _float_dtype(device)
    in_features, out_features, rank, p = 6, 10, 8, 0.5
    layer = _layer_with_random_B(in_features, out_features, rank, p, device, dtype)
    layer.train()
    x = torch.randn(20, in_features, device=device, dtype=dtype, requires_grad=True)
    y = layer(x)
    grad_y = torch.randn(y.shape, device=device, dtype=dtype)
    y.backward(grad_y)

    x64, w64, b64, a64, bb64, y64 = (
        t.detach().to("cpu", torch.float64)
        for t in (x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, y)
    )
    lora_part = (y64 - x64 @ w64.t() - b64) / layer.scaling
    m = a64.t() @ bb64.t()  # (in, out)
    x_dropped = torch.linalg.lstsq(m.t(), lora_part.t()).solution.t()
    keep = x_dropped.abs() > 0.5 * x64.abs() / (1 - p)
    # A sanity check of the reconstruction itself (least squares loses a few digits).
    reconstruction_tol = 1e-8 if rel_tol(dtype, layer.lora_A.dtype) <= 1e-10 else 1e-3
    err = (x_dropped - x64 * keep / (1 - p)).norm() / x64.norm()
    assert err <= reconstruction_tol, f"y is not x W^T + b + s * (x * keep / (1-p)) A^T B^T: {err:.2e}"
    assert 0 < keep.sum() < keep.numel(), "dropout=0.5 kept all or none of the elements"

    ref = lora_reference(
        x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling, p, keep, grad_y
    )
    adapter_dtype = layer.lora_A.dtype
    assert_rel_close(x.grad, ref["grad_x"], dtype, adapter_dtype, name="x.grad")
    assert_rel_close(layer.lora_A.grad, ref["grad_A"], dtype, adapter_dtype, name="lora_A.grad")
    assert_rel_close(layer.lora_B.grad, ref["grad_B"], dtype, adapter_dtype, name="lora_B.grad")


@pytest.mark.parametrize("device", DEVICES)
def test_eval_mode_never_drops(device):
    dtype = torch.float32
    layer = _layer_with_random_B(24, 16, 4, 0.9, device, dtype)
    layer.eval()
    x = torch.randn(3, 7, 24, device=device, dtype=dtype)
    y1 = layer(x)
    y2 = layer(x)
    assert torch.equal(y1, y2)
    ref = lora_reference(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling)
    assert_rel_close(y1, ref["y"], dtype, layer.lora_A.dtype, name="eval output")
    # Switching back to training mode drops again (the layer is not simply dropout-free).
    layer.train()
    with torch.no_grad():
        y_train = layer(x)
    assert not torch.allclose(y_train, y1)
