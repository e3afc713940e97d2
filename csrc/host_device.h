// JE_HOST_DEVICE: marks the per-row logic that the CPU ops and the CUDA kernels share.
#pragma once

#if defined(__CUDACC__)
#define JE_HOST_DEVICE __host__ __device__
#else
#define JE_HOST_DEVICE
#endif
