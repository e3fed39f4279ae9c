"""The decoding host path (session 5): LoRALinear.forward calls the operator directly and checks its input only when
the call fails, and the C++ autograd kernel skips Function::apply when no graph is recorded. These tests pin that
the short cuts change nothing a user can see: outputs, errors, forward-mode AD, memory after a failed call."""
import gc
import weakref

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import lora_ext
from conftest import DEVICES, assert_bit_identical
from lora_ext.exact_merge import merge_with_record, unmerge_with_record


def _layer(device, in_features=24, out_features=16, r=4):
    layer = lora_ext.LoRALinear(in_features, out_features, r=r, device=device)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.5)
    return layer


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(24,), (5, 24), (2, 3, 24)])
def test_no_grad_output_is_the_autograd_output(device, shape):
    layer = _layer(device).eval()
    x = torch.randn(*shape, device=device)
    with_graph = layer(x.requires_grad_(True)).detach()
    with torch.no_grad():
        without_graph = layer(x)
    assert_bit_identical(without_graph, with_graph)
    assert not without_graph.requires_grad


@pytest.mark.parametrize("device", DEVICES)
def test_forward_mode_ad_raises_instead_of_dropping_the_tangent(device):
    # The operator has no forward-mode formula: a zero tangent would be a silently wrong derivative.
    layer = _layer(device).eval()
    x, tangent = torch.randn(3, 24, device=device), torch.randn(3, 24, device=device)
    with pytest.raises(RuntimeError):
        torch.func.jvp(layer, (x,), (tangent,))
    with pytest.raises(RuntimeError):
        torch.func.jacfwd(layer)(x)
    with pytest.raises(RuntimeError), torch.no_grad(), fwAD.dual_level():
        layer(fwAD.make_dual(x, tangent))


def test_non_tensor_input_is_a_type_error():
    layer = _layer("cpu").eval()
    with pytest.raises(TypeError, match="LoRALinear: input must be a torch.Tensor"):
        layer([[1.0] * 24])


@pytest.mark.parametrize("shape", [(24,), (5, 24), (2, 3, 24)])
def test_non_finite_scaling_is_a_value_error_for_every_input_shape(shape):
    layer = _layer("cpu").eval()
    layer.adapters["default"].lora_alpha = float("nan")
    with pytest.raises(ValueError, match="scaling must be a finite number"):
        layer(torch.randn(*shape))


def test_bad_input_errors_name_the_layer():
    layer = _layer("cpu").eval()
    with pytest.raises(ValueError, match="LoRALinear: input's last dimension must be in_features = 24"):
        layer(torch.randn(3, 7))
    with pytest.raises(ValueError, match="LoRALinear: input dtype torch.float64"):
        layer(torch.randn(3, 24, dtype=torch.float64))
    try:  # not chained to the operator's own message
        layer(torch.randn(3, 7))
    except ValueError as error:
        assert error.__context__ is None and error.__cause__ is None


def test_a_failed_call_does_not_keep_its_input_alive():
    # The operator's error is kept across the layer's own checks; a reference cycle through the traceback would
    # hold x (and, in training, its graph) until the next garbage collection: a "catch OOM, retry smaller" loop
    # would keep the activations it tries to free.
    layer = _layer("cpu").train()
    x = torch.randn(3, 24, dtype=torch.float64, requires_grad=True)
    alive = weakref.ref(x)
    gc.disable()
    try:
        with pytest.raises(ValueError):
            layer(x)
        del x
        assert alive() is None
    finally:
        gc.enable()


def test_compiled_layer_keeps_the_layer_error():
    layer = _layer("cpu").eval()
    compiled = torch.compile(layer, backend="eager")
    assert torch.equal(compiled(torch.ones(2, 24)), layer(torch.ones(2, 24)))
    with pytest.raises(Exception, match="LoRALinear: input's last dimension must be in_features = 24"):
        compiled(torch.randn(2, 7))


def test_merge_with_record_called_directly_under_grad_mode():
    # LoRALinear.merge runs under no_grad; the module-level functions must work without it too.
    weight = torch.randn(16, 24)
    original = weight.clone()
    lora_A = torch.nn.Parameter(torch.randn(4, 24))
    lora_B = torch.nn.Parameter(torch.randn(16, 4))
    record = merge_with_record(weight, lora_A, lora_B, 0.5)
    assert not torch.equal(weight, original)
    unmerge_with_record(weight, lora_A, lora_B, 0.5, record)
    assert_bit_identical(weight, original)
