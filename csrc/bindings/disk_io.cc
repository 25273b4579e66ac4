// kvortex._native.BatchIO and kvortex._native.crc32: the bindings of kvortex::disk
// (csrc/src/disk_io.cc), used by kvortex/diskio.py.
//
// Arguments are converted here, with the GIL held, before anything runs: a malformed op raises
// the KVortex class and message the Python fallback raises (InvalidTypeError for a field of the
// wrong type, InvalidArgumentError for a value out of range, naming the op's index), and then
// no op of the batch has run. The GIL is released around BatchIO.run() and close() always (they
// wait on the disk) and around crc32() from kCrcReleaseGilBytes on.
#include <kvortex/disk_io.h>
#include <kvortex/errors.h>

#include <climits>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "bindings.h"

namespace py = pybind11;

namespace kvortex::bindings {
namespace {

// Measured here (zlib 1.2.x, x86-64): crc32 of 64 KiB takes ~20 us, against ~0.1 us to drop and
// retake an uncontended GIL; smaller buffers finish before another thread could use the GIL.
constexpr std::size_t kCrcReleaseGilBytes = 64 * 1024;

constexpr const char* kOpFields = "(is_write, fd, offset, address, nbytes)";

std::string repr_of(py::handle value) { return py::repr(value).cast<std::string>(); }
std::string type_name(py::handle value) { return Py_TYPE(value.ptr())->tp_name; }

// An int (or an object with __index__, never a bool) as a Python int; InvalidTypeError else.
py::object integer_object(const std::string& name, py::handle value) {
  PyObject* o = value.ptr();
  if (PyLong_CheckExact(o)) return py::reinterpret_borrow<py::object>(value);
  if (PyBool_Check(o) || !PyIndex_Check(o)) {
    throw Error(ErrorCode::kInvalidType, name + "=" + repr_of(value) +
                                             " is not an integer (got " + type_name(value) + ")");
  }
  py::object index = py::reinterpret_steal<py::object>(PyNumber_Index(o));
  if (!index) throw py::error_already_set();
  return index;
}

// A Python int's sign and, where it fits, its value: `over` is -1 / +1 below / above int64.
struct Int64 {
  std::int64_t value;
  int over;
  bool negative() const { return over < 0 || (over == 0 && value < 0); }
};

Int64 as_int64(const py::object& v) {
  int over = 0;
  const long long x = PyLong_AsLongLongAndOverflow(v.ptr(), &over);
  if (x == -1 && PyErr_Occurred()) throw py::error_already_set();
  return {x, over};
}

// A non-negative int as uint64; nullopt at or beyond 2**64.
std::optional<std::uint64_t> as_uint64(const py::object& v) {
  const unsigned long long x = PyLong_AsUnsignedLongLong(v.ptr());
  if (x == static_cast<unsigned long long>(-1) && PyErr_Occurred()) {
    if (!PyErr_ExceptionMatches(PyExc_OverflowError)) throw py::error_already_set();
    PyErr_Clear();
    return std::nullopt;
  }
  return x;
}

[[noreturn]] void not_allowed(const std::string& name, const py::object& v) {
  throw Error(ErrorCode::kInvalidArgument,
              name + "=" + repr_of(v) + " is not allowed; expected an integer >= 0");
}

// address + nbytes must stay within the address space; address 0 only for an empty span.
std::uintptr_t checked_span(const std::string& where, const py::object& address,
                            const py::object& nbytes, std::int64_t n) {
  const std::optional<std::uint64_t> a = as_uint64(address);
  std::uint64_t end = 0;
  if (!a || __builtin_add_overflow(*a, static_cast<std::uint64_t>(n), &end)) {
    throw Error(ErrorCode::kInvalidArgument, where + "address=" + repr_of(address) +
                                                 " + nbytes=" + repr_of(nbytes) +
                                                 " exceeds the address space (2**64)");
  }
  if (*a == 0 && n > 0) {
    throw Error(ErrorCode::kInvalidArgument,
                where + "address=0 with nbytes=" + repr_of(nbytes) +
                    "; expected the address of a buffer of nbytes bytes");
  }
  return static_cast<std::uintptr_t>(*a);
}

disk::IoOp convert_op(std::size_t i, py::handle item) {
  const std::string at = "ops[" + std::to_string(i) + "]";
  if (!PyTuple_Check(item.ptr()) && !PyList_Check(item.ptr())) {
    throw Error(ErrorCode::kInvalidType, at + " is " + type_name(item) +
                                             "; expected a tuple " + kOpFields);
  }
  // A tuple of our own: __index__ of a field may run Python code that mutates a list op.
  const py::object fields = py::reinterpret_steal<py::object>(
      PyTuple_Check(item.ptr()) ? (Py_INCREF(item.ptr()), item.ptr()) : PyList_AsTuple(item.ptr()));
  if (!fields) throw py::error_already_set();
  const Py_ssize_t size = PyTuple_GET_SIZE(fields.ptr());
  if (size != 5) {
    throw Error(ErrorCode::kInvalidType,
                at + " has " + std::to_string(size) + " fields; expected 5: " + kOpFields);
  }
  PyObject** f = &PyTuple_GET_ITEM(fields.ptr(), 0);
  // Every field's type first, then the values, in the order the Python fallback uses.
  if (!PyBool_Check(f[0])) {
    throw Error(ErrorCode::kInvalidType, at + ".is_write=" + repr_of(f[0]) +
                                             " is not a bool (got " + type_name(f[0]) + ")");
  }
  const py::object fd = integer_object(at + ".fd", f[1]);
  const py::object offset = integer_object(at + ".offset", f[2]);
  const py::object address = integer_object(at + ".address", f[3]);
  const py::object nbytes = integer_object(at + ".nbytes", f[4]);

  const Int64 fd_v = as_int64(fd);
  if (fd_v.over != 0 || fd_v.value < INT_MIN || fd_v.value > INT_MAX) {
    throw Error(ErrorCode::kInvalidArgument,
                at + ".fd=" + repr_of(fd) + " is out of range for a file descriptor");
  }
  const Int64 off_v = as_int64(offset);
  const Int64 len_v = as_int64(nbytes);
  const Int64 addr_v = as_int64(address);
  if (off_v.negative()) not_allowed(at + ".offset", offset);
  if (len_v.negative()) not_allowed(at + ".nbytes", nbytes);
  if (addr_v.negative()) not_allowed(at + ".address", address);
  std::int64_t end = 0;
  if (off_v.over != 0 || len_v.over != 0 ||
      __builtin_add_overflow(off_v.value, len_v.value, &end)) {
    throw Error(ErrorCode::kInvalidArgument, at + ": offset=" + repr_of(offset) +
                                                 " + nbytes=" + repr_of(nbytes) +
                                                 " exceeds 2**63 - 1");
  }
  const std::uintptr_t addr = checked_span(at + ": ", address, nbytes, len_v.value);
  return {f[0] == Py_True, static_cast<int>(fd_v.value), off_v.value, addr, len_v.value};
}

py::list run_ops(disk::BatchIO& self, py::handle ops) {
  // A tuple of our own (a copy of a list's item pointers), for the same reason as in
  // convert_op: converting one op may run Python code.
  PyObject* seq = PySequence_Tuple(ops.ptr());
  if (seq == nullptr) {
    if (!PyErr_ExceptionMatches(PyExc_TypeError)) throw py::error_already_set();
    PyErr_Clear();
    throw Error(ErrorCode::kInvalidType, "ops is " + type_name(ops) +
                                             "; expected a sequence of " + kOpFields + " tuples");
  }
  const py::object owned = py::reinterpret_steal<py::object>(seq);
  const auto n = static_cast<std::size_t>(PyTuple_GET_SIZE(seq));
  std::vector<disk::IoOp> converted;
  converted.reserve(n);
  for (std::size_t i = 0; i < n; ++i) {
    converted.push_back(convert_op(i, PyTuple_GET_ITEM(seq, static_cast<Py_ssize_t>(i))));
  }
  std::vector<std::int64_t> results(n);
  {
    py::gil_scoped_release release;
    self.run(converted.data(), n, results.data());
  }
  py::list out(n);
  for (std::size_t i = 0; i < n; ++i) {
    PyObject* r = PyLong_FromLongLong(results[i]);
    if (r == nullptr) throw py::error_already_set();
    PyList_SET_ITEM(out.ptr(), static_cast<Py_ssize_t>(i), r);  // steals r
  }
  return out;
}

std::unique_ptr<disk::BatchIO> make_batch_io(py::handle depth) {
  const py::object d = integer_object("depth", depth);
  const Int64 v = as_int64(d);
  if (v.over != 0 || v.value < 1 || v.value > disk::kMaxDepth) {
    throw Error(ErrorCode::kInvalidArgument, "depth=" + repr_of(d) +
                                                 " is not allowed; expected 1 <= depth <= " +
                                                 std::to_string(disk::kMaxDepth));
  }
  try {
    return std::make_unique<disk::BatchIO>(static_cast<int>(v.value));
  } catch (const SystemCallError& e) {
    PyErr_SetObject(PyExc_OSError, py::make_tuple(e.error_number(), e.what()).ptr());
    throw py::error_already_set();
  }
}

std::uint32_t crc32(py::handle address, py::handle nbytes, py::handle value) {
  const py::object a = integer_object("address", address);
  const py::object n = integer_object("nbytes", nbytes);
  const py::object v = integer_object("value", value);
  const Int64 a_v = as_int64(a);
  const Int64 n_v = as_int64(n);
  if (a_v.negative()) not_allowed("address", a);
  if (n_v.negative()) not_allowed("nbytes", n);
  const Int64 v_v = as_int64(v);
  if (v_v.over != 0 || v_v.value < 0 || v_v.value > 0xFFFFFFFFLL) {
    throw Error(ErrorCode::kInvalidArgument,
                "value=" + repr_of(v) + " is not allowed; expected 0 <= value < 2**32");
  }
  if (n_v.over != 0) {
    throw Error(ErrorCode::kInvalidArgument, "nbytes=" + repr_of(n) + " exceeds 2**63 - 1");
  }
  const std::uintptr_t addr = checked_span("", a, n, n_v.value);
  const auto len = static_cast<std::size_t>(n_v.value);
  const auto seed = static_cast<std::uint32_t>(v_v.value);
  const void* data = reinterpret_cast<const void*>(addr);
  if (len < kCrcReleaseGilBytes) return disk::crc32(data, len, seed);
  py::gil_scoped_release release;
  return disk::crc32(data, len, seed);
}

}  // namespace

void init_disk_io(py::module_& m) {
  m.attr("DISK_ALIGN") = disk::kAlign;
  m.attr("DISK_MAX_DEPTH") = disk::kMaxDepth;
  m.attr("DISK_CRC_GIL_RELEASE_BYTES") = kCrcReleaseGilBytes;
  const char* reason = disk::unavailable_reason();
  m.attr("HOT_PATHS")[py::str("disk")] = py::str(reason);
  if (*reason != '\0') return;

  py::class_<disk::BatchIO>(m, "BatchIO",
                            "Native batch disk I/O (Linux AIO); use kvortex.diskio.BatchIO.")
      .def(py::init(&make_batch_io), py::arg("depth"))
      .def("run", &run_ops, py::arg("ops"))
      .def("close",
           [](disk::BatchIO& self) {
             py::gil_scoped_release release;  // waits for calls in progress
             self.close();
           })
      .def_property_readonly("closed", &disk::BatchIO::closed)
      .def_property_readonly("depth", &disk::BatchIO::depth);
  m.def("crc32", &crc32, py::arg("address"), py::arg("nbytes"), py::arg("value") = 0,
        "crc32(address, nbytes, value=0) -> int\n\n"
        "zlib's CRC-32 of nbytes at address, continuing from value.");
}

}  // namespace kvortex::bindings
