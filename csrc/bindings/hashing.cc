// Binds kvortex::hashing (csrc/src/hashing.cc) as kvortex._native.hash_chunks.
//
// kvortex/hashing.py has already validated chunk_tokens, namespace and algo and turned torch
// tensors into numpy arrays; here tokens are either a list/tuple of Python ints (read directly,
// no intermediate Python objects) or an object exporting a 1-D integer buffer (numpy,
// array.array, memoryview), read in place through the buffer protocol.
#include <kvortex/errors.h>
#include <kvortex/hashing.h>

#include <cstring>
#include <memory>
#include <optional>
#include <string>

#include "bindings.h"

#if PY_VERSION_HEX < 0x030B0000
#include <longintrepr.h>  // PyLongObject's layout; Python.h includes it itself from 3.11 on
#endif

namespace py = pybind11;

namespace kvortex::bindings {
namespace {

namespace kh = kvortex::hashing;

// Prompts at least this long are hashed (and, for arrays, converted) with the GIL released.
// Measured here: releasing and re-taking an uncontended GIL adds ~70 ns, under 1 % of the
// ~12 us that 4096 ids take. Shorter prompts gain little concurrency from it, and when another
// thread holds the GIL, getting it back can take up to a switch interval (5 ms by default), a
// large tax on a few-microsecond call. So: release only when the hash itself is long.
constexpr std::size_t kReleaseGilTokens = 4096;

constexpr bool kHostLittleEndian = __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__;

std::string short_repr(PyObject* obj) {
  std::string r = py::repr(py::handle(obj)).cast<std::string>();
  if (r.size() > 60) r = r.substr(0, 57) + "...";
  return r;
}

std::string type_name(PyObject* obj) { return Py_TYPE(obj)->tp_name; }

// A 1-D view from the buffer protocol, released on every exit path.
class BufferView {
 public:
  explicit BufferView(PyObject* obj) {
    if (PyObject_GetBuffer(obj, &view_, PyBUF_RECORDS_RO) != 0) throw py::error_already_set();
    held_ = true;
  }
  ~BufferView() {
    if (held_) PyBuffer_Release(&view_);
  }
  BufferView(const BufferView&) = delete;
  BufferView& operator=(const BufferView&) = delete;
  const Py_buffer& get() const { return view_; }

 private:
  Py_buffer view_{};
  bool held_ = false;
};

// "dtype int64" for numpy, "typecode 'd'" for array.array, "format 'Zd'" otherwise.
std::string describe_elements(PyObject* obj, const char* format) {
  py::handle h(obj);
  if (py::hasattr(h, "dtype")) return "dtype " + py::str(h.attr("dtype")).cast<std::string>();
  if (py::hasattr(h, "typecode")) {
    return "typecode " + py::repr(h.attr("typecode")).cast<std::string>();
  }
  return std::string("format '") + (format != nullptr ? format : "B") + "'";
}

// Buffer-protocol format -> integer layout; false for anything that is not one integer.
bool parse_int_format(const char* format, Py_ssize_t itemsize, kh::IntLayout* out) {
  const char* f = format != nullptr ? format : "B";  // NULL means unsigned bytes (PEP 3118)
  char order = '@';
  if (*f != '\0' && std::strchr("@=<>!", *f) != nullptr) order = *f++;
  if (f[0] == '\0' || f[1] != '\0' || std::strchr("bBhHiIlLqQnN", f[0]) == nullptr) {
    return false;
  }
  if (itemsize != 1 && itemsize != 2 && itemsize != 4 && itemsize != 8) return false;
  out->width = static_cast<unsigned>(itemsize);
  out->is_signed = f[0] >= 'a';  // lower-case codes are the signed ones
  const bool little = order == '<' || ((order == '@' || order == '=') && kHostLittleEndian);
  out->swapped = little != kHostLittleEndian;
  return true;
}

std::string shape_text(const Py_buffer& v) {
  if (v.ndim == 0) return "()";
  std::string s = "(";
  for (int d = 0; d < v.ndim; ++d) {
    s += std::to_string(v.shape != nullptr ? v.shape[d] : v.len / v.itemsize);
    s += d + 1 < v.ndim ? ", " : (v.ndim == 1 ? ",)" : ")");
  }
  return s;
}

py::list keys_to_list(const std::uint8_t* keys, std::size_t n_keys) {
  py::list out(n_keys);
  for (std::size_t i = 0; i < n_keys; ++i) {
    PyObject* b = PyBytes_FromStringAndSize(reinterpret_cast<const char*>(keys + i * 32), 32);
    if (b == nullptr) throw py::error_already_set();
    PyList_SET_ITEM(out.ptr(), static_cast<Py_ssize_t>(i), b);  // steals b
  }
  return out;
}

// Hashes ids already in place; the GIL is released for long prompts.
std::size_t hash_released(const void* base, std::size_t n, std::ptrdiff_t stride,
                          kh::IntLayout layout, std::size_t chunk, std::string_view ns,
                          std::uint8_t* out) {
  std::optional<py::gil_scoped_release> release;
  if (n >= kReleaseGilTokens) release.emplace();
  return kh::hash_chunks(base, n, stride, layout, chunk,
                         reinterpret_cast<const std::uint8_t*>(ns.data()), ns.size(), out);
}

// The value of an int that fits one internal digit (|v| < 2**30 on usual builds: every real
// token id), read inline; false for larger ones, which take PyLong_AsLongLongAndOverflow.
// Reading ints is most of the per-element cost of a list prompt (measured: ~1.5 ns per id this
// way against ~3 ns through the call), hence the direct read: through the unstable-but-public
// API on 3.12+, and through the int layout of cpython/longintrepr.h (a sign-carrying size,
// digit 0 always allocated) before that.
bool compact_value(PyObject* item, long long* out) {
#if PY_VERSION_HEX >= 0x030C0000
  auto* l = reinterpret_cast<PyLongObject*>(item);
  if (!PyUnstable_Long_IsCompact(l)) return false;
  *out = static_cast<long long>(PyUnstable_Long_CompactValue(l));
  return true;
#else
  const Py_ssize_t size = Py_SIZE(item);
  if (size < -1 || size > 1) return false;
  // With size 0 digit 0 is allocated but indeterminate: do not read it.
  if (size == 0) {
    *out = 0;
    return true;
  }
  *out = size * static_cast<long long>(reinterpret_cast<PyLongObject*>(item)->ob_digit[0]);
  return true;
#endif
}

// Reads a list or tuple of ints into host-order uint32 ids, checking each in order so the
// first bad element (of either kind) is the one reported, as the Python fallback does. No
// Python code runs during the loop (int subclasses are read without __index__), so the borrowed
// item pointers stay valid.
std::unique_ptr<std::uint32_t[]> ids_from_sequence(PyObject* seq, std::size_t n) {
  std::unique_ptr<std::uint32_t[]> ids(new std::uint32_t[n > 0 ? n : 1]);
  PyObject** items = PySequence_Fast_ITEMS(seq);
  for (std::size_t i = 0; i < n; ++i) {
    PyObject* item = items[i];
    if (!PyLong_Check(item) || PyBool_Check(item)) {
      throw Error(ErrorCode::kInvalidType, "token at index " + std::to_string(i) + " is " +
                                               type_name(item) + " (" + short_repr(item) +
                                               "); expected int");
    }
    long long v = 0;
    int overflow = 0;
    if (!compact_value(item, &v)) v = PyLong_AsLongLongAndOverflow(item, &overflow);
    if (overflow != 0 || v < 0 || v > 0xFFFFFFFFLL) {
      throw Error(ErrorCode::kInvalidArgument,
                  "token id " + py::str(item).cast<std::string>() + " at index " +
                      std::to_string(i) + " is out of range; expected 0 <= id < 2**32");
    }
    ids[i] = static_cast<std::uint32_t>(v);
  }
  return ids;
}

py::list hash_chunks(py::handle tokens, long long chunk_tokens, py::bytes namespace_) {
  if (chunk_tokens < 1) {
    throw Error(ErrorCode::kInvalidArgument,
                "chunk_tokens is " + std::to_string(chunk_tokens) + "; expected an int >= 1");
  }
  const auto chunk = static_cast<std::size_t>(chunk_tokens);
  char* ns_data = nullptr;
  Py_ssize_t ns_len = 0;
  if (PyBytes_AsStringAndSize(namespace_.ptr(), &ns_data, &ns_len) != 0) {
    throw py::error_already_set();
  }
  // The bytes object is kept alive by the caller's reference for the whole call.
  const std::string_view ns(ns_data, static_cast<std::size_t>(ns_len));
  PyObject* obj = tokens.ptr();

  if (PyList_Check(obj) || PyTuple_Check(obj)) {
    const auto n = static_cast<std::size_t>(PySequence_Fast_GET_SIZE(obj));
    const auto ids = ids_from_sequence(obj, n);
    std::unique_ptr<std::uint8_t[]> keys(new std::uint8_t[(n / chunk) * 32 + 1]);
    const std::size_t n_keys =
        hash_released(ids.get(), n, 4, kh::IntLayout{4, false, false}, chunk, ns, keys.get());
    return keys_to_list(keys.get(), n_keys);
  }

  if (!PyObject_CheckBuffer(obj)) {
    throw Error(ErrorCode::kInvalidType,
                "tokens is " + type_name(obj) + "; expected a list or tuple of ints or a 1-D "
                "integer array (numpy.ndarray, array.array, memoryview, torch.Tensor)");
  }
  std::optional<BufferView> buffer;
  try {
    buffer.emplace(obj);
  } catch (py::error_already_set& e) {
    throw Error(ErrorCode::kInvalidType, "tokens (" + type_name(obj) + ", " +
                                             describe_elements(obj, nullptr) +
                                             ") cannot be read as integer ids: " + e.what());
  }
  const Py_buffer& v = buffer->get();
  if (v.ndim != 1) {
    throw Error(ErrorCode::kInvalidType,
                "tokens must be 1-D; got shape " + shape_text(v) + " (" + type_name(obj) + ")");
  }
  kh::IntLayout layout{};
  if (!parse_int_format(v.format, v.itemsize, &layout)) {
    throw Error(ErrorCode::kInvalidType, "tokens have " + describe_elements(obj, v.format) +
                                             "; expected an integer dtype (signed or unsigned, "
                                             "1 to 8 bytes)");
  }
  const auto n = static_cast<std::size_t>(v.shape != nullptr ? v.shape[0] : v.len / v.itemsize);
  const std::ptrdiff_t stride = v.strides != nullptr ? v.strides[0] : v.itemsize;
  std::unique_ptr<std::uint8_t[]> keys(new std::uint8_t[(n / chunk) * 32 + 1]);
  // With the GIL released another thread may write into the array while we read it; that is
  // the caller's race (as with hashlib on a bytearray). The exported buffer cannot be resized
  // or freed until BufferView releases it, so memory safety does not depend on the caller.
  const std::size_t n_keys = hash_released(v.buf, n, stride, layout, chunk, ns, keys.get());
  return keys_to_list(keys.get(), n_keys);
}

}  // namespace

void init_hashing(py::module_& m) {
  m.attr("HASH_GIL_RELEASE_TOKENS") = kReleaseGilTokens;
  const char* reason = kh::unavailable_reason();
  m.attr("HOT_PATHS")[py::str("hashing")] = py::str(reason);
  if (*reason != '\0') return;
  m.def("hash_chunks", &hash_chunks, py::arg("tokens"), py::arg("chunk_tokens"),
        py::arg("namespace"),
        "hash_chunks(tokens, chunk_tokens, namespace) -> list[bytes]\n\n"
        "Chained SHA-256 chunk keys (docs/keys.md) of a list/tuple of ints or a 1-D integer\n"
        "buffer; one 32-byte key per full chunk. Arguments other than tokens are assumed\n"
        "validated by kvortex.hashing.hash_chunks.");
}

}  // namespace kvortex::bindings
