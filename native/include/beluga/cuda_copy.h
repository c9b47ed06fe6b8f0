// GPU copy path of the pool (compiled only where a CUDA toolkit is present; see setup.py).
//
// The pool mapping is registered with the GPU (cudaHostRegister, mapped + portable), so a
// kernel reads and writes pool slots directly over PCIe/CXL: no bounce buffer. One copy
// descriptor per (block, segment); one kernel launch per gather/scatter call.
// This header is plain C++ so pool.cpp can include it without the CUDA headers.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace beluga::cuda {

struct CopyDesc {
  uint64_t src;    // address readable by the device (device pointer or mapped host pointer)
  uint64_t dst;
  uint64_t bytes;
};

// Number of visible devices; 0 when the driver or a device is missing (never throws).
int device_count();
// Register [ptr, ptr+bytes) as mapped, portable host memory. Returns "" or an error text.
std::string register_host(void* ptr, size_t bytes);
std::string unregister_host(void* ptr);
// The device address of a registered host pointer (on the current device).
std::string device_pointer(void* host, uint64_t* out);
// Copy every descriptor on `stream` (0: the legacy default stream) and wait for it to finish.
// `device` selects the GPU the descriptors' device pointers live on.
std::string copy(const CopyDesc* descs, size_t n, int device, uint64_t stream);

}  // namespace beluga::cuda
