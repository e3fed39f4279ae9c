"""The CUDA backend picks among several kernels by shape, rank, dtype and alignment (csrc/cuda/lora_steps.cuh,
lora_decode.cuh, one_adapter_decode.h). Each case here sits on one side of a boundary between them, and is checked
against the float64 reference through test_ops' forward and backward checks: without dropout, on Hopper, the
multi-adapter decoding cluster kernel on one slot (≤ 64 tokens, r ≤ 64; ≤ 48 tokens above r = 32); with dropout or elsewhere, the fused
decoding kernel (≤ 32 tokens, r % 8 == 0, r ≤ 32), the tensor-core shrink (≥ 512 tokens, with a tail of tokens % 16 rows on the general
kernel), the tensor-core expand (r ≤ 128) and token reduction (r ≤ 64, larger ranks in chunks of 64), with ranks that are
not a multiple of 8 read element by element with zeros past r, the shrink in chunks of 64 ranks above r = 64,
widths % 8 == 0, and their float32-FMA fallbacks. Without dropout, from 512 tokens, ranks above 16 take cuBLAS for the
shrink and the token reductions (kCublasMinRank); test_kernel_path_our_kernels_above_rank_16 keeps them on ours. From
65 to 511 tokens the shrink of 16-bit x by adapters of its dtype takes cuBLAS at every rank
(test_kernel_path_shrink_between_decoding_and_tiles runs both)."""

import pytest
import torch

from conftest import lora_reference, make_params, make_x, requires_cuda, seed_tensor
from test_ops import SCALING, _check_backward

pytestmark = requires_cuda

# (tokens, in_features, out_features, rank)
PATH_SHAPES = [
    pytest.param((1, 256, 128, 8), id="decode-1tok-r8"),
    pytest.param((16, 256, 136, 16), id="decode-16tok-r16"),
    pytest.param((32, 264, 128, 24), id="decode-32tok-r24"),
    pytest.param((32, 256, 128, 32), id="decode-32tok-r32"),
    pytest.param((33, 256, 128, 16), id="cluster-or-general-33tok"),
    pytest.param((48, 264, 136, 5), id="cluster-or-general-48tok-r5"),
    pytest.param((64, 256, 128, 64), id="general-64tok-r64"),
    pytest.param((16, 256, 128, 40), id="general-decode-r40"),
    pytest.param((515, 192, 136, 16), id="wmma-tail3"),
    pytest.param((512, 256, 128, 8), id="wmma-r8"),
    pytest.param((530, 200, 72, 40), id="wmma-rpad64"),
    pytest.param((600, 256, 128, 64), id="wmma-r64"),
    pytest.param((520, 256, 128, 1), id="wmma-r1"),
    pytest.param((520, 256, 128, 3), id="wmma-r3-zero-filled"),
    pytest.param((520, 256, 128, 4), id="wmma-r4-zero-filled"),
    pytest.param((517, 264, 136, 12), id="wmma-r12-zero-filled-tail5"),
    pytest.param((519, 136, 128, 20), id="wmma-r20-rpad32-tail7"),
    pytest.param((520, 128, 136, 100), id="wmma-r100-chunks-64-36"),
    pytest.param((520, 256, 128, 72), id="wmma-r72-two-chunks"),
    pytest.param((531, 256, 136, 128), id="wmma-r128-rpad128-tail3"),
    pytest.param((520, 128, 128, 130), id="wmma-r130-chunk-tail2"),
    pytest.param((16, 256, 128, 128), id="general-decode-r128"),
    pytest.param((520, 256, 128, 200), id="fma-expand-r200"),
    pytest.param((520, 256, 67, 16), id="fma-expand-out67"),
    pytest.param((520, 100, 128, 16), id="fma-in100"),
    # the one-pass dxa/dB kernel (lora_dy_pass.cuh, ≥ 1024 columns): three column groups, the last of 136 columns;
    # a last 128-token step of 6 tokens; an odd rank with a last tile of 8 columns (test_dy_pass_cuda.py: its edges)
    pytest.param((1030, 128, 1160, 16), id="dy-pass-3-groups-tail6"),
    pytest.param((700, 64, 1032, 5), id="dy-pass-r5-3-groups-8-columns"),
]

CUDA_DTYPES = [
    pytest.param(torch.bfloat16, torch.bfloat16, id="bf16"),
    pytest.param(torch.bfloat16, torch.float32, id="bf16-adapters_f32"),
    pytest.param(torch.float16, torch.float16, id="f16"),
    pytest.param(torch.float16, torch.float32, id="f16-adapters_f32"),
]


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("shape", PATH_SHAPES)
@pytest.mark.parametrize("dtype,adapter_dtype", CUDA_DTYPES)
def test_kernel_path_forward_backward(dtype, adapter_dtype, shape, dropout_p):
    tokens, in_features, out_features, rank = shape
    x = make_x(tokens, in_features, dtype, "cuda")
    params = make_params(in_features, out_features, rank, dtype, adapter_dtype, "cuda")
    _check_backward(x, *params, dropout_p)


@pytest.mark.parametrize("layout", ["offset", "strided", "transposed"])
@pytest.mark.parametrize("tokens", [16, 600], ids=["decode", "wmma"])
def test_kernel_path_unaligned_or_strided_x(layout, tokens):
    """Views whose rows are not 16-byte aligned must take the general kernels and stay exact."""
    x = make_x(tokens, 256, torch.bfloat16, "cuda", layout)
    params = make_params(256, 128, 16, torch.bfloat16, torch.bfloat16, "cuda")
    _check_backward(x, *params, 0.3)


@pytest.mark.parametrize("a_layout", ["transposed", "offset-columns"])
@pytest.mark.parametrize("rank", [4, 12, 16])
@pytest.mark.parametrize("adapter_dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
def test_kernel_path_adapter_views(rank, adapter_dtype, a_layout):
    """Adapters given as views take the tensor-core expand and token reduction and stay exact: B a column slice at
    an element offset (rows on no 16-byte boundary), A the transpose of an (in × r) tensor or a column slice at an
    element offset (which neither of the expand's loaders reads: it gets a contiguous copy)."""
    tokens, in_features, out_features = 520, 256, 136
    x = make_x(tokens, in_features, torch.bfloat16, "cuda")
    weight, bias, lora_A, lora_B = make_params(in_features, out_features, rank, torch.bfloat16, adapter_dtype, "cuda")
    wide_B = torch.randn(out_features, rank + 3, device="cuda").to(adapter_dtype)
    wide_B[:, 1 : rank + 1] = lora_B
    lora_B_view = wide_B[:, 1 : rank + 1]
    if a_layout == "transposed":
        lora_A_view = lora_A.t().contiguous().t()
    else:
        wide_A = torch.randn(rank, in_features + 1, device="cuda").to(adapter_dtype)
        wide_A[:, 1:] = lora_A
        lora_A_view = wide_A[:, 1:]
    assert not lora_B_view.is_contiguous() and not lora_A_view.is_contiguous()
    _check_backward(x, weight, bias, lora_A_view, lora_B_view, 0.3)


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_shrink_tail_rows_round_float32_adapters_like_the_others(dropout_p):
    """≥ 512 tokens: the tensor-core shrink takes whole groups of 16 rows and the general kernel the last
    tokens % 16. Both round float32 A to x's dtype (the tensor-core kernel as it stages A), so every row of xa is
    A rounded to bfloat16 times dropout(x), summed in float32: the tail rows too, row by row."""
    tokens, in_features = 16 * 40 + 7, 264
    x = make_x(tokens, in_features, torch.bfloat16, "cuda")
    weight, bias, lora_A, lora_B = make_params(in_features, 136, 16, torch.bfloat16, torch.float32, "cuda")
    seed = seed_tensor(5, x.device) if dropout_p > 0 else None
    _, xa = torch.ops.lora_ext.lora_forward(x, weight, bias, lora_A, lora_B, SCALING, dropout_p, seed)
    keep = None
    if seed is not None:
        keep = torch.ops.lora_ext.dropout_keep_mask(seed, tokens, in_features, dropout_p)
    rounded = lora_reference(x, weight, bias, lora_A.to(torch.bfloat16), lora_B, SCALING, dropout_p, keep)["xa"]
    row_error = (xa.cpu().double() - rounded).norm(dim=1) / rounded.norm(dim=1).clamp_min(1e-30)
    assert row_error[-7:].max().item() <= 1e-5, row_error[-7:]
    assert row_error.max().item() <= 1e-5


# Ranks above 16 from 512 tokens: cuBLAS's shrink and token reductions without dropout (lora_steps.cuh,
# kCublasMinRank); ours still serve them with dropout, and here without it.
OUR_KERNELS_ABOVE_RANK_16 = [
    pytest.param((519, 136, 128, 20), id="r20-rpad32-tail7"),
    pytest.param((517, 264, 136, 24), id="r24-tail5"),
    pytest.param((520, 256, 128, 32), id="r32"),
    pytest.param((530, 200, 72, 40), id="r40-rpad64"),
    pytest.param((600, 256, 128, 64), id="r64"),
]


@pytest.mark.parametrize("shape", OUR_KERNELS_ABOVE_RANK_16)
@pytest.mark.parametrize("dtype,adapter_dtype", CUDA_DTYPES)
def test_kernel_path_our_kernels_above_rank_16(monkeypatch, dtype, adapter_dtype, shape):
    """LORA_EXT_CUBLAS_MIN_RANK=1000: the tensor-core shrink and token reduction without dropout at ranks 17–64,
    which cuBLAS serves by default, against the float64 reference."""
    monkeypatch.setenv("LORA_EXT_CUBLAS_MIN_RANK", "1000")
    tokens, in_features, out_features, rank = shape
    x = make_x(tokens, in_features, dtype, "cuda")
    _check_backward(x, *make_params(in_features, out_features, rank, dtype, adapter_dtype, "cuda"), 0.0)


@pytest.mark.parametrize("cublas_shrink", ["1", "0"], ids=["cublas", "general"])
@pytest.mark.parametrize("shape", [(65, 256, 128, 16), (130, 264, 136, 40), (511, 200, 72, 5), (300, 256, 128, 128)],
                         ids=["65tok-r16", "130tok-r40", "511tok-r5", "300tok-r128"])
@pytest.mark.parametrize("dtype,adapter_dtype", CUDA_DTYPES)
def test_kernel_path_shrink_between_decoding_and_tiles(monkeypatch, dtype, adapter_dtype, shape, cublas_shrink):
    """65–511 tokens without dropout: x·Aᵀ and dy·B on cuBLAS where the adapters are in x's dtype (float32 adapters
    stay on the general kernel), or on the general kernel with LORA_EXT_CUBLAS_SHRINK=0; both against the float64
    reference, forward and backward."""
    monkeypatch.setenv("LORA_EXT_CUBLAS_SHRINK", cublas_shrink)
    tokens, in_features, out_features, rank = shape
    x = make_x(tokens, in_features, dtype, "cuda")
    _check_backward(x, *make_params(in_features, out_features, rank, dtype, adapter_dtype, "cuda"), 0.0)
