"""Exact sampling by Jacobi iteration: the warpers, the verify rule, its random numbers and its sampler.

With ``do_sample=True`` the engine's output is distributed exactly like ``model.generate(do_sample=True)``
with the same settings: every position's distribution is the model's next-token distribution given
that position's own prefix, processed (:mod:`jacobi_engine.processors`) and warped in HF's order
(temperature, top-k, top-p, min-p; :class:`SamplingSpec`).

This module holds the warpers, the rule and its proof (below), the Philox counters and the lane-order
sampler. The plain-PyTorch references of the fused ops that apply the rule (``backend="torch"``) are
:mod:`jacobi_engine.sampling_reference`; the row-wise statement of the tree rule the tests check them
against is :mod:`jacobi_engine.sampling_oracle`.

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

import torch

from jacobi_engine._ext import CONSTANTS

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
def positive_weights(weights: torch.Tensor) -> torch.Tensor:
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
    weights = positive_weights(weights)
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
