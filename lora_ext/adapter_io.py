"""Adapter files in Hugging Face PEFT's format: save_adapter / load_adapter (docs/models-api.md).

A folder holds two files:
    adapter_model.safetensors  base_model.model.<qualified module name>.lora_A.weight (r x in) and .lora_B.weight
                               (out x r) for every module that has the adapter;
    adapter_config.json        {"peft_type": "LORA", "r", "lora_alpha", "lora_dropout", "target_modules",
                               "use_rslora", "rank_pattern", "alpha_pattern", "bias": "none", ...}.
peft.PeftModel.from_pretrained(base_model, folder) loads what save_adapter writes, and load_adapter loads what
PEFT's save_pretrained writes for plain LoRA on linear layers (rank_pattern / alpha_pattern and exclude_modules
included). load_adapter checks the whole folder against the model before it changes anything: a bad or
mismatched file raises AdapterLoadError and leaves the model as it was.
"""
import json
import math
import os
import re
from collections import Counter
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from .adapter import LoRAAdapter, check_adapter_name, check_hyperparameters
from .layer import LoRALinear
from .models import candidate_modules, freeze_base, lora_layers, match_targets, target_matches

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
PREFIX = "base_model.model."
_SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B"}

# PEFT options that change what an adapter computes beyond W + s·B·A on linear layers: a file that sets any of
# them is refused (their default is null / false / empty).
_UNSUPPORTED = {
    "use_dora": "DoRA (use_dora=True)",
    "fan_in_fan_out": "fan_in_fan_out=True (Conv1D-style weights)",
    "modules_to_save": "modules_to_save (fully trained extra modules)",
    "lora_bias": "lora_bias=True (a trained bias in lora_B)",
    "layers_to_transform": "layers_to_transform",
    "layers_pattern": "layers_pattern",
    "layer_replication": "layer_replication",
    "target_parameters": "target_parameters (LoRA on nn.Parameters)",
    "trainable_token_indices": "trainable_token_indices",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "use_qalora": "QALoRA (use_qalora=True)",
    "use_bdlora": "use_bdlora",
    "megatron_config": "megatron_config",
    "arrow_config": "arrow_config",
    "monteclora_config": "monteclora_config",
    "kasa_config": "kasa_config",
    "velora_config": "velora_config",
    "lora_ga_config": "LoRA-GA (lora_ga_config)",
}
# Initialisations that change the base weights: the adapter only fits the modified base, not the original one.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


class AdapterLoadError(ValueError):
    """An adapter folder that cannot be loaded into the given model (missing, corrupt, mismatched, unsupported).
    When it is raised, the model is unchanged."""


# ------------------------------------------------------------------------------------------------------------------
# Saving


def _unwrap(model: nn.Module) -> nn.Module:
    # DistributedDataParallel / DataParallel wrap the model as .module: the file uses the model's own names.
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return model.module
    return model


def _full_tensor(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    if hasattr(t, "full_tensor"):  # a DTensor (FSDP2): gather it
        t = t.full_tensor()
    return t.cpu().contiguous()


def _target_modules_for(model: nn.Module, names: List[str]):
    """A target_modules value that names exactly `names` among the model's modules under PEFT's rules: the last
    name components when they suffice (as PEFT users write them), else the qualified names, else a regex."""
    candidates = [n for n, _ in candidate_modules(model)]
    wanted = set(names)
    for targets in (sorted({n.rsplit(".", 1)[-1] for n in names}), sorted(names)):
        if {n for n in candidates if target_matches(targets, n)} == wanted:
            return targets
    return "|".join(re.escape(n) for n in sorted(names))


def _most_common(values):
    return Counter(values).most_common(1)[0][0]


def _pattern_key(name: str, held) -> str:
    r"""A rank_pattern / alpha_pattern key that PEFT (and _pattern_value) match to layer `name` alone. PEFT treats a
    key k as the regex (.*\.)?(k)$, so "fc" would also pick "sub.fc": anchor and escape the name when the plain
    name would match another adapted layer."""
    if all(other == name or not re.match(rf"(.*\.)?({name})$", other) for other, _ in held):
        return name
    return "^" + re.escape(name)


def save_adapter(model: nn.Module, path, adapter_name: Optional[str] = None,
                 base_model_name_or_path: Optional[str] = None) -> None:
    """Write adapter `adapter_name` (default: the active one) of `model` to the folder `path` in PEFT's format:
    adapter_model.safetensors and adapter_config.json, loadable by peft.PeftModel.from_pretrained(base, path) and
    by load_adapter. Layers with another rank or alpha than most go into rank_pattern / alpha_pattern."""
    from safetensors.torch import save_file

    model = _unwrap(model)
    layers = lora_layers(model)
    if not layers:
        raise ValueError("lora_ext.save_adapter: the model has no LoRA layers")
    if adapter_name is None:
        actives = [l.active_adapter for _, l in layers if l.active_adapter is not None]
        if not actives:
            raise ValueError("lora_ext.save_adapter: the model has no active adapter; pass adapter_name")
        adapter_name = actives[0]
    held = [(n, l.adapters[adapter_name]) for n, l in layers if adapter_name in l.adapters]
    if not held:
        names = sorted({a for _, l in layers for a in l.adapter_names})
        raise ValueError(f"lora_ext.save_adapter: no layer holds an adapter named {adapter_name!r}; the model has "
                         f"{names}")
    for what in ("lora_dropout", "use_rslora"):
        if len({getattr(a, what) for _, a in held}) > 1:
            raise ValueError(f"lora_ext.save_adapter: the layers of adapter {adapter_name!r} differ in {what}, which "
                             "PEFT's format holds once per adapter")
    r = _most_common([a.r for _, a in held])
    alpha = _most_common([a.lora_alpha for _, a in held])
    tensors = {}
    for name, a in held:
        tensors[f"{PREFIX}{name}.lora_A.weight"] = _full_tensor(a.lora_A)
        tensors[f"{PREFIX}{name}.lora_B.weight"] = _full_tensor(a.lora_B)
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": held[0][1].lora_dropout,
        "target_modules": _target_modules_for(model, [n for n, _ in held]),
        "exclude_modules": None,
        "use_rslora": held[0][1].use_rslora,
        "rank_pattern": {_pattern_key(n, held): a.r for n, a in held if a.r != r},
        "alpha_pattern": {_pattern_key(n, held): a.lora_alpha for n, a in held if a.lora_alpha != alpha},
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "inference_mode": True,
    }
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(path, CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")


# ------------------------------------------------------------------------------------------------------------------
# Loading: read and check everything, then change the model


def _fail(message: str):
    raise AdapterLoadError(f"lora_ext.load_adapter: {message}")


def _read_config(path: str) -> dict:
    file = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(file):
        _fail(f"{file} is missing (an adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        with open(file, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as error:
        _fail(f"cannot read {file}: {error}")
    if not isinstance(config, dict):
        _fail(f"{file} must hold a JSON object, got {type(config).__name__}")
    return config


def _is_set(value) -> bool:
    return value not in (None, False, "", [], {}, ())


def _number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _rank(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value > 0


def _check_config(config: dict, file: str) -> dict:
    """The settings load_adapter uses, after checking every field that matters."""
    if config.get("peft_type") != "LORA":
        _fail(f"{file}: peft_type must be \"LORA\", got {config.get('peft_type')!r}")
    for key, what in _UNSUPPORTED.items():
        if _is_set(config.get(key)):
            _fail(f"{file}: {what} is not supported by lora_ext (got {key}={config[key]!r})")
    bias = config.get("bias", "none")
    if bias != "none":
        _fail(f"{file}: bias={bias!r} is not supported by lora_ext (only \"none\": the base bias stays frozen)")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        _fail(f"{file}: init_lora_weights={init!r} changes the base weights, so this adapter does not fit the "
              "original model; convert it with PEFT (save_pretrained(..., path_initial_model_for_weight_conversion"
              "=...)) first")
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not _rank(r):
        _fail(f"{file}: r must be a positive integer, got {r!r}")
    if not _number(alpha):
        _fail(f"{file}: lora_alpha must be a finite number, got {alpha!r}")
    dropout = config.get("lora_dropout", 0.0)
    if dropout is None:
        dropout = 0.0
    if not _number(dropout) or not 0.0 <= dropout < 1.0:
        _fail(f"{file}: lora_dropout must be in [0, 1), got {dropout!r}")
    use_rslora = config.get("use_rslora", False)
    if not isinstance(use_rslora, bool):
        _fail(f"{file}: use_rslora must be true or false, got {use_rslora!r}")
    targets = config.get("target_modules")
    if isinstance(targets, str):
        if targets == "all-linear":
            _fail(f"{file}: target_modules=\"all-linear\" is not supported; list the module names")
        try:
            re.compile(targets)
        except re.error as error:
            _fail(f"{file}: target_modules {targets!r} is not a valid regex: {error}")
    elif not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        _fail(f"{file}: target_modules must be a non-empty list of module names or a regex, got {targets!r}")
    exclude = config.get("exclude_modules")
    if exclude is not None and not isinstance(exclude, str) and not (
        isinstance(exclude, list) and all(isinstance(t, str) for t in exclude)
    ):
        _fail(f"{file}: exclude_modules must be a list of module names or a regex, got {exclude!r}")
    patterns = {}
    for key, ok in (("rank_pattern", _rank), ("alpha_pattern", _number)):
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict) or not all(isinstance(k, str) and ok(v) for k, v in pattern.items()):
            _fail(f"{file}: {key} must map module names or patterns to "
                  f"{'positive integers' if key == 'rank_pattern' else 'finite numbers'}, got {pattern!r}")
        for k in pattern:
            try:
                re.compile(k)
            except re.error as error:
                _fail(f"{file}: {key} key {k!r} is not a valid regex: {error}")
        patterns[key] = pattern
    return {"r": r, "alpha": alpha, "dropout": float(dropout), "use_rslora": use_rslora, "targets": targets,
            "exclude": exclude or None, **patterns}


def _pattern_value(pattern: Dict[str, object], name: str, default):
    """PEFT's get_pattern_key: the first key k with re.match(rf"(.*\\.)?({k})$", name), else `default`."""
    for key in pattern:
        if re.match(rf"(.*\.)?({key})$", name):
            return pattern[key]
    return pattern.get(name, default)


def _read_tensors(path: str) -> Dict[str, torch.Tensor]:
    file = os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(file):
        _fail(f"{file} is missing (an adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME}; lora_ext reads "
              "safetensors files only)")
    from safetensors.torch import load as load_bytes

    try:
        with open(file, "rb") as f:
            data = f.read()
        return load_bytes(data)
    except Exception as error:  # safetensors raises its own error types for corrupt or truncated files
        _fail(f"cannot read {file} (corrupt or truncated?): {type(error).__name__}: {error}")


def _adapter_dtype(layer_weight: torch.Tensor, tensor_dtype: torch.dtype) -> torch.dtype:
    # LoRALinear takes adapters in the weight's dtype or in float32 (PEFT's default on a 16-bit base). A file in
    # another dtype than the weight's loads as float32, which holds bf16 and fp16 values exactly (bf16 -> fp16
    # could overflow or round).
    return layer_weight.dtype if tensor_dtype == layer_weight.dtype else torch.float32


def load_adapter(model: nn.Module, path, name: str = "default", trainable: bool = False) -> nn.Module:
    """Load the adapter in folder `path` (PEFT's format, saved by PEFT or by save_adapter) into `model` as adapter
    `name`; returns `model`. LoRA layers are injected where the model has none (a LoRALinear gets one more
    adapter). The base parameters are frozen; the new adapter trains only with trainable=True. The model's active
    adapter stays active; a model without adapters gets `name` as its active adapter.

    Everything is checked first (files, config, that every tensor names a linear layer the config targets, that
    every targeted layer has its tensors, shapes against r and the layer, dtypes, finite values): a bad folder
    raises AdapterLoadError and leaves the model exactly as it was."""
    check_adapter_name(name, "lora_ext.load_adapter")
    model = _unwrap(model)
    path = os.fspath(path)
    if not os.path.isdir(path):
        _fail(f"{path!r} is not a folder (an adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME})")
    config_file = os.path.join(path, CONFIG_NAME)
    settings = _check_config(_read_config(path), config_file)
    tensors = _read_tensors(path)
    weights_file = os.path.join(path, WEIGHTS_NAME)

    # Which modules the config targets in this model.
    try:
        targeted = match_targets(model, settings["targets"], config_file, AdapterLoadError,
                                 exclude=settings["exclude"])
    except AdapterLoadError as error:
        _fail(str(error))
    if not targeted:
        _fail(f"{config_file}: target_modules {settings['targets']!r} matches no module of this model "
              f"({type(model).__name__}): an adapter for another base model?")

    # Which modules the file's tensors name.
    by_module: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
        if not key.startswith(PREFIX) or suffix is None or len(key) <= len(PREFIX) + len(suffix):
            _fail(f"{weights_file}: unexpected tensor {key!r} (PEFT's LoRA tensors are named "
                  f"{PREFIX}<module>.lora_A.weight and .lora_B.weight)")
        by_module.setdefault(key[len(PREFIX):-len(suffix)], {})[_SUFFIXES[suffix]] = tensor
    if not by_module:
        _fail(f"{weights_file} holds no tensors")

    targeted_names = {n for n, _ in targeted}
    unexpected = [m for m in by_module if m not in targeted_names]
    if unexpected:
        known = dict(candidate_modules(model))
        why = "not in this model" if unexpected[0] not in known else "not targeted by target_modules"
        _fail(f"{weights_file}: tensors for {unexpected[0]!r} ({why}; {len(unexpected)} unexpected module(s)): "
              "an adapter for another base model?")

    # Every targeted module: both tensors, the right shapes and values.
    plan: List[Tuple[str, nn.Module, LoRAAdapter]] = []
    for module_name, module in targeted:
        found = by_module.get(module_name, {})
        missing = [f"{PREFIX}{module_name}.lora_{ab}.weight" for ab in "AB" if ab not in found]
        if missing:
            _fail(f"{weights_file}: missing {', '.join(missing)} (target_modules names {module_name!r})")
        if isinstance(module, LoRALinear) and name in module.adapters:
            _fail(f"{module_name!r} has an adapter named {name!r} already; delete_adapter(model, {name!r}) first "
                  "or load under another name")
        r = _pattern_value(settings["rank_pattern"], module_name, settings["r"])
        alpha = _pattern_value(settings["alpha_pattern"], module_name, settings["alpha"])
        try:
            check_hyperparameters(r, alpha, settings["dropout"], "kaiming", f"{config_file} for {module_name!r}")
        except ValueError as error:
            _fail(str(error))
        out_features, in_features = module.weight.shape
        expected = {"A": (r, in_features), "B": (out_features, r)}
        for ab in "AB":
            t = found[ab]
            key = f"{PREFIX}{module_name}.lora_{ab}.weight"
            if not t.is_floating_point():
                _fail(f"{weights_file}: {key} has dtype {t.dtype}; LoRA weights must be floating point")
            if tuple(t.shape) != expected[ab]:
                _fail(f"{weights_file}: {key} has shape {tuple(t.shape)}, but {module_name!r} "
                      f"({in_features} -> {out_features}) with r={r} needs {expected[ab]}")
            if not bool(torch.isfinite(t).all()):
                _fail(f"{weights_file}: {key} holds NaN or Inf")
        weight = module.weight
        dtype = _adapter_dtype(weight, found["A"].dtype)
        for ab in "AB":  # values finite in the file but not in the dtype they load as
            if not bool(torch.isfinite(found[ab].to(dtype)).all()):
                _fail(f"{weights_file}: {PREFIX}{module_name}.lora_{ab}.weight overflows {dtype}")
        adapter = LoRAAdapter(in_features, out_features, r, alpha, settings["dropout"], settings["use_rslora"],
                              "kaiming", device=weight.device, dtype=dtype)
        with torch.no_grad():
            adapter.lora_A.copy_(found["A"].to(dtype))
            adapter.lora_B.copy_(found["B"].to(dtype))
        adapter.requires_grad_(bool(trainable))
        adapter.train(module.training)
        plan.append((module_name, module, adapter))

    # Everything checked and built: change the model (plain attribute and dict assignments from here on).
    active, enabled = None, True
    for _, layer in lora_layers(model):
        if layer.active_adapter is not None:
            active, enabled = layer.active_adapter, layer.adapters_enabled
            break
    freeze_base(model)
    for module_name, module, adapter in plan:
        if isinstance(module, LoRALinear):
            layer = module
        else:
            layer = LoRALinear.__new__(LoRALinear)
            nn.Module.__init__(layer)
            layer._setup_base(module.weight, module.bias)
            layer.train(module.training)
            layer.active_adapter = active
            layer.adapters_enabled = enabled
            parent_name, _, child = module_name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
        layer.adapters[name] = adapter
        if layer.active_adapter is None:
            layer.active_adapter = name
    return model
