"""Bad inputs raise errors that name the problem, and leave every weight bit-identical."""

import contextlib
import math

import pytest
import torch

import lora_ext
from conftest import DEVICES, assert_bit_identical, make_params, make_x, requires_cuda, seed_tensor
from lora_ext import LoRALinear

ops = torch.ops.lora_ext

ERRORS = (ValueError, RuntimeError)


def _randomise_B(layer):
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape))
    return layer


@contextlib.contextmanager
def unchanged(*tensors):
    """The tensors (None allowed) are bit-identical after the block, whatever it raised."""
    tensors = [t for t in tensors if t is not None]
    before = [t.detach().clone() for t in tensors]
    try:
        yield
    finally:
        for i, (t, b) in enumerate(zip(tensors, before)):
            assert_bit_identical(t.detach(), b, name=f"tensor {i}")


def _layer_state(layer):
    return (layer.weight, layer.bias, layer.lora_A, layer.lora_B)


# ----------------------------------------------------------------------------
# LoRALinear construction
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("r", [0, -1])
def test_bad_rank(r):
    with pytest.raises(ERRORS, match=r"(?i)\br\b|rank"):
        LoRALinear(16, 8, r=r)


@pytest.mark.parametrize("r", [0, -3])
def test_bad_rank_from_linear(r):
    linear = torch.nn.Linear(16, 8)
    weight = linear.weight.detach().clone()
    with pytest.raises(ERRORS, match=r"(?i)\br\b|rank"):
        LoRALinear.from_linear(linear, r=r)
    assert_bit_identical(linear.weight.detach(), weight, name="linear.weight")


@pytest.mark.parametrize("dropout", [-0.1, 1.0, 1.5, math.nan])
def test_bad_dropout(dropout):
    with pytest.raises(ERRORS, match=r"(?i)dropout"):
        LoRALinear(16, 8, r=2, dropout=dropout)


@pytest.mark.parametrize("alpha", [math.nan, math.inf])
def test_bad_alpha(alpha):
    with pytest.raises(ERRORS, match=r"(?i)alpha"):
        LoRALinear(16, 8, r=2, alpha=alpha)


@pytest.mark.parametrize("init", ["xavier", "", "normal"])
def test_bad_init(init):
    with pytest.raises(ERRORS, match=r"(?i)init"):
        LoRALinear(16, 8, r=2, init=init)


def test_bad_init_from_linear():
    with pytest.raises(ERRORS, match=r"(?i)init"):
        LoRALinear.from_linear(torch.nn.Linear(16, 8), r=2, init="orthogonal")


# ----------------------------------------------------------------------------
# LoRALinear forward
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(5, 17), (5, 15), (2, 3, 8), (16, 5)], ids=str)
def test_forward_wrong_in_features(device, shape):
    layer = _randomise_B(LoRALinear(16, 8, r=2, device=device))
    with unchanged(*_layer_state(layer)):
        with pytest.raises(ERRORS, match=r"(?i)in_features|last dim|shape"):
            layer(torch.randn(shape, device=device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("x_dtype", [torch.float64, torch.bfloat16, torch.int64])
def test_forward_wrong_dtype(device, x_dtype):
    layer = _randomise_B(LoRALinear(16, 8, r=2, device=device, dtype=torch.float32))
    x = torch.randn(4, 16).to(device, x_dtype) if x_dtype.is_floating_point else torch.ones(
        4, 16, dtype=x_dtype, device=device
    )
    with unchanged(*_layer_state(layer)):
        with pytest.raises(ERRORS, match=r"(?i)dtype"):
            layer(x)


@requires_cuda
@pytest.mark.parametrize("layer_device,x_device", [("cpu", "cuda"), ("cuda", "cpu")])
def test_forward_wrong_device(layer_device, x_device):
    layer = _randomise_B(LoRALinear(16, 8, r=2, device=layer_device))
    with unchanged(*_layer_state(layer)):
        # The message names the devices ("x is on cuda:0 but the weight is on cpu").
        with pytest.raises(ERRORS, match=r"(?i)device|cuda|cpu"):
            layer(torch.randn(4, 16, device=x_device))


@pytest.mark.parametrize("device", DEVICES)
def test_forward_zero_dim_x(device):
    layer = _randomise_B(LoRALinear(1, 8, r=2, device=device))
    with unchanged(*_layer_state(layer)):
        with pytest.raises(ERRORS, match=r"(?i)dim|scalar|0-d|shape"):
            layer(torch.tensor(1.0, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_training_forward_while_merged(device):
    layer = _randomise_B(LoRALinear(16, 8, r=2, device=device))
    layer.merge()
    layer.train()
    x = torch.randn(4, 16, device=device)
    with unchanged(*_layer_state(layer)):
        with pytest.raises(ERRORS, match=r"(?i)merge"):
            layer(x)
    assert layer.merged


# ----------------------------------------------------------------------------
# merge / unmerge
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_merge_twice(device):
    layer = _randomise_B(LoRALinear(16, 8, r=2, device=device))
    layer.merge()
    with unchanged(*_layer_state(layer)):
        with pytest.raises(ERRORS, match=r"(?i)merged|already"):
            layer.merge()
    assert layer.merged


@pytest.mark.parametrize("device", DEVICES)
def test_unmerge_unmerged(device):
    layer = _randomise_B(LoRALinear(16, 8, r=2, device=device))
    with unchanged(*_layer_state(layer)):
        with pytest.raises(ERRORS, match=r"(?i)merged"):
            layer.unmerge()
    assert not layer.merged
    layer.merge()
    layer.unmerge()
    with unchanged(*_layer_state(layer)):
        with pytest.raises(ERRORS, match=r"(?i)merged"):
            layer.unmerge()


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("which", ["lora_A", "lora_B"])
@pytest.mark.parametrize("device", DEVICES)
def test_merge_non_finite_adapter(device, which, bad):
    layer = _randomise_B(LoRALinear(16, 8, r=2, device=device))
    with torch.no_grad():
        getattr(layer, which)[1, 1] = bad
    with unchanged(*_layer_state(layer)):
        with pytest.raises(ERRORS, match=r"(?i)nan|inf|finite"):
            layer.merge()
    assert not layer.merged


# ----------------------------------------------------------------------------
# Operators
# ----------------------------------------------------------------------------


def _op_inputs(device, dtype=torch.float32, adapter_dtype=None, tokens=5, in_f=16, out_f=8, r=2):
    x = make_x(tokens, in_f, dtype, device)
    weight, bias, lora_A, lora_B = make_params(
        in_f, out_f, r, dtype, adapter_dtype or dtype, device
    )
    return dict(x=x, weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B)


def _call_forward(t, scaling=1.0, dropout_p=0.0, seed=None):
    return ops.lora_forward(
        t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], scaling, dropout_p, seed
    )


# (tensor to replace, how, error pattern naming the tensor)
def _bad_forward_cases(device):
    f32 = torch.float32
    return {
        "lora_A_in": ("lora_A", torch.randn(2, 15, device=device), r"lora_A"),
        "lora_A_1d": ("lora_A", torch.randn(32, device=device), r"lora_A"),
        "lora_B_r": ("lora_B", torch.randn(8, 3, device=device), r"lora_A|lora_B"),
        "lora_B_out": ("lora_B", torch.randn(7, 2, device=device), r"lora_B"),
        "weight_in": ("weight", torch.randn(8, 15, device=device), r"weight"),
        "weight_3d": ("weight", torch.randn(8, 16, 1, device=device), r"weight"),
        "bias_len": ("bias", torch.randn(9, device=device), r"bias"),
        "bias_2d": ("bias", torch.randn(1, 8, device=device), r"bias"),
        "x_3d": ("x", torch.randn(1, 5, 16, device=device), r"\bx\b|input"),
        "x_1d": ("x", torch.randn(16, device=device), r"\bx\b|input"),
        "weight_dtype": ("weight", torch.randn(8, 16, device=device, dtype=torch.float64), r"weight|dtype"),
        "bias_dtype": ("bias", torch.randn(8, device=device, dtype=torch.float16), r"bias|dtype"),
        "lora_A_dtype": ("lora_A", torch.randn(2, 16, device=device, dtype=torch.float16), r"lora_A|dtype"),
        "lora_B_dtype": ("lora_B", torch.randn(8, 2, device=device, dtype=torch.bfloat16), r"lora_B|dtype"),
        "lora_A_int": ("lora_A", torch.ones(2, 16, device=device, dtype=torch.int32), r"lora_A"),
        "lora_B_int": ("lora_B", torch.ones(8, 2, device=device, dtype=torch.int64), r"lora_B"),
        "bias_int": ("bias", torch.ones(8, device=device, dtype=torch.int32), r"bias"),
    }


_FORWARD_CASE_IDS = list(_bad_forward_cases("cpu"))


@pytest.mark.parametrize("case", _FORWARD_CASE_IDS)
@pytest.mark.parametrize("device", DEVICES)
def test_lora_forward_bad_input(device, case):
    t = _op_inputs(device)
    name, bad, pattern = _bad_forward_cases(device)[case]
    t[name] = bad
    with unchanged(*t.values()):
        with pytest.raises(RuntimeError, match=pattern):
            _call_forward(t)


@pytest.mark.parametrize("device", DEVICES)
def test_lora_forward_integer_x_and_weight(device):
    t = _op_inputs(device)
    t["x"] = torch.ones(5, 16, dtype=torch.int32, device=device)
    t["weight"] = torch.ones(8, 16, dtype=torch.int32, device=device)
    t["bias"] = None
    with pytest.raises(RuntimeError, match=r"\bx\b|input|weight"):
        _call_forward(t)


@pytest.mark.parametrize("device", DEVICES)
def test_lora_forward_adapters_neither_x_dtype_nor_float32(device):
    t = _op_inputs(device, dtype=torch.bfloat16, adapter_dtype=torch.float16)
    with pytest.raises(RuntimeError, match=r"(?i)lora_A|lora_B|dtype"):
        _call_forward(t)


@requires_cuda
def test_lora_forward_float64_on_cuda():
    """float64 is a CPU-only dtype."""
    t = _op_inputs("cuda", dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"(?i)dtype|float64|double|\bx\b"):
        _call_forward(t)


@requires_cuda
@pytest.mark.parametrize("name", ["weight", "bias", "lora_A", "lora_B"])
def test_lora_forward_tensor_on_other_device(name):
    t = _op_inputs("cuda")
    t[name] = t[name].cpu()
    with pytest.raises(RuntimeError, match=rf"(?i){name}|device"):
        _call_forward(t)


@pytest.mark.parametrize("device", DEVICES)
def test_lora_forward_bad_dropout(device):
    t = _op_inputs(device)
    with pytest.raises(RuntimeError, match=r"(?i)seed"):
        _call_forward(t, dropout_p=0.3, seed=None)
    with pytest.raises(RuntimeError, match=r"(?i)seed"):
        _call_forward(t, dropout_p=0.3, seed=torch.ones(1, device=device))  # float seed
    with pytest.raises(RuntimeError, match=r"(?i)seed"):
        _call_forward(t, dropout_p=0.3, seed=torch.ones(2, dtype=torch.int64, device=device))
    for p in (-0.1, 1.0, 1.5):
        with pytest.raises(RuntimeError, match=r"(?i)dropout"):
            _call_forward(t, dropout_p=p, seed=seed_tensor(1, device))


@pytest.mark.parametrize("device", DEVICES)
def test_lora_backward_bad_input(device):
    t = _op_inputs(device)
    y, xa = _call_forward(t)
    grad_y = torch.randn_like(y)
    args = [grad_y, t["x"], t["weight"], t["lora_A"], t["lora_B"], xa, 1.0, 0.0, None, True]
    ops.lora_backward(*args)  # the good call works

    bad = [
        (0, torch.randn(5, 9, device=device), r"grad_y"),
        (0, torch.randn(5, 8, device=device, dtype=torch.float64), r"grad_y|dtype"),
        (5, torch.randn(5, 3, device=device), r"xa|lora_activation"),
        (5, torch.randn(4, 2, device=device), r"xa|lora_activation"),
        (3, torch.randn(2, 15, device=device), r"lora_A"),
        (4, torch.randn(8, 3, device=device), r"lora_A|lora_B"),
        (2, torch.randn(8, 15, device=device), r"weight"),
        (1, torch.randn(6, 16, device=device), r"\bx\b|grad_y|xa|lora_activation|input"),
    ]
    for index, value, pattern in bad:
        bad_args = list(args)
        bad_args[index] = value
        with pytest.raises(RuntimeError, match=pattern):
            ops.lora_backward(*bad_args)


def _merge_cases(device):
    return {
        "lora_A_in": ("lora_A", torch.randn(2, 15, device=device), r"lora_A"),
        "lora_B_out": ("lora_B", torch.randn(7, 2, device=device), r"lora_B"),
        "rank_mismatch": ("lora_B", torch.randn(8, 3, device=device), r"lora_A|lora_B"),
        "weight_3d": ("weight", torch.randn(8, 16, 1, device=device), r"weight"),
        "lora_A_dtype": ("lora_A", torch.randn(2, 16, device=device, dtype=torch.float16), r"lora_A|dtype"),
        "lora_A_int": ("lora_A", torch.ones(2, 16, device=device, dtype=torch.int32), r"lora_A"),
        "weight_int": ("weight", torch.ones(8, 16, device=device, dtype=torch.int32), r"weight"),
    }


@pytest.mark.parametrize("op_name", ["merge_", "unmerge_"])
@pytest.mark.parametrize("case", list(_merge_cases("cpu")))
@pytest.mark.parametrize("device", DEVICES)
def test_merge_op_bad_input(device, case, op_name):
    t = _op_inputs(device)
    name, bad, pattern = _merge_cases(device)[case]
    t[name] = bad
    with unchanged(t["weight"], t["lora_A"], t["lora_B"]):
        with pytest.raises(RuntimeError, match=pattern):
            getattr(ops, op_name)(t["weight"], t["lora_A"], t["lora_B"], 0.5)


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_keep_mask_bad_input(device):
    with pytest.raises(RuntimeError, match=r"(?i)seed"):
        ops.dropout_keep_mask(torch.ones(1, device=device), 4, 4, 0.5)
    with pytest.raises(RuntimeError, match=r"(?i)rows|cols|negative|size"):
        ops.dropout_keep_mask(seed_tensor(1, device), -1, 4, 0.5)
    with pytest.raises(RuntimeError, match=r"(?i)dropout"):
        ops.dropout_keep_mask(seed_tensor(1, device), 4, 4, 1.0)
