// Every atomic access, memory order, fence and cache-line flush of the pool is spelled here,
// and only here: the other files say what they need (acquire the lock, read a shared value
// once, write lines back) and this file says how.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace beluga::atomics {

// -- the lock word ---------------------------------------------------------------------
// Acquire: everything the previous holder wrote under the lock is visible after this.
inline bool cas_acquire(std::atomic<uint64_t>& word, uint64_t expected, uint64_t desired) {
  return word.compare_exchange_strong(expected, desired, std::memory_order_acquire,
                                      std::memory_order_relaxed);
}

// Release by compare-and-swap: only the holder's own token is replaced by 0. False when the
// word holds another token (the lock was taken over: this holder's lease had expired).
inline bool cas_release(std::atomic<uint64_t>& word, uint64_t expected, uint64_t desired) {
  return word.compare_exchange_strong(expected, desired, std::memory_order_release,
                                      std::memory_order_relaxed);
}

// -- claims (client entries): the claimer's later writes must not move before the CAS ----
inline bool cas_acq_rel(std::atomic<uint64_t>& word, uint64_t expected, uint64_t desired) {
  return word.compare_exchange_strong(expected, desired, std::memory_order_acq_rel,
                                      std::memory_order_relaxed);
}

// Publication: everything written before is visible to whoever acquires `value`.
template <typename T>
inline void store_release(std::atomic<T>& word, T value) {
  word.store(value, std::memory_order_release);
}

template <typename T>
inline T load_acquire(const std::atomic<T>& word) {
  return word.load(std::memory_order_acquire);
}

// Values whose order with other memory does not matter (statistics, lease stamps, flags
// read under the lock, which orders them already).
template <typename T>
inline T load_relaxed(const std::atomic<T>& word) {
  return word.load(std::memory_order_relaxed);
}

template <typename T>
inline void store_relaxed(std::atomic<T>& word, T value) {
  word.store(value, std::memory_order_relaxed);
}

inline void count(std::atomic<uint64_t>& counter, uint64_t n = 1) {
  counter.fetch_add(n, std::memory_order_relaxed);
}

inline void set_bits(std::atomic<uint32_t>& word, uint32_t bits) {
  word.fetch_or(bits, std::memory_order_relaxed);
}

// One load of a plain shared field, exactly once: another process may change it at any
// time, so a value that was checked must be the value that is used (no re-load by the
// compiler between the check and the use).
template <typename T>
inline T read_once(const T& field) {
  return __atomic_load_n(&field, __ATOMIC_RELAXED);
}

inline void cpu_relax() {
#if defined(__x86_64__)
  _mm_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// -- coherence=flush ----------------------------------------------------------------
// Writers write back every line of [p, p+n) (clwb keeps it cached; clflushopt or clflush
// where clwb is missing), then fence so the write-backs complete before the metadata that
// publishes them. Readers invalidate the lines and fence, so the next load reads memory.
#if defined(__x86_64__)
namespace detail {
inline bool cpu_has(int bit) {
  unsigned a = 7, b = 0, c = 0, d = 0;
  __asm__ volatile("cpuid" : "+a"(a), "=b"(b), "+c"(c), "=d"(d));
  return (b >> bit) & 1u;
}
inline const bool kHasClwb = cpu_has(24);
inline const bool kHasClflushopt = cpu_has(23);

__attribute__((target("clwb"))) inline void clwb_lines(uintptr_t a, uintptr_t end) {
  for (; a < end; a += 64) _mm_clwb(reinterpret_cast<void*>(a));
}
__attribute__((target("clflushopt"))) inline void clflushopt_lines(uintptr_t a, uintptr_t end) {
  for (; a < end; a += 64) _mm_clflushopt(reinterpret_cast<void*>(a));
}
inline void clflush_lines(uintptr_t a, uintptr_t end) {
  for (; a < end; a += 64) _mm_clflush(reinterpret_cast<void*>(a));
}
}  // namespace detail

inline void writeback_nofence(const void* p, size_t n) {
  const auto a = reinterpret_cast<uintptr_t>(p) & ~uintptr_t{63};
  const auto end = reinterpret_cast<uintptr_t>(p) + n;
  if (detail::kHasClwb) detail::clwb_lines(a, end);
  else if (detail::kHasClflushopt) detail::clflushopt_lines(a, end);
  else detail::clflush_lines(a, end);
}
inline void store_fence() { _mm_sfence(); }
inline void full_fence() { _mm_mfence(); }
inline void invalidate(const void* p, size_t n) {
  const auto a = reinterpret_cast<uintptr_t>(p) & ~uintptr_t{63};
  const auto end = reinterpret_cast<uintptr_t>(p) + n;
  if (detail::kHasClflushopt) detail::clflushopt_lines(a, end);
  else detail::clflush_lines(a, end);
  full_fence();
}
#else
// Other architectures: no flush instructions wired yet; the fences keep their ordering.
inline void writeback_nofence(const void*, size_t) {}
inline void store_fence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void full_fence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void invalidate(const void*, size_t) { full_fence(); }
#endif

// A hint to bring a line into this core's cache: no ordering, no effect on what is read.
inline void prefetch(const void* p) { __builtin_prefetch(p, 0, 3); }

inline void writeback(const void* p, size_t n) {
  writeback_nofence(p, n);
  store_fence();
}

}  // namespace beluga::atomics
