"""The attention of packed consistency training: the noise-aware mask of a packed row and the
attention function that gives it to the model (:mod:`jacobi_engine.training.packing` lays the rows out).

The mask reaches the model as a 4-D mask: transformers' mask creation returns a 4-D tensor or a
``BlockMask`` as is (``masking_utils._preprocess_mask_arguments``), and the model's attention
function is switched to :data:`PACKED_ATTENTION`, registered with ``AttentionInterface``: it
hands a boolean mask to transformers' SDPA function and a ``BlockMask`` to its FlexAttention
function (GQA, scaling, soft-capping as those implement them). ``AttentionMaskInterface`` gets
the SDPA mask builder under the same name, so plain 2-D ``attention_mask`` calls (evaluation,
generation) keep working on a model switched to it. Any model that routes attention through
``AttentionInterface`` and takes ``position_ids`` works (Llama, Qwen2, Mistral, GPT-2, ...).

FlexAttention has no backward on CPU (torch 2.14: "FlexAttention does not support backward on
CPU"), so training on CPU uses SDPA; FlexAttention serves gradient-free forwards there (the
local loss's teacher) and training on GPUs.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

PACKED_ATTENTION = "jacobi_packed"
ATTENTIONS = ("sdpa", "flex")
PROMPT_CHUNK = -1  # chunk id of prompt tokens (and of ar_data rows, which are plain causal rows)
PAD_CHUNK = -2  # chunk id of padding


def _softcapped_attention(module, query, key, value, mask, scaling=None, dropout=0.0, softcap=None, **kwargs):
    # transformers' SDPA function refuses soft-capping (Gemma 2) and each model keeps its eager
    # function to itself, so the few lines of math are here.
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = torch.nn.functional.dropout(probs, p=dropout, training=module.training)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


def _packed_attention(module, query, key, value, attention_mask, **kwargs):
    """AttentionInterface entry: q [B, Hq, L, D], k/v [B, Hkv, L, D], mask bool [B, 1, L, L] or a
    ``BlockMask`` -> ([B, L, Hq, D], weights or None), by transformers' SDPA or FlexAttention function
    (soft-capped logits with a boolean mask: by the math above)."""
    from torch.nn.attention.flex_attention import BlockMask

    if kwargs.get("s_aux") is not None:
        raise ValueError("packed training does not support attention sinks (s_aux)")
    if isinstance(attention_mask, BlockMask):
        from transformers.integrations.flex_attention import flex_attention_forward

        return flex_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if kwargs.get("softcap") is not None and attention_mask is not None:
        return _softcapped_attention(module, query, key, value, attention_mask, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(PACKED_ATTENTION, _packed_attention)
AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)


def use_packed_attention(model) -> str:
    """Switch ``model`` to :data:`PACKED_ATTENTION`; returns the implementation it had (to restore
    before saving or decoding elsewhere). The name is not saved with the config."""
    previous = model.config._attn_implementation
    if previous != PACKED_ATTENTION:
        model.set_attn_implementation(PACKED_ATTENTION)
        if model.config._attn_implementation != PACKED_ATTENTION:
            raise ValueError(
                f"{type(model).__name__} cannot switch its attention implementation (it does not route attention "
                "through transformers' AttentionInterface), so packed training cannot give it its mask"
            )
    return previous


LAYOUT_KEYS = ("position_ids", "chunk_id", "noisy", "context_length")


def packed_mask_mod(layout, window: int | None = None):
    """The noise-aware mask as a FlexAttention ``mask_mod(b, h, q, kv) -> bool``.

    ``layout``: a mapping with, each [R, L], ``position_ids`` int64; ``chunk_id`` int64 (-1
    prompt, k for clean chunk k and for noisy block k, -2 padding); ``noisy`` bool; and
    ``context_length`` int64: a noisy token sees the clean tokens at positions below it (the
    prompt, the chunks before its own, and the slots of its own chunk before its block starts).
    With ``window`` (a sliding-window layer), a query also sees only keys less than ``window``
    positions behind it, as the unpacked sample's sliding-window mask does. Also evaluates on
    broadcast index tensors (:func:`dense_packed_mask`).
    """
    chunk_id, noisy = layout["chunk_id"], layout["noisy"]
    position_ids, context_length = layout["position_ids"], layout["context_length"]

    def mask_mod(b, h, q, kv):
        q_chunk, kv_chunk = chunk_id[b, q], chunk_id[b, kv]
        q_noisy, kv_noisy = noisy[b, q], noisy[b, kv]
        kv_position = position_ids[b, kv]
        causal = kv <= q
        clean_to_clean = ~q_noisy & ~kv_noisy & causal
        noisy_to_context = q_noisy & ~kv_noisy & (kv_position < context_length[b, q])
        noisy_to_itself = q_noisy & kv_noisy & (kv_chunk == q_chunk) & causal
        allowed = clean_to_clean | noisy_to_context | noisy_to_itself
        allowed = allowed & (q_chunk != PAD_CHUNK) & (kv_chunk != PAD_CHUNK)
        if window is not None:
            allowed = allowed & (position_ids[b, q] - kv_position < window)
        # A padding query attends to itself only: a row with no key would give NaN in SDPA.
        return allowed | (q == kv)

    return mask_mod


def dense_packed_mask(layout, window: int | None = None) -> torch.Tensor:
    """The mask of :func:`packed_mask_mod` as a boolean tensor [R, 1, L, L] (True: attend)."""
    rows, length = layout["chunk_id"].shape
    device = layout["chunk_id"].device
    b = torch.arange(rows, device=device)[:, None, None, None]
    q = torch.arange(length, device=device)[None, None, :, None]
    kv = torch.arange(length, device=device)[None, None, None, :]
    return packed_mask_mod(layout, window)(b, 0, q, kv)


def block_packed_mask(layout, window: int | None = None):
    """The mask of :func:`packed_mask_mod` as a FlexAttention ``BlockMask`` (one head, broadcast)."""
    from torch.nn.attention.flex_attention import create_block_mask

    rows, length = layout["chunk_id"].shape
    device = layout["chunk_id"].device
    return create_block_mask(packed_mask_mod(layout, window), rows, None, length, length, device=device)


def model_attention_mask(config, layout, attention: str = "sdpa"):
    """What to pass as ``attention_mask``: one 4-D mask, or, for a model mixing full and
    sliding-window layers (``config.layer_types``), the dict of both that such models accept."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    build = dense_packed_mask if attention == "sdpa" else block_packed_mask
    window = getattr(text_config, "sliding_window", None)
    layer_types = set(getattr(text_config, "layer_types", None) or [])
    if layer_types:
        if "sliding_attention" not in layer_types:
            window = None
        elif layer_types - {"sliding_attention"}:
            return {"full_attention": build(layout), "sliding_attention": build(layout, window)}
    return build(layout, window)


def packed_logits(model, input_ids: torch.Tensor, layout, attention: str = "sdpa") -> torch.Tensor:
    """Logits [R, L, V] of packed rows: ``input_ids`` int64 [R, L]; ``layout`` a mapping with the
    tensors of :data:`LAYOUT_KEYS` (a :class:`~jacobi_engine.training.packing.PackedCollator` batch is
    one); ``attention``: ``"sdpa"`` (boolean mask) or ``"flex"`` (BlockMask)."""
    if attention not in ATTENTIONS:
        raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
    inner = getattr(model, "module", model)  # DDP wraps the model
    use_packed_attention(inner)
    mask = model_attention_mask(inner.config, layout, attention)
    return model(input_ids=input_ids, position_ids=layout["position_ids"], attention_mask=mask, use_cache=False).logits
