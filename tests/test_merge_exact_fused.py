"""The one-pass exact merge (lora_ext::merge_exact_): unmerge restores W bit for bit, whatever the record's
capacity (relaunches), on odd shapes and both adapter dtypes; a merge that would create NaN/Inf leaves W as it was.
CUDA cases skip until the operator has a CUDA kernel (branch wip/fused-exact-merge)."""
import pytest
import torch

from conftest import DEVICE_DTYPES, assert_bit_identical
from lora_ext.exact_merge import fused_merge_with_record, fused_unmerge_with_record

@pytest.fixture(autouse=True)
def _needs_kernel(request):
    device = request.node.callspec.params.get("device", "cpu") if hasattr(request.node, "callspec") else "cpu"
    if not torch._C._dispatch_has_kernel_for_dispatch_key("lora_ext::merge_exact_", device.upper()):
        pytest.skip(f"lora_ext::merge_exact_ has no {device} kernel in this build")


SHAPES = [(1, 1, 1), (17, 300, 3), (33, 513, 16), (64, 256, 8), (5, 1000, 40)]


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
    plain = weight.clone()
    torch.ops.lora_ext.merge_exact_(plain, A, B, 2.0, True, torch.empty(0, dtype=torch.int64, device=device),
                                    torch.empty(0, dtype=torch.int16, device=device),
                                    torch.zeros(3, dtype=torch.int64, device=device),
                                    torch.zeros(64, dtype=torch.uint8, device=device))
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
