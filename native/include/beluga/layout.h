// The Beluga KV pool's shared-memory ABI: every struct a process maps, the limits on every
// size, and the arithmetic that places the parts (overflow-checked: a header names sizes
// that come from another process and are untrusted until checked here).
//
// Region layout (offsets in the header, every part 4 KiB aligned, data 2 MiB aligned):
//
//   PoolHeader (4 KiB) | ClientEntry[max_clients] | pin table u32[max_clients][max_pins]
//   | index u32[index_capacity] | SlotMeta[slot_count] | data: slot_size x slot_count
//
// Truth and derived state. SlotMeta (state, key, owner, length, checksum) is the truth. The
// index, the pin counts in SlotMeta, used_slots and the clock hand are derived: after a
// process dies holding the pool lock, or after any process finds a value out of bounds
// (it sets kNeedsRebuild), the next process to take the lock rebuilds them from the slot
// states and the live clients' pin tables (Pool::rebuild, lock.cpp). So a crash at any
// instruction leaves nothing locked forever and nothing half-visible: a slot is visible
// only in state READY, set after its bytes are complete.
//
// Untrusted contents. Any process can scribble any byte of the mapping. Each process keeps
// its own copy of the geometry (checked once at attach, Geometry below) and never reads
// sizes or offsets from the mapping again; every value it does read (clock hand, bucket,
// slot state, owner, length, pin count, pin-table entry, lock token, client entry) is
// checked before it indexes, sizes or bounds a loop. Blocks carry a checksum that binds
// their key, length and bytes (beluga/checksum.h): a scribbled block is never returned.
//
// Bump kFormatVersion on any change to these structs or to what they mean. Format 3:
// client entries carry a host identity and a lock nonce; checksums bind the key; the
// header carries the lease and a rebuild flag. Attach refuses another version.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>

namespace beluga {

inline constexpr uint64_t kMagic = 0x564B4147554C4542ULL;  // "BELUGAKV" little-endian
inline constexpr uint32_t kFormatVersion = 3;
inline constexpr size_t kCacheLine = 64;
inline constexpr size_t kKeyBytes = 32;
inline constexpr size_t kFingerprintBytes = 32;
inline constexpr size_t kUuidBytes = 16;
inline constexpr uint64_t kPageAlign = 4096;
inline constexpr uint64_t kDataAlign = 2u << 20;  // devdax mappings are 2 MiB aligned

// Limits. Every size in a header is checked against these before any arithmetic.
inline constexpr uint64_t kMaxSlotCount = (1ULL << 31) - 1;  // bucket values are slot + 1
inline constexpr uint64_t kMaxSlotSize = 1ULL << 34;         // 16 GiB per block
inline constexpr uint32_t kMaxClients = 4096;
inline constexpr uint32_t kMaxPins = 1u << 20;              // per client
inline constexpr uint64_t kMaxTotalBytes = 1ULL << 52;       // 4 PiB
inline constexpr uint32_t kMinLeaseMs = 100;
inline constexpr uint32_t kMaxLeaseMs = 3'600'000;

// Index bucket values: 0 empty, otherwise slot id + 1 (deletion shifts entries back, so
// there are no tombstones).
inline constexpr uint32_t kEmpty = 0;
// No entry sits more than kMaxProbe buckets past its home: inserts (and rebuilds) that
// would go further refuse the key (a full outcome; in a rebuild the block is dropped), so
// a lookup probes at most kMaxProbe buckets. At the index's load (<= 1/2) a random key
// needs more with probability far below 2^-64; keys crafted to collide (by a process that
// writes the file) cost a lookup or a rebuild at most kMaxProbe probes each, not O(n).
// Backward-shift deletion only moves entries toward their home, so the bound holds.
inline constexpr uint64_t kMaxProbe = 128;

enum class SlotState : uint32_t { kFree = 0, kWriting = 1, kReady = 2 };
enum class Coherence : uint32_t { kNone = 0, kFlush = 1 };

// Header flags (PoolHeader::flags).
inline constexpr uint32_t kNeedsRebuild = 1;  // a value was found out of bounds: rebuild

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
  std::atomic<uint64_t> recoveries;  // rebuilds (dead lock holder or a corrupt value)
  std::atomic<uint64_t> reclaimed;   // dead clients swept
  std::atomic<uint64_t> corrupt;     // values found out of bounds (each marks a rebuild)
  std::atomic<uint64_t> busy;        // calls that gave up on the lock
  std::atomic<uint64_t> reserved[4];
};
static_assert(sizeof(PoolStats) == 2 * kCacheLine);

// The header checksum covers the identity and geometry, bytes [kChecksumBegin, kChecksumEnd).
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
  uint32_t lease_ms;  // liveness of clients in another pid namespace or on another host
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
  // 0 when free; otherwise the holder's token (lock.cpp): (client index + 1) << 32 | nonce.
  alignas(kCacheLine) std::atomic<uint64_t> lock_word;
  uint8_t reserved2[kCacheLine - 8];
  // -- mutable shared state (under the lock; all derived, all checked when read) ------
  alignas(kCacheLine) uint64_t clock_hand;
  uint64_t used_slots;
  std::atomic<uint64_t> generation;  // +1 per rebuild; readers may compare
  std::atomic<uint32_t> flags;       // kNeedsRebuild
  uint8_t reserved3[kCacheLine - 28];
  PoolStats stats;
  uint8_t reserved4[4096 - 384 - sizeof(PoolStats)];
};
static_assert(sizeof(PoolHeader) == 4096);
static_assert(offsetof(PoolHeader, fingerprint) == 112);
static_assert(offsetof(PoolHeader, header_checksum) == 160);
static_assert(offsetof(PoolHeader, lock_word) == 256);
static_assert(offsetof(PoolHeader, clock_hand) == 320);
static_assert(offsetof(PoolHeader, flags) == 344);
static_assert(offsetof(PoolHeader, stats) == 384);

// ClientEntry::state: 0 free; otherwise (claim time in ms << 2) | kClaiming or kLive. A
// process claims a free (or dead) entry with one CAS, writes its identity, then publishes
// kLive; only then does it ever take the lock. An entry left kClaiming (its process died
// between the two) is reclaimed once its claim time is kClaimTimeoutMs old.
inline constexpr uint64_t kClientClaiming = 1;
inline constexpr uint64_t kClientLive = 2;
inline constexpr uint64_t kClientStateMask = 3;
inline constexpr uint64_t kClaimTimeoutMs = 10'000;

// One process attached to the pool, with the identity that decides whether it is alive:
// same host (boot_id) and same pid namespace: by pid and start time (a reused pid has
// another start time); anywhere else: by the lease (last_seen_ns younger than lease_ms).
struct alignas(kCacheLine) ClientEntry {
  std::atomic<uint64_t> state;
  uint32_t pid;
  uint32_t nonce;        // random per attach, nonzero; the low half of its lock token
  uint64_t start_ticks;  // /proc/<pid>/stat field 22
  uint64_t pidns;        // inode of /proc/self/ns/pid
  uint64_t host;         // hash of /proc/sys/kernel/random/boot_id
  std::atomic<uint64_t> last_seen_ns;  // CLOCK_REALTIME, refreshed on every operation
  uint32_t npins;        // entries used in this client's pin table (under the lock)
  uint32_t reserved0;
  uint64_t reserved1;
};
static_assert(sizeof(ClientEntry) == kCacheLine);

// Per-slot metadata: one cache line, so neighbours never false-share.
struct alignas(kCacheLine) SlotMeta {
  uint8_t key[kKeyBytes];
  uint32_t state;        // SlotState
  uint32_t owner;        // client index writing it (kWriting)
  uint32_t pins;         // derived: pin-table entries naming this slot
  uint32_t ref;          // CLOCK reference bit
  uint64_t length;       // bytes stored (<= slot_size)
  uint32_t checksum;     // checksum::bind(block checksum, key); never 0 once READY
  uint32_t owner_nonce;  // the writing client's nonce (kWriting): a reused entry is not it
};
static_assert(sizeof(SlotMeta) == kCacheLine);

// The geometry a process trusts: computed from (slot_size, slot_count, max_clients,
// max_pins) with every product and sum checked, then compared with a header's offsets.
struct Geometry {
  uint64_t slot_size = 0, slot_count = 0, index_capacity = 0;
  uint32_t max_clients = 0, max_pins = 0;
  uint64_t clients = 0, pins = 0, index = 0, slots = 0, data = 0, total = 0;
};

namespace layout {

inline bool add(uint64_t a, uint64_t b, uint64_t* out) { return !__builtin_add_overflow(a, b, out); }
inline bool mul(uint64_t a, uint64_t b, uint64_t* out) { return !__builtin_mul_overflow(a, b, out); }
inline bool align_up(uint64_t v, uint64_t a, uint64_t* out) {
  uint64_t t;
  if (!add(v, a - 1, &t)) return false;
  *out = t / a * a;
  return true;
}

// Why the sizes cannot make a pool, or nullptr. Limits first, so no product below wraps.
inline const char* check_sizes(uint64_t slot_size, uint64_t slot_count, uint32_t max_clients,
                               uint32_t max_pins) {
  if (slot_size == 0 || slot_size % kCacheLine != 0 || slot_size > kMaxSlotSize)
    return "slot_size must be a positive multiple of 64, at most 16 GiB";
  if (slot_count == 0 || slot_count > kMaxSlotCount)
    return "slot_count must be between 1 and 2^31 - 1";
  if (max_clients == 0 || max_clients > kMaxClients) return "max_clients must be 1..4096";
  if (max_pins == 0 || max_pins > kMaxPins) return "max_pins must be 1..2^20";
  return nullptr;
}

// Fills g; false when any part overflows or the total exceeds kMaxTotalBytes.
inline bool compute(uint64_t slot_size, uint64_t slot_count, uint32_t max_clients,
                    uint32_t max_pins, Geometry* g) {
  if (check_sizes(slot_size, slot_count, max_clients, max_pins) != nullptr) return false;
  Geometry l;
  l.slot_size = slot_size;
  l.slot_count = slot_count;
  l.max_clients = max_clients;
  l.max_pins = max_pins;
  l.index_capacity = 1;
  while (l.index_capacity < 2 * slot_count) l.index_capacity <<= 1;  // slot_count < 2^31
  uint64_t t;
  l.clients = sizeof(PoolHeader);
  bool ok = mul(max_clients, sizeof(ClientEntry), &t) && add(l.clients, t, &t) &&
            align_up(t, kPageAlign, &l.pins) &&
            mul(uint64_t(max_clients) * max_pins, 4, &t) && add(l.pins, t, &t) &&
            align_up(t, kPageAlign, &l.index) &&
            mul(l.index_capacity, 4, &t) && add(l.index, t, &t) &&
            align_up(t, kPageAlign, &l.slots) &&
            mul(slot_count, sizeof(SlotMeta), &t) && add(l.slots, t, &t) &&
            align_up(t, kDataAlign, &l.data) &&
            mul(slot_size, slot_count, &t) && add(l.data, t, &t) &&
            align_up(t, kDataAlign, &l.total) && l.total <= kMaxTotalBytes;
  if (ok) *g = l;
  return ok;
}

}  // namespace layout
}  // namespace beluga
