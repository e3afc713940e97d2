"""The candidate pool: n-grams recycled from Jacobi iterations, verified beside the block.

Every Jacobi iteration predicts a continuation for every slot of the block; the block keeps only
the verified prefix and throws the rest away. Those rejected predictions are often right a few
steps later (Jacobi Forcing's "rejection recycling", Lookahead decoding's n-gram pool). The pool
keeps them, with the n-grams of the prompt and of the output so far, per sequence, keyed by the
token they follow; each step looks up the candidates that follow the block's first (known) token
and verifies them in the same forward as the block, as branches of a token tree:

    [t0, g1 .. g_{n-1} | c^1_1 .. c^1_g | ... | c^k_1 .. c^k_g]

Each branch token sees the committed prefix, ``t0`` and its own branch's earlier tokens
(:func:`tree_layout`); the longest verified path among the block and the branches wins.

The table lives on the device with static shapes: ``keys`` [B, H, S] (-1 empty), ``ngrams``
[B, H, S, g] and a FIFO cursor [B, H] per bucket, H hash buckets (a token's bucket is
``token % H``) of S entries each. Insertion and lookup are tensor ops without host syncs or
data-dependent shapes, so the whole step stays CUDA-graph capturable (tests/test_graph_safety.py).
Memory per sequence: H * S * (g + 1) int64, 1.3 MB at the defaults (H=4096, S=8, g=4).
"""

from __future__ import annotations

import torch


def tree_layout(block_size: int, candidates: int, candidate_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(tree_mask bool [T, T], tree_depth int32 [T]) of a block followed by ``candidates`` branches.

    T = n + k * g. Block slot ``j`` sits at depth ``j`` and sees slots ``<= j``; token ``m`` (0-based)
    of a branch sits at depth ``m + 1`` (the branch continues ``t0``) and sees ``t0`` and its
    branch's tokens ``<= m``.
    """
    n, k, g = block_size, candidates, candidate_len
    total = n + k * g
    mask = torch.zeros(total, total, dtype=torch.bool)
    mask[:n, :n] = torch.tril(torch.ones(n, n, dtype=torch.bool))
    depth = torch.zeros(total, dtype=torch.int32)
    depth[:n] = torch.arange(n, dtype=torch.int32)
    for branch in range(k):
        start = n + branch * g
        mask[start : start + g, 0] = True
        mask[start : start + g, start : start + g] = torch.tril(torch.ones(g, g, dtype=torch.bool))
        depth[start : start + g] = torch.arange(1, g + 1, dtype=torch.int32)
    return mask.to(device), depth.to(device)


class CandidatePool:
    """Per-sequence n-gram table on the device (see the module docstring).

    Args:
        batch: sequences (B).
        candidate_len: g, tokens per n-gram (after the key token).
        buckets: hash buckets H per sequence.
        slots: entries S per bucket (FIFO replacement).
        device: where the table lives.
    """

    def __init__(self, batch: int, candidate_len: int, buckets: int, slots: int, device):
        self.batch, self.length, self.buckets, self.slots = batch, candidate_len, buckets, slots
        entries = buckets * slots
        # One spare entry at the end takes the writes of entries that are not inserted.
        self.keys = torch.full((batch, entries + 1), -1, dtype=torch.long, device=device)
        self.ngrams = torch.zeros((batch, entries + 1, candidate_len), dtype=torch.long, device=device)
        self.cursor = torch.zeros((batch, buckets), dtype=torch.long, device=device)
        self.slot_range = torch.arange(slots, device=device)
        # Per sequence, the token column up to which the output's n-grams are in the table: every
        # n-gram whose last token sits before it (kept by the step that feeds the output, see
        # jacobi_engine.step.feed_output).
        self.fed = torch.zeros(batch, dtype=torch.long, device=device)

    def reset(self, rows: torch.Tensor | None = None) -> None:
        """Empties the table of every sequence, or of those where ``rows`` (bool [B]) is set."""
        if rows is None:
            self.keys.fill_(-1)
            self.cursor.zero_()
            return
        self.keys.masked_fill_(rows[:, None], -1)
        self.cursor.masked_fill_(rows[:, None], 0)

    def tensors(self) -> list[torch.Tensor]:
        """The tensors insertion mutates (for a snapshot of the decode state)."""
        return [self.keys, self.ngrams, self.cursor, self.fed]

    def insert(self, keys: torch.Tensor, ngrams: torch.Tensor, valid: torch.Tensor) -> None:
        """Adds ``ngrams`` [B, E, g] after ``keys`` [B, E] where ``valid`` [B, E]; duplicates of an
        entry already in the table or earlier in the same call are skipped."""
        batch, count = keys.shape
        bucket = keys.clamp(min=0) % self.buckets  # [B, E]
        entry_index = bucket[..., None] * self.slots + self.slot_range  # [B, E, S]
        flat = entry_index.reshape(batch, -1)
        stored_keys = self.keys.gather(1, flat).reshape(batch, count, self.slots)
        stored = self.ngrams.gather(1, flat[..., None].expand(-1, -1, self.length))
        stored = stored.reshape(batch, count, self.slots, self.length)
        in_table = ((stored_keys == keys[..., None]) & (stored == ngrams[:, :, None, :]).all(-1)).any(-1)
        same = (keys[:, :, None] == keys[:, None, :]) & (ngrams[:, :, None, :] == ngrams[:, None, :, :]).all(-1)
        earlier = torch.ones(count, count, dtype=torch.bool, device=keys.device).tril(-1)  # [e, e'] e' < e
        repeated = (same & earlier & valid[:, None, :]).any(-1)
        new = valid & ~in_table & ~repeated & (keys >= 0)
        # Entries of one call that share a bucket take consecutive slots after the bucket's cursor.
        same_bucket = (bucket[:, :, None] == bucket[:, None, :]) & earlier & new[:, None, :]
        rank = same_bucket.sum(-1)
        new = new & (rank < self.slots)  # more than S in one bucket at once: the rest would collide
        cursor = self.cursor.gather(1, bucket)
        slot = (cursor + rank) % self.slots
        target = torch.where(new, bucket * self.slots + slot, self.keys.shape[1] - 1)
        self.keys.scatter_(1, target, keys)
        self.ngrams.scatter_(1, target[..., None].expand(-1, -1, self.length), ngrams)
        self.cursor.scatter_add_(1, bucket, new.to(torch.long))

    def lookup(self, keys: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Up to ``count`` n-grams after ``keys`` [B], newest first: (ngrams [B, count, g], valid [B, count])."""
        bucket = keys.clamp(min=0) % self.buckets  # [B]
        cursor = self.cursor.gather(1, bucket[:, None])  # [B, 1]
        recency = (cursor - 1 - self.slot_range[None, :]) % self.slots  # newest first
        index = bucket[:, None] * self.slots + recency  # [B, S]
        stored_keys = self.keys.gather(1, index)
        stored = self.ngrams.gather(1, index[..., None].expand(-1, -1, self.length))
        valid = stored_keys == keys[:, None]
        order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices[:, :count]
        picked = stored.gather(1, order[..., None].expand(-1, -1, self.length))
        return picked, valid.gather(1, order)


def ngrams_of(tokens: torch.Tensor, key_columns: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys [B, E], ngrams [B, E, g]) of ``tokens`` [B, W] starting at ``key_columns`` [B, E] (clamped)."""
    width = tokens.shape[1]
    columns = key_columns[..., None] + torch.arange(length + 1, device=tokens.device)
    values = tokens.gather(1, columns.clamp(0, width - 1).reshape(tokens.shape[0], -1))
    values = values.reshape(*key_columns.shape, length + 1)
    return values[..., 0], values[..., 1:]
