"""Thin Python wrappers over torch.ops.lora_ext and their fake (meta) implementations for torch.compile. The kernels
and the autograd formula (csrc/autograd.cpp) live in csrc/; nothing here computes what an operator computes."""
import math
from typing import Optional

import torch

import lora_ext

from ._loader import load_extension

_extension = load_extension(lora_ext)  # registers torch.ops.lora_ext.*

__all__ = [
    "lora_linear",
    "new_dropout_seed",
    "dropout_keep_mask",
    "dropout_keep_scale",
    "merge_",
    "unmerge_",
    "cuda_kernels_available",
    "built_with_sm90a",
    "multi_lora_linear",
]


def cuda_kernels_available() -> bool:
    """Whether this build of lora_ext has its CUDA kernels (False for a CPU-only build)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("lora_ext::lora_forward", "CUDA")


def built_with_sm90a() -> bool:
    """Whether this build carries the Hopper (sm_90a) kernels: on an H100 or H200 the forward then runs as one GEMM
    with the LoRA update folded in (csrc/cuda/lora_gemm_sm90.cu); other GPUs use cuBLAS and our expand kernel."""
    return bool(_extension.built_with_sm90a())


def new_dropout_seed(device) -> torch.Tensor:
    """A fresh dropout seed (int64, shape (1,)) drawn from torch's generator on `device`: repeatable
    under torch.manual_seed, and drawn anew on every replay of a captured CUDA graph."""
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)


def _check_scaling(scaling, op: str) -> float:
    """scaling as a float; a clear ValueError for NaN or ±inf (which would poison the output, or W in place)."""
    value = float(scaling)
    if not math.isfinite(value):
        raise ValueError(f"{op}: scaling must be a finite number, got {value}")
    return value


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("lora_ext::lora_forward")
def _lora_forward_fake(x, weight, bias, lora_A, lora_B, scaling, dropout_p, dropout_seed):
    torch._check(x.dim() == 2, lambda: f"lora_forward: x must be 2-D, got {x.dim()}-D")
    torch._check(weight.shape[1] == x.shape[1], lambda: "lora_forward: weight must be (out_features, in_features)")
    # The shape and device checks of csrc/checks.h that decide the output shapes, so that a bad call fails
    # the same way under torch.compile (fake tensors) and on the meta device as it does eagerly.
    torch._check(
        lora_A.dim() == 2 and lora_A.shape[1] == x.shape[1],
        lambda: f"lora_forward: lora_A must have shape (r, in_features), got {tuple(lora_A.shape)}",
    )
    torch._check(
        lora_B.dim() == 2 and lora_B.shape[0] == weight.shape[0] and lora_B.shape[1] == lora_A.shape[0],
        lambda: f"lora_forward: lora_B must have shape (out_features, r), got {tuple(lora_B.shape)}",
    )
    for name, t in (("weight", weight), ("bias", bias), ("lora_A", lora_A), ("lora_B", lora_B)):
        torch._check(
            t is None or t.device == x.device,
            lambda: f"lora_forward: {name} is on {t.device} but x is on {x.device}; move all inputs to one device",
        )
    y = x.new_empty((x.shape[0], weight.shape[0]))
    lora_activation = x.new_empty((x.shape[0], lora_A.shape[0]), dtype=_accumulate_dtype(x.dtype))
    return y, lora_activation


@torch.library.register_fake("lora_ext::lora_backward")
def _lora_backward_fake(grad_y, x, weight, lora_A, lora_B, lora_activation, scaling, dropout_p, dropout_seed,
                        compute_grad_x):
    grad_x = x.new_empty(x.shape) if compute_grad_x else x.new_empty((0,))
    return grad_x, lora_A.new_empty(lora_A.shape), lora_B.new_empty(lora_B.shape)


@torch.library.register_fake("lora_ext::merge_exact_")
def _merge_exact_fake(weight, lora_A, lora_B, scaling, subtract, record, state, adapter_copy):
    return None


@torch.library.register_fake("lora_ext::merge_")
def _merge_fake(weight, lora_A, lora_B, scaling):
    return None


@torch.library.register_fake("lora_ext::unmerge_")
def _unmerge_fake(weight, lora_A, lora_B, scaling):
    return None


@torch.library.register_fake("lora_ext::dropout_keep_mask")
def _dropout_keep_mask_fake(dropout_seed, rows, cols, dropout_p):
    return dropout_seed.new_empty((rows, cols), dtype=torch.bool)


# The autograd formula of lora_forward is C++ (csrc/autograd.cpp, the Autograd dispatch key): it saves x, W, A, B,
# x·Aᵀ and the 8-byte seed, and its backward calls lora_backward.


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    dropout_seed: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """y = x·Wᵀ + b + scaling · dropout(x)·Aᵀ·Bᵀ for x of any leading shape (..., in_features).

    With dropout_p > 0 and no dropout_seed, a seed is drawn from torch's generator. Under torch.autocast it computes as
    LoRALinear does (and F.linear): x, weight and bias in the autocast dtype; float32 adapters stay float32 (the kernels
    take them on a 16-bit base), other adapters follow the autocast dtype. The raw operators
    (torch.ops.lora_ext.*) always compute in their inputs' dtypes."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"lora_linear: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0:
        raise ValueError("lora_linear: x must have at least one dimension (..., in_features), got a 0-dim tensor")
    scaling = _check_scaling(scaling, "lora_linear")
    dropout_p = float(dropout_p)
    if not 0.0 <= dropout_p < 1.0:  # before a seed is drawn: a bad p leaves torch's generator untouched
        raise ValueError(f"lora_linear: dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_p > 0 and dropout_seed is None:
        dropout_seed = new_dropout_seed(x.device)
    if dropout_p == 0:
        dropout_seed = None
    autocast_dtype = _autocast_dtype(x)
    if autocast_dtype is not None:
        x, weight, bias, lora_A, lora_B = _autocast_operands(autocast_dtype, x, weight, bias, lora_A, lora_B)
    if x.dim() == 2:  # the common case, without the reshape round trip (a few µs of host time per call)
        return torch.ops.lora_ext.lora_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, dropout_seed)[0]
    leading_shape = x.shape[:-1]
    # The token count is given, not inferred (-1): x of shape (..., 0) then reaches the operator's
    # "at least one feature" check instead of reshape's ambiguous-size error.
    x_2d = x.reshape(math.prod(leading_shape), x.shape[-1])
    y, _ = torch.ops.lora_ext.lora_forward(
        x_2d, weight, bias, lora_A, lora_B, scaling, dropout_p, dropout_seed
    )
    return y.view(*leading_shape, y.shape[-1])


def _autocast_dtype(x) -> Optional[torch.dtype]:
    """The autocast dtype for a floating tensor x where an autocast region is active for its device, else None (also
    used by LoRALinear)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        return None
    device_type = x.device.type
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _autocast_operands(dtype, x, weight, bias, lora_A, lora_B):
    """lora_linear's operands as autocast casts F.linear's (floating tensors other than float64), with float32
    adapters kept (LoRALinear's policy)."""

    def cast(t):
        return t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t

    if lora_A.dtype != torch.float32:
        lora_A, lora_B = cast(lora_A), cast(lora_B)
    return cast(x), cast(weight), cast(bias), lora_A, lora_B


def dropout_keep_mask(dropout_seed: torch.Tensor, rows: int, cols: int, dropout_p: float) -> torch.Tensor:
    """The boolean keep mask (rows, cols) that the kernels draw for this seed and probability."""
    return torch.ops.lora_ext.dropout_keep_mask(dropout_seed, rows, cols, float(dropout_p))


def dropout_keep_scale(dropout_p: float) -> float:
    """The factor kept elements are scaled by: 1 / (1 − p'), where p' = floor(p · 2^16) / 2^16 is the exact
    drop probability of the kernels' 16-bit comparisons (|p' − p| < 1.6e-5), so dropout is exactly unbiased.
    Mirrors dropout_keep_scale in csrc/dropout_mask.h."""
    if dropout_p <= 0:
        return 1.0
    threshold = min(math.floor(dropout_p * 65536.0), 65535)
    return 65536.0 / (65536.0 - threshold)


def merge_(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> None:
    """weight += scaling · lora_B · lora_A in place (float32 accumulation, one rounding)."""
    torch.ops.lora_ext.merge_(weight, lora_A, lora_B, _check_scaling(scaling, "merge_"))


def unmerge_(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> None:
    """weight -= scaling · lora_B · lora_A in place (float32 accumulation, one rounding)."""
    torch.ops.lora_ext.unmerge_(weight, lora_A, lora_B, _check_scaling(scaling, "unmerge_"))


# Multi-adapter batches: the fake and CUDA-composite implementations of multi_lora_forward register on import.
from .multi_adapter import multi_lora_linear  # noqa: E402
