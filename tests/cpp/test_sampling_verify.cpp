// Standalone tests of csrc/sampling_verify.h, the sampling verify logic shared by the CPU op and
// the CUDA kernel. No torch, no Python: built by CMakeLists.txt with sanitizers, run with ctest.
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "sampling_verify.h"

namespace {

int failures = 0;

#define EXPECT_TRUE(condition)                                                  \
  do {                                                                          \
    if (!(condition)) {                                                         \
      std::fprintf(stderr, "%s:%d: expected %s\n", __FILE__, __LINE__, #condition); \
      ++failures;                                                               \
    }                                                                           \
  } while (0)

using namespace jacobi_engine;

void test_philox_known_answers() {
  // Random123's kat_vectors, philox4x32-10: counter, key -> output.
  const Philox4 zero = philox4x32_10(0, 0, 0, 0, 0, 0);
  EXPECT_TRUE(zero.word[0] == 0x6627e8d5u && zero.word[1] == 0xe169c58du && zero.word[2] == 0xbc57ac4cu &&
              zero.word[3] == 0x9b00dbd8u);
  const uint32_t m = 0xffffffffu;
  const Philox4 ones = philox4x32_10(m, m, m, m, m, m);
  EXPECT_TRUE(ones.word[0] == 0x408f276du && ones.word[1] == 0x41c83b0eu && ones.word[2] == 0xa20bc7c6u &&
              ones.word[3] == 0x6d5451fdu);
  const Philox4 pi = philox4x32_10(0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u, 0xa4093822u, 0x299f31d0u);
  EXPECT_TRUE(pi.word[0] == 0xd16cfe09u && pi.word[1] == 0x94fdccebu && pi.word[2] == 0x5001e420u &&
              pi.word[3] == 0x24126ea1u);
}

void test_uniforms_in_unit_interval() {
  EXPECT_TRUE(uniform53(0, 0) == 0.0);
  EXPECT_TRUE(uniform53(0xffffffffu, 0xffffffffu) < 1.0);
  const SlotUniforms a = slot_uniforms(1, 2, 3, 4);
  const SlotUniforms b = slot_uniforms(1, 2, 3, 5);  // another slot: other numbers
  EXPECT_TRUE(a.accept != b.accept && a.sample != b.sample && a.accept != a.residual);
}

void test_inverse_cdf_in_lane_order() {
  const std::vector<float> w{1.0f, 0.0f, 3.0f};
  EXPECT_TRUE(sample_sequential(ProbWeight{w.data()}, 3, 0.0) == 0);
  EXPECT_TRUE(sample_sequential(ProbWeight{w.data()}, 3, 0.2) == 0);
  EXPECT_TRUE(sample_sequential(ProbWeight{w.data()}, 3, 0.26) == 2);
  EXPECT_TRUE(sample_sequential(ProbWeight{w.data()}, 3, 0.9999999) == 2);
  std::vector<float> wide(300, 0.0f);
  wide[0] = wide[1] = wide[256] = 1.0f;  // order: 0, 256 (both lane 0), then 1
  EXPECT_TRUE(sample_sequential(ProbWeight{wide.data()}, 300, 0.5) == 256);
  EXPECT_TRUE(sample_sequential(ProbWeight{wide.data()}, 300, 0.9) == 1);
  const std::vector<float> none(4, 0.0f);
  EXPECT_TRUE(sample_sequential(ProbWeight{none.data()}, 4, 0.5) == -1);
  // The one-hot residual never returns the excluded token.
  for (int k = 0; k < 50; ++k) EXPECT_TRUE(sample_sequential(ExcludeWeight{w.data(), 2}, 3, k / 50.0) == 0);
}

void test_acceptance_rules() {
  // Ratio rule: p(d)/P >= q(d)/Q is accepted whatever the uniform.
  EXPECT_TRUE(accept_draft(DraftRule::kRatio, 0.999999, 0.5, 1.0, 0.4, 1.0));
  EXPECT_TRUE(!accept_draft(DraftRule::kRatio, 0.5, 0.2, 1.0, 0.8, 1.0));  // ratio 0.25 < u
  EXPECT_TRUE(accept_draft(DraftRule::kRatio, 0.2, 0.2, 1.0, 0.8, 1.0));
  // Unnormalised weights: only the ratios matter.
  EXPECT_TRUE(accept_draft(DraftRule::kRatio, 0.2, 0.4, 2.0, 0.8, 1.0) == accept_draft(DraftRule::kRatio, 0.2, 0.2,
                                                                                       1.0, 0.8, 1.0));
  // One-hot rule: accept with probability p(d).
  EXPECT_TRUE(accept_draft(DraftRule::kOneHot, 0.999999, 1.0, 1.0, 0.0, 0.0));
  EXPECT_TRUE(!accept_draft(DraftRule::kOneHot, 0.0, 0.0, 1.0, 0.0, 0.0));
  EXPECT_TRUE(!accept_draft(DraftRule::kOneHot, 0.3, 0.3, 1.0, 0.0, 0.0));
  // A ratio draft its proposal gave no weight falls back to the one-hot rule.
  EXPECT_TRUE(accept_draft(DraftRule::kRatio, 0.1, 0.3, 1.0, 0.0, 1.0));
  EXPECT_TRUE(accept_draft(DraftRule::kFixed, 0.999, 0.0, 1.0, 0.0, 0.0));
}

void test_slot_decisions() {
  const std::vector<float> p{0.0f, 0.5f, 0.5f, 0.0f};
  const std::vector<float> q{0.25f, 0.25f, 0.25f, 0.25f};
  for (uint64_t seed = 0; seed < 64; ++seed) {
    const SlotUniforms u = slot_uniforms(seed, 0, 0, 0);
    // A draft with no target weight is always rejected; its replacement has weight.
    SlotResult r = decide_slot_sequential(p.data(), q.data(), 4, true, 3, DraftRule::kRatio, u);
    EXPECT_TRUE(!r.accept && (r.corrective == 1 || r.corrective == 2));
    r = decide_slot_sequential(p.data(), q.data(), 4, true, 0, DraftRule::kOneHot, u);
    EXPECT_TRUE(!r.accept && (r.corrective == 1 || r.corrective == 2));
    // p(d) >= q(d): accepted by the ratio rule.
    r = decide_slot_sequential(p.data(), q.data(), 4, true, 1, DraftRule::kRatio, u);
    EXPECT_TRUE(r.accept && r.corrective == -1);
    // A proposal equal to the target accepts every draft it can produce.
    r = decide_slot_sequential(p.data(), p.data(), 4, true, 2, DraftRule::kRatio, u);
    EXPECT_TRUE(r.accept);
    // The fresh sample lies in the support; no draft (the last slot) means accepted.
    r = decide_slot_sequential(p.data(), q.data(), 4, false, -1, DraftRule::kFixed, u);
    EXPECT_TRUE(r.accept && (r.sample == 1 || r.sample == 2));
    // A target with all its weight on the draft cannot reject it.
    const std::vector<float> sure{0.0f, 0.0f, 1.0f, 0.0f};
    r = decide_slot_sequential(sure.data(), q.data(), 4, true, 2, DraftRule::kOneHot, u);
    EXPECT_TRUE(r.accept);
  }
}

void test_assemble_and_plan() {
  // Slot 0 accepts the draft in slot 1, slot 1 rejects slot 2's: a = 2.
  const SlotResult slots[4] = {{true, -1, 50}, {false, 77, 51}, {true, -1, 52}, {true, -1, 53}};
  const int64_t block[4] = {10, 11, 12, 13};
  int64_t preds[4];
  EXPECT_TRUE(assemble_preds(slots, block, 4, preds) == 2);
  EXPECT_TRUE(preds[0] == 11 && preds[1] == 77 && preds[2] == 52 && preds[3] == 53);
  const SlotResult all[3] = {{true, -1, 60}, {true, -1, 61}, {true, -1, 62}};
  const int64_t block3[3] = {1, 2, 3};
  EXPECT_TRUE(assemble_preds(all, block3, 3, preds) == 3);
  EXPECT_TRUE(preds[0] == 2 && preds[1] == 3 && preds[2] == 62);  // the bonus token from the last slot
  // Sliding (committed) a = 2, n = 4: slots 1, 2 take this step's slots 2, 3; slot 3 is fill.
  ProposalPlan plan = proposal_plan(true, true, false, 2, 4);
  EXPECT_TRUE(!plan_covers(plan, 0, 4) && plan_covers(plan, 1, 4) && plan_covers(plan, 2, 4) &&
              !plan_covers(plan, 3, 4) && plan.offset == 1);
  // Uncommitted chunk, a = 2: slots 1, 2 hold verified tokens, slot 3 takes slot 2's sample.
  plan = proposal_plan(true, false, false, 2, 4);
  EXPECT_TRUE(!plan_covers(plan, 2, 4) && plan_covers(plan, 3, 4) && plan.offset == -1);
  plan = proposal_plan(true, true, true, 2, 4);  // finished: nothing
  for (int64_t j = 0; j < 4; ++j) EXPECT_TRUE(!plan_covers(plan, j, 4));
}

// A token tree with point-mass targets, so the walk is decided whatever the random numbers:
// block [0, 1, 2], branches [2, 1] and [3, 0] (n=3, k=2, g=2, V=4). Node 0 is sure of 3: the
// block's draft 1 and branch 0's token 2 are rejected, branch 1's 3 is accepted; its node (5) is
// sure of 0, its next token, which is accepted; its last node (6) is sure of 2: the bonus token.
struct PointStats {
  const float* probs;
  int64_t vocab;
  const int64_t* block_tokens;
  double p_total(int64_t) { return 1.0; }
  int64_t sample(int64_t node) { return sample_sequential(ProbWeight{probs + node * vocab}, vocab, 0.5); }
  SlotUniforms uniforms(int64_t node) const { return slot_uniforms(7, 0, 0, static_cast<uint64_t>(node)); }
  BlockDecision block(int64_t slot) {
    return decide_block_sequential(probs + slot * vocab, probs, vocab, block_tokens[slot + 1], DraftRule::kOneHot,
                                   uniforms(slot), p_total(slot));
  }
};

void test_tree_walk() {
  const int64_t vocab = 4;
  const TreeShape shape{3, 2, 2};
  std::vector<float> probs(7 * vocab, 0.0f);
  const int64_t sure[7] = {3, 2, 1, 0, 0, 0, 2};  // the token each node is sure of
  for (int64_t node = 0; node < 7; ++node) probs[node * vocab + sure[node]] = 1.0f;
  const int64_t block[3] = {0, 1, 2};
  const int64_t candidates[4] = {2, 1, 3, 0};
  const bool usable[2] = {true, true};
  EXPECT_TRUE(path_node(shape, -1, 2) == 2 && path_node(shape, 1, 0) == 0 && path_node(shape, 1, 2) == 6);
  PointStats stats{probs.data(), vocab, block};
  const TreeWalk walk = walk_tree(shape, block, candidates, usable, probs.data(), vocab, stats);
  EXPECT_TRUE(walk.winner == 1 && walk.accepted == 3 && walk.last_token == 2);
  int64_t row[3], preds[3];
  const int64_t fill[3] = {9, 9, 9};
  assemble_tree_row(shape, block, candidates, fill, 3, walk, walk.last_token, stats, row, preds);
  EXPECT_TRUE(row[0] == 0 && row[1] == 3 && row[2] == 0);
  EXPECT_TRUE(preds[0] == 3 && preds[1] == 0 && preds[2] == 2);
  // Branch 1 unusable: nothing is left at node 0 but 3, which no child offers: the last token is
  // drawn from what is left (p without the rejected 1 and 2), on the block's path.
  const bool only_first[2] = {true, false};
  const TreeWalk second = walk_tree(shape, block, candidates, only_first, probs.data(), vocab, stats);
  EXPECT_TRUE(second.winner == -1 && second.accepted == 1);
  auto sample_rest = [vocab](const NodeWeight& weight, double u) { return sample_sequential(weight, vocab, u); };
  EXPECT_TRUE(finish_walk(second, sample_rest) == 3);
  // A plan after a branch win covers only slots whose source lies on the branch (length g + 1 = 3).
  const ProposalPlan plan = proposal_plan(true, true, false, 2, 3);  // offset 1
  EXPECT_TRUE(tree_plan_covers(plan, 1, 3, 3) && !tree_plan_covers(plan, 2, 3, 3));
}

// Token ids from device tensors: an id outside [0, V) is never read (the weight vectors are
// exactly V long, so AddressSanitizer reports any access past them), never accepted whatever the
// rule (the chunk's fixed slots included), and flagged; a candidate outside it is never chosen.
void test_ids_outside_the_vocabulary() {
  const int64_t vocab = 4;
  const std::vector<float> p{0.0f, 0.5f, 0.5f, 0.0f};
  const std::vector<float> q{0.25f, 0.25f, 0.25f, 0.25f};
  const std::vector<float> nothing(vocab, 0.0f);  // no weight anywhere: the "it stands" fallback
  const int64_t bad[] = {-1, -5, vocab, int64_t{1} << 40, INT64_MIN, INT64_MAX};
  for (uint64_t seed = 0; seed < 16; ++seed) {
    const SlotUniforms u = slot_uniforms(seed, 0, 0, 0);
    for (int64_t draft : bad) {
      for (DraftRule rule : {DraftRule::kRatio, DraftRule::kOneHot, DraftRule::kFixed}) {
        SlotResult r = decide_slot_sequential(p.data(), q.data(), vocab, true, draft, rule, u);
        EXPECT_TRUE(!r.accept && (r.corrective == 1 || r.corrective == 2));
        r = decide_slot_sequential(nothing.data(), q.data(), vocab, true, draft, rule, u);
        EXPECT_TRUE(!r.accept);
        const BlockDecision d = decide_block_sequential(p.data(), q.data(), vocab, draft, rule, u, 1.0);
        EXPECT_TRUE(!d.accept && (d.corrective == 1 || d.corrective == 2) && d.rest.n_excluded == 0);
      }
    }
  }
  const int64_t good_block[3] = {0, 1, 2};
  const int64_t bad_block[3] = {99, 1, vocab};  // slot 0 is never read: only slot 2 counts
  EXPECT_TRUE(draft_errors(good_block, 3, vocab) == 0u);
  EXPECT_TRUE(draft_errors(bad_block, 3, vocab) == kErrorBlockTokens);
  const TreeShape shape{3, 2, 2};
  const int64_t candidates[4] = {2, -7, 3, 0};
  const bool both[2] = {true, true};
  const bool second_only[2] = {false, true};
  EXPECT_TRUE(tree_token_errors(shape, good_block, candidates, both, vocab) == kErrorCandidates);
  EXPECT_TRUE(tree_token_errors(shape, good_block, candidates, second_only, vocab) == 0u);
  EXPECT_TRUE(tree_token_errors(shape, bad_block, candidates, both, vocab) == (kErrorBlockTokens | kErrorCandidates));
}


// The point-mass tree of test_tree_walk with branch 1's first token (the one node 0 is sure of)
// replaced by ids outside the vocabulary: it is never chosen nor read, so nothing is accepted at
// node 0 and the last token is drawn from what is left there (token 3 only), on the block's path.
void test_tree_walk_skips_bad_candidates() {
  const int64_t vocab = 4;
  const TreeShape shape{3, 2, 2};
  std::vector<float> probs(7 * vocab, 0.0f);
  const int64_t sure[7] = {3, 2, 1, 0, 0, 0, 2};
  for (int64_t node = 0; node < 7; ++node) probs[node * vocab + sure[node]] = 1.0f;
  const int64_t block[3] = {0, 1, 2};
  const bool usable[2] = {true, true};
  PointStats stats{probs.data(), vocab, block};
  for (int64_t token : {int64_t{-1}, vocab, int64_t{1} << 40, INT64_MIN}) {
    const int64_t candidates[4] = {2, 1, token, 0};
    const TreeWalk walk = walk_tree(shape, block, candidates, usable, probs.data(), vocab, stats);
    EXPECT_TRUE(walk.winner == -1 && walk.accepted == 1);
    auto sample_rest = [vocab](const NodeWeight& weight, double u) { return sample_sequential(weight, vocab, u); };
    EXPECT_TRUE(finish_walk(walk, sample_rest) == 3);
  }
}

}  // namespace

int main() {
  test_philox_known_answers();
  test_uniforms_in_unit_interval();
  test_inverse_cdf_in_lane_order();
  test_acceptance_rules();
  test_slot_decisions();
  test_assemble_and_plan();
  test_tree_walk();
  test_ids_outside_the_vocabulary();
  test_tree_walk_skips_bad_candidates();
  if (failures) {
    std::fprintf(stderr, "%d failure(s)\n", failures);
    return EXIT_FAILURE;
  }
  std::printf("sampling_verify: all tests passed\n");
  return EXIT_SUCCESS;
}
