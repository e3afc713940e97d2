"""Hugging Face attention dispatch: routes a model's attention calls to our block attention op.

We register one attention function with ``transformers.AttentionInterface`` under the name
``"jacobi_engine"`` and switch a model to it only for the duration of an engine forward
(:func:`jacobi_attention_enabled`), so the user's model is left untouched for everything
else. No mask function is registered, so transformers builds no mask; the op derives the
mask from ``cache_seqlens`` (prefix + causal-within-block, per sequence).

Which kernel runs is decided in exactly one place, :func:`jacobi_engine.ops.jacobi_attention`.
"""

from __future__ import annotations

import contextlib
import threading

import torch
from transformers import AttentionInterface

from jacobi_engine import ops, reference
from jacobi_engine.cache import JacobiCache

ATTN_IMPLEMENTATION = "jacobi_engine"

_active = threading.local()


def _layer_type(module: torch.nn.Module) -> str | None:
    config, layer_idx = getattr(module, "config", None), getattr(module, "layer_idx", None)
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_idx, int) and isinstance(layer_types, (list, tuple)) and 0 <= layer_idx < len(layer_types):
        return layer_types[layer_idx]
    return None


def _layer_masks(module: torch.nn.Module, sliding_window: int | None) -> tuple[int | None, int | None]:
    """(sliding_window, chunk_size) of this layer.

    transformers builds the mask of each layer from its config's ``layer_types``; we build no mask,
    so the same config fields decide here: a sliding layer whose module does not pass its window
    gets ``config.sliding_window``, a chunked layer (Llama 4) ``config.attention_chunk_size``.
    """
    layer_type = _layer_type(module)
    config = getattr(module, "config", None)
    chunk_size = None
    if layer_type == "sliding_attention" and sliding_window is None:
        sliding_window = getattr(config, "sliding_window", None)
    elif layer_type == "chunked_attention":
        chunk_size = getattr(config, "attention_chunk_size", None)
    return sliding_window, chunk_size


def _temperature_scale(module: torch.nn.Module, positions: torch.Tensor) -> torch.Tensor:
    # Llama 4's attention temperature tuning of its NoPE layers, as the module computes it.
    return torch.log1p(torch.floor((positions.float() + 1.0) / module.floor_scale)) * module.attn_scale + 1.0


def _retune_query_temperature(module: torch.nn.Module, query: torch.Tensor, cache: JacobiCache) -> torch.Tensor:
    """Redo Llama 4's position-dependent query scaling with each row's own positions.

    The module scales the queries of its NoPE layers by a function of ``cache.get_seq_length() + i``,
    one length for the whole batch; under the engine that is only a bound. Each row's block starts
    at ``cache_seqlens[b]``, so the scale is divided out and the right one multiplied in.
    ``query`` [B, Hq, n, D] -> same shape.
    """
    n = query.shape[2]
    offsets = torch.arange(n, device=query.device)
    applied = _temperature_scale(module, offsets + cache.get_seq_length(getattr(module, "layer_idx", 0)))
    if cache.tree_depth is not None:  # a token tree: each token's position is its depth
        offsets = cache.tree_depth.to(torch.long)
    true = _temperature_scale(module, cache.cache_seqlens.to(torch.long)[:, None] + offsets)  # [B, n]
    return (query * (true / applied)[:, None, :, None]).to(query.dtype)


def _block_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    s_aux: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """AttentionInterface entry: q [B, Hq, n, D_k], new k [B, Hkv, n, D_k], v [B, Hkv, n, D_v] -> ([B, n, Hq, D_v], None).

    ``s_aux`` [Hq] are per-head attention-sink logits (gpt-oss, Granite SWA): one extra softmax
    logit per head that attends to nothing.
    """
    state = getattr(_active, "state", None)
    if state is None:
        raise RuntimeError(
            "the 'jacobi_engine' attention implementation only runs inside a JacobiEngine forward; "
            "set the model back to 'sdpa' or 'eager' to use it on its own"
        )
    cache, backend = state
    # A shared-KV layer (Gemma-3n) calls attention with the very K/V an earlier layer attended with,
    # and no update() of its own: it attends to that layer's buffers, and re-appending the same
    # rows changes nothing. Otherwise the K/V belong to the layer whose update() just ran; they may
    # have been transformed per token since (MLA expands a latent): the cache stores them as given.
    layer = cache.producer_of(key, value)
    if layer is None:
        layer = cache.current_layer
    if layer is None:
        raise RuntimeError(
            "the model's attention received K/V other than those of its own cache.update() (for example "
            "two attention calls with different values per layer); the engine caches one K/V per layer"
        )
    sliding_window, chunk_size = _layer_masks(module, sliding_window)
    if getattr(module, "attn_temperature_tuning", False) and not getattr(module, "use_rope", True):
        query = _retune_query_temperature(module, query, cache)
    k_cache, v_cache = cache.buffers(layer, key, value)
    n = query.shape[2]
    # Arguments are checked once per (layer, block length) and call, not in every forward; a compiled
    # step checks them while it is traced (and must not read the host-side set, which would be guarded).
    compiling = torch.compiler.is_compiling()
    check = compiling or (layer, n) not in cache.attention_checked
    if check and not compiling:
        cache.attention_checked.add((layer, n))
    layout = None
    # (A compiled step on the CPU attends through ops' bounded op, which needs no layout.)
    if backend == "torch" and not (compiling and cache.device.type == "cpu"):
        # The mask and the cache rows of the block are the same in every layer with these settings.
        layout_key = (n, cache.kv_len_bound, sliding_window, chunk_size)
        layout = cache.layouts.get(layout_key)
        if layout is None:
            layout = reference.block_layout(
                cache.cache_seqlens,
                n,
                k_cache.shape[1],
                cache.kv_len_bound,
                sliding_window,
                chunk_size,
                cache.tree_mask,
                cache.tree_depth,
            )
            cache.layouts[layout_key] = layout
    out = ops.jacobi_attention(
        query.transpose(1, 2),
        k_cache,
        v_cache,
        key.transpose(1, 2),
        value.transpose(1, 2),
        cache.cache_seqlens,
        softmax_scale=scaling,
        sliding_window=sliding_window,
        softcap=softcap,
        kv_len=cache.kv_len_bound,
        backend=backend,
        sinks=s_aux,
        chunk_size=chunk_size,
        tree_mask=cache.tree_mask,
        tree_depth=cache.tree_depth,
        layout=layout,
        check=check,
    )
    cache.current_layer = None
    cache.block_keys[layer], cache.block_values[layer] = key, value
    return out, None


AttentionInterface.register(ATTN_IMPLEMENTATION, _block_attention)


def _model_configs(model: torch.nn.Module) -> list:
    configs, seen = [], set()
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation_internal") and id(config) not in seen:
            seen.add(id(config))
            configs.append(config)
    return configs


@contextlib.contextmanager
def jacobi_attention_enabled(model: torch.nn.Module, cache: JacobiCache, backend: str = "auto"):
    """Run ``model`` with Jacobi block attention over ``cache`` inside this context."""
    configs = _model_configs(model)
    saved = [config._attn_implementation_internal for config in configs]
    previous_state = getattr(_active, "state", None)
    # Resolved once here rather than in every layer's call.
    _active.state = (cache, ops.resolve_attention_backend(backend, cache.device))
    try:
        for config in configs:
            config._attn_implementation_internal = ATTN_IMPLEMENTATION
        yield
    finally:
        for config, implementation in zip(configs, saved):
            config._attn_implementation_internal = implementation
        _active.state = previous_state
