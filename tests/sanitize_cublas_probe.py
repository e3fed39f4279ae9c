"""Does compute-sanitizer's initcheck see the writes of torch's cuBLAS GEMMs on this GPU?

Run under `compute-sanitizer --tool initcheck python3 tests/sanitize_cublas_probe.py`. Each case writes y with
torch.nn.functional.linear (cuBLAS) and then reads every element of y with torch's own copy kernel (y.clone()).
If initcheck reports "Uninitialized __global__ memory read" in torch's copy kernel, it does not track the GEMM's
stores (Hopper GEMMs store through the tensor memory accelerator), and the same report on our kernels that read
the GEMM's output (lora_decode_kernel, lora_expand_wmma_kernel read y to add the LoRA term) is not ours.
Shapes: the decode and tensor-core expand cases of tests/test_cuda_kernel_paths.py."""
import torch
import torch.nn.functional as F

for tokens, in_features, out_features in [(1, 4096, 4096), (16, 1024, 512), (64, 256, 128), (300, 136, 72),
                                          (640, 256, 4096)]:
    x = torch.randn(tokens, in_features, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(out_features, in_features, device="cuda", dtype=torch.bfloat16)
    y = F.linear(x, weight)
    z = y.clone()
    torch.cuda.synchronize()
    print(f"{tokens}x{in_features} -> {out_features}: y written by cuBLAS, read by clone(): {float(z.float().norm()):.3g}")
