"""The Jacobi decode step: one function of device state, the unit that is compiled and graph-captured.

:class:`~jacobi_engine.state.StepState` holds every tensor a step reads and writes, at fixed
addresses and shapes per state key (token layout: :mod:`jacobi_engine.state`). ``model_forward``
is the model's forward over tokens at positions (:class:`jacobi_engine.prefill.ModelForward`), on the
state's cache. :class:`StepBounds` are host-side bounds an eager step may use to read less (a
compiled or captured step has static shapes and gets none).

Per step (:func:`decode_step`):

1. one model forward over the block on top of the committed KV cache (the attention op appends
   the block's K/V in place); positions are clamped per row to the last one that can matter.
   With candidates (:func:`_pool_step`) the forward is over the token tree [block | branches] and
   the longest verified path wins;
2. generation_config processors, each slot with its own prefix (only when the call has any);
3. ``ops.verify_and_commit``: argmax, accepted count, appending verified tokens, EOS and limits,
   advancing ``cache_seqlens``, shifting in the next guesses; when sampling, the warpers and
   ``ops.sample_verify_and_commit`` instead (exact speculative sampling, :mod:`jacobi_engine.sampling`),
   which also keeps each Jacobi draft's proposal distribution for the next step;
4. the guess strategy may rewrite the unverified tail (n-gram lookup);
5. statistics on the device: the histogram of newly verified tokens, optional step logs.

No host synchronisation and no data-dependent shape anywhere (tests/test_graph_safety.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from jacobi_engine import ops, sampling
from jacobi_engine.guesses import GuessStrategy, draft_context, refine_guesses
from jacobi_engine.pool import ngrams_of
from jacobi_engine.processors import LogitsProcessing
from jacobi_engine.sampling import SamplingSpec
from jacobi_engine.state import StepState


@dataclass(frozen=True)
class StepConfig:
    """What a step does that is fixed for a compiled or captured step."""

    block_size: int
    chunked: bool
    verify_backend: str
    processing: LogitsProcessing | None
    candidates: int = 0  # k branches verified beside the block
    candidate_len: int = 0  # g tokens per branch
    tree_mask: torch.Tensor | None = None  # bool [T, T], T = n + k * g (pool.tree_layout)
    tree_depth: torch.Tensor | None = None  # int32 [T]

    sampling: SamplingSpec | None = None  # None: greedy
    sampling_rule: str = "sjd"  # "one_hot": verify Jacobi drafts like deterministic ones (for comparison)
    draft_contexts: bool = False  # keep each row's draft context (an adaptive engine's choice reads it)

    @property
    def tree(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return (self.tree_mask, self.tree_depth) if self.candidates else None


@dataclass(frozen=True)
class StepBounds:
    """Host-side bounds valid until the next host sync: the cache rows any row of the forward reads
    (attention reads only those) and the token columns any row knows (n-gram lookup reads only those)."""

    kv_len: int
    known_columns: int


def forward_block(model_forward, state: StepState, bounds: StepBounds | None = None) -> torch.Tensor:
    """Logits [B, n, V] of the model over the block at each row's committed length."""
    positions = state.cache.cache_seqlens.to(torch.long)[:, None] + state.slot_offsets
    # Slots past a row's last useful position only hold tokens that are never emitted. Clamping
    # keeps learned position tables in range and, for length-dependent RoPE (which reads the
    # largest position of the forward), keeps the forward in the regime HF's decoding is in.
    positions = torch.minimum(positions, state.position_limit[:, None])
    return model_forward(state.block, positions, kv_len=None if bounds is None else bounds.kv_len)


def decode_step(model_forward, config: StepConfig, state: StepState, bounds: StepBounds | None = None) -> None:
    """One Jacobi step on device tensors only (see the module docstring)."""
    if config.candidates:
        _pool_step(model_forward, config, state, bounds)
        return
    if state.log_blocks is not None:
        state.log_blocks.index_copy_(0, state.step, state.block[None])
        state.log_lengths.index_copy_(0, state.step, state.lengths[None])
    state.lengths_before.copy_(state.lengths)
    scores = forward_block(model_forward, state, bounds)
    if config.sampling is not None:
        scores = scores.float()  # HF processes and samples next-token scores in float32
    if config.processing is not None:
        scores = _process(config.processing, scores, state)
    if config.sampling is None:
        n_accepted = _verify_greedy(config, state, scores, state.block, _fill(state))
    else:
        n_accepted = _sample_verify(config, state, scores)
    committed = state.lengths > state.lengths_before
    rewritten = _refine(state, committed & ~state.done, bounds)
    if config.sampling is not None:
        forget_rewritten_drafts(state, rewritten, committed & ~state.done)
    _count_newly_verified(config, state, n_accepted, committed)
    if state.log_accepted is not None:
        state.log_accepted.index_copy_(0, state.step, n_accepted[None])
    state.step += 1


def _verify_greedy(config: StepConfig, state: StepState, scores, block, fill, backend=None) -> torch.Tensor:
    """``ops.verify_and_commit`` of ``block`` (the row verified: the block, or a winning branch) on the state."""
    return ops.verify_and_commit(
        scores, block, fill, state.commit(config.chunked), backend=backend or config.verify_backend
    )


def _sample_verify(config: StepConfig, state: StepState, scores: torch.Tensor) -> torch.Tensor:
    """Warpers, then exact sampling verify + commit; chunked mode's verified prefix is ``verified_in_chunk``."""
    probs = config.sampling.probabilities(scores)
    if config.sampling_rule == "one_hot":
        state.draft_sampled.zero_()
    return ops.sample_verify_and_commit(
        probs,
        state.block,
        _fill(state),
        state.sampling_state(),
        state.commit(config.chunked),
        backend=config.verify_backend,
    )


def forget_rewritten_drafts(state: StepState, rewritten: torch.Tensor | None, rows: torch.Tensor) -> None:
    """Drafts a guess strategy rewrote are deterministic: the ratio rule would be wrong for them even
    when the new token equals the sampled one (see jacobi_engine.sampling). ``rewritten`` is the
    strategy's bool [B, n - 1] mask of rewritten slots; None from a strategy that overrides
    ``refine`` means any slot of ``rows`` may have been."""
    if rewritten is None:
        if type(state.guesses).refine is GuessStrategy.refine:
            return
        rewritten = rows[:, None].expand(-1, state.block.shape[1] - 1)
    state.draft_sampled[:, 1:] &= ~rewritten


def _fill(state: StepState) -> torch.Tensor:
    """The strategy's guesses for freed slots, as wide as the block (a width view of an adaptive engine's
    state has fewer slots than the strategy was started with)."""
    fill = state.guesses.fill()
    n = state.block.shape[1]
    return fill if fill.shape[1] == n else fill[:, :n].contiguous()


def _refine(state: StepState, rows: torch.Tensor, bounds: StepBounds | None):
    known = None if bounds is None else bounds.known_columns
    return refine_guesses(state.guesses, state.block, state.lengths, rows, known)


def first_tokens(config: StepConfig, state: StepState, logits: torch.Tensor, width: int) -> torch.Tensor:
    """int64 [B]: the first new token of each row from its prompt's next-token ``logits`` [B, V], by the
    step's own rules: the processors at HF's ``cur_len = width``, then argmax, or the warpers and the
    engine's draw (the prefill's counter, :data:`jacobi_engine.sampling.PREFILL_STEP`) when sampling."""
    if config.sampling is not None:
        logits = logits.float()  # as HF: processed and sampled in float32
    if config.processing is not None:
        cur_len = torch.full((logits.shape[0], 1), width, dtype=torch.long, device=logits.device)
        logits = config.processing.apply(logits[:, None], state.tokens, cur_len, state.pad_lengths)[:, 0]
    if config.sampling is None:
        return logits.argmax(dim=-1)
    return sampling.sample_tokens(config.sampling.probabilities(logits), state.seed, state.sequence_ids)


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
        # In exact arithmetic a verified prefix stays verified. In bf16 (and, rarely, fp32) a near-tie
        # can flip when the forward's shapes change (the attention's row bound grows), so a chunk's
        # verified count can drop: count each token once, at the forward that first verified it.
        reached = torch.where(committed, emitted, n_accepted)
        newly = torch.where(n_accepted > 0, (reached - state.verified_in_chunk).clamp(min=0), 0)
        state.verified_in_chunk.copy_(torch.where(committed, 0, torch.maximum(n_accepted, state.verified_in_chunk)))
    else:
        newly = torch.where(n_accepted > 0, emitted, 0)
    # Counted under the draft context the row's block had; then the context of its next block.
    slots = state.histogram.shape[1]
    index = state.context * slots + newly.to(torch.long)
    state.histogram.view(-1).scatter_add_(0, index, torch.ones_like(index))
    state.row_forwards += (n_accepted > 0).to(torch.int32)
    if config.draft_contexts:
        update_context(state, committed)


def update_context(state: StepState, rows: torch.Tensor) -> None:
    """The draft context (:func:`~jacobi_engine.guesses.draft_context`) of ``rows`` after their guesses
    were refined: how many tokens the strategy drafted for their next block."""
    drafted = state.guesses.draft_lengths()
    if drafted is not None:
        state.context.copy_(torch.where(rows, draft_context(drafted), state.context))


def _pool_step(model_forward, config: StepConfig, state: StepState, bounds: StepBounds | None) -> None:
    """A Jacobi step that also verifies ``k`` pooled candidates of ``g`` tokens (:mod:`jacobi_engine.pool`).

    One forward over the token tree ``[block | branch 1 | ... | branch k]``. Greedy: the longest
    verified path among the block and the branches wins (the block on ties) and is handed to
    ``ops.verify_and_commit`` as the row it verifies, so EOS, limits, modes and the next block
    follow the plain rules. Sampling: ``ops.sample_tree_verify_and_commit`` walks the tree with
    exact multi-candidate verification (:mod:`jacobi_engine.sampling`) and commits the winning path
    the same way. Either way a winning branch's K/V then move to the rows after ``t0``.
    """
    block, cache = state.block, state.cache
    batch, n = block.shape
    k, g = config.candidates, config.candidate_len
    width = max(n, g + 1)  # the verified row: the block, or t0 and a branch
    if state.log_blocks is not None:
        state.log_blocks.index_copy_(0, state.step, block[None])
        state.log_lengths.index_copy_(0, state.step, state.lengths[None])
    state.lengths_before.copy_(state.lengths)
    active = ~state.done
    first = block[:, 0]
    candidates, usable = state.pool.lookup(first, k)  # [B, k, g], [B, k]
    candidates = torch.where(usable[..., None], candidates, first[:, None, None])  # real ids for the embedding
    fed = torch.cat([block, candidates.reshape(batch, k * g)], dim=1)  # [B, T]
    starts = cache.cache_seqlens.to(torch.long)
    positions = torch.minimum(starts[:, None] + config.tree_depth.to(torch.long), state.position_limit[:, None])
    kv_len = None if bounds is None else bounds.kv_len
    scores = model_forward(fed, positions, kv_len=kv_len, tree=config.tree)  # [B, T, V]
    if config.sampling is not None:
        scores = scores.float()  # HF processes and samples next-token scores in float32
    if config.processing is not None:
        scores = _process_tree(config.processing, scores, state, candidates)
    fill = _fill(state)
    fill = fill.repeat(1, -(-width // n))[:, :width]  # [B, width]: real ids for every freed slot
    if config.sampling is None:
        preds = scores.argmax(dim=-1)  # [B, T]
        block_preds = preds[:, :n]
        n_accepted, best, use_branch = _verify_tree_greedy(config, state, preds, candidates, usable, fill)
    else:
        probs = config.sampling.probabilities(scores)
        if config.sampling_rule == "one_hot":
            state.draft_sampled.zero_()
        n_accepted, winner = ops.sample_tree_verify_and_commit(
            probs,
            block,
            candidates.contiguous(),
            usable.contiguous(),
            state.verified_row,
            fill,
            state.sampling_state(),
            state.commit(config.chunked),
            backend=config.verify_backend,
        )
        use_branch = (winner >= 0) & active
        best = winner.clamp(min=0)
        # The pool learns the block's likeliest continuations (deterministic given the forward,
        # so pooled candidates never depend on this step's random numbers).
        block_preds = probs[:, :n].argmax(dim=-1)
    # The winning branch's K/V sit after the block; the committed path needs them right after t0.
    branch_start = starts + n + best.to(torch.long) * g
    source = torch.where(use_branch, branch_start, starts + 1)
    ops.move_cache_rows(cache.key_value_buffers(), source, starts + 1, g, state.errors, backend=config.verify_backend)
    committed = state.lengths > state.lengths_before
    rewritten = _refine(state, committed & ~state.done, bounds)
    if config.sampling is not None:
        forget_rewritten_drafts(state, rewritten, committed & ~state.done)
    _feed_pool(state, fed[:, :n], block_preds, active, g, width)
    state.candidate_wins += use_branch.sum()
    _count_newly_verified(config, state, n_accepted, committed)
    if state.log_accepted is not None:
        state.log_accepted.index_copy_(0, state.step, n_accepted[None])
    state.step += 1


def _verify_tree_greedy(config: StepConfig, state: StepState, preds, candidates, usable, fill):
    """Greedy verification of the tree: the longest verified path among the block and the branches wins
    (the block on ties), and ``ops.verify_and_commit`` commits it. Returns (n_accepted, best, use_branch)."""
    block = state.block
    batch, n = block.shape
    k, g = candidates.shape[1], candidates.shape[2]
    width = state.verified_row.shape[1]
    active = ~state.done
    first = block[:, 0]
    block_preds = preds[:, :n]
    branch_preds = torch.cat([preds[:, None, :1].expand(-1, k, -1), preds[:, n:].reshape(batch, k, g)], dim=2)
    block_accepted = 1 + (block[:, 1:] == block_preds[:, :-1]).to(torch.int32).cumprod(1).sum(1)
    branch_accepted = 1 + (candidates == branch_preds[..., :-1]).to(torch.int32).cumprod(2).sum(2)
    branch_accepted = torch.where(usable, branch_accepted, 0)
    best_accepted, best = branch_accepted.max(dim=1)
    use_branch = (best_accepted > block_accepted) & active

    no_token = torch.full((batch, width), -1, dtype=torch.long, device=block.device)  # never equals a prediction
    block_row = torch.cat([block, no_token[:, n:]], dim=1)
    block_pred_row = torch.cat([block_preds, fill[:, n:]], dim=1)
    winner = best[:, None, None].expand(-1, 1, g)
    branch_tokens = candidates.gather(1, winner)[:, 0]  # [B, g]
    branch_row = torch.cat([first[:, None], branch_tokens, no_token[:, g + 1 :]], dim=1)[:, :width]
    winner_preds = branch_preds.gather(1, best[:, None, None].expand(-1, 1, g + 1))[:, 0]
    branch_pred_row = torch.cat([winner_preds, fill[:, g + 1 :]], dim=1)[:, :width]
    # The row the verify op rewrites in place lives in the state (a graph input), not in an
    # intermediate: inductor's graph gave wrong tokens when the op mutated a fresh tensor here.
    verified_row = state.verified_row
    verified_row.copy_(torch.where(use_branch[:, None], branch_row, block_row))
    pred_row = torch.where(use_branch[:, None], branch_pred_row, block_pred_row).contiguous()

    # Under torch.compile the verify of the pool step is the traced reference: inductor's graph with
    # the C++ op here gave wrong tokens (the plain step's use of the op is exact, and tested).
    backend = "torch" if torch.compiler.is_compiling() else config.verify_backend
    n_accepted = _verify_greedy(config, state, pred_row, verified_row, fill, backend)
    block.copy_(torch.where(active[:, None], verified_row[:, :n], block))
    return n_accepted, best, use_branch


def _feed_pool(state: StepState, fed_block, block_preds, active, g: int, width: int) -> None:
    """Adds this step's n-grams: the Jacobi predictions of every slot (accepted or rejected), then
    the n-grams of the output that the commit just completed."""
    n = fed_block.shape[1]
    pool = state.pool
    if n >= g:
        starts = torch.arange(n - g + 1, device=fed_block.device)
        columns = starts[:, None] + torch.arange(g, device=fed_block.device)
        predicted = block_preds[:, columns]  # [B, n-g+1, g]: what the model predicts after slot j
        pool.insert(fed_block[:, : n - g + 1], predicted, active[:, None].expand(-1, n - g + 1))
    feed_output(state, width + 1)  # one more than a step commits: the pool may lag one token (prefill)


CATCH_UP_COLUMNS = 64  # output n-grams per insert when the pool catches up (insert() compares every pair)


def feed_output(state: StepState, width: int) -> None:
    """Adds the output n-grams the pool lacks (key at column ``c``, continuation ``c+1 .. c+g``, for
    ``pool.fed <= c + g < lengths``), at most ``width`` per row (the most one step commits), and moves
    ``pool.fed`` past them."""
    pool = state.pool
    g = pool.length
    fed = pool.fed
    ends = torch.minimum(fed + width, state.lengths.to(torch.long))
    key_columns = fed[:, None] - g + torch.arange(width, device=fed.device)
    keys, ngrams = ngrams_of(state.tokens, key_columns, g)
    complete = (key_columns + g < ends[:, None]) & (key_columns >= state.pad_lengths[:, None])
    pool.insert(keys, ngrams, complete)
    fed.copy_(ends)


def catch_up_pool(state: StepState, span: int) -> None:
    """Feeds the pool the output committed by steps that verified no candidates (an adaptive engine's
    plain steps leave the pool alone: its upkeep would cost every plain step the time of two inserts).
    ``span``: at least the longest run of such tokens, ``max(lengths - pool.fed)`` (host-known)."""
    for _ in range(-(-span // CATCH_UP_COLUMNS)):
        feed_output(state, CATCH_UP_COLUMNS)


def _process_tree(processing: LogitsProcessing, scores, state: StepState, candidates) -> torch.Tensor:
    """Processed tree scores: the block as in :func:`_process`, each branch with its own prefix."""
    batch, n = state.block.shape
    k, g = candidates.shape[1], candidates.shape[2]
    parts = [_process(processing, scores[:, :n], state)]
    lengths = state.lengths.to(torch.long)
    columns = lengths[:, None] + torch.arange(g, device=scores.device)
    cur_len = columns + 1  # branch token m (0-based) predicts the token after it
    for branch in range(k):
        history = state.tokens.clone()
        history.scatter_(1, columns, candidates[:, branch])
        start = n + branch * g
        parts.append(processing.apply(scores[:, start : start + g], history, cur_len, state.pad_lengths))
    return torch.cat(parts, dim=1)
