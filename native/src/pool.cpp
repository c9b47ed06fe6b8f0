// Implementation of the KV pool (see include/beluga/pool.h and layout.h for the contract).
#include "beluga/pool.h"

#include <errno.h>
#include <dirent.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <random>
#include <sstream>
#include <thread>

#include "beluga/atomics.h"
#ifdef BELUGA_WITH_CUDA
#include "beluga/checksum.h"
#include "beluga/cuda_copy.h"
#endif

namespace beluga {
namespace {

constexpr uint64_t kLockTimeoutNs = 5'000'000'000ULL;
constexpr uint64_t kLeaseNs = 30'000'000'000ULL;  // cross-namespace liveness: last_seen age

uint64_t align_up(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }

uint64_t now_realtime_ns() {
  timespec ts{};
  clock_gettime(CLOCK_REALTIME, &ts);
  return uint64_t(ts.tv_sec) * 1'000'000'000ULL + uint64_t(ts.tv_nsec);
}

uint64_t now_mono_ns() {
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return uint64_t(ts.tv_sec) * 1'000'000'000ULL + uint64_t(ts.tv_nsec);
}

// Field 22 of /proc/<pid>/stat: start time in clock ticks; 0 if the process is gone.
uint64_t process_start_ticks(uint32_t pid) {
  std::ifstream f("/proc/" + std::to_string(pid) + "/stat");
  std::string s;
  if (!std::getline(f, s)) return 0;
  auto close = s.rfind(')');
  if (close == std::string::npos) return 0;
  std::istringstream rest(s.substr(close + 2));
  std::string field;
  for (int i = 3; i <= 22; ++i) {
    if (!(rest >> field)) return 0;
  }
  return std::stoull(field);
}

uint64_t own_pidns() {
  struct stat st{};
  if (stat("/proc/self/ns/pid", &st) != 0) return 0;
  return uint64_t(st.st_ino);
}

uint64_t mix64(uint64_t x) {  // splitmix64 finaliser
  x ^= x >> 30;
  x *= 0xBF58476D1CE4E5B9ULL;
  x ^= x >> 27;
  x *= 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}

// Bucket hash over all 32 key bytes: keys are SHA-256 digests in the product, but the index
// must not degrade into long probe chains when a caller's keys are not uniform.
uint64_t key_hash(const uint8_t* key) {
  uint64_t w[4];
  std::memcpy(w, key, sizeof(w));
  return mix64(w[0] ^ mix64(w[1] ^ mix64(w[2] ^ mix64(w[3]))));
}

uint64_t header_checksum(const PoolHeader* h) {
  const auto* p = reinterpret_cast<const uint8_t*>(h);
  uint64_t x = 1469598103934665603ULL;
  for (size_t i = kChecksumBegin; i < kChecksumEnd; ++i) x = (x ^ p[i]) * 1099511628211ULL;
  return x;
}

struct Layout {
  uint64_t clients, pins, index, slots, data, total, index_capacity;
};

Layout compute_layout(uint64_t slot_size, uint64_t slot_count, uint32_t max_clients,
                      uint32_t max_pins) {
  Layout l{};
  l.index_capacity = 1;
  while (l.index_capacity < 2 * slot_count) l.index_capacity <<= 1;
  l.clients = sizeof(PoolHeader);
  l.pins = align_up(l.clients + uint64_t(max_clients) * sizeof(ClientEntry), 4096);
  l.index = align_up(l.pins + uint64_t(max_clients) * max_pins * 4, 4096);
  l.slots = align_up(l.index + l.index_capacity * 4, 4096);
  l.data = align_up(l.slots + slot_count * sizeof(SlotMeta), kDataAlign);
  l.total = align_up(l.data + slot_size * slot_count, kDataAlign);
  return l;
}

bool cpu_has(int bit) {
#if defined(__x86_64__)
  unsigned a = 7, b = 0, c = 0, d = 0;
  __asm__ volatile("cpuid" : "+a"(a), "=b"(b), "+c"(c), "=d"(d));
  return (b >> bit) & 1u;
#else
  (void)bit;
  return false;
#endif
}

const bool kHasClwb = cpu_has(24);
const bool kHasClflushopt = cpu_has(23);

void writeback_nofence(const void* p, size_t n) {
  if (kHasClwb) {
    atomics::writeback_clwb(p, n);
  } else if (kHasClflushopt) {
    atomics::invalidate_clflushopt(p, n);
  } else {
    auto a = reinterpret_cast<uintptr_t>(p) & ~uintptr_t{63};
    for (; a < reinterpret_cast<uintptr_t>(p) + n; a += 64) _mm_clflush(reinterpret_cast<void*>(a));
  }
}

void writeback(const void* p, size_t n) {
  writeback_nofence(p, n);
  atomics::store_fence();
}

void invalidate(const void* p, size_t n) {
  if (kHasClflushopt) {
    atomics::invalidate_clflushopt(p, n);
  } else {
    auto a = reinterpret_cast<uintptr_t>(p) & ~uintptr_t{63};
    for (; a < reinterpret_cast<uintptr_t>(p) + n; a += 64) _mm_clflush(reinterpret_cast<void*>(a));
  }
  atomics::full_fence();
}

[[noreturn]] void fail(ErrorKind kind, const std::string& msg) { throw PoolError(kind, msg); }


}  // namespace

namespace {

// The checksum terms (beluga/checksum.h) of n bytes at src, the first byte being word k of
// its block, copying them to dst on the way when Copy (one pass over the data instead of a
// copy and a second read: 1.6x faster than memcpy + hashing on the 2-core VM). Where n is
// not whole words the last word is zero-padded, so that is only right at a block's end.
// Two accumulators keep two multiplies in flight.
template <bool Copy>
uint64_t hash_words(uint8_t* dst, const uint8_t* src, uint64_t n, uint64_t k) {
  using checksum::term;
  uint64_t s0 = 0, s1 = 0, i = 0;
  for (; i + 16 <= n; i += 16, k += 2) {
    uint64_t v[2];
    std::memcpy(v, src + i, 16);
    if constexpr (Copy) std::memcpy(dst + i, v, 16);
    s0 += term(v[0], k);
    s1 += term(v[1], k + 1);
  }
  for (; i + 8 <= n; i += 8, ++k) {
    uint64_t v;
    std::memcpy(&v, src + i, 8);
    if constexpr (Copy) std::memcpy(dst + i, &v, 8);
    s0 += term(v, k);
  }
  // A short last word, zero-padded (little-endian: its bytes in the low end). Kept apart
  // from the loops above: a variable-length copy there costs the main loop its registers
  // (two 64-bit constants reloaded every iteration, ~10% slower on the VM).
  if (i < n) {
    uint64_t v = 0;
    std::memcpy(&v, src + i, n - i);
    if constexpr (Copy) std::memcpy(dst + i, &v, n - i);
    s0 += term(v, k);
  }
  return s0 + s1;
}

// Whether every segment but the last is whole words, so each starts a word of the block
// and its terms can be computed on their own (while copying, on the CPU or the GPU).
bool words_aligned(const std::vector<Segment>& segs) {
  for (size_t j = 0; j + 1 < segs.size(); ++j)
    if (segs[j].bytes % 8 != 0) return false;
  return true;
}

}  // namespace

uint32_t block_checksum(const uint8_t* p, uint64_t n) {
  return checksum::finish(hash_words<false>(nullptr, p, n, 0), n);
}

namespace {

std::string errno_text() { return std::strerror(errno); }

}  // namespace

// ---------------------------------------------------------------------------------------
// Mapping, create, attach
// ---------------------------------------------------------------------------------------

Pool::Pool(std::string path, int fd, uint8_t* base, uint64_t size)
    : path_(std::move(path)), fd_(fd), base_(base), size_(size) {
  hdr_ = reinterpret_cast<PoolHeader*>(base_);
  clients_ = reinterpret_cast<ClientEntry*>(base_ + hdr_->clients_offset);
  pins_ = reinterpret_cast<uint32_t*>(base_ + hdr_->pins_offset);
  index_ = reinterpret_cast<uint32_t*>(base_ + hdr_->index_offset);
  slots_ = reinterpret_cast<SlotMeta*>(base_ + hdr_->slots_offset);
  data_ = base_ + hdr_->data_offset;
  mask_ = hdr_->index_capacity - 1;
  flush_ = hdr_->coherence == uint32_t(Coherence::kFlush);
}

static uint8_t* map_region(int fd, uint64_t size, const std::string& path, bool prefault) {
  // 2 MiB-aligned address: devdax requires it, and it lets hugetlbfs/THP back the mapping.
  void* probe = mmap(nullptr, size + kDataAlign, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (probe == MAP_FAILED) fail(ErrorKind::kIo, "mmap reserve failed: " + errno_text());
  auto aligned = align_up(reinterpret_cast<uintptr_t>(probe), kDataAlign);
  munmap(probe, size + kDataAlign);
  // prefault: build this process's page tables now (MAP_POPULATE), at attach time, instead
  // of taking a minor fault per 4 KiB page on the first copy of every slot.
  const int populate = prefault ? MAP_POPULATE : 0;
  void* p = mmap(reinterpret_cast<void*>(aligned), size, PROT_READ | PROT_WRITE,
                 MAP_SHARED | MAP_FIXED_NOREPLACE | populate, fd, 0);
  if (p == MAP_FAILED)
    p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED | populate, fd, 0);
  if (p == MAP_FAILED) fail(ErrorKind::kIo, "cannot map " + path + ": " + errno_text());
  // Huge pages where the kernel allows them for shared memory (shmem_enabled=advise):
  // 4 KiB pages cost a third of memcpy bandwidth here (see bench/README.md). Best effort.
  madvise(p, size, MADV_HUGEPAGE);
  return static_cast<uint8_t*>(p);
}

static bool is_devdax(const std::string& path) { return path.rfind("/dev/dax", 0) == 0; }

// Builds in progress are named <pool file><kBuildInfix><pid>.<random>.
static constexpr const char* kBuildInfix = ".building.";

// Remove builds whose creator died: a live creator holds LOCK_EX on its build from before
// the file has a size, so a sized build whose lock is free was abandoned.
static void sweep_abandoned_builds(const std::string& path) {
  auto slash = path.find_last_of('/');
  std::string dir = slash == std::string::npos ? "." : path.substr(0, slash);
  if (dir.empty()) dir = "/";
  std::string prefix = path.substr(slash == std::string::npos ? 0 : slash + 1) + kBuildInfix;
  DIR* d = opendir(dir.c_str());
  if (d == nullptr) return;
  while (dirent* e = readdir(d)) {
    if (std::strncmp(e->d_name, prefix.c_str(), prefix.size()) != 0) continue;
    std::string victim = dir + "/" + e->d_name;
    int fd = open(victim.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) continue;
    struct stat st{};
    if (fstat(fd, &st) == 0 && st.st_size > 0 && flock(fd, LOCK_EX | LOCK_NB) == 0)
      unlink(victim.c_str());
    close(fd);
  }
  closedir(d);
}

static uint64_t devdax_size(const std::string& path) {
  auto name = path.substr(path.find_last_of('/') + 1);
  std::ifstream f("/sys/bus/dax/devices/" + name + "/size");
  uint64_t size = 0;
  if (!(f >> size) || size == 0) fail(ErrorKind::kIo, "cannot read the size of " + path);
  return size;
}

std::unique_ptr<Pool> Pool::create(const std::string& path, const CreateOptions& o) {
  if (o.slot_size == 0 || o.slot_size % 64 != 0)
    fail(ErrorKind::kInvalid, "slot_size must be a positive multiple of 64");
  if (o.slot_count == 0 || o.slot_count >= (1ULL << 31))
    fail(ErrorKind::kInvalid, "slot_count must be between 1 and 2^31");
  if (o.fingerprint.size() > kFingerprintBytes)
    fail(ErrorKind::kInvalid, "fingerprint is longer than 32 bytes");
  if (o.max_clients == 0 || o.max_clients > 4096 || o.max_pins == 0)
    fail(ErrorKind::kInvalid, "max_clients must be 1..4096 and max_pins positive");
  Layout l = compute_layout(o.slot_size, o.slot_count, o.max_clients, o.max_pins);
  int fd;
  uint64_t size = l.total;
  const bool dax = is_devdax(path);
  // A file pool is built under a private name and linked into place only once its header is
  // published: an attacher never sees a half-made pool, and a creator that dies leaves no
  // file at `path` (its leftover is swept by the next creator).
  std::string build_path = path;
  if (dax) {
    fd = open(path.c_str(), O_RDWR | O_CLOEXEC);
    if (fd < 0) fail(ErrorKind::kIo, "cannot open " + path + ": " + errno_text());
    if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
      close(fd);
      fail(ErrorKind::kBusy, path + " is being initialised by another process");
    }
    uint64_t dev = devdax_size(path);
    if (dev < size) {
      close(fd);
      fail(ErrorKind::kInvalid, path + " holds " + std::to_string(dev) + " bytes; the pool needs " +
                                    std::to_string(size));
    }
  } else {
    if (access(path.c_str(), F_OK) == 0) fail(ErrorKind::kExists, path + " already exists");
    sweep_abandoned_builds(path);
    std::random_device rd;
    char suffix[64];
    std::snprintf(suffix, sizeof(suffix), "%s%d.%08x", kBuildInfix, int(getpid()), unsigned(rd()));
    build_path = path + suffix;
    fd = open(build_path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, o.mode);
    if (fd < 0) fail(ErrorKind::kIo, "cannot create " + build_path + ": " + errno_text());
    // Held until the pool is linked into place: a sweeper never takes a live build.
    flock(fd, LOCK_EX);
    // Reserve every page now: a full tmpfs/hugetlbfs fails here with ENOSPC instead of a
    // SIGBUS on some later copy. Filesystems without fallocate keep a sparse file.
    if (ftruncate(fd, off_t(size)) != 0 ||
        (fallocate(fd, 0, 0, off_t(size)) != 0 && errno != EOPNOTSUPP && errno != ENOSYS)) {
      auto msg = "cannot reserve " + std::to_string(size) + " bytes for " + path + ": " +
                 errno_text() + (errno == ENOSPC ? " (not enough space on that filesystem: "
                                                   "free some, or make the pool smaller)"
                                                 : "");
      close(fd);
      unlink(build_path.c_str());
      fail(ErrorKind::kIo, msg);
    }
  }
  uint8_t* base;
  try {
    base = map_region(fd, size, path, o.prefault && o.numa_node < 0);
  } catch (...) {
    close(fd);
    if (!dax) unlink(build_path.c_str());
    throw;
  }
  if (o.numa_node >= 0) {
    // mbind(MPOL_BIND) before the first touch places every page on that node.
    unsigned long mask[16] = {};
    if (o.numa_node >= int(sizeof(mask) * 8)) fail(ErrorKind::kInvalid, "numa_node too large");
    mask[o.numa_node / 64] = 1UL << (o.numa_node % 64);
    constexpr int kMpolBind = 2;
    if (syscall(SYS_mbind, base, size, kMpolBind, mask, sizeof(mask) * 8, 0) != 0) {
      auto msg = "cannot bind the pool to NUMA node " + std::to_string(o.numa_node) + ": " +
                 errno_text();
      munmap(base, size);
      close(fd);
      if (!dax) unlink(build_path.c_str());
      fail(ErrorKind::kIo, msg);
    }
  }
  auto* h = reinterpret_cast<PoolHeader*>(base);
  // A devdax device may hold anything: clear the metadata region (data is overwritten on use).
  std::memset(base, 0, l.data);
  h->version = kFormatVersion;
  h->header_bytes = sizeof(PoolHeader);
  h->total_bytes = size;
  h->slot_size = o.slot_size;
  h->slot_count = o.slot_count;
  h->index_capacity = l.index_capacity;
  h->max_clients = o.max_clients;
  h->max_pins = o.max_pins;
  h->coherence = uint32_t(o.coherence);
  h->clients_offset = l.clients;
  h->pins_offset = l.pins;
  h->index_offset = l.index;
  h->slots_offset = l.slots;
  h->data_offset = l.data;
  h->created_unix_ns = now_realtime_ns();
  std::memcpy(h->fingerprint, o.fingerprint.data(), o.fingerprint.size());
  std::random_device rd;
  for (auto& b : h->uuid) b = uint8_t(rd());
  h->uuid[6] = uint8_t((h->uuid[6] & 0x0F) | 0x40);  // RFC 4122 version 4
  h->uuid[8] = uint8_t((h->uuid[8] & 0x3F) | 0x80);
  h->header_checksum = header_checksum(h);
  if (o.coherence == Coherence::kFlush) writeback(base, l.data);
  h->magic.store(kMagic, std::memory_order_release);  // published last
  if (o.coherence == Coherence::kFlush) writeback(&h->magic, 8);
  if (!dax) {
    // link() fails if `path` appeared meanwhile: the other creator won, this build goes.
    int rc = link(build_path.c_str(), path.c_str());
    int err = errno;
    unlink(build_path.c_str());
    if (rc != 0) {
      munmap(base, size);
      close(fd);
      if (err == EEXIST) fail(ErrorKind::kExists, path + " already exists");
      fail(ErrorKind::kIo, "cannot link " + path + ": " + std::strerror(err));
    }
  }
  flock(fd, LOCK_UN);
  std::unique_ptr<Pool> pool(new Pool(path, fd, base, size));
  pool->claim_client();
  return pool;
}

std::unique_ptr<Pool> Pool::attach(const std::string& path, const std::string& expect_fp,
                                   uint64_t expect_slot_size, double wait_init_s,
                                   bool flush_override, bool prefault) {
  int fd = open(path.c_str(), O_RDWR | O_CLOEXEC);
  if (fd < 0 && errno == ENOENT) fail(ErrorKind::kIo, path + " does not exist");
  if (fd < 0) fail(ErrorKind::kIo, "cannot open " + path + ": " + errno_text());
  struct FdGuard {
    int fd;
    bool keep = false;
    ~FdGuard() {
      if (!keep) close(fd);
    }
  } guard{fd};
  uint64_t size;
  if (is_devdax(path)) {
    size = devdax_size(path);
  } else {
    struct stat st{};
    if (fstat(fd, &st) != 0) fail(ErrorKind::kIo, "cannot stat " + path + ": " + errno_text());
    size = uint64_t(st.st_size);
  }
  if (size < sizeof(PoolHeader))
    fail(ErrorKind::kCorrupt, path + " is too small to be a Beluga pool (" +
                                  std::to_string(size) + " bytes)");
  // Read the header through a private read-only mapping first: nothing is changed until the
  // pool is known to be ours.
  void* peek = mmap(nullptr, sizeof(PoolHeader), PROT_READ, MAP_SHARED, fd, 0);
  if (peek == MAP_FAILED) fail(ErrorKind::kIo, "cannot map " + path + ": " + errno_text());
  struct PeekGuard {
    void* p;
    ~PeekGuard() { munmap(p, sizeof(PoolHeader)); }
  } pg{peek};
  const auto* h = static_cast<const PoolHeader*>(peek);
  auto deadline = now_mono_ns() + uint64_t(wait_init_s * 1e9);
  while (true) {
    if (flush_override) invalidate(h, 64);
    uint64_t magic = h->magic.load(std::memory_order_acquire);
    if (magic == kMagic) break;
    if (magic != 0) fail(ErrorKind::kFormat, path + " is not a Beluga pool (bad magic)");
    if (now_mono_ns() > deadline)
      fail(ErrorKind::kFormat, path + " is not an initialised Beluga pool (magic is zero)");
    usleep(10000);
  }
  if (flush_override) invalidate(h, sizeof(PoolHeader));
  if (h->version != kFormatVersion)
    fail(ErrorKind::kFormat, path + " has pool format " + std::to_string(h->version) +
                                 "; this build reads format " + std::to_string(kFormatVersion) +
                                 " (a pool of another Beluga release: it is only a cache, so "
                                 "delete it once no process uses it, or use another path)");
  if (h->header_bytes != sizeof(PoolHeader))
    fail(ErrorKind::kCorrupt, path + ": header size mismatch");
  if (h->header_checksum != header_checksum(h))
    fail(ErrorKind::kCorrupt, path + ": header checksum mismatch (the header was overwritten)");
  if (h->slot_size == 0 || h->slot_size % 64 || h->slot_count == 0 ||
      h->slot_count >= (1ULL << 31) || h->max_clients == 0 || h->max_clients > 4096 ||
      h->max_pins == 0 || h->coherence > 1)
    fail(ErrorKind::kCorrupt, path + ": header geometry is invalid");
  Layout l = compute_layout(h->slot_size, h->slot_count, h->max_clients, h->max_pins);
  if (l.total != h->total_bytes || l.clients != h->clients_offset || l.pins != h->pins_offset ||
      l.index != h->index_offset || l.slots != h->slots_offset || l.data != h->data_offset ||
      l.index_capacity != h->index_capacity)
    fail(ErrorKind::kCorrupt, path + ": header offsets do not match its geometry");
  if (size < h->total_bytes)
    fail(ErrorKind::kCorrupt, path + " is truncated: " + std::to_string(size) + " of " +
                                  std::to_string(h->total_bytes) + " bytes");
  if (!expect_fp.empty()) {
    uint8_t want[kFingerprintBytes] = {};
    std::memcpy(want, expect_fp.data(), std::min(expect_fp.size(), kFingerprintBytes));
    if (expect_fp.size() > kFingerprintBytes || std::memcmp(want, h->fingerprint, kFingerprintBytes))
      fail(ErrorKind::kFingerprint, path + " belongs to another model (fingerprint differs)");
  }
  if (expect_slot_size && expect_slot_size != h->slot_size)
    fail(ErrorKind::kGeometry, path + " has slot size " + std::to_string(h->slot_size) +
                                   ", expected " + std::to_string(expect_slot_size));
  uint64_t total = h->total_bytes;
  uint8_t* base = map_region(fd, total, path, prefault);
  guard.keep = true;
  std::unique_ptr<Pool> pool(new Pool(path, fd, base, total));
  if (flush_override) pool->flush_ = true;
  pool->claim_client();
  return pool;
}

Pool::~Pool() {
  try {
    detach();
  } catch (...) {
  }
}

void Pool::detach() {
  if (base_ == nullptr) return;
  if (client_ != UINT32_MAX) {
    lock();
    ClientEntry& me = clients_[client_];
    uint32_t* table = pins_ + uint64_t(client_) * hdr_->max_pins;
    for (uint32_t i = 0; i < me.npins; ++i) {
      uint32_t s = table[i] - 1;
      if (s < hdr_->slot_count && slot_at(s).pins > 0) slot_at(s).pins--;
    }
    me.npins = 0;
    for (uint64_t s = 0; s < hdr_->slot_count; ++s) {
      SlotMeta& m = slot_at(s);
      if (m.state == uint32_t(SlotState::kWriting) && m.owner == client_) {
        int64_t b = find(m.key);
        if (b >= 0) index_erase(b);
        m.state = uint32_t(SlotState::kFree);
        hdr_->used_slots--;
      }
    }
    me.active.store(0, std::memory_order_release);
    unlock();
    client_ = UINT32_MAX;
  }
#ifdef BELUGA_WITH_CUDA
  if (cuda_base_ != 0) cuda::unregister_host(base_);
  cuda_base_ = 0;
#endif
  munmap(base_, size_);
  close(fd_);
  base_ = nullptr;
}

// ---------------------------------------------------------------------------------------
// Clients, the lock and recovery
// ---------------------------------------------------------------------------------------

void Pool::claim_client() {
  lock();  // as "no client" (index 0 in the token); liveness then falls back to the pid
  for (int attempt = 0; attempt < 2; ++attempt) {
    for (uint32_t c = 0; c < hdr_->max_clients; ++c) {
      ClientEntry& e = clients_[c];
      if (e.active.load(std::memory_order_relaxed) == 0) {
        e.pid = uint32_t(getpid());
        e.start_ticks = process_start_ticks(e.pid);
        e.pidns = own_pidns();
        e.last_seen_ns.store(now_realtime_ns(), std::memory_order_relaxed);
        e.npins = 0;
        e.attach_generation = hdr_->generation.load(std::memory_order_relaxed);
        e.active.store(1, std::memory_order_release);
        client_ = c;
        unlock();
        return;
      }
    }
    rebuild();  // sweeps dead clients, then try once more
  }
  unlock();
  fail(ErrorKind::kNoClientSlot, "all " + std::to_string(hdr_->max_clients) +
                                     " client slots of the pool are in use by live processes");
}

bool Pool::client_alive(uint32_t c) const {
  const ClientEntry& e = clients_[c];
  if (e.active.load(std::memory_order_acquire) == 0) return false;
  if (e.pidns == own_pidns() && e.pidns != 0) {
    if (kill(pid_t(e.pid), 0) != 0 && errno == ESRCH) return false;
    uint64_t ticks = process_start_ticks(e.pid);
    return ticks == 0 || ticks == e.start_ticks;  // 0: cannot read /proc; assume alive
  }
  // Another pid namespace or host: the lease decides.
  return now_realtime_ns() - e.last_seen_ns.load(std::memory_order_relaxed) < kLeaseNs;
}

// The pool lock. The token names the holder: (client index + 1) << 32 | pid. A waiter that
// has spun for a while checks whether the holder is still alive (same pid namespace: by pid
// and start time; else by lease); a dead holder's lock is taken over with CAS and the
// derived state rebuilt, because the holder may have died mid-update. A live holder that
// keeps the lock past kLockTimeoutNs is a bug or a stopped process: kBusy, never a hang.
void Pool::lock() {
  const uint64_t me = (uint64_t(client_ == UINT32_MAX ? 0 : client_ + 1) << 32) | uint32_t(getpid());
  auto& word = hdr_->lock_word;
  uint64_t start = 0;
  for (uint64_t spins = 0;; ++spins) {
    uint64_t cur = word.load(std::memory_order_relaxed);
    if (cur == 0 && atomics::cas_acquire(word, 0, me)) break;
    if (spins % 64 == 63) sched_yield(); else atomics::cpu_relax();
    if (spins % 1024 != 1023) continue;
    if (start == 0) start = now_mono_ns();
    cur = word.load(std::memory_order_relaxed);
    if (cur == 0) continue;
    uint32_t holder_pid = uint32_t(cur);
    uint32_t holder_client = uint32_t(cur >> 32);
    bool dead;
    if (holder_client != 0 && holder_client <= hdr_->max_clients &&
        clients_[holder_client - 1].pid == holder_pid) {
      dead = !client_alive(holder_client - 1);
    } else {  // no client entry yet (attaching): the pid alone, same namespace assumed
      dead = kill(pid_t(holder_pid), 0) != 0 && errno == ESRCH;
    }
    if (dead && atomics::cas_acquire(word, cur, me)) {
      locked_ = true;
      rebuild();
      atomics::count(hdr_->stats.recoveries);
      return;
    }
    if (now_mono_ns() - start > kLockTimeoutNs)
      fail(ErrorKind::kBusy, "the pool lock is held by live pid " + std::to_string(holder_pid) +
                                 " for more than 5 s");
  }
  locked_ = true;
  if (flush_) {
    lines_.clear();
    acquire_line(&hdr_->clock_hand);
  }
}

// coherence=flush: every metadata line a critical section touches (index buckets, slot
// metadata, the header's mutable line, pin-table lines) goes through line(): the first
// touch invalidates it (clflushopt + mfence) so this host reads memory, not a stale cache;
// unlock() writes each touched line back (clwb) and fences before releasing the lock.
// Only rebuild(), which reads everything, syncs the whole metadata region.
void Pool::acquire_line(const void* p) const {
  auto a = reinterpret_cast<uintptr_t>(p) & ~uintptr_t{63};
  if (!lines_.insert(a).second) return;
  invalidate(reinterpret_cast<const void*>(a), 64);
}

void Pool::unlock() {
  if (flush_) {
    for (uintptr_t a : lines_) writeback_nofence(reinterpret_cast<const void*>(a), 64);
    atomics::store_fence();
    lines_.clear();
  }
  locked_ = false;
  atomics::store_release(hdr_->lock_word, 0);
}

void Pool::touch() {
  if (client_ != UINT32_MAX)
    clients_[client_].last_seen_ns.store(now_realtime_ns(), std::memory_order_relaxed);
}

// Under the lock. Slot states (+ owners) are the truth; everything else is recomputed.
void Pool::rebuild() {
  const uint64_t n = hdr_->slot_count;
  if (flush_) invalidate(base_ + hdr_->clients_offset, hdr_->data_offset - hdr_->clients_offset);
  std::vector<bool> live(hdr_->max_clients, false);
  for (uint32_t c = 0; c < hdr_->max_clients; ++c) {
    if (clients_[c].active.load(std::memory_order_relaxed) == 0) continue;
    if (c == client_ || client_alive(c)) {
      live[c] = true;
    } else {
      clients_[c].npins = 0;
      clients_[c].active.store(0, std::memory_order_relaxed);
      atomics::count(hdr_->stats.reclaimed);
    }
  }
  uint64_t used = 0;
  for (uint64_t s = 0; s < n; ++s) {
    SlotMeta& m = slots_[s];
    m.pins = 0;
    if (m.state == uint32_t(SlotState::kWriting) && (m.owner >= hdr_->max_clients || !live[m.owner]))
      m.state = uint32_t(SlotState::kFree);
    if (m.state > uint32_t(SlotState::kReady)) m.state = uint32_t(SlotState::kFree);
    if (m.state != uint32_t(SlotState::kFree)) ++used;
  }
  for (uint32_t c = 0; c < hdr_->max_clients; ++c) {
    if (!live[c]) continue;
    uint32_t* table = pins_ + uint64_t(c) * hdr_->max_pins;
    uint32_t kept = 0;
    for (uint32_t i = 0; i < std::min(clients_[c].npins, hdr_->max_pins); ++i) {
      uint32_t s = table[i] - 1;
      if (s < n && slots_[s].state == uint32_t(SlotState::kReady)) {
        slots_[s].pins++;
        table[kept++] = table[i];
      }
    }
    clients_[c].npins = kept;
  }
  std::memset(index_, 0, hdr_->index_capacity * 4);
  for (uint64_t s = 0; s < n; ++s) {
    SlotMeta& m = slots_[s];
    if (m.state == uint32_t(SlotState::kFree)) continue;
    if (find(m.key) >= 0) {  // a duplicate key left by a crash: keep the first copy
      if (m.pins == 0) {
        m.state = uint32_t(SlotState::kFree);
        --used;
        continue;
      }
    }
    index_insert(m.key, uint32_t(s));
  }
  hdr_->used_slots = used;
  if (hdr_->clock_hand >= n) hdr_->clock_hand = 0;
  hdr_->generation.fetch_add(1, std::memory_order_relaxed);
  if (flush_) writeback(base_ + hdr_->clients_offset, hdr_->data_offset - hdr_->clients_offset);
}

size_t Pool::sweep() {
  lock();
  size_t dead = 0;
  for (uint32_t c = 0; c < hdr_->max_clients; ++c)
    if (c != client_ && clients_[c].active.load(std::memory_order_relaxed) && !client_alive(c)) ++dead;
  if (dead) rebuild();
  unlock();
  return dead;
}

// ---------------------------------------------------------------------------------------
// Index (open addressing, linear probing, backward-shift deletion; under the lock)
// ---------------------------------------------------------------------------------------

int64_t Pool::find(const uint8_t* key) const {
  uint64_t b = key_hash(key) & mask_;
  for (uint64_t probes = 0; probes <= mask_; ++probes, b = (b + 1) & mask_) {
    uint32_t v = bucket(b);
    if (v == kEmpty) return -1;
    uint32_t s = v - 1;
    if (s < hdr_->slot_count && std::memcmp(slot_at(s).key, key, kKeyBytes) == 0) return int64_t(b);
  }
  return -1;
}

void Pool::index_insert(const uint8_t* key, uint32_t slot) {
  uint64_t b = key_hash(key) & mask_;
  while (bucket(b) != kEmpty) b = (b + 1) & mask_;  // capacity >= 2x slots: always ends
  bucket(b) = slot + 1;
}

void Pool::index_erase(int64_t at) {
  uint64_t i = uint64_t(at);
  uint64_t j = i;
  while (true) {
    j = (j + 1) & mask_;
    uint32_t v = bucket(j);
    if (v == kEmpty) break;
    uint64_t home = key_hash(slot_at(v - 1).key) & mask_;
    // Move j back to i unless its home lies cyclically in (i, j].
    bool in_range = (i <= j) ? (i < home && home <= j) : (i < home || home <= j);
    if (!in_range) {
      bucket(i) = v;
      i = j;
    }
  }
  bucket(i) = kEmpty;
}

// CLOCK: a READY, unpinned slot whose reference bit is clear is evicted; FREE slots first
// come as the hand reaches them. Two sweeps without a candidate: full.
int64_t Pool::allocate() {
  const uint64_t n = hdr_->slot_count;
  for (uint64_t step = 0; step < 2 * n + 1; ++step) {
    uint64_t s = line(hdr_->clock_hand);
    line(hdr_->clock_hand) = (s + 1 == n) ? 0 : s + 1;
    SlotMeta& m = slot_at(s);
    if (m.state == uint32_t(SlotState::kFree)) return int64_t(s);
    if (m.state != uint32_t(SlotState::kReady) || m.pins != 0) continue;
    if (m.ref) {
      m.ref = 0;
      continue;
    }
    int64_t b = find(m.key);
    if (b >= 0) index_erase(b);
    m.state = uint32_t(SlotState::kFree);
    line(hdr_->used_slots)--;
    atomics::count(hdr_->stats.evictions);
    return int64_t(s);
  }
  return -1;
}

// ---------------------------------------------------------------------------------------
// Operations
// ---------------------------------------------------------------------------------------

size_t Pool::lookup_prefix(const uint8_t* keys, size_t n) {
  lock();
  size_t i = 0;
  for (; i < n; ++i) {
    int64_t b = find(keys + i * kKeyBytes);
    if (b < 0 || slot_at(bucket(b) - 1).state != uint32_t(SlotState::kReady)) break;
  }
  unlock();
  touch();
  atomics::count(hdr_->stats.hits, i);
  if (i < n) atomics::count(hdr_->stats.misses);
  return i;
}

std::vector<int64_t> Pool::pin(const uint8_t* keys, size_t n) {
  std::vector<int64_t> out;
  out.reserve(n);
  lock();
  ClientEntry& me = clients_[client_];
  uint32_t* table = pins_ + uint64_t(client_) * hdr_->max_pins;
  for (size_t i = 0; i < n && me.npins < hdr_->max_pins; ++i) {
    int64_t b = find(keys + i * kKeyBytes);
    if (b < 0) break;
    uint32_t s = bucket(b) - 1;
    SlotMeta& m = slot_at(s);
    if (m.state != uint32_t(SlotState::kReady)) break;
    line(table[me.npins++]) = s + 1;
    m.pins++;
    m.ref = 1;
    out.push_back(s);
  }
  unlock();
  touch();
  return out;
}

void Pool::unpin(const std::vector<int64_t>& slots) {
  lock();
  ClientEntry& me = clients_[client_];
  uint32_t* table = pins_ + uint64_t(client_) * hdr_->max_pins;
  for (int64_t s : slots) {
    for (uint32_t i = me.npins; i-- > 0;) {
      if (line(table[i]) == uint32_t(s) + 1) {
        line(table[i]) = line(table[--me.npins]);
        if (slot_at(s).pins > 0) slot_at(s).pins--;
        break;
      }
    }
  }
  unlock();
  touch();
}

std::vector<int64_t> Pool::prepare_store(const uint8_t* keys, size_t n) {
  std::vector<int64_t> out(n, kFull);
  lock();
  for (size_t i = 0; i < n; ++i) {
    const uint8_t* key = keys + i * kKeyBytes;
    if (find(key) >= 0) {
      out[i] = kDuplicate;
      atomics::count(hdr_->stats.duplicates);
      continue;
    }
    int64_t s = allocate();
    if (s < 0) {
      atomics::count(hdr_->stats.full, n - i);
      break;
    }
    SlotMeta& m = slot_at(s);
    std::memcpy(m.key, key, kKeyBytes);
    m.owner = client_;
    m.pins = 0;
    m.ref = 0;
    m.length = 0;
    m.checksum = 0;
    m.state = uint32_t(SlotState::kWriting);  // after the key: rebuild trusts key + state
    index_insert(key, uint32_t(s));
    line(hdr_->used_slots)++;
    out[i] = s;
  }
  unlock();
  touch();
  return out;
}

void Pool::complete_store(const std::vector<int64_t>& slots, const std::vector<uint64_t>& lengths,
                          bool ok, const std::vector<uint32_t>& checksums) {
  if (!lengths.empty() && lengths.size() != slots.size())
    fail(ErrorKind::kInvalid, "lengths must match slots");
  if (!checksums.empty() && checksums.size() != slots.size())
    fail(ErrorKind::kInvalid, "checksums must match slots");
  lock();
  uint64_t bytes = 0;
  for (size_t i = 0; i < slots.size(); ++i) {
    int64_t s = slots[i];
    if (s < 0 || uint64_t(s) >= hdr_->slot_count) continue;
    SlotMeta& m = slot_at(s);
    if (m.state != uint32_t(SlotState::kWriting) || m.owner != client_) continue;
    if (ok) {
      m.length = lengths.empty() ? hdr_->slot_size : std::min(lengths[i], hdr_->slot_size);
      m.checksum = checksums.empty() ? 0 : checksums[i];
      m.ref = 1;
      m.state = uint32_t(SlotState::kReady);  // publish: the bytes were written before
      bytes += m.length;
      atomics::count(hdr_->stats.inserts);
    } else {
      int64_t b = find(m.key);
      if (b >= 0) index_erase(b);
      m.state = uint32_t(SlotState::kFree);
      line(hdr_->used_slots)--;
    }
  }
  unlock();
  touch();
  atomics::count(hdr_->stats.bytes_in, bytes);
}

bool Pool::remove(const uint8_t* key) {
  lock();
  bool removed = false;
  int64_t b = find(key);
  if (b >= 0) {
    SlotMeta& m = slot_at(bucket(b) - 1);
    if (m.state == uint32_t(SlotState::kReady) && m.pins == 0) {
      index_erase(b);
      m.state = uint32_t(SlotState::kFree);
      line(hdr_->used_slots)--;
      removed = true;
    }
  }
  unlock();
  return removed;
}

Stats Pool::stats() {
  lock();
  Stats st{};
  st.slot_count = hdr_->slot_count;
  st.slot_size = hdr_->slot_size;
  st.used_slots = line(hdr_->used_slots);
  for (uint64_t s = 0; s < hdr_->slot_count; ++s) {
    if (slot_at(s).pins) ++st.pinned_slots;
    if (slot_at(s).state == uint32_t(SlotState::kWriting)) ++st.writing_slots;
  }
  for (uint32_t c = 0; c < hdr_->max_clients; ++c)
    if (clients_[c].active.load(std::memory_order_relaxed)) ++st.clients;
  unlock();
  const PoolStats& p = hdr_->stats;
  st.hits = p.hits.load();
  st.misses = p.misses.load();
  st.inserts = p.inserts.load();
  st.evictions = p.evictions.load();
  st.bytes_in = p.bytes_in.load();
  st.bytes_out = p.bytes_out.load();
  st.duplicates = p.duplicates.load();
  st.full = p.full.load();
  st.recoveries = p.recoveries.load();
  st.reclaimed = p.reclaimed.load();
  st.generation = hdr_->generation.load();
  return st;
}

// ---------------------------------------------------------------------------------------
// Copies (no lock)
// ---------------------------------------------------------------------------------------

void Pool::check_slot(int64_t slot) const {
  if (slot < 0 || uint64_t(slot) >= hdr_->slot_count)
    fail(ErrorKind::kInvalid, "slot " + std::to_string(slot) + " is out of range");
}

uint8_t* Pool::slot_data(int64_t slot) const {
  check_slot(slot);
  return data_ + uint64_t(slot) * hdr_->slot_size;
}

uint64_t Pool::slot_length(int64_t slot) const {
  check_slot(slot);
  return slots_[slot].length;
}

void Pool::write(int64_t slot, const void* src, uint64_t n, uint64_t offset) {
  if (offset + n > hdr_->slot_size) fail(ErrorKind::kInvalid, "write beyond the slot");
  uint8_t* dst = slot_data(slot) + offset;
  std::memcpy(dst, src, n);
  if (flush_) writeback(dst, n);
}

void Pool::read(int64_t slot, void* dst, uint64_t n, uint64_t offset) {
  if (offset + n > hdr_->slot_size) fail(ErrorKind::kInvalid, "read beyond the slot");
  const uint8_t* src = slot_data(slot) + offset;
  if (flush_) invalidate(src, n);
  std::memcpy(dst, src, n);
  atomics::count(hdr_->stats.bytes_out, n);
}

uint64_t Pool::check_segments(const std::vector<int64_t>& slots,
                              const std::vector<int64_t>& block_ids,
                              const std::vector<Segment>& segs) const {
  if (slots.size() != block_ids.size()) fail(ErrorKind::kInvalid, "slots and block_ids differ in length");
  uint64_t per_block = 0;
  for (const auto& s : segs) per_block += s.bytes;
  if (per_block > hdr_->slot_size)
    fail(ErrorKind::kInvalid, "segments hold " + std::to_string(per_block) +
                                  " bytes per block; slots hold " + std::to_string(hdr_->slot_size));
  for (int64_t s : slots) check_slot(s);
  for (int64_t b : block_ids)
    if (b < 0) fail(ErrorKind::kInvalid, "negative block id " + std::to_string(b));
  return per_block;
}

std::vector<int64_t> Pool::copy_blocks(const std::vector<int64_t>& slots,
                                      const std::vector<int64_t>& block_ids,
                                      const std::vector<Segment>& segs, int threads,
                                      bool to_pool, bool check) {
  const uint64_t per_block = check_segments(slots, block_ids, segs);
  const size_t n = slots.size();
  // gather: the checksum of each written block; scatter: 1 where verification failed.
  std::vector<int64_t> out(check ? n : 0, 0);
  // Hash while copying when every segment but the last is whole words (each then starts a
  // word of the block); otherwise copy, then hash the slot.
  const bool fused = check && words_aligned(segs);
  auto work = [&](size_t lo, size_t hi) {
    for (size_t i = lo; i < hi; ++i) {
      uint8_t* slot = data_ + uint64_t(slots[i]) * hdr_->slot_size;
      if (!to_pool && flush_) invalidate(slot, per_block);
      uint64_t off = 0, terms = 0;
      for (const auto& seg : segs) {
        auto* engine = reinterpret_cast<uint8_t*>(seg.base + uint64_t(block_ids[i]) * seg.block_stride);
        uint8_t* dst = to_pool ? slot + off : engine;
        const uint8_t* src = to_pool ? engine : slot + off;
        if (fused) terms += hash_words<true>(dst, src, seg.bytes, off / 8);
        else std::memcpy(dst, src, seg.bytes);
        off += seg.bytes;
      }
      if (check) {
        // The checksum of the bytes as copied (fused), or of the slot right after the copy:
        // a scribble on the slot before or during a scatter changes it (a false alarm at
        // worst), one after it did not reach the engine.
        uint32_t sum = fused ? checksum::finish(terms, per_block) : block_checksum(slot, per_block);
        if (to_pool) {
          out[i] = sum;
        } else {
          const SlotMeta& m = slots_[slots[i]];  // pinned: immutable while we hold it
          if (flush_) invalidate(&m, sizeof(m));
          out[i] = (m.length < per_block || (m.checksum != 0 && m.checksum != sum)) ? 1 : 0;
        }
      }
      if (to_pool && flush_) writeback(slot, per_block);
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

namespace {
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

std::vector<uint32_t> Pool::gather(const std::vector<int64_t>& slots,
                                   const std::vector<int64_t>& block_ids,
                                   const std::vector<Segment>& segments, int threads) {
  return as_checksums(copy_blocks(slots, block_ids, segments, threads, true, true));
}

std::vector<int64_t> Pool::scatter(const std::vector<int64_t>& slots,
                                   const std::vector<int64_t>& block_ids,
                                   const std::vector<Segment>& segments, int threads,
                                   bool verify) {
  return failed_positions(copy_blocks(slots, block_ids, segments, threads, false, verify));
}

uint32_t Pool::slot_checksum(int64_t slot) const {
  check_slot(slot);
  if (flush_) invalidate(&slots_[slot], sizeof(SlotMeta));
  return slots_[slot].checksum;
}

uint32_t Pool::compute_checksum(int64_t slot, uint64_t n) const {
  check_slot(slot);
  if (n > hdr_->slot_size) fail(ErrorKind::kInvalid, "checksum beyond the slot");
  if (flush_) invalidate(slot_data(slot), n);
  return block_checksum(slot_data(slot), n);
}

// ---- GPU path -----------------------------------------------------------------------------

#ifdef BELUGA_WITH_CUDA
bool Pool::cuda_built() { return true; }
int Pool::cuda_device_count() { return cuda::device_count(); }

void Pool::cuda_register() {
  if (cuda_base_ != 0) return;
  if (cuda::device_count() == 0) fail(ErrorKind::kCuda, "no CUDA device is visible");
  std::string e = cuda::register_host(base_, size_);
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
                                    const CudaCopyOptions& opts, bool to_pool) {
  const uint64_t per_block = check_segments(slots, block_ids, segs);
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
    const uint64_t slot_off = uint64_t(data_ - base_) + uint64_t(slots[i]) * hdr_->slot_size;
    if (flush_) invalidate(base_ + slot_off, per_block);
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
    if (to_pool) {
      out[i] = sum;
    } else {
      const SlotMeta& m = slots_[slots[i]];  // pinned: immutable while we hold it
      if (flush_) invalidate(&m, sizeof(m));
      out[i] = (m.length < per_block || (m.checksum != 0 && m.checksum != sum)) ? 1 : 0;
    }
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
        uint8_t* slot = data_ + uint64_t(slots[i]) * hdr_->slot_size;
        if (flush_) invalidate(slot, per_block);
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
  fail(ErrorKind::kCuda, "beluga_native was built without CUDA (no nvcc at build time)");
}
std::vector<int64_t> Pool::copy_cuda(const std::vector<int64_t>& slots,
                                    const std::vector<int64_t>& block_ids,
                                    const std::vector<Segment>& segs,
                                    const CudaCopyOptions& opts, bool) {
  check_segments(slots, block_ids, segs);
  if (opts.threads < 1) fail(ErrorKind::kInvalid, "threads must be at least 1");
  cuda_register();
  return {};
}
#endif

std::vector<uint32_t> Pool::gather_cuda(const std::vector<int64_t>& slots,
                                        const std::vector<int64_t>& block_ids,
                                        const std::vector<Segment>& segments,
                                        const CudaCopyOptions& opts) {
  return as_checksums(copy_cuda(slots, block_ids, segments, opts, true));
}

std::vector<int64_t> Pool::scatter_cuda(const std::vector<int64_t>& slots,
                                        const std::vector<int64_t>& block_ids,
                                        const std::vector<Segment>& segments,
                                        const CudaCopyOptions& opts) {
  return failed_positions(copy_cuda(slots, block_ids, segments, opts, false));
}

}  // namespace beluga
