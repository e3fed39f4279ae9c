"""Merge an adapter into W so that unmerge restores W bit for bit, and so that a failed merge leaves W untouched.

Why a record is needed: merging rounds W + s·B·A to W's dtype, and unmerging rounds (W + s·B·A) − s·B·A again,
so a plain unmerge can land one unit in the last place (ulp) away from the original value. PEFT, which also rounds
the delta to bf16 first, changes 34% of a bf16 weight after 100 merge/unmerge round trips. We keep a compact
record of exactly the elements a plain unmerge would get wrong: at merge time we run the unmerge kernel on a
copy of the merged rows and compare with the original bits. Because both the merge and the unmerge kernels sum
in float32 and round once, the mismatches are rare (elements whose merged value crossed a power of two, or
rounding ties), so the record is a short list of (index, original value) pairs — a few hundred bytes to a few
KB for a 4096×4096 layer with a typical adapter (docs/reliability.md has measurements). If a chunk has many
mismatches (an adapter whose delta dwarfs W), that chunk's original rows are kept whole instead; the record never
exceeds one copy of W.

The merge works through W in row chunks of at most _CHUNK_BYTES so its temporary memory stays small, and it is
atomic: if a merged chunk holds NaN/Inf where W did not (the delta overflowed, or the adapter holds NaN/Inf), the
chunks merged so far are restored from their records and a ValueError is raised with W exactly as it was.
"""
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch

from . import ops

# Rows are merged in chunks of about this many bytes of W: bounds the two temporary copies a chunk needs.
_CHUNK_BYTES = 16 << 20
# A chunk with more mismatches than this fraction of its elements keeps its original rows whole: a sparse entry
# costs an int64 index plus the value, so past ~1/5 of the elements the dense copy is smaller.
_DENSE_FRACTION = 0.2

_BITS_DTYPE = {
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float32: torch.int32,
    torch.float64: torch.int64,
}


@dataclass
class _ChunkRecord:
    row_start: int
    row_end: int
    flat_indices: Optional[torch.Tensor] = None  # int64 indices into the chunk's flattened rows (sparse form)
    original_values: Optional[torch.Tensor] = None  # W's original values there, or the whole chunk (dense form)

    @property
    def dense(self) -> bool:
        return self.flat_indices is None

    def nbytes(self) -> int:
        tensors = [t for t in (self.flat_indices, self.original_values) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class MergeRecord:
    """What unmerge needs to restore W bit for bit: the per-chunk corrections (merge_with_record adds the
    _MergeIdentity that record_matches checks)."""

    chunks: List[_ChunkRecord] = field(default_factory=list)

    def nbytes(self) -> int:
        """Memory the record holds (bytes)."""
        return sum(chunk.nbytes() for chunk in self.chunks)

    def corrected_elements(self) -> int:
        return sum(c.original_values.numel() for c in self.chunks if c.original_values is not None)


def _empty_like_aligned(t: torch.Tensor) -> torch.Tensor:
    """An uninitialised contiguous tensor like t whose address has the same alignment modulo 256 bytes, so the
    kernels pick the same (vectorised or not) code path for it as for t and round the same way."""
    element = t.element_size()
    misalignment = (t.data_ptr() % 256) // element
    storage = torch.empty(t.numel() + 256 // element, dtype=t.dtype, device=t.device)
    shift = (misalignment - storage.data_ptr() % 256 // element) % (256 // element)
    return storage[shift:shift + t.numel()].view(t.shape)


def _row_chunks(weight: torch.Tensor):
    rows = weight.shape[0]
    row_bytes = max(1, weight.shape[1] * weight.element_size())
    step = max(1, _CHUNK_BYTES // row_bytes)
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def _restore_chunk(weight_rows: torch.Tensor, chunk: _ChunkRecord) -> None:
    if chunk.dense:
        weight_rows.copy_(chunk.original_values)
    elif chunk.flat_indices.numel():
        weight_rows.view(-1).index_copy_(0, chunk.flat_indices, chunk.original_values)


def _check_mergeable(weight: torch.Tensor) -> None:
    if weight.dtype not in _BITS_DTYPE:
        raise TypeError(f"merge: the weight must be float16, bfloat16, float32 or float64, got {weight.dtype}")
    if not weight.is_contiguous():
        raise ValueError("merge: the weight must be contiguous for an exact merge")


@torch.no_grad()
def chunked_merge_with_record(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                              scaling: float) -> MergeRecord:
    """weight += scaling·B·A in place (lora_ext's merge kernel), returning the record that makes unmerge exact.

    Raises ValueError, with weight unchanged, if the merged weight would hold NaN/Inf where the original did not."""
    _check_mergeable(weight)
    bits = _BITS_DTYPE[weight.dtype]
    record = MergeRecord()
    for start, end in _row_chunks(weight):
        rows = weight[start:end]
        original = rows.clone()
        ops.merge_(rows, lora_A, lora_B[start:end], scaling)
        # Predict what unmerge will give, on a copy aligned like the rows (same kernel path, same rounding).
        predicted = _empty_like_aligned(rows)
        predicted.copy_(rows)
        ops.unmerge_(predicted, lora_A, lora_B[start:end], scaling)
        mismatch = predicted.view(bits) != original.view(bits)
        became_non_finite = ~torch.isfinite(rows) & torch.isfinite(original)
        del predicted
        flat_indices = torch.nonzero(mismatch.view(-1)).view(-1)
        if bool(became_non_finite.any()):
            rows.copy_(original)
            chunked_unmerge_with_record(weight, lora_A, lora_B, scaling, record)
            raise ValueError(
                "merge: the merged weight would hold NaN or Inf (the adapter holds NaN/Inf, or scaling·B·A "
                f"overflows {weight.dtype}); the weight was left unchanged"
            )
        if flat_indices.numel() > _DENSE_FRACTION * rows.numel():
            record.chunks.append(_ChunkRecord(start, end, None, original))
        else:
            record.chunks.append(_ChunkRecord(start, end, flat_indices, original.view(-1)[flat_indices]))
    return record


@torch.no_grad()
def chunked_unmerge_with_record(
    weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, record: MergeRecord
) -> None:
    """Undo chunked_merge_with_record: weight -= scaling·B·A, then put back the elements the record says would be off,
    for the chunks the record covers (all of them after a completed merge)."""
    for chunk in record.chunks:
        rows = weight[chunk.row_start:chunk.row_end]
        if not chunk.dense:  # a dense chunk holds the original rows whole: no kernel needed
            ops.unmerge_(rows, lora_A, lora_B[chunk.row_start:chunk.row_end], scaling)
        _restore_chunk(rows, chunk)


# ---------------------------------------------------------------------------------------------------------------
# One-pass exact merge (lora_ext::merge_exact_: csrc/cuda/merge_exact.cu, csrc/cpu/merge_exact_cpu.cpp; the
# buffers' layouts are in csrc/merge_exact_layout.h). Used wherever the operator has a kernel for W's device.
# Per merge: one fill (the zeroed state), one kernel, one host sync (reading the state's 3-word header: how many
# entries, whether anything became NaN/Inf); a second launch only when the record outgrew its capacity. Per
# unmerge: one kernel (it puts the record back itself); reading whether the adapter changed is the caller's
# choice (adapter_changed_while_merged: one sync).

_TILE_ROWS, _TILE_COLS = 32, 256  # csrc/merge_exact_layout.h: the record's unit, one CUDA block each
_STATE_HEADER = 3  # [entries reserved, entries written, flags], then one word per tile
_BECAME_NON_FINITE, _DELTA_NON_FINITE, _ADAPTER_CHANGED = 1, 2, 4
# One record entry: (tile-local index, original bits) packed in an integer twice W's width.
_ENTRY_DTYPE = {torch.float16: torch.int32, torch.bfloat16: torch.int32, torch.float32: torch.int64}
# Default record capacity, as a fraction of W's elements: typical adapters need 0.3–6% (README); a record that
# ends up under half of its buffer is copied into one of its own size, so the fraction costs memory only briefly.
_CAPACITY_FRACTION = 1 / 16


class NonFiniteAdapterError(ValueError):
    """merge refused, W unchanged: lora_A or lora_B (tensor_name) holds NaN or Inf."""

    def __init__(self, tensor_name: str):
        super().__init__(f"merge: {tensor_name} holds NaN or Inf; the weight was left unchanged")
        self.tensor_name = tensor_name


def _raise_if_adapter_non_finite(lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
    for name, tensor in (("lora_A", lora_A), ("lora_B", lora_B)):
        if not bool(torch.isfinite(tensor).all()):
            raise NonFiniteAdapterError(name)


@dataclass
class FusedMergeRecord:
    entries: torch.Tensor  # (tile-local index << width) | original bits, per element a plain unmerge misses
    state: torch.Tensor  # the merge's state: flags, then where each tile's entries start and how many there are
    adapter: torch.Tensor  # lora_A and lora_B as merged, flattened one after the other
    scaling: float = 0.0  # the merge's scaling: the unmerge must subtract the same delta
    weight_shape: Tuple[int, ...] = ()  # W's shape at merge: the record's tile words index into it

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.entries, self.state, self.adapter))

    def corrected_elements(self) -> int:
        return self.entries.numel()


def _tiles(weight: torch.Tensor) -> int:
    return -(-weight.shape[0] // _TILE_ROWS) * -(-weight.shape[1] // _TILE_COLS)


def _fused_merge(weight, lora_A, lora_B, scaling, capacity: Optional[int] = None) -> FusedMergeRecord:
    """weight += scaling·B·A in one pass, returning what unmerge needs to restore W bit for bit. One host sync
    (the state's header); a second launch only when the record outgrew `capacity` (default: 1/16 of W's
    elements), for just the tiles that did not fit. NonFiniteAdapterError (a ValueError), W unchanged, when the
    adapter holds NaN/Inf; ValueError, W unchanged, when the merged weight would hold NaN/Inf where W did not."""
    _check_mergeable(weight)
    if weight.dtype == torch.float64:
        raise TypeError("fused exact merge: float64 weights are exact with lora_ext.ops.merge_ already")
    device = weight.device
    state = torch.zeros(_STATE_HEADER + _tiles(weight), dtype=torch.int64, device=device)
    adapter = torch.empty(lora_A.numel() + lora_B.numel(), dtype=lora_A.dtype, device=device)
    capacity = max(1024, int(weight.numel() * _CAPACITY_FRACTION)) if capacity is None else capacity
    entries = torch.empty(capacity, dtype=_ENTRY_DTYPE[weight.dtype], device=device)
    torch.ops.lora_ext.merge_exact_(weight, lora_A, lora_B, scaling, False, entries, state, adapter)
    reserved, written, flags = state[:_STATE_HEADER].tolist()  # the host sync
    if written < reserved:
        # The tiles that did not fit are still original. The entries written form a prefix, so a record of
        # exactly `reserved` entries holds them and the rest: copy, restart the counter there, relaunch.
        grown = torch.empty(reserved, dtype=entries.dtype, device=device)
        grown[:written].copy_(entries[:written])
        state[0] = written
        torch.ops.lora_ext.merge_exact_(weight, lora_A, lora_B, scaling, False, grown, state, adapter)
        entries = grown
    elif written < entries.numel() // 2:
        entries = entries[:written].clone()  # don't hold on to a mostly empty buffer
    else:
        entries = entries[:written]
    record = FusedMergeRecord(entries, state, adapter, float(scaling), tuple(weight.shape))
    if flags & (_BECAME_NON_FINITE | _DELTA_NON_FINITE):  # rare: find out why, with W still merged
        try:
            _raise_if_adapter_non_finite(lora_A, lora_B)
            if flags & _BECAME_NON_FINITE:
                raise ValueError(
                    "merge: the merged weight would hold NaN or Inf (the adapter holds NaN/Inf, or scaling·B·A "
                    f"overflows {weight.dtype}); the weight was left unchanged"
                )
        except ValueError:
            _fused_unmerge(weight, lora_A, lora_B, scaling, record)
            raise
        # Otherwise s·B·A overflowed only where W already held NaN/Inf: nothing became non-finite; merged.
    return record


def _fused_unmerge(weight, lora_A, lora_B, scaling, record: FusedMergeRecord) -> None:
    """Undo fused_merge_with_record: W -= scaling·B·A with the same arithmetic and the adapter as it was merged
    (record.adapter), then the recorded elements put back, all in one kernel. No host sync. The kernel trusts the
    record's tile words, so a record is only ever applied to the weight, shape and scaling it was made for."""
    if tuple(weight.shape) != record.weight_shape or float(scaling) != record.scaling:
        raise ValueError(
            f"unmerge: this merge record was made for a weight of shape {record.weight_shape} and scaling "
            f"{record.scaling}, not {tuple(weight.shape)} and {float(scaling)}; the weight was left unchanged"
        )
    torch.ops.lora_ext.merge_exact_(weight, lora_A, lora_B, scaling, True, record.entries, record.state,
                                    record.adapter)


# The public entry points; LoRALinear.merge/unmerge, already under no_grad, call the cores directly (each
# no_grad decorator costs a few µs of host time, and a merge/unmerge pair on a GPU is bound by host time).
fused_merge_with_record = torch.no_grad()(_fused_merge)
fused_unmerge_with_record = torch.no_grad()(_fused_unmerge)


def adapter_changed_while_merged(record) -> bool:
    """After unmerge_with_record: whether lora_A or lora_B differed from the adapter as merged (an edit through
    .data, which version counters do not see). Reads one flag the fused unmerge kernel set (a host sync)."""
    if isinstance(record, FusedMergeRecord):
        return bool(int(record.state[2]) & _ADAPTER_CHANGED)
    return bool(record.identity.adapter_changed)


def _weight_key(weight: torch.Tensor) -> tuple:
    return (weight.dtype, weight.device, weight.data_ptr(), tuple(weight.shape), tuple(weight.stride()))


def _adapter_copy(lora_A: torch.Tensor, lora_B: torch.Tensor) -> torch.Tensor:
    return torch.cat((lora_A.detach().reshape(-1), lora_B.detach().reshape(-1)))


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    bits = _BITS_DTYPE[a.dtype]
    return torch.equal(a.contiguous().view(bits), b.contiguous().view(bits))


@dataclass
class _MergeIdentity:
    """What must not change between merge and unmerge for the record to apply: W's dtype, device, storage and
    layout (a model moved or converted while merged), and the adapter's scaling and version counters (checked on
    the host). Edits through .data are caught against the adapter as merged: by the fused unmerge kernel, or, for
    the chunked path, against `adapter`, a copy taken at merge."""

    weight_key: tuple
    scaling: float
    versions: Tuple[int, int]
    adapter: Optional[torch.Tensor] = None
    adapter_changed: bool = False


def record_matches(record, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> bool:
    """Whether unmerge_with_record(weight, lora_A, lora_B, scaling, record) restores W bit for bit. Host-side
    checks only; an edit through .data is reported after the unmerge by adapter_changed_while_merged (the
    unmerge subtracts the adapter as merged, so W comes back exactly either way)."""
    identity = getattr(record, "identity", None)
    if identity is None or identity.weight_key != _weight_key(weight) or identity.scaling != float(scaling):
        return False
    return identity.versions == (lora_A._version, lora_B._version)


_HAS_FUSED_KERNEL = {}  # device type -> whether lora_ext::merge_exact_ has a kernel there (fixed once loaded)


def _fused_available(weight: torch.Tensor) -> bool:
    if weight.dtype not in _ENTRY_DTYPE or weight.numel() == 0:
        return False
    device_type = weight.device.type
    available = _HAS_FUSED_KERNEL.get(device_type)
    if available is None:
        available = torch._C._dispatch_has_kernel_for_dispatch_key("lora_ext::merge_exact_", device_type.upper())
        _HAS_FUSED_KERNEL[device_type] = available
    return available


def merge_with_record(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float):
    """weight += scaling·B·A in place, returning what unmerge_with_record needs to restore W bit for bit: the
    one-pass operator where W's device has it, else the chunked path. NonFiniteAdapterError (a ValueError) when
    the adapter holds NaN/Inf, ValueError when the merged weight would; W unchanged in both cases."""
    if torch.is_grad_enabled():  # a direct call (LoRALinear.merge runs under no_grad already)
        with torch.no_grad():
            return merge_with_record(weight, lora_A, lora_B, scaling)
    _check_mergeable(weight)
    identity = _MergeIdentity(_weight_key(weight), float(scaling), (lora_A._version, lora_B._version))
    if _fused_available(weight):
        record = _fused_merge(weight, lora_A, lora_B, scaling)
    else:
        _raise_if_adapter_non_finite(lora_A, lora_B)
        identity.adapter = _adapter_copy(lora_A, lora_B)
        record = chunked_merge_with_record(weight, lora_A, lora_B, scaling)
    record.identity = identity
    return record


def unmerge_with_record(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                        record) -> None:
    """Undo merge_with_record, bit for bit, with the path that made the record and the adapter as it was merged
    (adapter_changed_while_merged(record) then says whether lora_A/lora_B differ from it)."""
    if torch.is_grad_enabled():  # a direct call (LoRALinear.unmerge runs under no_grad already)
        with torch.no_grad():
            return unmerge_with_record(weight, lora_A, lora_B, scaling, record)
    if isinstance(record, FusedMergeRecord):
        _fused_unmerge(weight, lora_A, lora_B, scaling, record)
        return
    identity = getattr(record, "identity", None)
    if identity is not None and identity.adapter is not None:
        merged_A = identity.adapter[:lora_A.numel()].view(lora_A.shape)
        merged_B = identity.adapter[lora_A.numel():].view(lora_B.shape)
        identity.adapter_changed = not (_same_bits(merged_A, lora_A) and _same_bits(merged_B, lora_B))
        lora_A, lora_B = merged_A, merged_B
    chunked_unmerge_with_record(weight, lora_A, lora_B, scaling, record)
