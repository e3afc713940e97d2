"""Which Hugging Face causal LMs the engine drives exactly, decided once, at ``JacobiEngine(model)``.

Jacobi decoding feeds blocks of guesses and keeps only a verified prefix of each block. That is
exact when every piece of state a forward leaves behind is K/V rows that the next block simply
overwrites. It is not when the model keeps any other state (recurrent, SSM or convolution
state in its modules or cache: it would absorb the rejected guesses), when attention is not
causal, or when the model reaches past ``AttentionInterface`` into the cache. We detect these
from the model's structure and config rather than from a list of names, and finally run a
two-forward probe through the engine's own cache and attention so that anything else that
would fail inside ``generate`` fails here, with its reason.
"""

from __future__ import annotations

import weakref

import torch

# Layer types whose cache is K/V rows indexed by position; the masks of the other attention
# types are derived from the config by the attention dispatch.
ATTENTION_LAYER_TYPES = {"full_attention", "sliding_attention", "chunked_attention", "attention", "global", "local"}
# Layer types transformers' cache gives recurrent (SSM, linear-attention) or convolution state.
_STATEFUL_HINTS = ("conv", "linear", "mamba", "recurrent", "ssm", "rnn", "hybrid", "lstm", "rwkv", "delta")

_probe_results: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _text_config(config):
    try:
        return config.get_text_config(decoder=True)
    except Exception:  # several candidate text configs: the outer one is what the model reads
        return config


def _config_layer_types(config) -> list[str]:
    types = []
    for name in ("layer_types", "layers_block_type", "block_types", "hybrid_override_pattern"):
        try:
            value = getattr(config, name, None)
        except Exception:
            value = None
        if isinstance(value, str):
            value = list(value)
        if isinstance(value, (list, tuple)):
            types.extend(str(kind) for kind in value if kind is not None)
    return types


def _refuse(model, reason: str) -> None:
    raise ValueError(f"model {type(model).__name__} is not supported by jacobi_engine: {reason}")


def _check_layer_types(model, config) -> None:
    for kind in dict.fromkeys(_config_layer_types(config)):
        lowered = kind.lower()
        if lowered in ATTENTION_LAYER_TYPES or lowered in ("moe", "mlp", "dense", "*", "-", "e"):
            continue
        if any(hint in lowered for hint in _STATEFUL_HINTS):
            _refuse(
                model,
                f"its '{kind}' layers keep recurrent/convolution state, which cannot be rolled back when "
                "a Jacobi step rejects guesses",
            )
        if "index" in lowered or "sparse" in lowered or "compress" in lowered:
            _refuse(
                model,
                f"its '{kind}' layers select keys with an indexer that reads the attention mask or its own "
                "cache, which the engine's attention op does not provide",
            )
        _refuse(model, f"layer type '{kind}' is not an attention layer type the engine knows")


def _check_modules(model) -> None:
    decoder = model.get_decoder() if callable(getattr(model, "get_decoder", None)) else model
    decoder = decoder if isinstance(decoder, torch.nn.Module) else model
    for name, module in decoder.named_modules():
        if isinstance(module, torch.nn.Conv1d):
            # A temporal convolution over the token axis carries state from token to token.
            _refuse(
                model,
                f"module '{name}' is a causal convolution over tokens; its state cannot be rolled back when "
                "a Jacobi step rejects guesses",
            )
        if getattr(module, "is_causal", None) is False and hasattr(module, "forward") and _is_self_attention(module):
            _refuse(
                model,
                f"attention module '{name}' is bidirectional (is_causal=False; for BERT-style models set "
                "config.is_decoder=True); Jacobi decoding needs causal attention",
            )


def _is_self_attention(module) -> bool:
    # Cross-attention modules also say is_causal=False; a decoder-only model has none.
    has_query = any(hasattr(module, name) for name in ("q_proj", "query", "q", "qkv_proj", "c_attn", "Wqkv"))
    return has_query and not getattr(module, "is_cross_attention", False)


def _probe(model, info) -> str | None:
    """Runs a prefill and one block through the engine's cache and attention; the error, if any."""
    from jacobi_engine import ops
    from jacobi_engine.attention import jacobi_attention_enabled
    from jacobi_engine.cache import JacobiCache
    from jacobi_engine.context import ForwardContext
    from jacobi_engine.prefill import ModelForward

    device = model.get_input_embeddings().weight.device
    cache = JacobiCache(info.num_layers, 1, 8, device)
    context = ForwardContext(cache, ops.resolve_attention_backend("auto", device))
    forward = ModelForward(model, info, context)
    tokens = torch.zeros(1, 3, dtype=torch.long, device=device)
    try:
        with torch.no_grad(), jacobi_attention_enabled(model, context):
            for start, width in ((0, 3), (3, 2)):
                positions = torch.arange(start, start + width, device=device)[None]
                logits = forward(tokens[:, :width], positions, kv_len=start + width)
                if not isinstance(logits, torch.Tensor):
                    return "its forward returns no logits"
                cache.cache_seqlens.add_(width)
    except Exception as error:  # anything that would otherwise fail inside generate
        return f"{type(error).__name__}: {error}"
    return None


def check_supported(model, info) -> None:
    """Raises ValueError with the reason when the engine cannot decode ``model`` exactly."""
    config = _text_config(model.config)
    _check_layer_types(model, config)
    _check_modules(model)
    if model not in _probe_results:
        _probe_results[model] = _probe(model, info)
    error = _probe_results[model]
    if error is not None:
        _refuse(model, f"a forward through the engine's cache and attention fails ({error})")
