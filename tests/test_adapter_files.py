"""Bad adapter files: every corrupt, truncated or mismatched file raises lora_ext.AdapterLoadError (a ValueError)
and leaves the model EXACTLY as it was (every state_dict tensor bit for bit, the module structure, the adapter
names, the active adapter, enabled / merged flags, requires_grad, storage).

The valid file is written by hand in PEFT's format (independent of lora_ext.save_adapter):
    adapter_model.safetensors: base_model.model.<module>.lora_A.weight (r x in), .lora_B.weight (out x r)
    adapter_config.json: {"peft_type": "LORA", "r", "lora_alpha", "target_modules", ...}
Each case is tried on a model without LoRA layers (load_adapter would inject) and on an injected model with an
adapter "default" (load_adapter(..., name="task2") would add one).
"""

import copy
import json
import os

import pytest
import torch
from torch import nn

import lora_ext
from conftest import assert_bit_identical

safetensors_torch = pytest.importorskip("safetensors.torch")

R, ALPHA = 4, 8
TARGETS = ["q_proj", "v_proj", "down"]


class Attn(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d // 2, bias=False)
        self.o_proj = nn.Linear(d // 2, d)

    def forward(self, x):
        return self.o_proj(self.v_proj(x) * torch.sigmoid(self.q_proj(x)[..., : x.shape[-1] // 2]))


class MLP(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


class Layer(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.attn = Attn(d)
        self.mlp = MLP(d)

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.mlp(x)


class Tiny(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.layers = nn.ModuleList([Layer(d) for _ in range(2)])
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 5)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))


def make_tiny(seed=0):
    torch.manual_seed(seed)
    return Tiny().eval()


X = torch.randn(3, 16, generator=torch.Generator().manual_seed(3))


def target_modules(model, targets=TARGETS):
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and any(n == t or n.endswith("." + t) for t in targets)]


def write_adapter(path, model, targets=TARGETS, r=R, alpha=ALPHA, seed=5, extra_config=None):
    """A valid PEFT-format adapter for `model`, written without lora_ext. Returns the tensors."""
    os.makedirs(path, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, lin in target_modules(model, targets):
        tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(r, lin.in_features, generator=g) * 0.3
        tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(lin.out_features, r, generator=g) * 0.3
    safetensors_torch.save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, "r": r, "lora_alpha": alpha,
        "lora_dropout": 0.0, "target_modules": targets, "use_rslora": False, "bias": "none",
        "fan_in_fan_out": False, "init_lora_weights": True, "modules_to_save": None, "inference_mode": True,
    }
    config.update(extra_config or {})
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(config, f)
    return tensors


@torch.no_grad()
def expected_output(base, tensors, scaling=ALPHA / R):
    ref = copy.deepcopy(base)
    for name, lin in ref.named_modules():
        key = f"base_model.model.{name}.lora_A.weight"
        if key in tensors:
            b = tensors[key.replace("lora_A", "lora_B")]
            lin.weight.copy_((lin.weight.double() + scaling * (b.double() @ tensors[key].double())).float())
    return ref(X)


# ----------------------------------------------------------------------------
# Snapshots: everything observable about a model
# ----------------------------------------------------------------------------


def snapshot(model):
    lora = []
    for n, layer in lora_ext.lora_layers(model):
        adapters = {k: (a.r, a.lora_alpha, a.scaling, a.lora_dropout, a.use_rslora)
                    for k, a in layer.adapters.items()}
        lora.append((n, list(layer.adapter_names), layer.active_adapter, layer.adapters_enabled, layer.merged,
                     adapters))
    with torch.no_grad():
        out = model(X)
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "keys": list(model.state_dict().keys()),
        "modules": [(n, type(m), m.training) for n, m in model.named_modules()],
        "params": [(n, p.requires_grad, p.data_ptr(), p.dtype, tuple(p.shape)) for n, p in model.named_parameters()],
        "lora": lora,
        "output": out,
    }


def assert_unchanged(model, before):
    after = snapshot(model)
    assert after["modules"] == before["modules"], "module structure changed"
    assert after["keys"] == before["keys"], "state_dict keys changed"
    for k, v in before["state"].items():
        assert_bit_identical(after["state"][k], v, k)
    assert after["params"] == before["params"], "parameters (requires_grad / storage / shape) changed"
    assert after["lora"] == before["lora"], "adapters / active adapter / flags changed"
    assert_bit_identical(after["output"], before["output"], "output")


# ----------------------------------------------------------------------------
# The bad files
# ----------------------------------------------------------------------------

ST = "adapter_model.safetensors"
CFG = "adapter_config.json"
LAST = "base_model.model.layers.1.mlp.down"  # the last target module: a late failure
FIRST = "base_model.model.layers.0.attn.q_proj"


def _rewrite_tensors(path, fn):
    tensors = safetensors_torch.load_file(os.path.join(path, ST))
    fn(tensors)
    safetensors_torch.save_file(tensors, os.path.join(path, ST))


def _rewrite_config(path, fn):
    with open(os.path.join(path, CFG)) as f:
        config = json.load(f)
    fn(config)
    with open(os.path.join(path, CFG), "w") as f:
        json.dump(config, f)


def _write_bytes(name, data):
    def fn(path):
        with open(os.path.join(path, name), "wb") as f:
            f.write(data)
    return fn


def _truncate(fraction=None, drop=None):
    def fn(path):
        with open(os.path.join(path, ST), "rb") as f:
            data = f.read()
        keep = int(len(data) * fraction) if fraction is not None else len(data) - drop
        with open(os.path.join(path, ST), "wb") as f:
            f.write(data[:keep])
    return fn


def _header_only(path):
    with open(os.path.join(path, ST), "rb") as f:
        data = f.read()
    n = int.from_bytes(data[:8], "little")
    with open(os.path.join(path, ST), "wb") as f:
        f.write(data[: 8 + n])


def _set(key, shape=None, value=None):
    def fn(t):
        t[key] = torch.randn(shape) if shape is not None else value
    return fn


def _drop(*keys):
    def fn(t):
        for k in keys:
            del t[k]
    return fn


def _rename_all(old, new):
    def fn(t):
        for k in list(t):
            t[k.replace(old, new, 1)] = t.pop(k)
    return fn


BAD_CASES = {
    # missing / unreadable files
    "missing_directory": lambda p: os.rename(p, p + "_gone"),
    "missing_safetensors": lambda p: os.remove(os.path.join(p, ST)),
    "missing_config": lambda p: os.remove(os.path.join(p, CFG)),
    "garbage_json": _write_bytes(CFG, b'{"peft_type": "LORA", "r": 4,, garbage'),
    "json_not_an_object": _write_bytes(CFG, b"[1, 2, 3]"),
    "empty_config": _write_bytes(CFG, b""),
    "garbage_safetensors": _write_bytes(ST, bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8,
                                                                generator=torch.Generator().manual_seed(1)).tolist())),
    "empty_safetensors": _write_bytes(ST, b""),
    "truncated_half": _truncate(fraction=0.5),
    "truncated_tail": _truncate(drop=16),
    "header_only": _header_only,
    "huge_header_length": _write_bytes(ST, (10**12).to_bytes(8, "little") + b"{}"),
    # mismatched contents
    "wrong_shape_A_last": lambda p: _rewrite_tensors(p, _set(LAST + ".lora_A.weight", (R, 33))),
    "wrong_shape_B_last": lambda p: _rewrite_tensors(p, _set(LAST + ".lora_B.weight", (19, R))),
    "wrong_shape_A_first": lambda p: _rewrite_tensors(p, _set(FIRST + ".lora_A.weight", (R, 17))),
    "A_is_1d": lambda p: _rewrite_tensors(p, _set(LAST + ".lora_A.weight", (R * 32,))),
    "A_B_ranks_disagree": lambda p: _rewrite_tensors(p, _set(LAST + ".lora_B.weight", (16, R - 1))),
    "config_r_disagrees": lambda p: _rewrite_config(p, lambda c: c.update(r=2 * R)),
    "missing_B_key": lambda p: _rewrite_tensors(p, _drop(LAST + ".lora_B.weight")),
    "missing_module": lambda p: _rewrite_tensors(p, _drop(LAST + ".lora_A.weight", LAST + ".lora_B.weight")),
    "no_tensors_at_all": lambda p: _rewrite_tensors(p, lambda t: t.clear()),
    "unexpected_module": lambda p: _rewrite_tensors(
        p, _set("base_model.model.layers.7.attn.q_proj.lora_A.weight", (R, 16))),
    "unexpected_non_target_module": lambda p: _rewrite_tensors(p, lambda t: t.update({
        "base_model.model.head.lora_A.weight": torch.randn(R, 16),
        "base_model.model.head.lora_B.weight": torch.randn(5, R)})),
    "unexpected_tensor_name": lambda p: _rewrite_tensors(p, _set(FIRST + ".lora_C.weight", (R, 16))),
    "keys_without_prefix": lambda p: _rewrite_tensors(p, _rename_all("base_model.model.", "")),
    "target_matches_non_linear": lambda p: _rewrite_config(p, lambda c: c.update(target_modules=TARGETS + ["norm"])),
    "target_matches_nothing": lambda p: _rewrite_config(p, lambda c: c.update(target_modules=["nonexistent"])),
    "target_regex_matches_nothing": lambda p: _rewrite_config(p, lambda c: c.update(target_modules=r"foo\..*")),
}

# Where the message should point: the offending module or file.
MESSAGE_HINTS = {
    "wrong_shape_A_last": "layers.1.mlp.down",
    "wrong_shape_B_last": "layers.1.mlp.down",
    "wrong_shape_A_first": "layers.0.attn.q_proj",
    "missing_B_key": "layers.1.mlp.down",
    "missing_module": "layers.1.mlp.down",
    "unexpected_module": "layers.7.attn.q_proj",
    "missing_safetensors": ST,
    "missing_config": CFG,
}


def fresh_model():
    return make_tiny()


def injected_model():
    model = lora_ext.inject(make_tiny(), ["q_proj", "head"], r=2, alpha=4)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for _, layer in lora_ext.lora_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g))
    return model


SCENARIOS = {"fresh": (fresh_model, "default"), "injected": (injected_model, "task2")}


def assert_loaded(model, name, tensors, check_output):
    prefix = "base_model.model."
    expected_layers = sorted({k[len(prefix):].rsplit(".lora_", 1)[0] for k in tensors})
    layers = {n: l for n, l in lora_ext.lora_layers(model) if name in l.adapter_names}
    assert sorted(layers) == expected_layers
    for n, layer in layers.items():
        a = layer.adapters[name]
        assert a.r == R and a.scaling == pytest.approx(ALPHA / R)
        assert_bit_identical(a.lora_A.detach(), tensors[f"{prefix}{n}.lora_A.weight"], n)
        assert_bit_identical(a.lora_B.detach(), tensors[f"{prefix}{n}.lora_B.weight"], n)
    if check_output:  # a model that had no other adapter
        lora_ext.set_adapter(model, name)
        with torch.no_grad():
            torch.testing.assert_close(model(X), expected_output(make_tiny(), tensors), rtol=1e-5, atol=1e-6)


def test_adapter_load_error_type():
    assert issubclass(lora_ext.AdapterLoadError, ValueError)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_valid_file_loads(scenario, tmp_path):
    """Control: the unmodified file loads, so every failure below is due to the one defect."""
    build, name = SCENARIOS[scenario]
    model = build()
    tensors = write_adapter(str(tmp_path / "ad"), make_tiny())
    lora_ext.load_adapter(model, tmp_path / "ad", name=name)
    assert_loaded(model, name, tensors, check_output=scenario == "fresh")


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_file_raises_and_leaves_model_unchanged(case, scenario, tmp_path):
    build, name = SCENARIOS[scenario]
    model = build()
    path = str(tmp_path / "ad")
    write_adapter(path, make_tiny())
    BAD_CASES[case](path)
    before = snapshot(model)
    with pytest.raises(lora_ext.AdapterLoadError) as info:
        lora_ext.load_adapter(model, path, name=name)
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert message.strip(), "the error needs a message"
    if case in MESSAGE_HINTS:
        assert MESSAGE_HINTS[case] in message, f"the message should name {MESSAGE_HINTS[case]!r}: {message}"
    assert_unchanged(model, before)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_failed_load_then_valid_load(scenario, tmp_path):
    """A failed load leaves nothing behind that would spoil the next one."""
    build, name = SCENARIOS[scenario]
    model = build()
    bad, good = str(tmp_path / "bad"), str(tmp_path / "good")
    write_adapter(bad, make_tiny())
    BAD_CASES["wrong_shape_A_last"](bad)
    tensors = write_adapter(good, make_tiny())
    for _ in range(2):
        with pytest.raises(lora_ext.AdapterLoadError):
            lora_ext.load_adapter(model, bad, name=name)
    lora_ext.load_adapter(model, good, name=name)
    assert_loaded(model, name, tensors, check_output=scenario == "fresh")


def test_existing_adapter_name_untouched_by_failed_reload(tmp_path):
    """Loading a bad file under a name already in use must not damage that adapter."""
    model = make_tiny()
    good, bad = str(tmp_path / "good"), str(tmp_path / "bad")
    write_adapter(good, make_tiny())
    lora_ext.load_adapter(model, good, name="a")
    write_adapter(bad, make_tiny(), seed=6)
    BAD_CASES["missing_B_key"](bad)
    before = snapshot(model)
    with pytest.raises((lora_ext.AdapterLoadError, ValueError)):
        lora_ext.load_adapter(model, bad, name="a")
    assert_unchanged(model, before)


# ----------------------------------------------------------------------------
# Another base model (transformers)
# ----------------------------------------------------------------------------


def _llama(hidden=64, seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    return transformers.LlamaForCausalLM(cfg).eval()


def _bert(seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, vocab_size=128, max_position_embeddings=64)
    return transformers.BertModel(cfg).eval()


def _llama_adapter(path, targets=("q_proj", "v_proj", "down_proj")):
    """An adapter for the 64-wide Llama, written in PEFT's format by hand."""
    write_adapter(path, _llama(), targets=list(targets))


def _snapshot_generic(model):
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "modules": [(n, type(m), m.training) for n, m in model.named_modules()],
        "params": [(n, p.requires_grad, p.data_ptr()) for n, p in model.named_parameters()],
        "lora": [(n, list(l.adapter_names), l.active_adapter, l.adapters_enabled) for n, l in
                 lora_ext.lora_layers(model)],
    }


def _assert_generic_unchanged(model, before):
    after = _snapshot_generic(model)
    assert after["modules"] == before["modules"]
    assert after["params"] == before["params"]
    assert after["lora"] == before["lora"]
    assert after["state"].keys() == before["state"].keys()
    for k, v in before["state"].items():
        assert_bit_identical(after["state"][k], v, k)


@pytest.mark.parametrize("target_model", ["bert", "wider_llama", "tiny", "injected_wider_llama"])
def test_adapter_of_another_base_model(target_model, tmp_path):
    path = str(tmp_path / "llama_adapter")
    _llama_adapter(path)
    if target_model == "bert":
        model = _bert()  # no such modules at all
    elif target_model == "wider_llama":
        model = _llama(hidden=96)  # the same names, other shapes
    elif target_model == "injected_wider_llama":
        model = lora_ext.inject(_llama(hidden=96), ["q_proj", "o_proj"], r=2)
    else:
        model = make_tiny()
    before = _snapshot_generic(model)
    with pytest.raises(lora_ext.AdapterLoadError):
        lora_ext.load_adapter(model, path, name="task2")
    _assert_generic_unchanged(model, before)


def test_llama_adapter_into_llama_with_fewer_layers(tmp_path):
    """Keys for model.layers.1.* do not exist in a one-layer Llama: unexpected keys."""
    transformers = pytest.importorskip("transformers")
    path = str(tmp_path / "ad")
    _llama_adapter(path)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128)).eval()
    before = _snapshot_generic(model)
    with pytest.raises(lora_ext.AdapterLoadError):
        lora_ext.load_adapter(model, path)
    _assert_generic_unchanged(model, before)
