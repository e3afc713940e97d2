"""The verify ops' argument groups and their error word.

:class:`CommitTarget` is where and how the verify ops commit (the terms verified, accepted, emitted,
committed and limits are defined there), :class:`SamplingState` the sampling ops' draft state; each
passes its fields in the ops' schema order (``op_args()``). The error word (int32 [1]) is how an op
reports a value only the device sees: :func:`new_error_word`, :func:`raise_if_error`,
:func:`check_error_word`, :func:`error_messages`. :mod:`jacobi_engine.ops` re-exports all of them
(``ops.CommitTarget``, ``ops.raise_if_error``, ...), next to the ops that take them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from jacobi_engine import _ext

# The ops' error word (csrc/op_errors.h): int32 [1]; each op ORs in a bit when a value only the device
# sees breaks its contract, after clamping it (the ops never index out of bounds). CPU ops raise instead.
ERROR_BITS: dict[str, int] = dict(_ext.CONSTANTS["error_bits"])  # argument at fault -> bit
_ERROR_MEANINGS = {
    "limits": "limits[b] outside [0, tokens.size(1)] (clamped into it)",
    "lengths": "lengths[b] outside [0, limits[b]] (the row was left as it is)",
    "block": "a draft block[b, j] (j >= 1) is not a token id of the vocabulary [0, V) (rejected)",
    "candidates": "a usable candidates[b, m, i] is not a token id of the vocabulary [0, V) (never chosen)",
    "src/dst": "move_cache_rows: rows outside the cache, or moving forward over themselves (not moved)",
}


def new_error_word(device: torch.device | str) -> torch.Tensor:
    """A zeroed error word (int32 [1]) on ``device``, for the ops' ``errors`` arguments."""
    return torch.zeros(1, dtype=torch.int32, device=device)


def error_messages(word: int) -> list[str]:
    """What the bits of an error word say, one line per bit, each naming the argument at fault."""
    lines = [f"{name}: {_ERROR_MEANINGS[name]}" for name, bit in ERROR_BITS.items() if word & bit]
    known = sum(ERROR_BITS.values())
    if word & ~known:
        lines.append(f"unknown error bits {word & ~known:#x}")
    return lines


def check_error_word(word: int, errors: torch.Tensor | None = None) -> None:
    """Raises ValueError naming the arguments at fault when ``word`` (an error word read on the host,
    e.g. in the engine's existing ``torch.stack([...]).tolist()`` sync) has any bit set; ``errors``,
    when given, is the device word it was read from, and is zeroed first so the next call starts clean."""
    if word:
        if errors is not None:
            errors.zero_()
        raise ValueError("a verify op received out-of-range values: " + "; ".join(error_messages(word)))


def raise_if_error(errors: torch.Tensor, reset: bool = True) -> None:
    """Reads the error word ``errors`` (int32 [1]; one host sync) and raises ValueError naming the
    arguments at fault if any bit is set (:func:`check_error_word`), zeroing it first when ``reset``."""
    check_error_word(int(errors.reshape(-1)[0]), errors if reset else None)


@dataclass(frozen=True)
class CommitTarget:
    """Where the verify ops commit verified tokens, and the per-row state they advance (B sequences).

    Fields, in the order of the ops' schemas:

    ``tokens`` int64 [B, W] (any strides): each row's tokens; committed tokens are written at columns
        ``lengths[b], lengths[b] + 1, ...`` (in the engine: the prompt, then the generated tokens).
    ``lengths`` int32 [B]: one past each row's last known token, the column the next committed token
        goes to. Advanced in place.
    ``done`` bool [B]: finished rows, set in place. A finished row is neither read nor written again
        (its ``n_accepted`` is 0).
    ``eos_ids`` int64 [E]: end-of-sequence ids; ids < 0 never match (padding).
    ``limits`` int32 [B]: each row's column limit, ``0 <= lengths[b] <= limits[b] <= W`` (in the
        engine: prompt width + max_new_tokens). A Python int is broadcast to every row.
    ``cache_seqlens`` int32 [B]: committed rows of each sequence's KV cache. Advanced in place.
    ``chunked``: the commit mode (below).
    ``errors`` int32 [1]: the ops' error word (:data:`ERROR_BITS`; a fresh zeroed word when not given).
        The CUDA ops cannot check device values without a host sync: they clamp them and set bits here,
        which :func:`raise_if_error` (or :func:`check_error_word`, at an existing sync) turns into a
        ValueError naming the argument. The CPU ops raise directly.

    Terms, for one row of a step that fed the block ``[t0, d_1, ..., d_{n-1}]`` (``t0`` known):

    * the step's *predictions* ``p[0..n-1]``: ``p[j]`` is the op's token for the position after slot ``j``
      (greedy: the argmax; sampling: an accepted draft, a replacement, a bonus or a fresh sample);
    * the *accepted* count ``a`` (``n_accepted``, 1 <= a <= n): 1 + the length of the longest prefix of
      drafts the op accepts (greedy: ``d_{j+1} == p[j]``);
    * the *verified* tokens ``p[:a]``: exact, whatever the drafts were;
    * the *emitted* tokens: the verified ones, cut after the first EOS and at the row's limit
      (``lengths[b] + emitted <= limits[b]``); the row *finishes* when it emits an EOS or reaches its limit;
    * the step *commits* when it writes the emitted tokens to ``tokens``, advances ``lengths`` by their
      count and ``cache_seqlens`` by ``a`` (by the emitted count when the row finishes) and shifts the
      block: always in sliding mode; in chunked mode (``chunked=True``) only once the whole chunk is
      verified (``a == n``) or the row finishes; otherwise the chunk takes the Jacobi update in place.
    """

    tokens: torch.Tensor
    lengths: torch.Tensor
    done: torch.Tensor
    eos_ids: torch.Tensor
    limits: torch.Tensor
    cache_seqlens: torch.Tensor
    chunked: bool
    errors: torch.Tensor | None = None

    def __post_init__(self):
        if self.errors is None and isinstance(self.tokens, torch.Tensor):
            object.__setattr__(self, "errors", new_error_word(self.tokens.device))
        if isinstance(self.limits, torch.Tensor) or not isinstance(self.tokens, torch.Tensor):
            return  # tensors are checked by the ops themselves
        limit = self.limits
        if isinstance(limit, bool) or not isinstance(limit, int):
            raise TypeError(f"limits must be an int or an int32 tensor, got {type(limit).__name__}")
        if limit < 0:
            raise ValueError(f"limits must be >= 0, got {limit}")
        if self.tokens.dim() == 2 and self.tokens.shape[1] < limit:
            raise ValueError(f"tokens has {self.tokens.shape[1]} columns, fewer than limits={limit}")
        rows = self.tokens.shape[0] if self.tokens.dim() > 0 else 0
        object.__setattr__(self, "limits", torch.full((rows,), limit, dtype=torch.int32, device=self.tokens.device))

    def op_args(self) -> tuple:
        """The fields in the ops' schema order."""
        return (
            self.tokens,
            self.lengths,
            self.done,
            self.eos_ids,
            self.limits,
            self.cache_seqlens,
            self.chunked,
            self.errors,
        )

    def rows(self, index) -> CommitTarget:
        """The target restricted to the rows ``index`` (a slice: views that write through)."""
        return CommitTarget(
            self.tokens[index],
            self.lengths[index],
            self.done[index],
            self.eos_ids,
            self.limits[index],
            self.cache_seqlens[index],
            self.chunked,
            self.errors,
        )


@dataclass(frozen=True)
class SamplingState:
    """What the sampling verify ops read and keep about the block's drafts (B sequences, n slots, V tokens).

    ``proposal`` float32 [B, n, V]: ``proposal[b, j]`` is the distribution block slot ``j``'s draft was
    drawn from, where ``draft_sampled[b, j]`` (bool [B, n]); other drafts are deterministic. Both are
    rewritten in place for the next block. ``n_fixed`` int32 [B]: block slots ``1..n_fixed`` already
    hold verified tokens (chunked mode). ``seed`` int64 [1], ``sequence_ids`` int64 [B], ``step`` int64
    [1]: the Philox counter (see :mod:`jacobi_engine.sampling`).
    """

    proposal: torch.Tensor
    draft_sampled: torch.Tensor
    n_fixed: torch.Tensor
    seed: torch.Tensor
    sequence_ids: torch.Tensor
    step: torch.Tensor

    def op_args(self) -> tuple:
        """The fields in the ops' schema order."""
        return (self.proposal, self.draft_sampled, self.n_fixed, self.seed, self.sequence_ids, self.step)
