"""ops.jacobi_attention (Triton and torch backends) against an independent float64 reference.

Every case uses fresh seeded inputs, HF-style transposed views for q/k_new/v_new, an output
buffer poisoned with NaN, and (for Triton) cache rows past each prefix poisoned with NaN, which
proves the kernel never reads them. The cache must change exactly in the appended rows.
On CPU the Triton kernel runs under TRITON_INTERPRET=1 (set by conftest.py).
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass

import pytest
import torch
import triton
import triton.language as tl

from jacobi_engine import ops, triton_attention

TOLERANCES = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@dataclass(frozen=True)
class Case:
    batch: int
    n: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    capacity: int
    window: int | None = None
    softcap: float | None = None
    dtype: torch.dtype = torch.float32
    out_strided: bool = False  # out as a transposed view of a [B, Hq, n, D] buffer
    zero_prefix: bool = False  # every cache_seqlens[b] = 0 (prefill)
    value_dim: int | None = None  # D_v when it differs from D_k (MLA)
    chunk: int | None = None  # chunked attention (Llama 4)
    sinks: bool = False  # per-head attention-sink logits (gpt-oss)
    tree: tuple[int, int, int] | None = None  # (block, branches, branch length): a token tree, n = b + k*g

    @property
    def v_dim(self) -> int:
        return self.value_dim or self.head_dim

    @property
    def id(self) -> str:
        parts = [f"B{self.batch}", f"n{self.n}", f"h{self.n_heads}x{self.n_kv_heads}", f"d{self.head_dim}"]
        parts.append(f"S{self.capacity}")
        if self.window:
            parts.append(f"w{self.window}")
        if self.softcap:
            parts.append(f"cap{self.softcap:g}")
        if self.value_dim:
            parts.append(f"dv{self.value_dim}")
        if self.chunk:
            parts.append(f"chunk{self.chunk}")
        if self.sinks:
            parts.append("sinks")
        if self.tree:
            parts.append("tree{}x{}x{}".format(*self.tree))
        if self.zero_prefix:
            parts.append("prefill")
        if self.out_strided:
            parts.append("tout")
        parts.append(str(self.dtype).removeprefix("torch."))
        return "-".join(parts)


FP32_CASES = [
    Case(1, 1, 4, 4, 64, 40),
    Case(3, 1, 8, 2, 128, 70, out_strided=True),
    Case(2, 3, 4, 2, 80, 33),
    Case(3, 16, 4, 1, 96, 50),  # 16 queries x group 4 fill one 64-row tile
    Case(2, 64, 2, 2, 16, 100, out_strided=True),
    Case(2, 64, 4, 2, 64, 90),  # 128 rows: several query tiles
    Case(1, 100, 4, 2, 16, 100, zero_prefix=True),  # prefill, cache exactly full afterwards
    Case(3, 100, 2, 1, 32, 160),  # long block on top of ragged prefixes
    Case(2, 4, 6, 2, 64, 30),  # group 3 (not a power of two)
    Case(2, 3, 4, 2, 64, 60, window=8),
    Case(2, 4, 2, 1, 16, 20, window=1),  # each query sees only itself
    Case(1, 100, 2, 1, 16, 130, window=20),
    Case(2, 16, 4, 2, 80, 50, softcap=5.0, out_strided=True),
    Case(3, 4, 8, 4, 16, 40, window=5, softcap=3.0),  # Gemma-2 style
    Case(2, 3, 4, 4, 128, 12, zero_prefix=True),
]
FP16_CASES = [
    Case(3, 1, 8, 2, 128, 70, dtype=torch.float16),
    Case(3, 16, 4, 1, 96, 50, dtype=torch.float16, out_strided=True),
    Case(2, 100, 2, 1, 32, 130, dtype=torch.float16),
    Case(2, 16, 4, 2, 80, 50, window=9, softcap=5.0, dtype=torch.float16),
]
BF16_CASES = [
    Case(3, 1, 8, 2, 128, 70, dtype=torch.bfloat16),
    Case(3, 16, 4, 1, 96, 50, dtype=torch.bfloat16),
    Case(2, 100, 2, 1, 64, 300, dtype=torch.bfloat16),
    Case(2, 16, 4, 2, 80, 50, window=9, softcap=5.0, dtype=torch.bfloat16),
]
# The features models bring: D_k != D_v (MLA), chunked attention (Llama 4), attention sinks (gpt-oss,
# Granite SWA), alone and combined with windows, GQA, softcap and ragged prefixes.
FEATURE_CASES = [
    Case(2, 3, 4, 2, 24, 40, value_dim=16),
    Case(3, 16, 4, 4, 192, 50, value_dim=128),  # DeepSeek-V3 head sizes
    Case(1, 100, 2, 1, 16, 100, value_dim=40, zero_prefix=True),
    Case(3, 7, 4, 2, 16, 60, chunk=8),
    Case(2, 64, 4, 2, 32, 150, chunk=16, out_strided=True),
    Case(3, 5, 4, 1, 16, 40, chunk=1),  # each query sees only itself
    Case(2, 4, 4, 2, 16, 70, chunk=12, window=5),
    Case(3, 4, 8, 2, 64, 60, sinks=True),
    Case(2, 16, 4, 2, 32, 50, sinks=True, window=8),  # gpt-oss: sinks on sliding layers
    Case(2, 3, 4, 4, 24, 30, sinks=True, softcap=4.0, value_dim=8, zero_prefix=True),
    Case(3, 7, 6, 2, 32, 45, sinks=True, chunk=8, value_dim=48),
    Case(2, 16, 4, 2, 48, 50, value_dim=32, chunk=8, sinks=True, dtype=torch.float16),
    Case(2, 16, 4, 2, 48, 50, value_dim=32, chunk=8, sinks=True, dtype=torch.bfloat16),
]
# Token trees (a Jacobi block + candidate branches, issue 11), alone and with the other features.
TREE_CASES = [
    Case(2, 4 + 3 * 3, 4, 2, 32, 60, tree=(4, 3, 3)),
    Case(3, 16 + 4 * 4, 4, 1, 64, 90, tree=(16, 4, 4), out_strided=True),
    Case(2, 1 + 4 * 5, 4, 2, 16, 50, tree=(1, 4, 5)),  # autoregressive + candidates
    Case(3, 8 + 8 * 6, 8, 2, 64, 120, tree=(8, 8, 6)),  # 56 tokens: several query tiles
    Case(2, 6 + 2 * 4, 4, 2, 16, 40, tree=(6, 2, 4), window=5),
    Case(3, 5 + 3 * 2, 4, 2, 16, 40, tree=(5, 3, 2), chunk=8, sinks=True),
    Case(2, 4 + 2 * 3, 4, 2, 24, 40, tree=(4, 2, 3), softcap=4.0, value_dim=16),
    Case(2, 8 + 4 * 4, 4, 2, 64, 70, tree=(8, 4, 4), dtype=torch.float16),
    Case(2, 8 + 4 * 4, 4, 2, 64, 70, tree=(8, 4, 4), dtype=torch.bfloat16),
]
# Long caches with few (sequence, kv head) programs: on a GPU the default heuristic splits these.
LONG_CASES = [
    Case(1, 1, 8, 2, 128, 2048),
    Case(2, 4, 4, 1, 64, 1536, window=700, dtype=torch.float16),
]


def tree_of(block: int, branches: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask [T, T], depth [T]) written out token by token: block slot j sees slots <= j at depth j;
    branch token m sees slot 0 and its branch's tokens <= m, at depth m + 1."""
    total = block + branches * length
    mask = torch.zeros(total, total, dtype=torch.bool)
    depth = torch.zeros(total, dtype=torch.int32)
    for i in range(block):
        depth[i] = i
        for j in range(i + 1):
            mask[i, j] = True
    for b in range(branches):
        for m in range(length):
            i = block + b * length + m
            depth[i] = m + 1
            mask[i, 0] = True
            for m2 in range(m + 1):
                mask[i, block + b * length + m2] = True
    return mask, depth


def naive_attention(
    q, k_cache, v_cache, k_new, v_new, cache_seqlens, scale, window, softcap, chunk=None, sinks=None, tree=None
):
    """float64 loop over (sequence, q head); keys are the prefix rows followed by the block's own.

    A sink is an extra score column of value ``sinks[h]`` whose probability multiplies nothing.
    ``tree`` = (mask, depth) lays the block out as a token tree (block tokens at their depths).
    """
    batch, n, n_heads, _ = q.shape
    group = n_heads // k_cache.shape[2]
    out = torch.empty((batch, n, n_heads, v_cache.shape[3]), dtype=torch.float64)
    for b in range(batch):
        prefix = int(cache_seqlens[b])
        keys = torch.cat([k_cache[b, :prefix], k_new[b]]).double().cpu()
        values = torch.cat([v_cache[b, :prefix], v_new[b]]).double().cpu()
        if tree is None:
            query_pos = prefix + torch.arange(n)[:, None]
            key_pos = torch.arange(prefix + n)[None, :]
            visible = key_pos <= query_pos
        else:
            mask, depth = tree
            query_pos = prefix + depth.long()[:, None]
            key_pos = torch.cat([torch.arange(prefix), prefix + depth.long()])[None, :]
            visible = torch.cat([torch.ones(n, prefix, dtype=torch.bool), mask], dim=1)
        if window:
            visible &= key_pos > query_pos - window
        if chunk:
            visible &= key_pos // chunk == query_pos // chunk
        for h in range(n_heads):
            scores = q[b, :, h].double().cpu() @ keys[:, h // group].T * scale
            if softcap:
                scores = softcap * torch.tanh(scores / softcap)
            scores = scores.masked_fill(~visible, float("-inf"))
            if sinks is not None:
                scores = torch.cat([scores, torch.full((n, 1), float(sinks[h]), dtype=torch.float64)], dim=1)
            probs = torch.softmax(scores, dim=-1)[:, : prefix + n]
            out[b, :, h] = probs @ values[:, h // group]
    return out


def _skip_unless_runnable(backend: str, device: torch.device, dtype: torch.dtype) -> None:
    interpreting = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if backend == "triton" and device.type == "cpu" and not interpreting:
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 (set only when there is no GPU)")
    if dtype == torch.bfloat16 and device.type != "cuda":
        pytest.skip("bf16 is checked on a GPU only")


def _make_inputs(case: Case, device: torch.device, seed: int):
    gen = torch.Generator().manual_seed(seed)
    batch, n, n_heads, n_kv, dim, capacity = (
        case.batch,
        case.n,
        case.n_heads,
        case.n_kv_heads,
        case.head_dim,
        case.capacity,
    )

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(case.dtype)

    # HF hands the op transposed views of [B, H, n, D] tensors.
    q = randn(batch, n_heads, n, dim).to(device).transpose(1, 2)
    k_new = randn(batch, n_kv, n, dim).to(device).transpose(1, 2)
    v_new = randn(batch, n_kv, n, case.v_dim).to(device).transpose(1, 2)
    k_cache = randn(batch, capacity, n_kv, dim).to(device)
    v_cache = randn(batch, capacity, n_kv, case.v_dim).to(device)
    if case.zero_prefix:
        seqlens = torch.zeros(batch, dtype=torch.int32)
    else:
        seqlens = torch.randint(0, capacity - n + 1, (batch,), generator=gen, dtype=torch.int32)
        if batch >= 2:
            seqlens[0] = 0  # ragged, with an empty prefix
        if batch >= 3:
            seqlens[2] = capacity - n  # the block fills the cache to the last row
    return q, k_new, v_new, k_cache, v_cache, seqlens.to(device)


def _make_sinks(case: Case, device: torch.device, seed: int):
    # Sinks of the scores' magnitude, so that they take a real share of each softmax.
    if not case.sinks:
        return None
    gen = torch.Generator().manual_seed(seed + 1)
    return (2 * torch.randn(case.n_heads, generator=gen)).to(device)


def _poison_cache_tail(k_cache, v_cache, seqlens, backend: str) -> None:
    """Fill rows >= cache_seqlens[b]: NaN for Triton (must never be read); finite garbage for the
    torch reference, which reads and masks them (NaN * 0 would poison it)."""
    for b, prefix in enumerate(seqlens.tolist()):
        for cache in (k_cache, v_cache):
            if backend == "triton":
                cache[b, prefix:] = float("nan")
            else:
                cache[b, prefix:] = 1e3


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    view_dtype = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()]
    return tensor.contiguous().view(view_dtype)


def _check_cache(before, after, new, seqlens, n) -> None:
    """Rows [seqlens[b], seqlens[b] + n) hold exactly ``new``; every other row is bit-identical."""
    for b, prefix in enumerate(seqlens.tolist()):
        assert torch.equal(after[b, prefix : prefix + n], new[b].to(after.dtype)), f"sequence {b}: appended rows"
        assert torch.equal(_bits(after[b, :prefix]), _bits(before[b, :prefix])), f"sequence {b}: prefix changed"
        assert torch.equal(_bits(after[b, prefix + n :]), _bits(before[b, prefix + n :])), f"sequence {b}: tail"


def _run_case(case: Case, backend: str, device: torch.device, seed: int, num_splits: int | None = None) -> None:
    q, k_new, v_new, k_cache, v_cache, seqlens = _make_inputs(case, device, seed)
    scale = case.head_dim**-0.5
    sinks = _make_sinks(case, device, seed)
    tree = tree_of(*case.tree) if case.tree else None
    expected = naive_attention(
        q, k_cache, v_cache, k_new, v_new, seqlens, scale, case.window, case.softcap, case.chunk, sinks, tree
    )
    _poison_cache_tail(k_cache, v_cache, seqlens, backend)
    k_before, v_before, seqlens_before = k_cache.clone(), v_cache.clone(), seqlens.clone()
    if case.out_strided:
        out = torch.full(
            (case.batch, case.n_heads, case.n, case.v_dim), float("nan"), dtype=case.dtype, device=device
        ).transpose(1, 2)
    else:
        out = torch.full((*q.shape[:3], case.v_dim), float("nan"), dtype=case.dtype, device=device)
    features = dict(sliding_window=case.window, softcap=case.softcap, chunk_size=case.chunk, sinks=sinks, out=out)
    if tree is not None:
        features.update(tree_mask=tree[0].to(device), tree_depth=tree[1].to(device))

    if num_splits is None:
        result = ops.jacobi_attention(
            q,
            k_cache,
            v_cache,
            k_new,
            v_new,
            seqlens,
            scale,
            backend=backend,
            **features,
        )
    else:
        result = triton_attention.jacobi_attention(
            q,
            k_cache,
            v_cache,
            k_new,
            v_new,
            seqlens,
            scale,
            **features,
            num_splits=num_splits,
        )

    assert result.data_ptr() == out.data_ptr() and result.dtype == case.dtype
    tol = TOLERANCES[case.dtype]
    torch.testing.assert_close(result.double().cpu(), expected, rtol=tol, atol=tol)
    _check_cache(k_before, k_cache, k_new, seqlens, case.n)
    _check_cache(v_before, v_cache, v_new, seqlens, case.n)
    assert torch.equal(seqlens, seqlens_before), "cache_seqlens must not advance"


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize(
    "case", FP32_CASES + FP16_CASES + BF16_CASES + FEATURE_CASES + TREE_CASES + LONG_CASES, ids=lambda case: case.id
)
def test_matches_float64_reference(case, backend, device):
    _skip_unless_runnable(backend, device, case.dtype)
    _run_case(case, backend, device, seed=zlib.crc32(case.id.encode()))


SPLIT_CASES = [
    (Case(2, 1, 8, 2, 64, 300), 4),
    (Case(3, 4, 4, 1, 80, 400, window=150), 7),
    (Case(3, 16, 4, 4, 16, 260, softcap=4.0, out_strided=True), 3),  # cache_seqlens 0 -> idle splits
    (Case(2, 3, 2, 1, 32, 40), 16),  # more splits than prefix tiles
    (Case(2, 4, 8, 2, 128, 300, dtype=torch.float16), 5),
    (Case(2, 4, 8, 2, 128, 300, dtype=torch.bfloat16), 5),
    (Case(2, 1, 8, 2, 64, 300, value_dim=32, sinks=True), 4),  # the sink joins split 0 only
    (Case(3, 4, 4, 1, 32, 260, chunk=100, value_dim=48), 3),  # splits wholly outside the chunk
    (Case(2, 4 + 2 * 3, 4, 2, 32, 300, tree=(4, 2, 3)), 4),  # a token tree over a split prefix
]


@pytest.mark.parametrize(("case", "num_splits"), SPLIT_CASES, ids=lambda v: v.id if isinstance(v, Case) else f"s{v}")
def test_split_k_matches_float64_reference(case, num_splits, device):
    _skip_unless_runnable("triton", device, case.dtype)
    _run_case(case, "triton", device, seed=zlib.crc32(case.id.encode()) + num_splits, num_splits=num_splits)


def test_allocates_output_in_q_dtype(device):
    _skip_unless_runnable("triton", device, torch.float16)
    case = Case(2, 3, 4, 2, 64, 20, dtype=torch.float16)
    q, k_new, v_new, k_cache, v_cache, seqlens = _make_inputs(case, device, seed=7)
    expected = naive_attention(q, k_cache, v_cache, k_new, v_new, seqlens, 0.125, None, None)
    result = ops.jacobi_attention(q, k_cache, v_cache, k_new, v_new, seqlens, 0.125, backend="triton")
    assert result.shape == q.shape and result.dtype == torch.float16 and result.device == q.device
    torch.testing.assert_close(result.double().cpu(), expected, rtol=2e-3, atol=2e-3)


def test_rejects_unsupported_head_dim():
    q = torch.zeros(1, 1, 1, 320)
    cache = torch.zeros(1, 4, 1, 320)
    with pytest.raises(ValueError, match="head_dim"):
        triton_attention.jacobi_attention(q, cache, cache, q, q, torch.zeros(1, dtype=torch.int32), 1.0)


def test_rejects_bad_feature_arguments():
    case = Case(2, 3, 4, 2, 16, 20, value_dim=8)
    q, k_new, v_new, k_cache, v_cache, seqlens = _make_inputs(case, torch.device("cpu"), seed=3)
    args = (q, k_cache, v_cache, k_new, v_new, seqlens, 0.25)
    with pytest.raises(ValueError, match="sinks must have shape"):
        ops.jacobi_attention(*args, backend="torch", sinks=torch.zeros(3))
    with pytest.raises(TypeError, match="sinks must be a floating-point"):
        ops.jacobi_attention(*args, backend="torch", sinks=torch.zeros(4, dtype=torch.long))
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="chunk_size"):
            ops.jacobi_attention(*args, backend="torch", chunk_size=bad)
    with pytest.raises(ValueError, match="v_new must be"):
        ops.jacobi_attention(q, k_cache, v_cache, k_new, k_new, seqlens, 0.25, backend="torch")
    with pytest.raises(ValueError, match="v_cache"):
        ops.jacobi_attention(q, k_cache, v_cache[:, :10], k_new, v_new, seqlens, 0.25, backend="torch")


def test_pool_tree_layout_is_the_written_out_tree():
    """The engine's tree (jacobi_engine.pool.tree_layout) is the one the oracle above spells out."""
    from jacobi_engine.pool import tree_layout

    for shape in ((4, 3, 3), (1, 4, 5), (16, 2, 6)):
        mask, depth = tree_layout(*shape, "cpu")
        expected_mask, expected_depth = tree_of(*shape)
        assert torch.equal(mask, expected_mask) and torch.equal(depth, expected_depth)


def test_causal_tree_equals_the_plain_block():
    case = Case(3, 9, 4, 2, 32, 40, window=6)
    q, k_new, v_new, k_cache, v_cache, seqlens = _make_inputs(case, torch.device("cpu"), seed=11)
    plain = ops.jacobi_attention(q, k_cache.clone(), v_cache.clone(), k_new, v_new, seqlens, 0.2, backend="torch")
    causal = torch.ones(9, 9, dtype=torch.bool).tril()
    tree = ops.jacobi_attention(
        q,
        k_cache,
        v_cache,
        k_new,
        v_new,
        seqlens,
        0.2,
        backend="torch",
        tree_mask=causal,
        tree_depth=torch.arange(9, dtype=torch.int32),
    )
    torch.testing.assert_close(tree, plain, rtol=0, atol=0)
    with pytest.raises(ValueError, match="tree_mask and tree_depth"):
        ops.jacobi_attention(q, k_cache, v_cache, k_new, v_new, seqlens, 0.2, backend="torch", tree_mask=causal)
    with pytest.raises(ValueError, match="tree_mask must be"):
        ops.jacobi_attention(
            q,
            k_cache,
            v_cache,
            k_new,
            v_new,
            seqlens,
            0.2,
            backend="torch",
            tree_mask=causal[:4, :4],
            tree_depth=torch.arange(4, dtype=torch.int32),
        )


LAYOUT_CASES = [
    Case(3, 4, 4, 2, 16, 40),
    Case(2, 5, 4, 1, 16, 48, window=6),
    Case(2, 3, 4, 2, 16, 40, softcap=5.0, chunk=8),
    Case(2, 4, 4, 4, 16, 40, value_dim=8, sinks=True),
]


@pytest.mark.parametrize("case", LAYOUT_CASES, ids=lambda case: case.id)
def test_precomputed_layout_matches_float64_reference(case):
    """The engine's per-forward path: the block layout computed once and the checks skipped, with a kv_len bound."""
    from jacobi_engine.reference import block_layout

    q, k_new, v_new, k_cache, v_cache, seqlens = _make_inputs(
        case, torch.device("cpu"), seed=zlib.crc32(case.id.encode())
    )
    scale = case.head_dim**-0.5
    sinks = _make_sinks(case, torch.device("cpu"), 1)
    expected = naive_attention(
        q, k_cache, v_cache, k_new, v_new, seqlens, scale, case.window, case.softcap, case.chunk, sinks
    )
    kv_len = int(seqlens.max()) + case.n
    layout = block_layout(seqlens, case.n, case.capacity, kv_len, case.window, case.chunk)
    assert layout.kv_len == kv_len and tuple(layout.visible.shape) == (case.batch, 1, case.n, kv_len)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    result = ops.jacobi_attention(
        q,
        k_cache,
        v_cache,
        k_new,
        v_new,
        seqlens,
        scale,
        backend="torch",
        sliding_window=case.window,
        softcap=case.softcap,
        chunk_size=case.chunk,
        sinks=sinks,
        layout=layout,
        check=False,
    )
    torch.testing.assert_close(result.double(), expected, rtol=1e-4, atol=1e-4)
    _check_cache(k_before, k_cache, k_new, seqlens, case.n)
    _check_cache(v_before, v_cache, v_new, seqlens, case.n)


@pytest.mark.gpu
def test_triton_op_is_visible_to_the_compiler():
    """opcheck of the triton_op, and torch.compile(fullgraph=True) over it matches eager."""
    device = torch.device("cuda")
    case = Case(2, 4, 8, 2, 64, 96)
    q, k_new, v_new, k_cache, v_cache, seqlens = _make_inputs(case, device, seed=5)
    out = torch.empty_like(q)
    args = (
        q,
        k_cache.clone(),
        v_cache.clone(),
        k_new,
        v_new,
        seqlens,
        out,
        0.125,
        None,
        None,
        1,
        None,
        None,
        None,
        None,
    )
    torch.library.opcheck(torch.ops.jacobi_engine.triton_block_attention, args)

    def attend(q, k_cache, v_cache, k_new, v_new, seqlens):
        return ops.jacobi_attention(q, k_cache, v_cache, k_new, v_new, seqlens, 0.125, backend="triton")

    k_eager, v_eager = k_cache.clone(), v_cache.clone()
    expected = attend(q, k_eager, v_eager, k_new, v_new, seqlens)
    compiled = torch.compile(attend, fullgraph=True)
    got = compiled(q, k_cache, v_cache, k_new, v_new, seqlens)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(k_cache, k_eager) and torch.equal(v_cache, v_eager)


@pytest.mark.parametrize("case", LAYOUT_CASES[:2], ids=lambda case: case.id)
def test_bounded_sdpa_and_bound_rows(case):
    """The opaque op a compiled CPU step attends with: opcheck, and bound_rows against the float64 reference."""
    from jacobi_engine import reference

    q, k_new, v_new, k_cache, v_cache, seqlens = _make_inputs(
        case, torch.device("cpu"), seed=zlib.crc32(case.id.encode())
    )
    scale = case.head_dim**-0.5
    expected = naive_attention(q, k_cache, v_cache, k_new, v_new, seqlens, scale, case.window, None, None, None)
    layout = reference.block_layout(seqlens, case.n, case.capacity, None, case.window)
    args = (q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2), layout.visible, seqlens, scale)
    torch.library.opcheck(torch.ops.jacobi_engine.bounded_sdpa, args)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    result = reference.jacobi_attention(
        q, k_cache, v_cache, k_new, v_new, seqlens, scale, sliding_window=case.window, bound_rows=True
    )
    torch.testing.assert_close(result.double(), expected, rtol=1e-4, atol=1e-4)
    _check_cache(k_before, k_cache, k_new, seqlens, case.n)
    _check_cache(v_before, v_cache, v_new, seqlens, case.n)


# -- index math at sizes the interpreter cannot allocate, and the grid limit -----------------------
@triton.jit
def _offsets_probe(Rows, Cols, Out, stride_row, stride_col, R: tl.constexpr, C: tl.constexpr, NAIVE: tl.constexpr):
    rows = tl.load(Rows + tl.arange(0, R))
    cols = tl.load(Cols + tl.arange(0, C))
    if NAIVE:  # the int32 products the kernel used before: they wrap
        offsets = (rows[:, None] * stride_row + cols[None, :] * stride_col).to(tl.int64)
    else:
        offsets = triton_attention._tile_offsets(rows, stride_row, cols, stride_col)
    tl.store(Out + tl.arange(0, R)[:, None] * C + tl.arange(0, C)[None, :], offsets)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), reason="CPU tensors need the interpreter")
@pytest.mark.parametrize(
    "stride_row, rows",
    [
        (32 * 128, [524287, 524288, 600000, 2_000_000]),  # 32 kv heads x 128: 2**31 at row 524288
        (192 * 128, [87381, 87382, 100000, 1_000_000]),  # expanded MLA (128 heads x 192 elements)
        (1, [2**31 - 1, 0, 5, 7]),  # the largest int32 index itself
    ],
    ids=["gqa_32x128", "mla_expanded", "int32_max_row"],
)
def test_tile_offsets_are_int64(stride_row, rows):
    """The kernel's cache-row offsets (_tile_offsets, used by every K/V load and the append) against
    Python integers, at rows past 2**31 elements; the former int32 product really wraps there."""
    rows_t = torch.tensor(rows, dtype=torch.int32)
    cols = torch.tensor([0, 1, 127, 255], dtype=torch.int32)
    stride_col = 2
    expected = [[r * stride_row + c * stride_col for c in cols.tolist()] for r in rows]
    out = torch.zeros((len(rows), 4), dtype=torch.long)
    _offsets_probe[(1,)](rows_t, cols, out, stride_row, stride_col, R=len(rows), C=4, NAIVE=False)
    assert out.tolist() == expected
    if max(expected[r][c] for r in range(len(rows)) for c in range(4)) >= 2**31:
        _offsets_probe[(1,)](rows_t, cols, out, stride_row, stride_col, R=len(rows), C=4, NAIVE=True)
        assert out.tolist() != expected  # the test can fail: int32 arithmetic overflows here


def test_grid_folds_pairs_past_the_y_limit():
    limit = triton_attention.MAX_GRID_Y
    assert triton_attention._grid(3, 64 * 32, 2) == (3, 64 * 32, 2)  # unchanged below the limit
    for pairs, splits in ((limit, 1), (limit + 1, 1), (3 * limit + 7, 4), (2_000_000, 1)):
        x, y, z = triton_attention._grid(5, pairs, splits)
        assert x == 5 and 1 <= y <= limit and z <= limit and z % splits == 0
        folds = z // splits
        assert y * folds >= pairs > y * (folds - 1)  # every pair has a program, none is far past the end
    with pytest.raises(ValueError, match="grid"):
        triton_attention._grid(1, limit * limit, 2)


FOLD_CASES = [
    (Case(5, 3, 2, 1, 16, 20), None),  # 5 pairs on a y limit of 2: three folds, the last one half empty
    (Case(3, 4, 4, 2, 16, 30, window=5), None),
    (Case(3, 1, 4, 2, 32, 300), 3),  # folds and split-K together (z = splits x folds)
    (Case(2, 4 + 2 * 3, 4, 2, 16, 40, tree=(4, 2, 3)), None),
]


@pytest.mark.parametrize(("case", "num_splits"), FOLD_CASES, ids=lambda v: v.id if isinstance(v, Case) else f"s{v}")
def test_folded_grid_matches_float64_reference(case, num_splits, device, monkeypatch):
    """A launch whose (sequence, kv head) pairs exceed the y grid limit (lowered here so the
    interpreter can run it) gives the float64 reference's result and appends exactly the block."""
    _skip_unless_runnable("triton", device, case.dtype)
    monkeypatch.setattr(triton_attention, "MAX_GRID_Y", 2)
    assert triton_attention._grid(1, case.batch * case.n_kv_heads, num_splits or 1)[1] == 2
    _run_case(case, "triton", device, seed=zlib.crc32(case.id.encode()) + 17, num_splits=num_splits or 1)


def test_kernels_compile_for_sm90():
    """The kernels lower to sm_90 code (Triton's own ptxas, no GPU needed), in their own process."""
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(__file__), "triton_compile_check.py")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, script], capture_output=True, text=True, env=env, timeout=600)
    if result.returncode != 0 and "No module named" in result.stderr and "nvidia" in result.stderr:
        pytest.skip("this Triton has no NVIDIA backend")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("cubin") == 4, result.stdout
