"""lora_ext: fast, exact LoRA layers for PyTorch on hand-written CUDA and CPU kernels."""
from . import ops
from .adapter_io import AdapterLoadError, load_adapter, save_adapter
from .layer import LoRALinear
from .models import (
    count_parameters,
    delete_adapter,
    disable_adapters,
    enable_adapters,
    inject,
    lora_layers,
    merge,
    merge_and_unload,
    print_trainable_parameters,
    set_adapter,
    unmerge,
)
from .multi_adapter import AdapterStack, adapter_slot_ids, mixed_adapters
from .ops import built_with_sm90a, cuda_kernels_available

__all__ = [
    "LoRALinear", "ops", "cuda_kernels_available", "built_with_sm90a",
    "inject", "lora_layers", "count_parameters", "print_trainable_parameters", "merge", "unmerge",
    "merge_and_unload", "set_adapter", "delete_adapter", "disable_adapters", "enable_adapters",
    "save_adapter", "load_adapter", "AdapterLoadError",
    "AdapterStack", "mixed_adapters", "adapter_slot_ids",
]
__version__ = "0.1.0"
