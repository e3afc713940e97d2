"""Plain-PyTorch reference implementations of every fused op.

Each function here has exactly the semantics of the fused kernel of the same name in
:mod:`jacobi_engine.ops`. They are the CPU path of the engine when the compiled
extension is absent, the ``backend="torch"`` choice of each op, and the ground truth
the kernel tests compare against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from jacobi_engine._ext import CONSTANTS

if TYPE_CHECKING:
    from jacobi_engine.op_args import CommitTarget


@dataclass
class BlockLayout:
    """Where a block sits and what each of its queries sees; the same for every layer of a forward.

    ``flat_rows`` int64 [B*n]: cache row of each block token in the flattened (batch, row) axis;
    ``visible`` bool [B, 1, n, kv_len]: key row ``j`` is visible to query ``i`` of sequence ``b``.
    """

    flat_rows: torch.Tensor
    visible: torch.Tensor
    kv_len: int


def block_layout(
    cache_seqlens: torch.Tensor,
    n: int,
    capacity: int,
    kv_len: int | None = None,
    sliding_window: int | None = None,
    chunk_size: int | None = None,
    tree_mask: torch.Tensor | None = None,
    tree_depth: torch.Tensor | None = None,
) -> BlockLayout:
    """The :class:`BlockLayout` of an ``n``-token block at ``cache_seqlens`` int32 [B] in a cache of
    ``capacity`` rows (see :func:`jacobi_attention` for the mask, the token tree and ``kv_len``)."""
    device = cache_seqlens.device
    batch = cache_seqlens.shape[0]
    rows = cache_seqlens.to(torch.long)[:, None] + torch.arange(n, device=device)  # [B, n]
    flat_rows = (torch.arange(batch, device=device)[:, None] * capacity + rows).reshape(-1)
    kv_len = capacity if kv_len is None else min(int(kv_len), capacity)
    key_rows = torch.arange(kv_len, device=device)
    if tree_mask is None:
        key_pos = key_rows[None, None, :]  # a cache row's position is its index
        query_pos = rows[:, :, None]
        visible = key_pos <= query_pos  # [B, n, kv_len]
    else:
        starts = cache_seqlens.to(torch.long)[:, None, None]
        depth = tree_depth.to(torch.long)
        in_block = key_rows[None, None, :] - starts  # [B, 1, kv_len]: index of the key in the block
        inside = (in_block >= 0) & (in_block < n)
        block_index = in_block.clamp(0, n - 1)
        visible = (in_block < 0) | (inside & tree_mask[torch.arange(n, device=device)[None, :, None], block_index])
        key_pos = torch.where(inside, starts + depth[block_index], key_rows[None, None, :])
        query_pos = starts + depth[None, :, None]
    if sliding_window is not None and sliding_window > 0:
        visible = visible & (key_pos > query_pos - sliding_window)
    if chunk_size is not None:
        visible = visible & (key_pos // chunk_size == query_pos // chunk_size)
    return BlockLayout(flat_rows, visible[:, None], kv_len)


def jacobi_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    cache_seqlens: torch.Tensor,
    softmax_scale: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    kv_len: int | None = None,
    out: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    chunk_size: int | None = None,
    tree_mask: torch.Tensor | None = None,
    tree_depth: torch.Tensor | None = None,
    layout: BlockLayout | None = None,
    bound_rows: bool = False,
) -> torch.Tensor:
    """Block attention over a per-sequence prefix cache, with the block's K/V appended in place.

    Shapes: ``q`` [B, n, Hq, D_k]; ``k_cache`` [B, S, Hkv, D_k], ``v_cache`` [B, S, Hkv, D_v];
    ``k_new`` [B, n, Hkv, D_k], ``v_new`` [B, n, Hkv, D_v]; ``cache_seqlens`` int32 [B]; ``sinks``
    [Hq] or None. Returns ``out`` [B, n, Hq, D_v] in ``q``'s dtype.

    ``k_new``/``v_new`` are written to cache rows ``cache_seqlens[b] .. cache_seqlens[b]+n-1``.
    Query ``i`` of sequence ``b`` (at row ``r = cache_seqlens[b]+i``) attends to rows ``0 .. r``
    (bottom-right aligned causal mask, as ``flash_attn_with_kvcache``), restricted to the last
    ``sliding_window`` rows when that is set and to the rows ``j`` with ``j // chunk_size == r //
    chunk_size`` when ``chunk_size`` is set. ``softcap`` maps scaled scores ``s`` to
    ``softcap * tanh(s / softcap)``; ``sinks[h]`` is an extra logit in head ``h``'s softmax
    denominator that attends to nothing. ``cache_seqlens`` is not advanced.

    A token tree (a Jacobi block followed by candidate branches) replaces the causal in-block
    mask: ``tree_mask`` bool [n, n] says which block tokens token ``i`` sees (itself included) and
    ``tree_depth`` int [n] is each token's position offset, so token ``i`` sits at position
    ``cache_seqlens[b] + tree_depth[i]`` for the window and chunk masks. The prefix rows stay visible
    to every token. ``tree_mask = tril(ones)`` with ``tree_depth = arange(n)`` is the plain block.

    ``kv_len`` is an optional host-side upper bound on ``cache_seqlens.max() + n``; it only
    limits how many cache rows are read. Rows past ``cache_seqlens[b] + n`` must be finite
    (they are masked, but NaN * 0 would still poison the value product).

    ``layout`` is :func:`block_layout` of these arguments when the caller has it already (it is
    the same for every layer of a forward); it then decides the mask and ``kv_len``.
    ``bound_rows`` (CPU only) reads ``cache_seqlens.max()`` on the host and attends to the rows
    below it plus the block only, inside :func:`bounded_sdpa` (used under ``torch.compile``, where
    ``kv_len`` cannot follow the data).
    """
    batch, n, n_heads, head_dim = q.shape
    n_kv_heads = k_cache.shape[2]
    value_dim = v_cache.shape[3]
    seq_capacity = k_cache.shape[1]
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(head_dim)
    if layout is None:
        layout = block_layout(cache_seqlens, n, seq_capacity, kv_len, sliding_window, chunk_size, tree_mask, tree_depth)
    flat_rows, visible, kv_len = layout.flat_rows, layout.visible, layout.kv_len
    # Append the block: one index_copy_ per buffer over the flattened (batch, row) axis.
    k_cache.view(-1, n_kv_heads, head_dim).index_copy_(
        0, flat_rows, k_new.reshape(-1, n_kv_heads, head_dim).to(k_cache.dtype)
    )
    v_cache.view(-1, n_kv_heads, value_dim).index_copy_(
        0, flat_rows, v_new.reshape(-1, n_kv_heads, value_dim).to(v_cache.dtype)
    )
    keys = k_cache[:, :kv_len].transpose(1, 2)  # [B, Hkv, kv_len, D_k] views, no copies
    values = v_cache[:, :kv_len].transpose(1, 2)
    has_softcap = softcap is not None and softcap > 0
    if not has_softcap and sinks is None and bound_rows:
        result = torch.ops.jacobi_engine.bounded_sdpa(
            q.transpose(1, 2), keys, values, visible, cache_seqlens, softmax_scale
        ).transpose(1, 2)
    elif not has_softcap and sinks is None:
        result = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            keys.to(q.dtype),
            values.to(q.dtype),
            attn_mask=visible,
            scale=softmax_scale,
            enable_gqa=n_heads != n_kv_heads,
        ).transpose(1, 2)
    else:
        # Soft-capping (Gemma 2) and sinks have no SDPA equivalent: spell the attention out, GQA
        # grouped as [B, Hkv, group, n, D] x [B, Hkv, 1, kv_len, D] so K/V are never repeated.
        group = n_heads // n_kv_heads
        compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        q_grouped = q.reshape(batch, n, n_kv_heads, group, head_dim).permute(0, 2, 3, 1, 4)
        scores = torch.matmul(q_grouped.to(compute_dtype), keys[:, :, None].to(compute_dtype).transpose(-1, -2))
        scores = scores * softmax_scale
        if has_softcap:
            scores = torch.tanh(scores / softcap) * softcap
        scores = scores.masked_fill(~visible[:, :, None], float("-inf"))
        if sinks is None:
            probs = torch.softmax(scores, dim=-1)
        else:
            sink_logits = sinks.to(compute_dtype).reshape(1, n_kv_heads, group, 1, 1).expand(batch, -1, -1, n, 1)
            probs = torch.softmax(torch.cat([scores, sink_logits], dim=-1), dim=-1)[..., :-1]
        result = torch.matmul(probs, values[:, :, None].to(compute_dtype))  # [B, Hkv, group, n, D_v]
        result = result.permute(0, 3, 1, 2, 4).reshape(batch, n, n_heads, value_dim)
    result = result.to(q.dtype)
    if out is None:
        return result
    out.copy_(result)
    return out


@torch.library.custom_op("jacobi_engine::bounded_sdpa", mutates_args=())
def bounded_sdpa(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    visible: torch.Tensor,
    cache_seqlens: torch.Tensor,
    softmax_scale: float,
) -> torch.Tensor:
    """SDPA of ``query`` [B, Hq, n, D_k] over the first ``max(cache_seqlens) + n`` rows of ``keys``
    [B, Hkv, S, D_k] / ``values`` [B, Hkv, S, D_v] under the mask ``visible`` [B, 1, n, S] (rows past
    a sequence's own length are masked anyway): the same result as attending to all S rows.

    The bound is read on the host, so this is for CPU tensors (where that costs no device sync);
    as a custom op it stays opaque to ``torch.compile``, whose graph keeps static shapes around it.
    Returns a new contiguous [B, Hq, n, D_v] tensor in ``query``'s dtype.
    """
    rows = min(int(cache_seqlens.max()) + query.shape[2], keys.shape[2])
    return F.scaled_dot_product_attention(
        query,
        keys[:, :, :rows].to(query.dtype),
        values[:, :, :rows].to(query.dtype),
        attn_mask=visible[..., :rows],
        scale=softmax_scale,
        enable_gqa=query.shape[1] != keys.shape[1],
    ).contiguous()


@bounded_sdpa.register_fake
def _bounded_sdpa_fake(query, keys, values, visible, cache_seqlens, softmax_scale):
    return query.new_empty((*query.shape[:3], values.shape[3]))


_ERROR_BITS = CONSTANTS["error_bits"]  # csrc/op_errors.h


def raise_error_bits(errors: torch.Tensor, bits: dict[str, torch.Tensor]) -> None:
    """ORs into the error word ``errors`` (int32 [1]) the bit of each argument whose bool tensor has a
    True anywhere, on the device (no host sync: the references flag what the CUDA kernels flag)."""
    word = sum(flags.any().to(torch.int32) * _ERROR_BITS[name] for name, flags in bits.items())
    errors.bitwise_or_(word)


def commit_bounds(target: CommitTarget) -> tuple[torch.Tensor, torch.Tensor]:
    """csrc/verify_commit.h ``commit_bounds`` for every row: (each row's limit clamped into [0, W],
    int64 [B]; whether ``0 <= lengths <= that limit``, bool [B]). The bits of the unfinished rows'
    out-of-range values go into ``target.errors``; a row that is not usable is left as it is."""
    width = target.tokens.shape[1]
    limits, lengths = target.limits.to(torch.long), target.lengths.to(torch.long)
    bad_limit = (limits < 0) | (limits > width)
    limit = limits.clamp(0, width)
    usable = (lengths >= 0) & (lengths <= limit)
    bad_length = ~usable & ((lengths < 0) | (lengths > width) | ~bad_limit)
    active = ~target.done
    raise_error_bits(target.errors, {"limits": active & bad_limit, "lengths": active & bad_length})
    return limit, usable


def verify_and_commit(
    scores: torch.Tensor, block: torch.Tensor, fill: torch.Tensor, target: CommitTarget
) -> torch.Tensor:
    """One Jacobi fixed-point check and commit, for every sequence of the batch.

    ``scores`` is either the block's logits [B, n, V] (float) or their argmax [B, n] (int64).
    ``block`` int64 [B, n] holds the tokens that were fed: ``block[:, 0]`` is known-correct, the
    rest are guesses. ``fill`` int64 [B, n] supplies guesses for slots the shift frees. ``target``
    (:class:`jacobi_engine.op_args.CommitTarget`) is where the verified tokens go, with the terms used here.

    Per active sequence the predictions are ``p = argmax(scores)`` and the accepted count ``a`` is 1
    plus the length of the longest prefix with ``block[j+1] == p[j]``. A committed block becomes
    ``[p[a-1], ..., p[n-1], fill[b, n-a+1:]]``; an uncommitted chunk becomes
    ``[block[0], p[0], ..., p[n-2]]`` (the Jacobi update in place).

    Out-of-range ``lengths``/``limits`` are clamped and flagged as the CUDA op does (:func:`commit_bounds`).
    Returns ``n_accepted`` int32 [B]: ``a`` for sequences active at this step, 0 for finished ones.
    """
    tokens, lengths, done, eos_ids = target.tokens, target.lengths, target.done, target.eos_ids
    cache_seqlens, chunked = target.cache_seqlens, target.chunked
    limit, usable = commit_bounds(target)
    batch, n = block.shape
    preds = scores.argmax(dim=-1) if scores.is_floating_point() else scores.to(torch.long)
    matches = (block[:, 1:] == preds[:, :-1]).to(torch.int32)
    n_accepted = 1 + matches.cumprod(dim=1).sum(dim=1)  # [B] int
    active = ~done & usable

    slots = torch.arange(n, device=block.device)
    verified = slots[None, :] < n_accepted[:, None]
    if eos_ids.numel() > 0:
        is_eos = torch.isin(preds, eos_ids) & verified
        has_eos = is_eos.any(dim=1)
        first_eos = torch.where(has_eos, is_eos.to(torch.int32).argmax(dim=1), n)
    else:
        has_eos = torch.zeros_like(done)
        first_eos = torch.full_like(n_accepted, n)
    remaining = limit - lengths.to(torch.long)
    n_emit = torch.minimum(torch.minimum(n_accepted, first_eos + 1), remaining)
    finished = has_eos | (n_emit >= remaining)
    commit = active & (finished | (n_accepted == n) | (not chunked))

    # Scatter the verified tokens to columns lengths + j, and the slots not emitted to n spare
    # columns past the buffer, so every index is distinct and no shape depends on data
    # (CUDA-graph safe) whatever the buffer's width.
    emit_rows = commit[:, None] & (slots[None, :] < n_emit[:, None])
    width = tokens.shape[1]
    columns = torch.where(emit_rows, lengths.to(torch.long)[:, None] + slots[None, :], width + slots[None, :])
    extended = torch.cat([tokens, tokens.new_zeros((batch, n))], dim=1)
    extended.scatter_(1, columns, preds)
    tokens.copy_(extended[:, :width])

    shift_src = n_accepted[:, None] - 1 + slots[None, :]
    shifted = torch.where(shift_src < n, preds.gather(1, shift_src.clamp(max=n - 1)), fill)
    jacobi_update = torch.cat([block[:, :1], preds[:, :-1]], dim=1)
    next_block = torch.where(commit[:, None], shifted, jacobi_update)
    block.copy_(torch.where(active[:, None], next_block, block))

    lengths.add_(torch.where(commit, n_emit, 0).to(lengths.dtype))
    advance = torch.where(finished, n_emit, n_accepted)
    cache_seqlens.add_(torch.where(commit, advance, 0).to(cache_seqlens.dtype))
    done.logical_or_(commit & finished)
    return torch.where(active, n_accepted, 0).to(torch.int32)


def move_cache_rows(
    buffers: list[torch.Tensor], src: torch.Tensor, dst: torch.Tensor, rows: int, errors: torch.Tensor
) -> None:
    """KV commit of a winning candidate branch: copies cache rows ``src[b] .. src[b]+rows-1`` to
    ``dst[b] .. dst[b]+rows-1`` in every buffer ``[B, S, H, D]`` of ``buffers``.

    ``src``/``dst`` int64 [B]. A sequence with ``src[b] == dst[b]`` is left as it is. The rows must lie
    inside ``S`` and, where they overlap, move back (csrc/kv_commit.h ``rows_in_cache``); a sequence
    whose rows do not is left as it is and flagged in ``errors`` (int32 [1]), as the CUDA op does.
    """
    if not buffers:
        return
    batch = buffers[0].shape[0]
    capacity = min(buffer.shape[1] for buffer in buffers)
    last_start = capacity - rows
    fits = (src >= 0) & (dst >= 0) & (src <= last_start) & (dst <= last_start)
    valid = fits & ((dst <= src) | (dst >= src + rows)) & (rows <= capacity)
    raise_error_bits(errors, {"src/dst": ~valid})
    if rows == 0 or rows > capacity:
        return
    src, dst = torch.where(valid, src, 0), torch.where(valid, dst, 0)  # a refused row moves onto itself
    capacity = buffers[0].shape[1]
    offsets = torch.arange(rows, device=src.device)
    base = torch.arange(batch, device=src.device)[:, None] * capacity
    from_rows = (base + src[:, None] + offsets).reshape(-1)
    to_rows = (base + dst[:, None] + offsets).reshape(-1)
    for buffer in buffers:
        flat = buffer.view(batch * capacity, *buffer.shape[2:])
        flat.index_copy_(0, to_rows, flat.index_select(0, from_rows))
