// Clients, the pool lock, liveness and recovery.
//
// PROTOCOL. lock_word is 0 when free, else the holder's token: (client index + 1) << 32 |
// nonce, the nonce being the random nonzero number the holder wrote into its client entry
// when it claimed it. A process claims a client entry (one CAS on ClientEntry::state, then
// its identity, then state kLive) before it ever takes the lock, so every token names an
// entry that says who holds the lock.
//   take:     CAS 0 -> token (acquire).
//   release:  CAS token -> 0 (release). If the word holds anything else, the lock was taken
//             over while we held it (our lease had expired): what we did may have been
//             overwritten by the taker's rebuild, so the call reports kBusy, marks the pool
//             for rebuild and this handle claims a new client entry on its next call.
//   wait:     spin and yield; every 1024 spins judge the holder. Dead: a token naming no
//             entry, an entry not live, an entry with another nonce (its process is gone and
//             the entry reused), or a live entry whose process is dead by its identity:
//               same host (boot_id hash) and same pid namespace (inode): kill(pid, 0) and
//               the start time in /proc/<pid>/stat (a reused pid has another start time);
//               elsewhere (other namespace or host): last_seen_ns older than the lease.
//             A dead holder's lock is taken over by CAS(its token -> ours), and the derived
//             state is rebuilt (it may have died mid-update). A live holder past this
//             handle's lock timeout: kBusy, never a hang.
//
// WHAT A READER MAY SEE STALE, AND WHY THAT IS SAFE (cf. LMDB's reader table). Outside the
// lock a process reads only: the lock word (the CAS decides, a stale read only costs a
// spin); client entries (the identity is written before the state CAS publishes it, so a
// stale entry is at worst "claiming", which counts as alive for kClaimTimeoutMs; a stale
// last_seen can make a holder in another namespace look dead only once its lease is over,
// which is the lease's contract); statistics (relaxed counters, approximate by design);
// and slots it pinned or reserved, which no one else changes while the pin or reservation
// stands. Anything else a scribble may have changed is caught where it is used: a value out
// of bounds raises PoolCorruptError and marks the pool for rebuild, and a block whose bytes,
// length or key changed fails its checksum, which the reader checks against the key it
// pinned by (kept in its own memory).
//
// ACROSS HOSTS (coherence="flush", CXL memory; docs/pool.md has the user-facing account). Each critical section invalidates every
// metadata line before its first read and writes back every line it wrote before the
// release, so a host never acts on its own stale copy of the index or slot states. What
// this relies on, and what needs CXL 3:
//   * the lock word's CAS must be atomic across hosts. CXL 2.0 memory shared between hosts
//     gives no such guarantee in general (each host's CAS is atomic in its own cache); it
//     needs a device that serialises the atomics, or CXL 3.0 back-invalidation (HDM-DB),
//     which invalidates other hosts' copies of a line when one host takes it for writing;
//   * between our invalidate and our read a hardware prefetch can bring the line back
//     from a host's cache only if that host still caches it dirty; every writer writes back
//     before releasing, so this holds on CXL 2.0 as long as no host writes metadata outside
//     the lock. Back-invalidation makes it hold unconditionally;
//   * leases compare CLOCK_REALTIME stamps of different hosts: clocks must agree (NTP/PTP)
//     to well within the lease, and a process on another host must call into the pool at
//     least once per lease, or it is judged dead and its pins and writes are reclaimed.
// In one pid namespace on one host nothing here depends on leases or clocks.
#include <sched.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <fstream>
#include <random>
#include <sstream>

#include "beluga/atomics.h"
#include "internal.h"

namespace beluga {

using detail::fail;

namespace detail {

// Field 22 of /proc/<pid>/stat: start time in clock ticks; 0 if the process is gone.
uint64_t process_start_ticks(uint32_t pid) {
  std::ifstream f("/proc/" + std::to_string(pid) + "/stat");
  std::string s;
  if (!std::getline(f, s)) return 0;
  auto close = s.rfind(')');
  if (close == std::string::npos || close + 2 > s.size()) return 0;
  std::istringstream rest(s.substr(close + 2));
  std::string field;
  for (int i = 3; i <= 22; ++i) {
    if (!(rest >> field)) return 0;
  }
  char* end = nullptr;
  errno = 0;
  unsigned long long v = std::strtoull(field.c_str(), &end, 10);
  return (errno != 0 || end == field.c_str()) ? 0 : uint64_t(v);
}

ProcessIdentity own_identity() {
  ProcessIdentity me;
  me.pid = uint32_t(getpid());
  me.start_ticks = process_start_ticks(me.pid);
  struct stat st{};
  if (stat("/proc/self/ns/pid", &st) == 0) me.pidns = uint64_t(st.st_ino);
  std::ifstream f("/proc/sys/kernel/random/boot_id");
  std::string boot;
  if (std::getline(f, boot) && !boot.empty()) {
    uint64_t h = 1469598103934665603ULL;
    for (unsigned char ch : boot) h = (h ^ ch) * 1099511628211ULL;
    me.host = h == 0 ? 1 : h;
  }
  return me;
}

}  // namespace detail

namespace {
constexpr uint32_t kMaxPid = 1u << 22;  // PID_MAX_LIMIT on 64-bit Linux
uint64_t now_ms() { return detail::now_realtime_ns() / 1'000'000ULL; }
}  // namespace

// ---------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------

void Pool::claim_client() {
  me_ = detail::own_identity();
  std::random_device rd;
  uint32_t nonce = 0;
  while (nonce == 0) nonce = rd();
  // First pass: free entries. Second: entries whose process is gone (their pins and
  // unfinished writes are dropped by the rebuild that reusing one of them asks for).
  for (int pass = 0; pass < 2; ++pass) {
    for (uint32_t c = 0; c < g_.max_clients; ++c) {
      ClientEntry& e = clients_[c];
      if (flush_) atomics::invalidate(&e, sizeof(e));
      const uint64_t st = atomics::load_acquire(e.state);
      if (st != 0 && (pass == 0 || client_alive(c, 0, false))) continue;
      const uint64_t stamp = now_ms() << 2;
      if (!atomics::cas_acq_rel(e.state, st, stamp | kClientClaiming)) continue;
      e.pid = me_.pid;
      e.nonce = nonce;
      e.start_ticks = me_.start_ticks;
      e.pidns = me_.pidns;
      e.host = me_.host;
      e.npins = 0;
      atomics::store_relaxed(e.last_seen_ns, detail::now_realtime_ns());
      atomics::store_release(e.state, stamp | kClientLive);
      if (flush_) atomics::writeback(&e, sizeof(e));
      if (st != 0) {
        mark_rebuild();
        atomics::count(hdr_->stats.reclaimed);
      }
      client_ = c;
      token_ = (uint64_t(c) + 1) << 32 | nonce;
      lost_ = false;
      return;
    }
  }
  fail(ErrorKind::kNoClientSlot, "all " + std::to_string(g_.max_clients) +
                                     " client slots of the pool are in use by live processes");
}

// Whether client entry c belongs to a live process (and, with check_nonce, to the one
// whose lock token carries `nonce`). Every field read is checked before use.
bool Pool::client_alive(uint32_t c, uint64_t nonce, bool check_nonce) const {
  const ClientEntry& e = clients_[c];
  const uint64_t st = atomics::load_acquire(e.state);
  const uint64_t kind = st & kClientStateMask;
  if (kind == kClientClaiming) {
    if (check_nonce) return false;  // a claiming entry holds no lock yet
    const uint64_t age = now_ms() - std::min(now_ms(), st >> 2);
    return age < kClaimTimeoutMs;
  }
  if (kind != kClientLive) return false;  // free, or a scribbled state
  if (check_nonce && atomics::read_once(e.nonce) != uint32_t(nonce)) return false;
  const uint32_t pid = atomics::read_once(e.pid);
  const uint64_t host = atomics::read_once(e.host);
  const uint64_t pidns = atomics::read_once(e.pidns);
  if (host != 0 && host == me_.host && pidns != 0 && pidns == me_.pidns) {
    if (pid == 0 || pid >= kMaxPid) return false;
    // (Our own pid included: another handle of this process has our start time and is
    // alive; an entry of a dead process whose pid we now have has another start time.)
    if (kill(pid_t(pid), 0) != 0 && errno == ESRCH) return false;
    const uint64_t ticks = detail::process_start_ticks(pid);
    return ticks == 0 || ticks == atomics::read_once(e.start_ticks);  // 0: cannot tell
  }
  // Another pid namespace or host: the lease decides.
  const uint64_t seen = atomics::load_relaxed(e.last_seen_ns);
  const uint64_t now = detail::now_realtime_ns();
  return seen > now || now - seen < lease_ns_;
}

void Pool::touch() {
  if (client_ != UINT32_MAX && base_ != nullptr)
    atomics::store_relaxed(clients_[client_].last_seen_ns, detail::now_realtime_ns());
}

// ---------------------------------------------------------------------------------------
// The lock
// ---------------------------------------------------------------------------------------

bool Pool::lock() { return lock_within(lock_timeout_ns_); }

bool Pool::lock_within(uint64_t timeout_ns) {
  // Inherited across fork(): the client entry, its token, pins and reservations are the
  // parent's. Lost: our entry may belong to someone else by now. Either way this handle
  // starts over with a new entry and nothing of the old one.
  if (lost_ || uint32_t(getpid()) != me_.pid) {
    pinned_.clear();
    reserved_.clear();
    deferred_unpins_.clear();
    deferred_aborts_.clear();
    claim_client();
  }
  auto& word = hdr_->lock_word;
  uint64_t start = 0;
  bool took_over = false;
  for (uint64_t spins = 0;; ++spins) {
    uint64_t cur = atomics::load_relaxed(word);
    if (cur == 0 && atomics::cas_acquire(word, 0, token_)) break;
    if (spins % 64 == 63) sched_yield();
    else atomics::cpu_relax();
    if (spins % 1024 != 1023) continue;
    const uint64_t now = detail::now_mono_ns();
    if (start == 0) start = now;
    cur = atomics::load_relaxed(word);
    if (cur == 0) continue;
    const uint64_t holder = cur >> 32;
    const bool dead = cur == token_ ||  // a token of ours that we do not hold: stale
                      holder == 0 || holder > g_.max_clients ||
                      !client_alive(uint32_t(holder - 1), uint32_t(cur), true);
    if (dead && atomics::cas_acquire(word, cur, token_)) {
      took_over = true;
      break;
    }
    if (now - start >= timeout_ns) {
      atomics::count(hdr_->stats.busy);
      return false;
    }
  }
  locked_ = true;
  if (flush_) {
    lines_.clear();
    acquire_line(&hdr_->clock_hand);
  }
  if (took_over || (atomics::load_relaxed(hdr_->flags) & kNeedsRebuild)) {
    rebuild();
    atomics::count(hdr_->stats.recoveries);
  }
  settle();
  return true;
}

// coherence=flush: every metadata line a critical section touches (index buckets, slot
// metadata, the header's mutable line, pin-table lines) goes through line(): the first
// touch invalidates it so this host reads memory, not a stale cache; unlock() writes each
// touched line back and fences before releasing the lock. rebuild(), which reads
// everything, syncs the whole metadata region.
void Pool::acquire_line(const void* p) const {
  auto a = reinterpret_cast<uintptr_t>(p) & ~uintptr_t{63};
  if (!lines_.insert(a).second) return;
  atomics::invalidate(reinterpret_cast<const void*>(a), 64);
}

void Pool::unlock() {
  if (flush_) {
    for (uintptr_t a : lines_) atomics::writeback_nofence(reinterpret_cast<const void*>(a), 64);
    atomics::store_fence();
    lines_.clear();
  }
  locked_ = false;
  if (!atomics::cas_release(hdr_->lock_word, token_, 0)) {
    // Taken over while we held it: our lease expired (or a scribble). Whatever we changed
    // may clash with the taker's rebuild: ask for another, and never touch its lock.
    mark_rebuild();
    atomics::count(hdr_->stats.busy);
    lost_ = true;
  }
}

void Pool::mark_rebuild() const {
  atomics::set_bits(hdr_->flags, kNeedsRebuild);
  if (flush_) atomics::writeback(&hdr_->flags, sizeof(hdr_->flags));
}

void Pool::corrupt(const std::string& what) const {
  mark_rebuild();
  atomics::count(hdr_->stats.corrupt);
  if (locked_) const_cast<Pool*>(this)->unlock();
  fail(ErrorKind::kCorrupt, path_ + ": " + what + " (a value in the shared pool is out of "
                                                  "bounds; the pool is marked and the next "
                                                  "call rebuilds its index)");
}

bool Pool::debug_lock() {
  live();
  return lock();
}

bool Pool::debug_unlock() {
  live();
  if (!locked_) return false;
  unlock();
  return !lost_;
}

// ---------------------------------------------------------------------------------------
// Recovery
// ---------------------------------------------------------------------------------------

// Under the lock. Slot states (with key, owner, length, checksum) are the truth; slots
// whose values are out of bounds are freed; everything else is recomputed. Never throws
// on bad values: it is what repairs them.
void Pool::rebuild() {
  const uint64_t n = g_.slot_count;
  // Cleared as it starts: a mark set while it runs (a client leaving, a value found bad)
  // asks for the next one.
  atomics::store_relaxed(hdr_->flags, 0u);
  if (flush_) atomics::invalidate(base_ + g_.clients, g_.data - g_.clients);
  std::vector<uint8_t> live(g_.max_clients, 0);
  std::vector<uint32_t> nonces(g_.max_clients, 0);
  for (uint32_t c = 0; c < g_.max_clients; ++c) {
    ClientEntry& e = clients_[c];
    const uint64_t st = atomics::load_acquire(e.state);
    if (st == 0) continue;
    if (c == client_ || client_alive(c, 0, false)) {
      if ((st & kClientStateMask) == kClientLive) {
        live[c] = 1;
        nonces[c] = atomics::read_once(e.nonce);
      }
      continue;  // a claiming entry: alive, but it has no pins or writes yet
    }
    if (atomics::cas_acq_rel(e.state, st, 0)) atomics::count(hdr_->stats.reclaimed);
  }
  uint64_t used = 0;
  for (uint64_t s = 0; s < n; ++s) {
    SlotMeta& m = slots_[s];
    m.pins = 0;
    const uint32_t state = atomics::read_once(m.state);
    bool keep = false;
    if (state == uint32_t(SlotState::kWriting)) {
      const uint32_t owner = atomics::read_once(m.owner);
      keep = owner < g_.max_clients && live[owner] &&
             atomics::read_once(m.owner_nonce) == nonces[owner];
    } else if (state == uint32_t(SlotState::kReady)) {
      keep = atomics::read_once(m.length) <= g_.slot_size && atomics::read_once(m.checksum) != 0;
    }
    m.state = keep ? state : uint32_t(SlotState::kFree);
    if (keep) ++used;
  }
  for (uint32_t c = 0; c < g_.max_clients; ++c) {
    if (!live[c]) continue;
    uint32_t* table = pins_ + uint64_t(c) * g_.max_pins;
    const uint32_t npins = std::min(atomics::read_once(clients_[c].npins), g_.max_pins);
    uint32_t kept = 0;
    for (uint32_t i = 0; i < npins; ++i) {
      const uint32_t v = atomics::read_once(table[i]);
      if (v == kEmpty || v - 1 >= n) continue;
      SlotMeta& m = slots_[v - 1];
      if (m.state != uint32_t(SlotState::kReady) || m.pins == UINT32_MAX) continue;
      m.pins++;
      table[kept++] = v;
    }
    clients_[c].npins = kept;
  }
  std::memset(index_, 0, g_.index_capacity * 4);
  // Pinned and half-written blocks first: they are the ones that must stay findable, and a
  // crowded neighbourhood (keys crafted to collide) then drops one of the others.
  for (int pass = 0; pass < 2; ++pass)
  for (uint64_t s = 0; s < n; ++s) {
    SlotMeta& m = slots_[s];
    if (m.state == uint32_t(SlotState::kFree)) continue;
    const bool first = m.pins > 0 || m.state == uint32_t(SlotState::kWriting);
    if (first != (pass == 0)) continue;
    bool duplicate = false, placed = false;
    // The index holds only what this loop put there; at most kMaxProbe probes per slot.
    uint64_t b = detail::key_hash(m.key) & mask_;
    for (uint64_t probes = 0; probes < kMaxProbe && probes <= mask_; ++probes, b = (b + 1) & mask_) {
      const uint32_t v = atomics::read_once(index_[b]);
      if (v == kEmpty || v - 1 >= n) {  // (a value written meanwhile: ours wins)
        placed = true;
        break;
      }
      duplicate |= std::memcmp(slots_[v - 1].key, m.key, kKeyBytes) == 0;
    }
    // A duplicate key left by a crash (the first copy is kept), or a key whose home's
    // neighbourhood is full (keys crafted to collide): the block is dropped.
    if (!placed || (duplicate && m.pins == 0)) {
      m.state = uint32_t(SlotState::kFree);
      --used;
      continue;
    }
    index_[b] = uint32_t(s) + 1;
  }
  hdr_->used_slots = used;
  if (atomics::read_once(hdr_->clock_hand) >= n) hdr_->clock_hand = 0;
  atomics::count(hdr_->generation);
  if (flush_) atomics::writeback(base_ + g_.clients, g_.data - g_.clients);
  // This handle's reservations and pins survive only where the truth still names them.
  for (auto it = reserved_.begin(); it != reserved_.end();) {
    const SlotMeta& m = slots_[it->first];
    if (m.state != uint32_t(SlotState::kWriting) || m.owner != client_ ||
        std::memcmp(m.key, it->second.key.data(), kKeyBytes) != 0)
      it = reserved_.erase(it);
    else
      ++it;
  }
}

// Under the lock: unpins and aborts that met a busy lock earlier.
void Pool::settle() {
  if (deferred_unpins_.empty() && deferred_aborts_.empty()) return;
  // Taken out first: a corrupt value midway (free_slot) leaves the rest for the next call,
  // never repeats what was done.
  std::vector<std::pair<uint32_t, Key>> unpins;
  std::vector<uint32_t> aborts;
  unpins.swap(deferred_unpins_);
  aborts.swap(deferred_aborts_);
  ClientEntry& me = clients_[client_];
  uint32_t* table = pins_ + uint64_t(client_) * g_.max_pins;
  uint32_t npins = atomics::read_once(line(me.npins));
  bool missing = npins > g_.max_pins;  // out of bounds: capped now, rebuilt next
  npins = std::min(npins, g_.max_pins);
  for (const auto& [s, key] : unpins) {
    bool found = false;
    for (uint32_t i = npins; i-- > 0;) {
      if (atomics::read_once(line(table[i])) == s + 1) {
        line(table[i]) = atomics::read_once(line(table[--npins]));
        line(me.npins) = npins;
        // Only a pin on the block we pinned: after a rebuild the slot may hold another
        // block, pinned by someone else.
        SlotMeta& m = slot_at(s);
        if (std::memcmp(m.key, key.data(), kKeyBytes) == 0 && m.pins > 0) m.pins--;
        found = true;
        break;
      }
    }
    missing |= !found;
  }
  line(me.npins) = npins;
  for (size_t done = 0; done < aborts.size(); ++done) {
    const uint32_t s = aborts[done];
    SlotMeta& m = slot_at(s);
    if (m.state != uint32_t(SlotState::kWriting) || m.owner != client_ ||
        m.owner_nonce != uint32_t(token_))
      continue;
    try {
      free_slot(s);
    } catch (const PoolError&) {
      deferred_aborts_.assign(aborts.begin() + done + 1, aborts.end());
      throw;
    }
  }
  // A pin we took is not in our table (or the table's count is out of bounds): someone
  // wrote over it. Counts are derived: rebuild.
  if (missing) mark_rebuild();
}

Result<size_t> Pool::sweep() {
  live();
  if (!lock()) return {Outcome::kBusy, 0};
  size_t dead = 0;
  for (uint32_t c = 0; c < g_.max_clients; ++c)
    if (c != client_ && atomics::load_relaxed(clients_[c].state) != 0 &&
        !client_alive(c, 0, false))
      ++dead;
  if (dead) {
    rebuild();
    atomics::count(hdr_->stats.recoveries);
  }
  unlock();
  touch();
  if (lost_) return {Outcome::kBusy, 0};
  return {Outcome::kOk, dead};
}

}  // namespace beluga
