"""jacobi_engine: few-step parallel (Jacobi) decoding for Hugging Face causal LMs.

from jacobi_engine import JacobiEngine
out = JacobiEngine(model, block_size=16).generate(input_ids, max_new_tokens=128)
out.sequences, out.stats
"""

from __future__ import annotations

import torch

from jacobi_engine import _ext, ops
from jacobi_engine.engine import JacobiEngine, generate
from jacobi_engine.guesses import GuessStrategy, NgramGuess, RandomPromptGuess
from jacobi_engine.output import JacobiOutput, JacobiStats

__version__ = "0.1.0"


def build_info() -> dict:
    """What this install was built with: ``torch``, ``cuda_kernels`` (CUDA code compiled in),
    ``cuda_arch`` (architectures it was compiled for), ``cpu_kernels``, ``triton`` (importable
    Triton version or None) and ``cuda_available`` (a GPU is usable right now)."""
    info = _ext.build_info()
    info["torch"] = torch.__version__
    info["torch_cuda"] = torch.version.cuda
    info["cuda_available"] = torch.cuda.is_available()
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    info["version"] = __version__
    return info


__all__ = [
    "GuessStrategy",
    "JacobiEngine",
    "JacobiOutput",
    "JacobiStats",
    "NgramGuess",
    "RandomPromptGuess",
    "build_info",
    "generate",
    "ops",
]
