"""Regression tests for bugs found by a review of the model-level code (session 3): PEFT rank_pattern keys that
matched other layers, one adapter's NaN spreading through the CUDA composite of multi_lora_forward, unmerge after
the model changed dtype or after an edit through .data, and adapter files overflowing the model's dtype."""
import copy
import warnings

import pytest
import torch
from torch import nn

import lora_ext
from conftest import assert_bit_identical

peft = pytest.importorskip("peft")
safetensors_torch = pytest.importorskip("safetensors.torch")


class _Sub(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)


class _Nested(nn.Module):
    """A root `fc` whose name is a suffix of `sub.fc` and `sub2.fc`."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.sub = _Sub()
        self.sub2 = _Sub()

    def forward(self, x):
        return self.sub2.fc(self.sub.fc(self.fc(x)))


def test_rank_pattern_keys_match_their_own_layer_only(tmp_path):
    torch.manual_seed(0)
    model = _Nested()
    lora_ext.inject(model, r"fc", r=2, adapter_name="a")  # the root fc alone (a regex matches whole names)
    lora_ext.inject(model, ["sub.fc", "sub2.fc"], r=8, adapter_name="a")
    for _, layer in lora_ext.lora_layers(model):
        nn.init.normal_(layer.adapters["a"].lora_B)
    lora_ext.set_adapter(model, "a")
    x = torch.randn(5, 8)
    with torch.no_grad():
        expected = model(x)
    lora_ext.save_adapter(model, tmp_path, "a")

    base = _Nested()
    base.load_state_dict({k: v for k, v in model.state_dict().items() if "adapters" not in k})
    reloaded = lora_ext.load_adapter(copy.deepcopy(base), tmp_path, "a")
    assert {n: l.r for n, l in lora_ext.lora_layers(reloaded)} == {"fc": 2, "sub.fc": 8, "sub2.fc": 8}
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(theirs(x), expected, rtol=1e-5, atol=1e-6)


def test_composite_keeps_an_adapters_nan_in_its_own_rows():
    from lora_ext.multi_adapter import _multi_lora_forward_composite

    torch.manual_seed(0)
    x, weight = torch.randn(3, 16), torch.randn(12, 16)
    A, B = torch.randn(2, 4, 16), torch.randn(2, 12, 4)
    B[1, 3, 2] = float("nan")
    ids = torch.tensor([0, -1, 1])
    y = _multi_lora_forward_composite(x, weight, None, A, B, torch.tensor([0.5, 2.0]), ids)
    assert torch.isfinite(y[:2]).all(), "slot 0 and base rows must not see slot 1's NaN"
    assert torch.isnan(y[2]).any()
    expected = torch.ops.lora_ext.multi_lora_forward(x, weight, None, A, B, torch.tensor([0.5, 2.0]), ids)
    torch.testing.assert_close(y[:2], expected[:2], rtol=1e-5, atol=1e-5)


def test_unmerge_after_a_dtype_change_warns_and_finishes():
    torch.manual_seed(0)
    layer = lora_ext.LoRALinear(32, 24, r=4)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)
    original = layer.weight.detach().clone()
    layer.merge()
    layer.half()
    with pytest.warns(UserWarning, match="changed while merged"):
        layer.unmerge()
    assert not layer.merged
    assert torch.isfinite(layer.weight).all()
    torch.testing.assert_close(layer.weight.float(), original, rtol=0, atol=2e-3)


def test_unmerge_after_an_edit_through_data_warns():
    torch.manual_seed(0)
    layer = lora_ext.LoRALinear(32, 24, r=4, dtype=torch.bfloat16)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)
    layer.merge()
    layer.lora_B.data.mul_(2)  # invisible to version counters
    with pytest.warns(UserWarning, match="changed while merged"):
        layer.unmerge()


def test_unchanged_adapter_unmerges_exactly_without_warning():
    torch.manual_seed(0)
    layer = lora_ext.LoRALinear(64, 48, r=4, dtype=torch.bfloat16)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)
    original = layer.weight.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer.merge()
        layer.unmerge()
    assert_bit_identical(layer.weight.detach(), original, "weight")


def test_bf16_file_on_fp16_model_loads_as_float32_without_overflow(tmp_path):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 8))
    theirs = peft.get_peft_model(copy.deepcopy(base),
                                 peft.LoraConfig(target_modules=["0"], r=2, init_lora_weights=False))
    theirs.save_pretrained(str(tmp_path))
    file = tmp_path / "adapter_model.safetensors"
    tensors = {k: v.to(torch.bfloat16) for k, v in safetensors_torch.load_file(str(file)).items()}
    key_B = next(k for k in tensors if "lora_B" in k)
    tensors[key_B][0, 0] = 1e5  # beyond float16's range, fine in bfloat16 and float32
    safetensors_torch.save_file(tensors, str(file), metadata={"format": "pt"})
    model = lora_ext.load_adapter(copy.deepcopy(base).half(), tmp_path)
    layer = model[0]
    assert layer.lora_B.dtype == torch.float32 and torch.isfinite(layer.lora_B).all()
    assert_bit_identical(layer.lora_B.detach(), tensors[key_B].float(), "lora_B")


def test_adapter_stack_refresh_sees_edits_through_data():
    torch.manual_seed(0)
    layer = lora_ext.LoRALinear(16, 12, r=4)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 16)
    stack = layer.adapter_stack()
    layer.lora_B.data.mul_(2)  # no version bump: sync() cannot see it
    stack.refresh(layer)
    with torch.no_grad(), lora_ext.mixed_adapters(layer, ["default"] * 3):
        mixed = layer(x)
    with torch.no_grad():
        torch.testing.assert_close(mixed, layer(x), rtol=1e-5, atol=1e-6)
