// Per-sequence logic of the fused Jacobi verify-and-commit op.
//
// Written once, for both sides: the CPU op (ops.cpp) calls it in a loop over the batch and the
// CUDA kernel (kernels.cu) calls it from one thread per sequence, so the CPU tests exercise the
// very code the GPU runs. Plain C++ with no torch headers, so it also compiles into the
// standalone C++ tests (tests/cpp/, built by CMakeLists.txt).
#pragma once

#include <cstdint>

#include "host_device.h"
#include "op_errors.h"

namespace jacobi_engine {

// One sequence's view of the op's tensors (jacobi_engine.ops.CommitTarget). Pointers are to that
// sequence's row.
struct VerifyRow {
  const int64_t* preds;   // [n] argmax of the block's logits: preds[j] predicts slot j + 1
  int64_t* block;         // [n] tokens fed; slot 0 known-correct. Rewritten with the next block.
  const int64_t* fill;    // [n] guesses for slots the shift frees
  int32_t* cache_seqlen;  // committed tokens in the KV cache
  int64_t* tokens;        // the row's tokens, column j at tokens[j * tokens_stride]
  int64_t tokens_stride;
  int64_t width;          // columns of tokens: no write lands at or past it
  int32_t* length;        // one past the last known token (the column the next token goes to)
  bool* done;
  const int64_t* eos_ids;  // [n_eos]
  int64_t n_eos;
};

// Where a row may write: its limit clamped into [0, width], and whether 0 <= length <= that limit
// (else the row is left as it is). `errors` holds the bits of what was out of range.
struct CommitBounds {
  int64_t limit;
  bool usable;
  uint32_t errors;
};

// Values come from device tensors the caller cannot check without a host sync; every write of the
// commit stays below the clamped limit, so no value of `length` or `limit` leads outside `tokens`.
JE_HOST_DEVICE inline CommitBounds commit_bounds(int64_t length, int64_t limit, int64_t width) {
  CommitBounds bounds{limit, true, 0u};
  if (limit < 0 || limit > width) {
    bounds.errors |= kErrorLimits;
    bounds.limit = limit < 0 ? 0 : width;
  }
  if (length < 0 || length > bounds.limit) {
    bounds.usable = false;
    // A length inside the buffer that only exceeds a limit which was itself out of range is the
    // limit's fault; anything else is the length's.
    if (length < 0 || length > width || (bounds.errors & kErrorLimits) == 0) bounds.errors |= kErrorLengths;
  }
  return bounds;
}

// Returns the accepted count a in [1, n] (0 when the sequence had already finished, or when its
// length and limit leave it nothing it could write, see commit_bounds; the bits of what was out of
// range are ORed into *errors). The cache length advances by a (by the number of emitted tokens
// when the sequence finishes). Sliding mode commits every step; chunked mode only when the whole
// chunk is verified (a == n) or the sequence finishes. See jacobi_engine/op_args.py CommitTarget for
// the terms and jacobi_engine/reference.py for the full contract.
JE_HOST_DEVICE inline int32_t verify_commit_row(const VerifyRow& row, int64_t n, int64_t limit, bool chunked,
                                                uint32_t* errors) {
  if (*row.done) return 0;
  const CommitBounds bounds = commit_bounds(*row.length, limit, row.width);
  *errors |= bounds.errors;
  if (!bounds.usable) return 0;
  int64_t accepted = 1;
  while (accepted < n && row.block[accepted] == row.preds[accepted - 1]) ++accepted;

  const int64_t remaining = bounds.limit - static_cast<int64_t>(*row.length);  // >= 0: usable
  int64_t emit = accepted < remaining ? accepted : remaining;
  bool finished = emit >= remaining;
  for (int64_t j = 0; j < emit; ++j) {
    bool is_eos = false;
    for (int64_t e = 0; e < row.n_eos; ++e) is_eos = is_eos || row.preds[j] == row.eos_ids[e];
    if (is_eos) {
      emit = j + 1;
      finished = true;
      break;
    }
  }

  const bool commit = !chunked || accepted == n || finished;
  if (commit) {
    const int64_t base = *row.length;
    // base + j < base + remaining = limit <= width: every write is inside the row.
    for (int64_t j = 0; j < emit; ++j) row.tokens[(base + j) * row.tokens_stride] = row.preds[j];
    *row.length = static_cast<int32_t>(base + emit);
    // A finishing sequence only keeps what it emitted, so its frozen length stays inside the
    // cache however many steps the rest of the batch still takes.
    *row.cache_seqlen += static_cast<int32_t>(finished ? emit : accepted);
    if (finished) *row.done = true;
    for (int64_t j = 0; j < n; ++j) {
      const int64_t source = accepted - 1 + j;
      row.block[j] = source < n ? row.preds[source] : row.fill[j];
    }
  } else {
    // Jacobi update of the chunk in place: slot j takes the prediction made at slot j - 1.
    for (int64_t j = n - 1; j >= 1; --j) row.block[j] = row.preds[j - 1];
  }
  return static_cast<int32_t>(accepted);
}

}  // namespace jacobi_engine
