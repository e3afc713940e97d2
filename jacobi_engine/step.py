"""The Jacobi decode step: one function of device state, the unit that is compiled and graph-captured.

:class:`StepState` holds every tensor a step reads and writes, at fixed addresses and shapes for
a given (batch, capacity, block size, mode, candidates, processors, sampling) key, so that one CUDA graph captured on
it serves every later ``generate`` call with that key: per-request values (prompt width, limits,
EOS ids) live in device tensors, never in Python numbers baked into the graph.

Token layout (HF's): ``tokens[b, :width]`` is the prompt exactly as passed (padding included),
generated token ``g`` sits at column ``width + g``; ``lengths[b]`` is one past row ``b``'s last
known token (the verify op's fill level), ``limits[b] = width + max_new_tokens``. Block slot 0 is
always ``tokens[b, lengths[b] - 1]``: known-correct, its K/V not yet in the cache.

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

from jacobi_engine import ops
from jacobi_engine.cache import JacobiCache
from jacobi_engine.guesses import GuessStrategy
from jacobi_engine.pool import CandidatePool, ngrams_of
from jacobi_engine.processors import LogitsProcessing
from jacobi_engine.sampling import SamplingSpec


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
    pool: CandidatePool | None = None  # n-gram candidates, when the engine verifies any
    verified_row: torch.Tensor | None = None  # [B, max(n, g + 1)] int64, the row the pool step verifies
    candidate_wins: torch.Tensor | None = None  # () int64, (sequence, forward) pairs a branch won
    log_blocks: torch.Tensor | None = None  # [max_steps, B, n] blocks fed, when logging
    log_lengths: torch.Tensor | None = None  # [max_steps, B] lengths before the step
    log_accepted: torch.Tensor | None = None  # [max_steps, B] accepted counts (0: finished)
    # Sampling only (see jacobi_engine.sampling):
    proposal: torch.Tensor | None = None  # [B, n, V] float32, distribution each slot's draft was drawn from
    draft_sampled: torch.Tensor | None = None  # [B, n] bool, the draft was drawn from `proposal` (else deterministic)
    seed: torch.Tensor | None = None  # [1] int64, Philox key
    sequence_ids: torch.Tensor | None = None  # [B] int64, Philox counter word of each row
    # [1] int32, the ops' error word (ops.CommitTarget): the engine checks it at its host syncs
    # (ops.check_error_word / ops.raise_if_error). Made here when not given.
    errors: torch.Tensor | None = None

    def __post_init__(self):
        if self.errors is None:
            self.errors = ops.new_error_word(self.tokens.device)
        # The verify ops' commit group over this state's tensors, built once: the targets hold the
        # very tensors above (one per commit mode; the step's config picks one).
        self._commit_targets = {
            chunked: ops.CommitTarget(
                self.tokens,
                self.lengths,
                self.done,
                self.eos_ids,
                self.limits,
                self.cache.cache_seqlens,
                chunked,
                self.errors,
            )
            for chunked in (False, True)
        }

    def commit(self, chunked: bool) -> ops.CommitTarget:
        """The :class:`~jacobi_engine.ops.CommitTarget` of this state in the given commit mode."""
        return self._commit_targets[chunked]

    def sampling_state(self) -> ops.SamplingState:
        """The sampling ops' draft state (its tensors are set after allocation, so it is grouped per call)."""
        return ops.SamplingState(
            self.proposal, self.draft_sampled, self.verified_in_chunk, self.seed, self.sequence_ids, self.step
        )


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
    if config.candidates:
        _pool_step(model_forward, config, state)
        return
    if state.log_blocks is not None:
        state.log_blocks.index_copy_(0, state.step, state.block[None])
        state.log_lengths.index_copy_(0, state.step, state.lengths[None])
    state.lengths_before.copy_(state.lengths)
    scores = forward_block(model_forward, state)
    if config.sampling is not None:
        scores = scores.float()  # HF processes and samples next-token scores in float32
    if config.processing is not None:
        scores = _process(config.processing, scores, state)
    if config.sampling is None:
        n_accepted = _verify_greedy(config, state, scores, state.block, state.guesses.fill())
    else:
        n_accepted = _sample_verify(config, state, scores)
    committed = state.lengths > state.lengths_before
    rewritten = state.guesses.refine(state.block, state.lengths, committed & ~state.done)
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
        state.guesses.fill(),
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
    state.histogram.scatter_add_(0, newly.to(torch.long), torch.ones_like(newly, dtype=torch.long))


def _pool_step(model_forward, config: StepConfig, state: StepState) -> None:
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
    cache.tree_mask, cache.tree_depth = config.tree_mask, config.tree_depth
    try:
        scores = model_forward(cache, fed, positions)  # [B, T, V]
    finally:
        cache.tree_mask = cache.tree_depth = None
    if config.sampling is not None:
        scores = scores.float()  # HF processes and samples next-token scores in float32
    if config.processing is not None:
        scores = _process_tree(config.processing, scores, state, candidates)
    fill = state.guesses.fill()
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
    rewritten = state.guesses.refine(block, state.lengths, committed & ~state.done)
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
    # Output n-grams (key at column c, continuation c+1..c+g) completed by this commit.
    before = state.lengths_before.to(torch.long)
    key_columns = before[:, None] - g + torch.arange(width, device=fed_block.device)
    keys, ngrams = ngrams_of(state.tokens, key_columns, g)
    complete = (key_columns + g < state.lengths.to(torch.long)[:, None]) & (key_columns >= state.pad_lengths[:, None])
    pool.insert(keys, ngrams, complete & active[:, None])


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
