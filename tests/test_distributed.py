"""Beyond one process: 2 CPU processes on the gloo backend.

- DistributedDataParallel over an injected tiny Llama: after one step, the gradient of every lora_A / lora_B
  (and the updated values) equal the single-process ones on the concatenated batch, to float32 rounding.
- FSDP2 (torch.distributed.fsdp.fully_shard) on CPU with gloo (supported by torch 2.13: a CPU device mesh
  shards and reduce-scatters over gloo): the same check on the full (gathered) gradients.
- examples/train_ddp.py under torchrun.

The workers are this file run as a script (`python tests/test_distributed.py ddp OUT`), one subprocess per rank
in its own session with RANK / WORLD_SIZE / MASTER_PORT (a free port); a timeout kills the whole group, so no
process outlives a test.
"""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(HERE)
WORLD = 2
GLOBAL_BATCH, SEQ = 4, 8
TIMEOUT_S = 120  # a hang is a failure, not a stuck test run; a normal run takes ~10 s


# ----------------------------------------------------------------------------
# Shared by the workers and the single-process reference
# ----------------------------------------------------------------------------


def build_model():
    import transformers

    import lora_ext

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    model = transformers.LlamaForCausalLM(cfg)
    lora_ext.inject(model, ["q_proj", "v_proj", "o_proj", "down_proj"], r=4, alpha=8)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in lora_ext.lora_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.2)
    return model.train()


def global_batch():
    g = torch.Generator().manual_seed(2)
    return torch.randint(0, 128, (GLOBAL_BATCH, SEQ), generator=g)


def lora_params(model):
    """{name: parameter} of every lora_A / lora_B, names without DDP's 'module.' prefix."""
    return {n.removeprefix("module."): p for n, p in model.named_parameters() if ".lora_A" in n or ".lora_B" in n}


def loss_of(model, ids):
    return model(input_ids=ids, labels=ids).loss


LR = 0.5


def single_process_reference():
    model = build_model()
    ids = global_batch()
    loss = loss_of(model, ids)
    loss.backward()
    params = lora_params(model)
    grads = {n: p.grad.detach().clone() for n, p in params.items()}
    with torch.no_grad():
        updated = {n: (p - LR * p.grad).detach().clone() for n, p in params.items()}
    return loss.detach(), grads, updated


# ----------------------------------------------------------------------------
# Workers
# ----------------------------------------------------------------------------


def _worker(mode, out_dir):
    import datetime

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build_model()
    ids = global_batch().chunk(world)[rank]
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        wrapped = DDP(model)
    elif mode == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        wrapped = model
    else:
        raise ValueError(mode)
    params = lora_params(wrapped)
    opt = torch.optim.SGD([p for p in wrapped.parameters() if p.requires_grad], lr=LR)
    loss = loss_of(wrapped, ids)
    loss.backward()

    def full(t):
        return t.full_tensor() if hasattr(t, "full_tensor") else t  # DTensor under FSDP2 (a collective)

    grads = {n: full(p.grad).detach().clone() for n, p in params.items()}
    frozen_grads = [n for n, p in wrapped.named_parameters() if not p.requires_grad and p.grad is not None]
    opt.step()
    updated = {n: full(p.detach()).clone() for n, p in params.items()}
    losses = [torch.zeros(()) for _ in range(world)]
    dist.all_gather(losses, loss.detach())
    torch.save({"grads": grads, "updated": updated, "losses": losses, "frozen_grads": frozen_grads,
                "sharded": mode == "fsdp2" and all(hasattr(p, "full_tensor") for p in params.values())},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


# ----------------------------------------------------------------------------
# Launching
# ----------------------------------------------------------------------------


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(extra=None):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([REPO_ROOT, HERE] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["OMP_NUM_THREADS"] = "1"
    env["HF_HUB_OFFLINE"] = "1"
    env.update(extra or {})
    return env


def _kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_processes(cmds, envs, timeout=TIMEOUT_S, cwd=REPO_ROOT):
    """Start every command in its own session; wait for all; kill every group on timeout or failure."""
    procs = []
    try:
        for cmd, env in zip(cmds, envs):
            procs.append(subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          text=True, start_new_session=True))
        deadline = time.monotonic() + timeout
        outputs = []
        for p in procs:
            try:
                out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                for q in procs:
                    _kill_group(q)
                out, _ = p.communicate()
                pytest.fail(f"distributed run timed out after {timeout} s:\n{out[-4000:]}")
            outputs.append(out)
            if p.returncode != 0:
                for q in procs:
                    _kill_group(q)
        for p, out in zip(procs, outputs):
            assert p.returncode == 0, f"{' '.join(map(str, p.args))} exited with {p.returncode}:\n" + \
                "\n---\n".join(o[-4000:] for o in outputs)
        return outputs
    finally:
        for p in procs:
            if p.poll() is None:
                _kill_group(p)
                p.wait(timeout=10)
        for p in procs:
            _kill_group(p)  # any grandchildren left in the session


def launch(mode, out_dir):
    port = str(free_port())
    cmds, envs = [], []
    for rank in range(WORLD):
        cmds.append([sys.executable, os.path.abspath(__file__), mode, str(out_dir)])
        envs.append(_env({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD),
                          "LOCAL_WORLD_SIZE": str(WORLD), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}))
    run_processes(cmds, envs)
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=True) for r in range(WORLD)]


def _check_against_single_process(results):
    ref_loss, ref_grads, ref_updated = single_process_reference()
    assert len(ref_grads) == 2 * 2 * 4  # A and B of 4 modules in 2 layers
    # the mean of the per-rank losses is the loss of the whole batch (equal shards)
    torch.testing.assert_close(torch.stack(results[0]["losses"]).mean(), ref_loss, rtol=1e-5, atol=1e-6)
    for r, res in enumerate(results):
        assert sorted(res["grads"]) == sorted(ref_grads), f"rank {r}: other parameter names"
        assert res["frozen_grads"] == [], f"rank {r}: frozen parameters got gradients: {res['frozen_grads'][:3]}"
        for n, g in ref_grads.items():
            assert g.abs().sum() > 0, n
            torch.testing.assert_close(res["grads"][n], g, rtol=1e-4, atol=1e-6,
                                       msg=lambda m: f"rank {r} grad {n}: {m}")
            torch.testing.assert_close(res["updated"][n], ref_updated[n], rtol=1e-4, atol=1e-6,
                                       msg=lambda m: f"rank {r} updated {n}: {m}")
    for n in ref_grads:  # the ranks agree exactly with each other
        assert torch.equal(results[0]["updated"][n], results[1]["updated"][n]), n


@pytest.fixture(autouse=True)
def _needs_gloo_and_transformers():
    pytest.importorskip("transformers")
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")


def test_ddp_gradients_equal_single_process(tmp_path):
    _check_against_single_process(launch("ddp", tmp_path))


def test_fsdp2_gradients_equal_single_process(tmp_path):
    # torch 2.13's fully_shard runs on CPU with gloo (a "cpu" device mesh); it was checked, not assumed.
    pytest.importorskip("torch.distributed.fsdp")
    from torch.distributed.fsdp import fully_shard  # noqa: F401

    results = launch("fsdp2", tmp_path)
    assert all(r["sharded"] for r in results), "fully_shard should have turned the parameters into DTensors"
    _check_against_single_process(results)


def test_train_ddp_example(tmp_path):
    out = tmp_path / "adapter"
    port = str(free_port())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", port,
           os.path.join(REPO_ROOT, "examples", "train_ddp.py"), "--device", "cpu", "--steps", "3",
           "--out", str(out)]
    env = _env()
    env.pop("RANK", None)
    (log,) = run_processes([cmd], [env])
    assert log.count("step") >= 3, log
    assert "identical across ranks" in log, log
    assert (out / "adapter_model.safetensors").exists() and (out / "adapter_config.json").exists()
    import json

    from safetensors.torch import load_file

    tensors = load_file(str(out / "adapter_model.safetensors"))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8
    b = [t for k, t in tensors.items() if k.endswith("lora_B.weight")]
    assert len(b) == 2 * 7 and all(t.abs().sum() > 0 for t in b), "B starts at 0 and must have trained"


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
    # Every result is saved and the process group destroyed: leave without the interpreter's teardown, where
    # torch's gloo/FSDP2 background threads occasionally abort the process ("terminate called without an active
    # exception", seen once in CI on torch 2.13 after a successful run), which is not what this test checks.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
