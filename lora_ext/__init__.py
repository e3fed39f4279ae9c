"""lora_ext: fast, exact LoRA layers for PyTorch on hand-written CUDA and CPU kernels."""
from . import ops
from .layer import LoRALinear
from .ops import cuda_kernels_available

__all__ = ["LoRALinear", "ops", "cuda_kernels_available"]
__version__ = "0.1.0"
