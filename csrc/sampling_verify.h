// Per-slot and per-row logic of the sampling verify-and-commit op (exact speculative sampling over
// a Jacobi block). The math lives here once: the CPU op (ops.cpp) runs it sequentially, the CUDA
// kernel (kernels.cu) computes the lane totals below with one thread per lane and calls the same
// functions for everything else, and jacobi_engine/sampling_reference.py states it in plain
// PyTorch. The three agree bit for bit on the same inputs (same summation order, no contracted
// multiply-adds).
// Plain C++ with no torch headers, so it also compiles into the standalone tests (tests/cpp/).
//
// Randomness: Philox4x32-10 (Salmon et al., SC'11), keyed by the 64-bit seed, counter
// (sequence, step, slot, draw). Nothing is stateful, so a row's numbers do not depend on the rest
// of the batch, the step needs no generator on the host, and a CUDA graph can replay it.
//
// Sampling from weights w[0..V) with a uniform u: "lane order" inverse CDF. Token v belongs to
// lane v % kSampleLanes; the categories are ordered lane by lane (within a lane by increasing v),
// which is what a 256-thread GPU block sums with coalesced loads. Any fixed order of the
// categories gives an exact sampler; fixing this one makes CPU and GPU pick the same token.
#pragma once

#include <cstdint>

#include "verify_commit.h"

namespace jacobi_engine {

constexpr int kSampleLanes = 256;

// Draw indices within one (sequence, step, slot) counter.
constexpr uint32_t kDrawVerify = 0;  // words 0-1: acceptance uniform, words 2-3: residual uniform
constexpr uint32_t kDrawSample = 1;  // words 0-1: fresh sample from the slot's distribution
// Step word used for the first token, sampled after prefill (decode steps count from 0).
constexpr uint32_t kPrefillStep = 0xFFFFFFFFu;

struct Philox4 {
  uint32_t word[4];
};

JE_HOST_DEVICE inline Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                            uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    const uint64_t product0 = static_cast<uint64_t>(0xD2511F53u) * c0;
    const uint64_t product1 = static_cast<uint64_t>(0xCD9E8D57u) * c2;
    const uint32_t hi0 = static_cast<uint32_t>(product0 >> 32), lo0 = static_cast<uint32_t>(product0);
    const uint32_t hi1 = static_cast<uint32_t>(product1 >> 32), lo1 = static_cast<uint32_t>(product1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// 53 random bits -> a double in [0, 1), exactly representable.
JE_HOST_DEVICE inline double uniform53(uint32_t hi, uint32_t lo) {
  const uint64_t bits = (static_cast<uint64_t>(hi) << 21) | (lo >> 11);
  return static_cast<double>(bits) * (1.0 / 9007199254740992.0);
}

struct SlotUniforms {
  double accept;    // acceptance test of the slot's draft
  double residual;  // resample on rejection
  double sample;    // fresh sample from the slot's distribution (next draft, or the bonus token)
};

JE_HOST_DEVICE inline SlotUniforms slot_uniforms(uint64_t seed, uint64_t sequence, uint64_t step, uint64_t slot) {
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  const uint32_t c0 = static_cast<uint32_t>(sequence), c1 = static_cast<uint32_t>(step);
  const uint32_t c2 = static_cast<uint32_t>(slot);
  const Philox4 verify = philox4x32_10(c0, c1, c2, kDrawVerify, k0, k1);
  const Philox4 fresh = philox4x32_10(c0, c1, c2, kDrawSample, k0, k1);
  return SlotUniforms{uniform53(verify.word[0], verify.word[1]), uniform53(verify.word[2], verify.word[3]),
                      uniform53(fresh.word[0], fresh.word[1])};
}

// Products and differences whose rounding must not depend on the compiler: nvcc contracts a*b - c*d
// into a fused multiply-add by default, which would make the GPU pick other tokens than the CPU.
JE_HOST_DEVICE inline double mul_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

JE_HOST_DEVICE inline double sub_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dsub_rn(a, b);
#else
  return a - b;
#endif
}

// Weights are sanitised once, here: anything not > 0 (zero, negative, NaN) weighs nothing.
JE_HOST_DEVICE inline double positive(double w) { return w > 0.0 ? w : 0.0; }

// Token ids index the distributions, and they come from device tensors (the block's drafts, the
// candidates) that the caller cannot check without a host sync: an id outside [0, V) is never read.
JE_HOST_DEVICE inline bool in_vocab(int64_t token, int64_t vocab) { return token >= 0 && token < vocab; }

// w[token] sanitised, 0 for an id outside the vocabulary (a token the distribution cannot produce).
JE_HOST_DEVICE inline double weight_of(const float* w, int64_t token, int64_t vocab) {
  return in_vocab(token, vocab) ? positive(w[token]) : 0.0;
}

// The three distributions a slot samples from, as weight functions of the token id.
struct ProbWeight {  // p itself
  const float* p;
  JE_HOST_DEVICE double operator()(int64_t v) const { return positive(p[v]); }
};

struct ResidualWeight {  // max(0, p/P - q/Q), scaled by P*Q: the SJD residual
  const float* p;
  const float* q;
  double p_total, q_total;
  JE_HOST_DEVICE double operator()(int64_t v) const {
    return positive(sub_rn(mul_rn(positive(p[v]), q_total), mul_rn(positive(q[v]), p_total)));
  }
};

struct ExcludeWeight {  // p with one token removed: the one-hot rule's residual
  const float* p;
  int64_t excluded;
  JE_HOST_DEVICE double operator()(int64_t v) const { return v == excluded ? 0.0 : positive(p[v]); }
};

// Total of lane `lane` (its tokens lane, lane + L, ... in order). The GPU runs one lane per thread.
template <typename Weight>
JE_HOST_DEVICE double lane_total(const Weight& weight, int64_t vocab, int lane) {
  double total = 0.0;
  for (int64_t v = lane; v < vocab; v += kSampleLanes) total += weight(v);
  return total;
}

// Sum of the lane totals in lane order (the sampler's normalising constant).
JE_HOST_DEVICE inline double lanes_sum(const double* totals) {
  double sum = 0.0;
  for (int lane = 0; lane < kSampleLanes; ++lane) sum += totals[lane];
  return sum;
}

struct LanePick {
  int lane;       // -1 when every weight is zero
  double prefix;  // total weight of the lanes before it
};

// The lane whose cumulative range holds `threshold` (the last non-empty lane if rounding pushes
// the threshold past the end).
JE_HOST_DEVICE inline LanePick pick_lane(const double* totals, double threshold) {
  LanePick last{-1, 0.0};
  double prefix = 0.0;
  for (int lane = 0; lane < kSampleLanes; ++lane) {
    if (totals[lane] > 0.0) {
      const double end = prefix + totals[lane];
      if (end > threshold) return LanePick{lane, prefix};
      last = LanePick{lane, prefix};
      prefix = end;
    }
  }
  return last;
}

// The token of `pick`'s lane at which the running sum first passes `threshold` (the lane's last
// positive token if rounding leaves it short).
template <typename Weight>
JE_HOST_DEVICE int64_t walk_lane(const Weight& weight, int64_t vocab, LanePick pick, double threshold) {
  if (pick.lane < 0) return -1;
  double running = pick.prefix;
  int64_t last = -1;
  for (int64_t v = pick.lane; v < vocab; v += kSampleLanes) {
    const double w = weight(v);
    if (w > 0.0) {
      running += w;
      last = v;
      if (running > threshold) return v;
    }
  }
  return last;
}

// Lane-order inverse CDF given the lane totals (however they were computed); -1 if all weights are 0.
template <typename Weight>
JE_HOST_DEVICE int64_t sample_with_totals(const Weight& weight, int64_t vocab, const double* totals, double u) {
  const double threshold = u * lanes_sum(totals);
  return walk_lane(weight, vocab, pick_lane(totals, threshold), threshold);
}

// The whole sampler on one thread: the CPU path, and rare fallbacks on the GPU.
template <typename Weight>
JE_HOST_DEVICE int64_t sample_sequential(const Weight& weight, int64_t vocab, double u) {
  double totals[kSampleLanes];
  for (int lane = 0; lane < kSampleLanes; ++lane) totals[lane] = 0.0;
  for (int64_t v = 0; v < vocab; ++v) totals[v % kSampleLanes] += weight(v);
  return sample_with_totals(weight, vocab, totals, u);
}

// How a slot's draft is verified.
enum class DraftRule : int {
  kOneHot = 0,  // a deterministic draft: accept with probability p(d), else sample p without d
  kRatio = 1,   // drawn from the proposal q: accept with min(1, p(d)/q(d)), else sample max(0, p - q)
  kFixed = 2,   // already verified earlier in this chunk: accepted
};

// Acceptance of draft d under target weights p (total P) and proposal weights q (total Q).
JE_HOST_DEVICE inline bool accept_draft(DraftRule rule, double u, double p_d, double p_total, double q_d,
                                        double q_total) {
  if (rule == DraftRule::kFixed) return true;
  if (rule == DraftRule::kRatio && q_d > 0.0) return mul_rn(mul_rn(u, q_d), p_total) < mul_rn(p_d, q_total);
  // One-hot rule; also the fallback of a ratio draft its proposal never gave weight to.
  return mul_rn(u, p_total) < p_d;
}

struct SlotResult {
  bool accept;         // the draft of slot i + 1 is accepted (true past the last draft)
  int64_t corrective;  // the token that replaces a rejected draft (-1 when accepted)
  int64_t sample;      // fresh sample from the slot's distribution
};

// The rejection branch, shared by both paths: the residual sample (ratio rule) or p without d
// (one-hot rule). Returns -1 only when p has no weight outside d, in which case the draft is
// accepted instead (in exact arithmetic it could not have been rejected).
JE_HOST_DEVICE inline int64_t corrective_sequential(DraftRule rule, const float* p, const float* q, int64_t vocab,
                                                    int64_t draft, double p_total, double q_total, double u) {
  int64_t token = -1;
  if (rule == DraftRule::kRatio) token = sample_sequential(ResidualWeight{p, q, p_total, q_total}, vocab, u);
  if (token < 0 || token == draft) token = sample_sequential(ExcludeWeight{p, draft}, vocab, u);
  return token == draft ? -1 : token;
}

// A draft outside the vocabulary has probability 0 under every rule: it is judged by the one-hot
// rule with p(d) = 0, so it is rejected (never accepted, never emitted) and the op flags it.
JE_HOST_DEVICE inline DraftRule vocab_rule(DraftRule rule, int64_t draft, int64_t vocab) {
  return in_vocab(draft, vocab) ? rule : DraftRule::kOneHot;
}

// Everything about slot i on one thread. `p` is the slot's target weights [V]; when `has_draft`
// (every slot but the last) the slot verifies the draft `draft` (block slot i + 1) with `rule`,
// proposal `q` [V].
JE_HOST_DEVICE inline SlotResult decide_slot_sequential(const float* p, const float* q, int64_t vocab,
                                                        bool has_draft, int64_t draft, DraftRule rule,
                                                        SlotUniforms u) {
  double p_totals[kSampleLanes];
  for (int lane = 0; lane < kSampleLanes; ++lane) p_totals[lane] = 0.0;
  for (int64_t v = 0; v < vocab; ++v) p_totals[v % kSampleLanes] += positive(p[v]);
  SlotResult result{true, -1, sample_with_totals(ProbWeight{p}, vocab, p_totals, u.sample)};
  if (!has_draft) return result;
  rule = vocab_rule(rule, draft, vocab);
  const double p_total = lanes_sum(p_totals);
  double q_total = 0.0, q_d = 0.0;
  if (rule == DraftRule::kRatio) {
    double q_totals[kSampleLanes];
    for (int lane = 0; lane < kSampleLanes; ++lane) q_totals[lane] = 0.0;
    for (int64_t v = 0; v < vocab; ++v) q_totals[v % kSampleLanes] += positive(q[v]);
    q_total = lanes_sum(q_totals);
    q_d = positive(q[draft]);
  }
  result.accept = accept_draft(rule, u.accept, weight_of(p, draft, vocab), p_total, q_d, q_total);
  if (!result.accept) {
    const DraftRule residual_rule = q_d > 0.0 ? rule : DraftRule::kOneHot;
    result.corrective = corrective_sequential(residual_rule, p, q, vocab, draft, p_total, q_total, u.residual);
    // No weight outside the draft: it stands (exact arithmetic could not have rejected it), unless
    // it is no token at all.
    result.accept = result.corrective < 0 && in_vocab(draft, vocab);
  }
  return result;
}

// The draft-token bits of one row's block [n]: drafts are slots 1..n-1 (slot 0 is never read).
JE_HOST_DEVICE inline uint32_t draft_errors(const int64_t* block, int64_t n, int64_t vocab) {
  for (int64_t j = 1; j < n; ++j) {
    if (!in_vocab(block[j], vocab)) return kErrorBlockTokens;
  }
  return 0u;
}

// The rule of each draft slot j (1 <= j < n): fixed within the chunk's verified prefix, else by kind.
JE_HOST_DEVICE inline DraftRule draft_rule(int64_t slot, int64_t n_fixed, bool sampled) {
  if (slot <= n_fixed) return DraftRule::kFixed;
  return sampled ? DraftRule::kRatio : DraftRule::kOneHot;
}

// Accepted count a from the slots' decisions, and the verified tokens in greedy's `preds` form:
// preds[j] = block[j + 1] (accepted drafts) for j < a - 1, preds[a - 1] = the corrective token (or
// the bonus sample when every draft was accepted), preds[j] = the fresh sample of slot j for j >= a.
// verify_commit_row then commits exactly like greedy: it finds the same a, because a corrective
// token always differs from the draft it replaces.
JE_HOST_DEVICE inline int64_t assemble_preds(const SlotResult* slots, const int64_t* block, int64_t n,
                                             int64_t* preds) {
  int64_t accepted = 1;
  while (accepted < n && slots[accepted - 1].accept) ++accepted;
  for (int64_t j = 0; j < n; ++j) {
    if (j < accepted - 1) {
      preds[j] = block[j + 1];
    } else if (j == accepted - 1) {
      preds[j] = accepted == n ? slots[n - 1].sample : slots[j].corrective;
    } else {
      preds[j] = slots[j].sample;
    }
  }
  return accepted;
}

// Which slots of the next block hold a sample of this step's distributions: slot j (first <= j,
// j + offset < n) was drawn from this step's slot j + offset. A committed block shifts by a - 1
// (its freed slots take deterministic fill); an uncommitted chunk keeps its a verified tokens and
// its later slots take slot j - 1's samples.
struct ProposalPlan {
  int64_t offset;
  int64_t first;  // n: no slot (finished or inactive rows)
};

JE_HOST_DEVICE inline ProposalPlan proposal_plan(bool was_active, bool committed, bool finished, int64_t accepted,
                                                 int64_t n) {
  if (!was_active || finished) return ProposalPlan{0, n};
  if (committed) return ProposalPlan{accepted - 1, 1};
  return ProposalPlan{-1, accepted + 1};
}

JE_HOST_DEVICE inline bool plan_covers(ProposalPlan plan, int64_t slot, int64_t n) {
  return slot >= plan.first && slot >= 1 && slot + plan.offset < n;
}


// ---------------------------------------------------------------------------------------------
// Sampling over a token tree: the block [t0, d_1..d_{n-1}] and k pooled branches of g tokens, each
// rooted at t0 (the layout of jacobi_engine/pool.py tree_layout). Verification walks the tree from
// the root. At each node the children offered by the paths still alive (tokens equal to the
// verified prefix) compete, SpecInfer-style: the block's draft first, by its own rule (ratio,
// one-hot or fixed), then every branch's token in branch order by the one-hot rule on what is left
// (accept c with probability r(c) / sum(r), else remove c from r). The first accepted child extends
// the prefix; if none is, the last token is drawn from the final r. Each test is an exact
// one-hot or ratio step on the current r, so every position gets exactly p (jacobi_engine/sampling.py).

constexpr int kMaxTreeBranches = 32;                     // k <= 32 (checked by the op)
constexpr int kMaxTreeExcluded = kMaxTreeBranches + 1;  // the branches' tokens and the block's draft

struct TreeShape {
  int64_t n;  // block slots
  int64_t k;  // branches
  int64_t g;  // tokens per branch
};

// Paths: -1 is the block, 0..k-1 the branches. Depth 0 is t0 for every path.
JE_HOST_DEVICE inline int64_t path_length(TreeShape shape, int64_t path) { return path < 0 ? shape.n : shape.g + 1; }

JE_HOST_DEVICE inline int64_t path_node(TreeShape shape, int64_t path, int64_t depth) {
  return path < 0 || depth == 0 ? depth : shape.n + path * shape.g + depth - 1;
}

JE_HOST_DEVICE inline int64_t path_token(TreeShape shape, const int64_t* block, const int64_t* candidates,
                                         int64_t path, int64_t depth) {
  return path < 0 ? block[depth] : (depth == 0 ? block[0] : candidates[path * shape.g + depth - 1]);
}

// What is left of a node's distribution: p, or the SJD residual of p and q, with tokens removed.
struct NodeWeight {
  const float* p;
  const float* q;
  double p_total, q_total;
  bool ratio_residual;
  int n_excluded;
  // int32: only ids inside the vocabulary are excluded (the op checks V < 2^31), which halves what
  // the walk keeps per thread on the GPU.
  int32_t excluded[kMaxTreeExcluded];
  // v must lie in [0, V): the walk asks only for tokens it checked with in_vocab.
  JE_HOST_DEVICE double operator()(int64_t v) const {
    for (int i = 0; i < n_excluded; ++i) {
      if (excluded[i] == v) return 0.0;
    }
    if (ratio_residual) return positive(sub_rn(mul_rn(positive(p[v]), q_total), mul_rn(positive(q[v]), p_total)));
    return positive(p[v]);
  }
  JE_HOST_DEVICE void exclude(int64_t v) {
    if (n_excluded < kMaxTreeExcluded) excluded[n_excluded++] = static_cast<int32_t>(v);
  }
};

JE_HOST_DEVICE inline NodeWeight plain_node_weight(const float* p) {
  NodeWeight weight{};
  weight.p = p;
  weight.q = p;
  weight.ratio_residual = false;
  weight.n_excluded = 0;
  return weight;
}

// The block draft's decision at block slot i (it judges block[i + 1]): the plain op's SlotResult,
// plus, on rejection, what is left of p for the branches (`rest`, total `rest_total`).
struct BlockDecision {
  bool accept;
  int64_t corrective;  // the plain op's replacement token (used when no branch competes)
  NodeWeight rest;
  double rest_total;
};

// The walk's outcome: the winning path, the verified count a, and the last verified token, or -1
// when it is to be drawn from `rest` with `rest_uniform` (rest_total > 0 was checked by the walk).
struct TreeWalk {
  int64_t winner;
  int64_t accepted;
  int64_t last_token;
  NodeWeight rest;
  double rest_uniform;
};

// Per-node quantities the walk reads; the CPU computes them on demand, the GPU beforehand:
//   p_total(t)       lanes_sum of node t's lane totals
//   sample(t)        node t's fresh sample (its "sample" uniform)
//   block(i)         BlockDecision of block slot i (0 <= i < n - 1)
//   uniforms(t)      SlotUniforms of counter slot t
template <typename Stats>
JE_HOST_DEVICE TreeWalk walk_tree(TreeShape shape, const int64_t* block, const int64_t* candidates,
                                  const bool* usable, const float* probs, int64_t vocab, Stats& stats) {
  uint64_t alive = 0;  // bit m: branch m still matches the verified prefix
  for (int64_t m = 0; m < shape.k; ++m) {
    if (usable[m]) alive |= uint64_t{1} << m;
  }
  bool block_alive = true;
  int64_t path = -1;  // the path the verified prefix is read from (the block while it is alive)
  for (int64_t depth = 0;; ++depth) {
    const int64_t node = path_node(shape, path, depth);
    const float* p = probs + node * vocab;
    const bool block_child = block_alive && depth + 1 < shape.n;
    bool branch_child = false;
    for (int64_t m = 0; m < shape.k && depth < shape.g; ++m) branch_child |= ((alive >> m) & 1) != 0;
    if (!block_child && !branch_child) {  // the path ends here: the bonus token
      return TreeWalk{path, depth + 1, stats.sample(node), plain_node_weight(p), 0.0};
    }
    NodeWeight rest = plain_node_weight(p);
    double total = 0.0;
    double rest_uniform = stats.uniforms(node).residual;
    if (block_child) {
      const BlockDecision decision = stats.block(depth);
      if (decision.accept) {
        const int64_t token = block[depth + 1];
        for (int64_t m = 0; m < shape.k && depth < shape.g; ++m) {
          if (candidates[m * shape.g + depth] != token) alive &= ~(uint64_t{1} << m);
        }
        if (depth >= shape.g) alive = 0;
        continue;
      }
      block_alive = false;
      if (!branch_child) return TreeWalk{path, depth + 1, decision.corrective, rest, 0.0};
      rest = decision.rest;
      total = decision.rest_total;
    } else {
      block_alive = false;
      total = stats.p_total(node);
    }
    int64_t chosen = -2;  // -2: none yet
    for (int64_t m = 0; m < shape.k && chosen == -2; ++m) {
      if (((alive >> m) & 1) == 0) continue;
      const int64_t token = candidates[m * shape.g + depth];
      // A candidate outside the vocabulary weighs nothing and is never chosen (the op flags it).
      if (!in_vocab(token, vocab)) continue;
      const double weight = rest(token);
      const double left = sub_rn(total, weight);
      const double u = stats.uniforms(path_node(shape, m, depth + 1)).accept;
      // No weight outside the token (rounding): in exact arithmetic it is accepted with certainty.
      if (total > 0.0 && (mul_rn(u, total) < weight || !(left > 0.0))) {
        chosen = m;
      } else {
        rest.exclude(token);
        total = left;
      }
    }
    if (chosen == -2) {
      if (!(total > 0.0)) return TreeWalk{path, depth + 1, stats.sample(node), plain_node_weight(p), 0.0};
      return TreeWalk{path, depth + 1, -1, rest, rest_uniform};
    }
    const int64_t token = candidates[chosen * shape.g + depth];
    for (int64_t m = 0; m < shape.k; ++m) {
      if (candidates[m * shape.g + depth] != token) alive &= ~(uint64_t{1} << m);
    }
    path = chosen;
  }
}

// The block draft's decision at slot i on one thread: the plain op's (decide_slot_sequential), with
// what is left of p on rejection. `p_total` is the node's lanes_sum.
JE_HOST_DEVICE inline BlockDecision decide_block_sequential(const float* p, const float* q, int64_t vocab,
                                                            int64_t draft, DraftRule rule, SlotUniforms u,
                                                            double p_total) {
  BlockDecision decision{true, -1, plain_node_weight(p), 0.0};
  rule = vocab_rule(rule, draft, vocab);
  const bool valid = in_vocab(draft, vocab);
  double q_total = 0.0, q_d = 0.0;
  if (rule == DraftRule::kRatio) {
    double q_totals[kSampleLanes];
    for (int lane = 0; lane < kSampleLanes; ++lane) q_totals[lane] = 0.0;
    for (int64_t v = 0; v < vocab; ++v) q_totals[v % kSampleLanes] += positive(q[v]);
    q_total = lanes_sum(q_totals);
    q_d = positive(q[draft]);
  }
  decision.accept = accept_draft(rule, u.accept, weight_of(p, draft, vocab), p_total, q_d, q_total);
  if (decision.accept) return decision;
  double totals[kSampleLanes];
  NodeWeight rest = plain_node_weight(p);
  if (valid) rest.exclude(draft);
  if (rule == DraftRule::kRatio && q_d > 0.0) {
    NodeWeight residual = rest;
    residual.q = q;
    residual.p_total = p_total;
    residual.q_total = q_total;
    residual.ratio_residual = true;
    for (int lane = 0; lane < kSampleLanes; ++lane) totals[lane] = 0.0;
    for (int64_t v = 0; v < vocab; ++v) totals[v % kSampleLanes] += residual(v);
    const int64_t token = sample_with_totals(residual, vocab, totals, u.residual);
    if (token >= 0) {  // else: the rounding fallback of corrective_sequential, p without the draft
      decision = BlockDecision{false, token, residual, lanes_sum(totals)};
      return decision;
    }
  }
  for (int lane = 0; lane < kSampleLanes; ++lane) totals[lane] = 0.0;
  for (int64_t v = 0; v < vocab; ++v) totals[v % kSampleLanes] += rest(v);
  const int64_t token = sample_with_totals(rest, vocab, totals, u.residual);
  decision = BlockDecision{token < 0 && valid, token, rest, lanes_sum(totals)};
  return decision;
}

// The token bits of one tree row: the block's drafts (slots 1..n-1) and the usable branches' tokens.
JE_HOST_DEVICE inline uint32_t tree_token_errors(TreeShape shape, const int64_t* block, const int64_t* candidates,
                                                 const bool* usable, int64_t vocab) {
  uint32_t errors = draft_errors(block, shape.n, vocab);
  for (int64_t m = 0; m < shape.k; ++m) {
    if (!usable[m]) continue;
    for (int64_t i = 0; i < shape.g; ++i) {
      if (!in_vocab(candidates[m * shape.g + i], vocab)) errors |= kErrorCandidates;
    }
  }
  return errors;
}

// The last token of a walk that ended in a rejection: a draw from what is left (rest_total > 0), or,
// if rounding left no weight there, from p without the removed tokens, then from p.
template <typename SampleRest>
JE_HOST_DEVICE int64_t finish_walk(const TreeWalk& walk, SampleRest& sample_rest) {
  if (walk.last_token >= 0) return walk.last_token;
  int64_t token = sample_rest(walk.rest, walk.rest_uniform);
  if (token < 0 && walk.rest.ratio_residual) {
    NodeWeight plain = walk.rest;
    plain.ratio_residual = false;
    token = sample_rest(plain, walk.rest_uniform);
  }
  if (token < 0) token = sample_rest(plain_node_weight(walk.rest.p), walk.rest_uniform);
  return token;
}

// The winning path's row (its tokens, -1 past its end) and greedy's `preds` over width W:
// preds[j] = row[j + 1] for j < a - 1, preds[a - 1] = the last token, then the fresh samples of the
// path's nodes, then fill. verify_commit_row finds the same a: the path's token after the verified
// prefix was rejected, so the last token differs from it.
template <typename Stats>
JE_HOST_DEVICE void assemble_tree_row(TreeShape shape, const int64_t* block, const int64_t* candidates,
                                      const int64_t* fill, int64_t width, const TreeWalk& walk, int64_t last,
                                      Stats& stats, int64_t* row, int64_t* preds) {
  const int64_t length = path_length(shape, walk.winner);
  for (int64_t j = 0; j < width; ++j) {
    row[j] = j < length ? path_token(shape, block, candidates, walk.winner, j) : -1;
  }
  for (int64_t j = 0; j < width; ++j) {
    if (j < walk.accepted - 1) {
      preds[j] = row[j + 1];
    } else if (j == walk.accepted - 1) {
      preds[j] = last;
    } else if (j < length) {
      preds[j] = stats.sample(path_node(shape, walk.winner, j));
    } else {
      preds[j] = fill[j];
    }
  }
}

// Slot j of the next block holds a fresh sample of the winner's node at depth j + offset.
JE_HOST_DEVICE inline bool tree_plan_covers(ProposalPlan plan, int64_t slot, int64_t n, int64_t length) {
  return slot >= plan.first && slot >= 1 && slot < n && slot + plan.offset < length;
}

}  // namespace jacobi_engine
