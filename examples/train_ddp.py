"""Train LoRA adapters with DistributedDataParallel on a small transformers model built from a config.

    torchrun --nproc-per-node 2 examples/train_ddp.py                       # GPUs (NCCL) when there are some
    torchrun --nproc-per-node 2 examples/train_ddp.py --device cpu --steps 5  # CPU processes over gloo

Every rank builds the same tiny Llama (random weights, no download), injects LoRA layers with lora_ext.inject,
and trains on its own slice of random token data. Rank 0 prints the loss (averaged over ranks) per step; at the
end every rank checks that its lora_A / lora_B are bit-for-bit identical to rank 0's, and rank 0 saves the
adapter in PEFT's format with lora_ext.save_adapter (loadable by peft.PeftModel.from_pretrained).
"""
import argparse
import datetime
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

try:
    import lora_ext
except ImportError:  # run from a source checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import lora_ext


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: cuda (NCCL) when a GPU is available, else cpu (gloo)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=4, help="sequences per rank per step")
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rank", type=int, default=8, help="LoRA rank r")
    p.add_argument("--alpha", type=float, default=16)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--targets", nargs="+", default=["q_proj", "k_proj", "v_proj", "o_proj",
                                                      "gate_proj", "up_proj", "down_proj"])
    p.add_argument("--out", default="lora_ddp_adapter", help="directory for the adapter (written by rank 0)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def build_model(args, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)  # the same base weights and the same LoRA init on every rank
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, max_position_embeddings=max(128, args.seq_len))
    model = LlamaForCausalLM(config).to(device)
    lora_ext.inject(model, args.targets, r=args.rank, alpha=args.alpha, dropout=args.dropout)
    return model


def main():
    args = parse_args()
    if "RANK" not in os.environ:
        sys.exit("launch with torchrun, e.g. torchrun --nproc-per-node 2 examples/train_ddp.py --device cpu")
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=5),
                            device_id=device if use_cuda else None)
    rank, world = dist.get_rank(), dist.get_world_size()

    model = build_model(args, device)
    if rank == 0:
        print(f"{world} processes, backend {backend}, device {device.type}")
        lora_ext.print_trainable_parameters(model)
    ddp = DDP(model, device_ids=[local_rank] if use_cuda else None)
    optimizer = torch.optim.AdamW([p for p in ddp.parameters() if p.requires_grad], lr=args.lr)

    # Random token data, a different stream on each rank (each rank is its own shard of the data).
    data = torch.Generator().manual_seed(1000 + rank)
    vocab = model.config.vocab_size
    ddp.train()
    for step in range(args.steps):
        ids = torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=data).to(device)
        loss = ddp(input_ids=ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # DDP averages the LoRA gradients over the ranks here
        optimizer.step()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        if rank == 0:
            print(f"step {step + 1:4d}/{args.steps}  loss {mean_loss.item() / world:.4f}", flush=True)

    # Every rank must hold the same adapter: compare each lora_A / lora_B with rank 0's, bit for bit.
    mismatched = []
    for name, p in model.named_parameters():
        if ".lora_A" in name or ".lora_B" in name:
            reference = p.detach().clone()
            dist.broadcast(reference, src=0)
            if not torch.equal(reference, p.detach()):
                mismatched.append(name)
    count = torch.tensor([len(mismatched)], device=device)
    dist.all_reduce(count)
    if count.item() != 0:
        if mismatched:
            print(f"rank {rank}: adapters differ from rank 0: {mismatched[:5]}", file=sys.stderr, flush=True)
        dist.destroy_process_group()
        sys.exit(1)
    if rank == 0:
        print(f"lora_A / lora_B identical across ranks ({world} ranks)")
        lora_ext.save_adapter(model, args.out)
        print(f"saved the adapter to {args.out}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # Everything is saved and the process group destroyed. Leave without the interpreter's teardown: there, torch's
    # gloo background threads occasionally abort a finished run ("terminate called without an active exception",
    # seen in CI on torch 2.13 CPU), which would turn a successful run into exit code -6.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
