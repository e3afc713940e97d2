"""Builds jacobi_engine and its compiled extension jacobi_engine._C.

This file is the single source of truth for what goes into the extension: the source list,
the flags and the CUDA decision below. (CMakeLists.txt has a different job: it builds the
torch-free C++ unit tests of csrc/verify_commit.h; see docs/architecture.md.)

The C++ CPU ops are always built. The CUDA sources are compiled and linked whenever nvcc and a
CUDA build of torch are present, with or without a GPU. JACOBI_ENGINE_CUDA=1 makes a missing
CUDA toolchain an error instead of a CPU-only build (CI sets it); JACOBI_ENGINE_CUDA=0 skips
CUDA. TORCH_CUDA_ARCH_LIST picks the GPU architectures (default: the visible GPU, else
"8.0;9.0+PTX").

Install with `pip install --no-build-isolation .` so the extension is compiled against the torch
you run with (an isolated build would fetch and build against another torch).
"""

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CPU_SOURCES = ["csrc/module.cpp", "csrc/ops.cpp"]
CUDA_SOURCES = ["csrc/ops_cuda.cpp", "csrc/kernels.cu"]
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def find_cuda_home():
    """CUDA_HOME/CUDA_PATH, else /usr/local/cuda, else the toolkit that owns the real nvcc.

    torch guesses the toolkit from `which nvcc`, which breaks when nvcc on PATH is a wrapper
    script outside the toolkit (our machines: /usr/local/bin/nvcc -> /usr/local/cuda/bin/nvcc).
    """
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(variable):
            return os.environ[variable]
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    if nvcc:
        return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return None


CUDA_HOME = find_cuda_home()
if CUDA_HOME:
    os.environ.setdefault("CUDA_HOME", CUDA_HOME)  # must precede importing torch.utils.cpp_extension

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:
    sys.exit(
        "jacobi_engine builds against your installed torch: install torch first, then "
        "`pip install --no-build-isolation .`"
    )


def cuda_requested():
    mode = os.environ.get("JACOBI_ENGINE_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"JACOBI_ENGINE_CUDA must be 0, 1 or unset, got {mode!r}")
    problems = []
    if torch.version.cuda is None:
        problems.append(f"torch {torch.__version__} is a CPU-only build")
    if not CUDA_HOME or not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        problems.append("no CUDA toolkit (nvcc) found; set CUDA_HOME")
    if mode == "0":
        return False
    if problems:
        if mode == "1":
            sys.exit("JACOBI_ENGINE_CUDA=1 but the CUDA extension cannot be built: " + "; ".join(problems))
        print("jacobi_engine: building CPU ops only (" + "; ".join(problems) + ")")
        return False
    return True


def nvidia_wheel_dirs(kind):
    """Headers/libraries of torch's nvidia-* wheels, which some toolkits lack (cusparse.h, cublas_v2.h)."""
    dirs = []
    for site in sys.path:
        dirs += sorted(glob.glob(os.path.join(site, "nvidia", "*", kind)))
    return [d for d in dirs if os.path.isdir(d)]


def extension():
    with_cuda = cuda_requested()
    # The C++ standard is chosen by torch (C++20 from torch 2.13). No contracted multiply-adds on the host:
    # the shared headers (csrc/sampling_verify.h) must round exactly like the GPU, which uses explicit
    # __dmul_rn/__dsub_rn, and aarch64 compilers contract a*b+c into an FMA by default.
    cxx_flags = ["-O3", "-ffp-contract=off"]
    define_macros = []
    sources = list(CPU_SOURCES)
    if not with_cuda:
        return cpp_extension.CppExtension(
            "jacobi_engine._C", sources, extra_compile_args={"cxx": cxx_flags}, define_macros=define_macros
        )
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or ";".join(
        f"{major}.{minor}"
        for major, minor in {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
    )
    define_macros += [("JE_WITH_CUDA", "1"), ("JE_CUDA_ARCH_LIST", f'"{archs}"')]
    sources += CUDA_SOURCES
    print(f"jacobi_engine: building CPU + CUDA ops (CUDA_HOME={CUDA_HOME}, archs {archs})")
    return cpp_extension.CUDAExtension(
        "jacobi_engine._C",
        sources,
        include_dirs=nvidia_wheel_dirs("include"),
        library_dirs=nvidia_wheel_dirs("lib"),
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo", "-Xcompiler", "-ffp-contract=off"]},
    )


setup(
    packages=find_packages(include=["jacobi_engine", "jacobi_engine.*"]),
    package_data={"jacobi_engine": ["assets/**/*", "hub/**/*"]},
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
)
