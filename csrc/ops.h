// Declarations shared by the CPU and CUDA registrations of the extension's ops.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/TensorBody.h>
#include <c10/util/ArrayRef.h>

namespace jacobi_engine {

// The logits dtypes verify_and_commit takes on every device (float32, float16, bfloat16, float64);
// throws TypeError naming scores otherwise.
void check_logits_dtype(at::ScalarType dtype);

// Validates verify_and_commit's arguments (shapes, dtypes, devices; the values of lengths and limits
// are the CPU op's to check, the CUDA kernel's to clamp); throws ValueError/TypeError naming the argument.
void check_verify_args(const at::Tensor& scores, const at::Tensor& block, const at::Tensor& fill,
                       const at::Tensor& tokens, const at::Tensor& lengths, const at::Tensor& done,
                       const at::Tensor& eos_ids, const at::Tensor& limits, const at::Tensor& cache_seqlens,
                       const at::Tensor& errors);

// Validates move_cache_rows' arguments (what can be checked without reading device values).
void check_move_rows_args(at::TensorList buffers, const at::Tensor& src, const at::Tensor& dst, int64_t rows,
                          const at::Tensor& errors);

// Validates the sampling-specific arguments of sample_verify_and_commit (the rest are greedy's).
void check_sample_verify_args(const at::Tensor& probs, const at::Tensor& proposal, const at::Tensor& draft_sampled,
                              const at::Tensor& block, const at::Tensor& n_fixed, const at::Tensor& seed,
                              const at::Tensor& sequence_ids, const at::Tensor& step);

// Validates the tree-specific arguments of sample_tree_verify_and_commit (the commit's are greedy's,
// checked with the row as the block).
void check_sample_tree_args(const at::Tensor& probs, const at::Tensor& proposal, const at::Tensor& draft_sampled,
                            const at::Tensor& block, const at::Tensor& candidates, const at::Tensor& usable,
                            const at::Tensor& row, const at::Tensor& n_fixed, const at::Tensor& seed,
                            const at::Tensor& sequence_ids, const at::Tensor& step);

}  // namespace jacobi_engine
