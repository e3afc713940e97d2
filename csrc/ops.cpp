// Schema of the extension's ops and their CPU implementations.
//
// torch.ops.jacobi_engine.verify_and_commit: fused Jacobi fixed-point check + commit.
// torch.ops.jacobi_engine.move_cache_rows: KV commit of a winning candidate branch.
// torch.ops.jacobi_engine.sample_verify_and_commit / sample_tree_verify_and_commit: exact sampling.
// The CUDA implementation registers against the same schema in ops_cuda.cpp.
//
// Every op takes the int32 [1] error word `errors` last (csrc/op_errors.h). The CPU ops read the
// values they index with on the host and raise a ValueError naming the argument before writing
// anything; the CUDA ops cannot without a host sync, so their kernels clamp and set the bits.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "kv_commit.h"
#include "ops.h"
#include "sampling_verify.h"
#include "verify_commit.h"

namespace jacobi_engine {

void check_logits_dtype(at::ScalarType dtype) {
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble,
                   "scores (logits) must be float32, float16, bfloat16 or float64, got ", dtype);
}

void check_error_word(const at::Tensor& errors, const at::Device& device) {
  TORCH_CHECK_TYPE(errors.scalar_type() == at::kInt, "errors must be an int32 tensor, got ", errors.scalar_type());
  TORCH_CHECK_VALUE(errors.numel() == 1 && errors.is_contiguous(), "errors must hold one int32 word, got ",
                    errors.sizes());
  TORCH_CHECK_VALUE(errors.device() == device, "errors must be on ", device, ", got ", errors.device());
}

void check_verify_args(const at::Tensor& scores, const at::Tensor& block, const at::Tensor& fill,
                       const at::Tensor& tokens, const at::Tensor& lengths, const at::Tensor& done,
                       const at::Tensor& eos_ids, const at::Tensor& limits, const at::Tensor& cache_seqlens,
                       const at::Tensor& errors) {
  TORCH_CHECK_VALUE(block.dim() == 2, "block must be [B, n], got ", block.sizes());
  const int64_t batch = block.size(0);
  const int64_t n = block.size(1);
  TORCH_CHECK_VALUE(n >= 1, "block must hold at least one token");
  TORCH_CHECK_TYPE(block.scalar_type() == at::kLong, "block must be int64");
  TORCH_CHECK_VALUE(block.is_contiguous(), "block must be contiguous");
  if (at::isFloatingType(scores.scalar_type())) {
    check_logits_dtype(scores.scalar_type());
    TORCH_CHECK_VALUE(scores.dim() == 3 && scores.size(0) == batch && scores.size(1) == n && scores.size(2) > 0,
                      "scores (logits) must be [B=", batch, ", n=", n, ", V], got ", scores.sizes());
    TORCH_CHECK_VALUE(scores.stride(2) == 1, "scores (logits) must be contiguous in the vocabulary dimension");
  } else {
    TORCH_CHECK_TYPE(scores.scalar_type() == at::kLong,
                     "scores must be floating-point logits [B, n, V] or int64 argmax [B, n]");
    TORCH_CHECK_VALUE(scores.dim() == 2 && scores.size(0) == batch && scores.size(1) == n,
                      "scores (argmax) must be [B=", batch, ", n=", n, "], got ", scores.sizes());
  }
  TORCH_CHECK_TYPE(fill.scalar_type() == at::kLong, "fill must be int64");
  TORCH_CHECK_VALUE(fill.sizes() == block.sizes(), "fill must have the block's shape ", block.sizes(), ", got ",
                    fill.sizes());
  TORCH_CHECK_TYPE(cache_seqlens.scalar_type() == at::kInt, "cache_seqlens must be int32");
  TORCH_CHECK_VALUE(cache_seqlens.dim() == 1 && cache_seqlens.size(0) == batch && cache_seqlens.is_contiguous(),
                    "cache_seqlens must be a contiguous [B=", batch, "] tensor");
  TORCH_CHECK_TYPE(tokens.scalar_type() == at::kLong, "tokens must be int64");
  TORCH_CHECK_VALUE(tokens.dim() == 2 && tokens.size(0) == batch && tokens.size(1) >= 1,
                    "tokens must be [B=", batch, ", W >= max(limits)], got ", tokens.sizes());
  TORCH_CHECK_TYPE(lengths.scalar_type() == at::kInt, "lengths must be int32");
  TORCH_CHECK_VALUE(lengths.dim() == 1 && lengths.size(0) == batch && lengths.is_contiguous(),
                    "lengths must be a contiguous [B=", batch, "] tensor");
  TORCH_CHECK_TYPE(done.scalar_type() == at::kBool, "done must be bool");
  TORCH_CHECK_VALUE(done.dim() == 1 && done.size(0) == batch && done.is_contiguous(),
                    "done must be a contiguous [B=", batch, "] tensor");
  TORCH_CHECK_TYPE(eos_ids.scalar_type() == at::kLong, "eos_ids must be int64");
  TORCH_CHECK_VALUE(eos_ids.dim() == 1, "eos_ids must be 1-D");
  // Per-row limits live on the device so that one captured CUDA graph serves every request. Their
  // values (and the lengths') are checked on the host by the CPU ops (check_commit_values) and
  // clamped by the CUDA kernels, which flag them in `errors` (csrc/verify_commit.h commit_bounds).
  TORCH_CHECK_TYPE(limits.scalar_type() == at::kInt, "limits must be an int32 tensor");
  TORCH_CHECK_VALUE(limits.dim() == 1 && limits.size(0) == batch && limits.is_contiguous(),
                    "limits must be a contiguous [B=", batch, "] tensor");
  const auto device = block.device();
  for (const at::Tensor* t : {&scores, &fill, &tokens, &lengths, &done, &eos_ids, &limits, &cache_seqlens}) {
    TORCH_CHECK_VALUE(t->device() == device, "all verify_and_commit inputs must be on ", device, ", got one on ",
                      t->device());
  }
  check_error_word(errors, device);
}

void check_move_rows_args(at::TensorList buffers, const at::Tensor& src, const at::Tensor& dst, int64_t rows,
                          const at::Tensor& errors) {
  TORCH_CHECK_VALUE(rows >= 0, "rows must be >= 0, got ", rows);
  TORCH_CHECK_TYPE(src.scalar_type() == at::kLong && dst.scalar_type() == at::kLong, "src and dst must be int64");
  TORCH_CHECK_VALUE(src.dim() == 1 && src.is_contiguous() && dst.sizes() == src.sizes() && dst.is_contiguous(),
                    "src and dst must be contiguous [B] tensors of the same shape");
  TORCH_CHECK_VALUE(dst.device() == src.device(), "src and dst must be on one device");
  for (const at::Tensor& buffer : buffers) {
    TORCH_CHECK_VALUE(buffer.dim() >= 2 && buffer.size(0) == src.size(0) && buffer.is_contiguous(),
                      "buffers must be contiguous [B=", src.size(0), ", S, ...] tensors, got ", buffer.sizes());
    TORCH_CHECK_VALUE(buffer.device() == src.device(), "buffers, src and dst must be on one device");
  }
  check_error_word(errors, src.device());
}

namespace {

// The CPU ops' host-side check of the commit's values (the CUDA kernels clamp and flag instead).
// Finished rows are never read, so their values do not matter.
void check_commit_values(const at::Tensor& tokens, const at::Tensor& lengths, const at::Tensor& done,
                         const at::Tensor& limits) {
  const int64_t width = tokens.size(1);
  const int32_t* length_ptr = lengths.data_ptr<int32_t>();
  const int32_t* limit_ptr = limits.data_ptr<int32_t>();
  const bool* done_ptr = done.data_ptr<bool>();
  for (int64_t b = 0; b < lengths.size(0); ++b) {
    if (done_ptr[b]) continue;
    const CommitBounds bounds = commit_bounds(length_ptr[b], limit_ptr[b], width);
    TORCH_CHECK_VALUE((bounds.errors & kErrorLimits) == 0, "limits[", b, "] = ", limit_ptr[b],
                      " must lie in [0, tokens.size(1) = ", width, "]");
    TORCH_CHECK_VALUE((bounds.errors & kErrorLengths) == 0, "lengths[", b, "] = ", length_ptr[b],
                      " must lie in [0, limits[", b, "] = ", limit_ptr[b], "] (tokens has ", width, " columns)");
  }
}

// The drafts (block slots 1..n-1) of the active rows index the distributions: ids in [0, V).
void check_draft_values(const at::Tensor& block, const at::Tensor& done, int64_t vocab) {
  const int64_t n = block.size(1);
  const int64_t* block_ptr = block.data_ptr<int64_t>();
  const bool* done_ptr = done.data_ptr<bool>();
  for (int64_t b = 0; b < block.size(0); ++b) {
    if (done_ptr[b]) continue;
    for (int64_t j = 1; j < n; ++j) {
      const int64_t token = block_ptr[b * n + j];
      TORCH_CHECK_VALUE(in_vocab(token, vocab), "block[", b, ", ", j, "] = ", token,
                        " is not a token id of the vocabulary [0, ", vocab, ")");
    }
  }
}

void move_cache_rows_cpu(at::TensorList buffers, const at::Tensor& src, const at::Tensor& dst, int64_t rows,
                         at::Tensor& errors) {
  check_move_rows_args(buffers, src, dst, rows, errors);
  const int64_t* src_ptr = src.data_ptr<int64_t>();
  const int64_t* dst_ptr = dst.data_ptr<int64_t>();
  // Every row of every buffer is checked before any is moved, so a bad row leaves all untouched.
  for (const at::Tensor& buffer : buffers) {
    const int64_t capacity = buffer.size(1);
    for (int64_t b = 0; b < buffer.size(0); ++b) {
      TORCH_CHECK_VALUE(rows_in_cache(src_ptr[b], dst_ptr[b], rows, capacity), "move_cache_rows: src[", b, "] = ",
                        src_ptr[b], ", dst[", b, "] = ", dst_ptr[b], ": rows ", src_ptr[b], "..+", rows, " -> ",
                        dst_ptr[b], " must lie in the cache (", capacity, " rows) and move back when they overlap");
    }
  }
  for (const at::Tensor& buffer : buffers) {
    const int64_t capacity = buffer.size(1);
    const int64_t row_bytes = buffer.stride(1) * buffer.element_size();
    for (int64_t b = 0; b < buffer.size(0); ++b) {
      uint8_t* sequence = static_cast<uint8_t*>(buffer.data_ptr()) + b * buffer.stride(0) * buffer.element_size();
      if (row_bytes % 4 == 0) {
        move_rows(reinterpret_cast<int32_t*>(sequence), row_bytes / 4, capacity, src_ptr[b], dst_ptr[b], rows, 0, 1);
      } else {
        move_rows(sequence, row_bytes, capacity, src_ptr[b], dst_ptr[b], rows, 0, 1);
      }
    }
  }
}

// The commit's per-row view of the target's tensors (the CommitTarget of jacobi_engine/op_args.py).
VerifyRow commit_view(const int64_t* preds, int64_t* block, const int64_t* fill, at::Tensor& tokens,
                      at::Tensor& lengths, at::Tensor& done, const at::Tensor& eos, at::Tensor& cache_seqlens,
                      int64_t b) {
  return VerifyRow{preds,
                   block,
                   fill,
                   cache_seqlens.data_ptr<int32_t>() + b,
                   tokens.data_ptr<int64_t>() + b * tokens.stride(0),
                   tokens.stride(1),
                   tokens.size(1),
                   lengths.data_ptr<int32_t>() + b,
                   done.data_ptr<bool>() + b,
                   eos.data_ptr<int64_t>(),
                   eos.numel()};
}

at::Tensor verify_and_commit_cpu(const at::Tensor& scores, at::Tensor& block, const at::Tensor& fill,
                                 at::Tensor& tokens, at::Tensor& lengths, at::Tensor& done, const at::Tensor& eos_ids,
                                 const at::Tensor& limits, at::Tensor& cache_seqlens, bool chunked,
                                 at::Tensor& errors) {
  check_verify_args(scores, block, fill, tokens, lengths, done, eos_ids, limits, cache_seqlens, errors);
  check_commit_values(tokens, lengths, done, limits);
  const int64_t batch = block.size(0);
  const int64_t n = block.size(1);
  const at::Tensor preds = (at::isFloatingType(scores.scalar_type()) ? scores.argmax(-1) : scores).contiguous();
  const at::Tensor fill_c = fill.contiguous();
  const at::Tensor eos_c = eos_ids.contiguous();
  at::Tensor n_accepted = at::empty({batch}, block.options().dtype(at::kInt));
  const int32_t* limits_ptr = limits.data_ptr<int32_t>();
  uint32_t row_errors = 0;  // stays 0: the values were checked above
  for (int64_t b = 0; b < batch; ++b) {
    const VerifyRow row = commit_view(preds.data_ptr<int64_t>() + b * n, block.data_ptr<int64_t>() + b * n,
                                      fill_c.data_ptr<int64_t>() + b * n, tokens, lengths, done, eos_c,
                                      cache_seqlens, b);
    n_accepted.data_ptr<int32_t>()[b] = verify_commit_row(row, n, limits_ptr[b], chunked, &row_errors);
  }
  return n_accepted;
}

}  // namespace

// The chunk's verified prefix and the Philox counter, shared by both sampling ops.
void check_counter_args(int64_t batch, const at::Tensor& n_fixed, const at::Tensor& seed,
                        const at::Tensor& sequence_ids, const at::Tensor& step) {
  TORCH_CHECK_TYPE(n_fixed.scalar_type() == at::kInt, "n_fixed must be int32");
  TORCH_CHECK_VALUE(n_fixed.dim() == 1 && n_fixed.size(0) == batch && n_fixed.is_contiguous(),
                    "n_fixed must be a contiguous [B=", batch, "] tensor");
  TORCH_CHECK_TYPE(seed.scalar_type() == at::kLong && step.scalar_type() == at::kLong, "seed and step must be int64");
  TORCH_CHECK_VALUE(seed.numel() == 1 && step.numel() == 1, "seed and step must hold one value each");
  TORCH_CHECK_TYPE(sequence_ids.scalar_type() == at::kLong, "sequence_ids must be int64");
  TORCH_CHECK_VALUE(sequence_ids.dim() == 1 && sequence_ids.size(0) == batch && sequence_ids.is_contiguous(),
                    "sequence_ids must be a contiguous [B=", batch, "] tensor");
}

void check_sample_verify_args(const at::Tensor& probs, const at::Tensor& proposal, const at::Tensor& draft_sampled,
                              const at::Tensor& block, const at::Tensor& n_fixed, const at::Tensor& seed,
                              const at::Tensor& sequence_ids, const at::Tensor& step) {
  const int64_t batch = block.dim() == 2 ? block.size(0) : -1;
  const int64_t n = block.dim() == 2 ? block.size(1) : -1;
  TORCH_CHECK_TYPE(probs.scalar_type() == at::kFloat, "probs must be float32, got ", probs.scalar_type());
  TORCH_CHECK_VALUE(probs.dim() == 3 && probs.size(0) == batch && probs.size(1) == n && probs.size(2) > 0 &&
                        probs.is_contiguous(),
                    "probs must be a contiguous [B=", batch, ", n=", n, ", V] tensor, got ", probs.sizes());
  TORCH_CHECK_TYPE(proposal.scalar_type() == at::kFloat, "proposal must be float32, got ", proposal.scalar_type());
  TORCH_CHECK_VALUE(proposal.sizes() == probs.sizes() && proposal.is_contiguous(),
                    "proposal must be a contiguous tensor of probs' shape ", probs.sizes(), ", got ", proposal.sizes());
  TORCH_CHECK_TYPE(draft_sampled.scalar_type() == at::kBool, "draft_sampled must be bool");
  TORCH_CHECK_VALUE(draft_sampled.sizes() == block.sizes() && draft_sampled.is_contiguous(),
                    "draft_sampled must be a contiguous tensor of the block's shape ", block.sizes());
  check_counter_args(batch, n_fixed, seed, sequence_ids, step);
  for (const at::Tensor* t : {&probs, &proposal, &draft_sampled, &n_fixed, &seed, &sequence_ids, &step}) {
    TORCH_CHECK_VALUE(t->device() == block.device(), "all sample_verify_and_commit inputs must be on ",
                      block.device(), ", got one on ", t->device());
  }
}

namespace {

at::Tensor sample_verify_and_commit_cpu(const at::Tensor& probs, at::Tensor& block, const at::Tensor& fill,
                                        at::Tensor& proposal, at::Tensor& draft_sampled, const at::Tensor& n_fixed,
                                        const at::Tensor& seed, const at::Tensor& sequence_ids,
                                        const at::Tensor& step, at::Tensor& tokens, at::Tensor& lengths,
                                        at::Tensor& done, const at::Tensor& eos_ids, const at::Tensor& limits,
                                        at::Tensor& cache_seqlens, bool chunked, at::Tensor& errors) {
  // Greedy's checks need a scores argument; the argmax form has the block's shape.
  check_verify_args(block, block, fill, tokens, lengths, done, eos_ids, limits, cache_seqlens, errors);
  check_sample_verify_args(probs, proposal, draft_sampled, block, n_fixed, seed, sequence_ids, step);
  const int64_t batch = block.size(0);
  const int64_t n = block.size(1);
  const int64_t vocab = probs.size(2);
  check_commit_values(tokens, lengths, done, limits);
  check_draft_values(block, done, vocab);
  const at::Tensor fill_c = fill.contiguous();
  const at::Tensor eos_c = eos_ids.contiguous();
  at::Tensor n_accepted = at::empty({batch}, block.options().dtype(at::kInt));
  const uint64_t seed_value = static_cast<uint64_t>(seed.item<int64_t>());
  const uint64_t step_value = static_cast<uint64_t>(step.item<int64_t>());

  const float* probs_ptr = probs.data_ptr<float>();
  float* proposal_ptr = proposal.data_ptr<float>();
  bool* sampled_ptr = draft_sampled.data_ptr<bool>();
  int64_t* block_ptr = block.data_ptr<int64_t>();
  const int32_t* fixed_ptr = n_fixed.data_ptr<int32_t>();
  const int64_t* sequence_ptr = sequence_ids.data_ptr<int64_t>();
  const int32_t* limits_ptr = limits.data_ptr<int32_t>();
  uint32_t row_errors = 0;  // stays 0: the values were checked above
  std::vector<SlotResult> slots(n);
  std::vector<int64_t> preds(n);
  for (int64_t b = 0; b < batch; ++b) {
    bool* row_done = done.data_ptr<bool>() + b;
    int32_t* accepted_ptr = n_accepted.data_ptr<int32_t>() + b;
    if (*row_done) {
      *accepted_ptr = 0;
      continue;
    }
    const float* row_probs = probs_ptr + b * n * vocab;
    float* row_proposal = proposal_ptr + b * n * vocab;
    int64_t* row_block = block_ptr + b * n;
    bool* row_sampled = sampled_ptr + b * n;
    // Slots past the first rejection only contribute their fresh sample, but each slot's numbers
    // come from its own counter, so computing all of them (as the GPU does) changes nothing.
    for (int64_t i = 0; i < n; ++i) {
      const bool has_draft = i + 1 < n;
      const int64_t draft = has_draft ? row_block[i + 1] : -1;
      const DraftRule rule = draft_rule(i + 1, fixed_ptr[b], has_draft && row_sampled[i + 1]);
      const SlotUniforms u =
          slot_uniforms(seed_value, static_cast<uint64_t>(sequence_ptr[b]), step_value, static_cast<uint64_t>(i));
      slots[i] = decide_slot_sequential(row_probs + i * vocab, row_proposal + (has_draft ? i + 1 : i) * vocab, vocab,
                                        has_draft, draft, rule, u);
    }
    assemble_preds(slots.data(), row_block, n, preds.data());
    const VerifyRow row = commit_view(preds.data(), row_block, fill_c.data_ptr<int64_t>() + b * n, tokens, lengths,
                                      done, eos_c, cache_seqlens, b);
    const int32_t accepted = verify_commit_row(row, n, limits_ptr[b], chunked, &row_errors);
    *accepted_ptr = accepted;
    const bool finished = *row_done;
    const ProposalPlan plan = proposal_plan(true, !chunked || accepted == n || finished, finished, accepted, n);
    for (int64_t j = 0; j < n; ++j) {
      const bool covered = plan_covers(plan, j, n);
      row_sampled[j] = covered;
      if (covered) std::copy_n(row_probs + (j + plan.offset) * vocab, vocab, row_proposal + j * vocab);
    }
  }
  return n_accepted;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// torch.ops.jacobi_engine.sample_tree_verify_and_commit: exact sampling over the token tree
// [block | k branches of g] (csrc/sampling_verify.h walk_tree), then greedy's commit of the
// winning path, as the greedy pool step does (jacobi_engine/step.py).

void check_sample_tree_args(const at::Tensor& probs, const at::Tensor& proposal, const at::Tensor& draft_sampled,
                            const at::Tensor& block, const at::Tensor& candidates, const at::Tensor& usable,
                            const at::Tensor& row, const at::Tensor& n_fixed, const at::Tensor& seed,
                            const at::Tensor& sequence_ids, const at::Tensor& step) {
  TORCH_CHECK_VALUE(block.dim() == 2 && block.scalar_type() == at::kLong && block.is_contiguous(),
                    "block must be a contiguous int64 [B, n] tensor, got ", block.sizes());
  const int64_t batch = block.size(0), n = block.size(1);
  TORCH_CHECK_TYPE(candidates.scalar_type() == at::kLong, "candidates must be int64");
  TORCH_CHECK_VALUE(candidates.dim() == 3 && candidates.size(0) == batch && candidates.is_contiguous(),
                    "candidates must be a contiguous [B=", batch, ", k, g] tensor, got ", candidates.sizes());
  const int64_t k = candidates.size(1), g = candidates.size(2);
  TORCH_CHECK_VALUE(k >= 1 && k <= kMaxTreeBranches && g >= 1, "candidates must have 1 <= k <= ", kMaxTreeBranches,
                    " branches of g >= 1 tokens, got ", candidates.sizes());
  TORCH_CHECK_TYPE(usable.scalar_type() == at::kBool, "usable must be bool");
  TORCH_CHECK_VALUE(usable.dim() == 2 && usable.size(0) == batch && usable.size(1) == k && usable.is_contiguous(),
                    "usable must be a contiguous [B=", batch, ", k=", k, "] tensor, got ", usable.sizes());
  const int64_t width = std::max(n, g + 1);
  TORCH_CHECK_VALUE(row.dim() == 2 && row.size(0) == batch && row.size(1) == width, "row must be [B=", batch,
                    ", max(n, g + 1)=", width, "], got ", row.sizes());
  TORCH_CHECK_TYPE(probs.scalar_type() == at::kFloat, "probs must be float32, got ", probs.scalar_type());
  TORCH_CHECK_VALUE(probs.dim() == 3 && probs.size(0) == batch && probs.size(1) == n + k * g && probs.size(2) > 0 &&
                        probs.is_contiguous(),
                    "probs must be a contiguous [B=", batch, ", n + k * g=", n + k * g, ", V] tensor, got ",
                    probs.sizes());
  // The walk keeps excluded token ids in int32 (csrc/sampling_verify.h NodeWeight).
  TORCH_CHECK_VALUE(probs.size(2) <= INT32_MAX, "probs: a vocabulary of ", probs.size(2), " tokens is too large");
  TORCH_CHECK_TYPE(proposal.scalar_type() == at::kFloat, "proposal must be float32, got ", proposal.scalar_type());
  TORCH_CHECK_VALUE(proposal.dim() == 3 && proposal.size(0) == batch && proposal.size(1) == n &&
                        proposal.size(2) == probs.size(2) && proposal.is_contiguous(),
                    "proposal must be a contiguous [B, n, V] tensor, got ", proposal.sizes());
  TORCH_CHECK_TYPE(draft_sampled.scalar_type() == at::kBool, "draft_sampled must be bool");
  TORCH_CHECK_VALUE(draft_sampled.sizes() == block.sizes() && draft_sampled.is_contiguous(),
                    "draft_sampled must be a contiguous tensor of the block's shape ", block.sizes());
  check_counter_args(batch, n_fixed, seed, sequence_ids, step);
  for (const at::Tensor* t :
       {&probs, &proposal, &draft_sampled, &candidates, &usable, &row, &n_fixed, &seed, &sequence_ids, &step}) {
    TORCH_CHECK_VALUE(t->device() == block.device(), "all sample_tree_verify_and_commit inputs must be on ",
                      block.device(), ", got one on ", t->device());
  }
}

namespace {

// walk_tree's Stats over one row: node quantities on demand (each computed once per row, as the GPU
// computes them beforehand). The buffers are sized once per call and reset per row by `start`.
struct CpuTreeStats {
  TreeShape shape;
  const float* probs;
  const float* proposal;
  const int64_t* block_tokens;
  const bool* sampled;
  int64_t n_fixed;
  int64_t vocab;
  uint64_t seed, sequence, step;
  std::vector<double> totals;
  std::vector<int64_t> samples;
  std::vector<char> known;

  void start(const float* row_probs, const float* row_proposal, const int64_t* row_block, const bool* row_sampled,
             int64_t row_fixed, uint64_t row_sequence) {
    probs = row_probs;
    proposal = row_proposal;
    block_tokens = row_block;
    sampled = row_sampled;
    n_fixed = row_fixed;
    sequence = row_sequence;
    std::fill(known.begin(), known.end(), 0);
  }
  void ensure(int64_t node) {
    if (known[node]) return;
    const float* p = probs + node * vocab;
    double lanes[kSampleLanes];
    for (int lane = 0; lane < kSampleLanes; ++lane) lanes[lane] = 0.0;
    for (int64_t v = 0; v < vocab; ++v) lanes[v % kSampleLanes] += positive(p[v]);
    totals[node] = lanes_sum(lanes);
    samples[node] = sample_with_totals(ProbWeight{p}, vocab, lanes, uniforms(node).sample);
    known[node] = 1;
  }
  double p_total(int64_t node) {
    ensure(node);
    return totals[node];
  }
  int64_t sample(int64_t node) {
    ensure(node);
    return samples[node];
  }
  SlotUniforms uniforms(int64_t node) const {
    return slot_uniforms(seed, sequence, step, static_cast<uint64_t>(node));
  }
  BlockDecision block(int64_t slot) {
    const DraftRule rule = draft_rule(slot + 1, n_fixed, sampled[slot + 1]);
    return decide_block_sequential(probs + slot * vocab, proposal + (slot + 1) * vocab, vocab,
                                   block_tokens[slot + 1], rule, uniforms(slot), p_total(slot));
  }
};

// The usable branches' tokens index the distributions too: ids in [0, V).
void check_candidate_values(const at::Tensor& candidates, const at::Tensor& usable, const at::Tensor& done,
                            int64_t vocab) {
  const int64_t k = candidates.size(1), g = candidates.size(2);
  const int64_t* candidates_ptr = candidates.data_ptr<int64_t>();
  const bool* usable_ptr = usable.data_ptr<bool>();
  const bool* done_ptr = done.data_ptr<bool>();
  for (int64_t b = 0; b < candidates.size(0); ++b) {
    if (done_ptr[b]) continue;
    for (int64_t m = 0; m < k; ++m) {
      if (!usable_ptr[b * k + m]) continue;
      for (int64_t i = 0; i < g; ++i) {
        const int64_t token = candidates_ptr[(b * k + m) * g + i];
        TORCH_CHECK_VALUE(in_vocab(token, vocab), "candidates[", b, ", ", m, ", ", i, "] = ", token,
                          " is not a token id of the vocabulary [0, ", vocab, ") (its branch is usable)");
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor> sample_tree_verify_and_commit_cpu(
    const at::Tensor& probs, at::Tensor& block, const at::Tensor& candidates, const at::Tensor& usable,
    at::Tensor& row, const at::Tensor& fill, at::Tensor& proposal, at::Tensor& draft_sampled,
    const at::Tensor& n_fixed, const at::Tensor& seed, const at::Tensor& sequence_ids, const at::Tensor& step,
    at::Tensor& tokens, at::Tensor& lengths, at::Tensor& done, const at::Tensor& eos_ids, const at::Tensor& limits,
    at::Tensor& cache_seqlens, bool chunked, at::Tensor& errors) {
  check_sample_tree_args(probs, proposal, draft_sampled, block, candidates, usable, row, n_fixed, seed, sequence_ids,
                         step);
  check_verify_args(row, row, fill, tokens, lengths, done, eos_ids, limits, cache_seqlens, errors);
  const int64_t batch = block.size(0), n = block.size(1);
  const TreeShape shape{n, candidates.size(1), candidates.size(2)};
  const int64_t width = row.size(1);
  const int64_t nodes = probs.size(1);
  const int64_t vocab = probs.size(2);
  check_commit_values(tokens, lengths, done, limits);
  check_draft_values(block, done, vocab);
  check_candidate_values(candidates, usable, done, vocab);
  const at::Tensor fill_c = fill.contiguous();
  const at::Tensor eos_c = eos_ids.contiguous();
  at::Tensor n_accepted = at::zeros({batch}, block.options().dtype(at::kInt));
  at::Tensor winner = at::full({batch}, -1, block.options());
  const uint64_t seed_value = static_cast<uint64_t>(seed.item<int64_t>());
  const uint64_t step_value = static_cast<uint64_t>(step.item<int64_t>());
  const float* probs_ptr = probs.data_ptr<float>();
  float* proposal_ptr = proposal.data_ptr<float>();
  bool* sampled_ptr = draft_sampled.data_ptr<bool>();
  int64_t* block_ptr = block.data_ptr<int64_t>();
  int64_t* row_ptr = row.data_ptr<int64_t>();
  const int64_t* candidates_ptr = candidates.data_ptr<int64_t>();
  const bool* usable_ptr = usable.data_ptr<bool>();
  const int32_t* limits_ptr = limits.data_ptr<int32_t>();
  uint32_t row_errors = 0;  // stays 0: the values were checked above
  std::vector<int64_t> preds(width);
  CpuTreeStats stats{};  // the row pointers are set by start()
  stats.shape = shape;
  stats.vocab = vocab;
  stats.seed = seed_value;
  stats.step = step_value;
  stats.totals.resize(nodes);
  stats.samples.resize(nodes);
  stats.known.resize(nodes);
  for (int64_t b = 0; b < batch; ++b) {
    bool* row_done = done.data_ptr<bool>() + b;
    if (*row_done) continue;
    const float* row_probs = probs_ptr + b * nodes * vocab;
    float* row_proposal = proposal_ptr + b * n * vocab;
    int64_t* row_block = block_ptr + b * n;
    bool* row_sampled = sampled_ptr + b * n;
    const int64_t* row_candidates = candidates_ptr + b * shape.k * shape.g;
    stats.start(row_probs, row_proposal, row_block, row_sampled, n_fixed.data_ptr<int32_t>()[b],
                static_cast<uint64_t>(sequence_ids.data_ptr<int64_t>()[b]));
    const TreeWalk walk =
        walk_tree(shape, row_block, row_candidates, usable_ptr + b * shape.k, row_probs, vocab, stats);
    auto sample_rest = [vocab](const NodeWeight& weight, double u) { return sample_sequential(weight, vocab, u); };
    const int64_t last = finish_walk(walk, sample_rest);
    int64_t* path_row = row_ptr + b * width;
    assemble_tree_row(shape, row_block, row_candidates, fill_c.data_ptr<int64_t>() + b * width, width, walk, last,
                      stats, path_row, preds.data());
    const VerifyRow commit = commit_view(preds.data(), path_row, fill_c.data_ptr<int64_t>() + b * width, tokens,
                                         lengths, done, eos_c, cache_seqlens, b);
    const int32_t accepted = verify_commit_row(commit, width, limits_ptr[b], chunked, &row_errors);
    n_accepted.data_ptr<int32_t>()[b] = accepted;
    winner.data_ptr<int64_t>()[b] = walk.winner;
    std::copy_n(path_row, n, row_block);
    const bool finished = *row_done;
    const ProposalPlan plan =
        proposal_plan(true, !chunked || accepted == width || finished, finished, accepted, n);
    const int64_t length = path_length(shape, walk.winner);
    for (int64_t j = 0; j < n; ++j) {
      const bool covered = tree_plan_covers(plan, j, n, length);
      row_sampled[j] = covered;
      if (covered) {
        const int64_t node = path_node(shape, walk.winner, j + plan.offset);
        std::copy_n(row_probs + node * vocab, vocab, row_proposal + j * vocab);
      }
    }
  }
  return {n_accepted, winner};
}

}  // namespace
}  // namespace jacobi_engine

TORCH_LIBRARY(jacobi_engine, m) {
  m.def(
      "verify_and_commit(Tensor scores, Tensor(a!) block, Tensor fill, Tensor(b!) tokens, Tensor(c!) lengths, "
      "Tensor(d!) done, Tensor eos_ids, Tensor limits, Tensor(e!) cache_seqlens, bool chunked, "
      "Tensor(f!) errors) -> Tensor");
  m.def("move_cache_rows(Tensor(a!)[] buffers, Tensor src, Tensor dst, int rows, Tensor(b!) errors) -> ()");
  m.def(
      "sample_verify_and_commit(Tensor probs, Tensor(a!) block, Tensor fill, Tensor(b!) proposal, "
      "Tensor(c!) draft_sampled, Tensor n_fixed, Tensor seed, Tensor sequence_ids, Tensor step, Tensor(d!) tokens, "
      "Tensor(e!) lengths, Tensor(f!) done, Tensor eos_ids, Tensor limits, Tensor(g!) cache_seqlens, "
      "bool chunked, Tensor(h!) errors) -> Tensor");
  m.def(
      "sample_tree_verify_and_commit(Tensor probs, Tensor(a!) block, Tensor candidates, Tensor usable, "
      "Tensor(b!) row, Tensor fill, Tensor(c!) proposal, Tensor(d!) draft_sampled, Tensor n_fixed, Tensor seed, "
      "Tensor sequence_ids, Tensor step, Tensor(e!) tokens, Tensor(f!) lengths, Tensor(g!) done, Tensor eos_ids, "
      "Tensor limits, Tensor(h!) cache_seqlens, bool chunked, Tensor(i!) errors) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(jacobi_engine, CPU, m) {
  m.impl("verify_and_commit", &jacobi_engine::verify_and_commit_cpu);
  m.impl("move_cache_rows", &jacobi_engine::move_cache_rows_cpu);
  m.impl("sample_verify_and_commit", &jacobi_engine::sample_verify_and_commit_cpu);
  m.impl("sample_tree_verify_and_commit", &jacobi_engine::sample_tree_verify_and_commit_cpu);
}
