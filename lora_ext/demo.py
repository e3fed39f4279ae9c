"""The main example: fit a LoRALinear to a low-rank change of its frozen base layer, on random data.

    python -m lora_ext.demo [--device cpu|cuda] [--steps 200]

A frozen linear layer W is given a hidden rank-4 change ΔW; LoRALinear (rank 8) learns it from
(x, x·(W+ΔW)ᵀ) pairs. The loss falls from the size of ΔW towards zero, and the script says which
kernels ran (CPU or CUDA) and checks that merge() gives the same outputs as the unmerged layer.
"""
import argparse
import time

import torch

import lora_ext


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--features", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not lora_ext.cuda_kernels_available():
        raise SystemExit("this lora_ext build has no CUDA kernels (it was built without CUDA); use --device cpu")
    torch.manual_seed(args.seed)
    features = args.features

    base = torch.nn.Linear(features, features, device=device)
    hidden_change = 0.05 * torch.randn(features, 4, device=device) @ torch.randn(4, features, device=device)
    target_weight = base.weight.detach() + hidden_change

    layer = lora_ext.LoRALinear.from_linear(base, r=8, alpha=16)
    trainable = sum(p.numel() for p in layer.parameters() if p.requires_grad)
    total = sum(p.numel() for p in layer.parameters())
    kernels = "CUDA" if device.type == "cuda" else "CPU"
    print(f"lora_ext {lora_ext.__version__}: {kernels} kernels on {device} "
          f"(CUDA kernels built: {lora_ext.cuda_kernels_available()})")
    print(f"trainable parameters: {trainable:,} of {total:,} ({100.0 * trainable / total:.2f}%)")

    optimizer = torch.optim.Adam([layer.lora_A, layer.lora_B], lr=1e-2)
    start = time.perf_counter()
    for step in range(args.steps + 1):
        x = torch.randn(256, features, device=device)
        target = torch.nn.functional.linear(x, target_weight, base.bias.detach())
        loss = torch.nn.functional.mse_loss(layer(x), target)
        if step % max(1, args.steps // 10) == 0:
            print(f"step {step:4d}  loss {loss.item():.6f}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    elapsed = time.perf_counter() - start
    print(f"{args.steps} training steps in {elapsed:.2f} s")

    layer.eval()
    x = torch.randn(64, features, device=device)
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge()
        merged = layer(x)
        layer.unmerge()
    difference = (merged - unmerged).abs().max().item()
    print(f"merged vs unmerged output: max abs difference {difference:.2e}")
    if difference > 1e-4:
        raise SystemExit("merge() changed the layer's outputs beyond float32 rounding")


if __name__ == "__main__":
    main()
