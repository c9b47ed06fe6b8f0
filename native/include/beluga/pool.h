// The KV pool: one mapped region shared by many processes (and hosts, over CXL).
//
// Protocol (all calls of one Pool object come from one thread at a time; many processes):
//   lookup_prefix(keys)            how many leading keys are READY; nothing is pinned
//   pin(keys) -> slots             pins the READY prefix so it cannot be evicted; copy out,
//   unpin(slots)                   then unpin (detach or death of the process unpins too)
//   prepare_store(keys) -> slots   reserves a WRITING slot per key not yet present (or
//                                  kDuplicate / kFull); write the bytes, then
//   complete_store(slots, ok)      publishes (READY) or frees them. First writer wins.
// Every call takes the pool lock for a short, bounded critical section (no copies under
// it); copies happen outside it on slots this process owns or has pinned.
#pragma once

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <unordered_set>
#include <vector>

#include "beluga/layout.h"

namespace beluga {

// Typed failures of create/attach and broken invariants (Python maps `kind` to classes).
enum class ErrorKind : int {
  kInvalid = 1,      // bad argument
  kIo = 2,           // open/mmap/ftruncate failed
  kExists = 3,       // create: the file already exists
  kFormat = 4,       // not a Beluga pool, or another format version
  kGeometry = 5,     // slot size / count differ from what the caller expects
  kFingerprint = 6,  // another model's pool
  kCorrupt = 7,      // truncated or scribbled header
  kBusy = 8,         // the lock stayed held by a live process past the timeout
  kNoClientSlot = 9,  // too many attached processes
  kCuda = 10          // GPU path: built without CUDA, no device, or a CUDA call failed
};

class PoolError : public std::runtime_error {
 public:
  PoolError(ErrorKind kind, const std::string& msg) : std::runtime_error(msg), kind_(kind) {}
  ErrorKind kind() const { return kind_; }

 private:
  ErrorKind kind_;
};

// Expected per-key outcomes of prepare_store (slot ids are >= 0).
inline constexpr int64_t kDuplicate = -1;  // present or being written by someone
inline constexpr int64_t kFull = -2;       // every slot is pinned or being written

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
};

struct Stats {
  uint64_t slot_count, slot_size, used_slots, pinned_slots, writing_slots, clients;
  uint64_t hits, misses, inserts, evictions, bytes_in, bytes_out, duplicates, full;
  uint64_t recoveries, reclaimed, generation;
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

class Pool {
 public:
  static std::unique_ptr<Pool> create(const std::string& path, const CreateOptions& opts);
  // expect_* = 0 / "" skip that check.
  static std::unique_ptr<Pool> attach(const std::string& path,
                                      const std::string& expect_fingerprint,
                                      uint64_t expect_slot_size, double wait_init_s,
                                      bool coherence_flush_override, bool prefault);
  ~Pool();
  Pool(const Pool&) = delete;
  Pool& operator=(const Pool&) = delete;

  size_t lookup_prefix(const uint8_t* keys, size_t n);
  std::vector<int64_t> pin(const uint8_t* keys, size_t n);
  void unpin(const std::vector<int64_t>& slots);
  std::vector<int64_t> prepare_store(const uint8_t* keys, size_t n);
  // checksums (optional, one per slot): block_checksum of each block's bytes, kept in its
  // SlotMeta and verified by scatter(verify=true).
  void complete_store(const std::vector<int64_t>& slots, const std::vector<uint64_t>& lengths,
                      bool ok, const std::vector<uint32_t>& checksums = {});
  bool remove(const uint8_t* key);
  size_t sweep();  // reclaim dead clients now; returns how many
  void detach();

  // Copies (no lock). write: into WRITING slots this process owns; read: from pinned slots.
  void write(int64_t slot, const void* src, uint64_t n, uint64_t offset = 0);
  void read(int64_t slot, void* dst, uint64_t n, uint64_t offset = 0);
  // gather returns each written block's checksum (pass them to complete_store).
  std::vector<uint32_t> gather(const std::vector<int64_t>& slots,
                               const std::vector<int64_t>& block_ids,
                               const std::vector<Segment>& segments, int threads);
  // scatter with verify returns the indices (into slots) of blocks whose bytes do not match
  // their stored checksum or are shorter than the segments: the caller must not use them.
  std::vector<int64_t> scatter(const std::vector<int64_t>& slots,
                               const std::vector<int64_t>& block_ids,
                               const std::vector<Segment>& segments, int threads,
                               bool verify = true);
  uint32_t slot_checksum(int64_t slot) const;                 // as stored (0: none)
  uint32_t compute_checksum(int64_t slot, uint64_t n) const;  // of the bytes there now
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
                                    const CudaCopyOptions& opts);

  Stats stats();
  uint8_t* slot_data(int64_t slot) const;
  const PoolHeader& header() const { return *hdr_; }
  uint32_t client_index() const { return client_; }
  std::string path() const { return path_; }
  bool flush_mode() const { return flush_; }
  // Test hooks: die (from Python: os.kill) while holding the lock or mid-write.
  void debug_lock() { lock(); }

 private:
  Pool(std::string path, int fd, uint8_t* base, uint64_t size);
  void claim_client();
  void lock();
  void unlock();
  void acquire_line(const void* p) const;
  // Metadata access under the lock; in flush mode each line is synced (see pool.cpp).
  template <typename T>
  T& line(T& ref) const {
    if (flush_) acquire_line(&ref);
    return ref;
  }
  SlotMeta& slot_at(uint64_t s) const { return line(slots_[s]); }
  uint32_t& bucket(uint64_t b) const { return line(index_[b]); }
  bool client_alive(uint32_t c) const;
  void rebuild();  // under the lock: recompute index, pins, counts from slot states
  int64_t find(const uint8_t* key) const;
  void index_insert(const uint8_t* key, uint32_t slot);
  void index_erase(int64_t at);
  int64_t allocate();
  void check_slot(int64_t slot) const;
  void touch();
  std::vector<int64_t> copy_blocks(const std::vector<int64_t>& slots,
                                   const std::vector<int64_t>& block_ids,
                                   const std::vector<Segment>& segments, int threads,
                                   bool to_pool, bool check);
  uint64_t check_segments(const std::vector<int64_t>& slots, const std::vector<int64_t>& block_ids,
                          const std::vector<Segment>& segments) const;
  std::vector<int64_t> copy_cuda(const std::vector<int64_t>& slots,
                                 const std::vector<int64_t>& block_ids,
                                 const std::vector<Segment>& segments,
                                 const CudaCopyOptions& opts, bool to_pool);

  std::string path_;
  int fd_;
  uint8_t* base_;
  uint64_t size_;
  PoolHeader* hdr_;
  ClientEntry* clients_;
  uint32_t* pins_;
  uint32_t* index_;
  SlotMeta* slots_;
  uint8_t* data_;
  uint64_t mask_;
  uint32_t client_ = UINT32_MAX;
  bool flush_ = false;
  bool locked_ = false;
  uint64_t cuda_base_ = 0;  // device address of base_ once registered with the GPU
  mutable std::unordered_set<uintptr_t> lines_;  // flush mode: lines touched under the lock
};

}  // namespace beluga
