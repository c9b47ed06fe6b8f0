// The region: mapping, create (build under a private name, then link), attach (every
// header value checked before it is used), the sweep of abandoned builds, detach.
#include <dirent.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <random>

#include "beluga/atomics.h"
#include "internal.h"
#ifdef BELUGA_WITH_CUDA
#include "beluga/cuda_copy.h"
#endif

namespace beluga {

using detail::errno_text;
using detail::fail;

namespace detail {

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

uint64_t header_checksum(const PoolHeader* h) {
  const auto* p = reinterpret_cast<const uint8_t*>(h);
  uint64_t x = 1469598103934665603ULL;
  for (size_t i = kChecksumBegin; i < kChecksumEnd; ++i) x = (x ^ p[i]) * 1099511628211ULL;
  return x;
}

}  // namespace detail

namespace {

uint64_t align_up(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }

uint8_t* map_region(int fd, uint64_t size, const std::string& path, bool prefault) {
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

bool is_devdax(const std::string& path) { return path.rfind("/dev/dax", 0) == 0; }

// Builds in progress are named <pool file><kBuildInfix><pid>.<random>.
constexpr const char* kBuildInfix = ".building.";

// Remove builds whose creator died: a live creator holds LOCK_EX on its build from before
// the file has a size, so a sized build whose lock is free was abandoned. Only our own
// regular files are considered, opened without following links and without blocking (a
// FIFO planted under a build name is skipped, never opened).
void sweep_abandoned_builds(const std::string& path) {
  auto slash = path.find_last_of('/');
  std::string dir = slash == std::string::npos ? "." : path.substr(0, slash);
  if (dir.empty()) dir = "/";
  std::string prefix = path.substr(slash == std::string::npos ? 0 : slash + 1) + kBuildInfix;
  DIR* d = opendir(dir.c_str());
  if (d == nullptr) return;
  int dfd = dirfd(d);
  int seen = 0;
  while (dirent* e = readdir(d)) {
    if (++seen > 100000) break;  // a directory flooded with names: give up, do not stall
    if (std::strncmp(e->d_name, prefix.c_str(), prefix.size()) != 0) continue;
    struct stat st{};
    if (fstatat(dfd, e->d_name, &st, AT_SYMLINK_NOFOLLOW) != 0) continue;
    if (!S_ISREG(st.st_mode) || st.st_uid != geteuid() || st.st_size == 0) continue;
    int fd = openat(dfd, e->d_name, O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK);
    if (fd < 0) continue;
    struct stat st2{};
    if (fstat(fd, &st2) == 0 && S_ISREG(st2.st_mode) && st2.st_ino == st.st_ino &&
        flock(fd, LOCK_EX | LOCK_NB) == 0)
      unlinkat(dfd, e->d_name, 0);
    close(fd);
  }
  closedir(d);
}

uint64_t devdax_size(const std::string& path) {
  auto name = path.substr(path.find_last_of('/') + 1);
  std::ifstream f("/sys/bus/dax/devices/" + name + "/size");
  uint64_t size = 0;
  if (!(f >> size) || size == 0) fail(ErrorKind::kIo, "cannot read the size of " + path);
  return size;
}

// Opens an existing pool file or device without following a symlink or blocking, and
// refuses what is not ours: not a regular file (a char device for devdax), owned by
// another user (unless of the trusted group), or writable by others.
int open_checked(const std::string& path, const HandleOptions& h) {
  int fd = open(path.c_str(), O_RDWR | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK);
  if (fd < 0 && errno == ENOENT) fail(ErrorKind::kIo, path + " does not exist");
  if (fd < 0 && errno == ELOOP)
    fail(ErrorKind::kPermission, path + " is a symbolic link; a pool is opened only by its "
                                        "real path (no links are followed)");
  if (fd < 0) fail(ErrorKind::kIo, "cannot open " + path + ": " + errno_text());
  struct stat st{};
  if (fstat(fd, &st) != 0) {
    auto msg = "cannot stat " + path + ": " + errno_text();
    close(fd);
    fail(ErrorKind::kIo, msg);
  }
  std::string why;
  const bool dax = is_devdax(path);
  if (dax ? !S_ISCHR(st.st_mode) : !S_ISREG(st.st_mode))
    why = dax ? " is not a character device" : " is not a regular file";
  else if (st.st_uid != geteuid() && !(h.trusted_gid >= 0 && st.st_gid == gid_t(h.trusted_gid)))
    why = " is owned by uid " + std::to_string(st.st_uid) + ", not by this user (uid " +
          std::to_string(geteuid()) + ")" +
          (h.trusted_gid >= 0 ? " nor by group " + std::to_string(h.trusted_gid) : "");
  else if (st.st_mode & S_IWOTH)
    why = " is writable by every user (mode " + std::to_string(st.st_mode & 0777) +
          " decimal); chmod o-w it or delete it";
  if (!why.empty()) {
    close(fd);
    fail(ErrorKind::kPermission, path + why + ": refusing to attach a pool that another user "
                                          "could read or write");
  }
  int flags = fcntl(fd, F_GETFL);
  if (flags >= 0) fcntl(fd, F_SETFL, flags & ~O_NONBLOCK);
  return fd;
}

}  // namespace

// ---------------------------------------------------------------------------------------
// Construction, create, attach
// ---------------------------------------------------------------------------------------

Pool::Pool(std::string path, int fd, uint8_t* base, const Geometry& g, const HandleOptions& h)
    : path_(std::move(path)), fd_(fd), base_(base), g_(g) {
  hdr_ = reinterpret_cast<PoolHeader*>(base_);
  clients_ = reinterpret_cast<ClientEntry*>(base_ + g_.clients);
  pins_ = reinterpret_cast<uint32_t*>(base_ + g_.pins);
  index_ = reinterpret_cast<uint32_t*>(base_ + g_.index);
  slots_ = reinterpret_cast<SlotMeta*>(base_ + g_.slots);
  data_ = base_ + g_.data;
  mask_ = g_.index_capacity - 1;
  set_lock_timeout(h.lock_timeout_s);
}

void Pool::set_lock_timeout(double seconds) {
  if (!(seconds >= 0.0 && seconds <= 3600.0))
    fail(ErrorKind::kInvalid, "lock_timeout_s must be between 0 and 3600");
  lock_timeout_ns_ = uint64_t(seconds * 1e9);
}

std::unique_ptr<Pool> Pool::create(const std::string& path, const CreateOptions& o,
                                   const HandleOptions& handle) {
  if (const char* why = layout::check_sizes(o.slot_size, o.slot_count, o.max_clients, o.max_pins))
    fail(ErrorKind::kInvalid, why);
  if (o.fingerprint.size() > kFingerprintBytes)
    fail(ErrorKind::kInvalid, "fingerprint is longer than 32 bytes");
  if (o.lease_ms < kMinLeaseMs || o.lease_ms > kMaxLeaseMs)
    fail(ErrorKind::kInvalid, "lease must be between 0.1 s and 1 h");
  if (o.mode & ~0777u) fail(ErrorKind::kInvalid, "mode must be permission bits (0..0o777)");
  if (o.mode & S_IWOTH)
    fail(ErrorKind::kInvalid, "mode must not make the pool writable by other users");
  if (o.numa_node >= 1024) fail(ErrorKind::kInvalid, "numa_node too large");
  if (!(handle.lock_timeout_s >= 0.0 && handle.lock_timeout_s <= 3600.0))
    fail(ErrorKind::kInvalid, "lock_timeout_s must be between 0 and 3600");
  Geometry g;
  if (!layout::compute(o.slot_size, o.slot_count, o.max_clients, o.max_pins, &g))
    fail(ErrorKind::kInvalid, "the pool would hold more than 4 PiB (slot_size x slot_count)");
  int fd;
  const uint64_t size = g.total;
  const bool dax = is_devdax(path);
  // A file pool is built under a private name and linked into place only once its header is
  // published: an attacher never sees a half-made pool, and a creator that dies leaves no
  // file at `path` (its leftover is swept by the next creator).
  std::string build_path = path;
  if (dax) {
    fd = open(path.c_str(), O_RDWR | O_CLOEXEC | O_NOFOLLOW);
    if (fd < 0) fail(ErrorKind::kIo, "cannot open " + path + ": " + errno_text());
    struct stat st{};
    if (fstat(fd, &st) != 0 || !S_ISCHR(st.st_mode)) {
      close(fd);
      fail(ErrorKind::kPermission, path + " is not a character device");
    }
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
    fd = -1;
    for (int attempt = 0; attempt < 8 && fd < 0; ++attempt) {
      char suffix[64];
      std::snprintf(suffix, sizeof(suffix), "%s%d.%08x", kBuildInfix, int(getpid()),
                    unsigned(rd()));
      build_path = path + suffix;
      // O_EXCL | O_NOFOLLOW: whatever sits under this name already (a file, a link, a FIFO
      // planted by someone else) is never opened; another random name is tried instead.
      fd = open(build_path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, o.mode);
      if (fd < 0 && errno != EEXIST) break;
    }
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
  std::memset(base, 0, g.data);
  h->version = kFormatVersion;
  h->header_bytes = sizeof(PoolHeader);
  h->total_bytes = size;
  h->slot_size = o.slot_size;
  h->slot_count = o.slot_count;
  h->index_capacity = g.index_capacity;
  h->max_clients = o.max_clients;
  h->max_pins = o.max_pins;
  h->coherence = uint32_t(o.coherence);
  h->lease_ms = o.lease_ms;
  h->clients_offset = g.clients;
  h->pins_offset = g.pins;
  h->index_offset = g.index;
  h->slots_offset = g.slots;
  h->data_offset = g.data;
  h->created_unix_ns = detail::now_realtime_ns();
  std::memcpy(h->fingerprint, o.fingerprint.data(), o.fingerprint.size());
  std::random_device rd;
  for (auto& b : h->uuid) b = uint8_t(rd());
  h->uuid[6] = uint8_t((h->uuid[6] & 0x0F) | 0x40);  // RFC 4122 version 4
  h->uuid[8] = uint8_t((h->uuid[8] & 0x3F) | 0x80);
  h->header_checksum = detail::header_checksum(h);
  if (o.coherence == Coherence::kFlush) atomics::writeback(base, g.data);
  atomics::store_release(h->magic, kMagic);  // published last
  if (o.coherence == Coherence::kFlush) atomics::writeback(&h->magic, 8);
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
  std::unique_ptr<Pool> pool(new Pool(path, fd, base, g, handle));
  pool->lease_ns_ = uint64_t(o.lease_ms) * 1'000'000ULL;
  pool->flush_ = o.coherence == Coherence::kFlush;
  std::memcpy(pool->fingerprint_.data(), h->fingerprint, kFingerprintBytes);
  std::memcpy(pool->uuid_.data(), h->uuid, kUuidBytes);
  pool->claim_client();
  return pool;
}

std::unique_ptr<Pool> Pool::attach(const std::string& path, const std::string& expect_fp,
                                   uint64_t expect_slot_size, double wait_init_s,
                                   bool flush_override, bool prefault,
                                   const HandleOptions& handle) {
  if (!(wait_init_s >= 0.0 && wait_init_s <= 3600.0))
    fail(ErrorKind::kInvalid, "wait_init_s must be between 0 and 3600");
  if (!(handle.lock_timeout_s >= 0.0 && handle.lock_timeout_s <= 3600.0))
    fail(ErrorKind::kInvalid, "lock_timeout_s must be between 0 and 3600");
  if (expect_fp.size() > kFingerprintBytes)
    fail(ErrorKind::kInvalid, "fingerprint is longer than 32 bytes");
  int fd = open_checked(path, handle);
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
  // Read the header through a read-only mapping first, and take a private copy of it:
  // nothing is changed until the pool is known to be ours, and nothing checked here can be
  // changed under us before it is used.
  void* peek = mmap(nullptr, sizeof(PoolHeader), PROT_READ, MAP_SHARED, fd, 0);
  if (peek == MAP_FAILED) fail(ErrorKind::kIo, "cannot map " + path + ": " + errno_text());
  struct PeekGuard {
    void* p;
    ~PeekGuard() { munmap(p, sizeof(PoolHeader)); }
  } pg{peek};
  const auto* live_h = static_cast<const PoolHeader*>(peek);
  auto deadline = detail::now_mono_ns() + uint64_t(wait_init_s * 1e9);
  while (true) {
    if (flush_override) atomics::invalidate(live_h, 64);
    uint64_t magic = atomics::load_acquire(live_h->magic);
    if (magic == kMagic) break;
    if (magic != 0) fail(ErrorKind::kFormat, path + " is not a Beluga pool (bad magic)");
    if (detail::now_mono_ns() > deadline)
      fail(ErrorKind::kFormat, path + " is not an initialised Beluga pool (magic is zero)");
    usleep(10000);
  }
  if (flush_override) atomics::invalidate(live_h, sizeof(PoolHeader));
  alignas(PoolHeader) uint8_t copy_bytes[sizeof(PoolHeader)];
  std::memcpy(copy_bytes, peek, sizeof(PoolHeader));
  const auto* h = reinterpret_cast<const PoolHeader*>(copy_bytes);
  if (h->version != kFormatVersion)
    fail(ErrorKind::kFormat, path + " has pool format " + std::to_string(h->version) +
                                 "; this build reads format " + std::to_string(kFormatVersion) +
                                 " (a pool of another Beluga release: it is only a cache, so "
                                 "delete it once no process uses it, or use another path)");
  if (h->header_bytes != sizeof(PoolHeader))
    fail(ErrorKind::kCorrupt, path + ": header size mismatch");
  if (h->header_checksum != detail::header_checksum(h))
    fail(ErrorKind::kCorrupt, path + ": header checksum mismatch (the header was overwritten)");
  Geometry g;
  if (layout::check_sizes(h->slot_size, h->slot_count, h->max_clients, h->max_pins) != nullptr ||
      h->coherence > 1 || h->lease_ms < kMinLeaseMs || h->lease_ms > kMaxLeaseMs ||
      !layout::compute(h->slot_size, h->slot_count, h->max_clients, h->max_pins, &g))
    fail(ErrorKind::kCorrupt, path + ": header geometry is invalid");
  if (g.total != h->total_bytes || g.clients != h->clients_offset || g.pins != h->pins_offset ||
      g.index != h->index_offset || g.slots != h->slots_offset || g.data != h->data_offset ||
      g.index_capacity != h->index_capacity)
    fail(ErrorKind::kCorrupt, path + ": header offsets do not match its geometry");
  if (size < g.total)
    fail(ErrorKind::kCorrupt, path + " is truncated: " + std::to_string(size) + " of " +
                                  std::to_string(g.total) + " bytes");
  if (!expect_fp.empty()) {
    uint8_t want[kFingerprintBytes] = {};
    std::memcpy(want, expect_fp.data(), expect_fp.size());
    if (std::memcmp(want, h->fingerprint, kFingerprintBytes) != 0)
      fail(ErrorKind::kFingerprint, path + " belongs to another model (fingerprint differs)");
  }
  if (expect_slot_size && expect_slot_size != g.slot_size)
    fail(ErrorKind::kGeometry, path + " has slot size " + std::to_string(g.slot_size) +
                                   ", expected " + std::to_string(expect_slot_size));
  const bool flush = flush_override || h->coherence == uint32_t(Coherence::kFlush);
  const uint64_t lease_ns = uint64_t(h->lease_ms) * 1'000'000ULL;
  uint8_t* base = map_region(fd, g.total, path, prefault);
  guard.keep = true;
  std::unique_ptr<Pool> pool(new Pool(path, fd, base, g, handle));
  pool->lease_ns_ = lease_ns;
  pool->flush_ = flush;
  std::memcpy(pool->fingerprint_.data(), h->fingerprint, kFingerprintBytes);
  std::memcpy(pool->uuid_.data(), h->uuid, kUuidBytes);
  pool->claim_client();
  return pool;
}

void Pool::live() const {
  if (base_ == nullptr) fail(ErrorKind::kClosed, "the pool handle of " + path_ + " is closed");
}

const Geometry& Pool::geometry() const {
  live();
  return g_;
}

const PoolHeader& Pool::header() const {
  live();
  return *hdr_;
}

Pool::~Pool() { detach(); }

// Releases this handle's pins and unfinished stores, frees its client entry, unmaps. Never
// throws: where the lock cannot be had (or a value is corrupt) the pool is marked for a
// rebuild, which drops this (then gone) client's pins and writes.
void Pool::detach() {
  if (base_ == nullptr) return;
  const bool inherited = uint32_t(getpid()) != me_.pid;  // across fork(): the parent's entry
  if (client_ != UINT32_MAX && !inherited) {
    bool clean = pinned_.empty() && reserved_.empty() && deferred_unpins_.empty() &&
                 deferred_aborts_.empty();  // nothing to release: no lock needed
    try {
      // Never waits: if the lock is busy, the entry is freed anyway and the next process
      // to lock rebuilds, which drops this (gone) client's pins and unfinished writes.
      if (!clean && !lost_ && lock_within(0)) {
        for (const auto& [slot, pin] : pinned_)
          for (uint32_t i = 0; i < pin.count; ++i) deferred_unpins_.emplace_back(slot, pin.key);
        for (const auto& entry : reserved_) deferred_aborts_.push_back(entry.first);
        pinned_.clear();
        reserved_.clear();
        settle();
        line(clients_[client_].npins) = 0;
        unlock();
        clean = !lost_;
      }
    } catch (const PoolError&) {
    }
    // The entry goes first, the mark after: a rebuild running now either sees the entry
    // gone, or clears the flag before this mark (rebuild clears it as it starts).
    if (!lost_) atomics::store_release(clients_[client_].state, uint64_t{0});
    if (flush_) atomics::writeback(&clients_[client_], sizeof(ClientEntry));
    if (!clean) mark_rebuild();
    client_ = UINT32_MAX;
  }
#ifdef BELUGA_WITH_CUDA
  if (cuda_base_ != 0) cuda::unregister_host(base_);
  cuda_base_ = 0;
#endif
  munmap(base_, g_.total);
  close(fd_);
  base_ = nullptr;
  pinned_.clear();
  reserved_.clear();
  deferred_unpins_.clear();
  deferred_aborts_.clear();
}

}  // namespace beluga
