"""Issue 8's prefill batches under the settings of one environment switch, toggled call by call in one process (GPU
only; the switch is read per call, and each setting gets its own captured CUDA graph), for docs/perf-notes.md; the
benchmark of record is bench_multi_adapter.py.

    python benchmarks/multi_prefill_ab.py LORA_EXT_PAIR_SLOTS --values 4,8,16
    python benchmarks/multi_prefill_ab.py LORA_EXT_EXPAND_TILES --values 1,2,4
    python benchmarks/multi_prefill_ab.py LORA_EXT_GEMM_RANK_STEPS --values 0,1

4096², r = 16, bf16. Batches: 8 × 512 tokens of 8 adapters, of 8 with 64 loaded, of one; 64 × 64 tokens of 64
adapters (4 per 256 rows); 128 × 32 of 64 (8 per 256 rows); 4096 one-token rows of random adapters among 8 and among
64 (every 256 rows: many adapters). Prints, per batch, one JSON line: the ratio to the frozen base layer of the mixed
batch under each setting, eager and replayed from a graph (do_bench medians of ROUNDS interleaved rounds, 5 by
default); the largest difference between the outputs of the first setting and each other goes to stderr.
"""
import argparse
import json
import os
import statistics
import sys

import torch
from triton.testing import do_bench

import lora_ext
from bench_multi_adapter import build, graphed  # this folder is the script's own, first on sys.path

# (name, sequences, tokens per sequence, adapters loaded, adapters used, ids drawn at random per sequence)
BATCHES = [
    ("8 x 512, 8 adapters", 8, 512, 8, 8, False),
    ("8 x 512, 64 loaded", 8, 512, 64, 8, False),
    ("8 x 512, one adapter", 8, 512, 1, 1, False),
    ("64 x 64, 64 adapters", 64, 64, 64, 64, False),
    ("128 x 32, 64 adapters", 128, 32, 64, 64, False),
    ("4096 x 1, random of 8", 4096, 1, 8, 8, True),
    ("4096 x 1, random of 64", 4096, 1, 64, 64, True),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("switch", help="the environment variable to set per call, e.g. LORA_EXT_PAIR_SLOTS")
    parser.add_argument("--values", required=True, help="comma-separated settings of the switch")
    parser.add_argument("--rounds", type=int, default=int(os.environ.get("ROUNDS", "5")))
    args = parser.parse_args()
    values = args.values.split(",")
    for name, sequences, tokens, loaded, used, shuffle in BATCHES:
        base, ours, _, names = build(loaded, 4096, 16, torch.bfloat16, torch.device("cuda"))
        x = torch.randn(sequences, tokens, 4096, device="cuda", dtype=torch.bfloat16)
        generator = torch.Generator().manual_seed(1)
        order = (torch.randint(0, used, (sequences,), generator=generator).tolist() if shuffle
                 else [i % used for i in range(sequences)])
        ids = lora_ext.adapter_slot_ids(ours, [names[i] for i in order])

        def mixed(value):
            def call():
                os.environ[args.switch] = value
                with lora_ext.mixed_adapters(ours, ids):
                    return ours(x)
            return call

        with torch.no_grad():
            reference = mixed(values[0])().float()
            for value in values[1:]:
                difference = (mixed(value)().float() - reference).abs().max().item()
                print(f"{name}: |{args.switch}={value} - {values[0]}| = {difference:.3g}", file=sys.stderr)
            calls = {"base eager": lambda: base(x), "base graph": graphed(lambda: base(x))}
            for value in values:
                calls[f"eager {value}"] = mixed(value)
                calls[f"graph {value}"] = graphed(mixed(value))
            times = {label: [] for label in calls}
            for _ in range(args.rounds):
                for label, call in calls.items():
                    times[label].append(do_bench(call, warmup=25, rep=100, return_mode="median"))
        os.environ.pop(args.switch, None)
        us = {label: statistics.median(t) * 1e3 for label, t in times.items()}
        ratio = {label: round(us[label] / us["base graph" if "graph" in label else "base eager"], 4)
                 for label in us if not label.startswith("base")}
        print(json.dumps({"batch": name, "base_graph_us": round(us["base graph"], 1), "ratio": ratio}), flush=True)


if __name__ == "__main__":
    main()
