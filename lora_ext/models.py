"""Whole models: put LoRA layers into any nn.Module and manage their adapters (docs/models-api.md).

inject() replaces the matching nn.Linear layers of a model by LoRALinear layers that share (and freeze) their
weights; the other functions act on every LoRALinear of a model at once: merge / unmerge / merge_and_unload,
set_adapter / delete_adapter, disable_adapters / enable_adapters, parameter counts. Target names follow PEFT's
rules, so that adapter files move between lora_ext and PEFT (lora_ext/adapter_io.py).
"""
import re
from typing import Iterable, List, Optional, Sequence, Tuple, Union

from torch import nn

from .adapter import check_adapter_name, check_hyperparameters
from .layer import LoRALinear

TargetModules = Union[str, Sequence[str]]

__all__ = [
    "inject", "lora_layers", "count_parameters", "print_trainable_parameters", "merge", "unmerge",
    "merge_and_unload", "set_adapter", "delete_adapter", "disable_adapters", "enable_adapters",
]


# ------------------------------------------------------------------------------------------------------------------
# Target matching (PEFT's rules)


def _check_targets(target_modules, where: str) -> None:
    if isinstance(target_modules, str):
        try:
            re.compile(target_modules)
        except re.error as error:
            raise ValueError(f"{where}: target_modules {target_modules!r} is not a valid regex: {error}") from None
        return
    if not isinstance(target_modules, (list, tuple, set, frozenset)) or not all(
        isinstance(t, str) for t in target_modules
    ):
        raise TypeError(
            f"{where}: target_modules must be a list of module names (or name suffixes) or one regex string, "
            f"got {target_modules!r}"
        )


def target_matches(target_modules: TargetModules, name: str) -> bool:
    """PEFT's rule: a regex string must match the whole qualified name; a list entry matches a name that equals it
    or ends with "." + entry."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def candidate_modules(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """(qualified name, module) of every module a target may name: all but the root and the insides of LoRALinear
    layers (their adapters), in named_modules() order."""
    out = []
    inside: Optional[str] = None
    for name, module in model.named_modules():
        if not name:
            continue
        if inside is not None and name.startswith(inside):
            continue
        inside = name + "." if isinstance(module, LoRALinear) else None
        out.append((name, module))
    return out


def _parent(model: nn.Module, name: str) -> Tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def match_targets(model: nn.Module, target_modules: TargetModules, where: str, error=TypeError,
                  exclude: Optional[TargetModules] = None) -> List[Tuple[str, nn.Module]]:
    """The modules of `model` that `target_modules` names, each an nn.Linear or a LoRALinear, else `error`."""
    matched = []
    for name, module in candidate_modules(model):
        if not target_matches(target_modules, name):
            continue
        if exclude and target_matches(exclude, name):
            continue
        if not isinstance(module, (nn.Linear, LoRALinear)):
            raise error(
                f"{where}: target_modules {target_modules!r} matches {name!r}, a {type(module).__name__}; "
                "only nn.Linear layers (and LoRALinear layers, which get one more adapter) can take LoRA"
            )
        if isinstance(module, nn.Linear):
            parent, _ = _parent(model, name)
            if isinstance(parent, nn.MultiheadAttention):
                raise error(
                    f"{where}: {name!r} is the output projection of an nn.MultiheadAttention, which reads its "
                    "weight directly instead of calling it; LoRA there would have no effect"
                )
        matched.append((name, module))
    return matched


def _model_active_adapter(model: nn.Module) -> Tuple[Optional[str], bool]:
    """(active adapter, adapters enabled) of the model's existing LoRA layers (the first layer that has one)."""
    for _, layer in lora_layers(model):
        if layer.active_adapter is not None:
            return layer.active_adapter, layer.adapters_enabled
    return None, True


def _adapter_parameters(model: nn.Module) -> set:
    return {id(p) for _, layer in lora_layers(model) for p in layer.adapters.parameters()}


def freeze_base(model: nn.Module) -> None:
    """requires_grad=False on every parameter that is not a LoRA adapter's."""
    adapter_params = _adapter_parameters(model)
    for p in model.parameters():
        if id(p) not in adapter_params:
            p.requires_grad_(False)


# ------------------------------------------------------------------------------------------------------------------
# inject and inspection


def inject(
    model: nn.Module,
    target_modules: TargetModules,
    r: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    use_rslora: bool = False,
    init: str = "kaiming",
    adapter_name: str = "default",
) -> nn.Module:
    """Put LoRA on the modules of `model` named by `target_modules`, in place; returns `model`.

    target_modules: a list of names or name suffixes (a module matches when its qualified name equals an entry or
    ends with "." + entry, as in PEFT), or one string used as a regex on the whole qualified name. Every matching
    nn.Linear becomes LoRALinear.from_linear(...) (sharing its weight); a matching LoRALinear gets one more adapter
    `adapter_name`. Every other parameter of the model is frozen (existing adapters keep their flags).
    ValueError when nothing matches, TypeError when a match is not a linear layer; the model is then unchanged.
    When the model has adapters already, new layers keep the model's active adapter (they compute their base
    layer until set_adapter(model, adapter_name)), as PEFT does."""
    where = "lora_ext.inject"
    _check_targets(target_modules, where)
    check_hyperparameters(r, alpha, dropout, init, where)
    check_adapter_name(adapter_name, where)
    matched = match_targets(model, target_modules, where)
    if not matched:
        linears = [n for n, m in candidate_modules(model) if isinstance(m, nn.Linear)]
        raise ValueError(
            f"{where}: target_modules {target_modules!r} matches no module of the model ({type(model).__name__}); "
            f"its linear layers: {linears[:20]}{' ...' if len(linears) > 20 else ''}"
        )
    for name, module in matched:
        if isinstance(module, LoRALinear) and adapter_name in module.adapters:
            raise ValueError(f"{where}: {name!r} has an adapter named {adapter_name!r} already; "
                             f"delete_adapter(model, {adapter_name!r}) first or pick another name")
    active, enabled = _model_active_adapter(model)
    freeze_base(model)
    for name, module in matched:
        if isinstance(module, LoRALinear):
            module.add_adapter(adapter_name, r, alpha, dropout, use_rslora, init)
            continue
        layer = LoRALinear.from_linear(module, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora, init=init,
                                       adapter_name=adapter_name)
        layer.train(module.training)
        if active is not None and active != adapter_name:
            layer.set_adapter(active, missing_ok=True)
        layer.adapters_enabled = enabled
        parent, child = _parent(model, name)
        setattr(parent, child, layer)
    return model


def lora_layers(model: nn.Module) -> List[Tuple[str, LoRALinear]]:
    """(qualified name, LoRALinear) of every LoRA layer of `model`, in named_modules() order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def count_parameters(model: nn.Module) -> Tuple[int, int]:
    """(trainable, total) parameter counts; a parameter shared by several modules counts once."""
    trainable = total = 0
    for p in model.parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return int(trainable), int(total)


def print_trainable_parameters(model: nn.Module) -> None:
    """Prints `trainable params: N || all params: M || trainable%: P`, as PEFT does."""
    trainable, total = count_parameters(model)
    percent = 100 * trainable / total if total else 0.0
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {percent:.4f}")


# ------------------------------------------------------------------------------------------------------------------
# Merging


def _require_lora(model: nn.Module, where: str) -> List[Tuple[str, LoRALinear]]:
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"{where}: the model has no LoRA layers; lora_ext.inject(...) or load_adapter(...) first")
    return layers


def merge(model: nn.Module) -> None:
    """Merge the active adapter into the weight of every LoRA layer that holds it (W += scaling·B·A).

    Atomic: if any layer fails (NaN/Inf in its adapter, an overflow), the layers already merged are unmerged back
    bit for bit before the error propagates. Layers without the active adapter are left alone."""
    where = "lora_ext.merge"
    layers = [(n, l) for n, l in _require_lora(model, where) if l.active_adapter in l.adapters]
    for name, layer in layers:
        if layer.merged:
            raise RuntimeError(f"{where}: {name!r} is merged already; lora_ext.unmerge(model) first")
        if not layer.adapters_enabled:
            raise RuntimeError(f"{where}: adapters are disabled ({name!r}); lora_ext.enable_adapters(model) first")
    done = []
    try:
        for name, layer in layers:
            layer.merge()
            done.append(layer)
    except BaseException as error:
        for layer in reversed(done):
            layer.unmerge()
        if hasattr(error, "add_note"):  # Python 3.11+
            error.add_note(f"lora_ext.merge: merging {name!r} failed; the {len(done)} layer(s) merged before it "
                           "were unmerged, so the model is unchanged")
        raise


def unmerge(model: nn.Module) -> None:
    """Undo merge(): every merged LoRA layer gets its weight back bit for bit. Unmerged layers are left alone."""
    for _, layer in _require_lora(model, "lora_ext.unmerge"):
        if layer.merged:
            layer.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by a plain nn.Linear holding W + scaling·B·A of its active adapter (the base W
    where the layer lacks it or its adapters are disabled), in place; returns the model (the model itself when it
    is a LoRALinear: then the new nn.Linear). The result needs no lora_ext to load or run."""
    layers = lora_layers(model)
    to_merge = [l for _, l in layers if l.adapters_enabled and l.active_adapter in l.adapters and not l.merged]
    done = []
    try:  # merge everything first (atomically), then swap the modules
        for layer in to_merge:
            layer.merge()
            done.append(layer)
    except BaseException:
        for layer in reversed(done):
            layer.unmerge()
        raise
    root = None
    for name, layer in layers:
        linear = layer.to_linear()
        linear.train(layer.training)
        if not name:
            root = linear
            continue
        parent, child = _parent(model, name)
        setattr(parent, child, linear)
    return model if root is None else root


# ------------------------------------------------------------------------------------------------------------------
# Several adapters


def _adapter_names(layers: Iterable[Tuple[str, LoRALinear]]) -> List[str]:
    names = {}
    for _, layer in layers:
        names.update(dict.fromkeys(layer.adapter_names))
    return list(names)


def set_adapter(model: nn.Module, name: str) -> None:
    """Make `name` the active adapter of every LoRA layer (no weight is copied). A layer that lacks it computes its
    base layer (PEFT's behaviour). ValueError when no layer holds `name`; merged layers are unmerged first."""
    layers = _require_lora(model, "lora_ext.set_adapter")
    if not any(name in layer.adapters for _, layer in layers):
        raise ValueError(f"lora_ext.set_adapter: no adapter named {name!r}; the model has {_adapter_names(layers)}")
    for _, layer in layers:
        layer.set_adapter(name, missing_ok=True)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name` from every layer (unmerging it where merged). When it was the active adapter, the
    first remaining one becomes active. The LoRA layers stay (a layer without adapters computes its base layer)."""
    layers = _require_lora(model, "lora_ext.delete_adapter")
    if not any(name in layer.adapters for _, layer in layers):
        raise ValueError(f"lora_ext.delete_adapter: no adapter named {name!r}; the model has {_adapter_names(layers)}")
    was_active = any(layer.active_adapter == name for _, layer in layers)
    for _, layer in layers:
        if name in layer.adapters:
            layer.delete_adapter(name)
    if was_active:
        remaining = _adapter_names(layers)
        for _, layer in layers:
            if remaining:
                layer.set_adapter(remaining[0], missing_ok=True)
            else:
                layer.active_adapter = None


class _AdaptersDisabled:
    """Returned by disable_adapters(): the adapters are off already; leaving a `with` block turns them back on."""

    def __init__(self, model: nn.Module):
        self._model = model

    def __enter__(self):
        return self._model

    def __exit__(self, *exc_info):
        enable_adapters(self._model)
        return False


def disable_adapters(model: nn.Module) -> _AdaptersDisabled:
    """Turn every LoRA layer into its plain base layer now (merged layers are unmerged). Returns a context manager
    whose exit re-enables them: `with lora_ext.disable_adapters(model): base_out = model(x)`."""
    for _, layer in _require_lora(model, "lora_ext.disable_adapters"):
        layer.enable_adapters(False)
    return _AdaptersDisabled(model)


def enable_adapters(model: nn.Module) -> None:
    """Turn the adapters of every LoRA layer back on (the active adapter of each)."""
    for _, layer in _require_lora(model, "lora_ext.enable_adapters"):
        layer.enable_adapters(True)
