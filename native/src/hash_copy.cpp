// hash_copy (beluga/hash_copy.h): the checksum terms of a run of bytes, copied on the way.
//
// term(w, k) = x ^ (x >> 29), x = (w ^ k * P1) * P2 is a lane-wise function of (w, k), so
// 8 (AVX-512) or 4 (AVX2) words go at once: the k * P1 of each lane is kept in a vector and
// advanced by lanes * P1 (mod 2^64, (k + d) * P1 = k * P1 + d * P1), the words are loaded,
// stored to dst as they are, and their terms added to per-lane accumulators, summed at the
// end (the sum is mod 2^64, so the order does not matter). Four vectors per iteration, each
// with its own accumulator. AVX-512DQ has the 64-bit multiply (vpmullq); AVX2 builds it from
// three 32x32->64 multiplies (the high half of x * P2 is not needed). Bytes past the last
// whole vector go through the scalar code, which is also the whole implementation on CPUs
// (and architectures) without either.
//
// Each vector implementation is compiled for its own target with __attribute__((target)),
// never with -march: the module runs on any x86-64 CPU and takes the widest code it has.
#include "beluga/hash_copy.h"

#include <cstdlib>
#include <cstring>
#include <string>

#include "beluga/checksum.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define BELUGA_X86_DISPATCH 1
// GCC 12 warns about its own _mm512_undefined_epi32 inside the intrinsics (GCC PR 105593).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#endif

#include "beluga/atomics.h"  // after immintrin.h, which it includes, under the pragmas above

namespace beluga {
namespace {

using checksum::kP1;
using checksum::kP2;
using checksum::term;

// The definition, 16 bytes per iteration with two accumulators (two multiplies in flight).
// Also the tail of the vector versions.
template <bool Copy>
inline uint64_t scalar_words(uint8_t* dst, const uint8_t* src, uint64_t n, uint64_t k) {
  uint64_t s0 = 0, s1 = 0, i = 0;
  for (; i + 16 <= n; i += 16, k += 2) {
    uint64_t v[2];
    std::memcpy(v, src + i, 16);
    if constexpr (Copy) std::memcpy(dst + i, v, 16);
    s0 += term(v[0], k);
    s1 += term(v[1], k + 1);
  }
  for (; i + 8 <= n; i += 8, ++k) {
    uint64_t v;
    std::memcpy(&v, src + i, 8);
    if constexpr (Copy) std::memcpy(dst + i, &v, 8);
    s0 += term(v, k);
  }
  // A short last word, zero-padded (little-endian: its bytes in the low end). Kept apart
  // from the loops above: a variable-length copy there costs the main loop its registers.
  if (i < n) {
    uint64_t v = 0;
    std::memcpy(&v, src + i, n - i);
    if constexpr (Copy) std::memcpy(dst + i, &v, n - i);
    s0 += term(v, k);
  }
  return s0 + s1;
}

uint64_t scalar_copy(uint8_t* dst, const uint8_t* src, uint64_t n, uint64_t k) {
  return dst != nullptr ? scalar_words<true>(dst, src, n, k)
                        : scalar_words<false>(nullptr, src, n, k);
}

#ifdef BELUGA_X86_DISPATCH

// Software prefetch distance for src. The hardware prefetchers need a few lines to find a
// stream, so reading a block from DRAM starts slowly; this covers it (measured on EPYC
// Zen 4: +30% for 64 KiB blocks, +5% at 1 MiB). Never past src's end: the next bytes
// belong to some other block, and fetching them costs bandwidth.
constexpr uint64_t kPrefetch = 4096;
// Non-temporal stores (hash_copy_nt) from this many bytes up; below it the store fence and
// the lines' trip to memory cost more than the reads for ownership they save.
constexpr uint64_t kStreamMin = 16384;

// Bytes to copy word by word before dst + i is 64-byte aligned (so that every vector store
// of the streaming loop fills a whole line); only whole words, so only where dst is
// 8-byte aligned (otherwise no streaming).
inline uint64_t stream_head(const uint8_t* dst) {
  return (64 - (reinterpret_cast<uintptr_t>(dst) & 63)) & 63;
}

#define BELUGA_PREFETCH4(p)                                              \
  do {                                                                   \
    _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0);        \
    _mm_prefetch(reinterpret_cast<const char*>(p) + 64, _MM_HINT_T0);   \
    _mm_prefetch(reinterpret_cast<const char*>(p) + 128, _MM_HINT_T0);  \
    _mm_prefetch(reinterpret_cast<const char*>(p) + 192, _MM_HINT_T0);  \
  } while (0)

// ---- AVX-512 (F + DQ): 8 words per vector, 256 bytes per iteration ----------------------

#define BELUGA_AVX512 __attribute__((target("avx512f,avx512dq")))

BELUGA_AVX512 inline __m512i term512(__m512i w, __m512i kp, __m512i p2) {
  const __m512i x = _mm512_mullo_epi64(_mm512_xor_si512(w, kp), p2);
  return _mm512_xor_si512(x, _mm512_srli_epi64(x, 29));
}

template <bool Stream>
BELUGA_AVX512 inline void store512(uint8_t* p, __m512i v) {
  if constexpr (Stream) _mm512_stream_si512(reinterpret_cast<__m512i*>(p), v);
  else _mm512_storeu_si512(p, v);
}

// Copy (when Copy) and hash n bytes; Stream: dst + 0 is 64-byte aligned, stream the stores.
template <bool Copy, bool Stream>
BELUGA_AVX512 uint64_t avx512_words(uint8_t* dst, const uint8_t* src, uint64_t n,
                                    uint64_t k) {
  const __m512i p2 = _mm512_set1_epi64(int64_t(kP2));
  // Lane j of kp0: (k + j) * P1; kp1..kp3 the next three vectors' words.
  const uint64_t b = k * kP1;
  __m512i kp0 = _mm512_set_epi64(int64_t(b + 7 * kP1), int64_t(b + 6 * kP1),
                                 int64_t(b + 5 * kP1), int64_t(b + 4 * kP1),
                                 int64_t(b + 3 * kP1), int64_t(b + 2 * kP1),
                                 int64_t(b + kP1), int64_t(b));
  const __m512i step = _mm512_set1_epi64(int64_t(8 * kP1));
  __m512i kp1 = _mm512_add_epi64(kp0, step);
  __m512i kp2 = _mm512_add_epi64(kp1, step);
  __m512i kp3 = _mm512_add_epi64(kp2, step);
  const __m512i step4 = _mm512_set1_epi64(int64_t(32 * kP1));
  __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
  uint64_t i = 0;
  for (; i + 256 <= n; i += 256) {
    if (i + kPrefetch + 256 <= n) BELUGA_PREFETCH4(src + i + kPrefetch);
    const __m512i v0 = _mm512_loadu_si512(src + i);
    const __m512i v1 = _mm512_loadu_si512(src + i + 64);
    const __m512i v2 = _mm512_loadu_si512(src + i + 128);
    const __m512i v3 = _mm512_loadu_si512(src + i + 192);
    if constexpr (Copy) {
      store512<Stream>(dst + i, v0);
      store512<Stream>(dst + i + 64, v1);
      store512<Stream>(dst + i + 128, v2);
      store512<Stream>(dst + i + 192, v3);
    }
    a0 = _mm512_add_epi64(a0, term512(v0, kp0, p2));
    a1 = _mm512_add_epi64(a1, term512(v1, kp1, p2));
    a2 = _mm512_add_epi64(a2, term512(v2, kp2, p2));
    a3 = _mm512_add_epi64(a3, term512(v3, kp3, p2));
    kp0 = _mm512_add_epi64(kp0, step4);
    kp1 = _mm512_add_epi64(kp1, step4);
    kp2 = _mm512_add_epi64(kp2, step4);
    kp3 = _mm512_add_epi64(kp3, step4);
  }
  for (; i + 64 <= n; i += 64) {
    const __m512i v = _mm512_loadu_si512(src + i);
    if constexpr (Copy) store512<Stream>(dst + i, v);
    a0 = _mm512_add_epi64(a0, term512(v, kp0, p2));
    kp0 = _mm512_add_epi64(kp0, step);
  }
  if constexpr (Stream) atomics::store_fence();  // ordered before whatever publishes the bytes
  a0 = _mm512_add_epi64(_mm512_add_epi64(a0, a1), _mm512_add_epi64(a2, a3));
  alignas(64) uint64_t lanes[8];
  _mm512_store_si512(lanes, a0);
  uint64_t sum = 0;
  for (uint64_t lane : lanes) sum += lane;
  return sum + scalar_words<Copy>(Copy ? dst + i : nullptr, src + i, n - i, k + i / 8);
}

BELUGA_AVX512 uint64_t avx512_copy(uint8_t* dst, const uint8_t* src, uint64_t n, uint64_t k) {
  return dst != nullptr ? avx512_words<true, false>(dst, src, n, k)
                        : avx512_words<false, false>(nullptr, src, n, k);
}

BELUGA_AVX512 uint64_t avx512_copy_nt(uint8_t* dst, const uint8_t* src, uint64_t n,
                                      uint64_t k) {
  if (dst == nullptr) return avx512_words<false, false>(nullptr, src, n, k);
  const uint64_t h = stream_head(dst);
  if (n < kStreamMin || h % 8 != 0) return avx512_words<true, false>(dst, src, n, k);
  return scalar_words<true>(dst, src, h, k) +
         avx512_words<true, true>(dst + h, src + h, n - h, k + h / 8);
}

// ---- AVX2: 4 words per vector, 128 bytes per iteration ----------------------------------

#define BELUGA_AVX2 __attribute__((target("avx2")))

// x * P2 mod 2^64 per lane from 32-bit halves: lo*lo + ((hi*lo + lo*hi) << 32).
BELUGA_AVX2 inline __m256i term256(__m256i w, __m256i kp, __m256i p2lo, __m256i p2hi) {
  const __m256i y = _mm256_xor_si256(w, kp);
  const __m256i ll = _mm256_mul_epu32(y, p2lo);
  const __m256i hl = _mm256_mul_epu32(_mm256_srli_epi64(y, 32), p2lo);
  const __m256i lh = _mm256_mul_epu32(y, p2hi);
  const __m256i x = _mm256_add_epi64(ll, _mm256_slli_epi64(_mm256_add_epi64(hl, lh), 32));
  return _mm256_xor_si256(x, _mm256_srli_epi64(x, 29));
}

template <bool Stream>
BELUGA_AVX2 inline void store256(uint8_t* p, __m256i v) {
  if constexpr (Stream) _mm256_stream_si256(reinterpret_cast<__m256i*>(p), v);
  else _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v);
}

template <bool Copy, bool Stream>
BELUGA_AVX2 uint64_t avx2_words(uint8_t* dst, const uint8_t* src, uint64_t n, uint64_t k) {
  const __m256i p2lo = _mm256_set1_epi64x(int64_t(kP2 & 0xFFFFFFFFu));
  const __m256i p2hi = _mm256_set1_epi64x(int64_t(kP2 >> 32));
  const uint64_t b = k * kP1;
  __m256i kp0 = _mm256_set_epi64x(int64_t(b + 3 * kP1), int64_t(b + 2 * kP1),
                                  int64_t(b + kP1), int64_t(b));
  const __m256i step = _mm256_set1_epi64x(int64_t(4 * kP1));
  __m256i kp1 = _mm256_add_epi64(kp0, step);
  __m256i kp2 = _mm256_add_epi64(kp1, step);
  __m256i kp3 = _mm256_add_epi64(kp2, step);
  const __m256i step4 = _mm256_set1_epi64x(int64_t(16 * kP1));
  __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
  uint64_t i = 0;
  for (; i + 128 <= n; i += 128) {
    if (i % 256 == 0 && i + kPrefetch + 256 <= n) BELUGA_PREFETCH4(src + i + kPrefetch);
    const auto* s = reinterpret_cast<const __m256i*>(src + i);
    const __m256i v0 = _mm256_loadu_si256(s);
    const __m256i v1 = _mm256_loadu_si256(s + 1);
    const __m256i v2 = _mm256_loadu_si256(s + 2);
    const __m256i v3 = _mm256_loadu_si256(s + 3);
    if constexpr (Copy) {
      store256<Stream>(dst + i, v0);
      store256<Stream>(dst + i + 32, v1);
      store256<Stream>(dst + i + 64, v2);
      store256<Stream>(dst + i + 96, v3);
    }
    a0 = _mm256_add_epi64(a0, term256(v0, kp0, p2lo, p2hi));
    a1 = _mm256_add_epi64(a1, term256(v1, kp1, p2lo, p2hi));
    a2 = _mm256_add_epi64(a2, term256(v2, kp2, p2lo, p2hi));
    a3 = _mm256_add_epi64(a3, term256(v3, kp3, p2lo, p2hi));
    kp0 = _mm256_add_epi64(kp0, step4);
    kp1 = _mm256_add_epi64(kp1, step4);
    kp2 = _mm256_add_epi64(kp2, step4);
    kp3 = _mm256_add_epi64(kp3, step4);
  }
  for (; i + 32 <= n; i += 32) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
    if constexpr (Copy) store256<Stream>(dst + i, v);
    a0 = _mm256_add_epi64(a0, term256(v, kp0, p2lo, p2hi));
    kp0 = _mm256_add_epi64(kp0, step);
  }
  if constexpr (Stream) atomics::store_fence();
  a0 = _mm256_add_epi64(_mm256_add_epi64(a0, a1), _mm256_add_epi64(a2, a3));
  const __m128i h = _mm_add_epi64(_mm256_castsi256_si128(a0), _mm256_extracti128_si256(a0, 1));
  const uint64_t sum = uint64_t(_mm_cvtsi128_si64(h)) + uint64_t(_mm_extract_epi64(h, 1));
  return sum + scalar_words<Copy>(Copy ? dst + i : nullptr, src + i, n - i, k + i / 8);
}

BELUGA_AVX2 uint64_t avx2_copy(uint8_t* dst, const uint8_t* src, uint64_t n, uint64_t k) {
  return dst != nullptr ? avx2_words<true, false>(dst, src, n, k)
                        : avx2_words<false, false>(nullptr, src, n, k);
}

BELUGA_AVX2 uint64_t avx2_copy_nt(uint8_t* dst, const uint8_t* src, uint64_t n, uint64_t k) {
  if (dst == nullptr) return avx2_words<false, false>(nullptr, src, n, k);
  const uint64_t h = stream_head(dst);
  if (n < kStreamMin || h % 8 != 0) return avx2_words<true, false>(dst, src, n, k);
  return scalar_words<true>(dst, src, h, k) +
         avx2_words<true, true>(dst + h, src + h, n - h, k + h / 8);
}

#endif  // BELUGA_X86_DISPATCH

using Impl = uint64_t (*)(uint8_t*, const uint8_t*, uint64_t, uint64_t);

struct Choice {
  Impl fn, fn_nt;
  const char* name;
};

// The widest implementation this CPU runs that `want` allows ("" or "avx512": any;
// "avx2": AVX2 or scalar; "scalar": scalar).
Choice choose(const std::string& want) {
  const auto allowed = [&want](const char* name) {
    return want.empty() || want == name || (want == "avx512" && std::strcmp(name, "avx2") == 0);
  };
  (void)allowed;
#ifdef BELUGA_X86_DISPATCH
  __builtin_cpu_init();
  if (allowed("avx512") && __builtin_cpu_supports("avx512f") &&
      __builtin_cpu_supports("avx512dq"))
    return {avx512_copy, avx512_copy_nt, "avx512"};
  if (allowed("avx2") && __builtin_cpu_supports("avx2")) return {avx2_copy, avx2_copy_nt, "avx2"};
#endif
  return {scalar_copy, scalar_copy, "scalar"};
}

Choice& chosen() {
  static Choice c = choose("");  // once (thread-safe static initialisation)
  return c;
}

}  // namespace

const char* hash_copy_force(const std::string& want) {
  chosen() = choose(want);
  return chosen().name;
}

uint64_t hash_copy(uint8_t* dst, const uint8_t* src, uint64_t n, uint64_t k) {
  return chosen().fn(dst, src, n, k);
}

uint64_t hash_copy_nt(uint8_t* dst, const uint8_t* src, uint64_t n, uint64_t k) {
  return chosen().fn_nt(dst, src, n, k);
}

const char* hash_copy_impl() { return chosen().name; }

}  // namespace beluga
