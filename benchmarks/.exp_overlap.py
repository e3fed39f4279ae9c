import os, sys, statistics
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch, torch.nn as nn
from kernel_breakdown import training_step, forward_only, profiled
from triton.testing import do_bench

def base_step(tokens=8192, width=4096, out=None):
    out = out or width
    lin = nn.Linear(width, out, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    x = torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(tokens, out, device="cuda", dtype=torch.bfloat16)
    def step():
        lin(x).backward(dy); x.grad = None
    return step

cases = {"r16": lambda: training_step(16), "out11008": lambda: training_step(16, out=11008),
         "fwd_r16": lambda: forward_only(16, 8192), "base": base_step, "base11008": lambda: base_step(out=11008)}
res = {}
for rnd in range(4):
    for name, make in cases.items():
        order = ["1", "0"] if rnd % 2 == 0 else ["0", "1"]  # alternate which goes first (clocks drift under load)
        for setting in (order if not name.startswith("base") else ["-"]):
            os.environ["LORA_EXT_GEMM_OVERLAP"] = setting if setting != "-" else "1"
            step = make()
            events, kernels = profiled(step, 20)
            gemm = [e.device_time_total / 20 for e in kernels if "lora_gemm_sm90" in e.key or "nvjet" in e.key or "gemm" in e.key.lower()]
            total = sum(e.device_time_total for e in kernels) / 20
            wall = do_bench(step, warmup=25, rep=200, return_mode="median") * 1000
            res.setdefault((name, setting), []).append((total, sorted(gemm, reverse=True)[:2], wall))
for (name, setting), runs in res.items():
    tot = statistics.median(r[0] for r in runs); wall = statistics.median(r[2] for r in runs)
    g = [statistics.median(r[1][i] for r in runs if len(r[1]) > i) for i in range(len(runs[0][1]))]
    print(f"{name:12s} overlap={setting}  GPU {tot:7.1f} us  wall {wall:7.1f} us  top GEMMs " + " ".join(f"{v:6.1f}" for v in g))
