// The block checksum (pool format 2), shared by the CPU code and the GPU copy kernel.
//
// A block of n bytes is read as little-endian 64-bit words w_0 .. w_{m-1}, m = ceil(n / 8),
// the last one zero-padded. Its checksum is
//
//     S = sum over k of term(w_k, k)  (mod 2^64),   term(w, k) = x ^ (x >> 29),
//                                                   x = (w ^ k * P1) * P2
//
// folded with n to 32 bits by checksum_finish (never 0, which means "no checksum").
// A sum of per-word terms: any split of the block (GPU threads, copy segments, chunks) adds
// up to the same value, so the GPU computes it while it copies, at no cost to the host, and
// the CPU in one pass at memory speed. For each position k, term is a bijection of w (an odd
// multiplier and a xor-shift), so changing any one word always changes S; a word moved to
// another position changes its term. A pure function of the bytes: the same in every
// process, host and device. It guards against torn, misplaced or scribbled blocks, not
// against an adversary.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define BELUGA_HD __host__ __device__ __forceinline__
#else
#define BELUGA_HD inline
#endif

namespace beluga::checksum {

inline constexpr uint64_t kP1 = 0x9E3779B185EBCA87ULL;
inline constexpr uint64_t kP2 = 0xC2B2AE3D27D4EB4FULL;
inline constexpr uint64_t kP3 = 0x165667B19E3779F9ULL;

BELUGA_HD uint64_t term(uint64_t word, uint64_t k) {
  const uint64_t x = (word ^ (k * kP1)) * kP2;
  return x ^ (x >> 29);
}

BELUGA_HD uint32_t finish(uint64_t sum, uint64_t n) {
  uint64_t h = sum ^ (n * kP3);
  h ^= h >> 33;
  h *= kP2;
  h ^= h >> 29;
  h *= kP3;
  h ^= h >> 32;
  const auto folded = uint32_t(h ^ (h >> 32));
  return folded == 0 ? 1u : folded;
}

}  // namespace beluga::checksum
