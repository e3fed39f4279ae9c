"""What each kernel of one LoRA training step waits on, beside cuBLAS's GEMM of the same shape (GPU only).

    ncu --clock-control none --profile-from-start off --csv --page raw \
        --metrics $(python3 benchmarks/ncu_step.py --print-metrics) python3 benchmarks/ncu_step.py > raw.csv
    python3 benchmarks/ncu_step.py --summarise raw.csv

    ncu --clock-control none --profile-from-start off -k regex:lora_gemm_sm90 -c 1 \
        --section SourceCounters --section WarpStateStats -o gemm python3 benchmarks/ncu_step.py
    ncu --import gemm.ncu-rep --page source --csv --print-source sass > gemm_source.csv
    python3 benchmarks/ncu_step.py --hot-lines gemm_source.csv

(-k regex:lora_dy_pass for the backward's one-pass dy kernel, and so on.)

The profiled program runs a warm training step of LoRALinear (8192 tokens, 4096², r = 16, bf16; --tokens, --features,
--rank and --dropout change it) and then the frozen
base layer's forward GEMM (cuBLAS), between cudaProfilerStart and Stop, so only those kernels are profiled.
--summarise prints, per kernel: time, SM clock, DRAM and tensor-pipe use, and the stall reasons that cost most cycles
per issued instruction; --hot-lines the SASS lines with the most warp-stall samples. Run it from outside the
repository's root (e.g. /tmp) so that the installed lora_ext is imported. A diagnostic for docs/perf-notes.md, not a
benchmark.
"""
import argparse
import csv
import sys

STALL_REASONS = ["long_scoreboard", "barrier", "membar", "short_scoreboard", "wait", "math_pipe_throttle",
                 "mio_throttle", "lg_throttle", "not_selected", "selected", "dispatch_stall", "drain", "sleeping",
                 "no_instruction", "branch_resolving", "imc_miss", "tex_throttle", "misc"]
NCU_METRICS = ",".join(
    ["gpu__time_duration.sum", "sm__cycles_elapsed.avg.per_second", "dram__throughput.avg.pct_of_peak_sustained_elapsed",
     "dram__bytes_read.sum", "dram__bytes_write.sum", "sm__inst_executed.sum",
     "sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_elapsed",
     "sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_elapsed",
     "sm__warps_active.avg.pct_of_peak_sustained_active", "lts__t_sectors_srcunit_tex_op_read.sum",
     "smsp__average_warp_latency_per_inst_issued.ratio"]
    + [f"smsp__average_warps_issue_stalled_{reason}_per_issue_active.ratio" for reason in STALL_REASONS])


def run_step(tokens, features, rank, dropout=0.0):
    import torch

    import lora_ext

    torch.manual_seed(0)
    layer = lora_ext.LoRALinear(features, features, r=rank, alpha=2 * rank, dropout=dropout, device="cuda",
                                dtype=torch.bfloat16)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.01)
    x = torch.randn(tokens, features, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad_y = torch.randn(tokens, features, device="cuda", dtype=torch.bfloat16)
    params = [p for p in layer.parameters() if p.requires_grad]

    def step():
        layer(x).backward(grad_y)
        x.grad = None
        for p in params:
            p.grad = None

    for _ in range(3):
        step()
        torch.nn.functional.linear(x.detach(), layer.weight, layer.bias)
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    step()
    torch.nn.functional.linear(x.detach(), layer.weight, layer.bias)  # cuBLAS's forward GEMM, for comparison
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


def number(text):
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return float("nan")


def summarise(path):
    with open(path, newline="") as handle:
        lines = [line for line in handle if line.startswith('"')]  # ncu's CSV rows; drops the program's output
    rows = list(csv.reader(lines))
    header, units, kernels = rows[0], rows[1], rows[2:]
    column = {name: i for i, name in enumerate(header)}

    def value(row, metric):
        return number(row[column[metric]]) if metric in column else float("nan")

    for row in kernels:
        name = row[column["Kernel Name"]][:90]
        time_us = value(row, "gpu__time_duration.sum") / 1000
        clock_ghz = value(row, "sm__cycles_elapsed.avg.per_second") / 1e9
        read_mb = value(row, "dram__bytes_read.sum") / 2**20
        write_mb = value(row, "dram__bytes_write.sum") / 2**20
        print(f"{name}\n  {time_us:8.1f} us  SM {clock_ghz:.2f} GHz  DRAM {value(row, 'dram__throughput.avg.pct_of_peak_sustained_elapsed'):5.1f}% "
              f"(read {read_mb:.0f} MB, write {write_mb:.0f} MB)  gmma {value(row, 'sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_elapsed'):5.1f}% "
              f"hmma {value(row, 'sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_elapsed'):5.1f}%  "
              f"warps active {value(row, 'sm__warps_active.avg.pct_of_peak_sustained_active'):5.1f}%  "
              f"inst {value(row, 'sm__inst_executed.sum') / 1e6:.1f} M  L2 reads {value(row, 'lts__t_sectors_srcunit_tex_op_read.sum') / 1e6:.1f} M sectors")
        stalls = sorted(((value(row, f"smsp__average_warps_issue_stalled_{r}_per_issue_active.ratio"), r)
                         for r in STALL_REASONS), reverse=True)
        print("  cycles per issue " + f"{value(row, 'smsp__average_warp_latency_per_inst_issued.ratio'):.1f}; stalls: "
              + ", ".join(f"{r} {v:.2f}" for v, r in stalls[:6]))


def hot_lines(path, count=40):
    """The SASS lines with the most warp-stall samples, from `ncu --import R --page source --csv --print-source sass`,
    after the stall reasons summed over all lines. ncu 2025+ puts a "Kernel Name" line before the column names."""
    with open(path, newline="") as handle:
        rows = list(csv.reader(line for line in handle if line.startswith('"')))
    header_at = next(i for i, row in enumerate(rows) if "Source" in (name.strip() for name in row))
    header = rows[header_at]
    samples = next(i for i, name in enumerate(header) if "Sampling" in name and "All" in name)
    source = next(i for i, name in enumerate(header) if name.strip() == "Source")
    body = [row for row in rows[header_at + 1:] if len(row) == len(header)]
    total = sum(number(row[samples]) for row in body) or 1.0
    reasons = [i for i, name in enumerate(header) if name.startswith("stall_") and "Not Issued" not in name]
    by_reason = sorted(((sum(number(row[i]) for row in body), header[i]) for i in reasons), reverse=True)
    print(f"{total:.0f} samples; " + ", ".join(f"{name} {100 * value / total:.1f}%" for value, name in by_reason[:8]))
    for row in sorted(body, key=lambda r: -number(r[samples]))[:count]:
        top = sorted(((number(row[i]), header[i]) for i in reasons), reverse=True)[:2]
        print(f"{100 * number(row[samples]) / total:5.1f}%  {row[source][:70]:70s}  "
              + " ".join(f"{name} {value:.0f}" for value, name in top if value > 0))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--summarise", metavar="CSV")
    parser.add_argument("--hot-lines", metavar="CSV")
    parser.add_argument("--print-metrics", action="store_true", help="print the --metrics list for ncu")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--features", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dropout", type=float, default=0.0)
    args = parser.parse_args()
    if args.print_metrics:
        print(NCU_METRICS)
    elif args.hot_lines:
        hot_lines(args.hot_lines)
    elif args.summarise:
        summarise(args.summarise)
    else:
        run_step(args.tokens, args.features, args.rank, args.dropout)


if __name__ == "__main__":
    sys.exit(main())
