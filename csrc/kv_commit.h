// Per-sequence logic of the KV-commit op (move_cache_rows): when a candidate branch wins, its K/V
// rows, appended after the Jacobi block, move to the rows right after the block's first token.
//
// Written once for both sides, like verify_commit.h: the CPU op calls it with one worker per
// sequence (first = 0, step = 1), the CUDA kernel with the threads of one block per (buffer,
// sequence). Each worker owns the same word indices of every row and walks the rows in
// ascending order, so overlapping ranges with dst < src are safe without any synchronisation:
// a word is only overwritten after the same worker has read it as a source. Plain C++.
#pragma once

#include <cstdint>

#include "host_device.h"

namespace jacobi_engine {

// Whether rows src..src+rows-1 -> dst..dst+rows-1 lie in a cache of `capacity` rows and, when
// they overlap, move back (what the per-worker ascending walk of move_rows needs). Written so that
// no sum can overflow, whatever the (device-side) values.
JE_HOST_DEVICE inline bool rows_in_cache(int64_t src_row, int64_t dst_row, int64_t rows, int64_t capacity) {
  if (rows < 0 || rows > capacity) return false;
  const int64_t last_start = capacity - rows;
  if (src_row < 0 || dst_row < 0 || src_row > last_start || dst_row > last_start) return false;
  return dst_row <= src_row || dst_row >= src_row + rows;
}

// Copies rows src_row .. src_row+rows-1 of one sequence's [capacity, row_words] slice to dst_row .. .
// Word type W is what the caller can use given the row's size and alignment (4 bytes or 1).
// Returns false, and touches nothing, when the rows break rows_in_cache.
template <typename W>
JE_HOST_DEVICE inline bool move_rows(W* sequence, int64_t row_words, int64_t capacity, int64_t src_row,
                                     int64_t dst_row, int64_t rows, int64_t first, int64_t step) {
  if (!rows_in_cache(src_row, dst_row, rows, capacity)) return false;
  if (src_row == dst_row) return true;
  for (int64_t j = 0; j < rows; ++j) {
    const W* from = sequence + (src_row + j) * row_words;
    W* to = sequence + (dst_row + j) * row_words;
    for (int64_t w = first; w < row_words; w += step) to[w] = from[w];
  }
  return true;
}

}  // namespace jacobi_engine
