// CUDA kernels of the extension. Only the launch and the thread mapping live here; the
// per-sequence logic is verify_commit.h, shared with the CPU implementation.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "kernels.h"
#include "kv_commit.h"
#include "sampling_verify.h"
#include "verify_commit.h"

namespace jacobi_engine {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// Logits are compared in float (exact for fp16/bf16/fp32), fp64 logits in double.
template <typename T>
struct Compare {
  using type = float;
};
template <>
struct Compare<double> {
  using type = double;
};

__device__ __forceinline__ float to_compare(float x) { return x; }
__device__ __forceinline__ float to_compare(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_compare(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ double to_compare(double x) { return x; }

// torch.argmax order: NaN beats everything, ties go to the lower index.
template <typename A>
__device__ __forceinline__ bool better(A x, int64_t ix, A best, int64_t ibest) {
  const bool x_nan = isnan(x);
  const bool best_nan = isnan(best);
  if (x_nan || best_nan) return x_nan && (!best_nan || ix < ibest);
  return x > best || (x == best && ix < ibest);
}

template <typename A>
__device__ __forceinline__ void consider(A x, int64_t ix, A& best, int64_t& ibest) {
  if (better(x, ix, best, ibest)) {
    best = x;
    ibest = ix;
  }
}

__device__ __forceinline__ void raise_errors(int32_t* errors, uint32_t bits) {
  if (bits != 0) atomicOr(reinterpret_cast<unsigned int*>(errors), bits);
}

template <typename T>
struct alignas(16) Vec16 {
  T values[16 / sizeof(T)];
};

// Argmax of one row of logits by the whole thread block; the result is valid in thread 0.
template <typename T>
__device__ int64_t block_argmax(const T* row, int64_t vocab) {
  using A = typename Compare<T>::type;
  A best = -INFINITY;
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
      for (int e = 0; e < kPerVec; ++e) consider(to_compare(chunk.values[e]), k * kPerVec + e, best, ibest);
    }
    scalar_begin = n_vec * kPerVec;
  }
  for (int64_t v = scalar_begin + threadIdx.x; v < vocab; v += kThreads) consider(to_compare(row[v]), v, best, ibest);

  for (int offset = 16; offset > 0; offset >>= 1) {
    const A other = __shfl_down_sync(0xffffffffu, best, offset);
    const int64_t other_index = __shfl_down_sync(0xffffffffu, ibest, offset);
    consider(other, other_index, best, ibest);
  }
  __shared__ A warp_best[kWarps];
  __shared__ int64_t warp_index[kWarps];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  if (lane == 0) {
    warp_best[warp] = best;
    warp_index[warp] = ibest;
  }
  __syncthreads();
  if (warp == 0) {
    best = lane < kWarps ? warp_best[lane] : static_cast<A>(-INFINITY);
    ibest = lane < kWarps ? warp_index[lane] : INT64_MAX;
    for (int offset = 16; offset > 0; offset >>= 1) {
      const A other = __shfl_down_sync(0xffffffffu, best, offset);
      const int64_t other_index = __shfl_down_sync(0xffffffffu, ibest, offset);
      consider(other, other_index, best, ibest);
    }
  }
  return ibest;
}

// The row's commit (one thread); out-of-range lengths and limits are clamped and flagged there.
__device__ void commit_row(const VerifyLaunch& args, int64_t b, const int64_t* preds) {
  VerifyRow row{preds,
                args.block + b * args.n,
                args.fill + b * args.n,
                args.cache_seqlens + b,
                args.tokens + b * args.tokens_stride_b,
                args.tokens_stride_j,
                args.tokens_width,
                args.lengths + b,
                args.done + b,
                args.eos_ids,
                args.n_eos};
  uint32_t errors = 0;
  args.n_accepted[b] = verify_commit_row(row, args.n, args.limits[b], args.chunked, &errors);
  raise_errors(args.errors, errors);
}

// Whether row b takes part in a sampling op: not finished, and its length and limit leave it
// something to write (else it is left as it is, and the bits of what was out of range are raised).
__device__ bool row_is_active(const VerifyLaunch& commit, int64_t b, bool report) {
  if (commit.done[b]) return false;
  const CommitBounds bounds = commit_bounds(commit.lengths[b], commit.limits[b], commit.tokens_width);
  if (!bounds.usable && report) raise_errors(commit.errors, bounds.errors);
  return bounds.usable;
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

// Grid (B, buffers): the threads of one block own fixed words of every row of one sequence of one
// buffer (see kv_commit.h for why that needs no synchronisation). Rows outside the cache are not
// moved (move_rows checks them) and raise kErrorCacheRows.
__global__ void move_cache_rows_kernel(MoveRowsLaunch args) {
  const int64_t b = blockIdx.x;
  const int buffer = blockIdx.y;
  const int64_t src = args.src[b];
  const int64_t dst = args.dst[b];
  const int64_t capacity = args.capacity[buffer];
  bool moved;
  if (args.word4) {
    int32_t* sequence = static_cast<int32_t*>(args.buffers[buffer]) + b * args.sequence_words[buffer];
    moved = move_rows(sequence, args.row_words[buffer], capacity, src, dst, args.rows, threadIdx.x, blockDim.x);
  } else {
    uint8_t* sequence = static_cast<uint8_t*>(args.buffers[buffer]) + b * args.sequence_words[buffer];
    moved = move_rows(sequence, args.row_words[buffer], capacity, src, dst, args.rows, threadIdx.x, blockDim.x);
  }
  if (!moved && threadIdx.x == 0) raise_errors(args.errors, kErrorCacheRows);
}

}  // namespace

cudaError_t launch_move_cache_rows(const MoveRowsLaunch& args, cudaStream_t stream) {
  if (args.batch == 0 || args.n_buffers == 0 || args.rows == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(args.batch), static_cast<unsigned>(args.n_buffers));
  move_cache_rows_kernel<<<grid, 256, 0, stream>>>(args);
  return cudaGetLastError();
}

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
    case ScoreType::kFloat64:
      verify_commit_logits_kernel<double><<<grid, kThreads, shared, stream>>>(args);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace jacobi_engine

// ---------------------------------------------------------------------------------------------
// Sampling verify-and-commit. The per-slot math and the commit are csrc/sampling_verify.h and
// verify_commit.h; here only the lane totals run in parallel (thread t sums lane t), and thread 0
// calls the shared functions on them, so the tokens are the CPU op's bit for bit.
namespace jacobi_engine {
namespace {

static_assert(kThreads == kSampleLanes, "one thread per sampling lane");

// Grid (B, n): block (b, i) decides slot i (fresh sample; acceptance of the draft in slot i + 1
// and its replacement); the last block of row b to finish assembles the verified tokens, commits
// like greedy and records the row's ProposalPlan and next draft kinds. Every sampler call sums its
// lane totals with all 256 threads (lane t by thread t, the order sample_sequential sums them in),
// so no thread keeps a [256] array of its own.
__global__ void __launch_bounds__(kThreads) sample_slots_kernel(SampleVerifyLaunch args) {
  extern __shared__ int64_t row_shared[];  // [n] preds, then [n] SlotResult (last block only)
  __shared__ double totals_p[kSampleLanes];
  __shared__ double totals_q[kSampleLanes];
  __shared__ double p_total, q_total;
  __shared__ int branch;  // 0: accepted, 1: residual (ratio rule), 2: p without the draft
  __shared__ bool fallback;  // the residual found nothing: draw from p without the draft
  __shared__ bool is_last;
  const VerifyLaunch& commit = args.commit;
  const int64_t n = commit.n;
  const int64_t vocab = args.vocab;
  const int64_t b = blockIdx.x;
  const int64_t i = blockIdx.y;
  const int lane = threadIdx.x;
  // Nothing of row b is written before all its blocks have arrived, so these reads are stable.
  if (!row_is_active(commit, b, i == 0 && lane == 0)) {
    if (i == 0 && lane == 0) {
      commit.n_accepted[b] = 0;
      args.plan[2 * b] = 0;
      args.plan[2 * b + 1] = n;
    }
    return;
  }
  const float* p = args.probs + (b * n + i) * vocab;
  const bool has_draft = i + 1 < n;
  const int64_t draft = has_draft ? commit.block[b * n + i + 1] : -1;
  const bool valid = !has_draft || in_vocab(draft, vocab);
  const DraftRule rule =
      has_draft ? vocab_rule(draft_rule(i + 1, args.n_fixed[b], args.draft_sampled[b * n + i + 1]), draft, vocab)
                : DraftRule::kFixed;
  const float* q = args.proposal + (b * n + (has_draft ? i + 1 : i)) * vocab;
  if (!valid && lane == 0) raise_errors(commit.errors, kErrorBlockTokens);

  totals_p[lane] = lane_total(ProbWeight{p}, vocab, lane);
  totals_q[lane] = rule == DraftRule::kRatio ? lane_total(ProbWeight{q}, vocab, lane) : 0.0;
  __syncthreads();
  SlotResult result{true, -1, -1};
  SlotUniforms u{};
  double q_d = 0.0;
  if (lane == 0) {
    u = slot_uniforms(static_cast<uint64_t>(*args.seed), static_cast<uint64_t>(args.sequence_ids[b]),
                      static_cast<uint64_t>(*args.step), static_cast<uint64_t>(i));
    result.sample = sample_with_totals(ProbWeight{p}, vocab, totals_p, u.sample);
    branch = 0;
    if (has_draft) {
      p_total = lanes_sum(totals_p);
      q_total = rule == DraftRule::kRatio ? lanes_sum(totals_q) : 0.0;
      q_d = rule == DraftRule::kRatio ? positive(q[draft]) : 0.0;
      result.accept = accept_draft(rule, u.accept, weight_of(p, draft, vocab), p_total, q_d, q_total);
      if (!result.accept) branch = rule == DraftRule::kRatio && q_d > 0.0 ? 1 : 2;
    }
  }
  __syncthreads();
  if (branch != 0) {
    // The replacement's lane totals, reusing totals_q (its reads are done).
    totals_q[lane] = branch == 1 ? lane_total(ResidualWeight{p, q, p_total, q_total}, vocab, lane)
                                 : lane_total(ExcludeWeight{p, draft}, vocab, lane);
    __syncthreads();
    int64_t token = -1;
    if (lane == 0) {
      token = branch == 1 ? sample_with_totals(ResidualWeight{p, q, p_total, q_total}, vocab, totals_q, u.residual)
                          : sample_with_totals(ExcludeWeight{p, draft}, vocab, totals_q, u.residual);
      // The rounding fallback of corrective_sequential (it practically never runs).
      fallback = branch == 1 && (token < 0 || token == draft);
    }
    __syncthreads();
    if (fallback) {
      totals_q[lane] = lane_total(ExcludeWeight{p, draft}, vocab, lane);
      __syncthreads();
      if (lane == 0) token = sample_with_totals(ExcludeWeight{p, draft}, vocab, totals_q, u.residual);
    }
    if (lane == 0) {
      result.corrective = token == draft ? -1 : token;
      result.accept = result.corrective < 0 && valid;
    }
  }
  if (lane == 0) {
    args.slot_accept[b * n + i] = result.accept;
    args.slot_corrective[b * n + i] = result.corrective;
    args.slot_sample[b * n + i] = result.sample;
    __threadfence();
    is_last = atomicAdd(args.counters + b, 1) == n - 1;
  }
  __syncthreads();
  if (!is_last || lane != 0) return;
  __threadfence();
  int64_t* preds = row_shared;
  SlotResult* slots = reinterpret_cast<SlotResult*>(row_shared + n);
  for (int64_t j = 0; j < n; ++j) {
    slots[j] = SlotResult{__ldcg(reinterpret_cast<const unsigned char*>(args.slot_accept + b * n + j)) != 0,
                          __ldcg(args.slot_corrective + b * n + j), __ldcg(args.slot_sample + b * n + j)};
  }
  assemble_preds(slots, commit.block + b * n, n, preds);
  commit_row(commit, b, preds);
  const int64_t accepted = commit.n_accepted[b];
  const bool finished = commit.done[b];
  const ProposalPlan plan = proposal_plan(true, !commit.chunked || accepted == n || finished, finished, accepted, n);
  args.plan[2 * b] = plan.offset;
  args.plan[2 * b + 1] = plan.first;
  for (int64_t j = 0; j < n; ++j) args.draft_sampled[b * n + j] = plan_covers(plan, j, n);
}

// Grid (B, n): slot j of row b takes this step's distribution of the slot its fresh sample came from.
__global__ void __launch_bounds__(kThreads) copy_proposals_kernel(SampleVerifyLaunch args) {
  const int64_t n = args.commit.n;
  const int64_t b = blockIdx.x;
  const int64_t j = blockIdx.y;
  const ProposalPlan plan{args.plan[2 * b], args.plan[2 * b + 1]};
  if (!plan_covers(plan, j, n)) return;
  const float* source = args.probs + (b * n + j + plan.offset) * args.vocab;
  float* target = args.proposal + (b * n + j) * args.vocab;
  const bool aligned = args.vocab % 4 == 0 && reinterpret_cast<uintptr_t>(source) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(target) % 16 == 0;
  if (aligned) {
    const float4* source4 = reinterpret_cast<const float4*>(source);
    float4* target4 = reinterpret_cast<float4*>(target);
    for (int64_t v = threadIdx.x; v < args.vocab / 4; v += kThreads) target4[v] = source4[v];
  } else {
    for (int64_t v = threadIdx.x; v < args.vocab; v += kThreads) target[v] = source[v];
  }
}

}  // namespace

cudaError_t launch_sample_verify_and_commit(const SampleVerifyLaunch& args, cudaStream_t stream) {
  if (args.commit.batch == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(args.commit.batch), static_cast<unsigned>(args.commit.n));
  const size_t shared = static_cast<size_t>(args.commit.n) * (sizeof(int64_t) + sizeof(SlotResult));
  sample_slots_kernel<<<grid, kThreads, shared, stream>>>(args);
  cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess) return status;
  copy_proposals_kernel<<<grid, kThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace jacobi_engine

// ---------------------------------------------------------------------------------------------
// Sampling verify over a token tree. Kernel 1, grid (B, T): every node's lane totals (thread t sums
// lane t) give its total and fresh sample, and block slot i's draft decision (decide_block_sequential
// with parallel totals). Kernel 2, grid (B): thread 0 walks the tree (walk_tree, reading kernel 1's
// results), the threads draw the last token from what is left if the walk ended in a rejection, and
// thread 0 commits the winning path like greedy. Kernel 3, grid (B, n): the proposal copies. The
// arithmetic is the CPU op's, in the same order, so the tokens agree bit for bit.
namespace jacobi_engine {
namespace {

__global__ void __launch_bounds__(kThreads) tree_nodes_kernel(SampleTreeLaunch args) {
  __shared__ double totals[kSampleLanes];
  __shared__ double totals_q[kSampleLanes];
  __shared__ double p_total, q_total;
  __shared__ int branch;     // 0: accepted, 1: SJD residual, 2: p without the draft
  __shared__ bool fallback;  // the residual found nothing: p without the draft
  const int64_t b = blockIdx.x;
  const int64_t t = blockIdx.y;
  const int lane = threadIdx.x;
  if (!row_is_active(args.commit, b, false)) return;  // the walk kernel reports it
  const int64_t vocab = args.vocab;
  const float* p = args.probs + (b * args.nodes + t) * vocab;
  const uint64_t seed = static_cast<uint64_t>(*args.seed);
  const uint64_t sequence = static_cast<uint64_t>(args.sequence_ids[b]);
  const uint64_t step = static_cast<uint64_t>(*args.step);
  totals[lane] = lane_total(ProbWeight{p}, vocab, lane);
  const bool has_draft = t + 1 < args.n;
  const int64_t draft = has_draft ? args.block[b * args.n + t + 1] : -1;
  const bool valid = has_draft && in_vocab(draft, vocab);  // the walk kernel reports invalid drafts
  const DraftRule rule =
      has_draft
          ? vocab_rule(draft_rule(t + 1, args.n_fixed[b], args.draft_sampled[b * args.n + t + 1]), draft, vocab)
          : DraftRule::kFixed;
  const float* q = args.proposal + (b * args.n + (has_draft ? t + 1 : 0)) * vocab;
  totals_q[lane] = rule == DraftRule::kRatio ? lane_total(ProbWeight{q}, vocab, lane) : 0.0;
  __syncthreads();
  SlotUniforms u{};
  double q_d = 0.0;
  if (lane == 0) {
    u = slot_uniforms(seed, sequence, step, static_cast<uint64_t>(t));
    p_total = lanes_sum(totals);
    args.node_total[b * args.nodes + t] = p_total;
    args.node_sample[b * args.nodes + t] = sample_with_totals(ProbWeight{p}, vocab, totals, u.sample);
    branch = 0;
    if (has_draft) {
      q_total = rule == DraftRule::kRatio ? lanes_sum(totals_q) : 0.0;
      q_d = rule == DraftRule::kRatio ? positive(q[draft]) : 0.0;
      const bool accept = accept_draft(rule, u.accept, weight_of(p, draft, vocab), p_total, q_d, q_total);
      args.slot_accept[b * args.n + t] = accept;
      args.slot_q_total[b * args.n + t] = q_total;
      if (!accept) branch = rule == DraftRule::kRatio && q_d > 0.0 ? 1 : 2;
    }
  }
  __syncthreads();
  if (branch == 0) return;
  // decide_block_sequential's rejection branch, with the lane totals in parallel.
  NodeWeight rest = plain_node_weight(p);
  if (valid) rest.exclude(draft);
  if (branch == 1) {
    rest.q = q;
    rest.p_total = p_total;
    rest.q_total = q_total;
    rest.ratio_residual = true;
  }
  totals_q[lane] = lane_total(rest, vocab, lane);  // its reads are done
  __syncthreads();
  int64_t token = -1;
  double rest_total = 0.0;
  if (lane == 0) {
    token = sample_with_totals(rest, vocab, totals_q, u.residual);
    rest_total = lanes_sum(totals_q);
    fallback = token < 0 && branch == 1;  // the rounding fallback (practically never runs)
  }
  __syncthreads();
  if (fallback) {
    rest.ratio_residual = false;
    totals_q[lane] = lane_total(rest, vocab, lane);
    __syncthreads();
    if (lane == 0) {
      token = sample_with_totals(rest, vocab, totals_q, u.residual);
      rest_total = lanes_sum(totals_q);
    }
  }
  if (lane != 0) return;
  args.slot_accept[b * args.n + t] = token < 0 && valid;
  args.slot_corrective[b * args.n + t] = token;
  args.slot_ratio_rest[b * args.n + t] = branch == 1 && !fallback;
  args.slot_rest_total[b * args.n + t] = rest_total;
}

// walk_tree's Stats interface over kernel 1's results (row b).
struct GpuTreeStats {
  const SampleTreeLaunch* args;
  int64_t b;
  __device__ double p_total(int64_t node) { return args->node_total[b * args->nodes + node]; }
  __device__ int64_t sample(int64_t node) { return args->node_sample[b * args->nodes + node]; }
  __device__ SlotUniforms uniforms(int64_t node) const {
    return slot_uniforms(static_cast<uint64_t>(*args->seed), static_cast<uint64_t>(args->sequence_ids[b]),
                         static_cast<uint64_t>(*args->step), static_cast<uint64_t>(node));
  }
  __device__ BlockDecision block(int64_t slot) {
    const int64_t vocab = args->vocab;
    const float* p = args->probs + (b * args->nodes + slot) * vocab;
    const int64_t index = b * args->n + slot;
    BlockDecision decision{args->slot_accept[index], -1, plain_node_weight(p), 0.0};
    if (decision.accept) return decision;
    decision.corrective = args->slot_corrective[index];
    const int64_t draft = args->block[index + 1];
    if (in_vocab(draft, vocab)) decision.rest.exclude(draft);
    if (args->slot_ratio_rest[index]) {
      decision.rest.q = args->proposal + (index + 1) * vocab;
      decision.rest.p_total = args->node_total[b * args->nodes + slot];
      decision.rest.q_total = args->slot_q_total[index];
      decision.rest.ratio_residual = true;
    }
    decision.rest_total = args->slot_rest_total[index];
    return decision;
  }
};

__global__ void __launch_bounds__(kThreads) tree_walk_kernel(SampleTreeLaunch args) {
  extern __shared__ int64_t tree_preds[];  // [W]
  __shared__ TreeWalk walk;
  __shared__ double totals[kSampleLanes];
  __shared__ int64_t last;
  const int64_t b = blockIdx.x;
  const int lane = threadIdx.x;
  const VerifyLaunch& commit = args.commit;
  if (!row_is_active(commit, b, lane == 0)) {
    if (lane == 0) {
      commit.n_accepted[b] = 0;
      args.winner[b] = -1;
      args.plan[2 * b] = 0;
      args.plan[2 * b + 1] = args.n;
    }
    return;
  }
  const TreeShape shape{args.n, args.k, args.g};
  const int64_t* block = args.block + b * args.n;
  const int64_t* candidates = args.candidates + b * args.k * args.g;
  const bool* usable = args.usable + b * args.k;
  GpuTreeStats stats{&args, b};
  if (lane == 0) {
    raise_errors(commit.errors, tree_token_errors(shape, block, candidates, usable, args.vocab));
    walk = walk_tree(shape, block, candidates, usable, args.probs + b * args.nodes * args.vocab, args.vocab, stats);
    last = walk.last_token;
  }
  __syncthreads();
  // finish_walk with the lane totals of all threads: what is left, then (if that has no weight)
  // the same without the SJD ratio, then p itself. Each draw sums what sample_sequential sums.
  for (int draw = 0; draw < 3; ++draw) {
    if (last >= 0) break;  // uniform: written by thread 0 before a barrier
    totals[lane] = lane_total(walk.rest, args.vocab, lane);
    __syncthreads();
    if (lane == 0) {
      last = sample_with_totals(walk.rest, args.vocab, totals, walk.rest_uniform);
      if (walk.rest.ratio_residual) {
        walk.rest.ratio_residual = false;
      } else {
        walk.rest.n_excluded = 0;
      }
    }
    __syncthreads();
  }
  if (lane != 0) return;
  const int64_t width = commit.n;
  int64_t* row = commit.block + b * width;
  assemble_tree_row(shape, block, candidates, commit.fill + b * width, width, walk, last, stats, row, tree_preds);
  commit_row(commit, b, tree_preds);
  const int64_t accepted = commit.n_accepted[b];
  const bool finished = commit.done[b];
  args.winner[b] = walk.winner;
  for (int64_t j = 0; j < args.n; ++j) args.block[b * args.n + j] = row[j];
  const ProposalPlan plan =
      proposal_plan(true, !commit.chunked || accepted == width || finished, finished, accepted, args.n);
  args.plan[2 * b] = plan.offset;
  args.plan[2 * b + 1] = plan.first;
  const int64_t length = path_length(shape, walk.winner);
  for (int64_t j = 0; j < args.n; ++j) args.draft_sampled[b * args.n + j] = tree_plan_covers(plan, j, args.n, length);
}

__global__ void __launch_bounds__(kThreads) tree_copy_proposals_kernel(SampleTreeLaunch args) {
  const int64_t b = blockIdx.x;
  const int64_t j = blockIdx.y;
  const TreeShape shape{args.n, args.k, args.g};
  const int64_t winner = args.winner[b];
  const ProposalPlan plan{args.plan[2 * b], args.plan[2 * b + 1]};
  if (!tree_plan_covers(plan, j, args.n, path_length(shape, winner))) return;
  const int64_t node = path_node(shape, winner, j + plan.offset);
  const float* source = args.probs + (b * args.nodes + node) * args.vocab;
  float* target = args.proposal + (b * args.n + j) * args.vocab;
  for (int64_t v = threadIdx.x; v < args.vocab; v += kThreads) target[v] = source[v];
}

}  // namespace

cudaError_t launch_sample_tree_verify_and_commit(const SampleTreeLaunch& args, cudaStream_t stream) {
  const int64_t batch = args.commit.batch;
  if (batch == 0) return cudaSuccess;
  tree_nodes_kernel<<<dim3(static_cast<unsigned>(batch), static_cast<unsigned>(args.nodes)), kThreads, 0, stream>>>(
      args);
  cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess) return status;
  const size_t shared = static_cast<size_t>(args.commit.n) * sizeof(int64_t);
  tree_walk_kernel<<<static_cast<unsigned>(batch), kThreads, shared, stream>>>(args);
  status = cudaGetLastError();
  if (status != cudaSuccess) return status;
  tree_copy_proposals_kernel<<<dim3(static_cast<unsigned>(batch), static_cast<unsigned>(args.n)), kThreads, 0,
                               stream>>>(args);
  return cudaGetLastError();
}

}  // namespace jacobi_engine
