// CUDA registration of the extension's ops: validates tensors, fills the launch structs of
// kernels.h and enqueues on the current stream. Compiled only when CUDA is built in.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "kernels.h"
#include "ops.h"

namespace jacobi_engine {
namespace {

at::Tensor verify_and_commit_cuda(const at::Tensor& scores, at::Tensor& block, const at::Tensor& fill,
                                  at::Tensor& tokens, at::Tensor& lengths, at::Tensor& done, const at::Tensor& eos_ids,
                                  const at::Tensor& limits, at::Tensor& cache_seqlens, bool chunked,
                                  at::Tensor& errors) {
  check_verify_args(scores, block, fill, tokens, lengths, done, eos_ids, limits, cache_seqlens, errors);
  const c10::cuda::CUDAGuard guard(block.device());
  const int64_t batch = block.size(0);
  const int64_t n = block.size(1);
  const at::Tensor fill_c = fill.contiguous();
  const at::Tensor eos_c = eos_ids.contiguous();
  at::Tensor n_accepted = at::empty({batch}, block.options().dtype(at::kInt));

  VerifyLaunch args{};
  at::Tensor preds_in;
  at::Tensor scratch;
  at::Tensor counters;
  if (at::isFloatingType(scores.scalar_type())) {
    // check_verify_args admitted the CPU op's logits dtypes only (check_logits_dtype): the same on both devices.
    switch (scores.scalar_type()) {
      case at::kFloat: args.score_type = ScoreType::kFloat32; break;
      case at::kHalf: args.score_type = ScoreType::kFloat16; break;
      case at::kBFloat16: args.score_type = ScoreType::kBFloat16; break;
      default: args.score_type = ScoreType::kFloat64; break;
    }
    args.scores = scores.data_ptr();
    args.vocab = scores.size(2);
    args.score_stride_b = scores.stride(0);
    args.score_stride_i = scores.stride(1);
    scratch = at::empty({batch * n}, block.options());
    // Arrival counters of the threadfence reduction belong to this call: a process-wide buffer
    // would be shared by engines and streams (and could be freed under a captured graph). The
    // memset is one tiny node of the step, captured with it in a CUDA graph.
    counters = at::zeros({batch}, block.options().dtype(at::kInt));
    args.preds_scratch = scratch.data_ptr<int64_t>();
    args.counters = counters.data_ptr<int32_t>();
  } else {
    preds_in = scores.contiguous();
    args.score_type = ScoreType::kArgmax;
    args.scores = preds_in.data_ptr();
    args.score_stride_b = n;
    args.score_stride_i = 1;
  }
  args.block = block.data_ptr<int64_t>();
  args.fill = fill_c.data_ptr<int64_t>();
  args.cache_seqlens = cache_seqlens.data_ptr<int32_t>();
  args.tokens = tokens.data_ptr<int64_t>();
  args.tokens_stride_b = tokens.stride(0);
  args.tokens_stride_j = tokens.stride(1);
  args.tokens_width = tokens.size(1);
  args.lengths = lengths.data_ptr<int32_t>();
  args.done = done.data_ptr<bool>();
  args.eos_ids = eos_c.data_ptr<int64_t>();
  args.n_eos = eos_c.numel();
  args.n_accepted = n_accepted.data_ptr<int32_t>();
  args.batch = batch;
  args.n = n;
  args.limits = limits.data_ptr<int32_t>();
  args.chunked = chunked;
  args.errors = errors.data_ptr<int32_t>();

  const cudaError_t status = launch_verify_and_commit(args, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(status == cudaSuccess, "verify_and_commit launch failed: ", cudaGetErrorString(status));
  return n_accepted;
}

void move_cache_rows_cuda(at::TensorList buffers, const at::Tensor& src, const at::Tensor& dst, int64_t rows,
                          at::Tensor& errors) {
  check_move_rows_args(buffers, src, dst, rows, errors);
  if (buffers.empty()) return;
  const c10::cuda::CUDAGuard guard(src.device());
  // 4-byte words when every row and sequence of every buffer allows them (always for fp32/bf16/fp16
  // caches with an even head size), bytes otherwise.
  bool word4 = true;
  for (const at::Tensor& buffer : buffers) {
    const int64_t row_bytes = buffer.stride(1) * buffer.element_size();
    word4 = word4 && row_bytes % 4 == 0 && reinterpret_cast<uintptr_t>(buffer.data_ptr()) % 4 == 0;
  }
  const int64_t word = word4 ? 4 : 1;
  for (size_t first = 0; first < buffers.size(); first += kMaxMoveBuffers) {
    MoveRowsLaunch args{};
    args.n_buffers = static_cast<int>(std::min<size_t>(kMaxMoveBuffers, buffers.size() - first));
    for (int i = 0; i < args.n_buffers; ++i) {
      const at::Tensor& buffer = buffers[first + i];
      args.buffers[i] = buffer.data_ptr();
      args.row_words[i] = buffer.stride(1) * buffer.element_size() / word;
      args.sequence_words[i] = buffer.stride(0) * buffer.element_size() / word;
      args.capacity[i] = buffer.size(1);
    }
    args.errors = errors.data_ptr<int32_t>();
    args.word4 = word4;
    args.src = src.data_ptr<int64_t>();
    args.dst = dst.data_ptr<int64_t>();
    args.batch = src.size(0);
    args.rows = rows;
    const cudaError_t status = launch_move_cache_rows(args, c10::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(status == cudaSuccess, "move_cache_rows launch failed: ", cudaGetErrorString(status));
  }
}

// Greedy's commit arguments for the sampling ops, which hand it verified tokens (the argmax form).
VerifyLaunch argmax_commit_launch(at::Tensor& block, const at::Tensor& fill, at::Tensor& tokens, at::Tensor& lengths,
                                  at::Tensor& done, const at::Tensor& eos_ids, const at::Tensor& limits,
                                  at::Tensor& cache_seqlens, at::Tensor& n_accepted, bool chunked,
                                  at::Tensor& errors) {
  VerifyLaunch commit{};
  commit.score_type = ScoreType::kArgmax;
  commit.block = block.data_ptr<int64_t>();
  commit.fill = fill.data_ptr<int64_t>();
  commit.cache_seqlens = cache_seqlens.data_ptr<int32_t>();
  commit.tokens = tokens.data_ptr<int64_t>();
  commit.tokens_stride_b = tokens.stride(0);
  commit.tokens_stride_j = tokens.stride(1);
  commit.tokens_width = tokens.size(1);
  commit.lengths = lengths.data_ptr<int32_t>();
  commit.done = done.data_ptr<bool>();
  commit.eos_ids = eos_ids.data_ptr<int64_t>();
  commit.n_eos = eos_ids.numel();
  commit.n_accepted = n_accepted.data_ptr<int32_t>();
  commit.batch = block.size(0);
  commit.n = block.size(1);
  commit.limits = limits.data_ptr<int32_t>();
  commit.chunked = chunked;
  commit.errors = errors.data_ptr<int32_t>();
  return commit;
}

at::Tensor sample_verify_and_commit_cuda(const at::Tensor& probs, at::Tensor& block, const at::Tensor& fill,
                                         at::Tensor& proposal, at::Tensor& draft_sampled, const at::Tensor& n_fixed,
                                         const at::Tensor& seed, const at::Tensor& sequence_ids,
                                         const at::Tensor& step, at::Tensor& tokens, at::Tensor& lengths,
                                         at::Tensor& done, const at::Tensor& eos_ids, const at::Tensor& limits,
                                         at::Tensor& cache_seqlens, bool chunked, at::Tensor& errors) {
  check_verify_args(block, block, fill, tokens, lengths, done, eos_ids, limits, cache_seqlens, errors);
  check_sample_verify_args(probs, proposal, draft_sampled, block, n_fixed, seed, sequence_ids, step);
  const c10::cuda::CUDAGuard guard(block.device());
  const int64_t batch = block.size(0);
  const int64_t n = block.size(1);
  const at::Tensor fill_c = fill.contiguous();
  const at::Tensor eos_c = eos_ids.contiguous();
  at::Tensor n_accepted = at::empty({batch}, block.options().dtype(at::kInt));
  // Scratch and arrival counters belong to this call (see verify_and_commit_cuda).
  at::Tensor slot_accept = at::empty({batch * n}, block.options().dtype(at::kBool));
  at::Tensor slot_corrective = at::empty({batch * n}, block.options());
  at::Tensor slot_sample = at::empty({batch * n}, block.options());
  at::Tensor counters = at::zeros({batch}, block.options().dtype(at::kInt));
  at::Tensor plan = at::empty({batch * 2}, block.options());

  SampleVerifyLaunch args{};
  args.commit = argmax_commit_launch(block, fill_c, tokens, lengths, done, eos_c, limits, cache_seqlens, n_accepted,
                                     chunked, errors);
  args.probs = probs.data_ptr<float>();
  args.proposal = proposal.data_ptr<float>();
  args.draft_sampled = draft_sampled.data_ptr<bool>();
  args.n_fixed = n_fixed.data_ptr<int32_t>();
  args.seed = seed.data_ptr<int64_t>();  // read on the device: no host sync, any seed per graph
  args.sequence_ids = sequence_ids.data_ptr<int64_t>();
  args.step = step.data_ptr<int64_t>();
  args.vocab = probs.size(2);
  args.slot_accept = slot_accept.data_ptr<bool>();
  args.slot_corrective = slot_corrective.data_ptr<int64_t>();
  args.slot_sample = slot_sample.data_ptr<int64_t>();
  args.counters = counters.data_ptr<int32_t>();
  args.plan = plan.data_ptr<int64_t>();

  const cudaError_t status = launch_sample_verify_and_commit(args, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(status == cudaSuccess, "sample_verify_and_commit launch failed: ", cudaGetErrorString(status));
  return n_accepted;
}

std::tuple<at::Tensor, at::Tensor> sample_tree_verify_and_commit_cuda(
    const at::Tensor& probs, at::Tensor& block, const at::Tensor& candidates, const at::Tensor& usable,
    at::Tensor& row, const at::Tensor& fill, at::Tensor& proposal, at::Tensor& draft_sampled,
    const at::Tensor& n_fixed, const at::Tensor& seed, const at::Tensor& sequence_ids, const at::Tensor& step,
    at::Tensor& tokens, at::Tensor& lengths, at::Tensor& done, const at::Tensor& eos_ids, const at::Tensor& limits,
    at::Tensor& cache_seqlens, bool chunked, at::Tensor& errors) {
  check_sample_tree_args(probs, proposal, draft_sampled, block, candidates, usable, row, n_fixed, seed, sequence_ids,
                         step);
  check_verify_args(row, row, fill, tokens, lengths, done, eos_ids, limits, cache_seqlens, errors);
  TORCH_CHECK_VALUE(row.is_contiguous(), "row must be contiguous");
  const c10::cuda::CUDAGuard guard(block.device());
  const int64_t batch = block.size(0);
  const int64_t n = block.size(1);
  const int64_t nodes = probs.size(1);
  const at::Tensor fill_c = fill.contiguous();
  const at::Tensor eos_c = eos_ids.contiguous();
  at::Tensor n_accepted = at::empty({batch}, block.options().dtype(at::kInt));
  at::Tensor winner = at::empty({batch}, block.options());
  // Scratch belongs to this call (no state shared between engines or streams).
  at::Tensor node_total = at::empty({batch * nodes}, block.options().dtype(at::kDouble));
  at::Tensor node_sample = at::empty({batch * nodes}, block.options());
  at::Tensor slot_q_total = at::empty({batch * n}, block.options().dtype(at::kDouble));
  at::Tensor slot_accept = at::empty({batch * n}, block.options().dtype(at::kBool));
  at::Tensor slot_corrective = at::empty({batch * n}, block.options());
  at::Tensor slot_ratio_rest = at::empty({batch * n}, block.options().dtype(at::kBool));
  at::Tensor slot_rest_total = at::empty({batch * n}, block.options().dtype(at::kDouble));
  at::Tensor plan = at::empty({batch * 2}, block.options());

  SampleTreeLaunch args{};
  // The commit's block is the verified row (width max(n, g + 1)).
  args.commit = argmax_commit_launch(row, fill_c, tokens, lengths, done, eos_c, limits, cache_seqlens, n_accepted,
                                     chunked, errors);
  args.probs = probs.data_ptr<float>();
  args.proposal = proposal.data_ptr<float>();
  args.draft_sampled = draft_sampled.data_ptr<bool>();
  args.block = block.data_ptr<int64_t>();
  args.candidates = candidates.data_ptr<int64_t>();
  args.usable = usable.data_ptr<bool>();
  args.n_fixed = n_fixed.data_ptr<int32_t>();
  args.seed = seed.data_ptr<int64_t>();
  args.sequence_ids = sequence_ids.data_ptr<int64_t>();
  args.step = step.data_ptr<int64_t>();
  args.n = n;
  args.k = candidates.size(1);
  args.g = candidates.size(2);
  args.nodes = nodes;
  args.vocab = probs.size(2);
  args.winner = winner.data_ptr<int64_t>();
  args.node_total = node_total.data_ptr<double>();
  args.node_sample = node_sample.data_ptr<int64_t>();
  args.slot_q_total = slot_q_total.data_ptr<double>();
  args.slot_accept = slot_accept.data_ptr<bool>();
  args.slot_corrective = slot_corrective.data_ptr<int64_t>();
  args.slot_ratio_rest = slot_ratio_rest.data_ptr<bool>();
  args.slot_rest_total = slot_rest_total.data_ptr<double>();
  args.plan = plan.data_ptr<int64_t>();
  const cudaError_t status = launch_sample_tree_verify_and_commit(args, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(status == cudaSuccess, "sample_tree_verify_and_commit launch failed: ", cudaGetErrorString(status));
  return {n_accepted, winner};
}

}  // namespace
}  // namespace jacobi_engine

TORCH_LIBRARY_IMPL(jacobi_engine, CUDA, m) {
  m.impl("verify_and_commit", &jacobi_engine::verify_and_commit_cuda);
  m.impl("move_cache_rows", &jacobi_engine::move_cache_rows_cuda);
}

TORCH_LIBRARY_IMPL(jacobi_engine, CUDA, m) {
  m.impl("sample_verify_and_commit", &jacobi_engine::sample_verify_and_commit_cuda);
  m.impl("sample_tree_verify_and_commit", &jacobi_engine::sample_tree_verify_and_commit_cuda);
}
