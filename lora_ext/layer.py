"""LoRALinear: a frozen linear layer plus a trainable rank-r update, on lora_ext's kernels.

Parameter names follow PEFT's vocabulary (lora_A, lora_B, scaling, r, lora_alpha, lora_dropout) so users
find them where they look; the forward is one call into lora_ext.ops."""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import ops

_INITS = ("kaiming", "gaussian")


def _check_hyperparameters(r, alpha, dropout, init):
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"LoRALinear: r (the rank) must be a positive integer, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"LoRALinear: alpha must be a finite number, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRALinear: dropout must be in [0, 1), got {dropout!r}")
    if init not in _INITS:
        raise ValueError(f"LoRALinear: init must be one of {_INITS}, got {init!r}")


class LoRALinear(nn.Module):
    """y = x·Wᵀ + b + scaling · dropout(x)·Aᵀ·Bᵀ with W, b frozen and A (r × in), B (out × r) trainable.

    scaling = alpha / r, or alpha / sqrt(r) with use_rslora. B starts at zero, so a new layer computes
    exactly its base layer. merge() folds the update into W (W += scaling·B·A) for a plain-linear forward.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 8,
        alpha: float = 16,
        dropout: float = 0.0,
        bias: bool = True,
        use_rslora: bool = False,
        init: str = "kaiming",
        device=None,
        dtype=None,
    ):
        super().__init__()
        _check_hyperparameters(r, alpha, dropout, init)
        if in_features < 1 or out_features < 1:
            raise ValueError(
                f"LoRALinear: in_features and out_features must be >= 1, got {in_features} and {out_features}"
            )
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._setup(base.weight, base.bias, r, alpha, dropout, use_rslora, init)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        r: int = 8,
        alpha: float = 16,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "kaiming",
    ) -> "LoRALinear":
        """Wrap an existing nn.Linear: the new layer shares (and freezes) its weight and bias."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"LoRALinear.from_linear expects an nn.Linear, got {type(linear).__name__}")
        _check_hyperparameters(r, alpha, dropout, init)
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._setup(linear.weight, linear.bias, r, alpha, dropout, use_rslora, init)
        return layer

    def _setup(self, weight, bias, r, alpha, dropout, use_rslora, init):
        self.in_features = weight.shape[1]
        self.out_features = weight.shape[0]
        self.r = r
        self.lora_alpha = alpha
        self.lora_dropout = float(dropout)
        self.use_rslora = use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        weight.requires_grad_(False)
        self.weight = weight
        if bias is not None:
            bias.requires_grad_(False)
        self.bias = bias
        factory = {"device": weight.device, "dtype": weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, **factory))
        self._merged = False
        self.reset_lora_parameters(init)

    @torch.no_grad()
    def reset_lora_parameters(self, init: str = "kaiming") -> None:
        """A as PEFT initialises it (kaiming-uniform, or N(0, 1/r) for "gaussian"); B = 0."""
        if init not in _INITS:
            raise ValueError(f"LoRALinear: init must be one of {_INITS}, got {init!r}")
        if self._merged:
            raise RuntimeError("LoRALinear: unmerge() before resetting the adapter")
        if init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        else:
            nn.init.normal_(self.lora_A, std=1.0 / self.r)
        nn.init.zeros_(self.lora_B)

    @property
    def merged(self) -> bool:
        return self._merged

    def _check_adapter_finite(self, action: str) -> None:
        # One device-to-host read for both factors: merge's cost is a pass over W, and a sync each would double it.
        if not bool(torch.isfinite(self.lora_A).all() & torch.isfinite(self.lora_B).all()):
            bad = "lora_A" if not torch.isfinite(self.lora_A).all() else "lora_B"
            raise ValueError(f"LoRALinear.{action}: {bad} holds NaN or Inf; the weight was left unchanged")

    @torch.no_grad()
    def merge(self) -> None:
        """W += scaling·B·A in place; the forward becomes one plain linear."""
        if self._merged:
            raise RuntimeError("LoRALinear.merge: the adapter is already merged; call unmerge() first")
        self._check_adapter_finite("merge")
        ops.merge_(self.weight, self.lora_A, self.lora_B, self.scaling)
        self._merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W -= scaling·B·A in place, undoing merge()."""
        if not self._merged:
            raise RuntimeError("LoRALinear.unmerge: the adapter is not merged")
        self._check_adapter_finite("unmerge")
        ops.unmerge_(self.weight, self.lora_A, self.lora_B, self.scaling)
        self._merged = False

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"LoRALinear: input must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() == 0:
            raise ValueError("LoRALinear: input must have shape (..., in_features), got a 0-dim tensor")
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"LoRALinear: input's last dimension must be in_features = {self.in_features}, "
                f"got shape {tuple(x.shape)}"
            )
        if x.device != self.weight.device:
            raise ValueError(f"LoRALinear: input is on {x.device} but the layer's weight is on {self.weight.device}")
        if x.dtype != self.weight.dtype:
            raise ValueError(
                f"LoRALinear: input dtype {x.dtype} does not match the layer's weight dtype {self.weight.dtype}"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if self._merged:
            if self.training and torch.is_grad_enabled() and (self.lora_A.requires_grad or self.lora_B.requires_grad):
                raise RuntimeError(
                    "LoRALinear: the adapter is merged into the weight, so training it would update nothing; "
                    "call unmerge() before training (or layer.eval() for inference)"
                )
            return F.linear(x, self.weight, self.bias)
        dropout_p = self.lora_dropout if self.training else 0.0
        return ops.lora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling, dropout_p)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"r={self.r}, lora_alpha={self.lora_alpha}, lora_dropout={self.lora_dropout}, "
            f"use_rslora={self.use_rslora}, merged={self._merged}"
        )
