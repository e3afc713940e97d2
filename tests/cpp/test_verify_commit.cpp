// Standalone tests of csrc/verify_commit.h, the per-sequence logic shared by the CPU op and the
// CUDA kernel. No torch, no Python: built by CMakeLists.txt with sanitizers, run with ctest.
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "verify_commit.h"

namespace {

int failures = 0;

#define EXPECT_EQ(actual, expected)                                                                    \
  do {                                                                                                 \
    const auto a_ = (actual);                                                                          \
    const auto e_ = (expected);                                                                        \
    if (!(a_ == e_)) {                                                                                 \
      std::fprintf(stderr, "%s:%d: %s == %lld, expected %lld\n", __FILE__, __LINE__, #actual,          \
                   static_cast<long long>(a_), static_cast<long long>(e_));                            \
      ++failures;                                                                                      \
    }                                                                                                  \
  } while (0)

struct Sequence {
  std::vector<int64_t> preds, block, fill, out, eos;
  int32_t seqlen = 0, generated = 0;
  bool done = false;

  int32_t run(int64_t max_new_tokens, bool chunked) {
    jacobi_engine::VerifyRow row{preds.data(), block.data(), fill.data(), &seqlen,  out.data(),
                                 1,            &generated,   &done,       eos.data(), static_cast<int64_t>(eos.size())};
    return jacobi_engine::verify_commit_row(row, static_cast<int64_t>(block.size()), max_new_tokens, chunked);
  }
};

void test_sliding_partial_accept() {
  // Guesses 11, 12 confirmed by the predictions, 99 is wrong: 3 verified tokens 11, 12, 13.
  Sequence s{{11, 12, 13, 14}, {10, 11, 12, 99}, {70, 71, 72, 73}, std::vector<int64_t>(10, -1), {}, 5, 1};
  EXPECT_EQ(s.run(10, false), 3);
  EXPECT_EQ(s.seqlen, 8);
  EXPECT_EQ(s.generated, 4);
  EXPECT_EQ(s.out[1], 11);
  EXPECT_EQ(s.out[3], 13);
  EXPECT_EQ(s.out[4], -1);
  // Next block: predictions from the last accepted slot on, then fill for the freed slots.
  EXPECT_EQ(s.block[0], 13);
  EXPECT_EQ(s.block[1], 14);
  EXPECT_EQ(s.block[2], 72);
  EXPECT_EQ(s.block[3], 73);
  EXPECT_EQ(s.done, false);
}

void test_eos_cuts_and_finishes() {
  Sequence s{{11, 2, 13, 14}, {10, 11, 2, 13}, {0, 0, 0, 0}, std::vector<int64_t>(10, -1), {5, 2}, 3, 1};
  EXPECT_EQ(s.run(10, false), 4);
  EXPECT_EQ(s.generated, 3);  // 11, then EOS; nothing after it
  EXPECT_EQ(s.seqlen, 5);     // a finished sequence keeps only what it emitted
  EXPECT_EQ(s.out[2], 2);
  EXPECT_EQ(s.out[3], -1);
  EXPECT_EQ(s.done, true);
  EXPECT_EQ(s.run(10, false), 0);  // finished sequences no longer move
  EXPECT_EQ(s.generated, 3);
}

void test_max_new_tokens_cut() {
  Sequence s{{11, 12, 13, 14}, {10, 11, 12, 13}, {0, 0, 0, 0}, std::vector<int64_t>(10, -1), {}, 0, 4};
  EXPECT_EQ(s.run(6, false), 4);
  EXPECT_EQ(s.generated, 6);
  EXPECT_EQ(s.seqlen, 2);
  EXPECT_EQ(s.out[5], 12);
  EXPECT_EQ(s.out[6], -1);
  EXPECT_EQ(s.done, true);
}

void test_chunked_waits_for_the_fixed_point() {
  Sequence s{{11, 12, 13, 14}, {10, 11, 55, 56}, {0, 0, 0, 0}, std::vector<int64_t>(10, -1), {}, 7, 1};
  EXPECT_EQ(s.run(10, true), 2);
  EXPECT_EQ(s.generated, 1);  // nothing committed yet
  EXPECT_EQ(s.seqlen, 7);
  EXPECT_EQ(s.block[0], 10);  // Jacobi update in place
  EXPECT_EQ(s.block[1], 11);
  EXPECT_EQ(s.block[2], 12);
  EXPECT_EQ(s.block[3], 13);
  EXPECT_EQ(s.run(10, true), 4);  // same predictions now confirm the whole chunk
  EXPECT_EQ(s.generated, 5);
  EXPECT_EQ(s.seqlen, 11);
  EXPECT_EQ(s.block[0], 14);
}

void test_block_of_one_is_autoregressive() {
  Sequence s{{42}, {41}, {0}, std::vector<int64_t>(4, -1), {}, 3, 1};
  EXPECT_EQ(s.run(4, true), 1);
  EXPECT_EQ(s.out[1], 42);
  EXPECT_EQ(s.block[0], 42);
  EXPECT_EQ(s.seqlen, 4);
}

}  // namespace

int main() {
  test_sliding_partial_accept();
  test_eos_cuts_and_finishes();
  test_max_new_tokens_cut();
  test_chunked_waits_for_the_fixed_point();
  test_block_of_one_is_autoregressive();
  if (failures) {
    std::fprintf(stderr, "%d failure(s)\n", failures);
    return EXIT_FAILURE;
  }
  std::printf("verify_commit: all tests passed\n");
  return EXIT_SUCCESS;
}
