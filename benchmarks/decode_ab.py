"""A decoding path against the path it replaces, side by side in one process (GPU only):

    python benchmarks/decode_ab.py [--tokens 1,4,9,16] [--shapes 4096x4096x16,4096x11008x16] [--flag VAR]

Per shape (in × out × r, bf16, with bias) and token count: the frozen base layer (nn.Linear module), and lora_ext's
LoRALinear with a path switch on (VAR=1) and off (VAR=0). The switch is LORA_EXT_DECODE_GEMV by default (the
one-launch path of csrc/cuda/lora_decode_gemv.cuh against cuBLAS then the decode kernel); LORA_EXT_DECODE_CLUSTER
compares single-adapter decoding on the multi-adapter cluster kernel (csrc/cuda/one_adapter_decode.h) against
lora_decode.cuh's kernel or the general shrink and expand. Eager under no_grad and replayed from a CUDA graph
(GPU-bound: no host time between calls), each as a ratio to the base in the same mode; medians of triton's do_bench in
interleaved rounds, random data. Then torch.profiler's GPU time per call for each path (kernel_breakdown.profiled).
A diagnostic for docs/perf-notes.md; bench_lora.py is the benchmark of record.
"""
import argparse
import os
import statistics

import torch
from triton.testing import do_bench

import lora_ext
from kernel_breakdown import profiled  # this folder is the script's own, first on sys.path: import it
from bench_multi_adapter import graphed  # before bench_multi_adapter, which takes the folder off sys.path


def with_path(flag, enabled, function):
    def call():
        os.environ[flag] = "1" if enabled else "0"
        return function()
    return call


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", default="1,4,9,16")
    parser.add_argument("--shapes", default="4096x4096x16,4096x11008x16,4096x4096x64")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--flag", default="LORA_EXT_DECODE_GEMV", help="the environment switch of the path compared")
    args = parser.parse_args()
    flag = args.flag
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, switch {flag}")
    dt = torch.bfloat16
    for spec in args.shapes.split(","):
        width_in, width_out, rank = (int(v) for v in spec.split("x"))
        base = torch.nn.Linear(width_in, width_out, device="cuda", dtype=dt).requires_grad_(False)
        layer = lora_ext.LoRALinear.from_linear(base, r=rank, alpha=2 * rank).eval()
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.02)
        for tokens in (int(t) for t in args.tokens.split(",")):
            x = torch.randn(tokens, width_in, device="cuda", dtype=dt)
            with torch.no_grad():
                eager = {"base": lambda: base(x), "on": with_path(flag, True, lambda: layer(x)),
                         "off": with_path(flag, False, lambda: layer(x))}
                graphs = {"base": graphed(eager["base"])}
                for name in ("on", "off"):
                    os.environ[flag] = "1" if name == "on" else "0"
                    graphs[name] = graphed(lambda: layer(x))
                times = {f"{mode} {name}": [] for mode in ("eager", "graph") for name in eager}
                for _ in range(args.rounds):
                    for name in eager:
                        times[f"eager {name}"].append(do_bench(eager[name], return_mode="median"))
                        times[f"graph {name}"].append(do_bench(graphs[name], return_mode="median"))
                med = {key: statistics.median(v) * 1e3 for key, v in times.items()}
                line = f"{tokens:3d} tok {width_in}x{width_out} r{rank}:"
                for mode in ("eager", "graph"):
                    b = med[f"{mode} base"]
                    line += (f"  {mode} base {b:6.1f} us, on {med[f'{mode} on'] / b:.3f}x, "
                             f"off {med[f'{mode} off'] / b:.3f}x")
                print(line)
                gpu = []
                for name in eager:
                    _, kernels = profiled(eager[name], 50)
                    gpu.append(f"{name} {sum(e.device_time_total for e in kernels) / 50:.1f}")
                print("      GPU us/call: " + ", ".join(gpu))
    os.environ.pop(flag, None)


if __name__ == "__main__":
    main()
