"""Training steps (forward + backward; --forward: forward calls under no_grad) of LoRALinear at several ranks, as
ratios to the frozen base layer's step in the same process, for A/Bs between processes that differ in one environment switch (GPU only):

    LORA_EXT_CUBLAS_MIN_RANK=32 python benchmarks/rank_ab.py --ranks 24,32,48 --label cublas32 >> ab.jsonl
    python benchmarks/rank_ab.py --summarize ab.jsonl

bf16, in = out = 4096 unless --shape, 8192 tokens unless --tokens; do_bench medians (L2 flushed before each call) in
interleaved rounds; each line of output is one process's medians as JSON. --summarize prints the median over
processes per label and rank.
"""
import argparse
import json
import statistics
import sys

import torch


def measure(args):
    import lora_ext
    from triton.testing import do_bench

    width_in, width_out = (int(v) for v in args.shape.split("x"))
    dt = torch.bfloat16
    x = torch.randn(args.tokens, width_in, device="cuda", dtype=dt, requires_grad=True)
    dy = torch.randn(args.tokens, width_out, device="cuda", dtype=dt)
    base = torch.nn.Linear(width_in, width_out, device="cuda", dtype=dt).requires_grad_(False)

    def step(module):
        def call():
            if args.forward:
                with torch.no_grad():
                    return module(x)
            y = module(x)
            y.backward(dy)
        return call

    calls = {"base": step(base)}
    for rank in (int(r) for r in args.ranks.split(",")):
        layer = lora_ext.LoRALinear.from_linear(base, r=rank, alpha=2 * rank)
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.02)
        calls[f"r{rank}"] = step(layer)
    times = {name: [] for name in calls}
    for _ in range(args.rounds):
        for name, call in calls.items():
            times[name].append(do_bench(call, return_mode="median"))
    med = {name: statistics.median(v) for name, v in times.items()}
    ratios = {name: med[name] / med["base"] for name in calls if name != "base"}
    print(json.dumps({"label": args.label, "base_ms": med["base"], "ratios": ratios}), flush=True)


def summarize(path):
    by_label = {}
    for line in open(path):
        line = line.strip()
        if not line.startswith("{"):
            continue
        row = json.loads(line)
        for name, ratio in row["ratios"].items():
            by_label.setdefault(row["label"], {}).setdefault(name, []).append(ratio)
    for label, rows in by_label.items():
        cells = ", ".join(f"{name} {statistics.median(v):.3f}x (n={len(v)})" for name, v in rows.items())
        print(f"{label}: {cells}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--ranks", default="24,32,48")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--shape", default="4096x4096")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--label", default="default")
    parser.add_argument("--forward", action="store_true", help="forward calls only (no_grad) instead of training steps")
    parser.add_argument("--summarize", default=None)
    args = parser.parse_args()
    if args.summarize:
        summarize(args.summarize)
        return
    if not torch.cuda.is_available():
        sys.exit("rank_ab.py needs a GPU")
    measure(args)


if __name__ == "__main__":
    main()
