"""The row-wise statement of exact sampling over a token tree, the oracle of the tree op's tests.

:func:`sample_tree_verify_and_commit_rowwise` walks each row's tree in plain Python, reading values
on the host (csrc/sampling_verify.h ``walk_tree`` + ``finish_walk``, one row at a time). The tests
compare the compiled op and its graph-safe reference
(:func:`jacobi_engine.sampling_reference.sample_tree_verify_and_commit`) against it; it is kept
apart from that reference so that neither serves two masters. The rule and its proof are
:mod:`jacobi_engine.sampling`'s docstring.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from jacobi_engine import reference
from jacobi_engine.sampling import lane_totals, positive_weights, sample_lane_order, slot_uniforms

if TYPE_CHECKING:
    from jacobi_engine.op_args import CommitTarget, SamplingState


def _tree_path_node(n: int, g: int, path: int, depth: int) -> int:
    return depth if path < 0 or depth == 0 else n + path * g + depth - 1


def _lanes_total(weights: torch.Tensor) -> float:
    """The C++ ``lanes_sum`` of a float64 weight vector [V] (lane totals, then lanes in order)."""
    return float(lane_totals(weights[None]).cumsum(dim=1)[0, -1])


def _draw(weights: torch.Tensor, uniform: float) -> int:
    return int(sample_lane_order(weights[None], torch.tensor([uniform], dtype=torch.float64))[0])


def _without(weights: torch.Tensor, excluded: list[int]) -> torch.Tensor:
    if excluded:
        weights = weights.clone()
        weights[torch.tensor(excluded, dtype=torch.long)] = 0.0
    return weights


def _walk_tree(probs, proposal, block, candidates, usable, sampled, n_fixed, uniforms):
    """One row's tree walk (csrc/sampling_verify.h ``walk_tree`` + ``finish_walk``), in plain Python.

    Returns (winner path: -1 block or the branch, accepted count a, last token, fresh sample of a node).
    """
    n = block.shape[0]
    k, g = candidates.shape
    u_accept, u_residual, u_sample = uniforms
    positive = [None] * probs.shape[0]

    def p_of(node):
        if positive[node] is None:
            positive[node] = positive_weights(probs[node])
        return positive[node]

    def sample(node):
        return _draw(p_of(node), float(u_sample[node]))

    alive = [bool(usable[m]) for m in range(k)]
    block_alive, path = True, -1
    depth = 0
    while True:
        node = _tree_path_node(n, g, path, depth)
        p = p_of(node)
        block_child = block_alive and depth + 1 < n
        branch_child = depth < g and any(alive)
        if not block_child and not branch_child:
            return path, depth + 1, sample(node)
        rest, excluded = p, []
        if block_child:
            draft = int(block[depth + 1])
            p_total = _lanes_total(p)
            fixed = depth + 1 <= n_fixed
            ratio = bool(sampled[depth + 1]) and not fixed
            q = positive_weights(proposal[depth + 1])
            q_d = float(q[draft])
            p_d = float(p[draft])
            if fixed:
                accepted = True
            elif ratio and q_d > 0.0:
                q_total = _lanes_total(q)
                accepted = (float(u_accept[depth]) * q_d) * p_total < p_d * q_total
            else:
                accepted = float(u_accept[depth]) * p_total < p_d
            if accepted:
                alive = [alive[m] and depth < g and int(candidates[m, depth]) == draft for m in range(k)]
                depth += 1
                continue
            excluded = [draft]
            token, ratio_rest = -1, False
            if ratio and q_d > 0.0:
                residual = _without(positive_weights(p * q_total - q * p_total), excluded)
                token = _draw(residual, float(u_residual[depth]))
                if token >= 0:
                    rest, ratio_rest = residual, True
            if token < 0:
                rest = _without(p, excluded)
                token = _draw(rest, float(u_residual[depth]))
                if token < 0:  # no weight outside the draft: it stands
                    alive = [alive[m] and depth < g and int(candidates[m, depth]) == draft for m in range(k)]
                    depth += 1
                    continue
            block_alive = False
            if not branch_child:
                return path, depth + 1, token
            total = _lanes_total(rest)
        else:
            block_alive = False
            total = _lanes_total(p)
            ratio_rest = False
        chosen = None
        for m in range(k):
            if not alive[m]:
                continue
            token = int(candidates[m, depth])
            weight = 0.0 if token in excluded else float(rest[token])
            left = total - weight
            u = float(u_accept[_tree_path_node(n, g, m, depth + 1)])
            if total > 0.0 and (u * total < weight or not left > 0.0):
                chosen = m
                break
            excluded.append(token)
            total = left
        if chosen is None:
            if not total > 0.0:
                return path, depth + 1, sample(node)
            uniform = float(u_residual[node])
            token = _draw(_without(rest, excluded), uniform)
            if token < 0 and ratio_rest:
                token = _draw(_without(p, excluded), uniform)
            if token < 0:
                token = _draw(p, uniform)
            return path, depth + 1, token
        token = int(candidates[chosen, depth])
        alive = [alive[m] and int(candidates[m, depth]) == token for m in range(k)]
        path = chosen
        depth += 1


def sample_tree_verify_and_commit_rowwise(
    probs: torch.Tensor,
    block: torch.Tensor,
    candidates: torch.Tensor,
    usable: torch.Tensor,
    row: torch.Tensor,
    fill: torch.Tensor,
    sampling: SamplingState,
    target: CommitTarget,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact sampling over the token tree ``[block | k branches of g]``, then greedy's commit of the winner.

    ``probs`` float32 [B, T, V], T = n + k * g: node ``t``'s target distribution in the layout of
    :func:`jacobi_engine.pool.tree_layout` (block slots ``0..n-1``; branch ``m``'s token ``i`` at
    ``n + m * g + i``, its parent the token before it, or ``t0``). ``candidates`` int64 [B, k, g],
    ``usable`` bool [B, k] (unusable branches are ignored). ``row`` int64 [B, W], W = max(n, g + 1):
    written with the winning path's tokens (-1 past its end) and rewritten by the commit, as
    ``block`` is (``block = row[:, :n]`` afterwards); ``fill`` int64 [B, W]. ``sampling`` and ``target``
    are :func:`jacobi_engine.sampling_reference.sample_verify_and_commit`'s. Returns (``n_accepted``
    int32 [B], ``winner`` int64 [B]: -1 when the block's path won, else the branch).

    At each node the children of the paths still alive compete: the block's draft first, by its
    rule (ratio, one-hot, or fixed in chunked mode), then each alive branch's token in branch order
    by the one-hot rule on what is left (SpecInfer's multi-candidate verification). The node's
    counter slot gives the numbers: block slot ``i``'s uniforms judge the draft ``block[i + 1]`` as in
    the plain op, branch node ``t``'s accept uniform judges that node's token, and the residual
    uniform of the node where the walk stops draws the last token. A plain per-row loop that reads
    values on the host: the statement of the rule the tests compare against (valid inputs only). The
    op's ``backend="torch"`` runs :func:`jacobi_engine.sampling_reference.sample_tree_verify_and_commit`,
    the same rule without host reads; the C++/CUDA op is the implementation.
    """
    proposal, draft_sampled, n_fixed = sampling.proposal, sampling.draft_sampled, sampling.n_fixed
    seed, sequence_ids, step = sampling.seed, sampling.sequence_ids, sampling.step
    done, chunked = target.done, target.chunked
    batch, nodes, vocab = probs.shape
    n = block.shape[1]
    g = candidates.shape[2]
    width = row.shape[1]
    n_accepted = torch.zeros(batch, dtype=torch.int32, device=block.device)
    winner = torch.full((batch,), -1, dtype=torch.long, device=block.device)
    node_ids = torch.arange(nodes, device=block.device)
    for b in range(batch):
        if bool(done[b]):
            continue
        uniforms = [u[0] for u in slot_uniforms(seed, sequence_ids[b : b + 1], step, node_ids)]
        path, accepted, last = _walk_tree(
            probs[b], proposal[b], block[b], candidates[b], usable[b], draft_sampled[b], int(n_fixed[b]), uniforms
        )
        length = n if path < 0 else g + 1
        tokens = [int(block[b, j]) if path < 0 or j == 0 else int(candidates[b, path, j - 1]) for j in range(length)]
        row[b] = torch.tensor(tokens + [-1] * (width - length), dtype=torch.long)
        preds = fill[b].clone()
        for j in range(width):
            if j < accepted - 1:
                preds[j] = tokens[j + 1]
            elif j == accepted - 1:
                preds[j] = last
            elif j < length:
                node = _tree_path_node(n, g, path, j)
                preds[j] = _draw(positive_weights(probs[b, node]), float(uniforms[2][node]))
        one = slice(b, b + 1)
        accepted_rows = reference.verify_and_commit(preds[None], row[one], fill[one], target.rows(one))
        a = int(accepted_rows[0])
        n_accepted[b] = a
        winner[b] = path
        block[b] = row[b, :n]
        finished = bool(done[b])
        committed = (not chunked) or a == width or finished
        if finished:
            first, offset = n, 0
        elif committed:
            first, offset = 1, a - 1
        else:
            first, offset = a + 1, -1
        for j in range(n):
            covered = j >= first and j >= 1 and j + offset < length
            draft_sampled[b, j] = covered
            if covered:
                proposal[b, j] = probs[b, _tree_path_node(n, g, path, j + offset)]
    return n_accepted, winner
