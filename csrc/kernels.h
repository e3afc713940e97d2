// Launchers of the CUDA kernels in kernels.cu. Plain C++ (no torch headers), so the .cu file
// compiles in seconds; ops_cuda.cpp turns tensors into these argument structs.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace jacobi_engine {

enum class ScoreType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kArgmax = 3, kFloat64 = 4 };

struct VerifyLaunch {
  const void* scores;        // logits [B, n, V] (element strides below) or int64 argmax [B, n]
  ScoreType score_type;
  int64_t vocab;             // V (logits only)
  int64_t score_stride_b;    // element strides of scores
  int64_t score_stride_i;
  int64_t* preds_scratch;    // [B * n] argmax results (logits only)
  int32_t* counters;         // [B] zero-initialised arrival counters (per call)
  int64_t* block;            // [B, n] contiguous
  const int64_t* fill;       // [B, n] contiguous
  int32_t* cache_seqlens;    // [B]
  int64_t* tokens;           // [B, W], element strides below
  int64_t tokens_stride_b;
  int64_t tokens_stride_j;
  int64_t tokens_width;      // W: no commit writes at or past it
  int32_t* lengths;          // [B] one past each row's last known token
  bool* done;                // [B]
  const int64_t* eos_ids;    // [n_eos]
  int64_t n_eos;
  int32_t* n_accepted;       // [B] result
  int64_t batch;
  int64_t n;
  const int32_t* limits;     // [B] per-row column limits
  bool chunked;
  int32_t* errors;           // [1] error word (csrc/op_errors.h), ORed into
};

// Enqueues the fused verify-and-commit on `stream`; returns the launch status.
cudaError_t launch_verify_and_commit(const VerifyLaunch& args, cudaStream_t stream);

// move_cache_rows: up to kMaxMoveBuffers cache buffers per launch, passed by value.
constexpr int kMaxMoveBuffers = 64;

struct MoveRowsLaunch {
  void* buffers[kMaxMoveBuffers];      // [B, S, ...] contiguous
  int64_t row_words[kMaxMoveBuffers];  // words per row (word = 4 bytes when word4, else 1 byte)
  int64_t sequence_words[kMaxMoveBuffers];  // words per sequence (S * row_words)
  int64_t capacity[kMaxMoveBuffers];  // S: rows per sequence
  int n_buffers;
  bool word4;
  const int64_t* src;  // [B]
  const int64_t* dst;  // [B]
  int64_t batch;
  int64_t rows;
  int32_t* errors;  // [1] error word: kErrorCacheRows for a sequence whose rows leave the cache
};

cudaError_t launch_move_cache_rows(const MoveRowsLaunch& args, cudaStream_t stream);

// Sampling verify-and-commit (csrc/sampling_verify.h): greedy's commit arguments in `commit`
// (its scores fields unused), plus the distributions, the Philox counter and per-call scratch.
struct SampleVerifyLaunch {
  VerifyLaunch commit;
  const float* probs;            // [B, n, V] contiguous
  float* proposal;               // [B, n, V] contiguous
  bool* draft_sampled;           // [B, n]
  const int32_t* n_fixed;        // [B]
  const int64_t* seed;           // [1]
  const int64_t* sequence_ids;   // [B]
  const int64_t* step;           // [1]
  int64_t vocab;
  bool* slot_accept;             // [B * n] scratch: per-slot decisions
  int64_t* slot_corrective;      // [B * n]
  int64_t* slot_sample;          // [B * n]
  int32_t* counters;             // [B] zero-initialised arrival counters (per call)
  int64_t* plan;                 // [B * 2] scratch: ProposalPlan of each row
};

// Enqueues the two kernels of the sampling verify (decide + commit, then proposal copy).
cudaError_t launch_sample_verify_and_commit(const SampleVerifyLaunch& args, cudaStream_t stream);

// Sampling verify over a token tree (csrc/sampling_verify.h walk_tree): greedy's commit arguments
// in `commit` with the verified row as its block (width W = max(n, g + 1)).
struct SampleTreeLaunch {
  VerifyLaunch commit;           // block = the row [B, W], fill [B, W], n = W
  const float* probs;            // [B, T, V] contiguous, T = n + k * g
  float* proposal;               // [B, n, V] contiguous
  bool* draft_sampled;           // [B, n]
  int64_t* block;                // [B, n]
  const int64_t* candidates;     // [B, k, g]
  const bool* usable;            // [B, k]
  const int32_t* n_fixed;        // [B]
  const int64_t* seed;           // [1]
  const int64_t* sequence_ids;   // [B]
  const int64_t* step;           // [1]
  int64_t n, k, g, nodes, vocab;
  int64_t* winner;               // [B] result
  double* node_total;            // [B * T] scratch: lanes_sum of each node's p
  int64_t* node_sample;          // [B * T] scratch: each node's fresh sample
  double* slot_q_total;          // [B * n] scratch: lanes_sum of the proposal of block slot i + 1
  bool* slot_accept;             // [B * n] scratch: the block draft decisions
  int64_t* slot_corrective;      // [B * n]
  bool* slot_ratio_rest;         // [B * n]: what is left after a rejection is the SJD residual
  double* slot_rest_total;       // [B * n]
  int64_t* plan;                 // [B * 2] scratch: ProposalPlan of each row
};

// Enqueues the three kernels of the tree sampling verify (nodes, walk + commit, proposal copy).
cudaError_t launch_sample_tree_verify_and_commit(const SampleTreeLaunch& args, cudaStream_t stream);

}  // namespace jacobi_engine
