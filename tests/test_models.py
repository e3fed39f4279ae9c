"""Model-level API (docs/models-api.md, issue 4): inject, lora_layers, count/print_trainable_parameters,
merge / unmerge / merge_and_unload, several adapters (set_adapter, delete_adapter, disable/enable_adapters).

Written against the contract, not the implementation. Models: a plain nn.Module with nested containers
(names that test the suffix rule), and transformers' Llama and BERT built from tiny configs (no downloads).
"""

import copy
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import lora_ext
from conftest import assert_bit_identical, assert_rel_close

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(lora_ext.__file__)))

# ----------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, d=32, hidden=64):
        super().__init__()
        self.fc1 = nn.Linear(d, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, d, bias=False)
        self.my_fc1 = nn.Linear(d, d)  # must NOT match the target "fc1" (suffix rule is ".fc1")
        self.gate = nn.Sequential(nn.Linear(d, d), nn.Sigmoid())

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(x))) * self.gate(x) + 0.5 * self.my_fc1(x)


class Net(nn.Module):
    """Names: blocks.{0,1}.{fc1,fc2,my_fc1,gate.0,gate.1,act}, norm, head, scale (a bare Parameter)."""

    def __init__(self, d=32):
        super().__init__()
        self.blocks = nn.ModuleList([Block(d) for _ in range(2)])
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 8)
        self.scale = nn.Parameter(torch.ones(d))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x) * self.scale)


def make_net(seed=0):
    torch.manual_seed(seed)
    return Net().eval()


def net_input(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 5, 32, generator=g)


def tiny_llama(seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_bert(seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        vocab_size=128, max_position_embeddings=64,
    )
    return transformers.BertModel(cfg).eval()


def llama_out(model, seed=2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (2, 8), generator=g)
    return model(input_ids=ids).logits


def bert_out(model, seed=2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (2, 8), generator=g)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 6:] = 0
    out = model(input_ids=ids, attention_mask=mask)
    return torch.cat([out.last_hidden_state.flatten(), out.pooler_output.flatten()])


LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def linear_names(model):
    return [n for n, m in model.named_modules() if type(m) is nn.Linear]


@torch.no_grad()
def randomise_adapters(model, scale=0.3, seed=123):
    """Fresh adapters have B = 0, which hides every bug: give every A and B random values."""
    g = torch.Generator().manual_seed(seed)
    for _, layer in lora_ext.lora_layers(model):
        for adapter in layer.adapters.values():
            adapter.lora_A.copy_(torch.randn(adapter.lora_A.shape, generator=g) * adapter.lora_A.shape[1] ** -0.5)
            adapter.lora_B.copy_(torch.randn(adapter.lora_B.shape, generator=g) * scale)
    return model


@torch.no_grad()
def merged_reference(base, model, adapter_name):
    """An independent reference: a copy of the un-injected base model whose linear layers hold
    W + s·B·A (float64 sum, rounded once) for every layer of `model` that has `adapter_name`."""
    ref = copy.deepcopy(base)
    modules = dict(ref.named_modules())
    for name, layer in lora_ext.lora_layers(model):
        if adapter_name not in layer.adapter_names:
            continue
        a = layer.adapters[adapter_name]
        lin = modules[name]
        delta = a.scaling * (a.lora_B.double() @ a.lora_A.double())
        lin.weight.copy_((lin.weight.double() + delta).to(lin.weight.dtype))
    return ref


def lora_param_numel(model):
    total = 0
    for _, layer in lora_ext.lora_layers(model):
        for a in layer.adapters.values():
            total += a.lora_A.numel() + a.lora_B.numel()
    return total


# ----------------------------------------------------------------------------
# inject: matching rules
# ----------------------------------------------------------------------------

MATCH_CASES = [
    (["fc1"], ["blocks.0.fc1", "blocks.1.fc1"]),  # suffix after ".", not "my_fc1"
    (["0.fc1"], ["blocks.0.fc1"]),
    (["head"], ["head"]),  # a direct child: exact name
    (["gate.0"], ["blocks.0.gate.0", "blocks.1.gate.0"]),
    (["blocks.1.fc2", "head"], ["blocks.1.fc2", "head"]),
    (["fc1", "fc2", "my_fc1"], ["blocks.0.fc1", "blocks.0.fc2", "blocks.0.my_fc1",
                                "blocks.1.fc1", "blocks.1.fc2", "blocks.1.my_fc1"]),
    # PEFT: an entry that matches nothing is fine as long as something matches.
    (["fc1", "no_such_module"], ["blocks.0.fc1", "blocks.1.fc1"]),
    # a single string is a regex, re.fullmatch on the qualified name
    (r"blocks\.\d\.fc[12]", ["blocks.0.fc1", "blocks.0.fc2", "blocks.1.fc1", "blocks.1.fc2"]),
    (r".*fc1", ["blocks.0.fc1", "blocks.0.my_fc1", "blocks.1.fc1", "blocks.1.my_fc1"]),
]


@pytest.mark.parametrize("targets,expected", MATCH_CASES, ids=[str(c[0]) for c in MATCH_CASES])
def test_inject_matches_like_peft(targets, expected):
    model = make_net()
    out = lora_ext.inject(model, targets, r=2, alpha=4)
    assert out is model, "inject works in place and returns the same model"
    names = [n for n, _ in lora_ext.lora_layers(model)]
    assert names == expected
    for n, m in model.named_modules():
        assert isinstance(m, lora_ext.LoRALinear) == (n in expected), n


def test_inject_regex_is_fullmatch_not_search():
    # "fc1" as a single string is a regex that must match the WHOLE qualified name: nothing does.
    with pytest.raises(ValueError):
        lora_ext.inject(make_net(), "fc1", r=2)


@pytest.mark.parametrize("targets", [["no_such_module"], [], "nothing.*", ["blocks.2.fc1"], ["c1"]])
def test_inject_nothing_matches_raises_value_error(targets):
    model = make_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as info:
        lora_ext.inject(model, targets, r=2)
    assert str(info.value), "the error must say what went wrong"
    assert lora_ext.lora_layers(model) == []
    assert model.state_dict().keys() == before.keys()


@pytest.mark.parametrize("targets", [["gate"], ["act"], ["norm"], ["blocks"], ["fc1", "gate"], r"blocks\.0\.gate",
                                     # matches the linears of block 1 and also its act, gate, gate.1
                                     r"blocks\.1\..*"])
def test_inject_non_linear_match_raises_type_error(targets):
    with pytest.raises(TypeError) as info:
        lora_ext.inject(make_net(), targets, r=2)
    assert str(info.value)


def test_inject_embedding_raises_type_error():
    with pytest.raises(TypeError):
        lora_ext.inject(tiny_llama(), ["embed_tokens"], r=2)


def test_inject_shares_weights_and_freezes_everything_else():
    model = make_net()
    base = copy.deepcopy(model)
    x = net_input()
    shared = {n: (m.weight, m.bias) for n, m in model.named_modules() if n in ("blocks.0.fc1", "blocks.1.fc1", "head")}
    ptrs = {n: (w.data_ptr(), None if b is None else b.data_ptr()) for n, (w, b) in shared.items()}
    lora_ext.inject(model, ["fc1", "head"], r=4, alpha=8, dropout=0.1, use_rslora=False)
    layers = dict(lora_ext.lora_layers(model))
    assert sorted(layers) == ["blocks.0.fc1", "blocks.1.fc1", "head"]
    for n, (w_ptr, b_ptr) in ptrs.items():
        layer = layers[n]
        assert layer.weight.data_ptr() == w_ptr, f"{n}: the frozen weight must be shared, not copied"
        assert layer.bias.data_ptr() == b_ptr
    for n, layer in layers.items():
        assert isinstance(layer, lora_ext.LoRALinear)
        assert layer.r == 4 and layer.lora_alpha == 8 and layer.scaling == pytest.approx(2.0)
        assert layer.lora_dropout == pytest.approx(0.1) and layer.use_rslora is False
        assert layer.active_adapter == "default" and layer.adapter_names == ["default"]
        assert layer.adapters_enabled is True and layer.merged is False
        assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0
        assert layer.lora_A.shape == (4, layer.in_features) and layer.lora_B.shape == (layer.out_features, 4)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    expected = sorted(f"{n}.adapters.default.lora_{ab}" for n in layers for ab in "AB")
    assert trainable == expected, "only lora_A / lora_B train; every other parameter is frozen"
    # B = 0: the model computes what the base computed.
    assert_rel_close(model(x), base(x), torch.float32)


def test_inject_options_rslora_and_gaussian():
    model = lora_ext.inject(make_net(), ["fc2"], r=16, alpha=8, use_rslora=True, init="gaussian", adapter_name="x")
    for _, layer in lora_ext.lora_layers(model):
        assert layer.use_rslora is True and layer.scaling == pytest.approx(8 / 4.0)
        assert layer.active_adapter == "x" and list(layer.adapters.keys()) == ["x"]
        assert torch.count_nonzero(layer.lora_B) == 0


def test_injected_model_trains_only_lora():
    model = lora_ext.inject(make_net(), ["fc1", "fc2", "head"], r=4).train()
    randomise_adapters(model)
    base_state = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = model(net_input()).square().mean()
    loss.backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n
    opt.step()
    for k, v in model.state_dict().items():
        if "lora_" not in k:
            assert_bit_identical(v, base_state[k], k)


def test_lora_layer_state_dict_keys():
    model = lora_ext.inject(make_net(), ["head"], r=2)
    keys = sorted(k for k in model.state_dict() if k.startswith("head."))
    assert keys == ["head.adapters.default.lora_A", "head.adapters.default.lora_B", "head.bias", "head.weight"]


# ----------------------------------------------------------------------------
# transformers models
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_inject_transformers_models(kind):
    if kind == "llama":
        model, out, targets = tiny_llama(), llama_out, LLAMA_LINEARS
    else:
        model, out, targets = tiny_bert(), bert_out, ["query", "key", "value", "dense"]
    base = copy.deepcopy(model)
    all_linears = linear_names(model)
    expected = [n for n in all_linears if any(n == t or n.endswith("." + t) for t in targets)]
    assert kind != "llama" or "lm_head" not in expected
    with torch.no_grad():
        ref = out(base)
    lora_ext.inject(model, targets, r=4, alpha=8)
    assert [n for n, _ in lora_ext.lora_layers(model)] == expected
    assert linear_names(model) == [n for n in all_linears if n not in expected]
    for n, p in model.named_parameters():
        assert p.requires_grad == (".lora_A" in n or ".lora_B" in n), n
    with torch.no_grad():
        assert_rel_close(out(model), ref, torch.float32)
        randomise_adapters(model)
        adapted = out(model)
        assert_rel_close(adapted, out(merged_reference(base, model, "default")), torch.float32)
    assert (adapted - ref).norm() > 1e-3 * ref.norm(), "the random adapters must change the output"
    # it trains
    model.train()
    loss = out(model).square().mean()
    loss.backward()
    for n, layer in lora_ext.lora_layers(model):
        assert layer.lora_A.grad is not None and layer.lora_B.grad is not None, n
        assert layer.lora_B.grad.abs().sum() > 0, n


# ----------------------------------------------------------------------------
# lora_layers, count_parameters, print_trainable_parameters
# ----------------------------------------------------------------------------

_PRINT_RE = re.compile(r"trainable params: ([\d,]+) \|\| all params: ([\d,]+) \|\| trainable%: ([\d.eE+-]+)")


def test_count_and_print_trainable_parameters(capsys):
    model = make_net()
    base_total = sum(p.numel() for p in model.parameters())
    assert lora_ext.count_parameters(model) == (base_total, base_total)
    lora_ext.inject(model, ["fc1", "head"], r=4)
    n_lora = 2 * 4 * (32 + 64) + 4 * (32 + 8)
    assert lora_param_numel(model) == n_lora
    trainable, total = lora_ext.count_parameters(model)
    assert (trainable, total) == (n_lora, base_total + n_lora), "shared weights count once"
    assert isinstance(trainable, int) and isinstance(total, int)
    ret = lora_ext.print_trainable_parameters(model)
    printed = capsys.readouterr().out
    m = _PRINT_RE.search(printed)
    assert m, f"unexpected format: {printed!r}"
    assert int(m.group(1).replace(",", "")) == n_lora
    assert int(m.group(2).replace(",", "")) == base_total + n_lora
    assert float(m.group(3)) == pytest.approx(100 * n_lora / (base_total + n_lora), rel=1e-3)
    del ret


def test_count_parameters_llama():
    model = tiny_llama()
    base_total = sum(p.numel() for p in model.parameters())
    lora_ext.inject(model, ["q_proj", "v_proj"], r=4)
    # q: 64 -> 64, v: 64 -> 32 (2 KV heads of 16), 2 layers
    n_lora = 2 * (4 * (64 + 64) + 4 * (64 + 32))
    assert lora_ext.count_parameters(model) == (n_lora, base_total + n_lora)


def test_lora_layers_order_and_types():
    model = lora_ext.inject(make_net(), ["fc2", "fc1", "head"], r=2)
    got = lora_ext.lora_layers(model)
    assert isinstance(got, list)
    assert [n for n, _ in got] == ["blocks.0.fc1", "blocks.0.fc2", "blocks.1.fc1", "blocks.1.fc2", "head"]
    modules = dict(model.named_modules())
    for n, layer in got:
        assert layer is modules[n] and isinstance(layer, lora_ext.LoRALinear)
    assert lora_ext.lora_layers(make_net()) == []


# ----------------------------------------------------------------------------
# merge / unmerge / merge_and_unload
# ----------------------------------------------------------------------------


def test_merge_unmerge_restores_bits():
    model = randomise_adapters(lora_ext.inject(make_net(), ["fc1", "fc2", "head"], r=4))
    x = net_input()
    with torch.no_grad():
        before_out = model(x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lora_ext.merge(model)
    assert all(layer.merged for _, layer in lora_ext.lora_layers(model))
    with torch.no_grad():
        assert_rel_close(model(x), before_out, torch.float32)
    changed = [k for k, v in model.state_dict().items() if k.endswith("weight") and not torch.equal(v, before[k])]
    assert sorted(changed) == sorted(f"{n}.weight" for n, _ in lora_ext.lora_layers(model))
    lora_ext.unmerge(model)
    assert not any(layer.merged for _, layer in lora_ext.lora_layers(model))
    for k, v in model.state_dict().items():
        assert_bit_identical(v, before[k], k)
    with torch.no_grad():
        assert_bit_identical(model(x), before_out, "output after unmerge")


def test_merge_uses_active_adapter():
    base = make_net()
    model = lora_ext.inject(copy.deepcopy(base), ["fc1", "head"], r=4)
    lora_ext.inject(model, ["fc1", "head"], r=2, alpha=6, adapter_name="task2")
    randomise_adapters(model)
    x = net_input()
    lora_ext.set_adapter(model, "task2")
    with torch.no_grad():
        ref = merged_reference(base, model, "task2")(x)
        lora_ext.merge(model)
        assert_rel_close(model(x), ref, torch.float32)
        lora_ext.unmerge(model)
        assert_rel_close(model(x), ref, torch.float32)


def _assert_no_lora_ext_modules(model):
    for n, m in model.named_modules():
        assert not type(m).__module__.startswith("lora_ext"), f"{n} is still a {type(m).__name__}"


def test_merge_and_unload_generic():
    base = make_net()
    model = lora_ext.inject(copy.deepcopy(base), ["fc1", "fc2", "gate.0", "head"], r=4)
    lora_ext.inject(model, ["fc1"], r=2, adapter_name="task2")
    randomise_adapters(model)
    injected = [n for n, _ in lora_ext.lora_layers(model)]
    x = net_input()
    with torch.no_grad():
        expected = model(x)
    plain = lora_ext.merge_and_unload(model)
    _assert_no_lora_ext_modules(plain)
    modules = dict(plain.named_modules())
    for n in injected:
        assert type(modules[n]) is nn.Linear, f"{n}: {type(modules[n])}"
    assert linear_names(plain) == linear_names(base)
    assert lora_ext.lora_layers(plain) == []
    with torch.no_grad():
        out = plain(x)
    assert_rel_close(out, expected, torch.float32)
    # loads into a fresh, never-injected model with strict=True and computes the same
    sd = plain.state_dict()
    assert list(sd.keys()) == list(base.state_dict().keys())
    fresh = make_net(seed=99)
    fresh.load_state_dict(sd, strict=True)
    with torch.no_grad():
        assert_bit_identical(fresh(x), out, "fresh model output")


_NO_LORA_EXT_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["lora_ext"] = None  # any import of lora_ext now fails
    import torch, transformers
    d = sys.argv[1]
    data = torch.load(d + "/inputs.pt", weights_only=True)
    cfg = transformers.LlamaConfig(**data["config"])
    torch.manual_seed(1234)
    fresh = transformers.LlamaForCausalLM(cfg).eval()
    fresh.load_state_dict(torch.load(d + "/state_dict.pt", weights_only=True), strict=True)
    whole = torch.load(d + "/model.pt", weights_only=False).eval()
    with torch.no_grad():
        a = fresh(input_ids=data["ids"]).logits
        b = whole(input_ids=data["ids"]).logits
    assert torch.equal(a, data["expected"]), (a - data["expected"]).abs().max()
    assert torch.equal(b, data["expected"]), (b - data["expected"]).abs().max()
    assert not any(m.startswith("lora_ext") and sys.modules[m] is not None for m in sys.modules)
    print("OK")
    """
)


def test_merge_and_unload_llama_loads_without_lora_ext(tmp_path):
    base = tiny_llama()
    model = lora_ext.inject(copy.deepcopy(base), LLAMA_LINEARS, r=4, alpha=8)
    randomise_adapters(model)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 128, (2, 8), generator=g)
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        reference = merged_reference(base, model, "default")(input_ids=ids).logits
    plain = lora_ext.merge_and_unload(model).eval()
    _assert_no_lora_ext_modules(plain)
    assert linear_names(plain) == linear_names(base)
    with torch.no_grad():
        out = plain(input_ids=ids).logits
    assert_rel_close(out, adapted, torch.float32)
    assert_rel_close(out, reference, torch.float32)
    torch.save(plain.state_dict(), tmp_path / "state_dict.pt")
    torch.save(plain, tmp_path / "model.pt")
    cfg = {k: getattr(base.config, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                 "num_attention_heads", "num_key_value_heads", "vocab_size")}
    torch.save({"ids": ids, "expected": out, "config": cfg}, tmp_path / "inputs.pt")
    (tmp_path / "check.py").write_text(_NO_LORA_EXT_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    proc = subprocess.run([sys.executable, str(tmp_path / "check.py"), str(tmp_path)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr


# ----------------------------------------------------------------------------
# Several adapters
# ----------------------------------------------------------------------------


def _two_adapter_net(same_targets=True):
    base = make_net()
    model = lora_ext.inject(copy.deepcopy(base), ["fc1", "fc2", "head"], r=4, alpha=8)
    targets2 = ["fc1", "fc2", "head"] if same_targets else ["fc1", "gate.0"]
    lora_ext.inject(model, targets2, r=2, alpha=8, use_rslora=True, adapter_name="task2")
    randomise_adapters(model)
    return base, model


def test_inject_into_lora_layer_adds_an_adapter():
    base, model = _two_adapter_net(same_targets=False)
    layers = dict(lora_ext.lora_layers(model))
    assert sorted(layers) == ["blocks.0.fc1", "blocks.0.fc2", "blocks.0.gate.0",
                              "blocks.1.fc1", "blocks.1.fc2", "blocks.1.gate.0", "head"]
    assert sorted(layers["blocks.0.fc1"].adapter_names) == ["default", "task2"]
    assert layers["blocks.0.fc2"].adapter_names == ["default"]
    assert layers["blocks.0.gate.0"].adapter_names == ["task2"]
    assert isinstance(layers["blocks.0.fc1"].adapters, nn.ModuleDict)
    t2 = layers["blocks.1.fc1"].adapters["task2"]
    assert t2.r == 2 and t2.use_rslora and t2.scaling == pytest.approx(8 / 2**0.5)
    assert t2.lora_A.shape == (2, 32) and t2.lora_B.shape == (64, 2)
    # still the same shared base weight, and one LoRALinear (not a LoRALinear around a LoRALinear)
    assert not any(isinstance(m, lora_ext.LoRALinear) for m in layers["blocks.1.fc1"].children()
                   if m is not layers["blocks.1.fc1"])
    keys = [k for k in model.state_dict() if k.startswith("blocks.0.fc1.")]
    assert sorted(keys) == ["blocks.0.fc1.adapters.default.lora_A", "blocks.0.fc1.adapters.default.lora_B",
                            "blocks.0.fc1.adapters.task2.lora_A", "blocks.0.fc1.adapters.task2.lora_B",
                            "blocks.0.fc1.bias", "blocks.0.fc1.weight"]
    for n, p in model.named_parameters():
        assert p.requires_grad == (".lora_" in n), n


def test_set_adapter_switches_outputs():
    base, model = _two_adapter_net()
    x = net_input()
    with torch.no_grad():
        ref_default = merged_reference(base, model, "default")(x)
        ref_task2 = merged_reference(base, model, "task2")(x)
        assert (ref_default - ref_task2).norm() > 1e-3 * ref_default.norm()
        for name, ref in [("task2", ref_task2), ("default", ref_default), ("task2", ref_task2)]:
            lora_ext.set_adapter(model, name)
            for _, layer in lora_ext.lora_layers(model):
                assert layer.active_adapter == name
                assert layer.lora_A is layer.adapters[name].lora_A
                assert layer.scaling == layer.adapters[name].scaling and layer.r == layer.adapters[name].r
            assert_rel_close(model(x), ref, torch.float32, name=name)


def test_set_adapter_different_target_sets():
    # PEFT's behaviour: a layer without the active adapter computes its base linear.
    base, model = _two_adapter_net(same_targets=False)
    x = net_input()
    with torch.no_grad():
        for name in ["task2", "default", "task2"]:
            lora_ext.set_adapter(model, name)
            assert_rel_close(model(x), merged_reference(base, model, name)(x), torch.float32, name=name)


def test_set_adapter_unknown_name_raises():
    _, model = _two_adapter_net()
    with pytest.raises((ValueError, KeyError)):
        lora_ext.set_adapter(model, "nope")
    for _, layer in lora_ext.lora_layers(model):
        assert layer.active_adapter == "default"


def test_disable_adapters_function_and_context_manager():
    base, model = _two_adapter_net()
    x = net_input()
    with torch.no_grad():
        base_out = base(x)
        adapted = model(x)
        assert (adapted - base_out).norm() > 1e-3 * base_out.norm()

        lora_ext.disable_adapters(model)
        assert all(not layer.adapters_enabled for _, layer in lora_ext.lora_layers(model))
        assert_bit_identical(model(x), base_out, "disabled output")
        lora_ext.enable_adapters(model)
        assert all(layer.adapters_enabled for _, layer in lora_ext.lora_layers(model))
        assert_bit_identical(model(x), adapted, "re-enabled output")

        with lora_ext.disable_adapters(model):
            assert_bit_identical(model(x), base_out, "disabled output (context manager)")
        assert_bit_identical(model(x), adapted, "output after the context manager")

        # the context manager re-enables on an exception too
        with pytest.raises(RuntimeError, match="boom"):
            with lora_ext.disable_adapters(model):
                raise RuntimeError("boom")
        assert all(layer.adapters_enabled for _, layer in lora_ext.lora_layers(model))
        assert_bit_identical(model(x), adapted, "output after an exception")

        # disabling keeps the active adapter
        lora_ext.set_adapter(model, "task2")
        with lora_ext.disable_adapters(model):
            assert_bit_identical(model(x), base_out, "disabled with task2 active")
        assert_rel_close(model(x), merged_reference(base, model, "task2")(x), torch.float32)


def test_disabled_adapters_get_no_gradient():
    _, model = _two_adapter_net()
    model.train()
    with lora_ext.disable_adapters(model):
        out = model(net_input())
        assert not out.requires_grad or all(
            g is None or g.abs().sum() == 0
            for g in torch.autograd.grad(out.sum(), [p for p in model.parameters() if p.requires_grad],
                                         allow_unused=True)
        )


def test_delete_adapter():
    base, model = _two_adapter_net()
    lora_ext.set_adapter(model, "default")
    lora_ext.delete_adapter(model, "task2")
    for _, layer in lora_ext.lora_layers(model):
        assert layer.adapter_names == ["default"] and list(layer.adapters.keys()) == ["default"]
        assert layer.active_adapter == "default"
    assert not any(".task2." in k for k in model.state_dict())
    assert not any(".task2." in n for n, _ in model.named_parameters())
    x = net_input()
    with torch.no_grad():
        assert_rel_close(model(x), merged_reference(base, model, "default")(x), torch.float32)
    with pytest.raises((ValueError, KeyError)):
        lora_ext.set_adapter(model, "task2")


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        sizes = [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        self.calls.append((str(func), sizes))
        return out


def test_switching_adapters_copies_no_base_weight():
    base = make_net()
    model = lora_ext.inject(copy.deepcopy(base), ["fc1", "fc2"], r=2, alpha=8)
    lora_ext.inject(model, ["fc1", "fc2"], r=2, alpha=4, adapter_name="task2")
    randomise_adapters(model)
    model_base_params = {n: p for n, p in model.named_parameters() if ".lora_" not in n}
    ptrs = {n: p.data_ptr() for n, p in model_base_params.items()}
    values = {n: p.detach().clone() for n, p in model_base_params.items()}
    smallest_base_weight = min(layer.weight.numel() for _, layer in lora_ext.lora_layers(model))
    largest_adapter = max(max(a.lora_A.numel(), a.lora_B.numel())
                          for _, l in lora_ext.lora_layers(model) for a in l.adapters.values())
    assert largest_adapter < smallest_base_weight  # so that a base-sized tensor can be told apart
    with _RecordOps() as rec:
        lora_ext.set_adapter(model, "task2")
        lora_ext.set_adapter(model, "default")
        lora_ext.disable_adapters(model)
        lora_ext.enable_adapters(model)
        with lora_ext.disable_adapters(model):
            pass
        lora_ext.set_adapter(model, "task2")
    big = [(f, s) for f, sizes in rec.calls for s in sizes if s >= smallest_base_weight]
    assert not big, f"switching adapters made base-weight-sized tensors: {big[:5]}"
    for n, p in model.named_parameters():
        if ".lora_" not in n:
            assert p.data_ptr() == ptrs[n], f"{n} was reallocated"
            assert_bit_identical(p.detach(), values[n], n)
    x = net_input()
    with torch.no_grad():
        assert_rel_close(model(x), merged_reference(base, model, "task2")(x), torch.float32)
