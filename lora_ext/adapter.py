"""LoRAAdapter: one named low-rank update (A, B and its hyperparameters) held by a LoRALinear."""
import math

import torch
from torch import nn

INITS = ("kaiming", "gaussian")


def check_hyperparameters(r, alpha, dropout, init, where="LoRALinear"):
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"{where}: r (the rank) must be a positive integer, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"{where}: alpha must be a finite number, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"{where}: dropout must be in [0, 1), got {dropout!r}")
    if init not in INITS:
        raise ValueError(f"{where}: init must be one of {INITS}, got {init!r}")


def check_adapter_name(name, where="LoRALinear"):
    # ModuleDict keys become state_dict path components: no dots, not empty.
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"{where}: an adapter name must be a non-empty string without '.', got {name!r}")


def resolve_adapter_dtype(weight_dtype: torch.dtype, adapter_dtype, where="LoRALinear") -> torch.dtype:
    """The adapters' dtype: the weight's by default; float32 is allowed too (PEFT's default on a 16-bit base)."""
    if adapter_dtype is None:
        return weight_dtype
    if adapter_dtype not in (weight_dtype, torch.float32):
        raise ValueError(
            f"{where}: adapter_dtype must be the weight's dtype ({weight_dtype}) or torch.float32, got {adapter_dtype}"
        )
    return adapter_dtype


def registered_parameter(module: nn.Module, name: str):
    """module.<name> without nn.Module.__getattr__ (~0.4 µs a read, paid per layer per call on host-bound paths)
    for a registered parameter (or None); getattr otherwise (a parametrized or reassigned attribute)."""
    try:
        return module._parameters[name]
    except KeyError:
        return getattr(module, name)


class LoRAAdapter(nn.Module):
    """A (r × in) and B (out × r), trainable, with scaling = alpha / r (alpha / √r with rsLoRA)."""

    def __init__(self, in_features, out_features, r, alpha, dropout, use_rslora, init, device, dtype):
        super().__init__()
        self.r = r
        self.lora_alpha = alpha
        self.lora_dropout = float(dropout)
        self.use_rslora = bool(use_rslora)
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, device=device, dtype=dtype))
        self.reset_parameters(init)

    @property
    def scaling(self) -> float:
        return self.lora_alpha / math.sqrt(self.r) if self.use_rslora else self.lora_alpha / self.r

    @torch.no_grad()
    def reset_parameters(self, init: str = "kaiming") -> None:
        """A as PEFT initialises it (kaiming-uniform, or N(0, 1/r) for "gaussian"); B = 0."""
        if init not in INITS:
            raise ValueError(f"LoRAAdapter: init must be one of {INITS}, got {init!r}")
        if init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        else:
            nn.init.normal_(self.lora_A, std=1.0 / self.r)
        nn.init.zeros_(self.lora_B)

    def extra_repr(self) -> str:
        return (f"r={self.r}, lora_alpha={self.lora_alpha}, lora_dropout={self.lora_dropout}, "
                f"use_rslora={self.use_rslora}")


class AdapterDict(nn.ModuleDict):
    """The ModuleDict of a LoRALinear's adapters, counting changes of its membership in `generation`.

    Every way of adding, replacing or removing an entry (d[name] = m, add_module, setattr, del, pop, clear,
    update) bumps the counter, so that AdapterStack can tell in O(1) per call that no adapter was added or removed
    (a mixed-batch forward must not look at every loaded adapter). Otherwise a plain ModuleDict: same state_dict
    keys, same iteration order."""

    def _bump(self) -> None:
        self.__dict__["generation"] = self.__dict__.get("generation", 0) + 1

    def add_module(self, name, module) -> None:
        super().add_module(name, module)
        self._bump()

    def __setattr__(self, name, value) -> None:
        super().__setattr__(name, value)
        if isinstance(value, nn.Module):
            self._bump()

    def __delitem__(self, key) -> None:
        super().__delitem__(key)
        self._bump()

    def __delattr__(self, name) -> None:
        super().__delattr__(name)
        self._bump()

    def clear(self) -> None:
        super().clear()
        self._bump()
