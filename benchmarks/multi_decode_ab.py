"""Issue 8's decoding rows as an A/B between builds or settings (GPU only), for docs/perf-notes.md; the benchmark of
record is bench_multi_adapter.py.

    PYTHONPATH=<build A> python benchmarks/multi_decode_ab.py --label A >> ab.jsonl   # alternate the builds,
    PYTHONPATH=<build B> python benchmarks/multi_decode_ab.py --label B >> ab.jsonl   # several processes each
    python benchmarks/multi_decode_ab.py --summarize ab.jsonl
    python benchmarks/multi_decode_ab.py --label X --flag LORA_EXT_SOME_SWITCH        # a switch read per call

One JSON line per case (32 × 1 token with 4, 32 of 64 and 2 adapters; 64 × 1 token with 64; in = out = 4096, r = 16,
bf16): the frozen base layer and the mixed batch, eager and replayed from a CUDA graph, as ratios to the base in the
same mode; medians of triton's do_bench over interleaved rounds. With --flag VAR, the mixed batch is also timed with
VAR=1 (its own graph captured so), and the largest difference between the two outputs goes to stderr.
"""
import argparse
import collections
import json
import os
import statistics
import sys

CASES = [("4 adapters", 32, 4, 4), ("32 of 64", 32, 64, 32), ("2 adapters", 32, 2, 2), ("64 adapters", 64, 64, 64)]


def summarize(path):
    ratios = collections.defaultdict(list)
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            for mode, ratio in row["ratio"].items():
                ratios[(row["case"], mode, row["label"])].append(ratio)
    for (case, mode, label), values in sorted(ratios.items()):
        print(f"{case:12s} {mode:10s} {label:8s} median {statistics.median(values):.3f}  "
              f"all {' '.join(f'{v:.3f}' for v in values)}")


def measure(label, flag, rounds):
    import torch
    from triton.testing import do_bench

    import lora_ext
    from bench_multi_adapter import build, graphed  # this folder is the script's own, first on sys.path

    print(f"lora_ext from {lora_ext.__file__}", file=sys.stderr)
    settings = [("", "0")] + ([("+flag", "1")] if flag else [])
    for case, sequences, loaded, used in CASES:
        base, ours, _, names = build(loaded, 4096, 16, torch.bfloat16, torch.device("cuda"))
        x = torch.randn(sequences, 1, 4096, device="cuda", dtype=torch.bfloat16)
        ids = lora_ext.adapter_slot_ids(ours, [names[i % used] for i in range(sequences)])

        def mixed(value):
            def call():
                if flag:
                    os.environ[flag] = value
                with lora_ext.mixed_adapters(ours, ids):
                    return ours(x)
            return call

        with torch.no_grad():
            calls = {"base eager": lambda: base(x), "base graph": graphed(lambda: base(x))}
            for suffix, value in settings:
                calls["eager" + suffix] = mixed(value)
                calls["graph" + suffix] = graphed(mixed(value))
            if flag:
                difference = (mixed("1")().float() - mixed("0")().float()).abs().max().item()
                print(f"{case}: |{flag}=1 - {flag}=0| = {difference:.3g}", file=sys.stderr)
            times = {name: [] for name in calls}
            for _ in range(rounds):
                for name, call in calls.items():
                    times[name].append(do_bench(call, warmup=25, rep=100, return_mode="median"))
        us = {name: statistics.median(v) * 1e3 for name, v in times.items()}
        ratio = {name: us[name] / us["base graph" if "graph" in name else "base eager"]
                 for name in us if not name.startswith("base")}
        print(json.dumps({"label": label, "case": case, "us": us, "ratio": ratio}), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", default="run")
    parser.add_argument("--flag", default=None, help="an environment switch read per call: also time it set to 1")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--summarize", default=None, help="print medians per case, mode and label of a JSONL file")
    args = parser.parse_args()
    if args.summarize:
        summarize(args.summarize)
    else:
        measure(args.label, args.flag, args.rounds)


if __name__ == "__main__":
    main()
