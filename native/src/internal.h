// Helpers shared by the pool's source files (not part of the module's interface).
#pragma once

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <string>

#include "beluga/checksum.h"
#include "beluga/pool.h"

namespace beluga::detail {

[[noreturn]] inline void fail(ErrorKind kind, const std::string& msg) { throw PoolError(kind, msg); }

inline std::string errno_text() { return std::strerror(errno); }

uint64_t now_realtime_ns();
uint64_t now_mono_ns();

ProcessIdentity own_identity();  // computed per call: right after a fork too
uint64_t process_start_ticks(uint32_t pid);

inline uint64_t mix64(uint64_t x) {  // splitmix64 finaliser
  x ^= x >> 30;
  x *= 0xBF58476D1CE4E5B9ULL;
  x ^= x >> 27;
  x *= 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}

// Bucket hash over all 32 key bytes: keys are SHA-256 digests in the product, but the index
// must not degrade into long probe chains when a caller's keys are not uniform.
inline uint64_t key_hash(const uint8_t* key) {
  uint64_t w[4];
  std::memcpy(w, key, sizeof(w));
  return mix64(w[0] ^ mix64(w[1] ^ mix64(w[2] ^ mix64(w[3]))));
}

// The checksum stored with a block: its block checksum (of bytes and length) bound to its
// key, so a block found under another key (a scribbled key, a slot reused under a reader
// whose pin count was scribbled) fails verification like a scribbled byte does.
inline uint32_t bind_key(uint32_t sum, const uint8_t* key) {
  const uint64_t h = key_hash(key);
  const auto bound = uint32_t(sum ^ uint32_t(h) ^ uint32_t(h >> 32));
  return bound == 0 ? 1u : bound;
}

uint64_t header_checksum(const PoolHeader* h);

}  // namespace beluga::detail
