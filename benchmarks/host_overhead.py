"""Host time per call of each layer of the decoding path, peeled one Python layer at a time (GPU or CPU).

    python benchmarks/host_overhead.py [--width 64] [--tokens 1] [--calls 5000]

A decoding-sized call is host-bound: the GPU finishes each kernel before the host has queued the next. On a
tiny shape (width 64) the kernels take ~2 µs, so wall time per call is the host's cost of issuing it. Each row
peels one layer: the nn.Module call, LoRALinear.forward's checks, lora_ext.ops.lora_linear, the raw operator.
A diagnostic for docs/perf-notes.md; bench_lora.py gives the ratios.
"""
import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import lora_ext


def per_call_us(fn, calls, device):
    for _ in range(50):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=1)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--calls", type=int, default=5000)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    base = nn.Linear(args.width, args.width, device=device, dtype=dtype).requires_grad_(False)
    layer = lora_ext.LoRALinear.from_linear(nn.Linear(args.width, args.width, device=device, dtype=dtype),
                                            r=args.rank, alpha=2 * args.rank)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.01)
    layer.eval()
    x = torch.randn(args.tokens, args.width, device=device, dtype=dtype)
    weight, bias, lora_A, lora_B, scaling = layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling
    rows = {
        "F.linear": lambda: F.linear(x, weight, bias),
        "nn.Linear module": lambda: base(x),
        "torch.ops.lora_ext.lora_forward": lambda: torch.ops.lora_ext.lora_forward(x, weight, bias, lora_A, lora_B,
                                                                                   scaling, 0.0, None),
        "lora_ext.ops.lora_linear": lambda: lora_ext.ops.lora_linear(x, weight, bias, lora_A, lora_B, scaling),
        "LoRALinear.forward": lambda: layer.forward(x),
        "LoRALinear module": lambda: layer(x),
    }
    # Mixed-adapter decoding (issue 8): 32 rows of one token each, 4 or 64 adapters loaded, all named in the batch.
    for loaded in (4, 64):
        mixed = lora_ext.LoRALinear.from_linear(nn.Linear(args.width, args.width, device=device, dtype=dtype),
                                                r=args.rank, adapter_name="task0")
        for i in range(1, loaded):
            mixed.add_adapter(f"task{i}", r=args.rank)
        mixed.eval()
        names = [f"task{i % loaded}" for i in range(32)]
        ids = lora_ext.adapter_slot_ids(mixed, names)
        x_rows = torch.randn(32, 1, args.width, device=device, dtype=dtype)

        def by_ids(mixed=mixed, ids=ids, x_rows=x_rows):
            with lora_ext.mixed_adapters(mixed, ids):
                return mixed(x_rows)

        def by_names(mixed=mixed, names=names, x_rows=x_rows):
            with lora_ext.mixed_adapters(mixed, names):
                return mixed(x_rows)
        rows[f"mixed 32 rows, {loaded} loaded, ids"] = by_ids
        rows[f"mixed 32 rows, {loaded} loaded, names"] = by_names
    print(f"device {device} | width {args.width} | tokens {args.tokens} | r {args.rank} | torch {torch.__version__}")
    with torch.no_grad():
        for name, fn in rows.items():
            print(f"  no_grad        {name:34s} {per_call_us(fn, args.calls, device):7.1f} µs/call")
    with torch.inference_mode():
        for name in ("nn.Linear module", "LoRALinear module"):
            print(f"  inference_mode {name:34s} {per_call_us(rows[name], args.calls, device):7.1f} µs/call")


if __name__ == "__main__":
    main()
