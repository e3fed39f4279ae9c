"""Programmatic dependent launch of the training step's kernels (csrc/cuda/dependent_launch.h): each of our kernels in
the forward (shrink → fused GEMM) and the backward (dy pass → finalize → dA reduction → finalize → fused dx GEMM) may
be scheduled before the kernel ahead of it has finished, and waits for it before touching memory. Launched so or as
plain stream successors (LORA_EXT_PDL=0), a step gives the same bits, eagerly and replayed from a CUDA graph, with and
without dropout."""

import pytest
import torch

import lora_ext
from conftest import assert_bit_identical, requires_cuda

pytestmark = requires_cuda


def _step_outputs(layer, x, dy):
    x = x.clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    y = layer(x)
    y.backward(dy)
    return [y.detach(), x.grad, layer.lora_A.grad.clone(), layer.lora_B.grad.clone()]


@pytest.mark.parametrize("rank", [16, 64])
@pytest.mark.parametrize("dropout", [0.0, 0.05])
def test_step_same_bits_with_and_without_dependent_launch(rank, dropout, monkeypatch):
    # 8192 tokens, 2048 → 4096 features (tokens · in · out = 2^36, where the operators ask for dependent launches):
    # the fused forward GEMM, the one-pass dy kernel (r = 16), the dA reduction and the fused dx GEMM on Hopper.
    torch.manual_seed(0)
    layer = lora_ext.LoRALinear(2048, 4096, r=rank, alpha=2 * rank, dropout=dropout, device="cuda",
                                dtype=torch.bfloat16)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.05)
    x = torch.randn(8192, 2048, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(8192, 4096, device="cuda", dtype=torch.bfloat16)
    names = ("y", "dx", "dA", "dB")
    runs = {}
    for setting in ("1", "0"):
        monkeypatch.setenv("LORA_EXT_PDL", setting)
        torch.manual_seed(1)  # the same dropout seeds for both settings
        runs[setting] = [_step_outputs(layer, x, dy) for _ in range(2)]
    # Call i of one setting against call i of the other (with dropout, the two calls of a setting draw different
    # masks); without dropout, the two calls of a setting agree too.
    for i in range(2):
        for name, a, b in zip(names, runs["1"][i], runs["0"][i]):
            assert_bit_identical(a, b, f"{name}, call {i}")
    if dropout == 0.0:
        for name, a, b in zip(names, runs["1"][0], runs["1"][1]):
            assert_bit_identical(a, b, f"{name}, two calls")


def test_graph_replay_matches_eager_with_dependent_launch(monkeypatch):
    monkeypatch.delenv("LORA_EXT_PDL", raising=False)
    torch.manual_seed(0)
    layer = lora_ext.LoRALinear(2048, 4096, r=16, alpha=32, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.05)
    static_x = torch.randn(8192, 2048, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    static_dy = torch.randn(8192, 4096, device="cuda", dtype=torch.bfloat16)
    eager = _step_outputs(layer, static_x.detach(), static_dy)

    def step():
        y = layer(static_x)
        y.backward(static_dy)
        return y

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            static_x.grad = None
            layer.zero_grad(set_to_none=False)
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    static_x.grad = None
    layer.zero_grad(set_to_none=False)
    with torch.cuda.graph(graph):
        static_y = step()
    for _ in range(2):
        static_x.grad.zero_()
        layer.lora_A.grad.zero_()
        layer.lora_B.grad.zero_()
        graph.replay()
    torch.cuda.synchronize()
    replayed = [static_y, static_x.grad, layer.lora_A.grad, layer.lora_B.grad]
    for name, a, b in zip(("y", "dx", "dA", "dB"), eager, replayed):
        assert_bit_identical(a, b, name)
