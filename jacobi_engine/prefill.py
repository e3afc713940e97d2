"""The model forward, and the prefill: a request's prompts into the cache, its first token, its state.

:class:`ModelForward` is the one place that calls the model: over some tokens at given positions, on
top of a cache, with the per-forward context (bounds, token tree) set for the attention dispatch.
:func:`prefill` runs each prompt's unmasked tokens into the cache rows of its state and returns their
next-token logits; :func:`start_decoding` picks the first tokens with the decode step's own rules
(:func:`jacobi_engine.step.first_tokens`) and writes the request into the state: tokens, lengths,
limits, EOS ids, position limits, the candidate pool and the first block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from jacobi_engine import context as forward_context
from jacobi_engine.cache import JacobiCache
from jacobi_engine.guesses import draft_context
from jacobi_engine.hf_compat import ModelInfo
from jacobi_engine.pool import ngrams_of
from jacobi_engine.state import StepState
from jacobi_engine.step import StepConfig, first_tokens


class ModelForward:
    """``forward(tokens, positions, *, kv_len=None, tree=None, logits_to_keep=None) -> logits`` on ``context``'s cache.

    ``tokens``, ``positions`` int64 [B, T]; ``kv_len`` a host-side bound on the cache rows any row reads
    (eager only); ``tree`` the (mask, depth) layout of a token tree. With ``logits_to_keep`` (a tensor of
    positions), models that accept it return logits of those positions only; :attr:`kept` says whether
    the last call did.
    """

    def __init__(self, model, info: ModelInfo, context: forward_context.ForwardContext):
        self.model, self.info, self.context = model, info, context
        self.kept = False

    def __call__(self, tokens, positions, *, kv_len=None, tree=None, logits_to_keep=None) -> torch.Tensor:
        ctx = self.context
        cache = ctx.cache
        # The all-ones mask is never read by our attention (masking comes from cache_seqlens); passing
        # one stops models such as GPT-2 from probing input_ids for padding with a host sync per forward.
        kwargs = {
            self.info.cache_keyword: cache,
            "position_ids": positions,
            "attention_mask": cache.no_mask,
            "use_cache": True,
        }
        self.kept = logits_to_keep is not None and self.info.accepts_logits_to_keep
        if self.kept:
            kwargs["logits_to_keep"] = logits_to_keep
        ctx.set_forward(kv_len, tree)
        try:
            output = self.model(input_ids=tokens, **kwargs)
        finally:
            ctx.end_forward()
            cache.end_forward()
        return getattr(output, "logits", None)


@dataclass(frozen=True)
class Prompts:
    """Prompts of some state rows, as HF lays them out: ``input_ids`` [R, P] left-padded, ``attention_mask``
    [R, P] 0/1, ``lengths`` [R] unmasked tokens, ``width`` P and ``longest`` the largest length (ints)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    lengths: torch.Tensor
    width: int
    longest: int


def prefill(model, info: ModelInfo, context, cache: JacobiCache, prompts: Prompts) -> torch.Tensor:
    """Runs each prompt's unmasked tokens, in order, into ``cache`` (all its rows); returns their
    next-token logits [R, V]. Masked tokens inside a prompt are left out (no attention, no position),
    as HF leaves them out."""
    input_ids, mask, lengths = prompts.input_ids, prompts.attention_mask, prompts.lengths
    rows = input_ids.shape[0]
    # A stable sort puts each row's unmasked columns first, in their order.
    columns = torch.sort((mask == 0).to(torch.int8), dim=1, stable=True).indices[:, : prompts.longest]
    tokens = input_ids.gather(1, columns)  # [R, longest], real tokens first
    positions = torch.arange(prompts.longest, device=input_ids.device)[None].expand(rows, -1)
    last = lengths - 1
    keep = torch.unique(last)
    cache.reset()
    forward = ModelForward(model, info, forward_context.ForwardContext(cache, context.backend))
    with forward_context.installed(forward.context):
        logits = forward(tokens, positions, kv_len=prompts.longest, logits_to_keep=keep)
    cache.cache_seqlens.copy_(lengths.to(torch.int32))
    index = torch.arange(rows, device=input_ids.device)
    if forward.kept:
        return logits[index, torch.searchsorted(keep, last)]
    return logits[index, last]


def start_decoding(
    config: StepConfig,
    state: StepState,
    rows: slice,
    prompts: Prompts,
    logits: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_ids: list[int],
    pad_token_id: int,
    position_limit: torch.Tensor,
    seed: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """Writes a request into ``state`` rows ``rows`` after its prefill: the prompt (HF's layout), the first
    token drawn from ``logits`` [R, V], lengths, limits, done flags, position limits, the pool's prompt
    n-grams and the first block. Returns the first tokens int64 [R].

    EOS ids are the state's (one set for all rows); a call over all rows also sets them."""
    width, device = prompts.width, prompts.input_ids.device
    tokens = state.tokens[rows]
    tokens.fill_(pad_token_id)
    tokens[:, :width] = prompts.input_ids
    pad_lengths = (prompts.attention_mask != 0).to(torch.int8).argmax(dim=1)
    state.pad_lengths[rows] = pad_lengths
    state.prompt_widths[rows] = width
    if rows == slice(None) or (rows.start in (0, None) and rows.stop == state.key.batch):
        state.eos_ids.fill_(-1)
        if eos_ids:
            state.eos_ids[: len(eos_ids)] = torch.tensor(eos_ids, device=device)
    if state.seed is not None:
        state.seed.fill_(_int64(seed))
        state.draft_sampled[rows] = False  # the first block's drafts are the strategy's guesses
    first = first_tokens(config, _rows_view(state, rows), logits, width)
    tokens[:, width] = first
    state.lengths[rows] = width + 1
    state.limits[rows] = width + max_new_tokens
    state.done[rows] = torch.isin(first, state.eos_ids) | (max_new_tokens <= 1)
    state.position_limit[rows] = position_limit
    state.verified_in_chunk[rows] = 0
    state.row_forwards[rows] = 0
    if state.pool is not None:
        _seed_pool(state, rows, width)
    # The strategy restarts for every row (rows decoding beside a joining one keep exact outputs: guesses
    # never change greedy tokens), on each row's own prompt span.
    state.guesses.start(state.tokens, state.pad_lengths, state.prompt_widths, state.key.block_size, generator)
    block = state.guesses.fill()
    state.block[rows] = block[rows]
    state.block[rows, 0] = first
    joined = torch.zeros(state.key.batch, dtype=torch.bool, device=device)
    joined[rows] = True
    state.guesses.refine(state.block, state.lengths, joined & ~state.done)
    drafted = state.guesses.draft_lengths()
    state.context[rows] = 0 if drafted is None else draft_context(drafted)[rows]
    return first


class _RowsView:
    """The state fields :func:`first_tokens` reads, restricted to some rows."""

    def __init__(self, state: StepState, rows: slice):
        self.tokens = state.tokens[rows]
        self.pad_lengths = state.pad_lengths[rows]
        self.seed = state.seed
        self.sequence_ids = None if state.sequence_ids is None else state.sequence_ids[rows]


def _rows_view(state: StepState, rows: slice):
    return state if rows == slice(None) else _RowsView(state, rows)


def _seed_pool(state: StepState, rows: slice, width: int) -> None:
    """Empties the pool of ``rows`` and fills it with their prompts' n-grams."""
    pool = state.pool
    g = pool.length
    selected = torch.zeros(state.key.batch, dtype=torch.bool, device=state.tokens.device)
    selected[rows] = True
    pool.reset(selected)
    chunk = 64  # n-grams per insert: insert() compares every pair of one call
    for first in range(0, max(width - g, 0), chunk):
        columns = torch.arange(first, min(first + chunk, width - g), device=state.tokens.device)
        key_columns = columns[None, :].expand(state.tokens.shape[0], -1)
        keys, ngrams = ngrams_of(state.tokens, key_columns, g)
        valid = (key_columns >= state.pad_lengths[:, None]) & selected[:, None]
        pool.insert(keys, ngrams, valid)
    # The prompt's n-grams are in; the output's are fed from the one that ends in the first token on.
    pool.fed[rows] = width


def _int64(value: int) -> int:
    """``value`` as a signed 64-bit int (the Philox key is its two's-complement bits)."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value
