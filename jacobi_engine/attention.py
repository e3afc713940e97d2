"""Hugging Face attention dispatch: routes a model's attention calls to our block attention op.

We register one attention function with ``transformers.AttentionInterface`` under the name
``"jacobi_engine"`` and switch a model to it only while engine calls run on it
(:func:`jacobi_attention_enabled`), so the user's model is left untouched for everything else.
The op derives the mask from ``cache_seqlens`` (prefix + causal-within-block, per sequence), so
the mask function registered under the same name builds nothing inside an engine forward.

Threads: what an engine forward needs is the per-forward context of *this* thread
(:mod:`jacobi_engine.context`). The model-wide switch is reference-counted under a lock (the
original implementation comes back when the last engine call on the model ends), and while it is
switched, a forward of the same model in another thread (a plain ``model.generate``) finds no
context there and is served by the model's original attention and mask functions, exactly as if
nothing had been switched.

Which kernel runs is decided in exactly one place, :func:`jacobi_engine.ops.jacobi_attention`.
"""

from __future__ import annotations

import contextlib
import sys
import threading

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from jacobi_engine import context as forward_context
from jacobi_engine import ops, reference

ATTN_IMPLEMENTATION = "jacobi_engine"

# id(config) -> [config, its own implementation, engine calls running on it]
_switched: dict[int, list] = {}
_switch_lock = threading.Lock()


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


def _retune_query_temperature(module: torch.nn.Module, query: torch.Tensor, ctx) -> torch.Tensor:
    """Redo Llama 4's position-dependent query scaling with each row's own positions.

    The module scales the queries of its NoPE layers by a function of ``cache.get_seq_length() + i``,
    one length for the whole batch; under the engine that is only a bound. Each row's block starts
    at ``cache_seqlens[b]``, so the scale is divided out and the right one multiplied in.
    ``query`` [B, Hq, n, D] -> same shape.
    """
    cache = ctx.cache
    n = query.shape[2]
    offsets = torch.arange(n, device=query.device)
    applied = _temperature_scale(module, offsets + cache.get_seq_length(getattr(module, "layer_idx", 0)))
    if ctx.tree_depth is not None:  # a token tree: each token's position is its depth
        offsets = ctx.tree_depth.to(torch.long)
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
    ctx = forward_context.current()
    if ctx is None:  # a forward outside any engine call (another thread, or the model used on its own)
        original = _original_attention(module)
        return original(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
            sliding_window=sliding_window, softcap=softcap, s_aux=s_aux, **kwargs,
        )  # fmt: skip
    cache, backend = ctx.cache, ctx.backend
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
        query = _retune_query_temperature(module, query, ctx)
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
        layout_key = (n, ctx.kv_len_bound, sliding_window, chunk_size)
        layout = cache.layouts.get(layout_key)
        if layout is None:
            layout = reference.block_layout(
                cache.cache_seqlens,
                n,
                k_cache.shape[1],
                ctx.kv_len_bound,
                sliding_window,
                chunk_size,
                ctx.tree_mask,
                ctx.tree_depth,
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
        kv_len=ctx.kv_len_bound,
        backend=backend,
        sinks=s_aux,
        chunk_size=chunk_size,
        tree_mask=ctx.tree_mask,
        tree_depth=ctx.tree_depth,
        layout=layout,
        check=check,
    )
    cache.current_layer = None
    cache.block_keys[layer], cache.block_values[layer] = key, value
    return out, None


def _original_implementation(config) -> str:
    entry = _switched.get(id(config))
    if entry is None:  # the model was switched by hand, not by an engine call
        raise RuntimeError(
            "the 'jacobi_engine' attention implementation only runs inside a JacobiEngine forward; "
            "set the model back to 'sdpa' or 'eager' to use it on its own"
        )
    return entry[1]


def _original_attention(module: torch.nn.Module):
    implementation = _original_implementation(module.config)
    if implementation == "eager" or implementation not in ALL_ATTENTION_FUNCTIONS:
        # Each model keeps its eager function in its own modeling file.
        eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if eager is None:
            raise RuntimeError(
                f"{type(module).__name__} runs attention {implementation!r} in another thread while a JacobiEngine "
                "call switched its model; load the model with attn_implementation='sdpa' to use both at once"
            )
        return eager
    return ALL_ATTENTION_FUNCTIONS[implementation]


def _block_mask(*args, config=None, **kwargs):
    """AttentionMaskInterface entry: no mask inside an engine forward (the op masks by
    ``cache_seqlens``); outside one, the mask the model's own implementation would build."""
    if forward_context.current() is not None:
        return None
    return ALL_MASK_ATTENTION_FUNCTIONS[_original_implementation(config)](*args, config=config, **kwargs)


AttentionInterface.register(ATTN_IMPLEMENTATION, _block_attention)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _block_mask)


def _model_configs(model: torch.nn.Module) -> list:
    configs, seen = [], set()
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation_internal") and id(config) not in seen:
            seen.add(id(config))
            configs.append(config)
    return configs


@contextlib.contextmanager
def jacobi_attention_enabled(model: torch.nn.Module, ctx: forward_context.ForwardContext):
    """Run ``model`` with Jacobi block attention in this thread, with per-forward context ``ctx``.

    The switch of the model's attention implementation is shared by every engine call running on the
    model (reference-counted): the last one to leave puts the original back.
    """
    configs = _model_configs(model)
    with _switch_lock:
        for config in configs:
            entry = _switched.get(id(config))
            if entry is None:
                entry = _switched[id(config)] = [config, config._attn_implementation_internal, 0]
                config._attn_implementation_internal = ATTN_IMPLEMENTATION
            entry[2] += 1
    try:
        with forward_context.installed(ctx):
            yield
    finally:
        with _switch_lock:
            for config in configs:
                entry = _switched[id(config)]
                entry[2] -= 1
                if entry[2] == 0:
                    config._attn_implementation_internal = entry[1]
                    del _switched[id(config)]
