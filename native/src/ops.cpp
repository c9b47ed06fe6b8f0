// The operations: lookup, pin/unpin, prepare/complete a store, remove, statistics. Each
// takes the lock for a short critical section bounded by its arguments and the geometry;
// a lock that stays busy past the handle's timeout is Outcome::kBusy, with nothing done.
#include <unistd.h>

#include <algorithm>

#include "beluga/atomics.h"
#include "internal.h"

namespace beluga {

using detail::fail;

Result<size_t> Pool::lookup_prefix(const uint8_t* keys, size_t n) {
  live();
  if (!lock()) return {Outcome::kBusy, 0};
  size_t i = 0;
  for (; i < n; ++i) {
    const int64_t b = find(keys + i * kKeyBytes);
    if (b < 0) break;
    const uint32_t s = bucket_slot(uint64_t(b));
    if (atomics::read_once(slot_at(s).state) != uint32_t(SlotState::kReady)) break;
  }
  unlock();
  touch();
  if (lost_) return {Outcome::kBusy, 0};
  atomics::count(hdr_->stats.hits, i);
  if (i < n) atomics::count(hdr_->stats.misses);
  return {Outcome::kOk, i};
}

Result<std::vector<uint32_t>> Pool::pin(const uint8_t* keys, size_t n) {
  live();
  std::vector<uint32_t> out;
  out.reserve(std::min<size_t>(n, g_.max_pins));
  if (!lock()) return {Outcome::kBusy, {}};
  try {
    pin_locked(keys, n, out);
  } catch (const PoolError&) {  // a corrupt value midway: what was pinned is unpinned later
    for (uint32_t s : out) {
      auto it = pinned_.find(s);
      if (it == pinned_.end()) continue;
      deferred_unpins_.emplace_back(s, it->second.key);
      if (--it->second.count == 0) pinned_.erase(it);
    }
    throw;
  }
  unlock();
  touch();
  if (lost_) return {Outcome::kBusy, {}};
  return {Outcome::kOk, std::move(out)};
}

void Pool::pin_locked(const uint8_t* keys, size_t n, std::vector<uint32_t>& out) {
  ClientEntry& me = clients_[client_];
  uint32_t* table = pins_ + uint64_t(client_) * g_.max_pins;
  uint32_t npins = atomics::read_once(line(me.npins));
  if (npins > g_.max_pins)
    corrupt("client " + std::to_string(client_) + " has " + std::to_string(npins) + " pins");
  prefetch_keys(keys, std::min<size_t>(n, g_.max_pins - npins));
  for (size_t i = 0; i < n && npins < g_.max_pins; ++i) {
    const uint8_t* key = keys + i * kKeyBytes;
    const int64_t b = find(key);
    if (b < 0) break;
    const uint32_t s = bucket_slot(uint64_t(b));
    SlotMeta& m = slot_at(s);
    if (atomics::read_once(m.state) != uint32_t(SlotState::kReady)) break;
    const uint32_t pins = atomics::read_once(m.pins);
    if (pins == UINT32_MAX) corrupt("slot " + std::to_string(s) + " has 2^32 - 1 pins");
    line(table[npins++]) = s + 1;
    line(me.npins) = npins;
    m.pins = pins + 1;
    m.ref = 1;
    auto& mine = pinned_[s];
    if (mine.count == 0) std::memcpy(mine.key.data(), key, kKeyBytes);
    mine.count++;
    out.push_back(s);
  }
}

void Pool::unpin(const std::vector<int64_t>& slots) {
  live();
  for (int64_t s : slots) check_slot(s);
  for (int64_t s : slots) {
    auto it = pinned_.find(uint32_t(s));
    if (it == pinned_.end()) continue;  // not pinned by this handle: nothing to undo
    deferred_unpins_.emplace_back(uint32_t(s), it->second.key);
    if (--it->second.count == 0) pinned_.erase(it);
  }
  if (deferred_unpins_.empty()) return;
  // No waiting: settle() does the work if the lock is free now; if not, the next call that
  // gets the lock does (a release must never stall its caller on a busy pool).
  if (lock_within(0)) {
    unlock();
    touch();
  }
}

Result<std::vector<Reservation>> Pool::prepare_store(const uint8_t* keys, size_t n) {
  live();
  std::vector<Reservation> out(n, Reservation{Outcome::kFull, 0});
  if (!lock()) return {Outcome::kBusy, {}};
  try {
    reserve(keys, n, out);
  } catch (const PoolError&) {  // a corrupt value midway: what was reserved is freed later
    for (const auto& r : out)
      if (r.outcome == Outcome::kOk && reserved_.erase(r.slot)) deferred_aborts_.push_back(r.slot);
    throw;
  }
  unlock();
  touch();
  if (lost_) {
    reserved_.clear();
    return {Outcome::kBusy, {}};
  }
  return {Outcome::kOk, std::move(out)};
}

void Pool::reserve(const uint8_t* keys, size_t n, std::vector<Reservation>& out) {
  prefetch_keys(keys, n);
  for (size_t i = 0; i < n; ++i) {
    const uint8_t* key = keys + i * kKeyBytes;
    if (find(key) >= 0) {
      out[i].outcome = Outcome::kDuplicate;
      atomics::count(hdr_->stats.duplicates);
      continue;
    }
    const int64_t s = allocate();
    if (s < 0) {
      atomics::count(hdr_->stats.full, n - i);
      break;
    }
    SlotMeta& m = slot_at(uint64_t(s));
    if (!index_insert(key, uint32_t(s))) {
      // Its home's neighbourhood is full: never by chance at this load, so the index was
      // written over (or keys were crafted to collide). Refused now; a rebuild next.
      m.state = uint32_t(SlotState::kFree);
      atomics::count(hdr_->stats.full);
      atomics::count(hdr_->stats.corrupt);
      mark_rebuild();
      continue;
    }
    std::memcpy(m.key, key, kKeyBytes);
    m.owner = client_;
    m.owner_nonce = uint32_t(token_);
    m.pins = 0;
    m.ref = 0;
    m.length = 0;
    m.checksum = 0;
    m.state = uint32_t(SlotState::kWriting);  // after the key: rebuild trusts key + state
    line(hdr_->used_slots)++;
    std::memcpy(reserved_[uint32_t(s)].key.data(), key, kKeyBytes);
    out[i] = {Outcome::kOk, uint32_t(s)};
  }
}

Outcome Pool::complete_store(const std::vector<int64_t>& slots,
                             const std::vector<uint64_t>& lengths, bool ok,
                             const std::vector<uint32_t>& checksums) {
  live();
  if (uint32_t(getpid()) != me_.pid) reserved_.clear();  // inherited across fork: the parent's
  if (!lengths.empty() && lengths.size() != slots.size())
    fail(ErrorKind::kInvalid, "lengths must match slots");
  if (!checksums.empty() && checksums.size() != slots.size())
    fail(ErrorKind::kInvalid, "checksums must match slots");
  for (int64_t s : slots) check_slot(s);
  for (uint64_t len : lengths)
    if (len > g_.slot_size)
      fail(ErrorKind::kInvalid, "length " + std::to_string(len) + " exceeds the slot size " +
                                    std::to_string(g_.slot_size));
  // What this handle publishes: its own reservations only, each with the checksum of its
  // bytes (computed now, outside the lock, where the caller has none).
  struct Publish {
    uint32_t slot;
    Key key;
    uint64_t length;
    uint32_t sum;
  };
  std::vector<Publish> work;
  work.reserve(slots.size());
  for (size_t i = 0; i < slots.size(); ++i) {
    auto it = reserved_.find(uint32_t(slots[i]));
    if (it == reserved_.end()) continue;
    Publish p{uint32_t(slots[i]), it->second.key, lengths.empty() ? g_.slot_size : lengths[i], 0};
    if (ok) {
      // The caller's checksum, else the one taken as the block was copied in, else (bytes
      // written piecewise) one computed from the slot now.
      if (!checksums.empty() && checksums[i] != 0) p.sum = checksums[i];
      else if (it->second.sum != 0 && it->second.length == p.length) p.sum = it->second.sum;
      else p.sum = compute_checksum(p.slot, p.length);
    }
    reserved_.erase(it);
    work.push_back(p);
  }
  if (work.empty()) return Outcome::kOk;
  // An abort never waits (the next call that gets the lock frees the slots); a publish
  // waits up to the handle's timeout.
  if (!(ok ? lock() : lock_within(0))) {  // nothing published now: freed at the next lock
    for (const auto& p : work) deferred_aborts_.push_back(p.slot);
    return Outcome::kBusy;
  }
  uint64_t bytes = 0;
  bool mismatch = false;
  for (const auto& p : work) {
    SlotMeta& m = slot_at(p.slot);
    if (m.state != uint32_t(SlotState::kWriting) || m.owner != client_ ||
        m.owner_nonce != uint32_t(token_) || std::memcmp(m.key, p.key.data(), kKeyBytes) != 0) {
      mismatch = true;  // our reservation was written over: leave it to the rebuild
      continue;
    }
    if (ok) {
      m.length = p.length;
      m.checksum = detail::bind_key(p.sum, p.key.data());
      m.ref = 1;
      m.state = uint32_t(SlotState::kReady);  // publish: the bytes were written before
      bytes += p.length;
      atomics::count(hdr_->stats.inserts);
    } else {
      free_slot(p.slot);
    }
  }
  unlock();
  touch();
  if (mismatch) {
    mark_rebuild();
    atomics::count(hdr_->stats.corrupt);
  }
  atomics::count(hdr_->stats.bytes_in, bytes);
  return lost_ ? Outcome::kBusy : Outcome::kOk;
}

Result<bool> Pool::remove(const uint8_t* key) {
  live();
  if (!lock()) return {Outcome::kBusy, false};
  bool removed = false;
  const int64_t b = find(key);
  if (b >= 0) {
    const uint32_t s = bucket_slot(uint64_t(b));
    SlotMeta& m = slot_at(s);
    if (atomics::read_once(m.state) == uint32_t(SlotState::kReady) &&
        atomics::read_once(m.pins) == 0) {
      free_slot(s);
      removed = true;
    }
  }
  unlock();
  touch();
  if (lost_) return {Outcome::kBusy, false};
  return {Outcome::kOk, removed};
}

Stats Pool::stats() const {
  live();
  Stats st{};
  st.slot_count = g_.slot_count;
  st.slot_size = g_.slot_size;
  for (uint64_t s = 0; s < g_.slot_count; ++s) {
    const uint32_t state = atomics::read_once(slots_[s].state);
    if (state == uint32_t(SlotState::kFree)) continue;
    ++st.used_slots;
    if (atomics::read_once(slots_[s].pins)) ++st.pinned_slots;
    if (state == uint32_t(SlotState::kWriting)) ++st.writing_slots;
  }
  for (uint32_t c = 0; c < g_.max_clients; ++c)
    if ((atomics::load_relaxed(clients_[c].state) & kClientStateMask) == kClientLive) ++st.clients;
  const PoolStats& p = hdr_->stats;
  st.hits = atomics::load_relaxed(p.hits);
  st.misses = atomics::load_relaxed(p.misses);
  st.inserts = atomics::load_relaxed(p.inserts);
  st.evictions = atomics::load_relaxed(p.evictions);
  st.bytes_in = atomics::load_relaxed(p.bytes_in);
  st.bytes_out = atomics::load_relaxed(p.bytes_out);
  st.duplicates = atomics::load_relaxed(p.duplicates);
  st.full = atomics::load_relaxed(p.full);
  st.recoveries = atomics::load_relaxed(p.recoveries);
  st.reclaimed = atomics::load_relaxed(p.reclaimed);
  st.corrupt = atomics::load_relaxed(p.corrupt);
  st.busy = atomics::load_relaxed(p.busy);
  st.generation = atomics::load_relaxed(hdr_->generation);
  return st;
}

}  // namespace beluga
