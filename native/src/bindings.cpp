// Python bindings of the pool (module beluga_native). Keys cross as one bytes object of
// n * 32 bytes. The GIL is released around every call that takes the pool lock or copies.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "beluga/hash_copy.h"
#include "beluga/pool.h"

namespace py = pybind11;
using beluga::Pool;

namespace {

const uint8_t* key_bytes(const py::bytes& keys, size_t& n) {
  char* data = nullptr;
  Py_ssize_t len = 0;
  if (PyBytes_AsStringAndSize(keys.ptr(), &data, &len) != 0) throw py::error_already_set();
  if (len % beluga::kKeyBytes != 0)
    throw beluga::PoolError(beluga::ErrorKind::kInvalid, "keys must be a multiple of 32 bytes");
  n = size_t(len) / beluga::kKeyBytes;
  return reinterpret_cast<const uint8_t*>(data);
}

std::vector<beluga::Segment> to_segments(
    const std::vector<std::tuple<uint64_t, uint64_t, uint64_t>>& s) {
  std::vector<beluga::Segment> out;
  out.reserve(s.size());
  for (const auto& [base, stride, bytes] : s) out.push_back({base, stride, bytes});
  return out;
}

// Busy is an outcome in C++; Python callers get a typed PoolBusyError (kvpool maps it).
[[noreturn]] void busy(const Pool& p) {
  throw beluga::PoolError(beluga::ErrorKind::kBusy,
                          "the pool lock of " + p.path() +
                              " stayed held by a live process past this handle's lock timeout");
}

template <typename T>
T value_or_busy(const Pool& p, beluga::Result<T>&& r) {
  if (r.outcome == beluga::Outcome::kBusy) busy(p);
  return std::move(r.value);
}

// A binding for a Pool method taking a chain of keys: bytes -> (pointer, count), GIL
// released, a busy lock raised as PoolError(kBusy).
template <typename R>
auto keyed(beluga::Result<R> (Pool::*method)(const uint8_t*, size_t)) {
  return [method](Pool& p, const py::bytes& keys) {
    size_t n;
    auto* k = key_bytes(keys, n);
    beluga::Result<R> r;
    {
      py::gil_scoped_release release;
      r = (p.*method)(k, n);
    }
    return value_or_busy(p, std::move(r));
  };
}

using SegmentTuples = std::vector<std::tuple<uint64_t, uint64_t, uint64_t>>;

// Optional keys for a copy out of the pool: b"" or one 32-byte key per slot.
const uint8_t* copy_keys(const py::bytes& keys, size_t slots) {
  size_t n;
  auto* k = key_bytes(keys, n);
  if (n == 0) return nullptr;
  if (n != slots)
    throw beluga::PoolError(beluga::ErrorKind::kInvalid, "keys must name one key per slot");
  return k;
}

py::buffer_info writable(py::buffer& b) {
  auto info = b.request(true);
  if (!PyBuffer_IsContiguous(info.view(), 'C'))
    throw beluga::PoolError(beluga::ErrorKind::kInvalid, "buffer must be C-contiguous");
  return info;
}

}  // namespace

PYBIND11_MODULE(beluga_native, m) {
  m.doc() = "Native core of the Beluga KV pool (see native/include/beluga/pool.h).";
  m.attr("FORMAT_VERSION") = beluga::kFormatVersion;
  m.attr("KEY_BYTES") = beluga::kKeyBytes;
  m.attr("OUTCOME_OK") = int(beluga::Outcome::kOk);
  m.attr("OUTCOME_DUPLICATE") = int(beluga::Outcome::kDuplicate);
  m.attr("OUTCOME_FULL") = int(beluga::Outcome::kFull);
  m.attr("OUTCOME_BUSY") = int(beluga::Outcome::kBusy);
  m.attr("CUDA_BUILT") = Pool::cuda_built();
  m.def("hash_copy_impl", &beluga::hash_copy_impl,
        "The vector unit the checksummed copy uses here: avx512, avx2 or scalar.");
  m.def("hash_copy_force", &beluga::hash_copy_force, py::arg("want"),
        "Tests: force a narrower checksummed copy (avx2, scalar; '' = the best); returns it.");
  m.def("cuda_device_count", &Pool::cuda_device_count,
        "Visible CUDA devices (0 when built without CUDA or no driver/device).");

  static py::exception<beluga::PoolError> native_error(m, "NativePoolError");
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const beluga::PoolError& e) {
      py::object exc = py::reinterpret_borrow<py::object>(native_error.ptr())(e.what());
      exc.attr("kind") = int(e.kind());
      PyErr_SetObject(native_error.ptr(), exc.ptr());
    }
  });

  py::class_<beluga::Stats>(m, "Stats")
#define FIELD(name) .def_readonly(#name, &beluga::Stats::name)
      FIELD(slot_count) FIELD(slot_size) FIELD(used_slots) FIELD(pinned_slots)
      FIELD(writing_slots) FIELD(clients) FIELD(hits) FIELD(misses) FIELD(inserts)
      FIELD(evictions) FIELD(bytes_in) FIELD(bytes_out) FIELD(duplicates) FIELD(full)
      FIELD(recoveries) FIELD(reclaimed) FIELD(generation) FIELD(corrupt) FIELD(busy);
#undef FIELD

  py::class_<Pool>(m, "Pool")
      .def_static(
          "create",
          [](const std::string& path, uint64_t slot_size, uint64_t slot_count,
             const py::bytes& fingerprint, bool flush, uint32_t max_clients, uint32_t max_pins,
             int numa_node, uint32_t mode, bool prefault, double lease_s,
             double lock_timeout_s) {
            beluga::CreateOptions o;
            o.slot_size = slot_size;
            o.slot_count = slot_count;
            o.fingerprint = std::string(fingerprint);
            o.coherence = flush ? beluga::Coherence::kFlush : beluga::Coherence::kNone;
            o.max_clients = max_clients;
            o.max_pins = max_pins;
            o.numa_node = numa_node;
            o.mode = mode;
            o.prefault = prefault;
            if (!(lease_s >= 0.1 && lease_s <= 3600.0))
              throw beluga::PoolError(beluga::ErrorKind::kInvalid,
                                      "lease_s must be between 0.1 and 3600");
            o.lease_ms = uint32_t(lease_s * 1000.0);
            beluga::HandleOptions h;
            h.lock_timeout_s = lock_timeout_s;
            py::gil_scoped_release release;
            return Pool::create(path, o, h);
          },
          py::arg("path"), py::arg("slot_size"), py::arg("slot_count"), py::arg("fingerprint"),
          py::arg("flush") = false, py::arg("max_clients") = 64, py::arg("max_pins") = 16384,
          py::arg("numa_node") = -1, py::arg("mode") = 0600, py::arg("prefault") = true,
          py::arg("lease_s") = 30.0, py::arg("lock_timeout_s") = 5.0,
          "Create a pool file (O_EXCL) or initialise a devdax device.")
      .def_static(
          "attach",
          [](const std::string& path, const py::bytes& fingerprint, uint64_t slot_size,
             double wait_init_s, bool flush, bool prefault, double lock_timeout_s,
             int64_t trusted_gid) {
            std::string fp(fingerprint);
            beluga::HandleOptions h;
            h.lock_timeout_s = lock_timeout_s;
            h.trusted_gid = trusted_gid;
            py::gil_scoped_release release;
            return Pool::attach(path, fp, slot_size, wait_init_s, flush, prefault, h);
          },
          py::arg("path"), py::arg("fingerprint") = py::bytes(), py::arg("slot_size") = 0,
          py::arg("wait_init_s") = 5.0, py::arg("flush") = false, py::arg("prefault") = true,
          py::arg("lock_timeout_s") = 5.0, py::arg("trusted_gid") = -1,
          "Attach to an existing pool; validates magic, format, geometry and fingerprint.")
      .def("lookup_prefix", keyed(&Pool::lookup_prefix),
           py::arg("keys"), "Number of leading keys whose blocks are READY.")
      .def("pin", keyed(&Pool::pin),
           py::arg("keys"), "Pin the READY prefix of keys; returns its slot ids.")
      .def("unpin", &Pool::unpin, py::arg("slots"), py::call_guard<py::gil_scoped_release>())
      .def("prepare_store",
           [](Pool& p, const py::bytes& keys) {
             size_t n;
             auto* k = key_bytes(keys, n);
             beluga::Result<std::vector<beluga::Reservation>> r;
             {
               py::gil_scoped_release release;
               r = p.prepare_store(k, n);
             }
             std::vector<std::pair<int, uint32_t>> out;
             for (const auto& x : value_or_busy(p, std::move(r)))
               out.emplace_back(int(x.outcome), x.slot);
             return out;
           },
           py::arg("keys"),
           "Reserve a slot per key: a list of (outcome, slot); outcome OUTCOME_OK, "
           "OUTCOME_DUPLICATE (present or being written) or OUTCOME_FULL.")
      .def("complete_store",
           [](Pool& p, const std::vector<int64_t>& slots, const std::vector<uint64_t>& lengths,
              bool ok, const std::vector<uint32_t>& checksums) {
             beluga::Outcome r;
             {
               py::gil_scoped_release release;
               r = p.complete_store(slots, lengths, ok, checksums);
             }
             // An abort that meets a busy lock is done by the next call that gets it.
             if (r == beluga::Outcome::kBusy && ok) busy(p);
           },
           py::arg("slots"), py::arg("lengths"), py::arg("ok"),
           py::arg("checksums") = std::vector<uint32_t>{},
           "Publish (ok=True) or free the reserved slots; checksums as gather returned them.")
      .def("remove",
           [](Pool& p, const py::bytes& key) {
             size_t n;
             auto* k = key_bytes(key, n);
             if (n != 1) throw beluga::PoolError(beluga::ErrorKind::kInvalid, "one key expected");
             beluga::Result<bool> r;
             {
               py::gil_scoped_release release;
               r = p.remove(k);
             }
             return value_or_busy(p, std::move(r));
           },
           py::arg("key"))
      .def("sweep",
           [](Pool& p) {
             beluga::Result<size_t> r;
             {
               py::gil_scoped_release release;
               r = p.sweep();
             }
             return value_or_busy(p, std::move(r));
           },
           "Reclaim the pins and half-written slots of dead processes.")
      .def("detach", &Pool::detach, py::call_guard<py::gil_scoped_release>())
      .def("write",
           [](Pool& p, int64_t slot, const py::buffer& src, uint64_t offset) {
             auto info = src.request();
             uint64_t n = uint64_t(info.size) * uint64_t(info.itemsize);
             py::gil_scoped_release release;
             return p.write(slot, info.ptr, n, offset);
           },
           py::arg("slot"), py::arg("src"), py::arg("offset") = 0,
           "Copy into a reserved slot; at offset 0 returns the block checksum of the bytes.")
      .def("read",
           [](Pool& p, int64_t slot, py::buffer dst, uint64_t offset) {
             auto info = writable(dst);
             uint64_t n = uint64_t(info.size) * uint64_t(info.itemsize);
             py::gil_scoped_release release;
             p.read(slot, info.ptr, n, offset);
           },
           py::arg("slot"), py::arg("dst"), py::arg("offset") = 0)
      .def("read_verified",
           [](Pool& p, int64_t slot, py::buffer dst) {
             auto info = writable(dst);
             uint64_t n = uint64_t(info.size) * uint64_t(info.itemsize);
             py::gil_scoped_release release;
             return p.read_verified(slot, info.ptr, n);
           },
           py::arg("slot"), py::arg("dst"),
           "Copy a pinned block (len(dst) bytes); whether they match the checksum stored "
           "with it under the key it was pinned by.")
      .def("write_ptr",
           [](Pool& p, int64_t slot, uint64_t src, uint64_t n, uint64_t offset) {
             py::gil_scoped_release release;
             return p.write(slot, reinterpret_cast<const void*>(src), n, offset);
           },
           py::arg("slot"), py::arg("src"), py::arg("nbytes"), py::arg("offset") = 0)
      .def("read_ptr",
           [](Pool& p, int64_t slot, uint64_t dst, uint64_t n, uint64_t offset) {
             py::gil_scoped_release release;
             p.read(slot, reinterpret_cast<void*>(dst), n, offset);
           },
           py::arg("slot"), py::arg("dst"), py::arg("nbytes"), py::arg("offset") = 0)
      .def("gather",
           [](Pool& p, const std::vector<int64_t>& slots, const std::vector<int64_t>& block_ids,
              const SegmentTuples& segments, int threads) {
             auto segs = to_segments(segments);
             py::gil_scoped_release release;
             return p.gather(slots, block_ids, segs, threads);
           },
           py::arg("slots"), py::arg("block_ids"), py::arg("segments"), py::arg("threads") = 4,
           "Copy engine blocks into slots; segments are (base_ptr, block_stride, bytes). "
           "Returns each block's checksum.")
      .def("scatter",
           [](Pool& p, const std::vector<int64_t>& slots, const std::vector<int64_t>& block_ids,
              const SegmentTuples& segments, int threads, bool verify, const py::bytes& keys) {
             auto segs = to_segments(segments);
             const uint8_t* k = copy_keys(keys, slots.size());
             py::gil_scoped_release release;
             return p.scatter(slots, block_ids, segs, threads, verify, k);
           },
           py::arg("slots"), py::arg("block_ids"), py::arg("segments"), py::arg("threads") = 4,
           py::arg("verify") = true, py::arg("keys") = py::bytes(),
           "Copy slots into engine blocks. Returns the indices of blocks that failed "
           "verification (their bytes do not match the stored checksum).")
      .def("slot_checksum", &Pool::slot_checksum, py::arg("slot"))
      .def("compute_checksum", &Pool::compute_checksum, py::arg("slot"), py::arg("nbytes"),
           py::call_guard<py::gil_scoped_release>())
      .def("gather_cuda",
           [](Pool& p, const std::vector<int64_t>& slots, const std::vector<int64_t>& block_ids,
              const SegmentTuples& segments, int device, uint64_t stream, int threads,
              uint64_t chunk_bytes, bool host_hash) {
             auto segs = to_segments(segments);
             beluga::CudaCopyOptions opts{device, stream, threads, chunk_bytes, host_hash};
             py::gil_scoped_release release;
             return p.gather_cuda(slots, block_ids, segs, opts);
           },
           py::arg("slots"), py::arg("block_ids"), py::arg("segments"), py::arg("device") = 0,
           py::arg("stream") = 0, py::arg("threads") = 4, py::arg("chunk_bytes") = 4u << 20,
           py::arg("host_hash") = false,
           "GPU: copy device blocks into slots through the registered mapping (synchronous); "
           "the kernel computes the checksums (or host threads, chunk by chunk).")
      .def("scatter_cuda",
           [](Pool& p, const std::vector<int64_t>& slots, const std::vector<int64_t>& block_ids,
              const SegmentTuples& segments, int device, uint64_t stream, int threads,
              uint64_t chunk_bytes, bool host_hash, const py::bytes& keys) {
             auto segs = to_segments(segments);
             const uint8_t* k = copy_keys(keys, slots.size());
             beluga::CudaCopyOptions opts{device, stream, threads, chunk_bytes, host_hash};
             py::gil_scoped_release release;
             return p.scatter_cuda(slots, block_ids, segs, opts, k);
           },
           py::arg("slots"), py::arg("block_ids"), py::arg("segments"), py::arg("device") = 0,
           py::arg("stream") = 0, py::arg("threads") = 4, py::arg("chunk_bytes") = 4u << 20,
           py::arg("host_hash") = false, py::arg("keys") = py::bytes(),
           "GPU: copy slots into device blocks through the registered mapping (synchronous); "
           "verified by the kernel's checksums (or host threads, chunk by chunk).")
      .def("cuda_register", &Pool::cuda_register, py::call_guard<py::gil_scoped_release>(),
           "Register the whole mapping with the GPU (cudaHostRegister, mapped + portable).")
      .def_property_readonly("cuda_registered", &Pool::cuda_registered)
      .def("slot_length", &Pool::slot_length, py::arg("slot"))
      .def("slot_address",
           [](const Pool& p, int64_t slot) { return reinterpret_cast<uint64_t>(p.slot_data(slot)); },
           py::arg("slot"))
      .def("stats", &Pool::stats, py::call_guard<py::gil_scoped_release>())
      .def("set_lock_timeout", &Pool::set_lock_timeout, py::arg("seconds"))
      .def_property_readonly("closed", &Pool::closed)
      .def("debug_lock", &Pool::debug_lock, py::call_guard<py::gil_scoped_release>(),
           "Test hook: take the pool lock and keep it (False: busy).")
      .def("debug_unlock", &Pool::debug_unlock, py::call_guard<py::gil_scoped_release>(),
           "Test hook: release the lock taken by debug_lock (False: it was taken over).")
      .def_property_readonly("path", &Pool::path)
      .def_property_readonly("flush_mode", &Pool::flush_mode)
      .def_property_readonly("client_index", &Pool::client_index)
      .def_property_readonly("slot_size", [](const Pool& p) { return p.geometry().slot_size; })
      .def_property_readonly("slot_count", [](const Pool& p) { return p.geometry().slot_count; })
      .def_property_readonly("uuid", [](const Pool& p) {
        return py::bytes(reinterpret_cast<const char*>(p.uuid().data()), beluga::kUuidBytes);
      })
      .def_property_readonly("fingerprint", [](const Pool& p) {
        return py::bytes(reinterpret_cast<const char*>(p.fingerprint().data()),
                         beluga::kFingerprintBytes);
      })
      .def_property_readonly("total_bytes", [](const Pool& p) { return p.geometry().total; });
}
