"""The install really contains what build_info() claims, and CI's CUDA compile did not silently vanish."""

from __future__ import annotations

import os
import subprocess

import pytest
import torch

import jacobi_engine
from jacobi_engine import _C

OP = "jacobi_engine::verify_and_commit"


def test_build_info_fields():
    info = jacobi_engine.build_info()
    assert info["torch"] == torch.__version__
    assert isinstance(info["cuda_kernels"], bool)
    assert isinstance(info["cuda_arch"], str)
    assert info["cpu_kernels"] is True
    assert torch._C._dispatch_has_kernel_for_dispatch_key(OP, "CPU")
    # cuda_kernels is true exactly when the CUDA implementation is registered with the dispatcher.
    assert info["cuda_kernels"] == torch._C._dispatch_has_kernel_for_dispatch_key(OP, "CUDA")
    if info["cuda_kernels"]:
        assert info["cuda_arch"]


def _elf_sections(path: str) -> str:
    return subprocess.run(["readelf", "-SW", path], capture_output=True, text=True, check=True).stdout


@pytest.mark.skipif(os.environ.get("JACOBI_ENGINE_CUDA") != "1", reason="only where the CUDA build is required")
def test_cuda_build_is_really_there():
    """CI sets JACOBI_ENGINE_CUDA=1: the extension must hold compiled GPU code and a CUDA kernel registration."""
    info = jacobi_engine.build_info()
    assert info["cuda_kernels"], "JACOBI_ENGINE_CUDA=1 but the extension was built without CUDA"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(OP, "CUDA")
    assert ".nv_fatbin" in _elf_sections(_C.__file__), "no embedded GPU binaries in the extension"
