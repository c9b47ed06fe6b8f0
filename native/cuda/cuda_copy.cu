// GPU gather/scatter between a registered pool mapping and the engine's device KV cache.
// See native/include/beluga/cuda_copy.h.
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "beluga/checksum.h"
#include "beluga/cuda_copy.h"

namespace beluga::cuda {
namespace {

std::string err(const char* what, cudaError_t e) {
  return std::string(what) + ": " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")";
}

constexpr unsigned kThreads = 256;

// One thread block per descriptor; 16-byte vector copies when both ends and the length are
// 16-byte aligned (KV blocks always are), else one 8-byte word per thread, byte by byte.
// With `sums`, each thread adds the checksum terms of the words it copied, and each warp
// adds its total to its block's sum (a sum, so the order of the additions does not matter).
__global__ void copy_kernel(const CopyDesc* descs, unsigned long long* sums) {
  const CopyDesc d = descs[blockIdx.x];
  uint64_t acc = 0;
  if (((d.src | d.dst | d.bytes) & 15u) == 0) {
    const uint4* s = reinterpret_cast<const uint4*>(d.src);
    uint4* t = reinterpret_cast<uint4*>(d.dst);
    const uint64_t n = d.bytes / 16;
    for (uint64_t i = threadIdx.x; i < n; i += blockDim.x) {
      const uint4 v = s[i];
      t[i] = v;
      if (sums != nullptr) {
        const uint64_t k = d.word + 2 * i;
        acc += checksum::term(uint64_t(v.x) | uint64_t(v.y) << 32, k) +
               checksum::term(uint64_t(v.z) | uint64_t(v.w) << 32, k + 1);
      }
    }
  } else {
    const uint8_t* s = reinterpret_cast<const uint8_t*>(d.src);
    uint8_t* t = reinterpret_cast<uint8_t*>(d.dst);
    const uint64_t words = (d.bytes + 7) / 8;
    for (uint64_t j = threadIdx.x; j < words; j += blockDim.x) {
      const uint64_t lo = j * 8, hi = lo + 8 < d.bytes ? lo + 8 : d.bytes;
      uint64_t w = 0;  // little-endian, zero-padded past the end
      for (uint64_t b = lo; b < hi; ++b) {
        const uint8_t x = s[b];
        t[b] = x;
        w |= uint64_t(x) << (8 * (b - lo));
      }
      if (sums != nullptr) acc += checksum::term(w, d.word + j);
    }
  }
  if (sums == nullptr) return;
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, off);
  if ((threadIdx.x & 31u) == 0 && acc != 0) atomicAdd(&sums[d.block], (unsigned long long)acc);
}

// A device buffer with a pinned host twin (staging for uploads, landing for downloads),
// grown to a power of two and reused across calls.
template <typename T>
struct Mirrored {
  T* dev = nullptr;
  T* host = nullptr;
  size_t capacity = 0;

  std::string reserve(size_t n) {
    if (capacity >= n) return "";
    if (dev) cudaFree(dev);
    if (host) cudaFreeHost(host);
    dev = nullptr;
    host = nullptr;
    capacity = 0;
    size_t cap = 1;
    while (cap < n) cap <<= 1;
    cudaError_t e;
    if ((e = cudaMalloc(&dev, cap * sizeof(T))) != cudaSuccess) return err("cudaMalloc", e);
    if ((e = cudaMallocHost(&host, cap * sizeof(T))) != cudaSuccess) {
      cudaFree(dev);
      dev = nullptr;
      return err("cudaMallocHost", e);
    }
    capacity = cap;
    return "";
  }
};

// Per-device scratch: the descriptor table and the per-block sums.
struct Scratch {
  Mirrored<CopyDesc> descs;
  Mirrored<unsigned long long> sums;
};
std::mutex scratch_mu;
std::vector<Scratch> scratch;

// Under scratch_mu: select the device, make room, and queue the descriptor upload.
std::string prepare(const CopyDesc* descs, size_t n, size_t blocks, int device,
                    cudaStream_t stream, Scratch** out) {
  cudaError_t e = cudaSetDevice(device);
  if (e != cudaSuccess) return err("cudaSetDevice", e);
  if (scratch.size() <= size_t(device)) scratch.resize(size_t(device) + 1);
  Scratch& s = scratch[size_t(device)];
  std::string r = s.descs.reserve(n);
  if (r.empty() && blocks > 0) r = s.sums.reserve(blocks);
  if (!r.empty()) return r;
  std::copy(descs, descs + n, s.descs.host);
  if ((e = cudaMemcpyAsync(s.descs.dev, s.descs.host, n * sizeof(CopyDesc),
                           cudaMemcpyHostToDevice, stream)) != cudaSuccess)
    return err("cudaMemcpyAsync", e);
  *out = &s;
  return "";
}

}  // namespace

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device" error
    return 0;
  }
  return n;
}

std::string register_host(void* ptr, size_t bytes) {
  cudaError_t e = cudaHostRegister(ptr, bytes, cudaHostRegisterMapped | cudaHostRegisterPortable);
  return e == cudaSuccess ? "" : err("cudaHostRegister", e);
}

std::string unregister_host(void* ptr) {
  cudaError_t e = cudaHostUnregister(ptr);
  return e == cudaSuccess ? "" : err("cudaHostUnregister", e);
}

std::string device_pointer(void* host, uint64_t* out) {
  void* dev = nullptr;
  cudaError_t e = cudaHostGetDevicePointer(&dev, host, 0);
  if (e != cudaSuccess) return err("cudaHostGetDevicePointer", e);
  *out = reinterpret_cast<uint64_t>(dev);
  return "";
}

std::string copy_hashed(const CopyDesc* descs, size_t n, size_t blocks, int device,
                        uint64_t stream_handle, uint64_t* sums) {
  if (n == 0 || blocks == 0) return "";
  if (n > 0x7fffffffu) return "too many copy descriptors";
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  // The scratch buffers are reused across calls, so calls are serialised per process.
  std::lock_guard<std::mutex> guard(scratch_mu);
  Scratch* s = nullptr;
  std::string r = prepare(descs, n, blocks, device, stream, &s);
  if (!r.empty()) return r;
  cudaError_t e;
  if ((e = cudaMemsetAsync(s->sums.dev, 0, blocks * 8, stream)) != cudaSuccess)
    return err("cudaMemsetAsync", e);
  copy_kernel<<<unsigned(n), kThreads, 0, stream>>>(s->descs.dev, s->sums.dev);
  if ((e = cudaGetLastError()) != cudaSuccess) {
    cudaStreamSynchronize(stream);
    return err("copy kernel launch", e);
  }
  if ((e = cudaMemcpyAsync(s->sums.host, s->sums.dev, blocks * 8, cudaMemcpyDeviceToHost,
                           stream)) != cudaSuccess) {
    cudaStreamSynchronize(stream);
    return err("cudaMemcpyAsync", e);
  }
  // Synchronous: the caller unpins (or publishes) the slots when this returns.
  if ((e = cudaStreamSynchronize(stream)) != cudaSuccess) return err("cudaStreamSynchronize", e);
  std::copy(s->sums.host, s->sums.host + blocks, sums);
  return "";
}

std::string copy(const CopyDesc* descs, size_t n, const std::vector<size_t>& chunk_ends,
                 int device, uint64_t stream_handle, int threads,
                 const std::function<void(size_t)>& done) {
  if (n == 0) return "";
  if (chunk_ends.empty() || chunk_ends.back() != n) return "chunks do not cover the descriptors";
  for (size_t c = 0, lo = 0; c < chunk_ends.size(); lo = chunk_ends[c++])
    if (chunk_ends[c] <= lo || chunk_ends[c] - lo > 0x7fffffffu) return "bad copy chunk";
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  std::lock_guard<std::mutex> guard(scratch_mu);
  Scratch* s = nullptr;
  std::string error = prepare(descs, n, 0, device, stream, &s);
  if (!error.empty()) return error;

  // Every chunk is queued at once, an event after each; the host waits on them in order.
  cudaError_t e;
  const size_t chunks = chunk_ends.size();
  std::vector<cudaEvent_t> events(chunks, nullptr);
  for (size_t c = 0, lo = 0; c < chunks && error.empty(); lo = chunk_ends[c++]) {
    if ((e = cudaEventCreateWithFlags(&events[c], cudaEventDisableTiming)) != cudaSuccess) {
      events[c] = nullptr;
      error = err("cudaEventCreate", e);
      break;
    }
    copy_kernel<<<unsigned(chunk_ends[c] - lo), kThreads, 0, stream>>>(s->descs.dev + lo,
                                                                        nullptr);
    if ((e = cudaGetLastError()) != cudaSuccess) error = err("copy kernel launch", e);
    else if ((e = cudaEventRecord(events[c], stream)) != cudaSuccess) error = err("cudaEventRecord", e);
  }
  if (error.empty()) {
    std::atomic<size_t> next{0};
    std::mutex error_mu;
    auto work = [&] {
      cudaSetDevice(device);
      for (size_t c; (c = next.fetch_add(1)) < chunks;) {
        cudaError_t we = cudaEventSynchronize(events[c]);
        if (we != cudaSuccess) {
          std::lock_guard<std::mutex> g(error_mu);
          if (error.empty()) error = err("cudaEventSynchronize", we);
          next.store(chunks);
          return;
        }
        done(c);
      }
    };
    const size_t t = std::min(chunks, size_t(std::max(1, threads)));
    std::vector<std::thread> helpers;
    helpers.reserve(t - 1);
    for (size_t k = 1; k < t; ++k) helpers.emplace_back(work);
    work();
    for (auto& th : helpers) th.join();
  }
  // Synchronous: the caller unpins (or publishes) the slots when this returns, and the
  // staging table is reused by the next call.
  if ((e = cudaStreamSynchronize(stream)) != cudaSuccess && error.empty())
    error = err("cudaStreamSynchronize", e);
  for (cudaEvent_t ev : events)
    if (ev) cudaEventDestroy(ev);
  return error;
}

}  // namespace beluga::cuda
