"""The Hopper fused forward GEMM against the path it replaces, side by side in one process (GPU only):

    python benchmarks/fused_gemm_ab.py [--shapes 8192x4096x4096x16,...] [--backward] [--grad-x [--force]]
                                       [--dropout P]

Per shape (tokens × in × out × r, bf16, with bias): the frozen base layer (F.linear), lora_ext's forward with the
fused GEMM (LORA_EXT_FUSED_GEMM=force, below its size cutoff too) and without it (=0: cuBLAS, then our expand
kernel), PEFT's lora.Linear when importable, each as a ratio to the base; medians of triton's do_bench after
warm-up, in interleaved rounds; random data. With --grad-x (implies --backward) the A/B is the backward's dx
instead: both variants leave the forward to its default routing, "fused" computes dx with the GEMM (dy·W + dxa·A)
and "unfused" with cuBLAS + the expand (LORA_EXT_FUSED_GRAD_X=0); --force lifts the size cutoffs of both GEMMs
(LORA_EXT_FUSED_GEMM=force in both variants). --dropout sets the LoRA dropout of lora_ext's layer and PEFT's.
Then torch.profiler's GPU time per kernel for both lora_ext paths (kernel_breakdown.profiled). A diagnostic for docs/perf-notes.md; bench_lora.py
is the benchmark of record.
"""
import argparse
import os
import statistics

import torch
import torch.nn.functional as F
from triton.testing import do_bench

import lora_ext
from kernel_breakdown import profiled  # this folder is the script's own, first on sys.path

DEFAULT_SHAPES = "8192x4096x4096x16,8192x4096x4096x64,8192x4096x11008x16,4096x4096x4096x16,2048x4096x4096x16,1024x4096x4096x16"


GRAD_X_ONLY = False  # set by --grad-x
FORCE = False  # set by --force


def set_fused(enabled):
    if GRAD_X_ONLY:
        if FORCE:
            os.environ["LORA_EXT_FUSED_GEMM"] = "force"
        else:
            os.environ.pop("LORA_EXT_FUSED_GEMM", None)  # the default routing, forward and backward
        os.environ["LORA_EXT_FUSED_GRAD_X"] = "1" if enabled else "0"
    else:
        os.environ["LORA_EXT_FUSED_GEMM"] = "force" if enabled else "0"  # force: below its size cutoff too


def with_fused(enabled, function):
    def call():
        set_fused(enabled)
        return function()
    return call


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default=DEFAULT_SHAPES)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backward", action="store_true", help="time forward + backward (x requires grad)")
    parser.add_argument("--grad-x", action="store_true", help="A/B of the backward's fused dx only")
    parser.add_argument("--force", action="store_true", help="with --grad-x: both GEMMs past their size cutoffs")
    parser.add_argument("--dropout", type=float, default=0.0)
    args = parser.parse_args()
    global GRAD_X_ONLY, FORCE
    GRAD_X_ONLY, FORCE = args.grad_x, args.force
    args.backward = args.backward or args.grad_x
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, sm_90a build: "
          f"{lora_ext.built_with_sm90a()}")
    try:
        from peft.tuners.lora import Linear as PeftLinear
    except ImportError:
        PeftLinear = None
    for spec in args.shapes.split(","):
        tokens, width_in, width_out, rank = (int(v) for v in spec.split("x"))
        dt = torch.bfloat16
        base = torch.nn.Linear(width_in, width_out, device="cuda", dtype=dt).requires_grad_(False)
        layer = lora_ext.LoRALinear.from_linear(base, r=rank, alpha=2 * rank, dropout=args.dropout)
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.02)
        x = torch.randn(tokens, width_in, device="cuda", dtype=dt)
        if args.backward:
            x.requires_grad_(True)
            dy = torch.randn(tokens, width_out, device="cuda", dtype=dt)
            calls = {
                "base": lambda: F.linear(x, base.weight, base.bias).backward(dy),
                "fused": with_fused(True, lambda: layer(x).backward(dy)),
                "unfused": with_fused(False, lambda: layer(x).backward(dy)),
            }
        else:
            calls = {
                "base": lambda: F.linear(x, base.weight, base.bias),
                "fused": with_fused(True, lambda: layer(x)),
                "unfused": with_fused(False, lambda: layer(x)),
            }
        if PeftLinear is not None:
            peft = PeftLinear(torch.nn.Linear(width_in, width_out, device="cuda", dtype=dt).requires_grad_(False),
                              "default", r=rank, lora_alpha=2 * rank, lora_dropout=args.dropout)
            peft.to(device="cuda", dtype=dt)
            calls["peft"] = (lambda: peft(x).backward(dy)) if args.backward else (lambda: peft(x))
        # Rounds of every variant in turn, median per variant: the GPU's clock drifts as it warms up, and
        # back-to-back blocks of one variant would carry that drift into the ratios.
        samples = {name: [] for name in calls}
        with torch.set_grad_enabled(args.backward):
            for _ in range(args.rounds):
                for name, call in calls.items():
                    samples[name].append(do_bench(call, return_mode="median"))
        rows = {name: statistics.median(values) for name, values in samples.items()}
        outputs = []
        for enabled in (True, False):
            set_fused(enabled)
            torch.manual_seed(0)  # the same dropout seed for both variants
            if args.backward:
                x.grad = None
                layer(x).backward(dy)
                outputs.append(x.grad.clone())
            else:
                with torch.no_grad():
                    outputs.append(layer(x))
        fused_out, unfused_out = outputs  # y, or dx with --backward
        diff = ((fused_out.float() - unfused_out.float()).norm() / unfused_out.float().norm()).item()
        ratios = "  ".join(f"{k} {v / rows['base']:.3f}x" for k, v in rows.items() if k != "base")
        compared = "dx" if args.backward else "y"
        print(f"{spec}: base {rows['base'] * 1e3:.1f} us  {ratios}  (fused vs unfused {compared} rel diff {diff:.1e})")
        for label in ("fused", "unfused"):
            with torch.set_grad_enabled(args.backward):
                _, kernels = profiled(calls[label], iters=20, warmup=3)
            print(f"    {label}: " + "; ".join(f"{e.key[:70]} {e.device_time_total / 20:.1f}" for e in kernels[:8]))
    os.environ.pop("LORA_EXT_FUSED_GEMM", None)
    os.environ.pop("LORA_EXT_FUSED_GRAD_X", None)


if __name__ == "__main__":
    main()
