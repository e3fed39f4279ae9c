"""Tensors beyond 2³¹ elements on the GPU (issue 6): 32-bit index arithmetic anywhere in a kernel would
wrap and read or write the wrong rows. x, y, dy and dx here hold 263 168 × 8192 ≈ 2.16e9 elements each.

Checked against float64 computed on the GPU in row chunks (a float64 copy of x alone would take 17 GB):
every row-wise output (y, x·Aᵀ, dx) on rows at the start, around the 2³¹-element boundary and at the end;
the reductions over all tokens (dA, dB) in full. The memory the layer holds between forward and backward
is checked against the design: x·Aᵀ in float32 (tokens × r × 4 bytes) and nothing else beyond y.

Needs ≈ 30 GB of free GPU memory; skipped otherwise. Takes a few seconds on an H100.
"""
import pytest
import torch

import lora_ext
from conftest import CUDA_OK, assert_rel_close

IN_F = OUT_F = 8192
RANK = 16
TOKENS = 2**31 // IN_F + 1024  # past 2³¹ elements by 1024 rows
NEEDED_BYTES = 30 * 2**30

pytestmark = pytest.mark.skipif(
    not CUDA_OK or torch.cuda.mem_get_info()[0] < NEEDED_BYTES,
    reason="needs a CUDA device with lora_ext's CUDA kernels and ~30 GB of free memory",
)

# Rows whose every element sits past element 2³¹ of a (TOKENS, 8192) tensor, and rows before it.
BOUNDARY_ROW = 2**31 // IN_F
CHECK_ROWS = torch.tensor(
    [0, 1, 4095, BOUNDARY_ROW - 2, BOUNDARY_ROW - 1, BOUNDARY_ROW, BOUNDARY_ROW + 1, BOUNDARY_ROW + 777,
     TOKENS - 2, TOKENS - 1]
)


def _reference_reductions(x, grad_y, lora_A, lora_B, scaling, chunk=16384):
    """dA = s·(dy·B)ᵀ·x and dB = s·dyᵀ·(x·Aᵀ), in float64 on the GPU, accumulated over row chunks."""
    a64, b64 = lora_A.double(), lora_B.double()
    grad_A = torch.zeros_like(a64)
    grad_B = torch.zeros_like(b64)
    for start in range(0, x.shape[0], chunk):
        x64 = x[start:start + chunk].double()
        dy64 = grad_y[start:start + chunk].double()
        grad_A += scaling * (dy64 @ b64).t() @ x64
        grad_B += scaling * dy64.t() @ (x64 @ a64.t())
    return grad_A, grad_B


@torch.no_grad()
def _row_reference(x, grad_y, weight, bias, lora_A, lora_B, scaling):
    rows = CHECK_ROWS.to(x.device)
    x64, dy64 = x[rows].double(), grad_y[rows].double()
    w64, a64, b64 = weight.double(), lora_A.double(), lora_B.double()
    xa = x64 @ a64.t()
    y = x64 @ w64.t() + bias.double() + scaling * xa @ b64.t()
    grad_x = dy64 @ w64 + scaling * (dy64 @ b64) @ a64
    return y, xa, grad_x


def test_forward_backward_beyond_2_31_elements():
    torch.manual_seed(0)
    dtype = torch.bfloat16
    layer = lora_ext.LoRALinear(IN_F, OUT_F, r=RANK, alpha=32, device="cuda", dtype=dtype)
    with torch.no_grad():
        layer.weight.normal_(std=IN_F**-0.5)
        layer.lora_B.normal_()
    x = torch.randn(TOKENS, IN_F, device="cuda", dtype=dtype)
    assert x.numel() > 2**31
    x.requires_grad_(True)

    with torch.no_grad():  # first cuBLAS call: its 32 MiB workspace would otherwise count as held
        torch.nn.functional.linear(x[:8], layer.weight)  # (the layer itself serves 8 tokens without cuBLAS)
    torch.cuda.synchronize()
    held_before = torch.cuda.memory_allocated()
    y = layer(x)
    torch.cuda.synchronize()
    held_for_backward = torch.cuda.memory_allocated() - held_before - y.numel() * y.element_size()
    design_bytes = TOKENS * RANK * 4  # x·Aᵀ in float32; x itself is the caller's
    assert held_for_backward <= design_bytes + 2**20, (
        f"forward holds {held_for_backward / 2**20:.1f} MiB for backward beyond y; the design says "
        f"{design_bytes / 2**20:.1f} MiB (x·Aᵀ in float32)"
    )

    grad_y = torch.randn_like(y)
    y.backward(grad_y)

    ref_y, ref_xa, ref_grad_x = _row_reference(x.detach(), grad_y, layer.weight, layer.bias, layer.lora_A,
                                               layer.lora_B, layer.scaling)
    rows = CHECK_ROWS.to("cuda")
    assert_rel_close(y.detach()[rows], ref_y, dtype, name="y rows around 2^31")
    assert_rel_close(x.grad[rows], ref_grad_x, dtype, name="grad_x rows around 2^31")
    # x·Aᵀ is what the forward saved; the public op returns it as its second output.
    _, xa = torch.ops.lora_ext.lora_forward(x.detach(), layer.weight, layer.bias, layer.lora_A, layer.lora_B,
                                            layer.scaling, 0.0, None)
    assert_rel_close(xa[rows], ref_xa, dtype, name="x·Aᵀ rows around 2^31")
    del xa, y
    ref_grad_A, ref_grad_B = _reference_reductions(x.detach(), grad_y, layer.lora_A, layer.lora_B, layer.scaling)
    assert_rel_close(layer.lora_A.grad, ref_grad_A, dtype, name="grad_A over 2^31+ elements")
    assert_rel_close(layer.lora_B.grad, ref_grad_B, dtype, name="grad_B over 2^31+ elements")
