// The Beluga KV pool's shared-memory ABI. Everything a process maps is described here.
//
// Region layout (offsets in the header, every part 4 KiB aligned, data 2 MiB aligned):
//
//   PoolHeader (4 KiB) | ClientEntry[max_clients] | pin table u32[max_clients][max_pins]
//   | index u32[index_capacity] | SlotMeta[slot_count] | data: slot_size x slot_count
//
// Truth and derived state. SlotMeta.state (with key and owner) is the truth. The index,
// the pin counts in SlotMeta and the statistics are derived: after a process dies holding
// the pool lock, the next process to take the lock rebuilds them from slot states and the
// live clients' pin tables (Pool::rebuild). So a crash at any instruction leaves nothing
// locked forever and nothing half-visible: a slot is visible only in state READY, which is
// set after its bytes are complete.
//
// Bump kFormatVersion on any change to these structs or to what they mean (format 2: the
// block checksum of beluga/checksum.h). Attach refuses another version.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>

namespace beluga {

inline constexpr uint64_t kMagic = 0x564B4147554C4542ULL;  // "BELUGAKV" little-endian
inline constexpr uint32_t kFormatVersion = 2;
inline constexpr size_t kCacheLine = 64;
inline constexpr size_t kKeyBytes = 32;
inline constexpr size_t kFingerprintBytes = 32;
inline constexpr size_t kUuidBytes = 16;
inline constexpr size_t kDataAlign = 2u << 20;  // devdax mappings are 2 MiB aligned

// Index bucket values: 0 empty, kTombstone deleted, otherwise slot id + 1.
inline constexpr uint32_t kEmpty = 0;
inline constexpr uint32_t kTombstone = 0xFFFFFFFFu;

enum class SlotState : uint32_t { kFree = 0, kWriting = 1, kReady = 2 };
enum class Coherence : uint32_t { kNone = 0, kFlush = 1 };

// Statistics: monotonic counters, updated with relaxed atomics (any window can be derived).
struct alignas(kCacheLine) PoolStats {
  std::atomic<uint64_t> hits;        // keys found by lookups (counted per key)
  std::atomic<uint64_t> misses;      // lookups that stopped at a missing key
  std::atomic<uint64_t> inserts;     // blocks published (complete_store)
  std::atomic<uint64_t> evictions;   // READY slots reclaimed by CLOCK
  std::atomic<uint64_t> bytes_in;    // bytes copied into the pool
  std::atomic<uint64_t> bytes_out;   // bytes copied out of the pool
  std::atomic<uint64_t> duplicates;  // stores skipped: the key was present or being written
  std::atomic<uint64_t> full;        // stores refused: no evictable slot
  std::atomic<uint64_t> recoveries;  // rebuilds after a dead lock holder
  std::atomic<uint64_t> reclaimed;   // dead clients swept
  std::atomic<uint64_t> reserved[6];
};
static_assert(sizeof(PoolStats) == 2 * kCacheLine);

inline constexpr size_t kChecksumBegin = 8;
inline constexpr size_t kChecksumEnd = 160;

struct alignas(4096) PoolHeader {
  // -- identity and geometry: written once by the creator, magic last ----------------
  std::atomic<uint64_t> magic;  // kMagic once initialised; 0 while the creator writes
  uint32_t version;
  uint32_t header_bytes;
  uint64_t total_bytes;
  uint64_t slot_size;
  uint64_t slot_count;
  uint64_t index_capacity;  // power of two, >= 2 * slot_count
  uint32_t max_clients;
  uint32_t max_pins;  // per client
  uint32_t coherence;
  uint32_t reserved0;
  uint64_t clients_offset;
  uint64_t pins_offset;
  uint64_t index_offset;
  uint64_t slots_offset;
  uint64_t data_offset;
  uint64_t created_unix_ns;
  uint8_t fingerprint[kFingerprintBytes];
  uint8_t uuid[kUuidBytes];
  uint64_t header_checksum;  // FNV-1a 64 of bytes [8, 160): catches a scribbled header
  uint8_t reserved1[256 - 168];

  // -- the pool lock: protects index, SlotMeta and client pin tables ------------------
  // 0 when free; otherwise (client index + 1) << 32 | owner pid. See Pool::lock().
  alignas(kCacheLine) std::atomic<uint64_t> lock_word;
  uint8_t reserved2[kCacheLine - 8];
  // -- mutable shared state (under the lock) -----------------------------------------
  alignas(kCacheLine) uint64_t clock_hand;
  uint64_t used_slots;
  std::atomic<uint64_t> generation;  // +1 per rebuild; readers may compare
  uint8_t reserved3[kCacheLine - 24];
  PoolStats stats;
  uint8_t reserved4[4096 - 384 - sizeof(PoolStats)];
};
static_assert(sizeof(PoolHeader) == 4096);
static_assert(offsetof(PoolHeader, fingerprint) == 112);
static_assert(offsetof(PoolHeader, header_checksum) == 160);
static_assert(offsetof(PoolHeader, lock_word) == 256);
static_assert(offsetof(PoolHeader, clock_hand) == 320);
static_assert(offsetof(PoolHeader, stats) == 384);

// One process attached to the pool. Identified by pid, its start time (so a reused pid is
// not mistaken for the original) and its pid namespace (liveness by pid is checked only in
// the same namespace; elsewhere the lease `last_seen_ns` decides).
struct alignas(kCacheLine) ClientEntry {
  std::atomic<uint32_t> active;  // 1 while attached; claimed with CAS 0 -> 1
  uint32_t pid;
  uint64_t start_ticks;  // /proc/<pid>/stat field 22
  uint64_t pidns;        // inode of /proc/self/ns/pid
  std::atomic<uint64_t> last_seen_ns;  // CLOCK_REALTIME, refreshed on every operation
  uint32_t npins;        // entries used in this client's pin table (under the lock)
  uint32_t reserved0;
  uint64_t attach_generation;
  uint8_t reserved1[kCacheLine - 48];
};
static_assert(sizeof(ClientEntry) == kCacheLine);

// Per-slot metadata: at most 64 bytes, one cache line, so neighbours never false-share.
struct alignas(kCacheLine) SlotMeta {
  uint8_t key[kKeyBytes];
  uint32_t state;     // SlotState
  uint32_t owner;     // client index writing it (kWriting)
  uint32_t pins;      // derived: pin-table entries naming this slot
  uint32_t ref;       // CLOCK reference bit
  uint64_t length;    // bytes stored (<= slot_size)
  uint32_t checksum;  // of the stored bytes (0 when not computed)
  uint32_t reserved;
};
static_assert(sizeof(SlotMeta) == kCacheLine);

}  // namespace beluga
