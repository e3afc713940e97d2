"""Initial guesses for the Jacobi block.

A strategy supplies guesses for block slots that hold no Jacobi prediction yet: the whole
block after prefill, and in sliding mode the ``a - 1`` slots a step frees at the end of the
block when it accepts ``a`` tokens (in chunked mode, a whole new chunk). It may also rewrite
the unverified tail of a freshly committed block (n-gram lookup does).

Everything runs on the device with tensor ops only, so the decoding loop never has to wait
for the host to pick a guess.

Write your own by subclassing :class:`GuessStrategy` and passing an instance as
``JacobiEngine(..., init=strategy)``.
"""

from __future__ import annotations

import functools
import inspect

import torch

# Draft contexts: a row's guesses for its next step are bucketed by how many tokens the strategy drafted
# (0, 1, 2-3, 4-7, 8-15, 16+): an adaptive engine keeps its acceptance statistics per context and sizes
# each step by the contexts of its rows (:mod:`jacobi_engine.adaptive`).
DRAFT_CONTEXTS = 6


def draft_context(drafted: torch.Tensor) -> torch.Tensor:
    """int64 [B]: the context (0 .. DRAFT_CONTEXTS - 1) of rows with ``drafted`` draft tokens."""
    d = drafted.to(torch.long)
    return (d > 0).long() + (d >= 2).long() + (d >= 4).long() + (d >= 8).long() + (d >= 16).long()


class GuessStrategy:
    """Base class. Subclasses override :meth:`fill` and, optionally, :meth:`refine`.

    State a strategy keeps between steps must live in tensors that :meth:`start` refills in
    place (:meth:`_keep`): the engine reuses one strategy object per step cache entry, and a
    captured CUDA graph replays on the addresses it saw at capture.
    """

    name = "custom"

    def start(
        self,
        tokens: torch.Tensor,
        prompt_starts: torch.Tensor,
        prompt_ends: torch.Tensor,
        block_size: int,
        generator: torch.Generator,
    ) -> None:
        """Called once per ``generate``.

        ``tokens`` int64 [B, W] is the engine's token buffer, updated in place as tokens are
        generated: row ``b``'s prompt is ``tokens[b, prompt_starts[b]:prompt_ends[b]]`` (int64
        [B] each) and its generated tokens follow, so the known tokens of a row are contiguous
        in ``[prompt_starts[b], lengths[b])`` (``lengths`` as given to :meth:`refine`).
        """
        self.tokens = tokens
        self.prompt_starts = self._keep("prompt_starts", prompt_starts.to(torch.long))
        self.prompt_ends = self._keep("prompt_ends", prompt_ends.to(torch.long))
        self.block_size = block_size
        self.generator = generator

    def fill(self) -> torch.Tensor:
        """Guesses int64 [B, n] for freed slots (slot ``j`` of the next block takes column ``j``)."""
        raise NotImplementedError

    def refine(
        self, block: torch.Tensor, lengths: torch.Tensor, rows: torch.Tensor, known_columns: int | None = None
    ) -> torch.Tensor | None:
        """Optionally rewrite ``block[rows, 1:]`` in place after a commit. ``lengths`` int32 [B]
        is one past each row's last known token. Default: keep the block.

        ``known_columns`` (a Python int, or None) bounds ``lengths.max()`` until the engine's next host
        sync, so a lookup may read only that many token columns; None (a compiled or captured step,
        which has static shapes) means the whole buffer. An override may leave the argument out.

        Return a bool [B, n - 1] mask of the slots you rewrote: when sampling, those drafts are
        verified as deterministic ones (the exact rule for them). An override that returns None is
        taken to have rewritten every slot of ``rows``, which is exact but slower."""
        return None

    def draft_lengths(self) -> torch.Tensor | None:
        """int64 [B]: how many draft tokens the last :meth:`refine` found for each row's next block, counted
        at the full ``block_size`` of :meth:`start` (an adaptive engine's narrower blocks hold a prefix),
        or None for a strategy without drafts (then every row is in context 0)."""
        return None

    def _keep(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """``value`` stored as attribute ``name``, copied into the existing tensor when shapes match."""
        current = getattr(self, name, None)
        if (
            isinstance(current, torch.Tensor)
            and current.shape == value.shape
            and current.dtype == value.dtype
            and current.device == value.device
        ):
            current.copy_(value)
            return current
        setattr(self, name, value)
        return value


class RandomPromptGuess(GuessStrategy):
    """Random tokens drawn from each sequence's own prompt, as in CLLM.

    A pool of random prompt tokens is drawn once per ``generate`` and consumed round-robin by
    a device-side counter, so the decoding step draws no random numbers (CUDA-graph safe).
    """

    name = "random_prompt"
    pool_steps = 64  # blocks' worth of random tokens in the pool

    def start(self, tokens, prompt_starts, prompt_ends, block_size, generator) -> None:
        super().start(tokens, prompt_starts, prompt_ends, block_size, generator)
        batch = tokens.shape[0]
        pool_size = block_size * self.pool_steps
        uniform = torch.rand((batch, pool_size), generator=generator, device=generator.device).to(tokens.device)
        spans = self.prompt_ends - self.prompt_starts
        columns = self.prompt_starts[:, None] + (uniform * spans[:, None]).long().clamp(max=spans[:, None] - 1)
        self.pool = self._keep("pool", tokens.gather(1, columns))  # [B, pool_size]
        self.pool_columns = self._keep("pool_columns", torch.arange(block_size, device=tokens.device))
        self.draws = self._keep("draws", torch.zeros((), dtype=torch.long, device=tokens.device))

    def fill(self) -> torch.Tensor:
        columns = (self.draws * self.block_size + self.pool_columns) % self.pool.shape[1]
        self.draws += 1
        return self.pool[:, columns]


class NgramGuess(RandomPromptGuess):
    """Prompt/output lookup: continue the latest earlier occurrence of the current suffix.

    After each commit, the last ``k`` known tokens (``k`` from ``max_ngram`` down to
    ``min_ngram``) are searched in the prompt and the output so far. When they occurred
    before, the tokens that followed that occurrence replace the block's unverified tail (this
    is what prompt-lookup decoding proposes); otherwise the block keeps its Jacobi
    predictions. Freed slots without a lookup get random prompt tokens.
    """

    name = "ngram"

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got min_ngram={min_ngram}, max_ngram={max_ngram}")
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram

    def start(self, tokens, prompt_starts, prompt_ends, block_size, generator) -> None:
        super().start(tokens, prompt_starts, prompt_ends, block_size, generator)
        device = tokens.device
        self.columns = self._keep("columns", torch.arange(tokens.shape[1], device=device))
        self.back = self._keep("back", torch.arange(self.max_ngram, device=device))
        self.slots = self._keep("slots", torch.arange(1, max(block_size, 2), device=device))
        self.drafted = self._keep("drafted", torch.zeros(tokens.shape[0], dtype=torch.long, device=device))

    def refine(self, block, lengths, rows, known_columns: int | None = None) -> torch.Tensor:
        """The latest earlier occurrence of the longest suffix (``max_ngram`` .. ``min_ngram`` tokens).

        One comparison of the known columns per suffix token, shared by every n-gram length: an
        occurrence of the last ``k`` tokens ending at column ``e`` is ``eq[i][e - i]`` for ``i < k``,
        where ``eq[i]`` marks the columns equal to the ``i``-th last known token.
        """
        n = block.shape[1]  # at most the block_size of start() (an adaptive engine's narrower blocks)
        if self.block_size < 2:
            return torch.zeros_like(block[:, 1:], dtype=torch.bool)
        # An adaptive engine's one-slot step still looks up: the draft found sizes its next step.
        tokens = self.tokens
        width = tokens.shape[1]
        bound = width if known_columns is None else max(1, min(width, int(known_columns)))
        known = tokens[:, :bound]
        end = lengths.to(torch.long)  # one past the last known token
        begin = self.prompt_starts
        # last[:, i]: the i-th last known token of each row.
        last = tokens.gather(1, (end[:, None] - 1 - self.back).clamp(min=0))
        best_start = torch.full_like(end, -1)
        match = None  # match[:, j]: the last k tokens occur ending at column j + k - 1
        found_by_length = []
        for k in range(1, self.max_ngram + 1):
            if k > bound:
                break
            equal = known[:, : bound - k + 1] == last[:, k - 1 : k]
            match = equal if match is None else match[:, 1:] & equal
            if k < self.min_ngram:
                continue
            starts = self.columns[: bound - k + 1]
            # An earlier occurrence: inside the known tokens and ending before the suffix itself.
            valid = (starts[None, :] >= begin[:, None]) & (starts[None, :] < (end - k)[:, None])
            latest = torch.where(match & valid, starts[None, :], -1).amax(dim=1)
            found_by_length.append((k, latest))
        for k, latest in reversed(found_by_length):  # the longest n-gram that occurred wins
            best_start = torch.where((latest >= 0) & (best_start < 0), latest + k, best_start)
        use = (best_start >= 0) & rows
        # Continuation tokens known after the occurrence, as many as a full block takes.
        self.drafted.copy_(torch.where(use, (end - best_start).clamp(min=0, max=self.block_size - 1), 0))
        source = best_start[:, None] + self.slots[None, : n - 1] - 1  # [B, n-1], first continuation token first
        in_range = use[:, None] & (source < end[:, None])
        proposal = tokens.gather(1, source.clamp(min=0, max=width - 1))
        block[:, 1:] = torch.where(in_range, proposal, block[:, 1:])
        return in_range

    def draft_lengths(self) -> torch.Tensor | None:
        return self.drafted


def refine_guesses(strategy: GuessStrategy, block, lengths, rows, known_columns: int | None):
    """``strategy.refine``, passing ``known_columns`` only to overrides that take it (a compiled step
    passes None, so the signature is read in eager steps only)."""
    if known_columns is not None and _takes_known_columns(type(strategy).refine):
        return strategy.refine(block, lengths, rows, known_columns=known_columns)
    return strategy.refine(block, lengths, rows)


@functools.lru_cache(maxsize=64)
def _takes_known_columns(refine) -> bool:
    return "known_columns" in inspect.signature(refine).parameters


def make_guess_strategy(init: str | GuessStrategy) -> GuessStrategy:
    if isinstance(init, GuessStrategy):
        return init
    if init == "random_prompt":
        return RandomPromptGuess()
    if init == "ngram":
        return NgramGuess()
    raise ValueError(f"init must be 'random_prompt', 'ngram' or a GuessStrategy instance, got {init!r}")
