// GPU copy path of the pool (compiled only where a CUDA toolkit is present; see setup.py).
//
// The pool mapping is registered with the GPU (cudaHostRegister, mapped + portable), so a
// kernel reads and writes pool slots directly over PCIe/CXL: no bounce buffer. One copy
// descriptor per (block, segment); one kernel launch per chunk of blocks, so the host can
// check the chunks already copied while the GPU copies the next ones.
// This header is plain C++ so pool.cpp can include it without the CUDA headers.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace beluga::cuda {

struct CopyDesc {
  uint64_t src;    // address readable by the device (device pointer or mapped host pointer)
  uint64_t dst;
  uint64_t bytes;
  uint64_t word;   // copy_hashed: the block's word index (beluga/checksum.h) of the first byte
  uint64_t block;  // copy_hashed: the block's index in the call
};

// Number of visible devices; 0 when the driver or a device is missing (never throws).
int device_count();
// Register [ptr, ptr+bytes) as mapped, portable host memory. Returns "" or an error text.
std::string register_host(void* ptr, size_t bytes);
std::string unregister_host(void* ptr);
// The device address of a registered host pointer (on the current device).
std::string device_pointer(void* host, uint64_t* out);
// Copy every descriptor on `stream` (0: the legacy default stream) in one kernel that also
// adds each copied word's checksum term (beluga/checksum.h) into sums[desc.block]
// (`blocks` of them, zeroed first), and wait for it. Every descriptor's first byte must
// start a word of its block (word = offset / 8 with offset % 8 == 0); a descriptor whose
// length is not whole words must end its block. "" or an error text.
std::string copy_hashed(const CopyDesc* descs, size_t n, size_t blocks, int device,
                        uint64_t stream, uint64_t* sums);

// Copy every descriptor on `stream` (0: the legacy default stream), one kernel per chunk
// (chunk_ends: each chunk's end index into descs, ascending, the last one n), and run
// `done(c)` on the host for chunk c once its copy has finished, from up to `threads` host
// threads, while the chunks after it are still copying. `device` selects the GPU the
// descriptors' device pointers live on. Returns when every copy and every `done` has
// finished: "" or an error text (then `done` may not have run for every chunk).
std::string copy(const CopyDesc* descs, size_t n, const std::vector<size_t>& chunk_ends,
                 int device, uint64_t stream, int threads,
                 const std::function<void(size_t)>& done);

}  // namespace beluga::cuda
