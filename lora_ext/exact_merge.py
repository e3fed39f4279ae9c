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
    """What unmerge needs to restore W bit for bit: the per-chunk corrections and a fingerprint of the
    adapter (tensor version counters and the scaling) so that an adapter edited while merged is detected."""

    chunks: List[_ChunkRecord] = field(default_factory=list)
    adapter_versions: Tuple[int, int] = (0, 0)
    scaling: float = 0.0

    def nbytes(self) -> int:
        """Memory the record holds (bytes)."""
        return sum(chunk.nbytes() for chunk in self.chunks)

    def corrected_elements(self) -> int:
        return sum(c.original_values.numel() for c in self.chunks if c.original_values is not None)

    def matches(self, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> bool:
        return self.adapter_versions == (lora_A._version, lora_B._version) and self.scaling == scaling


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
    record = MergeRecord(adapter_versions=(lora_A._version, lora_B._version), scaling=float(scaling))
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
# One-pass exact merge (lora_ext::merge_exact_, csrc/cpu/merge_exact_cpu.cpp; a CUDA kernel for it is on branch
# wip/fused-exact-merge, not yet run on a GPU). Used wherever the operator has a kernel for W's device: the CPU
# today. On the CPU (4096², float32, r = 16, 2 cores) it takes 1.5× W.clone() per merge or unmerge against the
# chunked path's 2.0× (docs/perf-notes.md).

_TILE_ROWS, _TILE_COLS = 16, 256  # csrc/*/merge_exact*: one block per 16 × 256 tile of W


@dataclass
class FusedMergeRecord:
    flat_indices: torch.Tensor  # int64 flat indices into W
    original_bits: torch.Tensor  # W's original values there, as integers of W's width
    adapter_versions: Tuple[int, int] = (0, 0)
    scaling: float = 0.0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.flat_indices, self.original_bits))

    def corrected_elements(self) -> int:
        return self.flat_indices.numel()

    def matches(self, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> bool:
        return self.adapter_versions == (lora_A._version, lora_B._version) and self.scaling == scaling


def _merge_exact_launch(weight, lora_A, lora_B, scaling, subtract, capacity, tile_done, state):
    bits = _BITS_DTYPE[weight.dtype]
    index = torch.empty(capacity, dtype=torch.int64, device=weight.device)
    values = torch.empty(capacity, dtype=bits, device=weight.device)
    torch.ops.lora_ext.merge_exact_(weight, lora_A, lora_B, scaling, subtract, index, values, state, tile_done)
    return index, values


@torch.no_grad()
def fused_merge_with_record(weight, lora_A, lora_B, scaling, capacity: Optional[int] = None) -> FusedMergeRecord:
    """weight += scaling·B·A in one pass, returning what unmerge needs to restore W bit for bit. One host sync
    (reading how many elements were recorded); a second launch only when the record outgrew `capacity`
    (default: 1/16 of W's elements), for just the tiles that did not fit. ValueError, W unchanged, when the merged
    weight would hold NaN/Inf where W did not."""
    _check_mergeable(weight)
    if weight.dtype == torch.float64:
        raise TypeError("fused exact merge: float64 weights are exact with lora_ext.ops.merge_ already")
    out_features, in_features = weight.shape
    tiles = -(-out_features // _TILE_ROWS) * -(-in_features // _TILE_COLS)
    tile_done = torch.zeros(tiles, dtype=torch.uint8, device=weight.device)
    capacity = max(1024, weight.numel() // 16) if capacity is None else capacity
    indices, values = [], []
    non_finite = False
    while True:
        state = torch.tensor([0, -1, 0], dtype=torch.int64, device=weight.device)
        index, bits = _merge_exact_launch(weight, lora_A, lora_B, scaling, False, capacity, tile_done, state)
        reserved, first_failed, became_non_finite = state.tolist()  # the host sync
        non_finite |= bool(became_non_finite)
        valid = reserved if first_failed < 0 else first_failed
        indices.append(index[:valid].clone())
        values.append(bits[:valid].clone())
        if first_failed < 0:
            break
        capacity = reserved - first_failed  # exactly what the tiles left undone need
    record = FusedMergeRecord(torch.cat(indices), torch.cat(values), (lora_A._version, lora_B._version),
                              float(scaling))
    if non_finite:
        fused_unmerge_with_record(weight, lora_A, lora_B, scaling, record)
        raise ValueError(
            "merge: the merged weight would hold NaN or Inf (the adapter holds NaN/Inf, or scaling·B·A "
            f"overflows {weight.dtype}); the weight was left unchanged"
        )
    return record


@torch.no_grad()
def fused_unmerge_with_record(weight, lora_A, lora_B, scaling, record: FusedMergeRecord) -> None:
    """Undo fused_merge_with_record: W -= scaling·B·A with the same arithmetic, then the recorded elements."""
    empty_state = torch.zeros(3, dtype=torch.int64, device=weight.device)
    tiles = -(-weight.shape[0] // _TILE_ROWS) * -(-weight.shape[1] // _TILE_COLS)
    tile_done = torch.zeros(tiles, dtype=torch.uint8, device=weight.device)
    _merge_exact_launch(weight, lora_A, lora_B, scaling, True, 0, tile_done, empty_state)
    if record.flat_indices.numel():
        weight.view(-1).view(_BITS_DTYPE[weight.dtype]).index_copy_(0, record.flat_indices, record.original_bits)


def _weight_key(weight: torch.Tensor) -> tuple:
    return (weight.dtype, weight.device, weight.data_ptr(), tuple(weight.shape), tuple(weight.stride()))


def _fingerprint(lora_A: torch.Tensor, lora_B: torch.Tensor) -> torch.Tensor:
    """Two int64 checksums of each adapter tensor's bits (a plain and a position-weighted sum, computed on the
    device): an edit through .data, which version counters do not see, changes them."""
    sums = []
    for t in (lora_A, lora_B):
        bits = t.detach().contiguous().view(-1).view(_BITS_DTYPE[t.dtype]).to(torch.int64)
        weights = torch.arange(bits.numel(), device=bits.device, dtype=torch.int64) % 65521 + 1
        sums += [bits.sum(), (bits * weights).sum()]
    return torch.stack(sums)


@dataclass
class _MergeIdentity:
    """What must not change between merge and unmerge for the record to apply: W's dtype, device, storage and
    layout (a model moved or converted while merged), and the adapter (scaling, version counters, checksums)."""

    weight_key: tuple
    scaling: float
    versions: Tuple[int, int]
    fingerprint: torch.Tensor


def record_matches(record, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> bool:
    """Whether unmerge_with_record(weight, lora_A, lora_B, scaling, record) restores W bit for bit."""
    identity = getattr(record, "identity", None)
    if identity is None or identity.weight_key != _weight_key(weight) or identity.scaling != float(scaling):
        return False
    if identity.versions != (lora_A._version, lora_B._version):
        return False
    return identity.fingerprint.device == lora_A.device and torch.equal(identity.fingerprint,
                                                                        _fingerprint(lora_A, lora_B))


def _fused_available(weight: torch.Tensor) -> bool:
    return weight.dtype in (torch.float32, torch.float16, torch.bfloat16) and torch._C._dispatch_has_kernel_for_dispatch_key(
        "lora_ext::merge_exact_", weight.device.type.upper()
    )


def merge_with_record(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float):
    """weight += scaling·B·A in place, returning what unmerge_with_record needs to restore W bit for bit: the
    one-pass operator where W's device has it, else the chunked path. ValueError, W unchanged, on NaN/Inf."""
    _check_mergeable(weight)
    identity = _MergeIdentity(_weight_key(weight), float(scaling), (lora_A._version, lora_B._version),
                              _fingerprint(lora_A, lora_B))
    if _fused_available(weight):
        record = fused_merge_with_record(weight, lora_A, lora_B, scaling)
    else:
        record = chunked_merge_with_record(weight, lora_A, lora_B, scaling)
    record.identity = identity
    return record


def unmerge_with_record(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                        record) -> None:
    """Undo merge_with_record, bit for bit, with the path that made the record."""
    if isinstance(record, FusedMergeRecord):
        fused_unmerge_with_record(weight, lora_A, lora_B, scaling, record)
    else:
        chunked_unmerge_with_record(weight, lora_A, lora_B, scaling, record)
