"""Where the time goes, per kernel, for the benchmark rows that miss their targets (GPU only).

    python benchmarks/kernel_breakdown.py [--cases fwd_bwd_r4,merge,...]

For each case: a few warm-up calls, then torch.profiler over --iters calls; prints the host (CPU) time per call
and each CUDA kernel's time per call, largest first. A diagnostic for docs/perf-notes.md, not a benchmark:
profiler overhead inflates the host time, so take ratios from bench_lora.py.
"""
import argparse
from collections import OrderedDict

import torch
import torch.nn as nn
from torch.profiler import ProfilerActivity, profile

import lora_ext


def training_step(rank, tokens=8192, width=4096, dropout=0.0, out=None):
    out = out or width
    layer = lora_ext.LoRALinear(width, out, r=rank, alpha=2 * rank, dropout=dropout, device="cuda",
                                dtype=torch.bfloat16)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.01)
    x = torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(tokens, out, device="cuda", dtype=torch.bfloat16)

    params = [p for p in layer.parameters() if p.requires_grad]

    def step():  # gradients cleared as bench_lora.py does, so no accumulation kernels are counted
        layer(x).backward(dy)
        x.grad = None
        for p in params:
            p.grad = None
    return step


def forward_only(rank, tokens, width=4096):
    layer = lora_ext.LoRALinear(width, width, r=rank, alpha=2 * rank, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.01)
    x = torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16)

    @torch.no_grad()
    def step():
        layer(x)
    return step


def merge_pair(width=4096, rank=16):
    layer = lora_ext.LoRALinear(width, width, r=rank, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.01)

    def step():
        layer.merge()
        layer.unmerge()
    return step


def multi_adapter(sequences, tokens, loaded, used, width=4096, rank=16, by_names=False):
    base = nn.Linear(width, width, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    model = nn.Sequential(OrderedDict(proj=base))  # a model whose layer is named "proj", as the benchmarks use
    names = [f"task{i}" for i in range(loaded)]
    for name in names:
        lora_ext.inject(model, ["proj"], r=rank, alpha=2 * rank, adapter_name=name)
    with torch.no_grad():
        for adapter in model.proj.adapters.values():
            adapter.lora_B.normal_(0, 0.01)
    model.eval()
    batch = [names[i % used] for i in range(sequences)]
    ids = lora_ext.adapter_slot_ids(model, batch)
    x = torch.randn(sequences, tokens, width, device="cuda", dtype=torch.bfloat16)

    @torch.no_grad()
    def step():
        with lora_ext.mixed_adapters(model, batch if by_names else ids):  # names: mapped and copied per call
            model(x)
    return step


CASES = {
    "fwd_bwd_r4": lambda: training_step(4),
    "fwd_bwd_r16": lambda: training_step(16),
    "fwd_bwd_r16_dropout": lambda: training_step(16, dropout=0.05),
    "fwd_bwd_out11008": lambda: training_step(16, out=11008),
    "fwd_bwd_r32": lambda: training_step(32),
    "fwd_bwd_r64": lambda: training_step(64),
    "fwd_bwd_r128": lambda: training_step(128),
    "fwd_r16": lambda: forward_only(16, 8192),
    "decode_1": lambda: forward_only(16, 1),
    "merge": merge_pair,
    "multi_prefill_8": lambda: multi_adapter(8, 512, 8, 8),
    "multi_decode_32of64": lambda: multi_adapter(32, 1, 64, 32),
    "multi_decode_4_names": lambda: multi_adapter(32, 1, 4, 4, by_names=True),
}


def profiled(step, iters, warmup=5):
    """torch.profiler's per-op averages over `iters` calls of step after `warmup` calls, and among them the CUDA
    kernels, largest GPU time first. Also used by fused_gemm_ab.py."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    kernels = [e for e in events if e.device_time_total > 0 and e.device_type == torch.autograd.DeviceType.CUDA]
    kernels.sort(key=lambda e: -e.device_time_total)
    return events, kernels


def breakdown(name, make, iters, top):
    events, kernels = profiled(make(), iters)
    gpu_us = sum(e.device_time_total for e in kernels) / iters
    print(f"== {name}: GPU {gpu_us:.1f} us/call over {sum(e.count for e in kernels) / iters:.1f} kernels")
    for e in kernels[:top]:
        print(f"   {e.device_time_total / iters:8.1f} us  x{e.count / iters:4.1f}  {e.key[:110]}")
    host = sorted((e for e in events if e.cpu_time_total > 0 and e.key.startswith(("aten::", "lora_ext::",
                                                                                   "cuda"))),
                  key=lambda e: -e.self_cpu_time_total)[:6]
    print("   host self time: " + ", ".join(f"{e.key} {e.self_cpu_time_total / iters:.0f}us" for e in host))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--top", type=int, default=8)
    args = parser.parse_args()
    for name in args.cases.split(","):
        torch.manual_seed(0)
        breakdown(name, CASES[name], args.iters, args.top)


if __name__ == "__main__":
    main()
