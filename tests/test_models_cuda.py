"""The model-level API (issue 4) on the GPU: inject into transformers models built from a config, PEFT-format
files in both directions against the real `peft` package, adapter switching, bit-exact merge/unmerge,
merge_and_unload, torch.compile of an injected model, autocast, and CUDA graph capture of a training step.
The CPU versions of these checks (and the bad-file table) are in test_models.py, test_peft_compat.py,
test_adapter_files.py and test_model_features.py."""
import copy

import pytest
import torch
from torch import nn

import lora_ext
from conftest import assert_bit_identical, assert_rel_close, requires_cuda

pytestmark = requires_cuda
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
    return transformers.LlamaForCausalLM(cfg).to("cuda", dtype).eval()


def randomize_adapters(model, std=0.05):
    """B starts at zero: give every adapter random values so that it changes the output."""
    with torch.no_grad():
        for _, layer in lora_ext.lora_layers(model):
            for adapter in layer.adapters.values():
                adapter.lora_B.normal_(std=std)


def token_ids(batch=3, length=17, vocab=256):
    return torch.randint(0, vocab, (batch, length), device="cuda", generator=torch.Generator("cuda").manual_seed(3))


@torch.no_grad()
def logits(model, ids):
    return model(ids).logits.float()


def linear_weights(model):
    return {name: m.weight.detach().clone() for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def test_adapter_files_round_trip_with_peft_on_cuda(tmp_path):
    ids = token_ids()
    ours = lora_ext.inject(tiny_llama(), LLAMA_ALL, r=8, alpha=16)
    randomize_adapters(ours)
    expected = logits(ours, ids)
    lora_ext.save_adapter(ours, tmp_path / "ours")

    # lora_ext -> PEFT: PEFT's model on the same base weights gives the same logits.
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "ours")).to("cuda").eval()
    torch.testing.assert_close(logits(theirs, ids), expected, rtol=1e-4, atol=1e-5)

    # PEFT -> lora_ext: PEFT saves, lora_ext loads into a fresh model: the same logits again.
    theirs.save_pretrained(str(tmp_path / "theirs"))
    reloaded = lora_ext.load_adapter(tiny_llama(), tmp_path / "theirs")
    assert {type(m) for _, m in lora_ext.lora_layers(reloaded)} == {lora_ext.LoRALinear}
    torch.testing.assert_close(logits(reloaded, ids), expected, rtol=1e-4, atol=1e-5)


def test_switch_disable_merge_unmerge_and_unload_bf16():
    ids = token_ids()
    model = tiny_llama(torch.bfloat16)
    base_logits = logits(model, ids)
    lora_ext.inject(model, ["q_proj", "v_proj"], r=8, alpha=16)
    lora_ext.inject(model, LLAMA_ALL, r=16, alpha=16, adapter_name="task2")
    randomize_adapters(model)
    default_logits = logits(model, ids)
    lora_ext.set_adapter(model, "task2")
    task2_logits = logits(model, ids)
    assert not torch.equal(default_logits, task2_logits), "switching adapters changed nothing"
    assert not torch.equal(task2_logits, base_logits), "the adapter changed nothing"

    with lora_ext.disable_adapters(model):
        assert_bit_identical(logits(model, ids), base_logits, "logits with adapters disabled")
    assert_bit_identical(logits(model, ids), task2_logits, "logits after the context manager")

    weights = linear_weights(model)
    for _ in range(3):
        lora_ext.merge(model)
        assert_rel_close(logits(model, ids), task2_logits.double(), torch.bfloat16, name="merged logits")
        lora_ext.unmerge(model)
    for name, weight in linear_weights(model).items():
        assert_bit_identical(weight, weights[name], f"{name}.weight after 3 merge/unmerge round trips")

    plain = lora_ext.merge_and_unload(model)
    assert not lora_ext.lora_layers(plain)
    assert all(type(m) is nn.Linear for n, m in plain.named_modules() if n.endswith(tuple(LLAMA_ALL)))
    assert_rel_close(logits(plain, ids), task2_logits.double(), torch.bfloat16, name="merge_and_unload logits")


def small_mlp(dtype=torch.float32):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(96, 256), nn.GELU(), nn.Linear(256, 256), nn.LayerNorm(256),
                          nn.Linear(256, 40)).to("cuda", dtype)
    lora_ext.inject(model, ["0", "2", "4"], r=8, alpha=16)
    randomize_adapters(model)
    return model


def test_compile_injected_model_on_cuda():
    model = small_mlp()
    compiled = torch.compile(model)
    x = torch.randn(64, 96, device="cuda", requires_grad=True)
    y_eager = model(x)
    y_eager.square().mean().backward()
    grads_eager = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    x_grad_eager = x.grad.clone()
    model.zero_grad(set_to_none=True)
    x.grad = None
    y_compiled = compiled(x)
    y_compiled.square().mean().backward()
    assert_rel_close(y_compiled, y_eager.double(), torch.float32, name="compiled forward")
    assert_rel_close(x.grad, x_grad_eager.double(), torch.float32, name="compiled grad_x")
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert len(grads) == 6
    for g, ref in zip(grads, grads_eager):
        assert_rel_close(g, ref.double(), torch.float32, name="compiled adapter gradient")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_autocast_behaves_like_nn_linear(dtype):
    torch.manual_seed(0)
    linear = nn.Linear(96, 72, device="cuda")
    layer = lora_ext.LoRALinear.from_linear(copy.deepcopy(linear), r=8, alpha=16)
    x = torch.randn(33, 96, device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        y_linear = linear(x)
        y_layer = layer(x)  # B = 0: the LoRA path adds exactly nothing
    assert y_layer.dtype == y_linear.dtype == dtype
    assert_bit_identical(y_layer, y_linear, "autocast output with B = 0")
    with torch.no_grad():
        layer.lora_B.normal_()
    with torch.autocast("cuda", dtype=dtype):
        y_layer = layer(x)
    ref = (x.double() @ linear.weight.double().t() + linear.bias.double()
           + layer.scaling * (x.double() @ layer.lora_A.double().t()) @ layer.lora_B.double().t())
    assert y_layer.dtype == dtype
    assert_rel_close(y_layer, ref, dtype, name="autocast output")


def test_model_training_step_in_cuda_graph():
    """A whole injected model's training step (forward, loss, backward, Adam) captured in a CUDA graph and
    replayed matches the same steps run eagerly."""
    eager, graphed = small_mlp(), small_mlp()
    graphed.load_state_dict(eager.state_dict())
    params_e = [p for p in eager.parameters() if p.requires_grad]
    params_g = [p for p in graphed.parameters() if p.requires_grad]
    opt_e = torch.optim.Adam(params_e, lr=1e-3, capturable=True)
    opt_g = torch.optim.Adam(params_g, lr=1e-3, capturable=True)
    batches = [(torch.randn(128, 96, device="cuda"), torch.randn(128, 40, device="cuda")) for _ in range(5)]

    def step(model, opt, x, target):
        opt.zero_grad(set_to_none=False)
        loss = (model(x) - target).square().mean()
        loss.backward()
        opt.step()
        return loss.detach()

    static_x, static_t = batches[0][0].clone(), batches[0][1].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step(graphed, opt_g, static_x, static_t)
    torch.cuda.current_stream().wait_stream(side)
    for _ in range(2):
        step(eager, opt_e, *batches[0])
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step(graphed, opt_g, static_x, static_t)
    for x, target in batches[1:]:
        static_x.copy_(x)
        static_t.copy_(target)
        graph.replay()
        expected = step(eager, opt_e, x, target)
        assert_rel_close(static_loss, expected.double(), torch.float32, name="replayed loss")
    for p_g, p_e in zip(params_g, params_e):
        assert_rel_close(p_g, p_e.double(), torch.float32, name="parameters after replayed steps")


def test_fsdp2_on_one_gpu_matches_the_unsharded_model(tmp_path):
    """FSDP2 (fully_shard) over NCCL with one process: the injected model's loss and LoRA gradients equal those of
    the same model unsharded. (Two processes over gloo on the CPU: test_distributed.py; two GPUs: not yet run.)"""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not dist.is_available() or not dist.is_nccl_available():
        pytest.skip("needs torch.distributed with NCCL")
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        reference = lora_ext.inject(tiny_llama(), LLAMA_ALL, r=8, alpha=16)
        randomize_adapters(reference)
        reference.train()
        model = copy.deepcopy(reference)
        mesh = init_device_mesh("cuda", (1,))
        for block in model.model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        ids = token_ids()
        loss_reference = reference(input_ids=ids, labels=ids).loss
        loss_reference.backward()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.testing.assert_close(loss.detach(), loss_reference.detach(), rtol=1e-5, atol=1e-6)
        expected = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
        got = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        assert set(got) == set(expected) and len(got) == 4 * len(LLAMA_ALL)
        for name, grad in got.items():
            full = grad.full_tensor() if hasattr(grad, "full_tensor") else grad
            assert_rel_close(full, expected[name].double(), torch.float32, name=f"{name}.grad under FSDP2")
    finally:
        dist.destroy_process_group()
