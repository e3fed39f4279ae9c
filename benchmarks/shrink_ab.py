"""The Hopper shrink (csrc/cuda/lora_shrink_sm90.cu) against the other shrinks, in one process (GPU only):

    python benchmarks/shrink_ab.py 8192,4096,2048        # ROUNDS=5 by default

Training steps of LoRALinear (4096², bf16; r = 16 and 64, with and without dropout 0.05) with LORA_EXT_SHRINK_SM90
unset ("auto": where it pays) and =0 (never), toggled call by call: do_bench medians of interleaved rounds as ratios to
the frozen base layer's step, then each setting's GPU time per step by kernel (torch.profiler, 10 steps). A diagnostic
for docs/perf-notes.md v21, not a benchmark of record.
"""
import json
import os
import statistics
import sys

import torch
from torch.profiler import ProfilerActivity, profile

import lora_ext

dt = torch.bfloat16
W = 4096


def setting(v):
    if v == "auto":
        os.environ.pop("LORA_EXT_SHRINK_SM90", None)
    else:
        os.environ["LORA_EXT_SHRINK_SM90"] = v


cases = [("r16", 16, 0.0), ("r64", 64, 0.0), ("r16_drop", 16, 0.05), ("r64_drop", 64, 0.05)]


def measure(tokens):
    from triton.testing import do_bench

    x = torch.randn(tokens, W, device="cuda", dtype=dt, requires_grad=True)
    dy = torch.randn(tokens, W, device="cuda", dtype=dt)
    base = torch.nn.Linear(W, W, device="cuda", dtype=dt).requires_grad_(False)
    def step(m):
        def c():
            m(x).backward(dy)
            x.grad = None
            for p in m.parameters():
                p.grad = None
        return c
    calls = {"base_step": (step(base), None)}
    layers = {}
    for name, r, p in cases:
        layer = lora_ext.LoRALinear.from_linear(base, r=r, alpha=2 * r, dropout=p)
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.02)
        layers[name] = layer
        for v in ("0", "auto"):
            calls[f"{name}_step_sm90={v}"] = (step(layer), v)
    times = {k: [] for k in calls}
    for _ in range(int(os.environ.get("ROUNDS", "5"))):
        for k, (c, v) in calls.items():
            setting(v or "0")
            times[k].append(do_bench(c, return_mode="median"))
    med = {k: statistics.median(t) for k, t in times.items()}
    out = {k: round(med[k] / med["base_step"], 4) for k in calls if k != "base_step"}
    print(json.dumps({"tokens": tokens, "base_step_ms": round(med["base_step"], 4), "ratios": out}), flush=True)
    for name, r, p in cases:
        for v in ("0", "auto"):
            setting(v)
            c = step(layers[name])
            for _ in range(3): c()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(10): c()
                torch.cuda.synchronize()
            ks = {}
            for e in prof.events():
                if e.device_type == torch.autograd.DeviceType.CUDA:
                    ks.setdefault(e.name[:60], []).append(e.device_time_total)
            total = sum(sum(v_) for v_ in ks.values()) / 10
            top = sorted(((sum(v_) / 10, n, len(v_) // 10) for n, v_ in ks.items()), reverse=True)
            print(f"  tokens={tokens} {name} sm90={v}: GPU {total:.1f} us/step, {sum(n for _,_,n in top)} kernels: " +
                  "; ".join(f"{t:.1f}x{c_} {n[:48]}" for t, n, c_ in top if t > 2.0), flush=True)


if __name__ == "__main__":
    for tokens in [int(t) for t in (sys.argv[1] if len(sys.argv) > 1 else "8192").split(",")]:
        measure(tokens)
