"""The engine's ops and the single place that decides which implementation runs.

``jacobi_attention``  block attention with in-place K/V append.
    backends: ``"triton"`` (:mod:`jacobi_engine.triton_attention`), ``"torch"``
    (:func:`jacobi_engine.reference.jacobi_attention`); ``"auto"`` = Triton on CUDA, torch on CPU.

``verify_and_commit``  fused fixed-point check + commit (csrc/, registered with TORCH_LIBRARY as
    ``torch.ops.jacobi_engine.verify_and_commit``). Where and how it commits is one argument, a
    :class:`~jacobi_engine.op_args.CommitTarget` (the terms verified, accepted, emitted, committed and
    limits are defined there); the sampling ops take their draft state as a
    :class:`~jacobi_engine.op_args.SamplingState` (both re-exported here, with the error word's functions).
    backends: ``"native"`` (the C++ op on CPU, the CUDA op on GPU), ``"torch"``
    (:func:`jacobi_engine.reference.verify_and_commit`); ``"auto"`` = native where the op was compiled
    for the device, else torch (:func:`resolve_verify_backend`). Every op takes an int32 [1] error
    word (``CommitTarget.errors``): see :func:`raise_if_error`.

``sample_verify_and_commit``  exact speculative sampling over the block + the same commit (csrc/,
    ``torch.ops.jacobi_engine.sample_verify_and_commit``); backends as verify_and_commit's, the
    reference being :func:`jacobi_engine.sampling_reference.sample_verify_and_commit`.

``sample_tree_verify_and_commit``  the same over a token tree of candidate branches (SpecInfer-style
    multi-candidate verification; ``torch.ops.jacobi_engine.sample_tree_verify_and_commit``), the
    reference being :func:`jacobi_engine.sampling_reference.sample_tree_verify_and_commit`.

Swapping a kernel means editing this file only; the decoding loop calls these functions.
"""

from __future__ import annotations

import math

import torch

from jacobi_engine import _ext, reference, sampling_reference  # _ext loads _C: registers torch.ops.jacobi_engine.*

# The ops' argument groups and error word (jacobi_engine.op_args), reached here beside the ops that take them.
from jacobi_engine.op_args import (  # noqa: F401  (re-exported: ops.CommitTarget, ops.raise_if_error, ...)
    ERROR_BITS,
    CommitTarget,
    SamplingState,
    check_error_word,
    error_messages,
    new_error_word,
    raise_if_error,
)

ATTENTION_BACKENDS = ("auto", "triton", "torch")
VERIFY_BACKENDS = ("auto", "native", "torch")

# The ops' compile-time constants, read from the extension (csrc/sampling_verify.h), never copied.
MAX_SAMPLING_CANDIDATES: int = _ext.CONSTANTS["max_tree_branches"]  # k branches the sampling tree op verifies
SAMPLE_LANES: int = _ext.CONSTANTS["sample_lanes"]  # lanes of the lane-order sampler
PREFILL_STEP: int = _ext.CONSTANTS["prefill_step"]  # Philox step word of the first token after prefill


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def compiled_for(device: torch.device | str) -> bool:
    """Whether the extension has compiled verify ops for ``device``'s type: always on CPU, on CUDA only
    when it was built with nvcc (``jacobi_engine.build_info()['cuda_kernels']``)."""
    device_type = torch.device(device).type
    if device_type == "cpu":
        return True
    return device_type == "cuda" and bool(_ext.build_info()["cuda_kernels"])


def resolve_verify_backend(backend: str, device: torch.device | str, graph_safe: bool = False) -> str:
    """The verify ops' implementation on ``device``: ``"native"`` or ``"torch"``.

    ``"auto"`` is ``"native"`` where the compiled ops exist for the device type (:func:`compiled_for`),
    else ``"torch"`` (the plain-PyTorch references: the same tokens, slower; warn with
    :func:`verify_backend_warning`). ``"native"`` where nothing was compiled raises ValueError naming
    the setting (the dispatcher would raise NotImplementedError at the first verify). ``"torch"`` stays.
    ``graph_safe``: the caller captures or compiles the step. Every torch path is graph-safe (the tree
    sampling verify included: :func:`jacobi_engine.sampling_reference.sample_tree_verify_and_commit` has
    no host reads), so it does not change the answer; it is part of the contract for callers that need it.
    """
    _check_choice("verify_backend", backend, VERIFY_BACKENDS)
    del graph_safe  # every resolution below is graph-safe
    if backend == "torch":
        return "torch"
    if compiled_for(device):
        return "native"
    if backend == "native":
        raise ValueError(
            f"verify_backend='native' but this jacobi_engine build has no compiled ops for {torch.device(device)} "
            "(build_info()['cuda_kernels'] is False): rebuild with nvcc (JACOBI_ENGINE_CUDA=1) or use "
            "verify_backend='auto' or 'torch'"
        )
    return "torch"


def verify_backend_warning(device: torch.device | str) -> str | None:
    """The warning to give once when ``verify_backend="auto"`` falls back to the torch references on
    ``device`` (None when the compiled ops exist there)."""
    if compiled_for(device):
        return None
    return (
        f"jacobi_engine was built without compiled ops for {torch.device(device).type} "
        "(build_info()['cuda_kernels'] is False): verify_backend='auto' runs the plain-PyTorch verify "
        "references there (the same tokens, slower). Rebuild with nvcc and JACOBI_ENGINE_CUDA=1 for the fused kernels."
    )


def _verify_backend(backend: str, device: torch.device) -> str:
    """The op wrappers' choice: "auto" resolved where compiled ops are missing (eagerly; a compiled or
    traced step keeps "auto" = native, as resolved by its caller at construction)."""
    _check_choice("backend", backend, VERIFY_BACKENDS)
    if backend == "auto" and not torch.compiler.is_compiling():
        return resolve_verify_backend(backend, device)
    return backend


def resolve_attention_backend(backend: str, device: torch.device) -> str:
    _check_choice("backend", backend, ATTENTION_BACKENDS)
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return backend


def _check_attention_args(q, k_cache, v_cache, k_new, v_new, cache_seqlens, sinks=None, chunk_size=None) -> None:
    for name, tensor in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("k_new", k_new), ("v_new", v_new)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dim() != 4:
            raise ValueError(f"{name} must be 4-D, got shape {tuple(tensor.shape)}")
    if not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.dtype != torch.int32:
        raise TypeError("cache_seqlens must be an int32 torch.Tensor")
    batch, n, n_heads, head_dim = q.shape
    _, capacity, n_kv_heads, _ = k_cache.shape
    value_dim = v_cache.shape[3]
    if (
        k_cache.shape[0] != batch
        or k_cache.shape[3] != head_dim
        or tuple(v_cache.shape[:3]) != tuple(k_cache.shape[:3])
    ):
        raise ValueError(
            f"k_cache must be [B={batch}, S, Hkv, D_k={head_dim}] and v_cache [B, S, Hkv, D_v] with the same B, S "
            f"and Hkv, got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    if tuple(k_new.shape) != (batch, n, n_kv_heads, head_dim):
        raise ValueError(f"k_new must be {(batch, n, n_kv_heads, head_dim)}, got {tuple(k_new.shape)}")
    if tuple(v_new.shape) != (batch, n, n_kv_heads, value_dim):
        raise ValueError(f"v_new must be {(batch, n, n_kv_heads, value_dim)}, got {tuple(v_new.shape)}")
    if n_kv_heads == 0 or n_heads % n_kv_heads != 0:
        raise ValueError(f"q heads ({n_heads}) must be a multiple of the cache's kv heads ({n_kv_heads})")
    if tuple(cache_seqlens.shape) != (batch,):
        raise ValueError(f"cache_seqlens must have shape [{batch}], got {tuple(cache_seqlens.shape)}")
    tensors = [q, k_cache, v_cache, k_new, v_new, cache_seqlens]
    if sinks is not None:
        if not isinstance(sinks, torch.Tensor) or not sinks.is_floating_point():
            raise TypeError(f"sinks must be a floating-point torch.Tensor, got {type(sinks).__name__}")
        if tuple(sinks.shape) != (n_heads,):
            raise ValueError(f"sinks must have shape [Hq={n_heads}], got {tuple(sinks.shape)}")
        tensors.append(sinks)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"all attention inputs must be on one device, got {sorted(map(str, devices))}")
    if n > capacity:
        raise ValueError(f"block of {n} tokens does not fit a cache of {capacity} rows")


def _check_tree(q, tree_mask, tree_depth) -> None:
    if (tree_mask is None) != (tree_depth is None):
        raise ValueError("tree_mask and tree_depth go together: pass both or neither")
    if tree_mask is None:
        return
    n = q.shape[1]
    if not isinstance(tree_mask, torch.Tensor) or tree_mask.dtype != torch.bool or tuple(tree_mask.shape) != (n, n):
        raise ValueError(f"tree_mask must be a bool tensor of shape [n={n}, n={n}]")
    if not isinstance(tree_depth, torch.Tensor) or tree_depth.dtype != torch.int32 or tuple(tree_depth.shape) != (n,):
        raise ValueError(f"tree_depth must be an int32 tensor of shape [n={n}]")
    if tree_mask.device != q.device or tree_depth.device != q.device:
        raise ValueError("tree_mask and tree_depth must be on the device of q")


def jacobi_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    cache_seqlens: torch.Tensor,
    softmax_scale: float | None = None,
    backend: str = "auto",
    *,
    sliding_window: int | None = None,
    softcap: float | None = None,
    kv_len: int | None = None,
    out: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    chunk_size: int | None = None,
    tree_mask: torch.Tensor | None = None,
    tree_depth: torch.Tensor | None = None,
    layout: reference.BlockLayout | None = None,
    check: bool = True,
) -> torch.Tensor:
    """Attention of an n-token block over each sequence's cached prefix, appending the block's K/V.

    ``q`` [B, n, Hq, D_k]; ``k_cache`` [B, S, Hkv, D_k], ``v_cache`` [B, S, Hkv, D_v];
    ``k_new`` [B, n, Hkv, D_k], ``v_new`` [B, n, Hkv, D_v]; ``cache_seqlens`` int32 [B].
    Returns ``out`` [B, n, Hq, D_v] (the value head size comes from ``v_cache``; D_k != D_v is MLA).

    Writes ``k_new``/``v_new`` at cache rows ``cache_seqlens[b] .. cache_seqlens[b]+n-1``; query ``i``
    of sequence ``b`` attends to rows ``0 .. cache_seqlens[b]+i``. ``cache_seqlens`` is not advanced.
    The caller guarantees ``cache_seqlens[b] + n <= S`` (checking it here would need a host sync).
    ``sliding_window`` keeps only the last that-many rows visible to each query, ``chunk_size`` only
    the rows of the query's own chunk (``row // chunk_size`` equal; Llama 4), ``softcap`` applies
    ``softcap * tanh(s / softcap)`` to the scaled scores (Gemma 2), ``sinks`` [Hq] adds one logit per
    head to every softmax denominator (attention sinks: gpt-oss), ``kv_len`` is an optional
    host-side bound on ``max(cache_seqlens) + n`` and ``out`` an optional output buffer.
    ``tree_mask`` bool [n, n] and ``tree_depth`` int32 [n] (both or neither) lay the block out as a
    token tree, the Jacobi block followed by candidate branches: token ``i`` sees the prefix and the
    block tokens ``j`` with ``tree_mask[i, j]``, at position ``cache_seqlens[b] + tree_depth[i]``.

    For callers that run the same block through many layers (the engine): ``layout`` is
    :func:`jacobi_engine.reference.block_layout` of the block, computed once per forward and used
    by the torch path (Triton derives its mask in the kernel), and ``check=False`` skips the
    argument checks for shapes the caller has checked once already.
    """
    if check:
        _check_attention_args(q, k_cache, v_cache, k_new, v_new, cache_seqlens, sinks, chunk_size)
        _check_tree(q, tree_mask, tree_depth)
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    features = dict(
        sliding_window=sliding_window,
        softcap=softcap,
        sinks=sinks,
        chunk_size=chunk_size,
        out=out,
        tree_mask=tree_mask,
        tree_depth=tree_depth,
    )
    resolved = backend if backend in ("triton", "torch") else resolve_attention_backend(backend, q.device)
    if resolved == "triton":
        from jacobi_engine import triton_attention

        return triton_attention.jacobi_attention(
            q, k_cache, v_cache, k_new, v_new, cache_seqlens, softmax_scale, **features
        )
    # A compiled step has static shapes, so traced attention would read the whole capacity bucket;
    # on the CPU the true longest row costs no device sync to read, and the reference reads it
    # inside an opaque op (reference.bounded_sdpa) so that attention stays proportional to the
    # tokens actually cached.
    bound_rows = q.device.type == "cpu" and torch.compiler.is_compiling()
    return reference.jacobi_attention(
        q,
        k_cache,
        v_cache,
        k_new,
        v_new,
        cache_seqlens,
        softmax_scale,
        kv_len=kv_len,
        layout=layout,
        bound_rows=bound_rows,
        **features,
    )


def verify_and_commit(
    scores: torch.Tensor, block: torch.Tensor, fill: torch.Tensor, target: CommitTarget, backend: str = "auto"
) -> torch.Tensor:
    """Fused Jacobi fixed-point check + commit; see :func:`jacobi_engine.reference.verify_and_commit`.

    ``scores``: logits [B, n, V] (float32, float16, bfloat16 or float64) or their argmax int64 [B, n];
    ``block`` int64 [B, n], ``fill`` int64 [B, n]; ``target`` says where and how to commit.
    One launch, no host synchronisation. Returns ``n_accepted`` int32 [B] (0 for finished rows).
    """
    if _verify_backend(backend, block.device) == "torch":
        return reference.verify_and_commit(scores, block, fill, target)
    return torch.ops.jacobi_engine.verify_and_commit(scores, block, fill, *target.op_args())


@torch.library.register_fake("jacobi_engine::verify_and_commit")
def _verify_and_commit_fake(scores, block, *_):
    return block.new_empty((block.shape[0],), dtype=torch.int32)


def move_cache_rows(
    buffers: list[torch.Tensor],
    src: torch.Tensor,
    dst: torch.Tensor,
    rows: int,
    errors: torch.Tensor | None = None,
    backend: str = "auto",
) -> None:
    """KV commit of a winning candidate branch; see :func:`jacobi_engine.reference.move_cache_rows`.

    backends: ``"native"`` (``torch.ops.jacobi_engine.move_cache_rows``: C++ on CPU, one CUDA launch
    per 64 buffers on GPU, the per-sequence logic shared in csrc/kv_commit.h), ``"torch"`` (the
    reference); ``"auto"`` = native. No host synchronisation on GPU (CUDA-graph safe) when ``errors``
    (the caller's int32 [1] error word, see :class:`CommitTarget`) is given; without it the call
    checks a fresh word itself (one host sync) and raises ValueError for rows outside the cache.
    """
    word = errors if errors is not None else new_error_word(src.device)
    if _verify_backend(backend, src.device) == "torch":
        reference.move_cache_rows(buffers, src, dst, rows, word)
    else:
        torch.ops.jacobi_engine.move_cache_rows(buffers, src, dst, rows, word)
    if errors is None:
        raise_if_error(word)


@torch.library.register_fake("jacobi_engine::move_cache_rows")
def _move_cache_rows_fake(buffers, src, dst, rows, errors):
    return None


def sample_verify_and_commit(
    probs: torch.Tensor,
    block: torch.Tensor,
    fill: torch.Tensor,
    sampling: SamplingState,
    target: CommitTarget,
    backend: str = "auto",
) -> torch.Tensor:
    """Exact sampling verify + commit; see :func:`jacobi_engine.sampling_reference.sample_verify_and_commit`.

    ``probs`` float32 [B, n, V]; ``block``/``fill`` int64 [B, n]; the drafts' state in ``sampling``,
    the commit in ``target``. ``backend``: ``"native"`` (C++ on CPU, CUDA on GPU; ``"auto"``) or
    ``"torch"`` (the reference). One launch pair on CUDA, no host synchronisation. Returns
    ``n_accepted`` int32 [B].
    """
    if _verify_backend(backend, block.device) == "torch":
        return sampling_reference.sample_verify_and_commit(probs, block, fill, sampling, target)
    return torch.ops.jacobi_engine.sample_verify_and_commit(probs, block, fill, *sampling.op_args(), *target.op_args())


@torch.library.register_fake("jacobi_engine::sample_verify_and_commit")
def _sample_verify_and_commit_fake(probs, block, *_):
    return block.new_empty((block.shape[0],), dtype=torch.int32)


def sample_tree_verify_and_commit(
    probs: torch.Tensor,
    block: torch.Tensor,
    candidates: torch.Tensor,
    usable: torch.Tensor,
    row: torch.Tensor,
    fill: torch.Tensor,
    sampling: SamplingState,
    target: CommitTarget,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact sampling over the token tree [block | candidate branches] + the commit of the winning path;
    see :func:`jacobi_engine.sampling_reference.sample_tree_verify_and_commit`.

    ``probs`` float32 [B, n + k * g, V], ``block`` int64 [B, n], ``candidates`` int64 [B, k, g], ``usable``
    bool [B, k], ``row``/``fill`` int64 [B, max(n, g + 1)]. ``backend``: ``"native"`` (C++ on CPU, CUDA on
    GPU; ``"auto"``) or ``"torch"`` (the vectorized reference: graph-safe, bit for bit the op's).
    Returns (``n_accepted`` int32 [B], ``winner`` int64 [B], -1 where the block won).
    """
    if _verify_backend(backend, block.device) == "torch":
        return sampling_reference.sample_tree_verify_and_commit(
            probs, block, candidates, usable, row, fill, sampling, target
        )
    return torch.ops.jacobi_engine.sample_tree_verify_and_commit(
        probs, block, candidates, usable, row, fill, *sampling.op_args(), *target.op_args()
    )


@torch.library.register_fake("jacobi_engine::sample_tree_verify_and_commit")
def _sample_tree_verify_and_commit_fake(probs, block, *_):
    batch = block.shape[0]
    return block.new_empty((batch,), dtype=torch.int32), block.new_empty((batch,), dtype=torch.long)
