// Schema of the extension's ops and their CPU implementations.
//
// torch.ops.jacobi_engine.verify_and_commit: fused Jacobi fixed-point check + commit.
// The CUDA implementation registers against the same schema in ops_cuda.cpp.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "ops.h"
#include "verify_commit.h"

namespace jacobi_engine {

void check_verify_args(const at::Tensor& scores, const at::Tensor& block, const at::Tensor& fill,
                       const at::Tensor& cache_seqlens, const at::Tensor& out_tokens,
                       const at::Tensor& n_generated, const at::Tensor& done, const at::Tensor& eos_ids,
                       const at::Tensor& max_new_tokens) {
  TORCH_CHECK_VALUE(block.dim() == 2, "block must be [B, n], got ", block.sizes());
  const int64_t batch = block.size(0);
  const int64_t n = block.size(1);
  TORCH_CHECK_VALUE(n >= 1, "block must hold at least one token");
  TORCH_CHECK_TYPE(block.scalar_type() == at::kLong, "block must be int64");
  TORCH_CHECK_VALUE(block.is_contiguous(), "block must be contiguous");
  if (at::isFloatingType(scores.scalar_type())) {
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
  TORCH_CHECK_TYPE(out_tokens.scalar_type() == at::kLong, "out_tokens must be int64");
  TORCH_CHECK_VALUE(out_tokens.dim() == 2 && out_tokens.size(0) == batch && out_tokens.size(1) >= 1,
                    "out_tokens must be [B=", batch, ", >= max(max_new_tokens)], got ", out_tokens.sizes());
  TORCH_CHECK_TYPE(n_generated.scalar_type() == at::kInt, "n_generated must be int32");
  TORCH_CHECK_VALUE(n_generated.dim() == 1 && n_generated.size(0) == batch && n_generated.is_contiguous(),
                    "n_generated must be a contiguous [B=", batch, "] tensor");
  TORCH_CHECK_TYPE(done.scalar_type() == at::kBool, "done must be bool");
  TORCH_CHECK_VALUE(done.dim() == 1 && done.size(0) == batch && done.is_contiguous(),
                    "done must be a contiguous [B=", batch, "] tensor");
  TORCH_CHECK_TYPE(eos_ids.scalar_type() == at::kLong, "eos_ids must be int64");
  TORCH_CHECK_VALUE(eos_ids.dim() == 1, "eos_ids must be 1-D");
  // Per-row limits live on the device so that one captured CUDA graph serves every request; the
  // caller guarantees 0 <= max_new_tokens[b] <= out_tokens.size(1) (checking the values here
  // would need a host sync); only emitted tokens are written, so no slack columns are needed.
  TORCH_CHECK_TYPE(max_new_tokens.scalar_type() == at::kInt, "max_new_tokens must be an int32 tensor");
  TORCH_CHECK_VALUE(max_new_tokens.dim() == 1 && max_new_tokens.size(0) == batch && max_new_tokens.is_contiguous(),
                    "max_new_tokens must be a contiguous [B=", batch, "] tensor");
  const auto device = block.device();
  for (const at::Tensor* t :
       {&scores, &fill, &cache_seqlens, &out_tokens, &n_generated, &done, &eos_ids, &max_new_tokens}) {
    TORCH_CHECK_VALUE(t->device() == device, "all verify_and_commit inputs must be on ", device, ", got one on ",
                      t->device());
  }
}

namespace {

at::Tensor verify_and_commit_cpu(const at::Tensor& scores, at::Tensor& block, const at::Tensor& fill,
                                 at::Tensor& cache_seqlens, at::Tensor& out_tokens, at::Tensor& n_generated,
                                 at::Tensor& done, const at::Tensor& eos_ids, const at::Tensor& max_new_tokens,
                                 bool chunked) {
  check_verify_args(scores, block, fill, cache_seqlens, out_tokens, n_generated, done, eos_ids, max_new_tokens);
  const int64_t batch = block.size(0);
  const int64_t n = block.size(1);
  const at::Tensor preds = (at::isFloatingType(scores.scalar_type()) ? scores.argmax(-1) : scores).contiguous();
  const at::Tensor fill_c = fill.contiguous();
  const at::Tensor eos_c = eos_ids.contiguous();
  at::Tensor n_accepted = at::empty({batch}, block.options().dtype(at::kInt));

  const int32_t* limits_ptr = max_new_tokens.data_ptr<int32_t>();
  const int64_t* preds_ptr = preds.data_ptr<int64_t>();
  int64_t* block_ptr = block.data_ptr<int64_t>();
  const int64_t* fill_ptr = fill_c.data_ptr<int64_t>();
  int32_t* seqlens_ptr = cache_seqlens.data_ptr<int32_t>();
  int64_t* out_ptr = out_tokens.data_ptr<int64_t>();
  int32_t* generated_ptr = n_generated.data_ptr<int32_t>();
  bool* done_ptr = done.data_ptr<bool>();
  int32_t* accepted_ptr = n_accepted.data_ptr<int32_t>();
  for (int64_t b = 0; b < batch; ++b) {
    VerifyRow row{preds_ptr + b * n,       block_ptr + b * n,      fill_ptr + b * n,
                  seqlens_ptr + b,         out_ptr + b * out_tokens.stride(0),
                  out_tokens.stride(1),    generated_ptr + b,      done_ptr + b,
                  eos_c.data_ptr<int64_t>(), eos_c.numel()};
    accepted_ptr[b] = verify_commit_row(row, n, limits_ptr[b], chunked);
  }
  return n_accepted;
}

}  // namespace
}  // namespace jacobi_engine

TORCH_LIBRARY(jacobi_engine, m) {
  m.def(
      "verify_and_commit(Tensor scores, Tensor(a!) block, Tensor fill, Tensor(b!) cache_seqlens, "
      "Tensor(c!) out_tokens, Tensor(d!) n_generated, Tensor(e!) done, Tensor eos_ids, Tensor max_new_tokens, "
      "bool chunked) -> Tensor");
}

TORCH_LIBRARY_IMPL(jacobi_engine, CPU, m) { m.impl("verify_and_commit", &jacobi_engine::verify_and_commit_cpu); }
