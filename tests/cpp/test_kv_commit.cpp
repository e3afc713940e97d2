// Standalone tests of csrc/kv_commit.h (the row move shared by the CPU op and the CUDA kernel).
#include <cstdint>
#include <cstdio>
#include <vector>

#include "kv_commit.h"

namespace {

int failures = 0;

void check(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "FAILED: %s\n", what);
    ++failures;
  }
}

std::vector<int32_t> rows_of(int64_t rows, int64_t words) {
  std::vector<int32_t> v(rows * words);
  for (int64_t i = 0; i < rows * words; ++i) v[i] = static_cast<int32_t>(i);
  return v;
}

void test_disjoint_move() {
  auto v = rows_of(12, 3);
  const auto before = v;
  check(jacobi_engine::move_rows(v.data(), 3, 12, 8, 2, 3, 0, 1), "in bounds");
  for (int64_t j = 0; j < 3; ++j)
    for (int64_t w = 0; w < 3; ++w) check(v[(2 + j) * 3 + w] == before[(8 + j) * 3 + w], "disjoint rows moved");
  check(v[1 * 3] == before[1 * 3] && v[5 * 3] == before[5 * 3] && v[8 * 3] == before[8 * 3], "others untouched");
}

void test_overlapping_move_back() {
  // src 3..7 -> dst 1..5: the ranges overlap; every row must get the original source value.
  auto v = rows_of(10, 2);
  const auto before = v;
  check(jacobi_engine::move_rows(v.data(), 2, 10, 3, 1, 5, 0, 1), "in bounds");
  for (int64_t j = 0; j < 5; ++j)
    for (int64_t w = 0; w < 2; ++w) check(v[(1 + j) * 2 + w] == before[(3 + j) * 2 + w], "overlap read first");
}

void test_strided_workers_cover_every_word() {
  // Three workers (first 0, 1, 2 with step 3), run one after another, as GPU threads would.
  auto v = rows_of(9, 7);
  const auto before = v;
  for (int64_t first = 0; first < 3; ++first) jacobi_engine::move_rows(v.data(), 7, 9, 4, 2, 4, first, 3);
  for (int64_t j = 0; j < 4; ++j)
    for (int64_t w = 0; w < 7; ++w) check(v[(2 + j) * 7 + w] == before[(4 + j) * 7 + w], "strided workers");
}

void test_same_row_is_a_no_op() {
  auto v = rows_of(5, 2);
  const auto before = v;
  check(jacobi_engine::move_rows(v.data(), 2, 5, 1, 1, 3, 0, 1), "in bounds");
  check(v == before, "src == dst leaves the rows");
}

// Rows from device tensors: any value must leave the cache untouched unless the whole move fits.
// The vector is exactly the cache, so AddressSanitizer reports any read or write past it.
void test_rows_outside_the_cache_are_refused() {
  const int64_t capacity = 6, words = 3;
  const int64_t big = INT64_MAX;
  const int64_t bad[][3] = {
      {4, 0, 3},            // src + rows past the end
      {0, 4, 3},            // dst + rows past the end
      {-1, 0, 2},           // negative src
      {2, -3, 2},           // negative dst
      {1, 2, 3},            // overlapping, moving forward (the walk would read overwritten rows)
      {0, 0, 7},            // more rows than the cache
      {big, 0, 2},          // src + rows would overflow int64
      {0, big - 1, 2},      // dst + rows would overflow int64
      {1, 0, -1},           // negative count
  };
  for (const auto& move : bad) {
    auto v = rows_of(capacity, words);
    const auto before = v;
    check(!jacobi_engine::rows_in_cache(move[0], move[1], move[2], capacity), "rows_in_cache refuses it");
    check(!jacobi_engine::move_rows(v.data(), words, capacity, move[0], move[1], move[2], 0, 1), "move refused");
    check(v == before, "a refused move touches nothing");
  }
  check(jacobi_engine::rows_in_cache(3, 0, 3, capacity), "the last rows move to the first");
  check(jacobi_engine::rows_in_cache(3, 3, 3, capacity), "src == dst at the end");
  check(jacobi_engine::rows_in_cache(0, 0, 0, 0), "nothing to move in an empty cache");
}

}  // namespace

int main() {
  test_disjoint_move();
  test_overlapping_move_back();
  test_strided_workers_cover_every_word();
  test_same_row_is_a_no_op();
  test_rows_outside_the_cache_are_refused();
  if (failures) return 1;
  std::printf("kv_commit: all tests passed\n");
  return 0;
}
