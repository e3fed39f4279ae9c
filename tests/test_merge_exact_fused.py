"""The one-pass exact merge (lora_ext::merge_exact_): unmerge restores W bit for bit, whatever the record's
capacity (relaunches), on odd shapes (one row, prime sizes, rows that are not 16-byte aligned) and both adapter
dtypes; a merge that would create NaN/Inf leaves W as it was; an adapter edited through .data while merged is
flagged and W still comes back exactly; the record is exactly what a plain unmerge misses. CUDA cases skip
where there is no GPU."""
import warnings

import pytest
import torch

import lora_ext
from conftest import DEVICE_DTYPES, DEVICES, assert_bit_identical
from lora_ext.exact_merge import (_ENTRY_DTYPE, _STATE_HEADER, _tiles, adapter_changed_while_merged,
                                  fused_merge_with_record, fused_unmerge_with_record)

@pytest.fixture(autouse=True)
def _needs_kernel(request):
    device = request.node.callspec.params.get("device", "cpu") if hasattr(request.node, "callspec") else "cpu"
    if not torch._C._dispatch_has_kernel_for_dispatch_key("lora_ext::merge_exact_", device.upper()):
        pytest.skip(f"lora_ext::merge_exact_ has no {device} kernel in this build")


# (out, in, r): one element; rows of odd length (scalar path); 16-byte rows with a partial last tile (vector
# path, 8 | in but 256 ∤ in); prime sizes; r over one 16-rank chunk; a tall layer with several row tiles.
SHAPES = [(1, 1, 1), (17, 300, 3), (33, 513, 16), (64, 256, 8), (5, 1000, 40), (1, 4104, 16), (97, 131, 17),
          (70, 520, 33), (129, 2048, 4)]


def _adapter(out_f, in_f, rank, dtype, device, scale=0.05):
    A = (torch.randn(rank, in_f, device=device) * scale).to(dtype)
    B = (torch.randn(out_f, rank, device=device) * scale).to(dtype)
    return A, B


@pytest.mark.parametrize("device,dtype,adapter_dtype", [c for c in DEVICE_DTYPES if c.values[1] != torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("capacity", [None, 1], ids=["default_capacity", "capacity_1"])
def test_round_trips_are_bit_exact(device, dtype, adapter_dtype, shape, capacity):
    out_f, in_f, rank = shape
    weight = torch.randn(out_f, in_f, device=device).to(dtype)
    original = weight.clone()
    A, B = _adapter(out_f, in_f, rank, adapter_dtype, device)
    expected = (weight.double() + 0.5 * B.double() @ A.double())
    for _ in range(5):
        record = fused_merge_with_record(weight, A, B, 0.5, capacity=capacity)
        merged_error = (weight.double() - expected).abs().max().item()
        assert merged_error <= 2 * expected.abs().max().item() * torch.finfo(dtype).eps + 1e-30
        fused_unmerge_with_record(weight, A, B, 0.5, record)
        assert_bit_identical(weight, original, "weight after merge + unmerge")


@pytest.mark.parametrize("device,dtype,adapter_dtype", [c for c in DEVICE_DTYPES if c.values[1] == torch.bfloat16])
def test_record_is_small_and_plain_unmerge_would_drift(device, dtype, adapter_dtype):
    weight = torch.randn(256, 1024, device=device).to(dtype)
    original = weight.clone()
    A, B = _adapter(256, 1024, 16, adapter_dtype, device, scale=0.1)
    record = fused_merge_with_record(weight, A, B, 2.0)
    plain = weight.clone()  # a plain unmerge: zeroed state (no tile has entries), no record, no adapter copy
    torch.ops.lora_ext.merge_exact_(plain, A, B, 2.0, True, torch.empty(0, dtype=torch.int32, device=device),
                                    torch.zeros(_STATE_HEADER + _tiles(plain), dtype=torch.int64, device=device),
                                    torch.empty(0, dtype=A.dtype, device=device))
    wrong = (plain.view(torch.int16) != original.view(torch.int16)).sum().item()
    assert wrong == record.corrected_elements() > 0, "the record must hold exactly the elements a plain unmerge misses"
    assert record.corrected_elements() < 0.25 * weight.numel()


@pytest.mark.parametrize("device,dtype,adapter_dtype", [c for c in DEVICE_DTYPES if c.values[1] == torch.float16])
def test_overflowing_merge_leaves_weight_unchanged(device, dtype, adapter_dtype):
    weight = torch.randn(40, 300, device=device).to(dtype)
    weight[3, 7] = float("inf")  # already non-finite: allowed, and restored
    original = weight.clone()
    A, B = _adapter(40, 300, 4, adapter_dtype, device)
    B[30, 0] = 1e4
    A[0, 290] = 1e4
    with pytest.raises(ValueError, match="NaN or Inf"):
        fused_merge_with_record(weight, A, B, 1.0, capacity=2)
    assert_bit_identical(weight, original, "weight after a refused merge")


def _random_weight(out_f, in_f, dtype, device):
    # Magnitudes over several binades, so that merged values cross powers of two and the record is not empty.
    return (torch.randn(out_f, in_f, device=device) * torch.rand(out_f, 1, device=device) * 4).to(dtype)


@pytest.mark.parametrize("device,dtype,adapter_dtype", [c for c in DEVICE_DTYPES if c.values[1] != torch.float64])
def test_unaligned_weight_view_round_trips(device, dtype, adapter_dtype):
    """A weight whose storage starts off a 16-byte boundary takes the scalar path: same arithmetic, same bits."""
    storage = _random_weight(1, 1 + 48 * 264, dtype, device).view(-1)
    weight = storage[1:].view(48, 264)  # contiguous, 264 · element size is a multiple of 16, the start is not
    original, before = weight.clone(), storage[:1].clone()
    A, B = _adapter(48, 264, 8, adapter_dtype, device, scale=0.3)
    record = fused_merge_with_record(weight, A, B, 1.5)
    aligned = original.clone()
    fused_merge_with_record(aligned, A, B, 1.5)
    assert_bit_identical(weight, aligned, "merged unaligned weight vs the aligned (vectorised) merge")
    fused_unmerge_with_record(weight, A, B, 1.5, record)
    assert_bit_identical(weight, original, "unaligned weight after merge + unmerge")
    assert_bit_identical(storage[:1], before, "the element before the view")


@pytest.mark.parametrize("device,dtype,adapter_dtype", [c for c in DEVICE_DTYPES if c.values[1] != torch.float64])
@pytest.mark.parametrize("capacity", [None, 1, 100], ids=["default_capacity", "capacity_1", "capacity_100"])
def test_record_is_exactly_what_a_plain_unmerge_misses(device, dtype, adapter_dtype, capacity):
    out_f, in_f, rank = 67, 1032, 16
    weight = _random_weight(out_f, in_f, dtype, device)
    original = weight.clone()
    A, B = _adapter(out_f, in_f, rank, adapter_dtype, device, scale=0.3)
    record = fused_merge_with_record(weight, A, B, 2.0, capacity=capacity)
    assert record.entries.dtype == _ENTRY_DTYPE[dtype]
    plain = weight.clone()
    torch.ops.lora_ext.merge_exact_(plain, A, B, 2.0, True, record.entries[:0],
                                    torch.zeros_like(record.state), torch.empty(0, dtype=A.dtype, device=device))
    bits = {2: torch.int16, 4: torch.int32}[weight.element_size()]
    wrong = (plain.view(bits) != original.view(bits)).sum().item()
    assert wrong == record.corrected_elements()
    # Each tile's word says where its entries are; together they cover the record once.
    words = record.state[_STATE_HEADER:].cpu()
    assert bool((words != 0).all()), "every tile merged"
    counts = (words & 0xFFFF) - 1
    assert counts.sum().item() == record.entries.numel()
    fused_unmerge_with_record(weight, A, B, 2.0, record)
    assert_bit_identical(weight, original, "weight after merge + unmerge")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("which", ["A", "B"])
def test_non_finite_adapter_is_refused_with_weight_untouched(device, dtype, bad, which):
    weight = _random_weight(40, 520, dtype, device)
    weight[5, 9] = float("inf")  # W's own non-finite elements are allowed, and kept
    original = weight.clone()
    A, B = _adapter(40, 520, 4, dtype, device)
    (A if which == "A" else B)[1, 3] = bad
    with pytest.raises(ValueError, match=f"lora_{which} holds NaN or Inf"):
        fused_merge_with_record(weight, A, B, 1.0, capacity=3)
    assert_bit_identical(weight, original, "weight after a refused merge")


@pytest.mark.parametrize("device", DEVICES)
def test_adapter_edit_through_data_is_flagged_and_unmerge_stays_exact(device):
    torch.manual_seed(0)
    layer = lora_ext.LoRALinear(96, 80, r=8, dtype=torch.bfloat16, device=device)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)
    original = layer.weight.detach().clone()
    layer.merge()
    layer.lora_A.data[3, 7] += 1  # invisible to version counters
    with pytest.warns(UserWarning, match="changed while merged"):
        layer.unmerge()
    assert_bit_identical(layer.weight.detach(), original, "weight after unmerging an edited adapter")


@pytest.mark.parametrize("device", DEVICES)
def test_unchanged_adapter_is_not_flagged(device):
    weight = _random_weight(64, 264, torch.bfloat16, device)
    A, B = _adapter(64, 264, 8, torch.bfloat16, device, scale=0.3)
    record = fused_merge_with_record(weight, A, B, 1.0)
    fused_unmerge_with_record(weight, A, B, 1.0, record)
    assert not adapter_changed_while_merged(record)


@pytest.mark.parametrize("device", DEVICES)
def test_layer_round_trips_bit_exact_without_warnings(device):
    torch.manual_seed(1)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        layer = lora_ext.LoRALinear(200, 136, r=16, dtype=dtype, device=device)
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.2)
        original = layer.weight.detach().clone()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for _ in range(3):
                layer.merge()
                layer.unmerge()
        assert_bit_identical(layer.weight.detach(), original, f"{dtype} weight after 3 round trips")


@pytest.mark.parametrize("device", DEVICES)
def test_record_applies_only_to_its_own_shape_and_scaling(device):
    """The unmerge kernel trusts the record's tile words: a record made for another shape or scaling is refused
    before anything is written (from a review: a foreign record could address rows past W)."""
    weight = torch.randn(64, 512, device=device).to(torch.bfloat16)
    A, B = _adapter(64, 512, 8, torch.bfloat16, device)
    record = fused_merge_with_record(weight, A, B, 2.0)
    merged = weight.clone()
    with pytest.raises(ValueError, match="scaling"):
        fused_unmerge_with_record(weight, A, B, 3.0, record)
    other = torch.randn(32, 512, device=device).to(torch.bfloat16)
    other_copy = other.clone()
    with pytest.raises(ValueError, match="shape"):
        fused_unmerge_with_record(other, A, B[:32], 2.0, record)
    assert_bit_identical(weight, merged)
    assert_bit_identical(other, other_copy)
    fused_unmerge_with_record(weight, A, B, 2.0, record)


@pytest.mark.parametrize("device", DEVICES)
def test_operator_rejects_scaling_beyond_float32_and_aliased_buffers(device):
    weight = torch.randn(16, 256, device=device).to(torch.bfloat16)
    A, B = _adapter(16, 256, 4, torch.bfloat16, device)
    original = weight.clone()
    state = torch.zeros(_STATE_HEADER + _tiles(weight), dtype=torch.int64, device=device)
    record = torch.empty(64, dtype=_ENTRY_DTYPE[weight.dtype], device=device)
    copy = torch.empty(A.numel() + B.numel(), dtype=A.dtype, device=device)
    with pytest.raises(RuntimeError, match="beyond float32's range"):
        torch.ops.lora_ext.merge_exact_(weight, A, B, 1e39, False, record, state, copy)
    aliased = torch.empty(A.numel() + B.numel() + A.numel(), dtype=A.dtype, device=device)
    A_in_copy = aliased[:A.numel()].view_as(A)
    A_in_copy.copy_(A)
    with pytest.raises(RuntimeError, match="adapter_copy and lora_A share memory"):
        torch.ops.lora_ext.merge_exact_(weight, A_in_copy, B, 2.0, False, record, state,
                                        aliased[:A.numel() + B.numel()])
    with pytest.raises(RuntimeError, match="record and state share memory"):
        torch.ops.lora_ext.merge_exact_(weight, A, B, 2.0, False, state[:8].view(torch.int32), state, copy)
    assert_bit_identical(weight, original)


# The CUDA kernel's arithmetic, emulated exactly on the CPU (the CPU kernel sums with BLAS, in its own order, so
# it is not the reference here): d = fma(B[o, j], A[j, k], d) for j ascending from 0, delta = s·d, merged =
# round(w + delta), and a record entry wherever round(merged − delta) != w.
def _fma_float32(b: torch.Tensor, a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """float32 fma(b, a, c) rounded once, from float64 arithmetic: the product is exact (24 + 24 bits), the sum
    is exact as s + err (TwoSum), and rounding s to float32 can differ from rounding s + err only where s is a
    float32 midpoint and err != 0 (then s is nudged towards err first)."""
    p = b.double() * a.double()
    c64 = c.double()
    s = p + c64
    bb = s - p
    err = (p - (s - bb)) + (c64 - bb)
    r = s.float()
    toward = torch.where(s > r.double(), torch.tensor(float("inf")), torch.tensor(float("-inf"))).float()
    midpoint = (r.double() + torch.nextafter(r, toward).double()) / 2
    fix = (s == midpoint) & (err != 0) & (s != r.double())
    if bool(fix.any()):
        nudged = torch.nextafter(s, torch.where(err > 0, torch.tensor(float("inf"), dtype=torch.float64),
                                                torch.tensor(float("-inf"), dtype=torch.float64)))
        r = torch.where(fix, nudged.float(), r)
    return r


def _kernel_reference(weight, A, B, scaling):
    """(merged W, {flat index: original bits} of the elements a plain unmerge misses), as the CUDA kernel computes
    them, on the CPU."""
    w, a, b = weight.cpu(), A.cpu().float(), B.cpu().float()
    d = torch.zeros(w.shape, dtype=torch.float32)
    for j in range(a.shape[0]):
        d = _fma_float32(b[:, j:j + 1].expand_as(d), a[j:j + 1, :].expand_as(d), d)
    delta = torch.tensor(scaling, dtype=torch.float32) * d
    merged = (w.float() + delta).to(w.dtype)
    back = (merged.float() - delta).to(w.dtype)
    bits = {2: torch.int16, 4: torch.int32}[w.element_size()]
    miss = (back.view(bits) != w.view(bits)).flatten().nonzero().flatten().tolist()
    mask = (1 << 8 * w.element_size()) - 1
    originals = w.view(bits).flatten()
    return merged, {i: int(originals[i]) & mask for i in miss}


def test_reference_fma_is_exactly_rounded():
    from fractions import Fraction
    g = torch.Generator().manual_seed(0)
    b, a, c = (torch.randn(4000, generator=g) * torch.rand(4000, generator=g) ** 8 for _ in range(3))
    r = _fma_float32(b, a, c)
    for i in range(4000):
        exact = Fraction(float(b[i])) * Fraction(float(a[i])) + Fraction(float(c[i]))
        lo = torch.tensor(float(exact), dtype=torch.float64).float()  # nearest double, then float: bracket it
        candidates = {float(lo), float(torch.nextafter(lo, torch.tensor(float("inf")))),
                      float(torch.nextafter(lo, torch.tensor(float("-inf"))))}
        best = min(candidates, key=lambda v: (abs(Fraction(v) - exact),
                                              int(torch.tensor(v).view(torch.int32)) & 1))
        assert float(r[i]) == best, (float(b[i]), float(a[i]), float(c[i]))


@pytest.mark.parametrize("device,dtype,adapter_dtype",
                         [c for c in DEVICE_DTYPES if c.values[0] == "cuda" and c.values[1] != torch.float64])
@pytest.mark.parametrize("shape", [(70, 520, 33), (37, 131, 16), (64, 512, 16), (33, 264, 5)],
                         ids=lambda s: "x".join(map(str, s)))
def test_cuda_merge_matches_exact_reference(device, dtype, adapter_dtype, shape):
    """W after the CUDA merge, and its record, are bit for bit those of the kernel's arithmetic (fma over j
    ascending, then ·s, one rounding into W's dtype) emulated on the CPU: a kernel rewrite must not change them."""
    out_f, in_f, rank = shape
    weight = _random_weight(out_f, in_f, dtype, device)
    original = weight.clone()
    A, B = _adapter(out_f, in_f, rank, adapter_dtype, device, scale=0.3)
    expected, expected_record = _kernel_reference(weight, A, B, 2.0)
    record = fused_merge_with_record(weight, A, B, 2.0)
    assert_bit_identical(weight.cpu(), expected, "merged weight vs the emulated kernel arithmetic")
    width = 8 * weight.element_size()
    entries, words = record.entries.cpu().tolist(), record.state[_STATE_HEADER:].cpu().tolist()
    tiles_per_row = -(-in_f // 256)
    got = {}
    for tile, word in enumerate(words):
        start, count = word >> 16, (word & 0xFFFF) - 1
        for entry in entries[start:start + count]:
            local, bits = (entry % (1 << 64)) >> width, entry & ((1 << width) - 1)
            row = tile // tiles_per_row * 32 + local // 256
            col = tile % tiles_per_row * 256 + local % 256
            got[row * in_f + col] = bits
    assert got == expected_record
    fused_unmerge_with_record(weight, A, B, 2.0, record)
    assert_bit_identical(weight, original, "weight after merge + unmerge")
