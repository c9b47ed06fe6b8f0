// Every atomic and cache-line operation of the pool goes through here, with its order named.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace beluga::atomics {

// Acquire: everything the previous holder wrote under the lock is visible after this.
inline bool cas_acquire(std::atomic<uint64_t>& word, uint64_t expected, uint64_t desired) {
  return word.compare_exchange_strong(expected, desired, std::memory_order_acquire,
                                      std::memory_order_relaxed);
}

// Release: everything written under the lock is visible before the lock reads free.
inline void store_release(std::atomic<uint64_t>& word, uint64_t value) {
  word.store(value, std::memory_order_release);
}

inline uint64_t load_acquire(const std::atomic<uint64_t>& word) {
  return word.load(std::memory_order_acquire);
}

// Statistics only: no ordering with anything else.
inline void count(std::atomic<uint64_t>& counter, uint64_t n = 1) {
  counter.fetch_add(n, std::memory_order_relaxed);
}

inline void cpu_relax() {
#if defined(__x86_64__)
  _mm_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// coherence=flush. Writers: write back every line of [p, p+n) (clwb keeps it cached), then
// sfence so the write-backs complete before the metadata that publishes them.
// Readers: invalidate the lines (clflushopt) and fence, so the next load reads memory.
__attribute__((target("clwb"))) inline void writeback_clwb(const void* p, size_t n) {
  auto a = reinterpret_cast<uintptr_t>(p) & ~uintptr_t{63};
  const auto end = reinterpret_cast<uintptr_t>(p) + n;
  for (; a < end; a += 64) _mm_clwb(reinterpret_cast<void*>(a));
}

__attribute__((target("clflushopt"))) inline void invalidate_clflushopt(const void* p,
                                                                        size_t n) {
  auto a = reinterpret_cast<uintptr_t>(p) & ~uintptr_t{63};
  const auto end = reinterpret_cast<uintptr_t>(p) + n;
  for (; a < end; a += 64) _mm_clflushopt(reinterpret_cast<void*>(a));
}

inline void store_fence() { _mm_sfence(); }
inline void full_fence() { _mm_mfence(); }

}  // namespace beluga::atomics
