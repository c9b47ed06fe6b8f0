// GPU gather/scatter between a registered pool mapping and the engine's device KV cache.
// See native/include/beluga/cuda_copy.h.
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <mutex>
#include <thread>
#include <string>
#include <vector>

#include "beluga/cuda_copy.h"

namespace beluga::cuda {
namespace {

std::string err(const char* what, cudaError_t e) {
  return std::string(what) + ": " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")";
}

// One thread block per descriptor; 16-byte vector copies when both ends and the length are
// 16-byte aligned (KV blocks always are), else bytes.
__global__ void copy_kernel(const CopyDesc* descs) {
  const CopyDesc d = descs[blockIdx.x];
  if (((d.src | d.dst | d.bytes) & 15u) == 0) {
    const uint4* s = reinterpret_cast<const uint4*>(d.src);
    uint4* t = reinterpret_cast<uint4*>(d.dst);
    const uint64_t n = d.bytes / 16;
    for (uint64_t i = threadIdx.x; i < n; i += blockDim.x) t[i] = s[i];
  } else {
    const uint8_t* s = reinterpret_cast<const uint8_t*>(d.src);
    uint8_t* t = reinterpret_cast<uint8_t*>(d.dst);
    for (uint64_t i = threadIdx.x; i < d.bytes; i += blockDim.x) t[i] = s[i];
  }
}

// Per-device scratch for the descriptor table: device buffer + pinned host staging.
struct Scratch {
  CopyDesc* dev = nullptr;
  CopyDesc* host = nullptr;
  size_t capacity = 0;
};
std::mutex scratch_mu;
std::vector<Scratch> scratch;

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

std::string copy(const CopyDesc* descs, size_t n, const std::vector<size_t>& chunk_ends,
                 int device, uint64_t stream_handle, int threads,
                 const std::function<void(size_t)>& done) {
  if (n == 0) return "";
  if (chunk_ends.empty() || chunk_ends.back() != n) return "chunks do not cover the descriptors";
  for (size_t c = 0, lo = 0; c < chunk_ends.size(); lo = chunk_ends[c++])
    if (chunk_ends[c] <= lo || chunk_ends[c] - lo > 0x7fffffffu) return "bad copy chunk";
  cudaError_t e = cudaSetDevice(device);
  if (e != cudaSuccess) return err("cudaSetDevice", e);
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  // The scratch table is reused across calls, so calls are serialised per process and wait
  // for the copy that read the staging buffer before overwriting it.
  std::lock_guard<std::mutex> guard(scratch_mu);
  if (scratch.size() <= size_t(device)) scratch.resize(size_t(device) + 1);
  Scratch& s = scratch[size_t(device)];
  if (s.capacity < n) {
    if (s.dev) cudaFree(s.dev);
    if (s.host) cudaFreeHost(s.host);
    s = Scratch{};
    size_t cap = 1;
    while (cap < n) cap <<= 1;
    if ((e = cudaMalloc(&s.dev, cap * sizeof(CopyDesc))) != cudaSuccess) return err("cudaMalloc", e);
    if ((e = cudaMallocHost(&s.host, cap * sizeof(CopyDesc))) != cudaSuccess) {
      cudaFree(s.dev);
      s.dev = nullptr;
      return err("cudaMallocHost", e);
    }
    s.capacity = cap;
  }
  std::copy(descs, descs + n, s.host);
  if ((e = cudaMemcpyAsync(s.dev, s.host, n * sizeof(CopyDesc), cudaMemcpyHostToDevice, stream)) !=
      cudaSuccess)
    return err("cudaMemcpyAsync", e);

  // Every chunk is queued at once, an event after each; the host waits on them in order.
  const size_t chunks = chunk_ends.size();
  std::vector<cudaEvent_t> events(chunks, nullptr);
  std::string error;
  for (size_t c = 0, lo = 0; c < chunks && error.empty(); lo = chunk_ends[c++]) {
    if ((e = cudaEventCreateWithFlags(&events[c], cudaEventDisableTiming)) != cudaSuccess) {
      events[c] = nullptr;
      error = err("cudaEventCreate", e);
      break;
    }
    copy_kernel<<<unsigned(chunk_ends[c] - lo), 256, 0, stream>>>(s.dev + lo);
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
