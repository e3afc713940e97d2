// CUDA kernels of the extension. Only the launch and the thread mapping live here; the
// per-sequence logic is verify_commit.h, shared with the CPU implementation.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "kernels.h"
#include "verify_commit.h"

namespace jacobi_engine {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// torch.argmax order: NaN beats everything, ties go to the lower index.
__device__ __forceinline__ bool better(float x, int64_t ix, float best, int64_t ibest) {
  const bool x_nan = isnan(x);
  const bool best_nan = isnan(best);
  if (x_nan || best_nan) return x_nan && (!best_nan || ix < ibest);
  return x > best || (x == best && ix < ibest);
}

__device__ __forceinline__ void consider(float x, int64_t ix, float& best, int64_t& ibest) {
  if (better(x, ix, best, ibest)) {
    best = x;
    ibest = ix;
  }
}

template <typename T>
struct alignas(16) Vec16 {
  T values[16 / sizeof(T)];
};

// Argmax of one row of logits by the whole thread block; the result is valid in thread 0.
template <typename T>
__device__ int64_t block_argmax(const T* row, int64_t vocab) {
  float best = -INFINITY;
  int64_t ibest = INT64_MAX;
  constexpr int kPerVec = 16 / sizeof(T);
  const bool aligned = (reinterpret_cast<uintptr_t>(row) % 16) == 0;
  int64_t scalar_begin = 0;
  if (aligned) {
    const int64_t n_vec = vocab / kPerVec;
    const Vec16<T>* vec_row = reinterpret_cast<const Vec16<T>*>(row);
#pragma unroll 4
    for (int64_t k = threadIdx.x; k < n_vec; k += kThreads) {
      const Vec16<T> chunk = vec_row[k];
#pragma unroll
      for (int e = 0; e < kPerVec; ++e) consider(to_float(chunk.values[e]), k * kPerVec + e, best, ibest);
    }
    scalar_begin = n_vec * kPerVec;
  }
  for (int64_t v = scalar_begin + threadIdx.x; v < vocab; v += kThreads) consider(to_float(row[v]), v, best, ibest);

  for (int offset = 16; offset > 0; offset >>= 1) {
    const float other = __shfl_down_sync(0xffffffffu, best, offset);
    const int64_t other_index = __shfl_down_sync(0xffffffffu, ibest, offset);
    consider(other, other_index, best, ibest);
  }
  __shared__ float warp_best[kWarps];
  __shared__ int64_t warp_index[kWarps];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  if (lane == 0) {
    warp_best[warp] = best;
    warp_index[warp] = ibest;
  }
  __syncthreads();
  if (warp == 0) {
    best = lane < kWarps ? warp_best[lane] : -INFINITY;
    ibest = lane < kWarps ? warp_index[lane] : INT64_MAX;
    for (int offset = 16; offset > 0; offset >>= 1) {
      const float other = __shfl_down_sync(0xffffffffu, best, offset);
      const int64_t other_index = __shfl_down_sync(0xffffffffu, ibest, offset);
      consider(other, other_index, best, ibest);
    }
  }
  return ibest;
}

__device__ void commit_row(const VerifyLaunch& args, int64_t b, const int64_t* preds) {
  VerifyRow row{preds,
                args.block + b * args.n,
                args.fill + b * args.n,
                args.cache_seqlens + b,
                args.out + b * args.out_stride_b,
                args.out_stride_j,
                args.n_generated + b,
                args.done + b,
                args.eos_ids,
                args.n_eos};
  args.n_accepted[b] = verify_commit_row(row, args.n, args.max_new_tokens[b], args.chunked);
}

// Grid (B, n): block (b, i) takes the argmax of logits[b, i]; the last block of row b to
// finish (threadfence-reduction pattern) runs the row's verify-and-commit. One launch.
template <typename T>
__global__ void __launch_bounds__(kThreads) verify_commit_logits_kernel(VerifyLaunch args) {
  extern __shared__ int64_t row_preds[];  // [n], used by the last block only
  const int64_t b = blockIdx.x;
  const int64_t i = blockIdx.y;
  const T* row = static_cast<const T*>(args.scores) + b * args.score_stride_b + i * args.score_stride_i;
  const int64_t index = block_argmax(row, args.vocab);

  __shared__ bool is_last;
  if (threadIdx.x == 0) {
    args.preds_scratch[b * args.n + i] = index;
    __threadfence();
    const int ticket = atomicAdd(args.counters + b, 1);
    is_last = ticket == args.n - 1;
  }
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  for (int64_t j = threadIdx.x; j < args.n; j += kThreads) row_preds[j] = __ldcg(args.preds_scratch + b * args.n + j);
  __syncthreads();
  if (threadIdx.x == 0) {
    commit_row(args, b, row_preds);
  }
}

// Grid (B / 128): argmax already taken (contiguous int64 [B, n]); one thread per sequence.
__global__ void verify_commit_argmax_kernel(VerifyLaunch args) {
  const int64_t b = blockIdx.x * blockDim.x + threadIdx.x;
  if (b >= args.batch) return;
  commit_row(args, b, static_cast<const int64_t*>(args.scores) + b * args.score_stride_b);
}

}  // namespace

cudaError_t launch_verify_and_commit(const VerifyLaunch& args, cudaStream_t stream) {
  if (args.batch == 0) return cudaSuccess;
  if (args.score_type == ScoreType::kArgmax) {
    const int threads = 128;
    const int blocks = static_cast<int>((args.batch + threads - 1) / threads);
    verify_commit_argmax_kernel<<<blocks, threads, 0, stream>>>(args);
    return cudaGetLastError();
  }
  const dim3 grid(static_cast<unsigned>(args.batch), static_cast<unsigned>(args.n));
  const size_t shared = static_cast<size_t>(args.n) * sizeof(int64_t);
  switch (args.score_type) {
    case ScoreType::kFloat32:
      verify_commit_logits_kernel<float><<<grid, kThreads, shared, stream>>>(args);
      break;
    case ScoreType::kFloat16:
      verify_commit_logits_kernel<__half><<<grid, kThreads, shared, stream>>>(args);
      break;
    case ScoreType::kBFloat16:
      verify_commit_logits_kernel<__nv_bfloat16><<<grid, kThreads, shared, stream>>>(args);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace jacobi_engine
