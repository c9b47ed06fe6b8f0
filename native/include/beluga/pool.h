// The KV pool: one mapped region shared by many processes (and hosts, over CXL).
//
// Protocol (all calls of one Pool object come from one thread at a time; many processes):
//   lookup_prefix(keys)            how many leading keys are READY; nothing is pinned
//   pin(keys) -> slots             pins the READY prefix so it cannot be evicted; copy out,
//   unpin(slots)                   then unpin (detach or death of the process unpins too)
//   prepare_store(keys)            reserves a WRITING slot per key not yet present (or says
//                                  kDuplicate / kFull); write the bytes, then
//   complete_store(slots, ok)      publishes (READY) or frees them. First writer wins.
// Every call takes the pool lock for a short, bounded critical section (no copies under
// it); copies happen outside it on slots this handle reserved or pinned, and each handle
// remembers (in its own memory) which slots those are and under which keys, so a
// scribbled slot can neither be written by mistake nor verified against the wrong key.
//
// Where the parts live: region.cpp (map, create, attach, build sweep, detach), lock.cpp
// (clients, the lock, liveness, rebuild), index.cpp (index and CLOCK eviction), ops.cpp
// (the operations above), copy.cpp (copies and checksums, CPU and GPU).
//
// Expected outcomes (a miss, a full pool, a duplicate key, a lock that stayed busy) are
// data: Outcome. Exceptions (PoolError) are for bad arguments, corrupt or foreign pools,
// a closed handle and failed system calls.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include "beluga/layout.h"

namespace beluga {

enum class ErrorKind : int {
  kInvalid = 1,       // bad argument
  kIo = 2,            // open/mmap/ftruncate failed
  kExists = 3,        // create: the file already exists
  kFormat = 4,        // not a Beluga pool, or another format version
  kGeometry = 5,      // slot size / count differ from what the caller expects
  kFingerprint = 6,   // another model's pool
  kCorrupt = 7,       // a value in the mapping is out of bounds (the pool is marked)
  kBusy = 8,          // the lock stayed held by a live process past the timeout
  kNoClientSlot = 9,  // too many attached processes
  kCuda = 10,         // GPU path: built without CUDA, no device, or a CUDA call failed
  kClosed = 11,       // the handle was closed
  kPermission = 12,   // the file is not ours: owner, mode, symlink, not a regular file
};

class PoolError : public std::runtime_error {
 public:
  PoolError(ErrorKind kind, const std::string& msg) : std::runtime_error(msg), kind_(kind) {}
  ErrorKind kind() const { return kind_; }

 private:
  ErrorKind kind_;
};

// What became of one call or one key.
enum class Outcome : uint8_t {
  kOk = 0,         // done (a slot reserved, pinned, published...)
  kDuplicate = 1,  // prepare_store: the key is present or being written by someone
  kFull = 2,       // prepare_store: every slot is pinned or being written
  kBusy = 3,       // the lock stayed held past this handle's timeout; nothing was done
};

struct Reservation {
  Outcome outcome;
  uint32_t slot;  // meaningful when outcome == kOk
};

template <typename T>
struct Result {
  Outcome outcome;
  T value;
};

struct CreateOptions {
  uint64_t slot_size = 0;
  uint64_t slot_count = 0;
  std::string fingerprint;  // up to 32 bytes
  Coherence coherence = Coherence::kNone;
  uint32_t max_clients = 64;
  uint32_t max_pins = 16384;
  int numa_node = -1;  // bind the memory to this node (CXL shows up as a CPU-less node)
  bool prefault = true;  // MAP_POPULATE (skipped with numa_node: pages must be placed first)
  uint32_t mode = 0600;
  uint32_t lease_ms = 30'000;
};

// Per-handle settings of create and attach (not shared).
struct HandleOptions {
  double lock_timeout_s = 5.0;  // a lock held longer by a live process: Outcome::kBusy
  int64_t trusted_gid = -1;     // attach: also accept files of this group (e.g. a devdax group)
};

struct Stats {
  uint64_t slot_count, slot_size, used_slots, pinned_slots, writing_slots, clients;
  uint64_t hits, misses, inserts, evictions, bytes_in, bytes_out, duplicates, full;
  uint64_t recoveries, reclaimed, generation, corrupt, busy;
};

// One contiguous piece of a block in the engine's KV cache: `bytes` at
// base + block_id * block_stride. A block's slot holds its segments back to back.
struct Segment {
  uint64_t base;
  uint64_t block_stride;
  uint64_t bytes;
};

// How a GPU copy runs. The copy kernel also computes each block's checksum (a sum of
// per-word terms, beluga/checksum.h), so the host does no hashing, when every segment but
// the last is whole 8-byte words (KV segments always are). Otherwise, or with `host_hash`,
// the blocks are copied in chunks of about `chunk_bytes` (one kernel each; 0: one kernel
// for the whole call) and each chunk is hashed on the CPU as soon as its copy has finished,
// by up to `threads` threads, while the GPU copies the chunks after it.
struct CudaCopyOptions {
  int device = 0;        // the GPU the segments' device pointers live on
  uint64_t stream = 0;   // a cudaStream_t (0: the legacy default stream)
  int threads = 4;       // host hashing: threads hashing finished chunks
  uint64_t chunk_bytes = 4ull << 20;
  bool host_hash = false;
};

// Checksum of a block's bytes (beluga/checksum.h; 32 bits, never 0).
uint32_t block_checksum(const uint8_t* p, uint64_t n);

using Key = std::array<uint8_t, kKeyBytes>;

// A process as its client entry records it (lock.cpp says how liveness is judged).
struct ProcessIdentity {
  uint32_t pid = 0;
  uint64_t start_ticks = 0;  // /proc/<pid>/stat field 22 (0: unreadable)
  uint64_t pidns = 0;        // inode of /proc/self/ns/pid (0: unreadable)
  uint64_t host = 0;         // hash of /proc/sys/kernel/random/boot_id (0: unreadable)
};

class Pool {
 public:
  static std::unique_ptr<Pool> create(const std::string& path, const CreateOptions& opts,
                                      const HandleOptions& handle = {});
  // expect_* = 0 / "" skip that check.
  static std::unique_ptr<Pool> attach(const std::string& path,
                                      const std::string& expect_fingerprint,
                                      uint64_t expect_slot_size, double wait_init_s,
                                      bool coherence_flush_override, bool prefault,
                                      const HandleOptions& handle = {});
  ~Pool();
  Pool(const Pool&) = delete;
  Pool& operator=(const Pool&) = delete;

  Result<size_t> lookup_prefix(const uint8_t* keys, size_t n);
  Result<std::vector<uint32_t>> pin(const uint8_t* keys, size_t n);
  // Never busy for the caller: what cannot be unpinned now is unpinned by the next call
  // that gets the lock (or by detach, or by this process's death).
  void unpin(const std::vector<int64_t>& slots);
  Result<std::vector<Reservation>> prepare_store(const uint8_t* keys, size_t n);
  // lengths: bytes stored per slot (empty: slot_size). checksums (empty: computed now from
  // the slot): block_checksum of each block's bytes as gather / write returned them; they
  // are bound to the slot's key when stored. Busy: the slots are freed later, not published.
  Outcome complete_store(const std::vector<int64_t>& slots, const std::vector<uint64_t>& lengths,
                         bool ok, const std::vector<uint32_t>& checksums = {});
  Result<bool> remove(const uint8_t* key);
  Result<size_t> sweep();  // reclaim dead clients now; returns how many
  void detach();
  bool closed() const { return base_ == nullptr; }

  // Copies (no lock). write: into slots this handle reserved; read: from slots it pinned.
  // write returns the block checksum of the bytes written when they are a whole block
  // (offset 0), to pass to complete_store; read_verified copies a pinned block and says
  // whether its bytes match the checksum stored with it under the key it was pinned by.
  uint32_t write(int64_t slot, const void* src, uint64_t n, uint64_t offset = 0);
  void read(int64_t slot, void* dst, uint64_t n, uint64_t offset = 0);
  bool read_verified(int64_t slot, void* dst, uint64_t n);
  // gather returns each written block's checksum (pass them to complete_store).
  std::vector<uint32_t> gather(const std::vector<int64_t>& slots,
                               const std::vector<int64_t>& block_ids,
                               const std::vector<Segment>& segments, int threads);
  // scatter with verify returns the indices (into slots) of blocks whose bytes do not match
  // their stored checksum or are shorter than the segments: the caller must not use them.
  // `keys` (slots.size() x 32 bytes, or nullptr) are the keys the slots were pinned by,
  // where another handle pinned them (vLLM's scheduler pins, its worker copies); without
  // them every slot must be pinned by this handle, which remembers its keys.
  std::vector<int64_t> scatter(const std::vector<int64_t>& slots,
                               const std::vector<int64_t>& block_ids,
                               const std::vector<Segment>& segments, int threads,
                               bool verify = true, const uint8_t* keys = nullptr);
  uint32_t slot_checksum(int64_t slot) const;                 // as stored (bound to the key)
  uint32_t compute_checksum(int64_t slot, uint64_t n) const;  // of the bytes there now
  // Bytes stored in a pinned slot; PoolError(kCorrupt) when the value is out of bounds.
  uint64_t slot_length(int64_t slot) const;

  // GPU path (native/include/beluga/cuda_copy.h). Segment bases are device pointers on
  // `device`; the pool side is read and written by the GPU through the registered mapping.
  // Registration happens on first use (or explicitly) and is undone by detach().
  static bool cuda_built();
  static int cuda_device_count();
  void cuda_register();
  bool cuda_registered() const { return cuda_base_ != 0; }
  // Same results as gather / scatter(verify=true); checksums computed by the copy kernel or
  // on the CPU (see CudaCopyOptions).
  std::vector<uint32_t> gather_cuda(const std::vector<int64_t>& slots,
                                    const std::vector<int64_t>& block_ids,
                                    const std::vector<Segment>& segments,
                                    const CudaCopyOptions& opts);
  std::vector<int64_t> scatter_cuda(const std::vector<int64_t>& slots,
                                    const std::vector<int64_t>& block_ids,
                                    const std::vector<Segment>& segments,
                                    const CudaCopyOptions& opts, const uint8_t* keys = nullptr);

  Stats stats() const;  // without the lock: counters and a racy census of the slots
  uint8_t* slot_data(int64_t slot) const;
  const Geometry& geometry() const;
  const PoolHeader& header() const;
  // Identity as checked at create/attach (private copies: the mapping may be scribbled).
  const std::array<uint8_t, kFingerprintBytes>& fingerprint() const { return fingerprint_; }
  const std::array<uint8_t, kUuidBytes>& uuid() const { return uuid_; }
  uint32_t client_index() const { return client_; }
  std::string path() const { return path_; }
  bool flush_mode() const { return flush_; }
  void set_lock_timeout(double seconds);
  // Test hooks: take the lock and keep it (from Python: os.kill the process, or stop it);
  // release it again (false: the lock was taken over meanwhile).
  bool debug_lock();
  bool debug_unlock();

 private:
  struct Pinned {
    Key key;
    uint32_t count;
  };
  // A slot this handle reserved, and the checksum of the last whole block it copied in
  // (write at offset 0, gather): of the bytes as they were copied, so a scribble on the
  // slot before complete_store is not sealed by a checksum computed from the slot.
  struct Reserved {
    Key key;
    uint64_t length = 0;
    uint32_t sum = 0;  // 0: nothing copied in as a whole block yet
  };

  Pool(std::string path, int fd, uint8_t* base, const Geometry& g, const HandleOptions& h);
  void live() const;  // PoolError(kClosed) after detach
  // Clients and the lock (lock.cpp).
  void claim_client();
  bool lock();  // false: busy past the handle's timeout
  bool lock_within(uint64_t timeout_ns);  // 0: one round of spins, then give up
  void unlock();
  [[noreturn]] void corrupt(const std::string& what) const;  // mark, unlock if held, throw
  void mark_rebuild() const;  // kNeedsRebuild: the next process to lock rebuilds
  void acquire_line(const void* p) const;
  // Metadata access under the lock; in flush mode each line is synced (see lock.cpp).
  template <typename T>
  T& line(T& ref) const {
    if (flush_) acquire_line(&ref);
    return ref;
  }
  SlotMeta& slot_at(uint64_t s) const { return line(slots_[s]); }
  // The slot a bucket names, checked; kEmpty -> UINT32_MAX.
  uint32_t bucket_slot(uint64_t b) const;
  bool client_alive(uint32_t c, uint64_t token_nonce, bool check_nonce) const;
  void rebuild();  // under the lock: recompute index, pins, counts from slot states
  void settle();   // under the lock: deferred unpins and aborts of this handle
  // Index and eviction (index.cpp).
  int64_t find(const uint8_t* key) const;
  void prefetch_keys(const uint8_t* keys, size_t n) const;  // hint for the next finds
  int64_t bucket_of(const uint8_t* key, uint32_t s) const;
  bool index_insert(const uint8_t* key, uint32_t slot);  // false: no bucket within kMaxProbe
  void index_erase(uint64_t at);
  int64_t allocate();
  void reserve(const uint8_t* keys, size_t n, std::vector<Reservation>& out);
  void pin_locked(const uint8_t* keys, size_t n, std::vector<uint32_t>& out);
  void free_slot(uint32_t s);  // under the lock: index entry gone, FREE, used count
  // Copies (copy.cpp).
  void check_slot(int64_t slot) const;
  const Key* pinned_key(int64_t slot) const;
  bool verify(int64_t slot, const uint8_t* key, uint64_t n, uint32_t sum) const;
  std::vector<int64_t> copy_blocks(const std::vector<int64_t>& slots,
                                   const std::vector<int64_t>& block_ids,
                                   const std::vector<Segment>& segments, int threads,
                                   bool to_pool, bool check, const uint8_t* keys);
  // Checks a copy's arguments; returns the bytes per block and, for a copy out of the pool,
  // the key each slot is verified against.
  uint64_t check_segments(const std::vector<int64_t>& slots, const std::vector<int64_t>& block_ids,
                          const std::vector<Segment>& segments, bool to_pool,
                          const uint8_t* keys, std::vector<const uint8_t*>* verify_keys) const;
  std::vector<int64_t> copy_cuda(const std::vector<int64_t>& slots,
                                 const std::vector<int64_t>& block_ids,
                                 const std::vector<Segment>& segments,
                                 const CudaCopyOptions& opts, bool to_pool, const uint8_t* keys);
  void touch();
  void remember(const std::vector<int64_t>& slots, const std::vector<Segment>& segments,
                const std::vector<uint32_t>& sums);

  std::string path_;
  int fd_;
  uint8_t* base_;
  Geometry g_;  // checked at attach; never re-read from the mapping
  std::array<uint8_t, kFingerprintBytes> fingerprint_{};
  std::array<uint8_t, kUuidBytes> uuid_{};
  PoolHeader* hdr_;
  ClientEntry* clients_;
  uint32_t* pins_;
  uint32_t* index_;
  SlotMeta* slots_;
  uint8_t* data_;
  uint64_t mask_;
  uint64_t lease_ns_;
  uint64_t lock_timeout_ns_;
  uint32_t client_ = UINT32_MAX;
  uint64_t token_ = 0;  // (client_ + 1) << 32 | nonce
  bool flush_ = false;
  bool locked_ = false;
  bool lost_ = false;  // our lease expired while we held the lock: re-claim a client entry
  ProcessIdentity me_{};  // as recorded in our client entry
  uint64_t cuda_base_ = 0;  // device address of base_ once registered with the GPU
  std::unordered_map<uint32_t, Pinned> pinned_;  // slots this handle pinned, by its keys
  std::unordered_map<uint32_t, Reserved> reserved_;  // slots this handle reserved (WRITING)
  std::vector<std::pair<uint32_t, Key>> deferred_unpins_;  // unpins that met a busy lock
  std::vector<uint32_t> deferred_aborts_;        // reservations to free at the next lock
  mutable std::unordered_set<uintptr_t> lines_;  // flush mode: lines touched under the lock
};

}  // namespace beluga
