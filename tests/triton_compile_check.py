"""Compiles the Triton attention kernels for sm_90 without a GPU (PTX and cubin through Triton's own
ptxas), so that a kernel edit that only the interpreter has run is known to lower. Run in its own
process by tests/test_attention_op.py: TRITON_INTERPRET must be unset before triton is imported.

    python tests/triton_compile_check.py   -> prints one line per compiled variant, exit 0
"""

from __future__ import annotations

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from jacobi_engine import triton_attention  # noqa: E402

POINTERS = ("Q", "K_cache", "V_cache", "K_new", "V_new", "Out")
INT_POINTERS = ("cache_seqlens", "Sinks", "Tree", "Depth")
TARGET = GPUTarget("cuda", 90, 32)


def attention_signature(dtype: str, constants: dict) -> dict:
    signature = {}
    for name in triton_attention._jacobi_attention_kernel.arg_names:
        if name in POINTERS:
            signature[name] = f"*{dtype}"
        elif name in ("O_part", "Lse_part"):
            signature[name] = "*fp32"
        elif name in INT_POINTERS:
            signature[name] = "*i32"
        elif name in constants:
            signature[name] = "constexpr"
        elif name in ("sm_scale", "softcap"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    return signature


def main() -> int:
    variants = [
        ("fp16", 128, 4, 2, tl.float16, "tf32"),
        ("bf16", 256, 16, 1, tl.bfloat16, "tf32"),  # head_dim 256, group 16
        ("fp32", 64, 1, 1, tl.float32, triton_attention._FP32_DOT_PRECISION),
    ]
    for dtype, head_dim, group, splits, compute, precision in variants:
        block_m = max(16, group)
        constants = dict(
            GROUP=group,
            QUERIES_PER_TILE=block_m // group,
            HEAD_DIM=head_dim,
            BLOCK_D=head_dim,
            VALUE_DIM=head_dim,
            BLOCK_DV=head_dim,
            BLOCK_M=block_m,
            BLOCK_N=16 if head_dim > 128 else 64,
            NUM_SPLITS=splits,
            HAS_WINDOW=True,
            HAS_CHUNK=False,
            HAS_FLOOR=True,
            HAS_SINKS=True,
            HAS_SOFTCAP=False,
            HAS_TREE=dtype == "fp16",
            COMPUTE_DTYPE=compute,
            DOT_PRECISION=precision,
        )
        source = triton.compiler.ASTSource(
            fn=triton_attention._jacobi_attention_kernel,
            signature=attention_signature(dtype, constants),
            constexprs=constants,
        )
        compiled = triton.compile(source, target=TARGET, options=dict(num_warps=4, num_stages=2))
        print(
            f"attention {dtype} head_dim {head_dim} group {group} splits {splits}: {len(compiled.asm['cubin'])} B cubin"
        )
    merge_constants = dict(HEAD_DIM=128, BLOCK_D=128, NUM_SPLITS=3, SPLITS_P2=4)
    merge_signature = {}
    for name in triton_attention._merge_splits_kernel.arg_names:
        if name in ("O_part", "Lse_part"):
            merge_signature[name] = "*fp32"
        elif name == "Out":
            merge_signature[name] = "*fp16"
        else:
            merge_signature[name] = "constexpr" if name in merge_constants else "i32"
    source = triton.compiler.ASTSource(
        fn=triton_attention._merge_splits_kernel, signature=merge_signature, constexprs=merge_constants
    )
    print(f"merge: {len(triton.compile(source, target=TARGET).asm['cubin'])} B cubin")
    return 0


if __name__ == "__main__":
    sys.exit(main())
