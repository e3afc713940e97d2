"""Plain-PyTorch references of the fused sampling ops, bit for bit the C++/CUDA ops': the ``backend="torch"``
path of ``ops.sample_verify_and_commit`` and ``ops.sample_tree_verify_and_commit``.

The rule they implement and its proof are :mod:`jacobi_engine.sampling`'s docstring; they draw with its
Philox counters and lane-order sampler. Neither reads a value on the host or has a data-dependent shape,
so a step that runs them can be compiled or captured in a CUDA graph. The row-wise statement of the tree
rule that the tests compare the tree op against is :mod:`jacobi_engine.sampling_oracle`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from jacobi_engine import reference
from jacobi_engine.sampling import lane_totals, positive_weights, sample_lane_order, slot_uniforms

if TYPE_CHECKING:
    from jacobi_engine.op_args import CommitTarget, SamplingState


def sample_verify_and_commit(
    probs: torch.Tensor, block: torch.Tensor, fill: torch.Tensor, sampling: SamplingState, target: CommitTarget
) -> torch.Tensor:
    """One exact sampling verification and commit, for every sequence of the batch.

    ``probs`` float32 [B, n, V]: slot ``i``'s target distribution (weights, normalised here).
    ``sampling`` (:class:`jacobi_engine.op_args.SamplingState`): the drafts' proposals and kinds, the chunk's
    verified prefix ``n_fixed`` and the Philox counter. ``block``, ``fill`` and ``target`` are
    :func:`jacobi_engine.reference.verify_and_commit`'s, updated the same way.

    Verifies drafts in slot order with the ratio rule (sampled drafts) or the one-hot rule
    (deterministic ones), as in :mod:`jacobi_engine.sampling`'s docstring; ``a`` = 1 + accepted drafts.
    The verified tokens ``preds[:a]`` (accepted drafts, then the replacement or bonus token) and, for slots
    ``j >= a``, fresh samples ``preds[j]`` from ``probs[b, j]`` go through greedy's commit. Then, for
    active rows, ``proposal``/``draft_sampled`` describe the next block: slots that hold a fresh
    sample get its distribution and True, the others False. Returns ``n_accepted`` int32 [B].
    """
    proposal, draft_sampled, n_fixed = sampling.proposal, sampling.draft_sampled, sampling.n_fixed
    seed, sequence_ids, step = sampling.seed, sampling.sequence_ids, sampling.step
    chunked = target.chunked
    batch, n, vocab = probs.shape
    device = probs.device
    _, usable = reference.commit_bounds(target)
    active = ~target.done & usable
    slots = torch.arange(n, device=device)
    u_accept, u_residual, u_sample = slot_uniforms(seed, sequence_ids, step, slots)
    flat = probs.reshape(batch * n, vocab)
    samples = sample_lane_order(flat, u_sample.reshape(-1)).reshape(batch, n)

    accept = torch.ones((batch, n), dtype=torch.bool, device=device)
    corrective = torch.full((batch, n), -1, dtype=torch.long, device=device)
    if n > 1:
        drafts = block[:, 1:]  # [B, n-1]: the draft judged by slot i is block slot i + 1
        # A draft outside the vocabulary has probability 0 under every rule (csrc vocab_rule): never
        # read, never accepted, flagged.
        valid = (drafts >= 0) & (drafts < vocab)
        reference.raise_error_bits(target.errors, {"block": active[:, None] & ~valid})
        safe_drafts = torch.where(valid, drafts, 0)[..., None]
        target_p = probs[:, :-1].to(torch.float64)
        target_p = torch.where(target_p > 0, target_p, 0.0)
        q = positive_weights(proposal[:, 1:])
        p_total = lane_totals(target_p.reshape(-1, vocab)).cumsum(dim=1)[:, -1].reshape(batch, n - 1)
        q_total = lane_totals(q.reshape(-1, vocab)).cumsum(dim=1)[:, -1].reshape(batch, n - 1)
        p_d = torch.where(valid, target_p.gather(2, safe_drafts)[..., 0], 0.0)
        q_d = torch.where(valid, q.gather(2, safe_drafts)[..., 0], 0.0)
        fixed = (slots[None, 1:] <= n_fixed.to(torch.long)[:, None]) & valid
        ratio = draft_sampled[:, 1:] & (q_d > 0)
        u = u_accept[:, :-1]
        accept_ratio = (u * q_d) * p_total < p_d * q_total
        accept_one_hot = u * p_total < p_d
        decided = fixed | torch.where(ratio, accept_ratio, accept_one_hot)
        # Rejection branch: the residual (ratio rule), falling back to p without the draft.
        residual = target_p * q_total[..., None] - q * p_total[..., None]
        u_res = u_residual[:, :-1].reshape(-1)
        from_residual = sample_lane_order(residual.reshape(-1, vocab), u_res).reshape(batch, n - 1)
        without_draft = torch.where(valid[..., None], target_p.scatter(2, safe_drafts, 0.0), target_p)
        from_rest = sample_lane_order(without_draft.reshape(-1, vocab), u_res).reshape(batch, n - 1)
        use_residual = ratio & (from_residual >= 0) & (from_residual != drafts)
        replacement = torch.where(use_residual, from_residual, from_rest)
        replacement = torch.where(replacement == drafts, -1, replacement)
        # No weight outside the draft: it stands (unless it is no token at all).
        accept[:, :-1] = decided | ((replacement < 0) & valid)
        corrective[:, :-1] = torch.where(accept[:, :-1], -1, replacement)

    accepted = 1 + accept[:, : n - 1].to(torch.int32).cumprod(dim=1).sum(dim=1)  # [B]
    last = (accepted - 1).to(torch.long)
    bonus_or_fix = torch.where(accepted == n, samples[:, n - 1], corrective.gather(1, last[:, None])[:, 0])
    shifted_block = torch.cat([block[:, 1:], block[:, :1]], dim=1)  # preds[j] = block[j + 1]
    preds = torch.where(slots[None, :] < last[:, None], shifted_block, samples)
    preds = torch.where(slots[None, :] == last[:, None], bonus_or_fix[:, None], preds)

    n_accepted = reference.verify_and_commit(preds, block, fill, target)
    finished = active & target.done
    committed = active & (finished | (accepted == n) | (not chunked))
    offset = torch.where(committed, last, -1)
    first = torch.where(committed, 1, accepted.to(torch.long) + 1)
    first = torch.where(active & ~finished, first, n)
    source = slots[None, :] + offset[:, None]
    covered = (slots[None, :] >= first[:, None]) & (slots[None, :] >= 1) & (source < n)
    gathered = probs.gather(1, source.clamp(0, n - 1)[..., None].expand(-1, -1, vocab))
    proposal.copy_(torch.where(covered[..., None], gathered, proposal))
    draft_sampled.copy_(torch.where(active[:, None], covered, draft_sampled))
    return n_accepted


def _row_totals(weights: torch.Tensor) -> torch.Tensor:
    """float64 [R]: the C++ ``lanes_sum`` of each row of ``weights`` [R, V] (lane totals, lanes in order)."""
    return lane_totals(weights).cumsum(dim=1)[:, -1]


def _one_hot(tokens: torch.Tensor, vocab: int, where_: torch.Tensor) -> torch.Tensor:
    """bool [R, V]: True at ``tokens[r]`` for the rows ``where_`` (tokens must be in range there)."""
    mask = torch.zeros((tokens.shape[0], vocab), dtype=torch.bool, device=tokens.device)
    return mask.scatter_(1, tokens.clamp(0, vocab - 1)[:, None], where_[:, None])


def sample_tree_verify_and_commit(
    probs: torch.Tensor,
    block: torch.Tensor,
    candidates: torch.Tensor,
    usable: torch.Tensor,
    row: torch.Tensor,
    fill: torch.Tensor,
    sampling: SamplingState,
    target: CommitTarget,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`jacobi_engine.sampling_oracle.sample_tree_verify_and_commit_rowwise` for the whole batch at
    once, without host reads or data-dependent shapes (CUDA-graph and ``torch.compile`` safe): the
    ``backend="torch"`` of ``ops.sample_tree_verify_and_commit``. Same arguments, same results bit for bit.

    The walk runs ``max(n, g + 1)`` depths for every row (rows that have stopped are masked), and at
    each depth the ``k`` branch tests in branch order; every quantity is the row-wise walk's, in the
    same float64 operations. Ids outside the vocabulary (drafts, usable candidates) are treated as the
    C++ op treats them (never read, never accepted or chosen) and flagged in ``target.errors``.
    """
    sampling_p, draft_sampled = sampling.proposal, sampling.draft_sampled
    batch, nodes, vocab = probs.shape
    n = block.shape[1]
    k, g = candidates.shape[1], candidates.shape[2]
    width = row.shape[1]
    device = probs.device
    rows = torch.arange(batch, device=device)
    _, usable_rows = reference.commit_bounds(target)
    active = ~target.done & usable_rows
    valid_drafts = (block[:, 1:] >= 0) & (block[:, 1:] < vocab)
    valid_candidates = (candidates >= 0) & (candidates < vocab)
    reference.raise_error_bits(
        target.errors,
        {
            "block": active[:, None] & ~valid_drafts,
            "candidates": active[:, None, None] & usable[..., None] & ~valid_candidates,
        },
    )
    u_accept, u_residual, u_sample = slot_uniforms(
        sampling.seed, sampling.sequence_ids, sampling.step, torch.arange(nodes, device=device)
    )  # [B, T] each
    positive = positive_weights(probs)  # [B, T, V] float64
    samples = sample_lane_order(positive.reshape(-1, vocab), u_sample.reshape(-1)).reshape(batch, nodes)

    running = active.clone()  # rows whose walk has not stopped
    alive = usable & active[:, None]  # [B, k] branches still matching the verified prefix
    block_alive = torch.ones_like(active)
    path = torch.full((batch,), -1, dtype=torch.long, device=device)
    winner = torch.full_like(path, -1)
    accepted = torch.zeros_like(path)
    last = torch.full_like(path, -1)

    def stop(mask, token, depth):
        nonlocal running, winner, accepted, last
        mask = mask & running
        winner = torch.where(mask, path, winner)
        accepted = torch.where(mask, depth + 1, accepted)
        last = torch.where(mask, token, last)
        running = running & ~mask

    for depth in range(width):
        node = torch.where(path < 0, depth, n + path * g + depth - 1) if depth > 0 else torch.zeros_like(path)
        node = node.clamp(0, nodes - 1)  # stopped rows may point anywhere
        p = positive[rows, node]  # [B, V]
        has_block_child = depth + 1 < n
        block_child = block_alive & has_block_child
        branch_child = alive.any(dim=1) if depth < g else torch.zeros_like(active)
        stop(~block_child & ~branch_child, samples[rows, node], depth)  # the bonus token

        rest = p
        excluded = torch.zeros((batch, vocab), dtype=torch.bool, device=device)
        ratio_rest = torch.zeros_like(active)
        competing = running & branch_child
        if has_block_child:
            draft = block[:, depth + 1]
            valid = valid_drafts[:, depth]
            safe = torch.where(valid, draft, 0)[:, None]
            p_total = _row_totals(p)
            fixed = (depth + 1 <= sampling.n_fixed.to(torch.long)) & valid
            ratio = draft_sampled[:, depth + 1] & (depth + 1 > sampling.n_fixed.to(torch.long)) & valid
            q = positive_weights(sampling_p[:, depth + 1])
            q_total = _row_totals(q)
            p_d = torch.where(valid, p.gather(1, safe)[:, 0], 0.0)
            q_d = torch.where(valid, q.gather(1, safe)[:, 0], 0.0)
            u = u_accept[:, depth]
            by_ratio = ratio & (q_d > 0.0)
            accept = fixed | torch.where(by_ratio, (u * q_d) * p_total < p_d * q_total, u * p_total < p_d)
            draft_mask = _one_hot(draft, vocab, valid)
            residual = torch.where(draft_mask, 0.0, positive_weights(p * q_total[:, None] - q * p_total[:, None]))
            without_draft = torch.where(draft_mask, 0.0, p)
            from_residual = sample_lane_order(residual, u_residual[:, depth])
            from_rest = sample_lane_order(without_draft, u_residual[:, depth])
            use_residual = by_ratio & (from_residual >= 0)
            token = torch.where(use_residual, from_residual, from_rest)
            stands = ~accept & ~use_residual & (from_rest < 0) & valid  # no weight outside the draft
            takes_draft = running & block_child & (accept | stands)
            rejected = running & block_child & ~takes_draft
            if depth < g:
                agrees = candidates[:, :, depth] == draft[:, None]
            else:
                agrees = torch.zeros_like(alive)
            alive = torch.where(takes_draft[:, None], alive & agrees, alive)
            stop(rejected & ~branch_child, token, depth)
            block_alive = block_alive & takes_draft
            competing = competing & ~takes_draft
            rest = torch.where(rejected[:, None], torch.where(use_residual[:, None], residual, without_draft), p)
            excluded = rejected[:, None] & draft_mask
            ratio_rest = rejected & use_residual
            total = torch.where(rejected, _row_totals(rest), p_total)
        else:
            block_alive = torch.zeros_like(block_alive)
            total = _row_totals(p)
        if depth >= g:
            continue
        chosen = torch.full_like(path, -1)
        searching = competing.clone()
        for m in range(k):
            token_m = candidates[:, m, depth]
            considered = searching & alive[:, m] & valid_candidates[:, m, depth]
            weight = torch.where(considered, rest.gather(1, token_m.clamp(0, vocab - 1)[:, None])[:, 0], 0.0)
            left = total - weight
            u = u_accept[:, n + m * g + depth]
            take = considered & (total > 0.0) & ((u * total < weight) | ~(left > 0.0))
            chosen = torch.where(take, m, chosen)
            searching = searching & ~take
            dropped = _one_hot(token_m, vocab, considered & ~take)
            rest = torch.where(dropped, 0.0, rest)
            excluded = excluded | dropped
            total = torch.where(considered & ~take, left, total)
        none = competing & (chosen < 0)
        stop(none & ~(total > 0.0), samples[rows, node], depth)
        uniform = u_residual[rows, node]
        token = sample_lane_order(rest, uniform)
        without_ratio = sample_lane_order(torch.where(excluded, 0.0, p), uniform)
        token = torch.where((token < 0) & ratio_rest, without_ratio, token)
        token = torch.where(token < 0, sample_lane_order(p, uniform), token)
        stop(none, token, depth)
        won = competing & (chosen >= 0)
        chosen_token = candidates[rows, chosen.clamp(min=0), depth]
        alive = torch.where(won[:, None], alive & (candidates[:, :, depth] == chosen_token[:, None]), alive)
        path = torch.where(won, chosen, path)

    # The winning path's row and greedy's preds (csrc assemble_tree_row), then the plain commit.
    columns = torch.arange(width, device=device)
    length = torch.where(winner < 0, n, g + 1)
    no_token = torch.full((batch, width), -1, dtype=torch.long, device=device)
    block_row = torch.cat([block, no_token[:, n:]], dim=1)
    branch = candidates[rows, winner.clamp(min=0)]  # [B, g]
    branch_row = torch.cat([block[:, :1], branch, no_token[:, g + 1 :]], dim=1)
    path_row = torch.where(winner[:, None] < 0, block_row, branch_row)
    path_nodes = torch.where(
        (winner[:, None] < 0) | (columns[None, :] == 0), columns[None, :], n + winner[:, None] * g + columns - 1
    ).clamp(0, nodes - 1)
    preds = torch.where(columns < length[:, None], samples.gather(1, path_nodes), fill)
    preds = torch.where(columns == accepted[:, None] - 1, last[:, None], preds)
    shifted = torch.cat([path_row[:, 1:], path_row[:, :1]], dim=1)  # preds[j] = row[j + 1]
    preds = torch.where(columns < accepted[:, None] - 1, shifted, preds)
    row.copy_(torch.where(active[:, None], path_row, row))
    n_accepted = reference.verify_and_commit(preds, row, fill, target)
    n_accepted = torch.where(active, n_accepted, 0)
    block.copy_(torch.where(active[:, None], row[:, :n], block))

    finished = active & target.done
    a = n_accepted.to(torch.long)
    committed = finished | (a == width) | (not target.chunked)
    first = torch.where(finished, n, torch.where(committed, 1, a + 1))
    offset = torch.where(finished, 0, torch.where(committed, a - 1, -1))
    slots = torch.arange(n, device=device)
    source = slots[None, :] + offset[:, None]
    covered = (slots[None, :] >= first[:, None]) & (slots[None, :] >= 1) & (source < length[:, None]) & active[:, None]
    source_nodes = torch.where((winner[:, None] < 0) | (source == 0), source, n + winner[:, None] * g + source - 1)
    source_nodes = source_nodes.clamp(0, nodes - 1)
    gathered = probs.gather(1, source_nodes[..., None].expand(-1, -1, vocab))
    sampling_p.copy_(torch.where(covered[..., None], gathered, sampling_p))
    draft_sampled.copy_(torch.where(active[:, None], covered, draft_sampled))
    return n_accepted.to(torch.int32), torch.where(active, winner, -1)
