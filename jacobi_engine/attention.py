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

from jacobi_engine import ops
from jacobi_engine.cache import JacobiCache

ATTN_IMPLEMENTATION = "jacobi_engine"

_active = threading.local()


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
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """AttentionInterface entry: q [B, Hq, n, D], new k/v [B, Hkv, n, D] -> ([B, n, Hq, D], None)."""
    state = getattr(_active, "state", None)
    if state is None:
        raise RuntimeError(
            "the 'jacobi_engine' attention implementation only runs inside a JacobiEngine forward; "
            "set the model back to 'sdpa' or 'eager' to use it on its own"
        )
    cache, backend = state
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError("attention sinks (s_aux) are not supported by jacobi_engine yet")
    if cache.current_layer is None:
        raise RuntimeError("the model called attention without updating the cache first")
    k_cache, v_cache = cache.layer(cache.current_layer)
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
    )
    cache.current_layer = None
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
    _active.state = (cache, backend)
    try:
        for config in configs:
            config._attn_implementation_internal = ATTN_IMPLEMENTATION
        yield
    finally:
        for config, implementation in zip(configs, saved):
            config._attn_implementation_internal = implementation
        _active.state = previous_state
