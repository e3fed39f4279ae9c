"""torch.library.opcheck on every operator, and torch.compile(fullgraph=True) against eager.

opcheck checks the schema (mutation annotations), the fake (meta) implementations,
the autograd registration and AOT dispatch with dynamic shapes. It seeds the
generator itself, so it cannot see a backward that draws another mask: that is
test_dropout.py's job.
"""

import pytest
import torch

import lora_ext
from conftest import DEVICES, assert_rel_close, make_params, make_x, seed_tensor

ops = torch.ops.lora_ext


def _forward_args(device, dtype, adapter_dtype, dropout_p, bias, requires_grad, tokens=13):
    in_features, out_features, rank = 24, 20, 4
    x = make_x(tokens, in_features, dtype, device)
    weight, bias_t, lora_A, lora_B = make_params(
        in_features, out_features, rank, dtype, adapter_dtype, device, bias
    )
    if requires_grad:
        for t in (x, lora_A, lora_B):
            t.requires_grad_(True)
    seed = None if dropout_p == 0.0 else seed_tensor(321, device)
    return (x, weight, bias_t, lora_A, lora_B, 1.5, dropout_p, seed)


# The schemas as specified: argument names matter to callers that pass keywords.
EXPECTED_SCHEMAS = {
    "lora_forward": "lora_ext::lora_forward(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, "
    "Tensor lora_B, float scaling, float dropout_p, Tensor? dropout_seed) -> (Tensor y, Tensor lora_activation)",
    "lora_backward": "lora_ext::lora_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor lora_A, "
    "Tensor lora_B, Tensor lora_activation, float scaling, float dropout_p, Tensor? dropout_seed, "
    "bool compute_grad_x) -> (Tensor grad_x, Tensor grad_A, Tensor grad_B)",
    "merge_": "lora_ext::merge_(Tensor(a!) weight, Tensor lora_A, Tensor lora_B, float scaling) -> ()",
    "unmerge_": "lora_ext::unmerge_(Tensor(a!) weight, Tensor lora_A, Tensor lora_B, float scaling) -> ()",
    "dropout_keep_mask": "lora_ext::dropout_keep_mask(Tensor dropout_seed, int rows, int cols, "
    "float dropout_p) -> Tensor",
}


@pytest.mark.parametrize("op_name", list(EXPECTED_SCHEMAS))
def test_schema(op_name):
    assert str(getattr(ops, op_name).default._schema) == EXPECTED_SCHEMAS[op_name]


@pytest.mark.parametrize("op_name", list(EXPECTED_SCHEMAS))
@pytest.mark.parametrize("device", DEVICES)
def test_registered_for_backend(op_name, device):
    key = "CPU" if device == "cpu" else "CUDA"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"lora_ext::{op_name}", key)


def test_cuda_kernels_available_is_bool():
    available = lora_ext.cuda_kernels_available()
    assert isinstance(available, bool)
    if available:
        assert torch._C._dispatch_has_kernel_for_dispatch_key("lora_ext::lora_forward", "CUDA")


DTYPE_PAIRS = [
    pytest.param(torch.float32, torch.float32, id="f32"),
    pytest.param(torch.bfloat16, torch.float32, id="bf16-adapters_f32"),
]


@pytest.mark.parametrize("requires_grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("dtype,adapter_dtype", DTYPE_PAIRS)
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_lora_forward(device, dtype, adapter_dtype, dropout_p, bias, requires_grad):
    args = _forward_args(device, dtype, adapter_dtype, dropout_p, bias, requires_grad)
    torch.library.opcheck(ops.lora_forward.default, args)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_lora_forward_zero_tokens(device):
    args = _forward_args(device, torch.float32, torch.float32, 0.3, True, False, tokens=0)
    torch.library.opcheck(ops.lora_forward.default, args)


@pytest.mark.parametrize("compute_grad_x", [True, False])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("dtype,adapter_dtype", DTYPE_PAIRS)
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_lora_backward(device, dtype, adapter_dtype, dropout_p, compute_grad_x):
    x, weight, bias, lora_A, lora_B, scaling, p, seed = _forward_args(
        device, dtype, adapter_dtype, dropout_p, True, False
    )
    _, xa = ops.lora_forward(x, weight, bias, lora_A, lora_B, scaling, p, seed)
    grad_y = torch.randn(x.shape[0], weight.shape[0]).to(device, dtype)
    args = (grad_y, x, weight, lora_A, lora_B, xa, scaling, p, seed, compute_grad_x)
    torch.library.opcheck(ops.lora_backward.default, args)


@pytest.mark.parametrize("op_name", ["merge_", "unmerge_"])
@pytest.mark.parametrize(
    "dtype,adapter_dtype",
    DTYPE_PAIRS + [pytest.param(torch.bfloat16, torch.bfloat16, id="bf16")],
)
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_merge(device, dtype, adapter_dtype, op_name):
    weight, _, lora_A, lora_B = make_params(24, 20, 4, dtype, adapter_dtype, device, bias=False)
    torch.library.opcheck(getattr(ops, op_name).default, (weight, lora_A, lora_B, 0.75))


@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_dropout_keep_mask(device, p):
    torch.library.opcheck(ops.dropout_keep_mask.default, (seed_tensor(11, device), 17, 23, p))


# ----------------------------------------------------------------------------
# torch.compile
# ----------------------------------------------------------------------------


def _backend(device):
    # aot_eager keeps the CPU suite fast; inductor is what users run on CUDA.
    return "aot_eager" if device == "cpu" else "inductor"


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _random_layer(device, dropout=0.0):
    layer = lora_ext.LoRALinear(24, 20, r=4, alpha=8, dropout=dropout, device=device)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape) * 0.5)
    return layer


def _step(module, x, grad_y):
    x = x.clone().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    y = module(x)
    y.backward(grad_y)
    return y.detach(), x.grad, module.lora_A.grad.clone(), module.lora_B.grad.clone()


@pytest.mark.parametrize("device", DEVICES)
def test_compile_layer_matches_eager(device):
    layer = _random_layer(device)
    compiled = torch.compile(layer, backend=_backend(device), fullgraph=True)
    # Two token counts: the second call exercises the fake kernels with dynamic shapes.
    for shape in [(2, 9, 24), (5, 24)]:
        x = torch.randn(shape, device=device)
        grad_y = torch.randn(*shape[:-1], 20, device=device)
        eager = _step(layer, x, grad_y)
        comp = _step(compiled, x, grad_y)
        for name, a, b in zip(("y", "x.grad", "lora_A.grad", "lora_B.grad"), comp, eager):
            assert_rel_close(a, b, torch.float32, name=f"compiled {name}")
        assert layer.weight.grad is None and layer.bias.grad is None


@pytest.mark.parametrize("device", DEVICES)
def test_compile_lora_linear_with_dropout_seed(device):
    """With the seed an explicit input, the compiled op draws exactly the eager mask."""
    in_features, out_features, rank = 24, 20, 4
    weight, bias, lora_A, lora_B = make_params(
        in_features, out_features, rank, torch.float32, torch.float32, device
    )
    lora_A.requires_grad_(True)
    lora_B.requires_grad_(True)
    seed = seed_tensor(4242, device)

    def fn(x, lora_A, lora_B, seed):
        return lora_ext.ops.lora_linear(x, weight, bias, lora_A, lora_B, 2.0, 0.4, seed)

    compiled = torch.compile(fn, backend=_backend(device), fullgraph=True)
    x0 = torch.randn(3, 7, in_features, device=device)
    grad_y = torch.randn(3, 7, out_features, device=device)
    results = []
    for f in (fn, compiled):
        x = x0.clone().requires_grad_(True)
        lora_A.grad = lora_B.grad = None
        y = f(x, lora_A, lora_B, seed)
        y.backward(grad_y)
        results.append((y.detach(), x.grad, lora_A.grad.clone(), lora_B.grad.clone()))
    for name, a, b in zip(("y", "x.grad", "lora_A.grad", "lora_B.grad"), *results):
        assert_rel_close(b, a, torch.float32, name=f"compiled {name}")


@pytest.mark.parametrize("device", DEVICES)
def test_compile_layer_with_dropout_matches_eager(device, monkeypatch):
    """A training step with dropout compiles to one graph and, after the same
    torch.manual_seed, draws the same seed as eager (inductor told to use eager RNG)."""
    if device != "cpu":
        monkeypatch.setattr(torch._inductor.config, "fallback_random", True)
    layer = _random_layer(device, dropout=0.3)
    layer.train()
    compiled = torch.compile(layer, backend=_backend(device), fullgraph=True)
    x = torch.randn(4, 6, 24, device=device)
    grad_y = torch.randn(4, 6, 20, device=device)
    torch.manual_seed(99)
    eager = _step(layer, x, grad_y)
    torch.manual_seed(99)
    comp = _step(compiled, x, grad_y)
    for name, a, b in zip(("y", "x.grad", "lora_A.grad", "lora_B.grad"), comp, eager):
        assert_rel_close(a, b, torch.float32, name=f"compiled {name}")
