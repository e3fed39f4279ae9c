"""Adapter files in PEFT's format, both directions, against the real peft package (docs/models-api.md).

lora_ext.save_adapter -> peft.PeftModel.from_pretrained, and peft's save_pretrained -> lora_ext.load_adapter,
on transformers' Llama and BERT built from tiny configs, with random (non-zero) lora_B: the outputs agree to
float32 rounding. Also rsLoRA, dropout in the config, several target lists, regex target_modules, several
adapters (set_adapter / disable_adapters against PEFT's), parameter counts and merge_and_unload against PEFT's.
"""

import copy
import json
import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the network

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
safetensors_torch = pytest.importorskip("safetensors.torch")

import lora_ext  # noqa: E402
from conftest import assert_bit_identical  # noqa: E402

LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


_PRINT_RE = re.compile(r"trainable params: ([\d,]+) \|\| all params: ([\d,]+) \|\| trainable%: ([\d.eE+-]+)")


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_bert(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        vocab_size=128, max_position_embeddings=64,
    )
    return transformers.BertModel(cfg).eval()


BUILD = {"llama": tiny_llama, "bert": tiny_bert}


def unwrap(model):
    return model.get_base_model() if isinstance(model, peft.PeftModel) else model


@torch.no_grad()
def outputs(kind, model):
    model.eval()
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 128, (2, 9), generator=g)
    if kind == "llama":
        return model(input_ids=ids).logits
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    out = model(input_ids=ids, attention_mask=mask)
    return torch.cat([out.last_hidden_state.flatten(), out.pooler_output.flatten()])


def assert_fp32_close(a, b, name="output"):
    assert a.shape == b.shape and a.dtype == b.dtype == torch.float32, name
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    err = ((a.double() - b.double()).norm() / b.double().norm()).item()
    assert err < 1e-5, f"{name}: relative error {err:.2e}"


def assert_changed(a, b):
    assert ((a - b).norm() / b.norm()).item() > 1e-3, "the adapter must change the output (random lora_B)"


@torch.no_grad()
def randomise_lora_ext(model, seed=11, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    for _, layer in lora_ext.lora_layers(model):
        for a in layer.adapters.values():
            a.lora_A.copy_(torch.randn(a.lora_A.shape, generator=g) * a.lora_A.shape[1] ** -0.5)
            a.lora_B.copy_(torch.randn(a.lora_B.shape, generator=g) * scale)


@torch.no_grad()
def randomise_peft(model, seed=12, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    for _, m in model.named_modules():
        if isinstance(m, peft.tuners.lora.LoraLayer):
            for name in m.lora_A:
                wa, wb = m.lora_A[name].weight, m.lora_B[name].weight
                wa.copy_(torch.randn(wa.shape, generator=g) * wa.shape[1] ** -0.5)
                wb.copy_(torch.randn(wb.shape, generator=g) * scale)


def peft_lora_modules(model, adapter="default"):
    """{qualified name in the base model: peft LoRA layer} for the layers holding `adapter`."""
    base = unwrap(model)
    return {n: m for n, m in base.named_modules()
            if isinstance(m, peft.tuners.lora.LoraLayer) and adapter in m.lora_A}


def read_adapter(path):
    tensors = safetensors_torch.load_file(os.path.join(path, "adapter_model.safetensors"))
    with open(os.path.join(path, "adapter_config.json")) as f:
        config = json.load(f)
    return tensors, config


# (kind, options): several target lists, regex targets, rsLoRA, dropout in the config.
CASES = [
    ("llama", dict(target_modules=["q_proj", "v_proj"], r=4, alpha=8)),
    ("llama", dict(target_modules=LLAMA_ALL, r=8, alpha=16, dropout=0.1, use_rslora=True)),
    ("llama", dict(target_modules=["o_proj", "down_proj", "up_proj"], r=2, alpha=3)),
    ("llama", dict(target_modules=r"model\.layers\.1\.self_attn\.(k|v)_proj|.*\.up_proj", r=4, alpha=8)),
    ("bert", dict(target_modules=["query", "value"], r=4, alpha=16, dropout=0.05)),
    ("bert", dict(target_modules=["query", "key", "value", "dense"], r=8, alpha=8, use_rslora=True)),
    ("bert", dict(target_modules=r".*attention\.self\.(query|value)", r=2, alpha=4)),
]
CASE_IDS = [f"{k}-{i}" for i, (k, _) in enumerate(CASES)]


def lora_config(o):
    return peft.LoraConfig(r=o["r"], lora_alpha=o["alpha"], target_modules=o["target_modules"],
                           lora_dropout=o.get("dropout", 0.0), use_rslora=o.get("use_rslora", False))


def inject(model, o, adapter_name="default"):
    return lora_ext.inject(model, o["target_modules"], r=o["r"], alpha=o["alpha"], dropout=o.get("dropout", 0.0),
                           use_rslora=o.get("use_rslora", False), adapter_name=adapter_name)


def check_layers_match_peft(model, peft_model, adapter="default", check_values=True):
    ours = {n: l for n, l in lora_ext.lora_layers(model) if adapter in l.adapter_names}
    theirs = peft_lora_modules(peft_model, adapter)
    assert sorted(ours) == sorted(theirs), "LoRA on the same modules as PEFT"
    for n, layer in ours.items():
        a, p = layer.adapters[adapter], theirs[n]
        assert a.r == p.r[adapter] and a.scaling == pytest.approx(p.scaling[adapter], rel=1e-12), n
        assert a.lora_alpha == pytest.approx(p.lora_alpha[adapter])
        if check_values:
            assert_bit_identical(a.lora_A.detach(), p.lora_A[adapter].weight.detach(), n + ".lora_A")
            assert_bit_identical(a.lora_B.detach(), p.lora_B[adapter].weight.detach(), n + ".lora_B")


# ----------------------------------------------------------------------------
# lora_ext -> PEFT
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind,o", CASES, ids=CASE_IDS)
def test_save_adapter_loads_in_peft(kind, o, tmp_path):
    base = BUILD[kind]()
    base_out = outputs(kind, base)
    model = inject(copy.deepcopy(base), o)
    randomise_lora_ext(model)
    ours = outputs(kind, model)
    assert_changed(ours, base_out)
    lora_ext.save_adapter(model, tmp_path / "ad")

    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(tmp_path / "ad"))
    tensors, config = read_adapter(tmp_path / "ad")
    assert config["peft_type"] == "LORA"
    assert config["r"] == o["r"] and config["lora_alpha"] == o["alpha"]
    assert config["lora_dropout"] == pytest.approx(o.get("dropout", 0.0))
    assert config["use_rslora"] is o.get("use_rslora", False)
    assert config["bias"] == "none"
    assert "target_modules" in config
    # the same tensor names and shapes as PEFT writes for this config
    reference = peft.get_peft_model(copy.deepcopy(base), lora_config(o))
    reference.save_pretrained(tmp_path / "peft_ref")
    peft_tensors, _ = read_adapter(tmp_path / "peft_ref")
    assert sorted(tensors) == sorted(peft_tensors)
    for k, v in tensors.items():
        assert v.shape == peft_tensors[k].shape and v.dtype == peft_tensors[k].dtype, k
        assert k.startswith("base_model.model.") and (k.endswith(".lora_A.weight") or k.endswith(".lora_B.weight"))

    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ad"))
    check_layers_match_peft(model, loaded)
    if o.get("dropout"):
        for n, m in peft_lora_modules(loaded).items():
            assert m.lora_dropout["default"].p == pytest.approx(o["dropout"]), n
    assert_fp32_close(outputs(kind, loaded), ours, "PEFT output of the lora_ext adapter")


def test_save_adapter_config_fields(tmp_path):
    model = lora_ext.inject(tiny_llama(), ["q_proj", "v_proj"], r=4, alpha=8)
    lora_ext.save_adapter(model, tmp_path / "a", base_model_name_or_path="my-org/tiny-llama")
    _, config = read_adapter(tmp_path / "a")
    assert config["base_model_name_or_path"] == "my-org/tiny-llama"
    assert sorted(config["target_modules"]) in (["q_proj", "v_proj"], sorted(n for n, _ in lora_ext.lora_layers(model)))
    cfg = peft.PeftConfig.from_pretrained(str(tmp_path / "a"))
    assert isinstance(cfg, peft.LoraConfig) and cfg.r == 4 and cfg.lora_alpha == 8


def test_save_named_adapter_of_several(tmp_path):
    """save_adapter(adapter_name="task2") writes task2 alone, PEFT's way (no adapter name in the keys)."""
    base = tiny_llama()
    o1 = dict(target_modules=["q_proj", "v_proj"], r=4, alpha=8)
    o2 = dict(target_modules=["k_proj", "v_proj", "down_proj"], r=8, alpha=4, use_rslora=True)
    model = inject(copy.deepcopy(base), o1)
    inject(model, o2, adapter_name="task2")
    randomise_lora_ext(model)
    lora_ext.set_adapter(model, "task2")
    ours_task2 = outputs("llama", model)
    lora_ext.set_adapter(model, "default")
    ours_default = outputs("llama", model)
    lora_ext.save_adapter(model, tmp_path / "t2", adapter_name="task2")
    lora_ext.save_adapter(model, tmp_path / "d")  # the active adapter
    _, config = read_adapter(tmp_path / "t2")
    assert config["r"] == 8 and config["lora_alpha"] == 4 and config["use_rslora"] is True
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "t2"))
    assert sorted(peft_lora_modules(loaded)) == sorted(n for n, l in lora_ext.lora_layers(model)
                                                       if "task2" in l.adapter_names)
    assert_fp32_close(outputs("llama", loaded), ours_task2, "task2 through PEFT")
    loaded_d = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "d"))
    assert_fp32_close(outputs("llama", loaded_d), ours_default, "default through PEFT")


# ----------------------------------------------------------------------------
# PEFT -> lora_ext
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind,o", CASES, ids=CASE_IDS)
def test_load_adapter_saved_by_peft(kind, o, tmp_path):
    base = BUILD[kind]()
    base_out = outputs(kind, base)
    pm = peft.get_peft_model(copy.deepcopy(base), lora_config(o))
    randomise_peft(pm)
    theirs = outputs(kind, pm)
    assert_changed(theirs, base_out)
    pm.save_pretrained(tmp_path / "ad")

    model = copy.deepcopy(base)
    ret = lora_ext.load_adapter(model, tmp_path / "ad")
    assert ret is model
    check_layers_match_peft(model, pm)
    for _, layer in lora_ext.lora_layers(model):
        assert layer.active_adapter == "default"
        assert layer.lora_dropout == pytest.approx(o.get("dropout", 0.0))
        assert layer.use_rslora is o.get("use_rslora", False)
    assert_fp32_close(outputs(kind, model), theirs, "lora_ext output of the PEFT adapter")
    # default trainable=False: nothing trains; the base stays frozen either way
    assert not any(p.requires_grad for p in model.parameters())


def test_load_adapter_trainable(tmp_path):
    base = tiny_llama()
    pm = peft.get_peft_model(copy.deepcopy(base), lora_config(dict(target_modules=["q_proj"], r=2, alpha=4)))
    pm.save_pretrained(tmp_path / "ad")
    model = lora_ext.load_adapter(copy.deepcopy(base), tmp_path / "ad", trainable=True)
    for n, p in model.named_parameters():
        assert p.requires_grad == (".lora_A" in n or ".lora_B" in n), n
    assert lora_ext.count_parameters(model)[0] == 2 * 2 * (64 + 64)


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_round_trip_lora_ext_to_lora_ext(kind, tmp_path):
    base = BUILD[kind]()
    o = CASES[1][1] if kind == "llama" else CASES[5][1]
    model = inject(copy.deepcopy(base), o)
    randomise_lora_ext(model)
    lora_ext.save_adapter(model, str(tmp_path / "ad"))  # a str path as well as a Path
    loaded = lora_ext.load_adapter(copy.deepcopy(base), str(tmp_path / "ad"))
    assert [n for n, _ in lora_ext.lora_layers(loaded)] == [n for n, _ in lora_ext.lora_layers(model)]
    for (n, a), (_, b) in zip(lora_ext.lora_layers(model), lora_ext.lora_layers(loaded)):
        assert_bit_identical(a.lora_A.detach(), b.lora_A.detach(), n)
        assert_bit_identical(a.lora_B.detach(), b.lora_B.detach(), n)
        assert a.scaling == b.scaling and a.lora_dropout == b.lora_dropout
    assert_bit_identical(outputs(kind, loaded), outputs(kind, model), "round-trip output")


# ----------------------------------------------------------------------------
# Several adapters, against PEFT's
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind,same_targets", [("llama", True), ("llama", False), ("bert", False)])
def test_several_adapters_match_peft(kind, same_targets, tmp_path):
    base = BUILD[kind]()
    if kind == "llama":
        o1 = dict(target_modules=["q_proj", "v_proj"], r=4, alpha=8)
        o2 = o1 | dict(r=2, alpha=8, use_rslora=True) if same_targets else \
            dict(target_modules=["v_proj", "o_proj", "down_proj"], r=8, alpha=4)
    else:
        o1 = dict(target_modules=["query", "value"], r=4, alpha=8)
        o2 = dict(target_modules=r".*\.(value|dense)", r=2, alpha=8, use_rslora=True)
    for i, o in enumerate([o1, o2]):
        pm = peft.get_peft_model(copy.deepcopy(base), lora_config(o))
        randomise_peft(pm, seed=100 + i)
        pm.save_pretrained(tmp_path / f"ad{i}")

    ref = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ad0"))
    ref.load_adapter(str(tmp_path / "ad1"), adapter_name="task2")
    ref_default = outputs(kind, ref)
    ref.set_adapter("task2")
    ref_task2 = outputs(kind, ref)
    with ref.disable_adapter():
        ref_disabled = outputs(kind, ref)
    base_out = outputs(kind, base)
    assert_changed(ref_task2, ref_default)

    model = lora_ext.load_adapter(copy.deepcopy(base), tmp_path / "ad0")
    lora_ext.load_adapter(model, tmp_path / "ad1", name="task2")
    check_layers_match_peft(model, ref, "default")
    check_layers_match_peft(model, ref, "task2")
    weights = {n: p.data_ptr() for n, p in model.named_parameters() if ".lora_" not in n}

    lora_ext.set_adapter(model, "task2")
    assert_fp32_close(outputs(kind, model), ref_task2, "task2")
    lora_ext.set_adapter(model, "default")
    assert_fp32_close(outputs(kind, model), ref_default, "default")
    lora_ext.set_adapter(model, "task2")
    assert_fp32_close(outputs(kind, model), ref_task2, "task2 again")
    with lora_ext.disable_adapters(model):
        out = outputs(kind, model)
        assert_bit_identical(out, base_out, "disabled = base")
        assert_fp32_close(out, ref_disabled, "disabled = PEFT disabled")
    lora_ext.disable_adapters(model)
    assert_bit_identical(outputs(kind, model), base_out, "disabled (function) = base")
    lora_ext.enable_adapters(model)
    assert_fp32_close(outputs(kind, model), ref_task2, "re-enabled task2")
    assert weights == {n: p.data_ptr() for n, p in model.named_parameters() if ".lora_" not in n}


# ----------------------------------------------------------------------------
# Counts and merge_and_unload against PEFT
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind,o", [CASES[1], CASES[5]], ids=["llama", "bert"])
def test_parameter_counts_match_peft(kind, o, capsys):
    base = BUILD[kind]()
    pm = peft.get_peft_model(copy.deepcopy(base), lora_config(o))
    model = inject(copy.deepcopy(base), o)
    assert lora_ext.count_parameters(model) == tuple(pm.get_nb_trainable_parameters())
    pm.print_trainable_parameters()
    theirs = _PRINT_RE.search(capsys.readouterr().out)
    lora_ext.print_trainable_parameters(model)
    printed = capsys.readouterr().out
    ours = _PRINT_RE.search(printed)
    assert ours, f"unexpected format: {printed!r}"
    # the counts as PEFT prints them (PEFT writes 1,792 with separators; either way is accepted)
    assert int(ours.group(1).replace(",", "")) == int(theirs.group(1).replace(",", ""))
    assert int(ours.group(2).replace(",", "")) == int(theirs.group(2).replace(",", ""))
    assert float(ours.group(3)) == pytest.approx(float(theirs.group(3)), abs=1e-4)


@pytest.mark.parametrize("kind,o", [CASES[1], CASES[5]], ids=["llama", "bert"])
def test_merge_and_unload_matches_peft(kind, o, tmp_path):
    base = BUILD[kind]()
    pm = peft.get_peft_model(copy.deepcopy(base), lora_config(o))
    randomise_peft(pm)
    pm.save_pretrained(tmp_path / "ad")
    model = lora_ext.load_adapter(copy.deepcopy(base), tmp_path / "ad")
    ours = lora_ext.merge_and_unload(model)
    theirs = pm.merge_and_unload()
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())
    for k, v in ours.state_dict().items():
        torch.testing.assert_close(v, theirs.state_dict()[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")
    assert_fp32_close(outputs(kind, ours), outputs(kind, theirs), "merged")
