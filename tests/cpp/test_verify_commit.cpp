// Standalone tests of csrc/verify_commit.h, the per-sequence logic shared by the CPU op and the
// CUDA kernel. No torch, no Python: built by CMakeLists.txt with sanitizers, run with ctest.
#include <cstdint>
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
  uint32_t errors = 0;

  int32_t run(int64_t max_new_tokens, bool chunked) {
    jacobi_engine::VerifyRow row{preds.data(), block.data(), fill.data(),
                                 &seqlen,      out.data(),   1,
                                 static_cast<int64_t>(out.size()),
                                 &generated,   &done,        eos.data(),
                                 static_cast<int64_t>(eos.size())};
    return jacobi_engine::verify_commit_row(row, static_cast<int64_t>(block.size()), max_new_tokens, chunked,
                                            &errors);
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

// commit_bounds: what each out-of-range value does (the CUDA kernels' only protection).
void test_commit_bounds() {
  using jacobi_engine::commit_bounds;
  using jacobi_engine::kErrorLengths;
  using jacobi_engine::kErrorLimits;
  auto b = commit_bounds(3, 8, 10);
  EXPECT_EQ(b.limit, 8);
  EXPECT_EQ(b.usable, true);
  EXPECT_EQ(b.errors, 0u);
  b = commit_bounds(10, 10, 10);  // at its limit: usable, finishes without writing
  EXPECT_EQ(b.usable, true);
  EXPECT_EQ(b.errors, 0u);
  b = commit_bounds(3, 40, 10);  // limit past the buffer: clamped, flagged
  EXPECT_EQ(b.limit, 10);
  EXPECT_EQ(b.usable, true);
  EXPECT_EQ(b.errors, kErrorLimits);
  b = commit_bounds(3, -2, 10);  // negative limit: clamped to 0, the row cannot write
  EXPECT_EQ(b.limit, 0);
  EXPECT_EQ(b.usable, false);
  EXPECT_EQ(b.errors, kErrorLimits);
  b = commit_bounds(-1, 8, 10);
  EXPECT_EQ(b.usable, false);
  EXPECT_EQ(b.errors, kErrorLengths);
  b = commit_bounds(9, 8, 10);  // past its own limit
  EXPECT_EQ(b.usable, false);
  EXPECT_EQ(b.errors, kErrorLengths);
  b = commit_bounds(INT32_MAX, INT32_MAX, 10);
  EXPECT_EQ(b.usable, false);
  EXPECT_EQ(b.errors, kErrorLimits | kErrorLengths);
  b = commit_bounds(INT32_MIN, INT32_MIN, 10);
  EXPECT_EQ(b.usable, false);
  EXPECT_EQ(b.errors, kErrorLimits | kErrorLengths);
}

// Out-of-range lengths and limits from the device: every write stays inside the row's buffer,
// which is exactly `width` long (AddressSanitizer reports anything past it).
void test_bad_values_stay_in_bounds() {
  const int64_t width = 6;
  // Limit far past the buffer: the row commits up to the buffer's end and finishes there.
  Sequence s{{11, 12, 13, 14}, {10, 11, 12, 13}, {0, 0, 0, 0}, std::vector<int64_t>(width, -1), {}, 0, 4};
  EXPECT_EQ(s.run(1 << 30, false), 4);
  EXPECT_EQ(s.generated, 6);
  EXPECT_EQ(s.out[4], 11);
  EXPECT_EQ(s.out[5], 12);
  EXPECT_EQ(s.done, true);
  EXPECT_EQ(s.errors, jacobi_engine::kErrorLimits);
  // Negative or huge lengths: nothing is written, the row stays as it is.
  for (int32_t length : {-1, -1000000, 7, INT32_MAX, INT32_MIN}) {
    Sequence t{{11, 12, 13, 14}, {10, 11, 12, 13}, {0, 0, 0, 0}, std::vector<int64_t>(width, -1), {}, 5, length};
    EXPECT_EQ(t.run(width, false), 0);
    EXPECT_EQ(t.generated, length);
    EXPECT_EQ(t.seqlen, 5);
    EXPECT_EQ(t.block[0], 10);
    EXPECT_EQ(t.done, false);
    EXPECT_EQ(t.errors, jacobi_engine::kErrorLengths);
    for (int64_t v : t.out) EXPECT_EQ(v, -1);
  }
  // A length past its own (valid) limit: left as it is too.
  Sequence u{{11, 12}, {10, 11}, {0, 0}, std::vector<int64_t>(width, -1), {}, 0, 5};
  EXPECT_EQ(u.run(3, false), 0);
  EXPECT_EQ(u.errors, jacobi_engine::kErrorLengths);
  // A finished row is not looked at, whatever its values.
  Sequence d{{11}, {10}, {0}, std::vector<int64_t>(width, -1), {}, 0, -9};
  d.done = true;
  EXPECT_EQ(d.run(-9, false), 0);
  EXPECT_EQ(d.errors, 0u);
}

}  // namespace

int main() {
  test_sliding_partial_accept();
  test_eos_cuts_and_finishes();
  test_max_new_tokens_cut();
  test_chunked_waits_for_the_fixed_point();
  test_block_of_one_is_autoregressive();
  test_commit_bounds();
  test_bad_values_stay_in_bounds();
  if (failures) {
    std::fprintf(stderr, "%d failure(s)\n", failures);
    return EXIT_FAILURE;
  }
  std::printf("verify_commit: all tests passed\n");
  return EXIT_SUCCESS;
}
