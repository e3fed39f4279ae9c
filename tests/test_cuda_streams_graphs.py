"""The CUDA kernels on a non-default stream and inside a CUDA graph capture (issue 6).

Every launch must go to torch's current stream (never the legacy default stream), and nothing on the
forward/backward path may synchronise with the host or allocate outside the caching allocator, or graph
capture fails. Results are compared bit for bit with the same calls on the default stream, which are
themselves checked against the float64 reference elsewhere (test_ops.py, test_fuzz.py).
"""
import os

import pytest
import torch

import lora_ext
from conftest import assert_bit_identical, assert_rel_close, lora_reference, requires_cuda

pytestmark = requires_cuda

# Graph capture needs torch's caching allocator (tests/sanitize.sh turns it off so that memcheck sees every
# allocation on its own; under it a capture fails in cudaMalloc, before reaching our code).
requires_caching_allocator = pytest.mark.skipif(
    os.environ.get("PYTORCH_NO_CUDA_MEMORY_CACHING", "0") == "1",
    reason="CUDA graph capture needs the caching allocator (PYTORCH_NO_CUDA_MEMORY_CACHING=1 is set)",
)

TOKENS, IN_F, OUT_F, RANK = 300, 136, 72, 12  # odd tiles, several blocks per kernel


def _layer(dtype, dropout=0.0, adapter_dtype=None):
    layer = lora_ext.LoRALinear(IN_F, OUT_F, r=RANK, alpha=2 * RANK, dropout=dropout, device="cuda", dtype=dtype,
                                adapter_dtype=adapter_dtype)
    with torch.no_grad():
        layer.lora_B.normal_()  # B starts at zero: make the adapter path count
    return layer


def _step(layer, x, grad_y):
    """One forward + backward; returns y and the gradients of x, A and B."""
    for p in (layer.lora_A, layer.lora_B):
        p.grad = None
    x = x.detach().requires_grad_(True)
    y = layer(x)
    y.backward(grad_y)
    return y.detach(), x.grad, layer.lora_A.grad.clone(), layer.lora_B.grad.clone()


@pytest.mark.parametrize("adapter_dtype", [None, torch.float32], ids=["adapters_bf16", "adapters_f32"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_side_stream_matches_default_stream(dropout, adapter_dtype):
    layer = _layer(torch.bfloat16, dropout, adapter_dtype)
    x = torch.randn(TOKENS, IN_F, device="cuda", dtype=torch.bfloat16)
    grad_y = torch.randn(TOKENS, OUT_F, device="cuda", dtype=torch.bfloat16)

    torch.manual_seed(7)
    expected = _step(layer, x, grad_y)
    torch.cuda.synchronize()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.manual_seed(7)  # the same dropout seed
        got = _step(layer, x, grad_y)
        # merge / unmerge on the side stream too: W must come back bit for bit
        weight_before = layer.weight.detach().clone()
        layer.merge()
        layer.eval()  # a merged layer serves inference only
        merged_y = layer(x).detach()
        layer.train()
        layer.unmerge()
        weight_after = layer.weight.detach().clone()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()

    for name, a, b in zip(("y", "grad_x", "grad_A", "grad_B"), got, expected):
        assert_bit_identical(a, b, name)
    assert_bit_identical(weight_after, weight_before, "weight after merge/unmerge on a side stream")
    if dropout == 0.0:
        assert_rel_close(merged_y, expected[0], torch.bfloat16, name="merged forward on a side stream")


@requires_caching_allocator
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
def test_training_step_in_cuda_graph(dtype):
    """A whole training step (forward, backward, SGD update of A and B) captured once and replayed on fresh
    inputs gives the results of the same steps run eagerly (to the dtype's tolerance: cuBLAS may pick another
    algorithm under capture for the frozen base GEMM)."""
    torch.manual_seed(0)
    eager = _layer(dtype)
    graphed = _layer(dtype)
    graphed.load_state_dict(eager.state_dict())
    opt_eager = torch.optim.SGD(eager.parameters(), lr=0.05)
    opt_graphed = torch.optim.SGD(graphed.parameters(), lr=0.05)
    inputs = [torch.randn(TOKENS, IN_F, device="cuda", dtype=dtype) for _ in range(4)]
    targets = [torch.randn(TOKENS, OUT_F, device="cuda", dtype=dtype) for _ in range(4)]

    def step(layer, opt, x, target):
        opt.zero_grad(set_to_none=False)
        loss = (layer(x).float() - target.float()).square().mean()
        loss.backward()
        opt.step()
        return loss.detach()

    inputs_state = {k: v.clone() for k, v in eager.state_dict().items()}
    static_x = inputs[0].clone()
    static_target = targets[0].clone()
    # Warm up on a side stream (as torch.cuda.graphs recommends), so the capture sees allocated .grad buffers.
    # The warm-up steps change the parameters: run the same ones eagerly.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step(graphed, opt_graphed, static_x, static_target)
    torch.cuda.current_stream().wait_stream(side)
    for _ in range(2):
        step(eager, opt_eager, inputs[0], targets[0])

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step(graphed, opt_graphed, static_x, static_target)

    for x, target in zip(inputs[1:], targets[1:]):
        static_x.copy_(x)
        static_target.copy_(target)
        graph.replay()
        expected_loss = step(eager, opt_eager, x, target)
        assert_rel_close(static_loss, expected_loss.double(), dtype, name="loss of a replayed step")
    torch.cuda.synchronize()
    for name in ("adapters.default.lora_A", "adapters.default.lora_B"):
        changed = (graphed.state_dict()[name] - inputs_state[name]).double()
        assert changed.abs().max() > 0, f"{name}: the replayed steps did not update it"
        assert_rel_close(graphed.state_dict()[name], eager.state_dict()[name].double(), dtype, name=name)


@requires_caching_allocator
def test_dropout_in_cuda_graph_draws_fresh_masks_and_matches_reference():
    """With dropout, each replay of a captured forward draws a new mask (the seed comes from torch's
    generator, which advances its graph-safe offset per replay), and each replay's output is the LoRA formula
    for the mask that the replay's seed gives."""
    layer = _layer(torch.float32, dropout=0.3)
    x = torch.randn(TOKENS, IN_F, device="cuda")
    static_seed = lora_ext.ops.new_dropout_seed("cuda")

    def forward():
        seed = lora_ext.ops.new_dropout_seed("cuda")
        static_seed.copy_(seed)
        return lora_ext.ops.lora_linear(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling,
                                        layer.lora_dropout, seed)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        forward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = forward()

    seeds, outputs = [], []
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        seeds.append(static_seed.item())
        outputs.append(static_y.clone())
    assert len(set(seeds)) == 3, f"replays reused a dropout seed: {seeds}"
    for seed, y in zip(seeds, outputs):
        keep = lora_ext.ops.dropout_keep_mask(torch.tensor([seed], device="cuda"), TOKENS, IN_F, layer.lora_dropout)
        ref = lora_reference(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling,
                             layer.lora_dropout, keep)
        assert_rel_close(y, ref["y"], torch.float32, name=f"graph replay output (seed {seed})")
