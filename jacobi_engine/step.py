"""The Jacobi decode step: one function of device state, the unit that is compiled and graph-captured.

:class:`StepState` holds every tensor a step reads and writes, at fixed addresses and shapes for
a given (batch, capacity, block size, mode, processors) key, so that one CUDA graph captured on
it serves every later ``generate`` call with that key: per-request values (prompt width, limits,
EOS ids) live in device tensors, never in Python numbers baked into the graph.

Token layout (HF's): ``tokens[b, :width]`` is the prompt exactly as passed (padding included),
generated token ``g`` sits at column ``width + g``; ``lengths[b]`` is one past row ``b``'s last
known token (the verify op's fill level), ``limits[b] = width + max_new_tokens``. Block slot 0 is
always ``tokens[b, lengths[b] - 1]``: known-correct, its K/V not yet in the cache.

Per step (:func:`decode_step`):

1. one model forward over the block on top of the committed KV cache (the attention op appends
   the block's K/V in place); positions are clamped per row to the last one that can matter;
2. generation_config processors, each slot with its own prefix (only when the call has any);
3. ``ops.verify_and_commit``: argmax, accepted count, appending verified tokens, EOS and limits,
   advancing ``cache_seqlens``, shifting in the next guesses;
4. the guess strategy may rewrite the unverified tail (n-gram lookup);
5. statistics on the device: the histogram of newly verified tokens, optional step logs.

No host synchronisation and no data-dependent shape anywhere (tests/test_graph_safety.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from jacobi_engine import ops
from jacobi_engine.cache import JacobiCache
from jacobi_engine.guesses import GuessStrategy
from jacobi_engine.processors import LogitsProcessing


@dataclass
class StepState:
    """Device state of the decode step. Shapes: B sequences, n block slots, W = token columns."""

    cache: JacobiCache
    guesses: GuessStrategy
    tokens: torch.Tensor  # [B, W] int64, HF layout (see module docstring)
    block: torch.Tensor  # [B, n] int64, slot 0 known-correct
    lengths: torch.Tensor  # [B] int32, one past the last known token of each row
    limits: torch.Tensor  # [B] int32, width + max_new_tokens
    done: torch.Tensor  # [B] bool
    eos_ids: torch.Tensor  # [E] int64, padded with -1 (never matches)
    position_limit: torch.Tensor  # [B] int64, largest position id worth feeding
    pad_lengths: torch.Tensor  # [B] int64, leading padding of each prompt (repetition penalty)
    histogram: torch.Tensor  # [n + 1] int64, newly verified tokens per (sequence, forward)
    verified_in_chunk: torch.Tensor  # [B] int32, tokens already verified in the current chunk
    lengths_before: torch.Tensor  # [B] int32 scratch
    step: torch.Tensor  # [1] int64, decode steps taken
    slot_offsets: torch.Tensor  # [n] int64, 0..n-1
    log_blocks: torch.Tensor | None = None  # [max_steps, B, n] blocks fed, when logging
    log_lengths: torch.Tensor | None = None  # [max_steps, B] lengths before the step
    log_accepted: torch.Tensor | None = None  # [max_steps, B] accepted counts (0: finished)


@dataclass(frozen=True)
class StepConfig:
    """What a step does that is fixed for a compiled or captured step."""

    block_size: int
    chunked: bool
    verify_backend: str
    processing: LogitsProcessing | None


def forward_block(model_forward, state: StepState) -> torch.Tensor:
    """Logits [B, n, V] of the model over the block at each row's committed length."""
    positions = state.cache.cache_seqlens.to(torch.long)[:, None] + state.slot_offsets
    # Slots past a row's last useful position only hold tokens that are never emitted. Clamping
    # keeps learned position tables in range and, for length-dependent RoPE (which reads the
    # largest position of the forward), keeps the forward in the regime HF's decoding is in.
    positions = torch.minimum(positions, state.position_limit[:, None])
    return model_forward(state.cache, state.block, positions)


def decode_step(model_forward, config: StepConfig, state: StepState) -> None:
    """One Jacobi step on device tensors only (see the module docstring)."""
    if state.log_blocks is not None:
        state.log_blocks.index_copy_(0, state.step, state.block[None])
        state.log_lengths.index_copy_(0, state.step, state.lengths[None])
    state.lengths_before.copy_(state.lengths)
    scores = forward_block(model_forward, state)
    if config.processing is not None:
        scores = _process(config.processing, scores, state)
    n_accepted = ops.verify_and_commit(
        scores,
        state.block,
        state.guesses.fill(),
        state.cache.cache_seqlens,
        state.tokens,
        state.lengths,
        state.done,
        state.eos_ids,
        state.limits,
        config.chunked,
        backend=config.verify_backend,
    )
    committed = state.lengths > state.lengths_before
    state.guesses.refine(state.block, state.lengths, committed & ~state.done)
    _count_newly_verified(config, state, n_accepted, committed)
    if state.log_accepted is not None:
        state.log_accepted.index_copy_(0, state.step, n_accepted[None])
    state.step += 1


def _process(processing: LogitsProcessing, scores: torch.Tensor, state: StepState) -> torch.Tensor:
    """Processed scores: slot j sees HF's input_ids ``tokens[:, :lengths + j]`` with the block's guesses."""
    n = state.block.shape[1]
    if n > 1:
        # The guesses go to the columns they would occupy if accepted. Those columns are past
        # each row's known tokens: the verify op rewrites whatever it emits, and the engine
        # pads everything past a row's length when it builds the output.
        columns = state.lengths.to(torch.long)[:, None] + state.slot_offsets[:-1]
        state.tokens.scatter_(1, columns, state.block[:, 1:])
    cur_len = state.lengths.to(torch.long)[:, None] + state.slot_offsets
    return processing.apply(scores, state.tokens, cur_len, state.pad_lengths)


def _count_newly_verified(config: StepConfig, state: StepState, n_accepted, committed) -> None:
    """Histogram of the tokens each (sequence, forward) newly verified and kept.

    Sliding mode emits what it verifies. A chunked iteration that does not commit verifies
    ``n_accepted`` tokens of which the previous iterations of the chunk already verified
    ``verified_in_chunk``; the committing one adds the rest of what the chunk emits. So the
    histogram sums to the tokens generated after prefill in both modes.
    """
    emitted = state.lengths - state.lengths_before
    if config.chunked:
        reached = torch.where(committed, emitted, n_accepted)
        newly = torch.where(n_accepted > 0, reached - state.verified_in_chunk, 0)
        state.verified_in_chunk.copy_(torch.where(committed, 0, n_accepted))
    else:
        newly = torch.where(n_accepted > 0, emitted, 0)
    state.histogram.scatter_add_(0, newly.to(torch.long), torch.ones_like(newly, dtype=torch.long))
