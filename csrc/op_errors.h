// The ops' error word: bits an op ORs into its int32 `errors` tensor when a value that only the device
// sees breaks the op's contract. The op never indexes out of bounds with such a value: it clamps the
// value, or leaves the row untouched, and raises the bit; jacobi_engine.ops.raise_if_error (called at
// the engine's host syncs) turns the bits into a ValueError naming the argument. The CPU ops see the
// values on the host and raise directly instead, before writing anything.
#pragma once

#include <cstdint>

namespace jacobi_engine {

constexpr uint32_t kErrorLimits = 1u << 0;       // limits[b] outside [0, tokens.size(1)]: clamped into it
constexpr uint32_t kErrorLengths = 1u << 1;      // lengths[b] outside [0, limits[b]]: the row is left as it is
constexpr uint32_t kErrorBlockTokens = 1u << 2;  // a draft block[b, j] (j >= 1) outside [0, V): rejected
constexpr uint32_t kErrorCandidates = 1u << 3;   // a usable candidates[b, m, i] outside [0, V): never chosen
constexpr uint32_t kErrorCacheRows = 1u << 4;    // move_cache_rows: rows outside the cache, or moving forward
                                                 // over themselves: the sequence is left as it is

}  // namespace jacobi_engine
