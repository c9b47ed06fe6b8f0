// The block checksum's terms (beluga/checksum.h) of a run of bytes, computed while copying
// them: one pass over the data at memory speed, with the widest vector unit the CPU has
// (chosen once, at the first call, by CPUID: AVX-512F+DQ, AVX2, or portable scalar code).
// Compiled without -march flags: the module runs on any x86-64 (and builds elsewhere with
// the scalar code only).
#pragma once

#include <cstdint>
#include <string>

namespace beluga {

// Sum (mod 2^64) of checksum::term(w_j, k + j) over the little-endian 64-bit words w_j of
// the n bytes at src, the last partial word zero-padded (so n % 8 != 0 is only right at a
// block's end); k is the index within its block of the word src starts. When dst is not
// null the n bytes are also copied to dst (src and dst must not overlap). Any n, any
// alignment of src and dst, any k: bit-identical to the scalar definition.
// Feed checksum::finish(sum of the parts, block bytes) for the block's checksum.
uint64_t hash_copy(uint8_t* dst, const uint8_t* src, uint64_t n, uint64_t k);

// The same, for copies into memory this process will not read soon (a block going into the
// pool): from 16 KiB up, where dst is 8-byte aligned, non-temporal stores (they skip the
// read for ownership of every destination line: ~1.5x the write speed of hash_copy or
// memcpy on EPYC) followed by a store fence, so the bytes are globally visible in program
// order before whatever publishes them. The destination lines are not left in this CPU's
// caches, so never use it for bytes about to be read (an engine's KV buffer).
uint64_t hash_copy_nt(uint8_t* dst, const uint8_t* src, uint64_t n, uint64_t k);

// The implementation hash_copy uses here: "avx512", "avx2" or "scalar".
const char* hash_copy_impl();

// Tests and comparisons: use the widest implementation `want` allows ("avx2", "scalar";
// "" for the best this CPU has; a wider one than the CPU has falls back). Returns the one
// chosen. Not thread-safe: call it while no copy runs.
const char* hash_copy_force(const std::string& want);

}  // namespace beluga
