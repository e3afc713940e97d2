"""Triton block attention with in-place K/V append (the ``backend="triton"`` of ``ops.jacobi_attention``).

Same semantics as :func:`jacobi_engine.reference.jacobi_attention`; the layout and the masking
follow ``flash_attn_with_kvcache``: cache ``[B, S, Hkv, D]``, per-sequence ``cache_seqlens``,
bottom-right aligned causal mask.

Design
------
One program handles one tile of query rows of one (sequence, kv head). A tile row is a
(query, q head) pair: the ``group = Hq // Hkv`` query heads that share a kv head are packed
into the same tile, so every K/V tile is loaded once per group and a decode step with few
queries still fills the 16-row minimum of ``tl.dot``.

Race freedom by construction: a program reads the cached prefix (rows ``< cache_seqlens[b]``)
from the cache and the block's own keys/values from ``k_new``/``v_new``, never from the rows
being appended. Exactly one program per (sequence, kv head, query tile) (split 0 when split)
copies its tile's rows of ``k_new``/``v_new`` into the cache. Loads of cache rows at or past
``cache_seqlens[b]`` are masked off, so garbage or NaN there cannot leak in.

Long prefixes with few (sequence, kv head) pairs use split-K ("flash-decoding"): the prefix is
cut into ``num_splits`` chunks, each program writes a partial output and its log-sum-exp, and
a second small kernel merges them. Chunk boundaries are computed in the kernel from
``cache_seqlens``, so no host synchronisation is needed.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256

# Split-K only pays off when the (sequence, kv head) programs cannot fill the GPU and the cache
# is long enough for each split to stream a few K/V tiles.
_SPLIT_MIN_ROWS = 256
_MAX_SPLITS = 64

_LOG2E = tl.constexpr(1.4426950408889634)

# CUDA's limits on the y and z grid dimensions; the (sequence, kv head) pairs fold into z past y's.
MAX_GRID_Y = 65535
MAX_GRID_Z = 65535

# fp32 inputs: plain TF32 (~1e-3) would miss the reference by far more than fp32 rounding, and
# "ieee" lowers to FMA loops that spill heavily at head_dim >= 64 (ptxas, sm_90). Three TF32
# tensor-core products (big*big + big*small + small*big) are accurate to ~1e-6.
_FP32_DOT_PRECISION = "tf32x3"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _tile_mask(rows_ok, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    # Skipping the head-dim term when it is always true keeps loads vectorised.
    if HEAD_DIM == BLOCK_D:
        return rows_ok[:, None]
    else:
        return rows_ok[:, None] & (offs_d[None, :] < HEAD_DIM)


@triton.jit
def _tile_offsets(rows, stride_row, cols, stride_col):
    """int64 [rows, cols] element offsets ``rows * stride_row + cols * stride_col``.

    In int64 because the products pass 2**31 in real caches: a cache row of 32 kv heads x 128 is 4096
    elements, so row 524288 is already 2**31 (87k rows with expanded MLA heads), and a long prefill's
    query rows go as far. The strides arrive as int32 when they fit, the indices always do."""
    return rows.to(tl.int64)[:, None] * stride_row + cols.to(tl.int64)[None, :] * stride_col


@triton.jit
def _load_rows(base, rows, stride_row, stride_d, offs_d, mask, DTYPE: tl.constexpr):
    """A [rows, head_dim] tile of a K or V tensor, masked rows read as 0, cast to the compute dtype."""
    return tl.load(base + _tile_offsets(rows, stride_row, offs_d, stride_d), mask=mask, other=0.0).to(DTYPE)


@triton.jit
def _scores_log2(qk, sm_scale, softcap, HAS_SOFTCAP: tl.constexpr):
    """Scaled (and soft-capped) scores in log2 units, so the softmax can use exp2."""
    if HAS_SOFTCAP:
        x = qk * (sm_scale / softcap)
        # tanh through exp: libdevice tanh is not available under the interpreter. Large |x|
        # saturates cleanly (exp -> inf gives 1, exp -> 0 gives -1).
        capped = 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)
        return capped * (softcap * _LOG2E)
    else:
        return qk * (sm_scale * _LOG2E)


@triton.jit
def _first_visible(rows, window, chunk, HAS_WINDOW: tl.constexpr, HAS_CHUNK: tl.constexpr):
    """First cache row a query at row ``rows`` may see: the sliding window's and the chunk's start."""
    first = tl.zeros_like(rows)
    if HAS_WINDOW:
        first = tl.maximum(first, rows - window + 1)
    if HAS_CHUNK:
        first = tl.maximum(first, (rows // chunk) * chunk)
    return first


@triton.jit
def _visible(key_rows, key_ok, query_rows, first_visible, CAUSAL: tl.constexpr, HAS_FLOOR: tl.constexpr):
    """The one place the kernel decides which key a tile row sees: [BLOCK_M, BLOCK_N] bool.

    ``key_rows``/``key_ok`` [BLOCK_N] are the keys' cache rows and whether they exist,
    ``query_rows``/``first_visible`` [BLOCK_M] each tile row's own cache row and first visible row.
    """
    visible = key_ok[None, :] & (query_rows[:, None] >= 0)
    if CAUSAL:
        visible = visible & (key_rows[None, :] <= query_rows[:, None])
    if HAS_FLOOR:
        visible = visible & (key_rows[None, :] >= first_visible[:, None])
    return visible


@triton.jit
def _attend_tile(
    acc,
    m_i,
    l_i,
    q,
    k,
    v,
    visible,
    sm_scale,
    softcap,
    APPLY_MASK: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One online-softmax step over a [BLOCK_N, BLOCK_D] K/V tile (fp32 state, log2 units)."""
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    s = _scores_log2(qk, sm_scale, softcap, HAS_SOFTCAP)
    if APPLY_MASK:
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row that has seen no visible key yet keeps m = -inf; subtracting 0 instead avoids
    # (-inf) - (-inf) = NaN and leaves its p and alpha at exactly 0.
    m_base = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_base[:, None])
    alpha = tl.exp2(m_i - m_base)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _jacobi_attention_kernel(
    Q,
    K_cache,
    V_cache,
    K_new,
    V_new,
    Out,
    O_part,
    Lse_part,
    cache_seqlens,
    Sinks,
    Tree,
    Depth,
    stride_qb,
    stride_qn,
    stride_qh,
    stride_qd,
    stride_kcb,
    stride_kcs,
    stride_kch,
    stride_kcd,
    stride_vcb,
    stride_vcs,
    stride_vch,
    stride_vcd,
    stride_knb,
    stride_knn,
    stride_knh,
    stride_knd,
    stride_vnb,
    stride_vnn,
    stride_vnh,
    stride_vnd,
    stride_ob,
    stride_on,
    stride_oh,
    stride_od,
    n,
    n_kv_heads,
    n_pairs,
    capacity,
    part_rows,
    sm_scale,
    softcap,
    window,
    chunk,
    GROUP: tl.constexpr,
    QUERIES_PER_TILE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    VALUE_DIM: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_CHUNK: tl.constexpr,
    HAS_FLOOR: tl.constexpr,
    HAS_SINKS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_TREE: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # Last query tiles first: under the causal mask they are the longest, so they should not
    # be the stragglers of the launch.
    q_tile = tl.num_programs(0) - 1 - tl.program_id(0)
    # Grid (q tiles, pairs, splits * folds): the (sequence, kv head) pairs past the y limit fold into z
    # (_grid). Programs past the last pair (the last fold's tail) compute a clamped pair and store nothing.
    pair = tl.program_id(1) + (tl.program_id(2) // NUM_SPLITS) * tl.num_programs(1)
    pair_ok = pair < n_pairs
    pair = tl.minimum(pair, n_pairs - 1)
    b = pair // n_kv_heads
    kv_head = pair % n_kv_heads
    split = tl.program_id(2) % NUM_SPLITS
    # int64 bases: batch offsets of a large cache overflow int32.
    b64 = b.to(tl.int64)
    kv_head64 = kv_head.to(tl.int64)

    prefix_len = tl.load(cache_seqlens + b)
    q_start = q_tile * QUERIES_PER_TILE
    q_end = tl.minimum(q_start + QUERIES_PER_TILE, n)

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    k_cache_base = K_cache + b64 * stride_kcb + kv_head64 * stride_kch
    v_cache_base = V_cache + b64 * stride_vcb + kv_head64 * stride_vch
    k_new_base = K_new + b64 * stride_knb + kv_head64 * stride_knh
    v_new_base = V_new + b64 * stride_vnb + kv_head64 * stride_vnh

    if split == 0:
        # The append: this program is the only writer of these (row, kv head) cache entries,
        # and no program of this launch reads cache rows >= prefix_len.
        new_rows = q_start + offs_m
        write_ok = (offs_m < QUERIES_PER_TILE) & (new_rows < n) & (prefix_len + new_rows < capacity) & pair_ok
        write_mask = _tile_mask(write_ok, offs_d, HEAD_DIM, BLOCK_D)
        write_mask_v = _tile_mask(write_ok, offs_dv, VALUE_DIM, BLOCK_DV)
        k_rows = tl.load(
            k_new_base + _tile_offsets(new_rows, stride_knn, offs_d, stride_knd), mask=write_mask, other=0.0
        )
        v_rows = tl.load(
            v_new_base + _tile_offsets(new_rows, stride_vnn, offs_dv, stride_vnd), mask=write_mask_v, other=0.0
        )
        cache_rows = prefix_len + new_rows
        tl.store(
            k_cache_base + _tile_offsets(cache_rows, stride_kcs, offs_d, stride_kcd),
            k_rows.to(K_cache.dtype.element_ty),
            mask=write_mask,
        )
        tl.store(
            v_cache_base + _tile_offsets(cache_rows, stride_vcs, offs_dv, stride_vcd),
            v_rows.to(V_cache.dtype.element_ty),
            mask=write_mask_v,
        )

    # Tile row m is query q_start + m // GROUP of q head kv_head * GROUP + m % GROUP.
    query_idx = q_start + offs_m // GROUP
    q_head = kv_head * GROUP + offs_m % GROUP
    row_ok = (offs_m < QUERIES_PER_TILE * GROUP) & (query_idx < n) & pair_ok
    row_mask = _tile_mask(row_ok, offs_d, HEAD_DIM, BLOCK_D)
    q_rows = query_idx.to(tl.int64) * stride_qn + q_head.to(tl.int64) * stride_qh  # a long prefill passes 2**31
    q_ptrs = Q + b64 * stride_qb + q_rows[:, None] + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_mask, other=0.0).to(COMPUTE_DTYPE)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    # Each tile row's own cache row and the first row it may see (window / chunk start). Both
    # grow with the query index, so the tile's first query bounds the rows any of them sees.
    if HAS_TREE:
        # A token tree: each query's position is its depth, not its index in the block.
        query_rows = prefix_len + tl.load(Depth + query_idx, mask=row_ok, other=0)
    else:
        query_rows = prefix_len + query_idx
    first_visible = _first_visible(query_rows, window, chunk, HAS_WINDOW, HAS_CHUNK)
    tile_first = tl.min(first_visible, 0)  # the first row's: first_visible never decreases

    # Phase 1: the cached prefix [lo, prefix_len); rows no query of the tile sees are skipped.
    if HAS_FLOOR:
        lo = tile_first
    else:
        lo = 0
    hi = prefix_len
    if NUM_SPLITS > 1:
        span = tl.maximum(hi - lo, 0)
        split_rows = tl.cdiv(tl.cdiv(span, NUM_SPLITS), BLOCK_N) * BLOCK_N
        lo = lo + split * split_rows
        hi = tl.minimum(hi, lo + split_rows)
    for start in range(lo, hi, BLOCK_N):
        pos = start + offs_n
        k_mask = _tile_mask(pos < hi, offs_d, HEAD_DIM, BLOCK_D)
        v_mask = _tile_mask(pos < hi, offs_dv, VALUE_DIM, BLOCK_DV)
        k = _load_rows(k_cache_base, pos, stride_kcs, stride_kcd, offs_d, k_mask, COMPUTE_DTYPE)
        v = _load_rows(v_cache_base, pos, stride_vcs, stride_vcd, offs_dv, v_mask, COMPUTE_DTYPE)
        # Prefix rows precede every query: only their existence and the floor matter.
        visible = _visible(pos, pos < hi, query_rows, first_visible, False, HAS_FLOOR)
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, k, v, visible, sm_scale, softcap, True, HAS_SOFTCAP, DOT_PRECISION
        )

    # Phase 2: the block's own keys, read from k_new/v_new (never from the rows being written).
    if split == 0 and HAS_TREE:
        # Token tree: every block key may be visible (n is small); the tree says which are.
        for start in range(0, n, BLOCK_N):
            j = start + offs_n
            j_ok = j < n
            k_mask = _tile_mask(j_ok, offs_d, HEAD_DIM, BLOCK_D)
            v_mask = _tile_mask(j_ok, offs_dv, VALUE_DIM, BLOCK_DV)
            k = _load_rows(k_new_base, j, stride_knn, stride_knd, offs_d, k_mask, COMPUTE_DTYPE)
            v = _load_rows(v_new_base, j, stride_vnn, stride_vnd, offs_dv, v_mask, COMPUTE_DTYPE)
            key_pos = prefix_len + tl.load(Depth + j, mask=j_ok, other=0)
            in_tree = tl.load(Tree + query_idx[:, None] * n + j[None, :], mask=row_ok[:, None] & j_ok[None, :], other=0)
            visible = _visible(key_pos, j_ok, query_rows, first_visible, False, HAS_FLOOR) & (in_tree != 0)
            acc, m_i, l_i = _attend_tile(
                acc, m_i, l_i, q, k, v, visible, sm_scale, softcap, True, HAS_SOFTCAP, DOT_PRECISION
            )
    elif split == 0:
        if HAS_FLOOR:
            j_lo = tl.maximum(tile_first - prefix_len, 0)
        else:
            j_lo = 0
        # Keys before the tile's first query are causally visible to every row of the tile, so
        # whole tiles of them need no causal mask (the bulk of a long prefill).
        diag_start = j_lo + ((q_start - j_lo) // BLOCK_N) * BLOCK_N
        for start in range(j_lo, diag_start, BLOCK_N):
            j = start + offs_n
            k_mask = _tile_mask(j < diag_start, offs_d, HEAD_DIM, BLOCK_D)
            v_mask = _tile_mask(j < diag_start, offs_dv, VALUE_DIM, BLOCK_DV)
            k = _load_rows(k_new_base, j, stride_knn, stride_knd, offs_d, k_mask, COMPUTE_DTYPE)
            v = _load_rows(v_new_base, j, stride_vnn, stride_vnd, offs_dv, v_mask, COMPUTE_DTYPE)
            visible = _visible(prefix_len + j, j < diag_start, query_rows, first_visible, False, HAS_FLOOR)
            acc, m_i, l_i = _attend_tile(
                acc, m_i, l_i, q, k, v, visible, sm_scale, softcap, HAS_FLOOR, HAS_SOFTCAP, DOT_PRECISION
            )
        for start in range(diag_start, q_end, BLOCK_N):
            j = start + offs_n
            k_mask = _tile_mask(j < q_end, offs_d, HEAD_DIM, BLOCK_D)
            v_mask = _tile_mask(j < q_end, offs_dv, VALUE_DIM, BLOCK_DV)
            k = _load_rows(k_new_base, j, stride_knn, stride_knd, offs_d, k_mask, COMPUTE_DTYPE)
            v = _load_rows(v_new_base, j, stride_vnn, stride_vnd, offs_dv, v_mask, COMPUTE_DTYPE)
            visible = _visible(prefix_len + j, j < q_end, query_rows, first_visible, True, HAS_FLOOR)
            acc, m_i, l_i = _attend_tile(
                acc, m_i, l_i, q, k, v, visible, sm_scale, softcap, True, HAS_SOFTCAP, DOT_PRECISION
            )
    if HAS_SINKS and split == 0:
        # A sink is one more logit in the softmax denominator that adds nothing to the output.
        # Split 0 alone adds it; the merge then weighs every split against it.
        sink = tl.load(Sinks + q_head, mask=row_ok, other=0.0).to(tl.float32) * _LOG2E
        m_new = tl.maximum(m_i, sink)
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.exp2(sink - m_new)
        acc = acc * alpha[:, None]
        m_i = m_new

    row_mask_v = _tile_mask(row_ok, offs_dv, VALUE_DIM, BLOCK_DV)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    result = acc / l_safe[:, None]
    if NUM_SPLITS == 1:
        out_rows = query_idx.to(tl.int64) * stride_on + q_head.to(tl.int64) * stride_oh
        out_ptrs = Out + b64 * stride_ob + out_rows[:, None] + offs_dv[None, :] * stride_od
        tl.store(out_ptrs, result.to(Out.dtype.element_ty), mask=row_mask_v)
    else:
        # Partials are [NUM_SPLITS, B, n, Hq] rows of VALUE_DIM floats; a split that saw no key
        # for a row stores lse = -inf and a zero output, which the merge weights by 0.
        n_q_heads = n_kv_heads * GROUP
        part_row = split.to(tl.int64) * part_rows + (b64 * n + query_idx) * n_q_heads + q_head
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe))
        tl.store(Lse_part + part_row, lse, mask=row_ok)
        tl.store(O_part + part_row[:, None] * VALUE_DIM + offs_dv[None, :], result, mask=row_mask_v)


@triton.jit
def _merge_splits_kernel(
    O_part,
    Lse_part,
    Out,
    stride_ob,
    stride_on,
    stride_oh,
    stride_od,
    n,
    n_q_heads,
    part_rows,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    SPLITS_P2: tl.constexpr,
):
    row = tl.program_id(0)  # flattened (b, query, q head), the partials' row order
    q_head = row % n_q_heads
    query_idx = (row // n_q_heads) % n
    b = (row // n_q_heads) // n
    offs_s = tl.arange(0, SPLITS_P2)
    offs_d = tl.arange(0, BLOCK_D)
    split_ok = offs_s < NUM_SPLITS
    part_row = offs_s.to(tl.int64) * part_rows + row
    lse = tl.load(Lse_part + part_row, mask=split_ok, other=float("-inf"))
    # Split 0 always holds the query's own key, so the maximum is finite.
    weight = tl.exp2(lse - tl.max(lse, 0))
    partial = tl.load(
        O_part + part_row[:, None] * HEAD_DIM + offs_d[None, :],
        mask=split_ok[:, None] & (offs_d[None, :] < HEAD_DIM),
        other=0.0,
    )
    result = tl.sum(partial * weight[:, None], 0) / tl.sum(weight, 0)
    out_row = query_idx.to(tl.int64) * stride_on + q_head.to(tl.int64) * stride_oh
    out_ptrs = Out + b.to(tl.int64) * stride_ob + out_row + offs_d * stride_od
    tl.store(out_ptrs, result.to(Out.dtype.element_ty), mask=offs_d < HEAD_DIM)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _launch_config(n: int, group: int, block_d: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for H100/H200-class GPUs.

    Decode (n * group <= 64 rows, one tile) is memory-bound: a small M tile and a 3-stage
    pipeline of 64-row K/V tiles keeps enough bytes in flight while two programs share an SM.
    Prefill is compute-bound: 128-row query tiles with 8 warps, as in the usual flash-attention
    forward. fp32 and head_dim > 128 halve the tiles so K/V stages still fit shared memory.
    """
    wide = block_d > 128 or dtype == torch.float32
    # fp32 at head_dim 256 would need 192 KiB of shared memory with 32-row K/V tiles.
    wide_block_n = 16 if (block_d > 128 and dtype == torch.float32) else 32
    rows = n * group
    if rows <= 64:
        block_m = max(16, triton.next_power_of_2(rows))
        block_n = wide_block_n if wide else 64
        num_warps, num_stages = 4, (2 if wide else 3)
    elif wide:
        # 8 warps keep a 64 x 256 fp32 accumulator out of local memory.
        block_m, block_n, num_warps, num_stages = 64, wide_block_n, (8 if block_d > 128 else 4), 2
    else:
        block_m, block_n, num_warps, num_stages = 128, 64, 8, 3
    block_m = max(block_m, triton.next_power_of_2(group))
    return block_m, block_n, num_warps, num_stages


def _grid(n_q_tiles: int, n_pairs: int, num_splits: int) -> tuple[int, int, int]:
    """The attention kernel's grid (q tiles, pairs, splits * folds): the (sequence, kv head) pairs go on
    y up to :data:`MAX_GRID_Y` and fold into z beyond it (the kernel unfolds them, see its first lines).
    x takes the q tiles (its limit is 2**31 - 1)."""
    pairs_y = max(1, min(n_pairs, MAX_GRID_Y))
    folds = triton.cdiv(n_pairs, pairs_y)
    if num_splits * folds > MAX_GRID_Z:
        raise ValueError(
            f"triton jacobi_attention: {n_pairs} (sequence, kv head) pairs x {num_splits} splits exceed the "
            f"CUDA grid ({MAX_GRID_Y} x {MAX_GRID_Z})"
        )
    return n_q_tiles, pairs_y, num_splits * folds


def _default_num_splits(device: torch.device, programs: int, capacity: int) -> int:
    if device.type != "cuda":
        return 1
    sm_count = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    if programs >= sm_count or capacity < 2 * _SPLIT_MIN_ROWS:
        return 1
    # Aim at about two programs per SM, each streaming at least _SPLIT_MIN_ROWS cache rows.
    return max(1, min(triton.cdiv(2 * sm_count, programs), capacity // _SPLIT_MIN_ROWS, _MAX_SPLITS))


def jacobi_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    cache_seqlens: torch.Tensor,
    softmax_scale: float,
    *,
    sliding_window: int | None = None,
    softcap: float | None = None,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    sinks: torch.Tensor | None = None,
    chunk_size: int | None = None,
    tree_mask: torch.Tensor | None = None,
    tree_depth: torch.Tensor | None = None,
) -> torch.Tensor:
    """Block attention over each sequence's cached prefix, appending the block's K/V in place.

    ``q`` [B, n, Hq, D_k]; ``k_cache`` [B, S, Hkv, D_k], ``v_cache`` [B, S, Hkv, D_v]; ``k_new``
    [B, n, Hkv, D_k], ``v_new`` [B, n, Hkv, D_v]; ``cache_seqlens`` int32 [B]; ``sinks`` [Hq] or None;
    float16, bfloat16 or float32 (fp32 accumulation); any strides.
    Returns ``out`` [B, n, Hq, D_v] (allocated in ``q``'s dtype when not given).

    Semantics of :func:`jacobi_engine.reference.jacobi_attention` (arguments are validated by
    :func:`jacobi_engine.ops.jacobi_attention`): rows ``cache_seqlens[b] + i`` of the caches
    receive ``k_new``/``v_new[b, i]``, query ``i`` attends to rows ``0 .. cache_seqlens[b] + i``
    (the last ``sliding_window`` of them when set, those of its own ``chunk_size`` chunk when set),
    scores are soft-capped when ``softcap`` is set and ``sinks[h]`` joins head h's softmax denominator.
    With ``tree_mask`` [n, n] bool and ``tree_depth`` [n] int32 the block is a token tree: query ``i``
    sees the prefix and the block keys ``j`` with ``tree_mask[i, j]``, at position offset ``tree_depth[i]``.
    Cache rows ``>= cache_seqlens[b]`` are never read. ``cache_seqlens`` is not advanced.

    ``num_splits`` forces the number of split-K chunks of the prefix (1 = no split); by default
    it is chosen from the GPU's SM count, the number of programs and the cache capacity.
    """
    batch, n, n_q_heads, head_dim = q.shape
    capacity, n_kv_heads = k_cache.shape[1], k_cache.shape[2]
    value_dim = v_cache.shape[3]
    for name, size in (("head_dim", head_dim), ("value head_dim", value_dim)):
        if size < 1 or size > MAX_HEAD_DIM:
            raise ValueError(f"triton jacobi_attention supports {name} 1..{MAX_HEAD_DIM}, got {size}")
    for name, tensor in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("k_new", k_new), ("v_new", v_new)):
        if tensor.dtype not in _SUPPORTED_DTYPES:
            raise ValueError(f"triton jacobi_attention supports {_SUPPORTED_DTYPES}, got {name} in {tensor.dtype}")
    if k_cache.dtype != v_cache.dtype:
        raise ValueError(f"k_cache and v_cache must share a dtype, got {k_cache.dtype} and {v_cache.dtype}")
    if out is None:
        out = torch.empty((batch, n, n_q_heads, value_dim), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    if num_splits is None:
        block_d = max(16, triton.next_power_of_2(max(head_dim, value_dim)))
        group = n_q_heads // n_kv_heads
        block_m = _launch_config(n, group, block_d, _compute_dtype(q))[0]
        n_q_tiles = triton.cdiv(n, block_m // group)
        num_splits = 1 if n_q_tiles > 1 else _default_num_splits(q.device, batch * n_kv_heads, capacity)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    # Triton launches on the current device; follow the tensors when they live on another GPU.
    on_other_gpu = q.device.type == "cuda" and q.device.index != torch.cuda.current_device()
    with torch.cuda.device(q.device) if on_other_gpu else contextlib.nullcontext():
        torch.ops.jacobi_engine.triton_block_attention(
            q,
            k_cache,
            v_cache,
            k_new,
            v_new,
            cache_seqlens,
            out,
            float(softmax_scale),
            sliding_window,
            None if softcap is None else float(softcap),
            num_splits,
            sinks,
            chunk_size,
            tree_mask,
            tree_depth,
        )
    return out


def _compute_dtype(q: torch.Tensor) -> torch.dtype:
    # Both dot operands must share a dtype: compute in q's. The interpreter has no bf16
    # arithmetic, so it computes in fp32 instead.
    if q.dtype == torch.bfloat16 and q.device.type != "cuda" and _interpreting():
        return torch.float32
    return q.dtype


def _launcher(kernel):
    # wrap_triton makes the launch visible to torch.compile; the interpreter's kernels are not
    # JIT functions, and are launched directly (nothing compiles them there).
    return kernel if _interpreting() else wrap_triton(kernel)


@triton_op(
    "jacobi_engine::triton_block_attention",
    mutates_args={"k_cache", "v_cache", "out"},
    schema=(
        "(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k_new, Tensor v_new, Tensor cache_seqlens, "
        "Tensor(c!) out, float softmax_scale, int? sliding_window, float? softcap, int num_splits, Tensor? sinks, "
        "int? chunk_size, Tensor? tree_mask, Tensor? tree_depth) -> ()"
    ),
)
def _block_attention_op(
    q,
    k_cache,
    v_cache,
    k_new,
    v_new,
    cache_seqlens,
    out,
    softmax_scale,
    sliding_window,
    softcap,
    num_splits,
    sinks,
    chunk_size,
    tree_mask,
    tree_depth,
) -> None:
    """The kernel launch(es) of :func:`jacobi_attention` as a custom op (``torch.library.triton_op``), so that
    ``torch.compile`` sees the Triton kernels and the in-place writes to the caches and ``out``."""
    batch, n, n_q_heads, head_dim = q.shape
    capacity, n_kv_heads = k_cache.shape[1], k_cache.shape[2]
    value_dim = v_cache.shape[3]
    group = n_q_heads // n_kv_heads

    compute_dtype = _compute_dtype(q)
    tl_compute_dtype = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}[
        compute_dtype
    ]
    dot_precision = _FP32_DOT_PRECISION if compute_dtype == torch.float32 else "tf32"

    block_d = max(16, triton.next_power_of_2(head_dim))
    block_dv = max(16, triton.next_power_of_2(value_dim))
    block_m, block_n, num_warps, num_stages = _launch_config(n, group, max(block_d, block_dv), compute_dtype)
    queries_per_tile = block_m // group
    n_q_tiles = triton.cdiv(n, queries_per_tile)

    has_window = sliding_window is not None and sliding_window > 0
    has_softcap = softcap is not None and softcap > 0
    has_chunk = chunk_size is not None
    part_rows = batch * n * n_q_heads
    if num_splits > 1:
        o_part = torch.empty((num_splits, part_rows, value_dim), dtype=torch.float32, device=q.device)
        lse_part = torch.empty((num_splits, part_rows), dtype=torch.float32, device=q.device)
    else:
        o_part = lse_part = out  # unused by the kernel when NUM_SPLITS == 1

    grid = _grid(n_q_tiles, batch * n_kv_heads, num_splits)
    cache_seqlens = cache_seqlens.contiguous()
    _launcher(_jacobi_attention_kernel)[grid](
        q,
        k_cache,
        v_cache,
        k_new,
        v_new,
        out,
        o_part,
        lse_part,
        cache_seqlens,
        sinks.contiguous() if sinks is not None else cache_seqlens,  # unused without sinks
        tree_mask.to(torch.int8).contiguous() if tree_mask is not None else cache_seqlens,  # unused without a tree
        tree_depth.contiguous() if tree_depth is not None else cache_seqlens,
        *q.stride(),
        *k_cache.stride(),
        *v_cache.stride(),
        *k_new.stride(),
        *v_new.stride(),
        *out.stride(),
        n,
        n_kv_heads,
        batch * n_kv_heads,
        capacity,
        part_rows,
        float(softmax_scale),
        float(softcap) if has_softcap else 1.0,
        int(sliding_window) if has_window else 0,
        int(chunk_size) if has_chunk else 1,
        GROUP=group,
        QUERIES_PER_TILE=queries_per_tile,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        VALUE_DIM=value_dim,
        BLOCK_DV=block_dv,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        NUM_SPLITS=num_splits,
        HAS_WINDOW=has_window,
        HAS_CHUNK=has_chunk,
        HAS_FLOOR=has_window or has_chunk,
        HAS_SINKS=sinks is not None,
        HAS_SOFTCAP=has_softcap,
        HAS_TREE=tree_mask is not None,
        COMPUTE_DTYPE=tl_compute_dtype,
        DOT_PRECISION=dot_precision,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if num_splits > 1:
        _launcher(_merge_splits_kernel)[(part_rows,)](
            o_part,
            lse_part,
            out,
            *out.stride(),
            n,
            n_q_heads,
            part_rows,
            HEAD_DIM=value_dim,
            BLOCK_D=block_dv,
            NUM_SPLITS=num_splits,
            SPLITS_P2=triton.next_power_of_2(num_splits),
            num_warps=1 if block_dv <= 64 else 2,
        )
