// The index (open addressing, linear probing, backward-shift deletion) and CLOCK eviction.
// All under the lock. Every bucket value and slot field read is checked before it indexes
// anything, and every loop is bounded by the index capacity or the slot count: a scribble
// can make an operation fail with PoolCorruptError (and mark the pool for rebuild), never
// read out of bounds or spin forever.
#include "beluga/atomics.h"
#include "internal.h"

namespace beluga {

uint32_t Pool::bucket_slot(uint64_t b) const {
  const uint32_t v = atomics::read_once(line(index_[b]));
  if (v == kEmpty) return UINT32_MAX;
  if (v - 1 >= g_.slot_count)
    corrupt("index bucket " + std::to_string(b) + " names slot " + std::to_string(v - 1) +
            " of " + std::to_string(g_.slot_count));
  return v - 1;
}

int64_t Pool::find(const uint8_t* key) const {
  uint64_t b = detail::key_hash(key) & mask_;
  for (uint64_t probes = 0; probes < kMaxProbe && probes <= mask_; ++probes, b = (b + 1) & mask_) {
    const uint32_t s = bucket_slot(b);
    if (s == UINT32_MAX) return -1;
    if (std::memcmp(slot_at(s).key, key, kKeyBytes) == 0) return int64_t(b);
  }
  return -1;  // no entry lies further from its home
}

// Before a batch of finds: start every key's cache misses at once (its home bucket, then
// the slot that bucket names) instead of one key after another. A hint only: a bucket value
// out of range is skipped here and checked, as always, by find. Not with coherence=flush,
// where every line is invalidated before it is read.
void Pool::prefetch_keys(const uint8_t* keys, size_t n) const {
  if (flush_) return;
  for (size_t i = 0; i < n; ++i)
    atomics::prefetch(&index_[detail::key_hash(keys + i * kKeyBytes) & mask_]);
  for (size_t i = 0; i < n; ++i) {
    const uint32_t v = atomics::read_once(index_[detail::key_hash(keys + i * kKeyBytes) & mask_]);
    if (v != kEmpty && v - 1 < g_.slot_count) atomics::prefetch(&slots_[v - 1]);
  }
}

bool Pool::index_insert(const uint8_t* key, uint32_t slot) {
  uint64_t b = detail::key_hash(key) & mask_;
  for (uint64_t probes = 0; probes < kMaxProbe && probes <= mask_; ++probes, b = (b + 1) & mask_) {
    if (atomics::read_once(line(index_[b])) == kEmpty) {
      line(index_[b]) = slot + 1;
      return true;
    }
  }
  return false;
}

void Pool::index_erase(uint64_t at) {
  uint64_t i = at;
  uint64_t j = i;
  for (uint64_t probes = 0;; ++probes) {
    if (probes > mask_) corrupt("the index has no empty bucket");
    j = (j + 1) & mask_;
    const uint32_t s = bucket_slot(j);
    if (s == UINT32_MAX) break;
    const uint64_t home = detail::key_hash(slot_at(s).key) & mask_;
    // Move j back to i unless its home lies cyclically in (i, j].
    const bool in_range = (i <= j) ? (i < home && home <= j) : (i < home || home <= j);
    if (!in_range) {
      line(index_[i]) = s + 1;
      i = j;
    }
  }
  line(index_[i]) = kEmpty;
}

// The bucket that names slot s (a key may have two entries after a crash left a pinned
// duplicate), or -1.
int64_t Pool::bucket_of(const uint8_t* key, uint32_t s) const {
  uint64_t b = detail::key_hash(key) & mask_;
  for (uint64_t probes = 0; probes < kMaxProbe && probes <= mask_; ++probes, b = (b + 1) & mask_) {
    const uint32_t at = bucket_slot(b);
    if (at == UINT32_MAX) return -1;
    if (at == s) return int64_t(b);
  }
  return -1;
}

// A slot leaves the pool: its index entry goes (if it has one), it becomes FREE.
void Pool::free_slot(uint32_t s) {
  SlotMeta& m = slot_at(s);
  const int64_t b = bucket_of(m.key, s);
  if (b >= 0) index_erase(uint64_t(b));
  m.state = uint32_t(SlotState::kFree);
  uint64_t& used = line(hdr_->used_slots);
  used = used > 0 ? used - 1 : 0;
}

// CLOCK: a READY, unpinned slot whose reference bit is clear is evicted; FREE slots first
// come as the hand reaches them. Two sweeps without a candidate: full.
int64_t Pool::allocate() {
  const uint64_t n = g_.slot_count;
  uint64_t hand = atomics::read_once(line(hdr_->clock_hand));
  if (hand >= n) corrupt("the CLOCK hand is " + std::to_string(hand) + " of " + std::to_string(n));
  for (uint64_t step = 0; step < 2 * n + 1; ++step) {
    const uint64_t s = hand;
    hand = (s + 1 == n) ? 0 : s + 1;
    line(hdr_->clock_hand) = hand;
    SlotMeta& m = slot_at(s);
    const uint32_t state = atomics::read_once(m.state);
    if (state == uint32_t(SlotState::kFree)) return int64_t(s);
    if (state != uint32_t(SlotState::kReady)) {
      if (state != uint32_t(SlotState::kWriting))
        corrupt("slot " + std::to_string(s) + " has state " + std::to_string(state));
      continue;
    }
    if (atomics::read_once(m.pins) != 0) continue;
    if (m.ref) {
      m.ref = 0;
      continue;
    }
    const int64_t b = bucket_of(m.key, uint32_t(s));
    if (b < 0) corrupt("READY slot " + std::to_string(s) + " is missing from the index");
    index_erase(uint64_t(b));
    m.state = uint32_t(SlotState::kFree);
    uint64_t& used = line(hdr_->used_slots);
    used = used > 0 ? used - 1 : 0;
    atomics::count(hdr_->stats.evictions);
    return int64_t(s);
  }
  return -1;
}

}  // namespace beluga
