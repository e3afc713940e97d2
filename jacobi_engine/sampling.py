"""Exact sampling by Jacobi iteration: the warpers, the verify rule and its plain-PyTorch reference.

With ``do_sample=True`` the engine's output is distributed exactly like ``model.generate(do_sample=True)``
with the same settings: every position's distribution is the model's next-token distribution given
that position's own prefix, processed (:mod:`jacobi_engine.processors`) and warped in HF's order
(temperature, top-k, top-p, min-p; :class:`SamplingSpec`).

The rule
--------
A step feeds the block ``[y, d_1, ..., d_{n-1}]``: ``y`` is known (the last verified token) and the
``d_j`` are drafts. The forward gives, at slot ``i``, the target ``p_i = p(. | x, y, d_1..d_i)``.
Verification walks the drafts in order; draft ``d_{i+1}`` is judged against ``p_i``:

* a **Jacobi draft** (SJD, arXiv 2410.01699) was drawn at the previous step from a known proposal
  ``q`` (that step's distribution at the slot it then occupied). Accept it with probability
  ``min(1, p_i(d) / q(d))``; on rejection draw the replacement from ``norm(max(0, p_i - q))``;
* a **deterministic draft** (random prompt tokens, n-gram lookup, anything a
  :class:`~jacobi_engine.GuessStrategy` proposes) is a point mass: accept with probability
  ``p_i(d)``; on rejection draw from ``p_i`` with ``d`` removed and renormalised (the one-hot rule,
  i.e. the ratio rule with ``q = delta_d``).

The first rejection ends the step: its replacement is the last verified token. If every draft is
accepted, a bonus token is drawn from ``p_{n-1}``. Either way each step verifies ``a >= 1`` tokens,
and then commits them exactly like greedy decoding (EOS, ``max_new_tokens``, sliding/chunked
bookkeeping: the same code, ``verify_commit_row`` in csrc/verify_commit.h). The slots after the
verified ones draw fresh samples from their ``p_i``, and these become the next step's Jacobi
drafts, with ``p_i`` kept as their proposal.

Proof sketch
------------
Write ``G_k`` for everything the algorithm has seen when it judges the draft ``d`` for output
position ``k``: all earlier forwards and random numbers, the verified prefix ``y_<k`` and the
decisions on the earlier drafts of this step. The target ``p = p(. | y_<k)`` is a function of
``G_k``. The claim is ``P(y_k = v | G_k) = p(v)`` for every ``v``; by the tower rule over the
positions, the output then has the autoregressive law ``prod_k p(y_k | y_<k)`` (stopping at EOS or
``max_new_tokens`` is a function of the prefix, as in HF).

1. *Ratio rule.* The draft was drawn from ``q`` with a random number used for nothing else, and the
   earlier decisions of this step use only their own drafts and numbers, so given ``G_k`` the
   draft is still distributed as ``q`` (the drafts of one step are drawn independently given the
   previous block). With a fresh uniform ``u``:
   ``P(y_k = v) = q(v) min(1, p(v)/q(v)) + (1 - sum_w min(q(w), p(w))) * max(0, p(v) - q(v)) / Z``
   with ``Z = sum_w max(0, p(w) - q(w)) = 1 - sum_w min(q(w), p(w))``, which is
   ``min(q(v), p(v)) + max(0, p(v) - q(v)) = p(v)``: the classic speculative-sampling identity.
   ``q`` may differ from ``p`` arbitrarily (its slot's prefix held other drafts): only knowing it
   matters.
2. *One-hot rule.* For any draft ``d`` that is independent of ``u`` given ``G_k``:
   ``P(y_k = d) = p(d)`` and ``P(y_k = v) = (1 - p(d)) p(v) / (1 - p(d)) = p(v)`` for ``v != d``.
   This holds whatever produced ``d``, which is why a slot whose draft a guess strategy rewrote
   must switch to it: using the ratio rule for a draft that was replaced *after* sampling (even by
   the same token) would condition on the replacement and break step 1.
3. *Chunked mode* keeps a chunk's verified tokens in place until the chunk is complete; they are
   accepted unconditionally at later iterations (``n_fixed``), since they are already exact draws.

Candidates (a token tree)
-------------------------
With pooled candidates (``JacobiEngine(candidates=k)``) the forward is over the tree
``[block | k branches of g tokens]``, every branch rooted at ``y``. Verification walks the tree
from the root, SpecInfer-style (Miao et al., 2023: multi-candidate speculative sampling). At a
node with target ``p``, the children offered by the paths still alive (those whose tokens equal
the verified prefix) compete in a fixed order: the block's draft first, by its own rule (ratio,
one-hot, or fixed in chunked mode); then each alive branch's token ``c``, by the one-hot rule on
what is left, ``r``: accept ``c`` with probability ``r(c) / sum(r)``, else remove ``c`` from ``r``. The
first accepted child extends the prefix (the paths that disagree with it die); if none is
accepted, the last token is drawn from the final ``r``. The winning path is then committed like
greedy's winning branch (its K/V rows moved after ``y``).

Why it is exact: a one-hot chain over deterministic tokens ``c_1..c_m`` on ``r`` outputs a draw
from ``r``, by induction on ``m`` (point 2 above, with "draw from ``r`` without ``c_1``" realised by the
chain over ``c_2..c_m``; a token already removed has weight 0 and is rejected). So at a node
where the block's draft is rejected, the branches only replace the rule's rejection draw (from the
SJD residual, or from ``p`` without the draft) by another draw from the same distribution, and
point 1's identity holds as before. The branches' tokens may even depend on this step's drafts:
the chain's output law is ``r`` whatever its tokens, so the draft's acceptance is still judged
against the unconditioned ``q``. (The pool is fed with each slot's argmax, not with its samples, so
candidates are deterministic given the forward in any case.) Every test draws its own number:
block slot ``i``'s counter judges ``d_{i+1}`` as in the plain op, branch node ``t``'s counter judges
that node's token, and the residual number of the node where the walk stops draws the last token.
Where several paths share a prefix their nodes have the same target in exact arithmetic; the walk
reads the one on the path it follows (the block while it is alive, then the first alive branch).
After a branch wins, the next block's drafts are fresh samples from that branch's nodes (with
those distributions as their proposals), and ``fill`` beyond it (deterministic drafts).

Randomness
----------
Every uniform is Philox4x32-10 of a counter ``(sequence, step, slot, draw)`` under the 64-bit key
``seed`` (csrc/sampling_verify.h): no generator state, no host synchronisation, the same numbers on
every replay of a CUDA graph, and a row's numbers do not depend on the rest of its batch. Each
(step, slot) pair has its own counter, so no number is used twice. Sampling from weights ``w`` with
a uniform ``u`` is an inverse CDF in "lane order" (token ``v`` in lane ``v % 256``, lanes in order):
any fixed order is exact, and this one lets a 256-thread GPU block sum with coalesced loads and
still pick the same token as the CPU.

Memory: the previous step's proposals
-------------------------------------
The proposal of a Jacobi draft is a whole distribution (the residual needs all of ``q``), so the
engine keeps one float32 ``[B, n, V]`` buffer (``StepState.proposal``): ``n * V * 4`` bytes per
sequence, 8 MiB at ``n = 16``, ``V = 128256`` (Llama 3). The step's logits (HF upcasts them to
float32) and their probabilities have that size already, and one sequence's KV cache is far
larger (Llama-3-8B in bf16: 128 KiB per token, 512 MiB at 4k tokens), so the buffer adds about
1.6% to a 4k-token sequence's memory. Per step the verify op rewrites only the slots that will
hold Jacobi drafts (one copy of at most ``n - 1`` rows of ``V``). Storing ``q`` in bf16 would halve it
and stay exact provided the drafts are drawn from the stored values; we have not needed to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from jacobi_engine import reference
from jacobi_engine._ext import CONSTANTS

if TYPE_CHECKING:
    from jacobi_engine.ops import CommitTarget, SamplingState

SAMPLE_LANES = CONSTANTS["sample_lanes"]  # csrc/sampling_verify.h kSampleLanes
PREFILL_STEP = CONSTANTS["prefill_step"]  # step word of the first token (drawn after prefill)
_DRAW_VERIFY, _DRAW_SAMPLE = 0, 1
_MASK32 = 0xFFFFFFFF
SAMPLING_RULES = ("sjd", "one_hot")


@dataclass(frozen=True)
class SamplingSpec:
    """HF's sampling warpers of one call, in HF's order (hashable: part of the step-cache key).

    ``temperature`` > 0 (1.0: none), ``top_k`` >= 0 (0: none), ``top_p`` in (0, 1] (1.0: none),
    ``min_p`` in [0, 1] or None. Each mirrors the arithmetic of its HF warper (same comparisons,
    same ``masked_fill``), so ties resolve the same way; ``min_tokens_to_keep`` is 1, as in HF
    without beams.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float | None = None

    def warp(self, scores: torch.Tensor) -> torch.Tensor:
        """Warped scores [..., V] (float32 in, float32 out; the input is not modified)."""
        if self.temperature != 1.0:
            scores = scores / self.temperature
        if self.top_k != 0:
            top_k = min(self.top_k, scores.shape[-1])
            scores = scores.masked_fill(scores < torch.topk(scores, top_k)[0][..., -1, None], -float("inf"))
        if self.top_p < 1.0:
            sorted_logits, sorted_indices = torch.sort(scores, descending=False)
            cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
            sorted_remove = cumulative <= (1 - self.top_p)
            sorted_remove[..., -1:] = False
            remove = sorted_remove.scatter(-1, sorted_indices, sorted_remove)
            scores = scores.masked_fill(remove, -float("inf"))
        if self.min_p is not None:
            probs = torch.softmax(scores, dim=-1)
            remove = probs < self.min_p * probs.amax(dim=-1, keepdim=True)
            remove.scatter_(-1, torch.topk(probs, 1, dim=-1).indices, False)
            scores = scores.masked_fill(remove, -float("inf"))
        return scores

    def probabilities(self, scores: torch.Tensor) -> torch.Tensor:
        """float32 [..., V]: the distribution HF samples from, ``softmax(warp(scores))``."""
        return torch.softmax(self.warp(scores.float()), dim=-1)


# -- counter-based random numbers (the csrc/sampling_verify.h Philox, in int64 tensor arithmetic) --
def _mulhilo(multiplier: int, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of multiplier * value for 32-bit operands, without int64 overflow."""
    low_part = multiplier * (value & 0xFFFF)  # < 2**48
    high_part = multiplier * (value >> 16)  # < 2**48
    middle = ((high_part & 0xFFFF) << 16) + low_part  # < 2**49
    return (high_part >> 16) + (middle >> 32), middle & _MASK32


def philox4x32_10(counter: tuple, key: tuple) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 of int64 tensors holding 32-bit words (broadcast); returns the 4 output words."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for round_index in range(10):
        if round_index > 0:
            k0 = (k0 + 0x9E3779B9) & _MASK32
            k1 = (k1 + 0xBB67AE85) & _MASK32
        hi0, lo0 = _mulhilo(0xD2511F53, c0)
        hi1, lo1 = _mulhilo(0xCD9E8D57, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def _uniform53(hi: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    return ((hi << 21) | (lo >> 11)).to(torch.float64) * (1.0 / 2**53)


def slot_uniforms(seed: torch.Tensor, sequence_ids: torch.Tensor, step, slots: torch.Tensor):
    """(accept, residual, sample) float64 uniforms of each (sequence, slot): [B, m] for ``sequence_ids``
    [B], ``slots`` [m]; ``seed`` and ``step`` are int64 tensors of one value (or ints)."""
    seed = torch.as_tensor(seed, dtype=torch.long, device=sequence_ids.device).reshape(())
    step = torch.as_tensor(step, dtype=torch.long, device=sequence_ids.device).reshape(())
    key = (seed & _MASK32, (seed >> 32) & _MASK32)
    c0 = (sequence_ids & _MASK32)[:, None]
    c1 = step & _MASK32
    c2 = (slots & _MASK32)[None, :]
    zeros = torch.zeros_like(c0 + c2)
    verify = philox4x32_10((c0 + zeros, c1 + zeros, c2 + zeros, zeros + _DRAW_VERIFY), key)
    fresh = philox4x32_10((c0 + zeros, c1 + zeros, c2 + zeros, zeros + _DRAW_SAMPLE), key)
    return _uniform53(verify[0], verify[1]), _uniform53(verify[2], verify[3]), _uniform53(fresh[0], fresh[1])


# -- lane-order inverse CDF ------------------------------------------------------------------------
def _positive(weights: torch.Tensor) -> torch.Tensor:
    weights = weights.to(torch.float64)
    return torch.where(weights > 0, weights, 0.0)


def _by_lane(weights: torch.Tensor) -> torch.Tensor:
    """[R, V] -> [R, K, L]: element [r, k, l] is token l + L*k (zero past V)."""
    rows, vocab = weights.shape
    steps = -(-vocab // SAMPLE_LANES)
    padded = torch.zeros((rows, steps * SAMPLE_LANES), dtype=weights.dtype, device=weights.device)
    padded[:, :vocab] = weights
    return padded.view(rows, steps, SAMPLE_LANES)


def lane_totals(weights: torch.Tensor) -> torch.Tensor:
    """float64 [R, L]: per-lane sums in increasing token order (cumsum adds left to right, like the C++ loop)."""
    return _by_lane(weights).cumsum(dim=1)[:, -1]


def _first_true(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(index of the first True along the last dim, whether there is one)."""
    return mask.to(torch.int8).argmax(dim=-1), mask.any(dim=-1)


def _last_true(mask: torch.Tensor) -> torch.Tensor:
    width = mask.shape[-1]
    return width - 1 - mask.flip(-1).to(torch.int8).argmax(dim=-1)


def sample_lane_order(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """int64 [R]: one draw from each row of ``weights`` [R, V] (not normalised; <= 0 and NaN weigh
    nothing) with the uniform ``uniforms`` [R] in [0, 1); -1 where a row has no positive weight."""
    weights = _positive(weights)
    lanes = _by_lane(weights)  # [R, K, L]
    totals = lanes.cumsum(dim=1)[:, -1]  # [R, L]
    ends = totals.cumsum(dim=1)
    threshold = uniforms.to(torch.float64) * ends[:, -1]
    prefix = torch.cat([torch.zeros_like(ends[:, :1]), ends[:, :-1]], dim=1)
    nonempty = totals > 0
    lane, found = _first_true(nonempty & (ends > threshold[:, None]))
    lane = torch.where(found, lane, _last_true(nonempty))  # rounding pushed past the end
    rows = torch.arange(weights.shape[0], device=weights.device)
    lane_weights = lanes[rows, :, lane]  # [R, K]
    running = torch.cat([prefix[rows, lane][:, None], lane_weights], dim=1).cumsum(dim=1)[:, 1:]
    positive = lane_weights > 0
    step, hit = _first_true(positive & (running > threshold[:, None]))
    step = torch.where(hit, step, _last_true(positive))
    token = lane + SAMPLE_LANES * step
    return torch.where(nonempty.any(dim=1), token, -1)


def sample_tokens(probs: torch.Tensor, seed, sequence_ids: torch.Tensor, step=PREFILL_STEP, slot: int = 0):
    """int64 [B]: the engine's draw from each row of ``probs`` [B, V] (the first token after prefill
    uses ``step=PREFILL_STEP``, slot 0, the "sample" draw: no decode step uses that counter)."""
    slots = torch.tensor([slot], dtype=torch.long, device=probs.device)
    _, _, uniform = slot_uniforms(seed, sequence_ids, step, slots)
    return sample_lane_order(probs, uniform[:, 0])


# -- the reference of the fused op ----------------------------------------------------------------
def sample_verify_and_commit(
    probs: torch.Tensor, block: torch.Tensor, fill: torch.Tensor, sampling: SamplingState, target: CommitTarget
) -> torch.Tensor:
    """One exact sampling verification and commit, for every sequence of the batch.

    ``probs`` float32 [B, n, V]: slot ``i``'s target distribution (weights, normalised here).
    ``sampling`` (:class:`jacobi_engine.ops.SamplingState`): the drafts' proposals and kinds, the chunk's
    verified prefix ``n_fixed`` and the Philox counter. ``block``, ``fill`` and ``target`` are
    :func:`jacobi_engine.reference.verify_and_commit`'s, updated the same way.

    Verifies drafts in slot order with the ratio rule (sampled drafts) or the one-hot rule
    (deterministic ones), as in the module docstring; ``a`` = 1 + accepted drafts. The verified
    tokens ``preds[:a]`` (accepted drafts, then the replacement or bonus token) and, for slots
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
        q = _positive(proposal[:, 1:])
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


# -- sampling over a token tree (candidates): the reference of sample_tree_verify_and_commit ------
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
            positive[node] = _positive(probs[node])
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
            q = _positive(proposal[depth + 1])
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
                residual = _without(_positive(p * q_total - q * p_total), excluded)
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
    are :func:`sample_verify_and_commit`'s. Returns (``n_accepted`` int32 [B], ``winner`` int64 [B]:
    -1 when the block's path won, else the branch).

    At each node the children of the paths still alive compete: the block's draft first, by its
    rule (ratio, one-hot, or fixed in chunked mode), then each alive branch's token in branch order
    by the one-hot rule on what is left (SpecInfer's multi-candidate verification). The node's
    counter slot gives the numbers: block slot ``i``'s uniforms judge the draft ``block[i + 1]`` as in
    the plain op, branch node ``t``'s accept uniform judges that node's token, and the residual
    uniform of the node where the walk stops draws the last token. A plain per-row loop that reads
    values on the host: the statement of the rule the tests compare against (valid inputs only). The
    op's ``backend="torch"`` runs :func:`sample_tree_verify_and_commit`, the same rule without host
    reads; the C++/CUDA op is the implementation.
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
                preds[j] = _draw(_positive(probs[b, node]), float(uniforms[2][node]))
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
    """:func:`sample_tree_verify_and_commit_rowwise` for the whole batch at once, without host reads or
    data-dependent shapes (CUDA-graph and ``torch.compile`` safe): the ``backend="torch"`` of
    ``ops.sample_tree_verify_and_commit``. Same arguments, same results bit for bit.

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
    positive = _positive(probs)  # [B, T, V] float64
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
            q = _positive(sampling_p[:, depth + 1])
            q_total = _row_totals(q)
            p_d = torch.where(valid, p.gather(1, safe)[:, 0], 0.0)
            q_d = torch.where(valid, q.gather(1, safe)[:, 0], 0.0)
            u = u_accept[:, depth]
            by_ratio = ratio & (q_d > 0.0)
            accept = fixed | torch.where(by_ratio, (u * q_d) * p_total < p_d * q_total, u * p_total < p_d)
            draft_mask = _one_hot(draft, vocab, valid)
            residual = torch.where(draft_mask, 0.0, _positive(p * q_total[:, None] - q * p_total[:, None]))
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
