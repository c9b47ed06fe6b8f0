// Python bindings of the pool (module beluga_native). Keys cross as one bytes object of
// n * 32 bytes. The GIL is released around every call that takes the pool lock or copies.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

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

// A binding for a Pool method taking a chain of keys: bytes -> (pointer, count), GIL released.
template <typename R>
auto keyed(R (Pool::*method)(const uint8_t*, size_t)) {
  return [method](Pool& p, const py::bytes& keys) {
    size_t n;
    auto* k = key_bytes(keys, n);
    py::gil_scoped_release release;
    return (p.*method)(k, n);
  };
}

using SegmentTuples = std::vector<std::tuple<uint64_t, uint64_t, uint64_t>>;

// A binding for gather_cuda/scatter_cuda: segment bases are device pointers.
template <typename R>
auto cuda_copier(R (Pool::*method)(const std::vector<int64_t>&, const std::vector<int64_t>&,
                                   const std::vector<beluga::Segment>&,
                                   const beluga::CudaCopyOptions&)) {
  return [method](Pool& p, const std::vector<int64_t>& slots,
                  const std::vector<int64_t>& block_ids, const SegmentTuples& segments,
                  int device, uint64_t stream, int threads, uint64_t chunk_bytes,
                  bool host_hash) {
    auto segs = to_segments(segments);
    beluga::CudaCopyOptions opts{device, stream, threads, chunk_bytes, host_hash};
    py::gil_scoped_release release;
    return (p.*method)(slots, block_ids, segs, opts);
  };
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
  m.attr("DUPLICATE") = beluga::kDuplicate;
  m.attr("FULL") = beluga::kFull;
  m.attr("CUDA_BUILT") = Pool::cuda_built();
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
      FIELD(recoveries) FIELD(reclaimed) FIELD(generation);
#undef FIELD

  py::class_<Pool>(m, "Pool")
      .def_static(
          "create",
          [](const std::string& path, uint64_t slot_size, uint64_t slot_count,
             const py::bytes& fingerprint, bool flush, uint32_t max_clients, uint32_t max_pins,
             int numa_node, uint32_t mode, bool prefault) {
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
            py::gil_scoped_release release;
            return Pool::create(path, o);
          },
          py::arg("path"), py::arg("slot_size"), py::arg("slot_count"), py::arg("fingerprint"),
          py::arg("flush") = false, py::arg("max_clients") = 64, py::arg("max_pins") = 16384,
          py::arg("numa_node") = -1, py::arg("mode") = 0600, py::arg("prefault") = true,
          "Create a pool file (O_EXCL) or initialise a devdax device.")
      .def_static(
          "attach",
          [](const std::string& path, const py::bytes& fingerprint, uint64_t slot_size,
             double wait_init_s, bool flush, bool prefault) {
            std::string fp(fingerprint);
            py::gil_scoped_release release;
            return Pool::attach(path, fp, slot_size, wait_init_s, flush, prefault);
          },
          py::arg("path"), py::arg("fingerprint") = py::bytes(), py::arg("slot_size") = 0,
          py::arg("wait_init_s") = 5.0, py::arg("flush") = false, py::arg("prefault") = true,
          "Attach to an existing pool; validates magic, format, geometry and fingerprint.")
      .def("lookup_prefix", keyed(&Pool::lookup_prefix),
           py::arg("keys"), "Number of leading keys whose blocks are READY.")
      .def("pin", keyed(&Pool::pin),
           py::arg("keys"), "Pin the READY prefix of keys; returns its slot ids.")
      .def("unpin", &Pool::unpin, py::arg("slots"), py::call_guard<py::gil_scoped_release>())
      .def("prepare_store", keyed(&Pool::prepare_store),
           py::arg("keys"),
           "Reserve a slot per key: slot id, DUPLICATE (present or being written) or FULL.")
      .def("complete_store", &Pool::complete_store, py::arg("slots"), py::arg("lengths"),
           py::arg("ok"), py::arg("checksums") = std::vector<uint32_t>{},
           py::call_guard<py::gil_scoped_release>(),
           "Publish (ok=True) or free the reserved slots; checksums as gather returned them.")
      .def("remove",
           [](Pool& p, const py::bytes& key) {
             size_t n;
             auto* k = key_bytes(key, n);
             if (n != 1) throw beluga::PoolError(beluga::ErrorKind::kInvalid, "one key expected");
             py::gil_scoped_release release;
             return p.remove(k);
           },
           py::arg("key"))
      .def("sweep", &Pool::sweep, py::call_guard<py::gil_scoped_release>(),
           "Reclaim the pins and half-written slots of dead processes.")
      .def("detach", &Pool::detach, py::call_guard<py::gil_scoped_release>())
      .def("write",
           [](Pool& p, int64_t slot, const py::buffer& src, uint64_t offset) {
             auto info = src.request();
             uint64_t n = uint64_t(info.size) * uint64_t(info.itemsize);
             py::gil_scoped_release release;
             p.write(slot, info.ptr, n, offset);
           },
           py::arg("slot"), py::arg("src"), py::arg("offset") = 0)
      .def("read",
           [](Pool& p, int64_t slot, py::buffer dst, uint64_t offset) {
             auto info = writable(dst);
             uint64_t n = uint64_t(info.size) * uint64_t(info.itemsize);
             py::gil_scoped_release release;
             p.read(slot, info.ptr, n, offset);
           },
           py::arg("slot"), py::arg("dst"), py::arg("offset") = 0)
      .def("write_ptr",
           [](Pool& p, int64_t slot, uint64_t src, uint64_t n, uint64_t offset) {
             py::gil_scoped_release release;
             p.write(slot, reinterpret_cast<const void*>(src), n, offset);
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
              const SegmentTuples& segments, int threads, bool verify) {
             auto segs = to_segments(segments);
             py::gil_scoped_release release;
             return p.scatter(slots, block_ids, segs, threads, verify);
           },
           py::arg("slots"), py::arg("block_ids"), py::arg("segments"), py::arg("threads") = 4,
           py::arg("verify") = true,
           "Copy slots into engine blocks. Returns the indices of blocks that failed "
           "verification (their bytes do not match the stored checksum).")
      .def("slot_checksum", &Pool::slot_checksum, py::arg("slot"))
      .def("compute_checksum", &Pool::compute_checksum, py::arg("slot"), py::arg("nbytes"),
           py::call_guard<py::gil_scoped_release>())
      .def("gather_cuda", cuda_copier(&Pool::gather_cuda),
           py::arg("slots"), py::arg("block_ids"), py::arg("segments"), py::arg("device") = 0,
           py::arg("stream") = 0, py::arg("threads") = 4, py::arg("chunk_bytes") = 4u << 20,
           py::arg("host_hash") = false,
           "GPU: copy device blocks into slots through the registered mapping (synchronous); "
           "the kernel computes the checksums (or host threads, chunk by chunk).")
      .def("scatter_cuda", cuda_copier(&Pool::scatter_cuda),
           py::arg("slots"), py::arg("block_ids"), py::arg("segments"), py::arg("device") = 0,
           py::arg("stream") = 0, py::arg("threads") = 4, py::arg("chunk_bytes") = 4u << 20,
           py::arg("host_hash") = false,
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
      .def("debug_lock", &Pool::debug_lock, "Test hook: take the pool lock and keep it.")
      .def_property_readonly("path", &Pool::path)
      .def_property_readonly("flush_mode", &Pool::flush_mode)
      .def_property_readonly("client_index", &Pool::client_index)
      .def_property_readonly("slot_size", [](const Pool& p) { return p.header().slot_size; })
      .def_property_readonly("slot_count", [](const Pool& p) { return p.header().slot_count; })
      .def_property_readonly("uuid", [](const Pool& p) {
        return py::bytes(reinterpret_cast<const char*>(p.header().uuid), beluga::kUuidBytes);
      })
      .def_property_readonly("fingerprint", [](const Pool& p) {
        return py::bytes(reinterpret_cast<const char*>(p.header().fingerprint),
                         beluga::kFingerprintBytes);
      })
      .def_property_readonly("total_bytes", [](const Pool& p) { return p.header().total_bytes; });
}
