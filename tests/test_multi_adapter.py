"""Multi-adapter batches (issue 8): torch.ops.lora_ext.multi_lora_forward, multi_lora_linear, AdapterStack and
lora_ext.mixed_adapters, against a float64 per-row reference (conftest's lora_reference, one row at a time)."""
import pytest
import torch
from torch import nn

import lora_ext
from lora_ext.multi_adapter import _multi_lora_forward_composite

from conftest import (DEVICES, requires_cuda, assert_bit_identical, assert_rel_close, capture_cuda_graph,
                      fused_gemm_serves, lora_reference, make_x)

CPU_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def dtypes_for(device):
    return CPU_DTYPES if device == "cpu" else CPU_DTYPES[:3]


def make_stack(ranks, in_features, out_features, dtype, device, adapter_dtype=None):
    """Stacks of len(ranks) adapters, zero-padded to max(ranks); scalings alpha / r with alpha = 16."""
    adapter_dtype = adapter_dtype or dtype
    n, r_max = len(ranks), max(ranks)
    A = torch.zeros(n, r_max, in_features, dtype=torch.float32)
    B = torch.zeros(n, out_features, r_max, dtype=torch.float32)
    for a, r in enumerate(ranks):
        A[a, :r] = torch.randn(r, in_features) * in_features**-0.5
        B[a, :, :r] = torch.randn(out_features, r) * r**-0.5
    scal_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    scalings = torch.tensor([16.0 / r for r in ranks], dtype=scal_dtype)
    return A.to(device, adapter_dtype), B.to(device, adapter_dtype), scalings.to(device)


def make_base(in_features, out_features, dtype, device, bias=True):
    weight = (torch.randn(out_features, in_features) * in_features**-0.5).to(device, dtype)
    b = torch.randn(out_features).to(device, dtype) if bias else None
    return weight, b


def reference(x, weight, bias, A, B, scalings, ids):
    """Per-row float64 loop over conftest's lora_reference (base only for id -1)."""
    x2 = x.reshape(-1, x.shape[-1])
    ids = ids.reshape(-1).cpu()
    rows = []
    for t in range(x2.shape[0]):
        a = int(ids[t])
        xt = x2[t : t + 1]
        if a < 0:
            y = xt.detach().cpu().double() @ weight.cpu().double().t()
            if bias is not None:
                y = y + bias.cpu().double()
        else:
            y = lora_reference(xt, weight, bias, A[a], B[a], float(scalings[a]))["y"]
        rows.append(y)
    out = torch.cat(rows) if rows else torch.zeros(0, weight.shape[0], dtype=torch.float64)
    return out.view(*x.shape[:-1], weight.shape[0])


def run_op(x, weight, bias, A, B, scalings, ids):
    return torch.ops.lora_ext.multi_lora_forward(x, weight, bias, A, B, scalings, ids)


# ------------------------------------------------------------------------------------------------------------
# The operator


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("float32_adapters", [False, True])
def test_op_matches_reference(device, dtype, float32_adapters):
    if dtype not in dtypes_for(device):
        pytest.skip("float64 runs on the CPU only: the CUDA kernels take float32, float16 and bfloat16")
    adapter_dtype = torch.float32 if float32_adapters else dtype
    in_f, out_f, tokens = 37, 29, 23  # primes
    ranks = [4, 8, 3, 1]
    A, B, s = make_stack(ranks, in_f, out_f, dtype, device, adapter_dtype)
    weight, bias = make_base(in_f, out_f, dtype, device)
    x = make_x(tokens, in_f, dtype, device)
    ids = torch.randint(-1, len(ranks), (tokens,), device=device)
    ids[:4] = torch.tensor([-1, 0, 1, 3])
    y = run_op(x, weight, bias, A, B, s, ids)
    assert y.dtype == dtype and y.shape == (tokens, out_f)
    assert_rel_close(y, reference(x, weight, bias, A, B, s, ids), dtype, adapter_dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ids_dtype", [torch.int64, torch.int32], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "strided"])
@pytest.mark.parametrize("bias", [True, False])
def test_op_layouts_ids_dtypes(device, ids_dtype, layout, bias):
    in_f, out_f, tokens = 13, 11, 7
    A, B, s = make_stack([2, 5], in_f, out_f, torch.float32, device)
    weight, b = make_base(in_f, out_f, torch.float32, device, bias)
    x = make_x(tokens, in_f, torch.float32, device, layout)
    ids = torch.tensor([0, 1, -1, 1, 0, 0, -1], dtype=ids_dtype, device=device)
    y = run_op(x, weight, b, A, B, s, ids)
    assert_rel_close(y, reference(x, weight, b, A, B, s, ids), torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tokens", [0, 1, 2, 31])
def test_op_token_counts(device, tokens):
    A, B, s = make_stack([3, 6, 2], 17, 19, torch.float32, device)
    weight, bias = make_base(17, 19, torch.float32, device)
    x = make_x(tokens, 17, torch.float32, device)
    ids = torch.randint(-1, 3, (tokens,), device=device)
    y = run_op(x, weight, bias, A, B, s, ids)
    assert y.shape == (tokens, 19)
    assert_rel_close(y, reference(x, weight, bias, A, B, s, ids), torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_padding_adds_exactly_zero(device):
    """An adapter padded to r_max gives bit for bit what the same adapter stacked alone at its own rank gives."""
    in_f, out_f, tokens = 24, 16, 9
    dtype = torch.float64 if device == "cpu" else torch.float32  # CUDA's dtypes: float32, float16, bfloat16
    A, B, s = make_stack([3, 8], in_f, out_f, dtype, device)
    weight, bias = make_base(in_f, out_f, dtype, device)
    x = make_x(tokens, in_f, dtype, device)
    ids = torch.zeros(tokens, dtype=torch.int64, device=device)
    padded = run_op(x, weight, bias, A, B, s, ids)
    alone = run_op(x, weight, bias, A[:1, :3].contiguous(), B[:1, :, :3].contiguous(), s[:1], ids)
    assert_rel_close(padded, alone, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_all_rows_one_adapter_equals_lora_linear(device, dtype):
    if dtype not in dtypes_for(device):
        pytest.skip("float64 runs on the CPU only: the CUDA kernels take float32, float16 and bfloat16")
    layer = lora_ext.LoRALinear(20, 12, r=4, alpha=8, device=device, dtype=dtype, adapter_name="a")
    layer.add_adapter("b", r=7, alpha=3)
    for adapter in layer.adapters.values():
        nn.init.normal_(adapter.lora_B)
    layer.set_adapter("b")
    x = make_x(10, 20, dtype, device)
    with torch.no_grad():
        expected = layer(x)
        stack = layer.adapter_stack()
        ids = torch.full((10,), stack.slot("b"), dtype=torch.int64, device=device)
        got = lora_ext.ops.multi_lora_linear(x, layer.weight, layer.bias, stack.lora_A, stack.lora_B,
                                             stack.scalings, ids)
    assert_rel_close(got, expected, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_per_sequence_ids_broadcast(device):
    in_f, out_f = 9, 6
    A, B, s = make_stack([2, 3], in_f, out_f, torch.float32, device)
    weight, bias = make_base(in_f, out_f, torch.float32, device)
    x = torch.randn(3, 4, 5, in_f, device=device)
    seq_ids = torch.tensor([1, -1, 0], device=device)
    y = lora_ext.ops.multi_lora_linear(x, weight, bias, A, B, s, seq_ids)
    per_token = seq_ids.view(3, 1, 1).expand(3, 4, 5)
    assert_rel_close(y, reference(x, weight, bias, A, B, s, per_token), torch.float32)
    y_tok = lora_ext.ops.multi_lora_linear(x, weight, bias, A, B, s, per_token.contiguous())
    assert_bit_identical(y, y_tok)
    with pytest.raises(ValueError, match="adapter_ids must have shape"):
        lora_ext.ops.multi_lora_linear(x, weight, bias, A, B, s, torch.zeros(4, dtype=torch.int64, device=device))


def _bad_cases(device):
    """(description, changes to the good inputs, message regex)."""
    other = "meta"
    return [
        ("x 1-D", dict(x=lambda t: t[0]), "x must be 2-D"),
        ("weight wrong in", dict(weight=lambda t: t[:, :-1]), "weight must have shape"),
        ("A stack 2-D", dict(A=lambda t: t[0]), "lora_A_stack must have shape"),
        ("A stack wrong in", dict(A=lambda t: t[:, :, :-1]), "lora_A_stack must have shape"),
        ("B stack wrong r", dict(B=lambda t: t[:, :, :-1]), "lora_B_stack must have shape"),
        ("B stack wrong n", dict(B=lambda t: t[:-1]), "lora_B_stack must have shape"),
        ("scalings wrong shape", dict(s=lambda t: t[:-1]), "scalings must have shape"),
        ("scalings 2-D", dict(s=lambda t: t.view(1, -1)), "scalings must have shape"),
        ("scalings int", dict(s=lambda t: t.long()), "scalings must be float32"),
        ("ids float", dict(ids=lambda t: t.float()), "adapter_ids must be int64 or int32"),
        ("ids wrong length", dict(ids=lambda t: t[:-1]), "adapter_ids must have shape"),
        ("ids too large", dict(ids=lambda t: torch.where(t == 0, 3, t)), r"adapter_ids\[\d+\] = 3 is outside"),
        ("ids below -1", dict(ids=lambda t: torch.where(t == 1, -2, t)), r"adapter_ids\[\d+\] = -2 is outside"),
        ("ids on another device", dict(ids=lambda t: t.to(other)), "adapter_ids is on meta"),
        ("stack dtype", dict(A=lambda t: t.double(), B=lambda t: t.double()), "adapter stack dtype"),
        ("weight dtype", dict(weight=lambda t: t.double()), "weight dtype"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases("cpu"))), ids=[c[0] for c in _bad_cases("cpu")])
def test_bad_inputs_cpu(case):
    """Clear errors, and the inputs are left as they were."""
    _, change, message = _bad_cases("cpu")[case]
    A, B, s = make_stack([2, 3, 4], 8, 5, torch.float32, "cpu")
    weight, bias = make_base(8, 5, torch.float32, "cpu")
    x = torch.randn(6, 8)
    ids = torch.tensor([0, 1, 2, -1, 0, 1])
    inputs = dict(x=x, weight=weight, A=A, B=B, s=s, ids=ids)
    copies = {k: v.clone() for k, v in inputs.items()}
    bad = {k: change[k](v) if k in change else v for k, v in inputs.items()}
    with pytest.raises(RuntimeError, match=message):
        run_op(bad["x"], bad["weight"], bias, bad["A"], bad["B"], bad["s"], bad["ids"])
    for k, v in inputs.items():
        assert_bit_identical(v, copies[k], k)


def test_out_of_range_ids_cpu_write_nothing_through_wrapper():
    A, B, s = make_stack([2], 8, 5, torch.float32, "cpu")
    weight, bias = make_base(8, 5, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match=r"adapter_ids\[2\] = 1 is outside \[-1, 1\)"):
        lora_ext.ops.multi_lora_linear(torch.randn(3, 8), weight, bias, A, B, s, torch.tensor([0, -1, 1]))


def test_fake_checks_match():
    """The fake implementation rejects bad shapes too (torch.compile, meta tensors)."""
    A, B, s = make_stack([2, 3], 8, 5, torch.float32, "meta")
    weight, bias = make_base(8, 5, torch.float32, "meta")
    x = torch.empty(4, 8, device="meta")
    y = run_op(x, weight, bias, A, B, s, torch.empty(4, dtype=torch.int64, device="meta"))
    assert y.shape == (4, 5) and y.device.type == "meta"
    with pytest.raises(RuntimeError, match="scalings must have shape"):
        run_op(x, weight, bias, A, B, s[:1], torch.empty(4, dtype=torch.int64, device="meta"))
    with pytest.raises(RuntimeError, match="adapter_ids must be int64 or int32"):
        run_op(x, weight, bias, A, B, s, torch.empty(4, device="meta"))


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_cuda_composite_matches_reference_on_cpu_tensors(dtype):
    """The CUDA path's composite is plain torch: checked here on CPU tensors, out-of-range ids mean base only."""
    in_f, out_f, tokens = 19, 23, 17
    A, B, s = make_stack([5, 2, 7], in_f, out_f, dtype, "cpu")
    weight, bias = make_base(in_f, out_f, dtype, "cpu")
    x = make_x(tokens, in_f, dtype, "cpu", "strided")
    ids = torch.randint(-1, 3, (tokens,))
    y = _multi_lora_forward_composite(x, weight, bias, A, B, s, ids)
    assert y.dtype == dtype
    assert_rel_close(y, reference(x, weight, bias, A, B, s, ids), dtype)
    bad = ids.clone()
    bad[:3] = torch.tensor([3, 99, -7])
    as_base = ids.clone()
    as_base[:3] = -1
    y_bad = _multi_lora_forward_composite(x, weight, bias, A, B, s, bad)
    assert_bit_identical(y_bad, _multi_lora_forward_composite(x, weight, bias, A, B, s, as_base))
    y0 = _multi_lora_forward_composite(x[:0], weight, bias, A, B, s, ids[:0])
    assert y0.shape == (0, out_f)


@pytest.mark.parametrize("device", DEVICES)
def test_cuda_out_of_range_ids_are_base_only(device):
    if device == "cpu":
        pytest.skip("on CPU out-of-range ids raise (test_bad_inputs_cpu)")
    A, B, s = make_stack([2, 3], 8, 5, torch.float32, device)
    weight, bias = make_base(8, 5, torch.float32, device)
    x = torch.randn(3, 8, device=device)
    y = run_op(x, weight, bias, A, B, s, torch.tensor([0, 7, -3], device=device))
    ref = run_op(x, weight, bias, A, B, s, torch.tensor([0, -1, -1], device=device))
    assert_bit_identical(y, ref)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend):
    A, B, s = make_stack([2, 4], 16, 8, torch.float32, "cpu")
    weight, bias = make_base(16, 8, torch.float32, "cpu")

    def f(x, ids):
        return lora_ext.ops.multi_lora_linear(x, weight, bias, A, B, s, ids).relu() * 2

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend=backend)
    x = torch.randn(2, 5, 16)
    ids = torch.tensor([1, -1])
    assert_rel_close(compiled(x, ids), f(x, ids), torch.float32)


# ------------------------------------------------------------------------------------------------------------
# AdapterStack


def _layer_with_adapters(device="cpu", dtype=torch.float32):
    layer = lora_ext.LoRALinear(12, 10, r=4, alpha=8, device=device, dtype=dtype, adapter_name="a")
    layer.add_adapter("b", r=6, alpha=6)
    for adapter in layer.adapters.values():
        nn.init.normal_(adapter.lora_B)
    return layer


def _slot_ptrs(stack, slot):
    return (stack.lora_A[slot].data_ptr(), stack.lora_B[slot].data_ptr())


def test_stack_slots_and_padding():
    layer = _layer_with_adapters()
    stack = layer.adapter_stack()
    assert stack.capacity == 8 and stack.max_rank == 6 and stack.slots == {"a": 0, "b": 1}
    assert_bit_identical(stack.lora_A[0, :4], layer.adapters["a"].lora_A.detach())
    assert torch.count_nonzero(stack.lora_A[0, 4:]) == 0 and torch.count_nonzero(stack.lora_B[0, :, 4:]) == 0
    assert torch.count_nonzero(stack.lora_A[2:]) == 0
    assert float(stack.scalings[1]) == pytest.approx(1.0)


def test_stack_add_delete_copies_only_that_slot():
    layer = _layer_with_adapters()
    stack = layer.adapter_stack()
    ptr_A, ptr_B = stack.lora_A.data_ptr(), stack.lora_B.data_ptr()
    before_a = stack.lora_A[0].clone()
    layer.add_adapter("c", r=2, alpha=4)
    assert stack.slots == {"a": 0, "b": 1, "c": 2}
    assert stack.lora_A.data_ptr() == ptr_A and stack.lora_B.data_ptr() == ptr_B  # nothing reallocated
    assert_bit_identical(stack.lora_A[0], before_a, "slot a")
    layer.delete_adapter("b")
    assert stack.slots == {"a": 0, "c": 2}
    assert torch.count_nonzero(stack.lora_A[1]) == 0 and float(stack.scalings[1]) == 0.0
    layer.add_adapter("d", r=3)
    assert stack.slots["d"] == 1  # the freed slot is reused
    assert stack.lora_A.data_ptr() == ptr_A


def test_stack_other_slots_untouched_on_add(monkeypatch):
    """Adding an adapter writes its slot only: the writes of a sync are counted."""
    from lora_ext.multi_adapter import AdapterStack

    layer = _layer_with_adapters()
    stack = layer.adapter_stack()
    written = []
    original = AdapterStack._write
    monkeypatch.setattr(AdapterStack, "_write", lambda self, name, adapter: (written.append(name),
                                                                             original(self, name, adapter)))
    layer.add_adapter("c", r=2)
    assert written == ["c"]
    written.clear()
    layer.adapter_stack()
    assert written == []  # nothing changed: nothing written
    with torch.no_grad():
        layer.adapters["a"].lora_B.mul_(2)  # in-place edit: _version bumps
    layer.adapter_stack()
    assert written == ["a"]
    assert_bit_identical(stack.lora_B[0, :, :4], layer.adapters["a"].lora_B.detach())


def test_stack_grows_by_doubling_and_rank():
    layer = lora_ext.LoRALinear(6, 5, r=2, adapter_name="a0")
    stack = layer.adapter_stack(capacity=2)
    layer.add_adapter("a1", r=2)
    assert stack.capacity == 2
    a0 = layer.adapters["a0"].lora_A.detach().clone()
    layer.add_adapter("a2", r=2)
    assert stack.capacity == 4 and stack.slots == {"a0": 0, "a1": 1, "a2": 2}
    assert_bit_identical(stack.lora_A[0, :2], a0, "copied on growth")
    layer.add_adapter("big", r=5)
    assert stack.max_rank == 5 and stack.slots["a0"] == 0
    assert_bit_identical(stack.lora_A[0, :2], a0, "copied on rank growth")


def test_stack_adapter_loaded_directly_into_moduledict():
    """adapter_io writes layer.adapters[name] directly; the next sync picks it up."""
    layer = _layer_with_adapters()
    stack = layer.adapter_stack()
    from lora_ext.adapter import LoRAAdapter

    layer.adapters["z"] = LoRAAdapter(12, 10, 3, 6, 0.0, False, "kaiming", device="cpu", dtype=torch.float32)
    layer.adapter_stack()
    assert stack.slots["z"] == 2


# ------------------------------------------------------------------------------------------------------------
# Model level


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.seq = nn.Sequential(nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 8))

    def forward(self, x):
        return self.seq(x)


def _randomize_B(model, only=None):
    for _, layer in lora_ext.lora_layers(model):
        for name, adapter in layer.adapters.items():
            if only is None or name == only:
                nn.init.normal_(adapter.lora_B, std=0.5)


def _rows_alone(model, x, names):
    rows = []
    for i, name in enumerate(names):
        if name is None:
            with lora_ext.disable_adapters(model):
                rows.append(model(x[i : i + 1]))
        else:
            lora_ext.set_adapter(model, name)
            rows.append(model(x[i : i + 1]))
    return torch.cat(rows)


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_adapters_sequential(device):
    torch.manual_seed(0)
    model = Net().to(device).eval()
    lora_ext.inject(model, ["seq.0", "seq.2"], r=4, adapter_name="one")
    lora_ext.inject(model, ["seq.0", "seq.2"], r=6, alpha=3, adapter_name="two")
    lora_ext.inject(model, ["seq.2"], r=2, adapter_name="only_last")  # seq.0 lacks it: base there
    _randomize_B(model)
    x = torch.randn(5, 3, 16, device=device)
    names = ["one", "two", None, "only_last", "one"]
    with torch.no_grad():
        with lora_ext.mixed_adapters(model, names):
            mixed = model(x)
        alone = _rows_alone(model, x, names)
    assert_rel_close(mixed, alone, torch.float32)
    # The context is left: layers compute their active adapter again.
    lora_ext.set_adapter(model, "one")
    with torch.no_grad():
        assert_bit_identical(model(x), model(x))
        assert all(layer._mixed_ids is None for _, layer in lora_ext.lora_layers(model))


def test_mixed_adapters_ids_shared_and_cached():
    model = Net().eval()
    lora_ext.inject(model, ["seq.0", "seq.2"], r=4, adapter_name="one")
    lora_ext.inject(model, ["seq.0", "seq.2"], r=4, adapter_name="two")
    lora_ext.inject(model, ["seq.2"], r=4, adapter_name="three")
    layers = dict(lora_ext.lora_layers(model))
    with lora_ext.mixed_adapters(model, ["two", "one"]):
        assert layers["seq.0"]._mixed_ids is layers["seq.2"]._mixed_ids
        assert layers["seq.0"]._mixed_ids.tolist() == [1, 0]
    with lora_ext.mixed_adapters(model, ["three", "one"]):
        assert layers["seq.0"]._mixed_ids.tolist() == [-1, 0]
        assert layers["seq.2"]._mixed_ids.tolist() == [2, 0]


def test_mixed_adapters_errors():
    model = Net().eval()
    lora_ext.inject(model, ["seq.0"], r=4, adapter_name="one")
    with pytest.raises(KeyError, match="no layer of the model has an adapter named 'nope'"):
        with lora_ext.mixed_adapters(model, ["one", "nope"]):
            pass
    with pytest.raises(TypeError, match="one adapter name"):
        with lora_ext.mixed_adapters(model, "one"):
            pass
    lora_ext.merge(model)
    with pytest.raises(RuntimeError, match="need unmerged adapters"):
        with lora_ext.mixed_adapters(model, ["one"]):
            pass
    lora_ext.unmerge(model)
    with pytest.raises(ValueError, match="no LoRALinear"):
        with lora_ext.mixed_adapters(Net(), ["one"]):
            pass


def test_mixed_adapters_slot_id_tensor_and_add_delete_while_serving():
    model = Net().eval()
    lora_ext.inject(model, ["seq.0", "seq.2"], r=4, adapter_name="one")
    lora_ext.inject(model, ["seq.0", "seq.2"], r=5, adapter_name="two")
    _randomize_B(model)
    ids = lora_ext.adapter_slot_ids(model, ["two", None, "one"])
    assert ids.tolist() == [1, -1, 0]
    stacks = [layer.adapter_stack() for _, layer in lora_ext.lora_layers(model)]
    ptrs = [(s.lora_A.data_ptr(), s.lora_B.data_ptr(), s.lora_A[0].clone()) for s in stacks]
    x = torch.randn(3, 2, 16)
    with torch.no_grad():
        with lora_ext.mixed_adapters(model, ids):
            before = model(x)
            # Adding and deleting adapters while serving: only their slots are written.
            lora_ext.inject(model, ["seq.0", "seq.2"], r=3, adapter_name="three")
            _randomize_B(model, only="three")
            after_add = model(x)
            lora_ext.delete_adapter(model, "three")
            after_delete = model(x)
    assert_bit_identical(before[0], after_delete[0])
    for stack, (pa, pb, slot0) in zip(stacks, ptrs):
        assert stack.lora_A.data_ptr() == pa and stack.lora_B.data_ptr() == pb
        assert "three" not in stack.slots
    assert after_add.shape == before.shape
    with torch.no_grad():
        assert_rel_close(before, _rows_alone(model, x, ["two", None, "one"]), torch.float32)


def test_mixed_adapters_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    model = transformers.LlamaForCausalLM(cfg).eval()
    lora_ext.inject(model, ["q_proj", "v_proj"], r=4, alpha=8, adapter_name="task1")
    lora_ext.inject(model, ["q_proj", "v_proj", "o_proj"], r=8, alpha=16, adapter_name="task2")
    _randomize_B(model)
    input_ids = torch.randint(0, 128, (4, 7))
    names = ["task2", "task1", None, "task2"]
    with torch.no_grad():
        with lora_ext.mixed_adapters(model, names):
            mixed = model(input_ids=input_ids).logits
        rows = []
        for i, name in enumerate(names):
            if name is None:
                with lora_ext.disable_adapters(model):
                    rows.append(model(input_ids=input_ids[i : i + 1]).logits)
            else:
                lora_ext.set_adapter(model, name)
                rows.append(model(input_ids=input_ids[i : i + 1]).logits)
        alone = torch.cat(rows)
        lora_ext.set_adapter(model, "task1")
        task1 = model(input_ids=input_ids).logits
    assert_rel_close(mixed, alone, torch.float32)
    assert (mixed[0] - task1[0]).abs().max() > 1e-3  # the adapters really differ


@requires_cuda
def test_cuda_graph_capture_of_mixed_batch():
    """The CUDA path syncs nothing: a mixed-batch forward is captured in a CUDA graph and replayed on new x."""
    torch.manual_seed(0)
    model = Net().cuda().eval()
    lora_ext.inject(model, ["seq.0", "seq.2"], r=4, adapter_name="one")
    lora_ext.inject(model, ["seq.0", "seq.2"], r=6, adapter_name="two")
    _randomize_B(model)
    ids = lora_ext.adapter_slot_ids(model, ["one", None, "two"])
    x = torch.randn(3, 2, 16, device="cuda")
    with torch.no_grad(), lora_ext.mixed_adapters(model, ids):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                model(x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = model(x)
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        expected = model(x)
    assert_rel_close(y, expected, torch.float32)


# ------------------------------------------------------------------------------------------------------------
# The CUDA kernels' paths (csrc/cuda/multi_lora.cu): tiles (16-bit x, > 64 tokens: prefill), gather (≤ 64 tokens
# or float32 x: decoding), general (shapes the vector loads cannot take, covered by the tests above).


def reference_by_slot(x, weight, bias, A, B, scalings, ids):
    """float64 reference on x's device, one masked product per slot used (fast enough for thousands of rows)."""
    x64 = x.double()
    y = x64 @ weight.double().t()
    if bias is not None:
        y = y + bias.double()
    ids = ids.long()
    for a in range(A.shape[0]):
        rows = ids == a
        if bool(rows.any()):
            y[rows] += float(scalings[a]) * (x64[rows] @ A[a].double().t()) @ B[a].double().t()
    return y


def run_lengths_ids(runs, device, dtype=torch.int64):
    """ids for consecutive runs [(length, slot), ...]."""
    return torch.cat([torch.full((n, ), a, dtype=dtype) for n, a in runs]).to(device)


PREFILL_RUNS = [(512, 0), (100, 2), (300, -1), (77, 1), (512, 3), (3, 0)]  # tiles straddle runs


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("float32_adapters", [False, True])
@pytest.mark.parametrize("ranks", [[16, 8, 16, 4], [32, 64, 8, 24]], ids=["r16", "r64"])
def test_cuda_prefill_runs(dtype, float32_adapters, ranks):
    torch.manual_seed(0)
    in_f, out_f = 512, 520  # out_features not a multiple of the 64-column tile
    adapter_dtype = torch.float32 if float32_adapters else dtype
    A, B, s = make_stack(ranks, in_f, out_f, dtype, "cuda", adapter_dtype)
    weight, bias = make_base(in_f, out_f, dtype, "cuda")
    ids = run_lengths_ids(PREFILL_RUNS, "cuda")
    x = make_x(ids.numel(), in_f, dtype, "cuda")
    y = run_op(x, weight, bias, A, B, s, ids)
    assert_rel_close(y, reference_by_slot(x, weight, bias, A, B, s, ids), dtype, adapter_dtype)
    base = torch.nn.functional.linear(x, weight, bias)
    assert_bit_identical(y[ids == -1], base[ids == -1], "base rows")  # never written
    # Each row as it comes out when the whole batch uses its adapter: tiles shared with other adapters change nothing.
    for a in range(len(ranks)):
        alone = run_op(x, weight, bias, A, B, s, torch.full_like(ids, a))
        assert_bit_identical(y[ids == a], alone[ids == a], f"rows of slot {a}")


@requires_cuda
@pytest.mark.parametrize("tokens", [65, 300, 4096])
@pytest.mark.parametrize("ids_dtype", [torch.int64, torch.int32], ids=str)
def test_cuda_tiles_unsorted_ids(tokens, ids_dtype):
    """Random (unsorted) ids with -1 and out-of-range ids: every tile holds many slots."""
    torch.manual_seed(1)
    in_f, out_f, dtype = 256, 384, torch.bfloat16
    A, B, s = make_stack([16, 4, 8, 16, 12, 16, 2, 16], in_f, out_f, dtype, "cuda")
    weight, bias = make_base(in_f, out_f, dtype, "cuda")
    x = make_x(tokens, in_f, dtype, "cuda")
    ids = torch.randint(-1, 8, (tokens,), device="cuda", dtype=ids_dtype)
    y = run_op(x, weight, bias, A, B, s, ids)
    assert_rel_close(y, reference_by_slot(x, weight, bias, A, B, s, ids), dtype)
    bad = ids.clone()
    bad[::7] = 8 + torch.arange(bad[::7].numel(), device="cuda", dtype=ids_dtype)
    as_base = torch.where(bad >= 8, -1, bad)
    assert_bit_identical(run_op(x, weight, bias, A, B, s, bad), run_op(x, weight, bias, A, B, s, as_base))
    assert_bit_identical(y, run_op(x, weight, bias, A, B, s, ids), "a repeated call")  # deterministic


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("tokens", [1, 7, 32, 64])
def test_cuda_decode_many_adapters(dtype, tokens):
    """Decoding: few tokens, 32 of 64 loaded adapters (the gather kernels, split over the in-dimension)."""
    torch.manual_seed(2)
    in_f, out_f = 1024, 1032
    A, B, s = make_stack([16] * 64, in_f, out_f, dtype, "cuda")
    weight, bias = make_base(in_f, out_f, dtype, "cuda")
    x = make_x(tokens, in_f, dtype, "cuda")
    ids = (torch.arange(tokens, device="cuda") * 2) % 64
    ids[::5] = -1
    y = run_op(x, weight, bias, A, B, s, ids)
    assert_rel_close(y, reference_by_slot(x, weight, bias, A, B, s, ids), dtype)
    assert_bit_identical(y, run_op(x, weight, bias, A, B, s, ids), "a repeated call")
    for a in ids.unique().tolist():
        if a >= 0:
            alone = run_op(x, weight, bias, A, B, s, torch.full_like(ids, a))
            assert_bit_identical(y[ids == a], alone[ids == a], f"rows of slot {a}")


@requires_cuda
@pytest.mark.parametrize("ranks", [[16, 8, 16], [12, 5, 3]], ids=["r16", "r12-no-vectors"])
def test_cuda_decode_wide_output(ranks):
    """out = 8200: on Hopper each block of a token's cluster updates 128 or 129 8-column groups of y, so some of its
    128 threads take two (the one-launch gather kernel's loop over columns)."""
    torch.manual_seed(5)
    in_f, out_f, dtype = 264, 8200, torch.bfloat16
    A, B, s = make_stack(ranks, in_f, out_f, dtype, "cuda")
    weight, bias = make_base(in_f, out_f, dtype, "cuda")
    x = make_x(9, in_f, dtype, "cuda")
    ids = torch.tensor([2, -1, 0, 1, 1, 0, -1, 2, 0], device="cuda")
    y = run_op(x, weight, bias, A, B, s, ids)
    assert_rel_close(y, reference_by_slot(x, weight, bias, A, B, s, ids), dtype)
    base = torch.nn.functional.linear(x, weight, bias)
    assert_bit_identical(y[ids == -1], base[ids == -1], "base rows")


@requires_cuda
@pytest.mark.parametrize("case", [
    # (ranks, x dtype, adapter dtype, in, out): the slices a block stages through shared memory in several chunks
    ([16, 12, 5], torch.bfloat16, torch.bfloat16, 4616, 2056),    # A: 72 vectors of K per block, chunks of 64
    ([64, 40, 8], torch.bfloat16, torch.bfloat16, 2056, 2056),    # A: chunks of 16; B: 32 groups, chunks of 23
    ([64, 3], torch.bfloat16, torch.float32, 2056, 1032),         # float adapters: A chunks of 8, B chunks of 11
    ([12, 5], torch.float16, torch.float16, 4616, 2056),          # rank 12: B's rows read element by element
    ([32, 16], torch.float32, torch.float32, 2056, 2056),         # float x: 32-byte vectors of x
    ([3, 1], torch.bfloat16, torch.bfloat16, 4616, 8200),         # one 16-byte piece per group, many items per thread
    ([1], torch.bfloat16, torch.bfloat16, 4616, 8200),            # rank 1
    ([16, 8], torch.bfloat16, torch.bfloat16, 24, 16),            # blocks with no K and no output columns
], ids=["r16-A-chunks", "r64-A-and-B-chunks", "r64-float-adapters", "r12-no-vectors", "float32", "r3-wide-out",
        "r1-wide-out", "tiny-in-out"])
def test_cuda_decode_staged_chunks(case):
    """Decoding on Hopper stages each block's slice of x, A[a] and B[a] in shared memory, chunk by chunk where a
    slice is larger than its stage (multi_lora_cluster.cuh): shapes with several chunks of A and of B, uneven splits
    of K and of the output groups across a cluster's blocks, every rank bucket and adapter dtype, ranks below 8,
    blocks left without work. (Several items per thread together with several chunks of B: also
    test_cuda_decode_wide_output.) Rows match the float64 reference, and bit for bit a batch of their adapter alone
    and a repeated call."""
    ranks, dtype, adapter_dtype, in_f, out_f = case
    torch.manual_seed(7)
    A, B, s = make_stack(ranks, in_f, out_f, dtype, "cuda", adapter_dtype)
    weight, bias = make_base(in_f, out_f, dtype, "cuda")
    x = make_x(7, in_f, dtype, "cuda")
    ids = torch.tensor([1, -1, 0, len(ranks) - 1, 0, 1, 0], device="cuda") % (len(ranks) + 1)
    ids[ids == len(ranks)] = -1
    y = run_op(x, weight, bias, A, B, s, ids)
    assert_rel_close(y, reference_by_slot(x, weight, bias, A, B, s, ids), dtype, adapter_dtype)
    base = torch.nn.functional.linear(x, weight, bias)
    assert_bit_identical(y[ids == -1], base[ids == -1], "base rows")
    for a in range(len(ranks)):
        alone = run_op(x, weight, bias, A, B, s, torch.full_like(ids, a))
        assert_bit_identical(y[ids == a], alone[ids == a], f"rows of slot {a}")
    assert_bit_identical(y, run_op(x, weight, bias, A, B, s, ids), "a repeated call")


@requires_cuda
def test_cuda_decode_is_one_launch_on_hopper():
    """On Hopper, decoding adds one kernel to the base GEMM (shrink and expand in one clustered launch)."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("thread-block clusters need compute capability 9.0+")
    A, B, s = make_stack([16] * 4, 512, 512, torch.bfloat16, "cuda")
    weight, bias = make_base(512, 512, torch.bfloat16, "cuda")
    x = make_x(32, 512, torch.bfloat16, "cuda")
    ids = torch.randint(-1, 4, (32,), device="cuda")
    run_op(x, weight, bias, A, B, s, ids)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        run_op(x, weight, bias, A, B, s, ids)
        torch.cuda.synchronize()
    kernels = [e.name for e in profile.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    ours = [name for name in kernels if "lora" in name]
    assert len(ours) == 1 and "multi_lora_gather_cluster_kernel" in ours[0], kernels


@requires_cuda
@pytest.mark.parametrize("pdl", ["1", "0"], ids=["dependent-launch", "stream-order"])
def test_cuda_decode_reads_y_only_after_the_gemm(monkeypatch, pdl):
    """On Hopper the decoding kernel is launched as the base GEMM's programmatic dependent (LORA_EXT_PDL, on by
    default): it may start before the GEMM ends and must read y and the scalings only after it. Operands that need a
    copy first (float64 scalings, strided ids) are copied before the GEMM. Eager and graph results match the float64
    reference and are bit for bit those of ready operands, with the dependent launch on and off."""
    monkeypatch.setenv("LORA_EXT_PDL", pdl)
    torch.manual_seed(6)
    in_f, out_f, dtype, tokens = 2048, 2056, torch.bfloat16, 48
    A, B, s = make_stack([16, 8, 16, 16], in_f, out_f, dtype, "cuda")
    weight, bias = make_base(in_f, out_f, dtype, "cuda")
    x = make_x(tokens, in_f, dtype, "cuda")
    ids = torch.randint(-1, 4, (tokens,), device="cuda")
    strided_ids = torch.stack([ids, torch.zeros_like(ids)], dim=1)[:, 0]
    assert not strided_ids.is_contiguous()
    y = run_op(x, weight, bias, A, B, s.double(), strided_ids)
    assert_rel_close(y, reference_by_slot(x, weight, bias, A, B, s, ids), dtype)
    assert_bit_identical(y, run_op(x, weight, bias, A, B, s, ids), "ready operands")

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run_op(x, weight, bias, A, B, s, ids)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_graph = run_op(x, weight, bias, A, B, s, ids)
    for _ in range(3):  # replays back to back: each one's kernel waits for its own GEMM
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        assert_bit_identical(y_graph, run_op(x, weight, bias, A, B, s, ids), "graph replay")


@requires_cuda
@pytest.mark.parametrize("case", ["rank 12 (no 8-rank vectors)", "float32 x, prefill", "rank 80 (general)",
                                  "in 1000 out 1000 tiles", "strided x", "rows not 16-byte aligned (general)"])
def test_cuda_path_edges(case):
    torch.manual_seed(3)
    dtype, tokens, in_f, out_f, ranks, layout = torch.bfloat16, 200, 256, 128, [16, 8], "contiguous"
    if case.startswith("rank 12"):
        ranks = [12, 5]
    elif case.startswith("float32"):
        dtype = torch.float32
    elif case.startswith("rank 80"):
        ranks = [80, 3]
    elif case.startswith("in 1000"):
        in_f, out_f = 1000, 1000
    elif case == "strided x":
        layout = "strided"
    A, B, s = make_stack(ranks, in_f, out_f, dtype, "cuda")
    weight, bias = make_base(in_f, out_f, dtype, "cuda")
    x = make_x(tokens, in_f, dtype, "cuda", layout)
    if case.startswith("rows not"):
        x = make_x(tokens, in_f + 1, dtype, "cuda")[:, 1:]  # row stride in + 1
    ids = run_lengths_ids([(70, 1), (30, -1), (100, 0)], "cuda")
    for n in (tokens, 40):  # tiles or gather, then gather
        y = run_op(x[:n], weight, bias, A, B, s, ids[:n])
        assert_rel_close(y, reference_by_slot(x[:n], weight, bias, A, B, s, ids[:n]), dtype)


@requires_cuda
@pytest.mark.parametrize("tokens", [32, 4096])
def test_cuda_graph_replay_of_the_op(tokens):
    """Capture with one x and one set of ids, replay with others: the eager result, bit for bit."""
    torch.manual_seed(4)
    in_f, out_f, dtype = 512, 512, torch.bfloat16
    A, B, s = make_stack([16] * 8, in_f, out_f, dtype, "cuda")
    weight, bias = make_base(in_f, out_f, dtype, "cuda")
    x = make_x(tokens, in_f, dtype, "cuda")
    ids = torch.randint(-1, 8, (tokens,), device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            run_op(x, weight, bias, A, B, s, ids)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = run_op(x, weight, bias, A, B, s, ids)
    x.copy_(torch.randn_like(x))
    ids.copy_(run_lengths_ids([(tokens // 2, 3), (tokens - tokens // 2, 5)], "cuda"))
    graph.replay()
    torch.cuda.synchronize()
    assert_bit_identical(y, run_op(x, weight, bias, A, B, s, ids))


@requires_cuda
def test_cuda_empty_and_all_base_batches():
    A, B, s = make_stack([16, 16], 256, 256, torch.bfloat16, "cuda")
    weight, bias = make_base(256, 256, torch.bfloat16, "cuda")
    for tokens in (0, 1, 100):
        x = make_x(tokens, 256, torch.bfloat16, "cuda")
        ids = torch.full((tokens,), -1, dtype=torch.int64, device="cuda")
        assert_bit_identical(run_op(x, weight, bias, A, B, s, ids), torch.nn.functional.linear(x, weight, bias))


# ------------------------------------------------------------------------------------------------------------
# The per-call host path: O(1) in the number of loaded adapters


def test_per_call_path_does_not_scan_every_adapter(monkeypatch):
    """With 64 adapters loaded, a mixed call with slot ids compares no adapter record, and one with names compares
    those of the named adapters only."""
    import lora_ext.multi_adapter as multi_adapter

    layer = lora_ext.LoRALinear(16, 8, r=4, adapter_name="a0")
    for i in range(1, 64):
        layer.add_adapter(f"a{i}", r=4)
    ids = lora_ext.adapter_slot_ids(layer, ["a3", None, "a7"])
    calls = []
    original = multi_adapter._adapter_record
    monkeypatch.setattr(multi_adapter, "_adapter_record", lambda adapter: (calls.append(1), original(adapter))[1])
    x = torch.randn(3, 16)
    with torch.no_grad():
        with lora_ext.mixed_adapters(layer, ids):
            layer(x)
        assert calls == []
        with lora_ext.mixed_adapters(layer, ["a3", None, "a7", "a3"]):
            layer(torch.randn(4, 16))
        assert len(calls) == 2


def test_structural_changes_seen_by_the_per_call_path():
    """Additions and removals made any way (add_adapter, the ModuleDict directly) reach the next mixed call."""
    from lora_ext.adapter import LoRAAdapter

    torch.manual_seed(5)
    layer = _layer_with_adapters()
    x = torch.randn(4, 12)
    ids = lora_ext.adapter_slot_ids(layer, ["a", "b", None, "a"])
    with torch.no_grad(), lora_ext.mixed_adapters(layer, ids):
        before = layer(x)
        z = LoRAAdapter(12, 10, 3, 6, 0.0, False, "kaiming", device="cpu", dtype=torch.float32)
        nn.init.normal_(z.lora_B)
        layer.adapters["z"] = z  # as adapter_io does: no sync of its own
        assert layer._current_adapter_stack().slots["z"] == 2
        del layer.adapters["b"]
        assert "b" not in layer._current_adapter_stack().slots
        after = layer(x)
    assert_bit_identical(before[0], after[0])
    assert_bit_identical(after[1], torch.nn.functional.linear(x, layer.weight, layer.bias)[1])  # b's slot is free


def test_in_place_edits_seen_by_names_and_by_adapter_slot_ids():
    torch.manual_seed(6)
    layer = _layer_with_adapters()
    x = torch.randn(2, 12)
    with torch.no_grad():
        layer.adapters["a"].lora_B.mul_(3)  # in place: seen through the version counter
        with lora_ext.mixed_adapters(layer, ["a", "a"]):
            mixed = layer(x)
        layer.set_adapter("a")
        assert_rel_close(mixed, layer(x), torch.float32)
        layer.adapters["b"].lora_A.add_(1.0)
        ids = lora_ext.adapter_slot_ids(layer, ["b", "b"])  # a full sync
        with lora_ext.mixed_adapters(layer, ids):
            mixed = layer(x)
        layer.set_adapter("b")
        assert_rel_close(mixed, layer(x), torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_slot_ids_are_refused_where_they_enter(device):
    """A hand-made slot-id tensor is range-checked once, on entering mixed_adapters (issue 8: a clear error where
    the ids enter, never a silent base-only row on CUDA); nothing is set on the layers; ids from
    adapter_slot_ids skip the check (no sync) until they are edited in place."""
    torch.manual_seed(0)
    model = Net().to(device).eval()
    lora_ext.inject(model, ["seq.0", "seq.2"], r=4, adapter_name="one")
    lora_ext.inject(model, ["seq.0", "seq.2"], r=4, adapter_name="two")
    slots = min(layer.adapter_stack().capacity for _, layer in lora_ext.lora_layers(model))
    x = torch.randn(3, 16, device=device)
    for bad in ([0, slots, -1], [0, -2, 1]):
        with pytest.raises(ValueError, match="slot ids must be -1"):
            with lora_ext.mixed_adapters(model, torch.tensor(bad, device=device)):
                pass
        assert all(layer._mixed_ids is None for _, layer in lora_ext.lora_layers(model))
    good = lora_ext.adapter_slot_ids(model, ["one", None, "two"])
    with torch.no_grad(), lora_ext.mixed_adapters(model, good):
        y = model(x)
    with torch.no_grad(), lora_ext.mixed_adapters(model, good.clone()):  # a copy: checked, and valid
        assert_bit_identical(model(x), y)
    good[1] = slots  # edited in place: checked again
    with pytest.raises(ValueError, match="slot ids must be -1"):
        with lora_ext.mixed_adapters(model, good):
            pass


# ------------------------------------------------------------------------------------------------------------
# Prefill on Hopper: the rank-r term inside the fused GEMM for row pairs of one adapter


@requires_cuda
@pytest.mark.parametrize("ranks", [[8, 16, 16, 8, 8, 16, 8, 16, 4, 8], [8, 3, 5, 8, 2, 7, 1, 8, 6, 4],
                                   [24, 4, 17, 9, 24, 1, 8, 16, 24, 3]], ids=["r16", "r8", "r24"])
@pytest.mark.parametrize("ids_dtype", [torch.int64, torch.int32], ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_fused_gemm_prefill_matches_reference(monkeypatch, dtype, bias, ids_dtype, ranks):
    """On Hopper a prefill batch runs as one GEMM (csrc/cuda/lora_gemm_sm90.cu) that adds, per pair of 256 rows, one
    rank-r term per distinct adapter of the pair (up to 8 by default, each from that adapter's rows of xs, zeros
    elsewhere); pairs of more adapters get theirs from the tile expand afterwards. LORA_EXT_FUSED_GEMM=force lifts the
    GEMM's 4096-token cutoff; =0 is the cuBLAS + expand path; LORA_EXT_PAIR_SLOTS=4 sends the pair of 6 adapters
    to the expand too. All against the float64 per-row reference, pair by pair. A row of a pair of at most 8
    adapters comes out bit for bit as when the whole batch uses its adapter (the other adapters' K blocks add exact
    zeros). Stacks of rank 16, 8 and 24 (the pair kernel's 8-rank chunks: two, one, three; the fused path takes
    stacks of r % 8 == 0). out = 264 is 5 column tiles of the expand: with 2 per block (the default) the last block
    has one; LORA_EXT_EXPAND_TILES=1 and 5 give the same y bit for bit. The same in a captured CUDA graph, replayed
    with other ids."""
    if not fused_gemm_serves():
        pytest.skip("the fused GEMM serves only on a Hopper GPU with an sm_90a build")
    tokens, in_f, out_f = 1356, 520, 264
    A, B, s = make_stack(ranks, in_f, out_f, dtype, "cuda")
    weight, b = make_base(in_f, out_f, dtype, "cuda", bias)
    x = make_x(tokens, in_f, dtype, "cuda")
    ids = torch.empty(tokens, dtype=torch.int64)
    ids[0:256] = 2                                   # one adapter: one K block more in the GEMM
    ids[256:512] = torch.randint(-1, 10, (256,))     # ten adapters and base rows: more than 8, the expand
    ids[256:267] = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, -1])
    ids[512:768] = -1                                # base rows only: nothing
    ids[768:1024] = torch.tensor([4, 1, 3, 0]).repeat_interleave(64)   # exactly four: four K blocks
    ids[1024:1280] = torch.tensor([0, -1, 3, 0]).repeat_interleave(64)  # two and base rows
    ids[1280:] = torch.tensor([5, 0, 1, 2, 3, 9]).repeat_interleave(13)[:tokens - 1280]  # six (partial pair)
    ids = ids.to("cuda", ids_dtype)
    ref = reference_by_slot(x, weight, b, A, B, s, ids)
    monkeypatch.setenv("LORA_EXT_FUSED_GEMM", "force")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        y = run_op(x, weight, b, A, B, s, ids)
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert any("lora_gemm_sm90" in k for k in kernels) and any("pair_passes" in k for k in kernels), kernels
    pairs = [(0, 256), (256, 512), (512, 768), (768, 1024), (1024, 1280), (1280, tokens)]
    for lo, hi in pairs:
        assert_rel_close(y[lo:hi], ref[lo:hi], dtype, name=f"rows {lo}-{hi}")
    for a in range(len(ranks)):
        alone = run_op(x, weight, b, A, B, s, torch.full_like(ids, a))
        for lo, hi in [(0, 256), (768, 1024), (1024, 1280), (1280, tokens)]:  # pairs of at most 8 adapters
            rows = ids[lo:hi] == a
            assert_bit_identical(y[lo:hi][rows], alone[lo:hi][rows], f"rows of slot {a} in {lo}-{hi}")
    for tiles in ("1", "5"):
        monkeypatch.setenv("LORA_EXT_EXPAND_TILES", tiles)
        assert_bit_identical(run_op(x, weight, b, A, B, s, ids), y, f"LORA_EXT_EXPAND_TILES={tiles}")
    monkeypatch.delenv("LORA_EXT_EXPAND_TILES")
    monkeypatch.setenv("LORA_EXT_PAIR_SLOTS", "4")  # the six-adapter pair (1280…) to the expand as well
    y_four = run_op(x, weight, b, A, B, s, ids)
    for lo, hi in pairs:
        assert_rel_close(y_four[lo:hi], ref[lo:hi], dtype, name=f"rows {lo}-{hi}, 4 slots per pair")
    assert_bit_identical(y_four[:1280], y[:1280], "the pairs that both settings route alike")
    monkeypatch.delenv("LORA_EXT_PAIR_SLOTS")
    monkeypatch.setenv("LORA_EXT_FUSED_GEMM", "0")
    y_unfused = run_op(x, weight, b, A, B, s, ids)
    for lo, hi in pairs:
        assert_rel_close(y_unfused[lo:hi], ref[lo:hi], dtype, name=f"rows {lo}-{hi} unfused")

    monkeypatch.setenv("LORA_EXT_FUSED_GEMM", "force")
    captured_ids = ids.clone()
    graph, y_graph = capture_cuda_graph(lambda: run_op(x, weight, b, A, B, s, captured_ids))
    graph.replay()
    torch.cuda.synchronize()
    assert_bit_identical(y_graph, y)
    other_ids = ids.flip(0).contiguous()  # other pairs, other adapters: found again on the device at replay
    captured_ids.copy_(other_ids)
    graph.replay()
    torch.cuda.synchronize()
    assert_bit_identical(y_graph, run_op(x, weight, b, A, B, s, other_ids))
