"""A warm, steady-state LoRA training step for Nsight Systems.

    nsys profile --capture-range=cudaProfilerApi -t cuda,nvtx -o lora python benchmarks/profile.py

Builds one LoRALinear (bf16, in=out=4096, r=16, dropout 0.05), warms it up outside the capture, then runs
--steps forward+backward steps between torch.cuda.profiler.start() and stop(), each inside an NVTX range
"train_step", so the report holds only steady-state work.
"""
import os
import sys

# This folder holds profile.py, which would shadow the standard library's `profile` module that
# transformers (imported by PEFT) loads: keep the script's own folder off the import path.
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse

import torch

import lora_ext


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--features", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--what", choices=["train", "merge"], default="train",
                        help="a training step (forward+backward), or merge()+unmerge() of the layer")
    args = parser.parse_args()
    if not (torch.cuda.is_available() and lora_ext.cuda_kernels_available()):
        raise SystemExit("profile.py needs a GPU and a CUDA build of lora_ext")

    torch.manual_seed(0)
    layer = lora_ext.LoRALinear(args.features, args.features, r=args.rank, alpha=2 * args.rank,
                                dropout=args.dropout, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.01)
    x = torch.randn(args.tokens, args.features, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad_y = torch.randn(args.tokens, args.features, device="cuda", dtype=torch.bfloat16)

    def train_step():
        layer(x).backward(grad_y)
        x.grad = None
        layer.lora_A.grad = None
        layer.lora_B.grad = None

    def merge_step():
        layer.merge()
        layer.unmerge()

    step = train_step if args.what == "train" else merge_step

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for _ in range(args.steps):
        torch.cuda.nvtx.range_push(args.what)
        step()
        torch.cuda.nvtx.range_pop()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    print(f"profiled {args.steps} steps of {args.what}")


if __name__ == "__main__":
    main()
