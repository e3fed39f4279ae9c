"""Multi-adapter batches (issue 8, inference): every row of a batch names its own adapter.

Serving systems batch requests for different fine-tunes. `torch.ops.lora_ext.multi_lora_forward` computes

    y[t] = x[t]·Wᵀ + b + scalings[a]·(x[t]·A[a]ᵀ)·B[a]ᵀ,   a = adapter_ids[t]  (-1: the base layer alone)

from *stacks* of adapters: lora_A_stack (n, r_max, in), lora_B_stack (n, out, r_max), scalings (n,). Adapters
of rank r < r_max are zero-padded (rows r.. of A, columns r.. of B are zero), so the padding adds exactly zero.

This module holds
- the fake (meta) implementation of the operator (torch.compile, meta tensors);
- its CUDA implementation *for now*: a composite of torch ops (below), to be replaced by a CUDA kernel;
- `multi_lora_linear`, the operator for x of any leading shape, ids per token or per sequence;
- `AdapterStack`, the stacked copies of one LoRALinear's adapters in stable slots;
- `mixed_adapters(model, names)` and `adapter_slot_ids(model, names)`, the model-level API.

Nothing here imports the rest of lora_ext at module level (lora_ext.layer imports this module).
"""
import contextlib
import math
from typing import Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .adapter import registered_parameter

__all__ = ["multi_lora_linear", "AdapterStack", "mixed_adapters", "adapter_slot_ids"]

_OP = "lora_ext::multi_lora_forward"


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_metadata(x, weight, bias, lora_A_stack, lora_B_stack, scalings, adapter_ids):
    """The shape / dtype / device checks of csrc/checks.h (check_multi_lora_inputs) that need no data: used by the
    fake implementation (so a bad call fails the same way under torch.compile) and by the CUDA composite."""
    op = _OP
    torch._check(x.dim() == 2, lambda: f"{op}: x must be 2-D (tokens, in_features), got shape {tuple(x.shape)}")
    torch._check(
        weight.dim() == 2 and weight.shape[1] == x.shape[1],
        lambda: f"{op}: weight must have shape (out_features, in_features), got {tuple(weight.shape)}",
    )
    torch._check(
        weight.dtype == x.dtype, lambda: f"{op}: weight dtype {weight.dtype} does not match x dtype {x.dtype}"
    )
    if bias is not None:
        torch._check(
            bias.dim() == 1 and bias.shape[0] == weight.shape[0],
            lambda: f"{op}: bias must have shape (out_features,), got {tuple(bias.shape)}",
        )
    torch._check(
        lora_A_stack.dim() == 3 and lora_A_stack.shape[2] == x.shape[1],
        lambda: f"{op}: lora_A_stack must have shape (n_adapters, r_max, in_features), got {tuple(lora_A_stack.shape)}",
    )
    torch._check(
        lora_B_stack.dim() == 3
        and lora_B_stack.shape[0] == lora_A_stack.shape[0]
        and lora_B_stack.shape[1] == weight.shape[0]
        and lora_B_stack.shape[2] == lora_A_stack.shape[1],
        lambda: f"{op}: lora_B_stack must have shape (n_adapters, out_features, r_max), got {tuple(lora_B_stack.shape)}",
    )
    torch._check(
        lora_A_stack.dtype == lora_B_stack.dtype and lora_A_stack.dtype in (x.dtype, torch.float32),
        lambda: f"{op}: the adapter stacks must share one dtype, x's or float32",
    )
    torch._check(
        scalings.dim() == 1 and scalings.shape[0] == lora_A_stack.shape[0],
        lambda: f"{op}: scalings must have shape (n_adapters,), got {tuple(scalings.shape)}",
    )
    torch._check(
        scalings.dtype in (torch.float32, torch.float64),
        lambda: f"{op}: scalings must be float32 (or float64), got {scalings.dtype}",
    )
    torch._check(
        adapter_ids.dtype in (torch.int64, torch.int32),
        lambda: f"{op}: adapter_ids must be int64 or int32, got {adapter_ids.dtype}",
    )
    torch._check(
        adapter_ids.dim() == 1 and adapter_ids.shape[0] == x.shape[0],
        lambda: f"{op}: adapter_ids must have shape (tokens,), got {tuple(adapter_ids.shape)}",
    )
    for name, t in (("weight", weight), ("bias", bias), ("lora_A_stack", lora_A_stack),
                    ("lora_B_stack", lora_B_stack), ("scalings", scalings), ("adapter_ids", adapter_ids)):
        torch._check(
            t is None or t.device == x.device,
            lambda: f"{op}: {name} is on {t.device} but x is on {x.device}; move all inputs to one device",
        )


@torch.library.register_fake(_OP)
def _multi_lora_forward_fake(x, weight, bias, lora_A_stack, lora_B_stack, scalings, adapter_ids):
    _check_metadata(x, weight, bias, lora_A_stack, lora_B_stack, scalings, adapter_ids)
    return x.new_empty((x.shape[0], weight.shape[0]))


def _multi_lora_forward_composite(x, weight, bias, lora_A_stack, lora_B_stack, scalings, adapter_ids):
    """multi_lora_forward from torch ops, with no host-device synchronisation (no .item(), nonzero, unique or
    boolean-mask indexing), so CUDA graphs can capture it. Used on CUDA only by a build without lora_ext's CUDA
    kernels (csrc/cuda/multi_lora.cu is the real implementation): correct, not fast.

    Masked dense low rank: x·A_allᵀ for all n slots at once, (tokens, n·r_max); then per slot its B product,
    scaled, kept by torch.where for the tokens of that slot only. The mask is applied after each slot's B product,
    so a NaN/Inf in one adapter reaches the rows of that adapter alone (0·NaN would spread it otherwise). It costs n
    times the FLOPs of one adapter's low-rank part and n small launches, but never gathers per-token copies of the
    adapters (tokens·r·in elements).
    Ids outside [-1, n) match no slot and so are treated as -1 (base only): checking them would need a sync.
    """
    _check_metadata(x, weight, bias, lora_A_stack, lora_B_stack, scalings, adapter_ids)
    acc = _accumulate_dtype(x.dtype)
    tokens, in_features = x.shape
    n, rank, _ = lora_A_stack.shape
    out_features = weight.shape[0]
    y = F.linear(x, weight, bias)
    xa = torch.mm(x.to(acc), lora_A_stack.reshape(n * rank, in_features).to(acc).t()).view(tokens, n, rank)
    ids = adapter_ids.to(torch.int64).unsqueeze(1)  # (tokens, 1)
    scale = scalings.to(acc)
    zero = torch.zeros((), dtype=acc, device=x.device)
    low_rank = torch.zeros(tokens, out_features, dtype=acc, device=x.device)
    for i in range(n):
        term = torch.mm(xa[:, i, :], lora_B_stack[i].to(acc).t()) * scale[i]
        low_rank = low_rank + torch.where(ids == i, term, zero)
    return (y.to(acc) + low_rank).to(x.dtype)  # the float32 sum rounded once into y's dtype


# The CUDA dispatch key gets the composite while lora_ext has no CUDA kernel of its own for this operator.
_cuda_lib = None
if not torch._C._dispatch_has_kernel_for_dispatch_key(_OP, "CUDA"):
    _cuda_lib = torch.library.Library("lora_ext", "IMPL")
    _cuda_lib.impl("multi_lora_forward", _multi_lora_forward_composite, "CUDA")


def multi_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A_stack: torch.Tensor,
    lora_B_stack: torch.Tensor,
    scalings: torch.Tensor,
    adapter_ids: torch.Tensor,
) -> torch.Tensor:
    """multi_lora_forward for x of any leading shape (..., in_features).

    adapter_ids: x.shape[:-1] (one slot per token) or (x.shape[0],) (one per sequence, broadcast over the other
    leading dimensions on the device, no sync); -1 = base only. Inference only (no autograd formula)."""
    if (type(x) is torch.Tensor and type(adapter_ids) is torch.Tensor and adapter_ids.dim() == 1 and x.dim() >= 2
            and adapter_ids.shape[0] == x.shape[0] and x.numel() == x.shape[0] * x.shape[-1]):
        # A decoding batch: one token per row, (tokens, in) or (sequences, 1, in) with one id per sequence. The ids
        # are already per token: the operator on the 2-D view, no reshaping of the ids (host-bound at these sizes).
        x_2d = x if x.dim() == 2 else x.view(x.shape[0], x.shape[-1])
        y = torch.ops.lora_ext.multi_lora_forward.default(x_2d, weight, bias, lora_A_stack, lora_B_stack, scalings,
                                                          adapter_ids)
        return y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[-1])
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"multi_lora_linear: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0:
        raise ValueError("multi_lora_linear: x must have at least one dimension (..., in_features)")
    if not isinstance(adapter_ids, torch.Tensor):
        raise TypeError(f"multi_lora_linear: adapter_ids must be a torch.Tensor, got {type(adapter_ids).__name__}")
    leading = tuple(x.shape[:-1])
    if tuple(adapter_ids.shape) == leading:
        ids = adapter_ids.reshape(-1)
    elif x.dim() > 2 and adapter_ids.dim() == 1 and adapter_ids.shape[0] == x.shape[0]:
        ids = adapter_ids.view(-1, *([1] * (x.dim() - 2))).expand(leading).reshape(-1)
    else:
        raise ValueError(
            f"multi_lora_linear: adapter_ids must have shape x.shape[:-1] = {leading} (per token) or "
            f"(x.shape[0],) = ({x.shape[0]},) (per sequence), got {tuple(adapter_ids.shape)}"
        )
    x_2d = x.reshape(math.prod(leading), x.shape[-1])
    y = torch.ops.lora_ext.multi_lora_forward(x_2d, weight, bias, lora_A_stack, lora_B_stack, scalings, ids)
    return y.view(*leading, y.shape[-1])


# ----------------------------------------------------------------------------------------------------------------
# AdapterStack: one LoRALinear's adapters, stacked in slots


def _adapter_record(adapter) -> tuple:
    """What identifies an adapter's current values: its parameters' identity, storage and in-place version
    counters (tensor._version, bumped by every in-place edit), rank, scaling and dtype."""
    # Runs per named adapter per batch: reads past nn.Module.__getattr__.
    a, b = registered_parameter(adapter, "lora_A"), registered_parameter(adapter, "lora_B")
    return (id(a), a.data_ptr(), a._version, id(b), b.data_ptr(), b._version, adapter.r, adapter.scaling, a.dtype)


class AdapterStack:
    """Stacked copies of one LoRALinear's adapters for multi_lora_forward, in slots that keep their index.

    lora_A (capacity, r_max, in), lora_B (capacity, out, r_max), scalings (capacity,). Adapters of rank below
    r_max are zero-padded, and a free slot is all zeros: both add exactly zero. Adding an adapter writes its slot
    only; deleting one zeroes its slot and frees it for the next adapter; an in-place edit of an adapter's
    parameters (seen through tensor._version) rewrites that slot only. All slots are copied only when the stack
    grows: capacity doubles (from `capacity`, default 8) when full, and r_max grows to a new adapter's larger rank;
    a change of the layer's device or adapter dtype rebuilds it. A slot's index never changes while its adapter
    exists, so slot ids handed out stay valid.

    The stack belongs to the layer (`layer.adapter_stack()` creates and syncs it); it is no part of the
    state_dict. `sync(layer)` brings it up to date, comparing a record per adapter (about a microsecond each:
    too slow for every layer call of a model with 64 adapters loaded). The per-call paths use two cheaper checks:
    `sync_structure(layer)`, O(1): a full sync only when an adapter was added, replaced or removed (the layer's
    AdapterDict counts those in `generation`) or the layer's device or dtype changed; and
    `sync_names(layer, names)`, that plus the records of the named adapters only. In-place edits of an adapter's
    values (seen through tensor._version) are therefore picked up by sync() (layer.adapter_stack(),
    lora_ext.adapter_slot_ids) and by mixed_adapters(model, names) for the adapters it names; edits through
    `.data` by refresh() alone.
    """

    def __init__(self, layer, capacity: int = 8):
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"AdapterStack: capacity must be a positive integer, got {capacity!r}")
        self.slots: Dict[str, int] = {}
        self._records: Dict[str, tuple] = {}
        self._structure: Optional[tuple] = None  # _structure_key(layer) at the end of the last sync()
        self._initial_capacity = capacity
        self.lora_A: Optional[torch.Tensor] = None
        self.lora_B: Optional[torch.Tensor] = None
        self.scalings: Optional[torch.Tensor] = None
        self.sync(layer)

    @property
    def capacity(self) -> int:
        return self.lora_A.shape[0]

    @property
    def max_rank(self) -> int:
        return self.lora_A.shape[1]

    def slot(self, name: str) -> Optional[int]:
        return self.slots.get(name)

    @staticmethod
    def _wanted_dtype(layer) -> torch.dtype:
        dtypes = {adapter.lora_A.dtype for adapter in layer.adapters.values()}
        return layer.weight.dtype if dtypes <= {layer.weight.dtype} else torch.float32

    @torch.no_grad()
    def _allocate(self, layer, capacity: int, rank: int, dtype: torch.dtype) -> None:
        """New zeroed tensors, the existing slots copied over: the one place where all adapters are copied."""
        device = layer.weight.device
        lora_A = torch.zeros(capacity, rank, layer.in_features, device=device, dtype=dtype)
        lora_B = torch.zeros(capacity, layer.out_features, rank, device=device, dtype=dtype)
        scalings = torch.zeros(capacity, device=device, dtype=_accumulate_dtype(dtype))
        if self.lora_A is not None and self.lora_A.device == device:
            old_n, old_r = self.lora_A.shape[0], self.lora_A.shape[1]
            keep_r = min(old_r, rank)
            lora_A[:old_n, :keep_r].copy_(self.lora_A[:, :keep_r])
            lora_B[:old_n, :, :keep_r].copy_(self.lora_B[:, :, :keep_r])
            scalings[:old_n].copy_(self.scalings)
        else:  # a device change: every slot is rewritten from its adapter
            self._records.clear()
        self.lora_A, self.lora_B, self.scalings = lora_A, lora_B, scalings

    @torch.no_grad()
    def _write(self, name: str, adapter) -> None:
        slot, r = self.slots[name], adapter.r
        self.lora_A[slot, :r].copy_(adapter.lora_A)
        self.lora_A[slot, r:].zero_()
        self.lora_B[slot, :, :r].copy_(adapter.lora_B)
        self.lora_B[slot, :, r:].zero_()
        self.scalings[slot].fill_(float(adapter.scaling))
        self._records[name] = _adapter_record(adapter)

    @torch.no_grad()
    def _free(self, name: str) -> None:
        slot = self.slots.pop(name)
        self._records.pop(name, None)
        self.lora_A[slot].zero_()
        self.lora_B[slot].zero_()
        self.scalings[slot].zero_()

    def reserve(self, layer, capacity: int) -> None:
        """At least `capacity` slots (copies every slot if it has to grow)."""
        self.sync(layer)
        if capacity > self.capacity:
            self._allocate(layer, capacity, self.max_rank, self.lora_A.dtype)

    @staticmethod
    def _structure_key(layer) -> Optional[tuple]:
        """What sync_structure compares: None (always sync) when layer.adapters does not count its changes. Runs
        per layer per mixed-batch call: reads past nn.Module.__getattr__ (about 1 µs a read on a slow host)."""
        adapters = layer._modules.get("adapters")
        if adapters is None:
            adapters = layer.adapters
        generation = getattr(adapters, "generation", None)
        if generation is None:
            return None
        weight = registered_parameter(layer, "weight")
        return (id(adapters), generation, weight.device, weight.dtype)

    def sync_structure(self, layer) -> "AdapterStack":
        """O(1) when no adapter was added, replaced or removed and the layer's device and dtype are unchanged since
        the last sync(); a full sync() otherwise. Does not look for in-place edits of adapter values."""
        key = self._structure_key(layer)
        if key is None or key != self._structure:
            return self.sync(layer)
        return self

    def sync_names(self, layer, names) -> "AdapterStack":
        """sync_structure, then rewrite the slots of those of `names` (adapter names, None ignored) whose adapter
        was edited in place since it was written: O(len(names)), not O(loaded adapters)."""
        self.sync_structure(layer)
        adapters = layer.adapters
        for name in names:
            if name is not None and name in self.slots and self._records.get(name) != _adapter_record(adapters[name]):
                self._write(name, adapters[name])
        return self

    def sync(self, layer) -> "AdapterStack":
        """Bring the stack up to date with layer.adapters, writing only the slots whose adapter changed."""
        adapters = layer.adapters
        for name in [n for n in self.slots if n not in adapters]:
            self._free(name)
        dtype = self._wanted_dtype(layer)
        rank = max([1] + [adapter.r for adapter in adapters.values()])
        if self.lora_A is None:
            self._allocate(layer, max(self._initial_capacity, len(adapters)), rank, dtype)
        elif (self.lora_A.device != layer.weight.device or self.lora_A.dtype != dtype or rank > self.max_rank):
            # Copies every slot (converted to the new dtype); a device change rewrites them from the adapters.
            self._allocate(layer, self.capacity, max(rank, self.max_rank), dtype)
        for name, adapter in adapters.items():
            if name not in self.slots:
                used = set(self.slots.values())
                free = next((s for s in range(self.capacity) if s not in used), None)
                if free is None:  # full: double the capacity (copies every slot once)
                    free = self.capacity
                    self._allocate(layer, 2 * self.capacity, self.max_rank, self.lora_A.dtype)
                self.slots[name] = free
                self._write(name, adapter)
            elif self._records.get(name) != _adapter_record(adapter):
                self._write(name, adapter)
        self._structure = self._structure_key(layer)
        return self

    @torch.no_grad()
    def refresh(self, layer, name: Optional[str] = None) -> "AdapterStack":
        """Rewrite the slot of adapter `name` (every slot when None) from layer.adapters: for edits made through
        `.data`, which the version counters that sync() relies on do not see."""
        self.sync(layer)
        for slot_name in [name] if name is not None else list(self.slots):
            self._write(slot_name, layer.adapters[slot_name])
        return self

    def __repr__(self) -> str:
        return f"AdapterStack(capacity={self.capacity}, max_rank={self.max_rank}, slots={self.slots})"


# ----------------------------------------------------------------------------------------------------------------
# Model level


def _lora_layers(model, where: str):
    from .layer import LoRALinear

    # named_modules() order, without descending into a LoRALinear: its adapters are submodules, and walking them
    # would make every call O(loaded adapters).
    layers, seen = [], set()

    def walk(prefix, module):
        if id(module) in seen:
            return
        seen.add(id(module))
        if isinstance(module, LoRALinear):
            layers.append((prefix, module))
            return
        for name, child in module._modules.items():
            if child is not None:
                walk(f"{prefix}.{name}" if prefix else name, child)

    walk("", model)
    if not layers:
        raise ValueError(f"{where}: the model has no LoRALinear layers; lora_ext.inject(model, ...) first")
    merged = [n for n, layer in layers if layer.merged]
    if merged:
        raise RuntimeError(
            f"{where}: layers {merged} have a merged adapter; mixed-adapter batches need unmerged adapters "
            f"(lora_ext.unmerge(model) first)"
        )
    return layers


def _check_names(names, layers, where: str) -> List[Optional[str]]:
    if isinstance(names, str) or not isinstance(names, (list, tuple)):
        raise TypeError(f"{where}: adapter_names must be a list with one adapter name (or None) per batch row, "
                        f"or a tensor of slot ids; got {type(names).__name__}")
    for name in names:
        if name is not None and not isinstance(name, str):
            raise TypeError(f"{where}: each entry must be an adapter name or None, got {name!r}")
    for name in dict.fromkeys(names):  # each distinct name once: O(distinct names × layers), not O(loaded adapters)
        if name is not None and not any(name in layer.adapters for _, layer in layers):
            known = sorted({n for _, layer in layers for n in layer.adapters.keys()})
            raise KeyError(f"{where}: no layer of the model has an adapter named {name!r}; it has {known}")
    return list(names)


def _ids_tensor(slots: Sequence[int], device: torch.device) -> torch.Tensor:
    ids = torch.tensor(slots, dtype=torch.int64)
    if device.type == "cuda":
        return ids.pin_memory().to(device, non_blocking=True)
    return ids.to(device)


# adapter_slot_ids marks the tensors it makes (valid by construction) with their in-place version counter;
# mixed_adapters skips its range check (a host sync) for them while they are unchanged.
_CHECKED_VERSION_ATTRIBUTE = "_lora_ext_checked_version"


def _remember_checked(ids: torch.Tensor) -> torch.Tensor:
    setattr(ids, _CHECKED_VERSION_ATTRIBUTE, ids._version)
    return ids


def _check_slot_ids(ids: torch.Tensor, layers, where: str) -> None:
    """Every id is -1 (the base layer) or a slot every layer has: one host sync, once per batch where the ids enter,
    for a tensor adapter_slot_ids did not make (or that was edited since). The CUDA kernels would treat a bad id as
    the base layer, silently; the CPU kernel raises, but only inside the first layer."""
    if getattr(ids, _CHECKED_VERSION_ATTRIBUTE, None) == ids._version:
        return
    if ids.numel() == 0:
        return
    slots = min(layer._adapter_stack.capacity for _, layer in layers)
    low, high = torch.stack([ids.min(), ids.max()]).tolist()
    if low < -1 or high >= slots:
        raise ValueError(f"{where}: slot ids must be -1 (the base layer) or 0 … {slots - 1} (the slots every layer "
                         f"has), got values from {low} to {high}; nothing was changed. adapter_slot_ids(model, "
                         f"names) makes valid ids")


@contextlib.contextmanager
def mixed_adapters(model, adapter_names: Union[Sequence[Optional[str]], torch.Tensor]):
    """Inside, every LoRALinear of `model` applies a per-row adapter (multi_lora_forward), inference only.

    adapter_names: one entry per batch row (x.shape[0] of each layer's input): an adapter name, or None for the
    base model; or a tensor of slot ids on the model's device (see adapter_slot_ids), shared by every layer.
    Names are mapped to each layer's slots on the host once and copied to the device once (non_blocking); layers
    with the same name -> slot map share one ids tensor. A layer lacking an adapter named in the batch computes
    its base layer for those rows (as PEFT does for missing adapters). Merged layers are an error. Dropout is not
    applied; the forward has no autograd formula. A slot-id tensor that adapter_slot_ids did not make (or that was
    edited in place since) is range-checked on entry, with one host sync: enter the context outside CUDA-graph
    capture; ids copied into a captured tensor later are not checked (the kernels treat bad ids as the base).
    Host cost per layer, independent of how many adapters are loaded: with names, the named adapters' in-place
    edits are looked for (AdapterStack.sync_names); with a slot-id tensor, only additions and removals
    (sync_structure): after editing an adapter in place, call lora_ext.adapter_slot_ids again (or
    layer.adapter_stack()), as a server does when its set of adapters changes."""
    where = "lora_ext.mixed_adapters"
    layers = _lora_layers(model, where)
    per_layer = {}
    if isinstance(adapter_names, torch.Tensor):
        if adapter_names.dtype not in (torch.int64, torch.int32) or adapter_names.dim() != 1:
            raise TypeError(f"{where}: a tensor of slot ids must be 1-D int64 or int32, got {adapter_names.dtype} "
                            f"of shape {tuple(adapter_names.shape)}")
        for _, layer in layers:
            layer._current_adapter_stack()  # O(1): the ids were made by adapter_slot_ids, which synced in full
            per_layer[layer] = adapter_names
        _check_slot_ids(adapter_names, layers, where)
    else:
        names = _check_names(adapter_names, layers, where)
        distinct = [n for n in dict.fromkeys(names) if n is not None]
        cache: Dict[tuple, torch.Tensor] = {}
        for _, layer in layers:
            if getattr(layer, "_adapter_stack", None) is None:
                layer.adapter_stack()
            stack = layer._adapter_stack.sync_names(layer, distinct)  # the named adapters' in-place edits
            device = registered_parameter(layer, "weight").device
            key = (device, tuple(-1 if n is None else stack.slots.get(n, -1) for n in names))
            if key not in cache:
                cache[key] = _ids_tensor(key[1], device)
            per_layer[layer] = cache[key]
    previous = {layer: getattr(layer, "_mixed_ids", None) for layer in per_layer}
    # _mixed_ids is a plain attribute (never a registered buffer): set past nn.Module.__setattr__'s checks, which
    # cost more than the rest of a decoding layer's host time on a slow host.
    try:
        for layer, ids in per_layer.items():
            object.__setattr__(layer, "_mixed_ids", ids)
        yield
    finally:
        for layer, ids in previous.items():
            object.__setattr__(layer, "_mixed_ids", ids)


def adapter_slot_ids(model, adapter_names: Sequence[Optional[str]], device=None) -> torch.Tensor:
    """One int64 tensor of slot ids (one per batch row, -1 for None) valid for every LoRALinear of the model, for
    mixed_adapters(model, ids) without a host-to-device copy per batch (e.g. inside a captured CUDA graph).

    Needs each named adapter to sit in the same slot in every layer that holds it, and that slot to be free in the
    layers that lack it (a free slot is zero: the base layer); otherwise a ValueError says to pass names instead.
    Stacks grow so that every slot id is in range in every layer."""
    where = "lora_ext.adapter_slot_ids"
    layers = _lora_layers(model, where)
    names = _check_names(adapter_names, layers, where)
    stacks = [(n, layer, layer.adapter_stack()) for n, layer in layers]
    slot_of: Dict[str, int] = {}
    for name in dict.fromkeys(n for n in names if n is not None):
        slots = {stack.slots[name] for _, _, stack in stacks if name in stack.slots}
        if len(slots) != 1:
            raise ValueError(f"{where}: adapter {name!r} sits in different slots in different layers ({sorted(slots)});"
                             f" pass adapter names to mixed_adapters instead")
        slot = slots.pop()
        for layer_name, layer, stack in stacks:
            if name not in stack.slots and slot in stack.slots.values():
                raise ValueError(f"{where}: layer {layer_name!r} lacks adapter {name!r} and uses its slot {slot} for "
                                 f"another adapter; pass adapter names to mixed_adapters instead")
        slot_of[name] = slot
    needed = max([-1] + list(slot_of.values())) + 1
    for _, layer, stack in stacks:
        stack.reserve(layer, needed)
    if device is None:
        device = layers[0][1].weight.device
    return _remember_checked(_ids_tensor([-1 if n is None else slot_of[n] for n in names], torch.device(device)))
