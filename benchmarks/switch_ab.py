"""Training steps of LoRALinear under the settings of one environment switch, toggled call by call in one process
(GPU only; the switches are read per call):

    python benchmarks/switch_ab.py LORA_EXT_TOKEN_REDUCE_SM90 --values 0,auto --tokens 8192,4096 --dropout 0.05
    python benchmarks/switch_ab.py LORA_EXT_SHRINK_SM90 --values 0,auto --dropout 0,0.05
    python benchmarks/switch_ab.py - --values auto,LORA_EXT_SHRINK_SM90=1+LORA_EXT_CUBLAS_MIN_RANK=1000 --ranks 64

4096², bf16, one layer per (rank, dropout) case. Prints, per token count, do_bench medians of interleaved rounds
(ROUNDS=5 by default) as ratios to the frozen base layer's step, as JSON, then each setting's GPU time per step by
kernel (torch.profiler, 10 steps). "auto" means the switch unset; a value of the form A=1+B=0 sets several switches
(the others named anywhere in --values unset). A diagnostic for docs/perf-notes.md, not a
benchmark of record.
"""
import argparse
import json
import os
import re
import statistics

import torch
from torch.profiler import ProfilerActivity, profile

import lora_ext

DTYPE = torch.bfloat16
WIDTH = 4096


def assignments(switch, value):
    """A setting's environment: 'auto' = nothing set, 'V' = switch=V, or 'A=1+B=0' for several switches."""
    if value == "auto":
        return {}
    if "=" not in value:
        return {switch: value}
    return dict(part.split("=", 1) for part in value.split("+"))


def apply_setting(switch, value, every_value):
    for name in {name for v in every_value for name in assignments(switch, v)} | {switch}:
        os.environ.pop(name, None)
    os.environ.update(assignments(switch, value))


def training_step(module, x, dy):
    def call():
        module(x).backward(dy)
        x.grad = None
        for p in module.parameters():
            p.grad = None
    return call


def kernel_times(call, steps=10):
    for _ in range(3):
        call()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            call()
        torch.cuda.synchronize()
    per_kernel = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            # Without the namespaces every kernel of ours shares, so that the names tell the kernels apart.
            name = re.sub(r"^void |lora_ext::cuda::|\(anonymous namespace\)::", "", event.name)
            per_kernel.setdefault(name[:60], []).append(event.device_time_total)
    total = sum(sum(v) for v in per_kernel.values()) / steps
    top = sorted(((sum(v) / steps, name, len(v) // steps) for name, v in per_kernel.items()), reverse=True)
    return total, sum(n for _, _, n in top), top


def measure(args, tokens):
    from triton.testing import do_bench

    x = torch.randn(tokens, WIDTH, device="cuda", dtype=DTYPE, requires_grad=True)
    dy = torch.randn(tokens, WIDTH, device="cuda", dtype=DTYPE)
    base = torch.nn.Linear(WIDTH, WIDTH, device="cuda", dtype=DTYPE).requires_grad_(False)
    values = args.values.split(",")
    calls = {"base": (training_step(base, x, dy), values[0])}
    cases = []
    for rank in (int(r) for r in args.ranks.split(",")):
        for p in (float(v) for v in args.dropout.split(",")):
            layer = lora_ext.LoRALinear.from_linear(base, r=rank, alpha=2 * rank, dropout=p)
            with torch.no_grad():
                layer.lora_B.normal_(0, 0.02)
            name = f"r{rank}" + (f"_drop{p:g}" if p > 0 else "")
            cases.append((name, layer))
            for value in values:
                calls[f"{name} {value}"] = (training_step(layer, x, dy), value)
    times = {key: [] for key in calls}
    for _ in range(int(os.environ.get("ROUNDS", "5"))):
        for key, (call, value) in calls.items():
            apply_setting(args.switch, value, values)
            times[key].append(do_bench(call, return_mode="median"))
    medians = {key: statistics.median(t) for key, t in times.items()}
    ratios = {key: round(medians[key] / medians["base"], 4) for key in calls if key != "base"}
    print(json.dumps({"switch": args.switch, "tokens": tokens, "base_step_ms": round(medians["base"], 4),
                      "ratios": ratios}), flush=True)
    for name, layer in cases:
        for value in values:
            apply_setting(args.switch, value, values)
            total, count, top = kernel_times(training_step(layer, x, dy))
            print(f"  tokens={tokens} {name} {args.switch}={value}: GPU {total:.1f} us/step, {count} kernels: " +
                  "; ".join(f"{t:.1f}x{n} {k[:48]}" for t, k, n in top if t > 2.0), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("switch", help="the environment variable to toggle, e.g. LORA_EXT_SHRINK_SM90 ('-' with A=1+B=0 values)")
    parser.add_argument("--values", default="0,auto", help="comma-separated settings; 'auto' = unset")
    parser.add_argument("--tokens", default="8192")
    parser.add_argument("--ranks", default="16,64")
    parser.add_argument("--dropout", default="0", help="comma-separated dropout probabilities")
    args = parser.parse_args()
    for tokens in (int(t) for t in args.tokens.split(",")):
        measure(args, tokens)


if __name__ == "__main__":
    main()
