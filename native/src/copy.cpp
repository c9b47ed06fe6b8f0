// Copies between the pool and callers' memory, and the block checksums that guard them.
// No lock: a handle copies only into slots it reserved and out of slots it pinned (both
// remembered in its own memory), after checking every offset and size with overflow-checked
// arithmetic. What it copies out is verified against the checksum stored with the block,
// bound to the key the handle pinned it by.
#include <unistd.h>

#include <algorithm>
#include <thread>

#include "beluga/atomics.h"
#include "beluga/hash_copy.h"
#include "internal.h"
#ifdef BELUGA_WITH_CUDA
#include "beluga/cuda_copy.h"
#endif

namespace beluga {

using detail::fail;

namespace {

// The checksum terms (beluga/checksum.h) of n bytes at src, the first byte being word k of
// its block, copying them to dst on the way when Copy: one pass over the data, vectorised
// (beluga/hash_copy.h). Where n is not whole words the last word is zero-padded, so that is
// only right at a block's end.
template <bool Copy>
uint64_t hash_words(uint8_t* dst, const uint8_t* src, uint64_t n, uint64_t k) {
  return hash_copy(Copy ? dst : nullptr, src, n, k);
}

// Whether every segment but the last is whole words, so each starts a word of the block
// and its terms can be computed on their own (while copying, on the CPU or the GPU).
bool words_aligned(const std::vector<Segment>& segs) {
  for (size_t j = 0; j + 1 < segs.size(); ++j)
    if (segs[j].bytes % 8 != 0) return false;
  return true;
}

// Calls that copy out more than this go around the caller's cache (non-temporal stores),
// as copies into the pool always do: more than a core's L2 would not stay there anyway, and
// the destination (an engine's KV blocks, taken from a large cache) is rarely cached, so
// ordinary stores would first read every line from memory. Smaller calls keep the blocks
// in cache for the forward pass that reads them next.
uint64_t stream_out_bytes() {
  static const uint64_t bytes = [] {
    const long l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
    return l2 > 0 ? uint64_t(l2) : uint64_t{1} << 20;
  }();
  return bytes;
}

// copy_blocks/copy_cuda results: per-block checksums (gather) or failure flags (scatter).
std::vector<uint32_t> as_checksums(const std::vector<int64_t>& sums) {
  return std::vector<uint32_t>(sums.begin(), sums.end());
}
std::vector<int64_t> failed_positions(const std::vector<int64_t>& flags) {
  std::vector<int64_t> failed;
  for (size_t i = 0; i < flags.size(); ++i)
    if (flags[i]) failed.push_back(int64_t(i));
  return failed;
}

}  // namespace

uint32_t block_checksum(const uint8_t* p, uint64_t n) {
  return checksum::finish(hash_words<false>(nullptr, p, n, 0), n);
}

void Pool::check_slot(int64_t slot) const {
  live();
  if (slot < 0 || uint64_t(slot) >= g_.slot_count)
    fail(ErrorKind::kInvalid, "slot " + std::to_string(slot) + " is out of range (the pool has " +
                                  std::to_string(g_.slot_count) + ")");
}

const Key* Pool::pinned_key(int64_t slot) const {
  auto it = pinned_.find(uint32_t(slot));
  return it == pinned_.end() ? nullptr : &it->second.key;
}

// Whether the n bytes with block checksum `sum` are what the writer of `key` stored here.
bool Pool::verify(int64_t slot, const uint8_t* key, uint64_t n, uint32_t sum) const {
  const SlotMeta& m = slots_[slot];
  if (flush_) atomics::invalidate(&m, sizeof(m));
  const uint64_t length = atomics::read_once(m.length);
  const uint32_t stored = atomics::read_once(m.checksum);
  return key != nullptr && length == n && stored != 0 &&
         stored == detail::bind_key(sum, key);
}

uint8_t* Pool::slot_data(int64_t slot) const {
  check_slot(slot);
  return data_ + uint64_t(slot) * g_.slot_size;
}

uint64_t Pool::slot_length(int64_t slot) const {
  check_slot(slot);
  if (flush_) atomics::invalidate(&slots_[slot], sizeof(SlotMeta));
  const uint64_t n = atomics::read_once(slots_[slot].length);
  if (n > g_.slot_size)
    corrupt("slot " + std::to_string(slot) + " claims " + std::to_string(n) +
            " bytes; slots hold " + std::to_string(g_.slot_size));
  return n;
}

namespace {
void check_span(uint64_t n, uint64_t offset, uint64_t slot_size, const char* what) {
  if (n > slot_size || offset > slot_size - n)
    fail(ErrorKind::kInvalid, std::string(what) + " of " + std::to_string(n) + " bytes at offset " +
                                  std::to_string(offset) + " is beyond the slot (" +
                                  std::to_string(slot_size) + " bytes)");
}
}  // namespace

uint32_t Pool::write(int64_t slot, const void* src, uint64_t n, uint64_t offset) {
  check_slot(slot);
  auto mine = reserved_.find(uint32_t(slot));
  if (mine == reserved_.end())
    fail(ErrorKind::kInvalid, "slot " + std::to_string(slot) + " is not reserved by this handle "
                                                               "(prepare_store it first)");
  check_span(n, offset, g_.slot_size, "a write");
  uint8_t* dst = data_ + uint64_t(slot) * g_.slot_size + offset;
  uint32_t sum = 0;
  if (offset == 0) {
    sum = checksum::finish(hash_copy_nt(dst, static_cast<const uint8_t*>(src), n, 0), n);
    mine->second.sum = sum;
    mine->second.length = n;
  } else {
    std::memcpy(dst, src, n);
    mine->second.sum = 0;  // written piecewise: complete_store needs the caller's checksum
  }
  if (flush_) atomics::writeback(dst, n);
  return sum;
}

void Pool::read(int64_t slot, void* dst, uint64_t n, uint64_t offset) {
  check_slot(slot);
  if (pinned_key(slot) == nullptr)
    fail(ErrorKind::kInvalid, "slot " + std::to_string(slot) + " is not pinned by this handle");
  check_span(n, offset, g_.slot_size, "a read");
  const uint8_t* src = data_ + uint64_t(slot) * g_.slot_size + offset;
  if (flush_) atomics::invalidate(src, n);
  std::memcpy(dst, src, n);
  atomics::count(hdr_->stats.bytes_out, n);
}

bool Pool::read_verified(int64_t slot, void* dst, uint64_t n) {
  check_slot(slot);
  const Key* key = pinned_key(slot);
  if (key == nullptr)
    fail(ErrorKind::kInvalid, "slot " + std::to_string(slot) + " is not pinned by this handle");
  check_span(n, 0, g_.slot_size, "a read");
  const uint8_t* src = data_ + uint64_t(slot) * g_.slot_size;
  if (flush_) atomics::invalidate(src, n);
  const uint64_t terms = hash_words<true>(static_cast<uint8_t*>(dst), src, n, 0);
  atomics::count(hdr_->stats.bytes_out, n);
  return verify(slot, key->data(), n, checksum::finish(terms, n));
}

uint64_t Pool::check_segments(const std::vector<int64_t>& slots,
                              const std::vector<int64_t>& block_ids,
                              const std::vector<Segment>& segs, bool to_pool,
                              const uint8_t* keys,
                              std::vector<const uint8_t*>* verify_keys) const {
  live();
  if (slots.size() != block_ids.size())
    fail(ErrorKind::kInvalid, "slots and block_ids differ in length");
  uint64_t per_block = 0;
  for (const auto& s : segs)
    if (!layout::add(per_block, s.bytes, &per_block) || per_block > g_.slot_size)
      fail(ErrorKind::kInvalid, "the segments hold more bytes per block than a slot (" +
                                    std::to_string(g_.slot_size) + ")");
  if (verify_keys != nullptr) verify_keys->assign(slots.size(), nullptr);
  for (size_t i = 0; i < slots.size(); ++i) {
    const int64_t s = slots[i];
    check_slot(s);
    if (to_pool) {
      if (reserved_.count(uint32_t(s)) == 0)
        fail(ErrorKind::kInvalid, "slot " + std::to_string(s) + " is not reserved by this handle");
      continue;
    }
    const Key* mine = pinned_key(s);
    const uint8_t* key = keys != nullptr ? keys + i * kKeyBytes
                                         : (mine != nullptr ? mine->data() : nullptr);
    if (key == nullptr)
      fail(ErrorKind::kInvalid, "slot " + std::to_string(s) +
                                    " is not pinned by this handle (pass the keys it was "
                                    "pinned by)");
    if (verify_keys != nullptr) (*verify_keys)[i] = key;
  }
  for (int64_t b : block_ids) {
    if (b < 0) fail(ErrorKind::kInvalid, "negative block id " + std::to_string(b));
    for (const auto& seg : segs) {
      uint64_t at, end;
      if (!layout::mul(uint64_t(b), seg.block_stride, &at) || !layout::add(at, seg.base, &at) ||
          !layout::add(at, seg.bytes, &end))
        fail(ErrorKind::kInvalid, "block " + std::to_string(b) +
                                      " lies beyond the address space (base + id x stride wraps)");
    }
  }
  return per_block;
}

std::vector<int64_t> Pool::copy_blocks(const std::vector<int64_t>& slots,
                                      const std::vector<int64_t>& block_ids,
                                      const std::vector<Segment>& segs, int threads,
                                      bool to_pool, bool check, const uint8_t* expect) {
  std::vector<const uint8_t*> keys;
  const uint64_t per_block = check_segments(slots, block_ids, segs, to_pool, expect, &keys);
  const size_t n = slots.size();
  // gather: the checksum of each written block; scatter: 1 where verification failed.
  std::vector<int64_t> out(check ? n : 0, 0);
  // Hash while copying when every segment but the last is whole words (each then starts a
  // word of the block). Otherwise each block goes through a private buffer, hashed as it
  // is copied to or from the slot: the checksum is always of exactly the bytes that reached
  // the other side, never of a second read of the slot (which a writer could change back).
  const bool fused = words_aligned(segs);
  const bool stream = to_pool || n * per_block > stream_out_bytes();
  auto work = [&](size_t lo, size_t hi) {
    std::vector<uint8_t> bounce(check && !fused ? per_block : 0);
    for (size_t i = lo; i < hi; ++i) {
      uint8_t* slot = data_ + uint64_t(slots[i]) * g_.slot_size;
      if (!to_pool && flush_) atomics::invalidate(slot, per_block);
      uint64_t terms = 0;
      if (check && !fused && !to_pool) terms = hash_copy(bounce.data(), slot, per_block, 0);
      uint64_t off = 0;
      for (const auto& seg : segs) {
        auto* engine = reinterpret_cast<uint8_t*>(seg.base + uint64_t(block_ids[i]) * seg.block_stride);
        uint8_t* pool_side = check && !fused ? bounce.data() + off : slot + off;
        uint8_t* dst = to_pool ? pool_side : engine;
        const uint8_t* src = to_pool ? engine : pool_side;
        // Into the pool: non-temporal stores (the block is not read here again soon); out
        // of it, for calls larger than stream_out_bytes().
        if (check && fused)
          terms += stream ? hash_copy_nt(dst, src, seg.bytes, off / 8)
                          : hash_copy(dst, src, seg.bytes, off / 8);
        else std::memcpy(dst, src, seg.bytes);
        off += seg.bytes;
      }
      if (check && !fused && to_pool) terms = hash_copy_nt(slot, bounce.data(), per_block, 0);
      if (check) {
        const uint32_t sum = checksum::finish(terms, per_block);
        out[i] = to_pool ? int64_t(sum) : (verify(slots[i], keys[i], per_block, sum) ? 0 : 1);
      }
      if (to_pool && flush_) atomics::writeback(slot, per_block);
    }
  };
  size_t t = size_t(std::max(1, threads));
  if (n * per_block < (8u << 20)) t = 1;  // small batches: threads cost more than they give
  t = std::min(t, n);
  if (t <= 1) {
    work(0, n);
  } else {
    std::vector<std::thread> pool;
    size_t chunk = (n + t - 1) / t;
    for (size_t k = 0; k < t; ++k) {
      size_t lo = k * chunk, hi = std::min(n, lo + chunk);
      if (lo < hi) pool.emplace_back(work, lo, hi);
    }
    for (auto& th : pool) th.join();
  }
  if (!to_pool) atomics::count(hdr_->stats.bytes_out, n * per_block);
  return out;
}

std::vector<uint32_t> Pool::gather(const std::vector<int64_t>& slots,
                                   const std::vector<int64_t>& block_ids,
                                   const std::vector<Segment>& segments, int threads) {
  auto sums = as_checksums(copy_blocks(slots, block_ids, segments, threads, true, true, nullptr));
  remember(slots, segments, sums);
  return sums;
}

// The checksums of blocks just copied into reserved slots, for a complete_store that is
// not given them.
void Pool::remember(const std::vector<int64_t>& slots, const std::vector<Segment>& segments,
                    const std::vector<uint32_t>& sums) {
  uint64_t per_block = 0;
  for (const auto& s : segments) per_block += s.bytes;  // checked by check_segments
  for (size_t i = 0; i < slots.size() && i < sums.size(); ++i) {
    auto it = reserved_.find(uint32_t(slots[i]));
    if (it == reserved_.end()) continue;
    it->second.sum = sums[i];
    it->second.length = per_block;
  }
}

std::vector<int64_t> Pool::scatter(const std::vector<int64_t>& slots,
                                   const std::vector<int64_t>& block_ids,
                                   const std::vector<Segment>& segments, int threads,
                                   bool verify, const uint8_t* keys) {
  return failed_positions(copy_blocks(slots, block_ids, segments, threads, false, verify, keys));
}

uint32_t Pool::slot_checksum(int64_t slot) const {
  check_slot(slot);
  if (flush_) atomics::invalidate(&slots_[slot], sizeof(SlotMeta));
  return atomics::read_once(slots_[slot].checksum);
}

uint32_t Pool::compute_checksum(int64_t slot, uint64_t n) const {
  check_slot(slot);
  check_span(n, 0, g_.slot_size, "a checksum");
  const uint8_t* p = data_ + uint64_t(slot) * g_.slot_size;
  if (flush_) atomics::invalidate(p, n);
  return block_checksum(p, n);
}

// ---- GPU path -----------------------------------------------------------------------------

#ifdef BELUGA_WITH_CUDA
bool Pool::cuda_built() { return true; }
int Pool::cuda_device_count() { return cuda::device_count(); }

void Pool::cuda_register() {
  live();
  if (cuda_base_ != 0) return;
  if (cuda::device_count() == 0) fail(ErrorKind::kCuda, "no CUDA device is visible");
  std::string e = cuda::register_host(base_, g_.total);
  if (!e.empty())
    fail(ErrorKind::kCuda, e + " registering the pool " + path_ +
                               " (a GPU can pin shared memory, hugetlbfs or device-dax mappings, "
                               "not a file on a disk filesystem)");
  uint64_t dev = 0;
  e = cuda::device_pointer(base_, &dev);
  if (!e.empty()) {
    cuda::unregister_host(base_);
    fail(ErrorKind::kCuda, e);
  }
  cuda_base_ = dev;
}

std::vector<int64_t> Pool::copy_cuda(const std::vector<int64_t>& slots,
                                    const std::vector<int64_t>& block_ids,
                                    const std::vector<Segment>& segs,
                                    const CudaCopyOptions& opts, bool to_pool,
                                    const uint8_t* expect) {
  std::vector<const uint8_t*> keys;
  const uint64_t per_block = check_segments(slots, block_ids, segs, to_pool, expect, &keys);
  if (opts.threads < 1) fail(ErrorKind::kInvalid, "threads must be at least 1");
  cuda_register();
  const size_t n = slots.size();
  // Flush mode: drop this CPU's cached lines of the slots first: a dirty line written back
  // later would overwrite what the GPU wrote, a stale one would hide it from the CPU.
  // The GPU hashes when every segment starts a word of the block (all but the last are
  // whole words).
  const bool gpu_hash = !opts.host_hash && words_aligned(segs);
  std::vector<cuda::CopyDesc> descs;
  descs.reserve(n * segs.size());
  for (size_t i = 0; i < n; ++i) {
    const uint64_t slot_off = g_.data + uint64_t(slots[i]) * g_.slot_size;
    if (flush_) atomics::invalidate(base_ + slot_off, per_block);
    uint64_t off = 0;
    for (const auto& seg : segs) {
      const uint64_t engine = seg.base + uint64_t(block_ids[i]) * seg.block_stride;
      const uint64_t pool = cuda_base_ + slot_off + off;
      if (to_pool) descs.push_back({engine, pool, seg.bytes, off / 8, i});
      else descs.push_back({pool, engine, seg.bytes, off / 8, i});
      off += seg.bytes;
    }
  }
  // gather: each block's checksum; scatter: 1 where the block's bytes as read do not match.
  std::vector<int64_t> out(n);
  auto verdict = [&](size_t i, uint32_t sum) {
    out[i] = to_pool ? int64_t(sum) : (verify(slots[i], keys[i], per_block, sum) ? 0 : 1);
  };
  if (gpu_hash && per_block > 0) {
    // The sums are of the bytes the GPU moved: for scatter, exactly what the engine got.
    std::vector<uint64_t> sums(n);
    std::string e = cuda::copy_hashed(descs.data(), descs.size(), n, opts.device, opts.stream,
                                      sums.data());
    if (!e.empty()) fail(ErrorKind::kCuda, e);
    for (size_t i = 0; i < n; ++i) verdict(i, checksum::finish(sums[i], per_block));
  } else {
    // Chunks of whole blocks, hashed on the CPU reading the pool after the chunk's kernel
    // (as copy_blocks: scatter hashes what the GPU has already read). Calls under 8 MiB
    // are one chunk.
    size_t per_chunk = n;
    if (opts.chunk_bytes > 0 && n * per_block >= (8u << 20))
      per_chunk = size_t(std::max<uint64_t>(1, opts.chunk_bytes / std::max<uint64_t>(1, per_block)));
    std::vector<size_t> chunk_ends;
    for (size_t hi = per_chunk;; hi += per_chunk) {
      chunk_ends.push_back(std::min(n, hi) * segs.size());
      if (hi >= n) break;
    }
    auto check = [&](size_t chunk) {
      for (size_t i = chunk * per_chunk, end = std::min(n, i + per_chunk); i < end; ++i) {
        uint8_t* slot = data_ + uint64_t(slots[i]) * g_.slot_size;
        if (flush_) atomics::invalidate(slot, per_block);
        verdict(i, block_checksum(slot, per_block));
      }
    };
    if (descs.empty() || per_block == 0) {
      for (size_t c = 0; c < chunk_ends.size(); ++c) check(c);
    } else {
      std::string e = cuda::copy(descs.data(), descs.size(), chunk_ends, opts.device,
                                 opts.stream, opts.threads, check);
      if (!e.empty()) fail(ErrorKind::kCuda, e);
    }
  }
  if (!to_pool) atomics::count(hdr_->stats.bytes_out, n * per_block);
  return out;
}
#else
bool Pool::cuda_built() { return false; }
int Pool::cuda_device_count() { return 0; }
void Pool::cuda_register() {
  live();
  fail(ErrorKind::kCuda, "beluga_native was built without CUDA (no nvcc at build time)");
}
std::vector<int64_t> Pool::copy_cuda(const std::vector<int64_t>& slots,
                                    const std::vector<int64_t>& block_ids,
                                    const std::vector<Segment>& segs,
                                    const CudaCopyOptions& opts, bool to_pool,
                                    const uint8_t* expect) {
  check_segments(slots, block_ids, segs, to_pool, expect, nullptr);
  if (opts.threads < 1) fail(ErrorKind::kInvalid, "threads must be at least 1");
  cuda_register();
  return {};
}
#endif

std::vector<uint32_t> Pool::gather_cuda(const std::vector<int64_t>& slots,
                                        const std::vector<int64_t>& block_ids,
                                        const std::vector<Segment>& segments,
                                        const CudaCopyOptions& opts) {
  auto sums = as_checksums(copy_cuda(slots, block_ids, segments, opts, true, nullptr));
  remember(slots, segments, sums);
  return sums;
}

std::vector<int64_t> Pool::scatter_cuda(const std::vector<int64_t>& slots,
                                        const std::vector<int64_t>& block_ids,
                                        const std::vector<Segment>& segments,
                                        const CudaCopyOptions& opts, const uint8_t* keys) {
  return failed_positions(copy_cuda(slots, block_ids, segments, opts, false, keys));
}

}  // namespace beluga
