"""LoRALinear: a frozen linear layer plus trainable rank-r updates (named adapters), on lora_ext's kernels.

Parameter names follow PEFT's vocabulary (lora_A, lora_B, scaling, r, lora_alpha, lora_dropout) so users
find them where they look. A layer holds one or more named adapters (`adapters`, a ModuleDict) and applies the
active one; the forward is one call into lora_ext.ops."""
import warnings
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .adapter import (INITS, AdapterDict, LoRAAdapter, check_adapter_name, check_hyperparameters,
                      registered_parameter, resolve_adapter_dtype)
from .exact_merge import (MergeRecord, NonFiniteAdapterError, adapter_changed_while_merged, merge_with_record,
                          record_matches, unmerge_with_record)
from .multi_adapter import AdapterStack, multi_lora_linear


_lora_forward_op = torch.ops.lora_ext.lora_forward.default  # bound once: the packet's lookup costs host time


# What a call with a bad input raises from the operator (or from Python before it: x.dim() of a list), for the
# layer to reword in its own terms.
_CALL_ERRORS = (RuntimeError, ValueError, TypeError, IndexError, AttributeError)



class LoRALinear(nn.Module):
    """y = x·Wᵀ + b + scaling · dropout(x)·Aᵀ·Bᵀ with W, b frozen and A (r × in), B (out × r) trainable.

    scaling = alpha / r, or alpha / sqrt(r) with use_rslora. B starts at zero, so a new layer computes
    exactly its base layer. merge() folds the active adapter into W (W += scaling·B·A) for a plain-linear
    forward; unmerge() restores W bit for bit. More adapters: add_adapter(name, ...), set_adapter(name).
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
        adapter_name: str = "default",
        adapter_dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        check_hyperparameters(r, alpha, dropout, init)
        check_adapter_name(adapter_name)
        if in_features < 1 or out_features < 1:
            raise ValueError(
                f"LoRALinear: in_features and out_features must be >= 1, got {in_features} and {out_features}"
            )
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        resolve_adapter_dtype(base.weight.dtype, adapter_dtype)
        self._setup_base(base.weight, base.bias)
        self.add_adapter(adapter_name, r, alpha, dropout, use_rslora, init, adapter_dtype)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        r: int = 8,
        alpha: float = 16,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "kaiming",
        adapter_name: str = "default",
        adapter_dtype: Optional[torch.dtype] = None,
    ) -> "LoRALinear":
        """Wrap an existing nn.Linear: the new layer shares (and freezes) its weight and bias."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"LoRALinear.from_linear expects an nn.Linear, got {type(linear).__name__}")
        check_hyperparameters(r, alpha, dropout, init)
        check_adapter_name(adapter_name)
        resolve_adapter_dtype(linear.weight.dtype, adapter_dtype)
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._setup_base(linear.weight, linear.bias)
        layer.add_adapter(adapter_name, r, alpha, dropout, use_rslora, init, adapter_dtype)
        return layer

    def _setup_base(self, weight, bias):
        self.in_features = weight.shape[1]
        self.out_features = weight.shape[0]
        weight.requires_grad_(False)
        self.weight = weight
        if bias is not None:
            bias.requires_grad_(False)
        self.bias = bias
        self.adapters = AdapterDict()  # counts additions and removals (AdapterStack's O(1) check)
        self.active_adapter: Optional[str] = None
        self.adapters_enabled = True
        self._merged_adapter: Optional[str] = None
        self._merge_record: Optional[MergeRecord] = None
        self._adapter_stack: Optional[AdapterStack] = None  # stacked adapters for mixed batches (multi_adapter.py)
        self._mixed_ids: Optional[torch.Tensor] = None  # per-row slot ids, set by lora_ext.mixed_adapters

    # ----------------------------------------------------------------------------------------------------------
    # Adapters
    def add_adapter(
        self,
        name: str,
        r: int = 8,
        alpha: float = 16,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "kaiming",
        adapter_dtype: Optional[torch.dtype] = None,
    ) -> LoRAAdapter:
        """Add a new adapter (B = 0, so it starts as the base layer). The first adapter becomes the active one."""
        check_hyperparameters(r, alpha, dropout, init)
        check_adapter_name(name)
        if name in self.adapters:
            raise ValueError(f"LoRALinear: an adapter named {name!r} exists already; delete_adapter({name!r}) first")
        dtype = resolve_adapter_dtype(self.weight.dtype, adapter_dtype)
        adapter = LoRAAdapter(self.in_features, self.out_features, r, alpha, dropout, use_rslora, init,
                              device=self.weight.device, dtype=dtype)
        self.adapters[name] = adapter
        if self.active_adapter is None:
            self.active_adapter = name
        if getattr(self, "_adapter_stack", None) is not None:
            self._adapter_stack.sync(self)  # writes the new adapter's slot only
        return adapter

    def delete_adapter(self, name: str) -> None:
        self._require_adapter(name)
        if self._merged_adapter == name:
            self.unmerge()
        del self.adapters[name]
        if self.active_adapter == name:
            self.active_adapter = next(iter(self.adapters), None)
        if getattr(self, "_adapter_stack", None) is not None:
            self._adapter_stack.sync(self)  # zeroes and frees the adapter's slot only

    def set_adapter(self, name: str, missing_ok: bool = False) -> None:
        """Make `name` the adapter the forward applies (no copy of any weight). A merged adapter is unmerged first.

        missing_ok=True accepts a name this layer does not hold: the layer then computes its base layer alone (as
        PEFT's layers do when a model's adapters target different modules; lora_ext.set_adapter uses it)."""
        if missing_ok:
            check_adapter_name(name)
        else:
            self._require_adapter(name)
        if name == self.active_adapter:
            return
        if self.merged:
            warnings.warn(f"LoRALinear.set_adapter: unmerging adapter {self._merged_adapter!r} before switching")
            self.unmerge()
        self.active_adapter = name

    def enable_adapters(self, enabled: bool = True) -> None:
        """enabled=False makes the forward the plain base layer (a merged adapter is unmerged first)."""
        if not enabled and self.merged:
            self.unmerge()
        self.adapters_enabled = bool(enabled)

    @property
    def adapter_names(self) -> List[str]:
        return list(self.adapters.keys())

    def _require_adapter(self, name: str) -> None:
        if name not in self.adapters:
            raise KeyError(f"LoRALinear: no adapter named {name!r}; this layer has {self.adapter_names}")

    def _active(self) -> LoRAAdapter:
        if self.active_adapter is None:
            raise RuntimeError("LoRALinear: the layer has no adapter; add_adapter() first")
        if self.active_adapter not in self.adapters:
            raise RuntimeError(
                f"LoRALinear: the active adapter {self.active_adapter!r} is not in this layer (it computes its base "
                f"layer alone); this layer has {self.adapter_names}"
            )
        return self.adapters[self.active_adapter]

    # The active adapter's tensors and hyperparameters, under PEFT's names.
    @property
    def lora_A(self) -> nn.Parameter:
        return self._active().lora_A

    @property
    def lora_B(self) -> nn.Parameter:
        return self._active().lora_B

    @property
    def r(self) -> int:
        return self._active().r

    @property
    def lora_alpha(self) -> float:
        return self._active().lora_alpha

    @property
    def lora_dropout(self) -> float:
        return self._active().lora_dropout

    @property
    def use_rslora(self) -> bool:
        return self._active().use_rslora

    @property
    def scaling(self) -> float:
        return self._active().scaling

    @torch.no_grad()
    def reset_lora_parameters(self, init: str = "kaiming") -> None:
        """Re-initialise the active adapter: A as PEFT does (kaiming-uniform, or N(0, 1/r)); B = 0."""
        if init not in INITS:
            raise ValueError(f"LoRALinear: init must be one of {INITS}, got {init!r}")
        if self.merged:
            raise RuntimeError("LoRALinear: unmerge() before resetting the adapter")
        self._active().reset_parameters(init)

    # ----------------------------------------------------------------------------------------------------------
    # Merging
    @property
    def merged(self) -> bool:
        return self._merged_adapter is not None

    @torch.no_grad()
    def merge(self) -> None:
        """W += scaling·B·A in place for the active adapter; the forward becomes one plain linear.

        Atomic: on NaN/Inf in the adapter, or a delta that overflows W's dtype, W is left unchanged.
        Keeps a small record so that unmerge() restores W bit for bit (lora_ext/exact_merge.py)."""
        if self.merged:
            raise RuntimeError(
                f"LoRALinear.merge: adapter {self._merged_adapter!r} is already merged; call unmerge() first"
            )
        if not self.adapters_enabled:
            raise RuntimeError("LoRALinear.merge: adapters are disabled; enable_adapters() first")
        adapter = self._active()
        try:  # the merge checks the adapter for NaN/Inf itself (a flag of its kernel: no extra pass, no sync)
            weight = registered_parameter(self, "weight")
            record = merge_with_record(weight, adapter.lora_A, adapter.lora_B, adapter.scaling)
        except NonFiniteAdapterError as error:
            raise ValueError(
                f"LoRALinear.merge: {error.tensor_name} holds NaN or Inf; the weight was left unchanged"
            ) from None
        # Plain attributes (never tensors or modules): set past nn.Module.__setattr__'s registry checks, which
        # cost a few µs each on a host-bound merge/unmerge.
        object.__setattr__(self, "_merge_record", record)
        object.__setattr__(self, "_merged_adapter", self.active_adapter)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo merge(): W is restored bit for bit, even if the adapter was edited through .data while merged (the
        record keeps the adapter as merged; a warning says the edit happened). If W itself changed while merged
        (the model converted or moved), W -= scaling·B·A with the current adapter, and a warning says the result
        is not bit-exact."""
        if not self.merged:
            raise RuntimeError("LoRALinear.unmerge: the adapter is not merged")
        adapter = self.adapters[self._merged_adapter]
        record, weight = self._merge_record, registered_parameter(self, "weight")
        if record is not None and record_matches(record, weight, adapter.lora_A, adapter.lora_B, adapter.scaling):
            unmerge_with_record(weight, adapter.lora_A, adapter.lora_B, adapter.scaling, record)
            if adapter_changed_while_merged(record):  # one flag read back, after the unmerge is queued
                warnings.warn(
                    "LoRALinear.unmerge: the adapter changed while merged (an edit through .data); W was restored "
                    "bit for bit from the adapter as merged, and the forward now uses the edited adapter"
                )
        else:
            warnings.warn(
                "LoRALinear.unmerge: the adapter or the weight changed while merged (an edited adapter, a model "
                "converted or moved to another dtype or device, or a layer loaded merged); subtracting the current "
                "adapter, which does not restore W bit for bit"
            )
            ops.unmerge_(weight, adapter.lora_A, adapter.lora_B, adapter.scaling)
        object.__setattr__(self, "_merged_adapter", None)
        object.__setattr__(self, "_merge_record", None)

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear computing what this layer computes (active adapter merged into the shared W)."""
        if self.adapters_enabled and self.active_adapter in self.adapters and not self.merged:
            self.merge()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device="meta", dtype=self.weight.dtype)
        linear.weight = self.weight
        linear.bias = self.bias
        self._merged_adapter = None  # W now belongs to the plain layer; this layer must not unmerge it
        self._merge_record = None
        return linear

    # ----------------------------------------------------------------------------------------------------------
    # Mixed-adapter batches (lora_ext/multi_adapter.py)
    def adapter_stack(self, capacity: int = 8) -> AdapterStack:
        """The stacked copies of this layer's adapters (created on first use with `capacity` slots), synced: only
        slots whose adapter was added, deleted or edited in place since the last call are written."""
        stack = getattr(self, "_adapter_stack", None)
        if stack is None:
            self._adapter_stack = AdapterStack(self, capacity)
            return self._adapter_stack
        return stack.sync(self)

    def _current_adapter_stack(self) -> AdapterStack:
        """The stack for a mixed-batch call, O(1) per call: synced in full only when an adapter was added or
        removed, or the layer's device or dtype changed, since the last sync (AdapterStack.sync_structure).
        In-place edits of an adapter's values are picked up by adapter_stack(), adapter_slot_ids() and
        mixed_adapters(model, names) (for the adapters it names), not here."""
        stack = getattr(self, "_adapter_stack", None)
        if stack is None:
            return self.adapter_stack()
        return stack.sync_structure(self)

    def _mixed_forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        # Host-bound at decoding sizes, like forward(): the input checks run only when the operator fails.
        if self._merged_adapter is not None:
            raise RuntimeError(
                f"LoRALinear: adapter {self._merged_adapter!r} is merged into the weight; mixed-adapter batches "
                "need unmerged adapters (unmerge() first)"
            )
        if (torch.is_autocast_enabled("cuda") or torch.is_autocast_enabled("cpu")) and \
                self._autocast_dtype(x) is not None:
            raise RuntimeError("LoRALinear: mixed-adapter batches do not support torch.autocast yet; run the model "
                               "in its own dtype")
        weight, bias = registered_parameter(self, "weight"), registered_parameter(self, "bias")
        try:
            if not self.adapters_enabled:
                return F.linear(x, weight, bias)
            stack = self._current_adapter_stack()
            return multi_lora_linear(x, weight, bias, stack.lora_A, stack.lora_B, stack.scalings, ids)
        except _CALL_ERRORS as error:
            operator_error = error
        try:  # as in forward(): the layer's clearer error where one applies, unchained, and no reference cycle
            self._check_input(x, weight, weight.dtype)
            raise operator_error
        finally:
            del operator_error

    # ----------------------------------------------------------------------------------------------------------
    # Forward
    def _check_input(self, x: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"LoRALinear: input must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() == 0:
            raise ValueError("LoRALinear: input must have shape (..., in_features), got a 0-dim tensor")
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"LoRALinear: input's last dimension must be in_features = {self.in_features}, "
                f"got shape {tuple(x.shape)}"
            )
        if x.device != weight.device:
            raise ValueError(f"LoRALinear: input is on {x.device} but the layer's weight is on {weight.device}")
        if x.dtype != dtype:
            raise ValueError(
                f"LoRALinear: input dtype {x.dtype} does not match the layer's weight dtype {weight.dtype}"
            )

    def _autocast_dtype(self, x: torch.Tensor) -> Optional[torch.dtype]:
        # Under torch.autocast, behave like nn.Linear: compute in the autocast dtype.
        return ops._autocast_dtype(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # This runs once per layer per step, and a decoding-sized call is bound by its host time, so the common
        # path reads parameters straight from the module dicts (nn.Module.__getattr__ costs ~0.4 µs a read) and
        # leaves the input checks to the operator; only when a call fails are the layer's own checks run, to
        # replace the operator's message with one in the layer's terms.
        if self._mixed_ids is not None:
            return self._mixed_forward(x, self._mixed_ids)
        if torch.is_autocast_enabled("cuda") or torch.is_autocast_enabled("cpu"):
            autocast_dtype = self._autocast_dtype(x)
            if autocast_dtype is not None:
                self._check_input(x, self.weight, x.dtype)
                return self._forward(x, autocast_dtype)
        if torch.compiler.is_compiling():  # in a compiled graph an operator's error can't be reworded afterwards
            self._check_call(x)
        try:
            return self._forward(x, None)
        except _CALL_ERRORS as error:
            operator_error = error
        try:  # outside the except block, so that the layer's error is not shown chained to the operator's
            self._check_call(x)
            raise operator_error
        finally:
            del operator_error  # its traceback holds this frame: no cycle keeping x (and its graph) alive

    def _check_call(self, x) -> None:
        """The layer's own errors for a call (input type, shape, device and dtype; a non-finite scaling), which
        forward() leaves to the operator and rewords only when it fails."""
        self._check_input(x, self.weight, self.weight.dtype)
        adapter = self.adapters._modules.get(self.active_adapter) if self.adapters_enabled else None
        if adapter is not None:
            ops._check_scaling(adapter.scaling, "lora_linear")

    def _forward(self, x: torch.Tensor, autocast_dtype: Optional[torch.dtype]) -> torch.Tensor:
        weight, bias = registered_parameter(self, "weight"), registered_parameter(self, "bias")
        adapter = self._modules["adapters"]._modules.get(self.active_adapter) if self.adapters_enabled else None
        if self._merged_adapter is not None:
            if self.training and torch.is_grad_enabled() and adapter is not None and (
                adapter.lora_A.requires_grad or adapter.lora_B.requires_grad
            ):
                raise RuntimeError(
                    "LoRALinear: the adapter is merged into the weight, so training it would update nothing; "
                    "call unmerge() before training (or layer.eval() for inference)"
                )
            adapter = None  # the merged weight is the whole layer
        if adapter is None:  # the base layer alone (under autocast, F.linear casts for itself)
            return F.linear(x, weight, bias)
        if autocast_dtype is not None:
            return self._autocast_forward(x, adapter, autocast_dtype, adapter.lora_dropout if self.training else 0.0)
        lora_A, lora_B = registered_parameter(adapter, "lora_A"), registered_parameter(adapter, "lora_B")
        if self.training and adapter.lora_dropout > 0.0:
            return ops.lora_linear(x, weight, bias, lora_A, lora_B, adapter.scaling, adapter.lora_dropout)
        if x.dim() == 2:  # the operator checks its inputs itself (lora_ext.ops.lora_linear's checks, in C++)
            return _lora_forward_op(x, weight, bias, lora_A, lora_B, adapter.scaling, 0.0, None)[0]
        return ops.lora_linear(x, weight, bias, lora_A, lora_B, adapter.scaling)

    def _autocast_forward(self, x, adapter, dtype, dropout_p):
        # As autocast does for nn.Linear: x, W and b in the autocast dtype; float32 adapters stay float32 (the
        # kernels take them on a 16-bit base), others follow the autocast dtype. The kernels must not be
        # re-autocast from inside, hence autocast off around the call.
        lora_A, lora_B = adapter.lora_A, adapter.lora_B
        if lora_A.dtype != torch.float32:
            lora_A, lora_B = lora_A.to(dtype), lora_B.to(dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            return ops.lora_linear(x.to(dtype), self.weight.to(dtype), bias, lora_A, lora_B, adapter.scaling,
                                   dropout_p)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"active_adapter={self.active_adapter!r}, adapters_enabled={self.adapters_enabled}, merged={self.merged}"
        )
