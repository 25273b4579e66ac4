// kvortex._native.HostSlabPool: the binding of kvortex::SlabPool, and SlotBuffer, the object
// that exports one slot's memory to the memoryviews view() returns.
//
// Argument conversion happens here, not through pybind11's casters, so that every bad argument
// raises the KVortex class the Python fallback raises (InvalidTypeError for a non-integer or a
// bool, InvalidArgumentError / SlotError for a value out of range, even one beyond int64).
#include <kvortex/errors.h>
#include <kvortex/slab_pool.h>

#include <climits>
#include <cstdint>
#include <limits>
#include <memory>
#include <new>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "bindings.h"

namespace py = pybind11;

namespace kvortex::bindings {
namespace {

// ---------------------------------------------------------------------------------------------
// SlotBuffer: a minimal buffer exporter. Each view() creates one and wraps it in a memoryview;
// the memoryview holds the only reference. The exporter owns a SlotMemory (an aliasing
// shared_ptr into the pool's mapping), so the mapping outlives close() for as long as any view
// of it exists: writing through a view after close() is safe, and the munmap happens when the
// last view is released. Written against the C API rather than py::class_ because it sits on
// the hot path of view(): one small allocation, no buffer_info vectors.
struct SlotBufferObject {
  PyObject_HEAD
  SlotMemory memory;  // constructed with placement new in make_view, destroyed in dealloc
  Py_ssize_t size;
};

PyTypeObject* g_slot_buffer_type = nullptr;  // strong reference for the life of the process

int slot_buffer_getbuffer(PyObject* self, Py_buffer* view, int flags) {
  auto* obj = reinterpret_cast<SlotBufferObject*>(self);
  // One-dimensional, unsigned bytes ("B"), writable, contiguous.
  return PyBuffer_FillInfo(view, self, obj->memory.get(), obj->size, /*readonly=*/0, flags);
}

void slot_buffer_dealloc(PyObject* self) {
  auto* obj = reinterpret_cast<SlotBufferObject*>(self);
  PyTypeObject* type = Py_TYPE(self);
  // Dropping the last SlotMemory of a closed pool unmaps its region here.
  obj->memory.~SlotMemory();
  type->tp_free(self);
  Py_DECREF(type);  // instances of heap types own a reference to their type
}

PyType_Slot g_slot_buffer_slots[] = {
    {Py_bf_getbuffer, reinterpret_cast<void*>(&slot_buffer_getbuffer)},
    {Py_tp_dealloc, reinterpret_cast<void*>(&slot_buffer_dealloc)},
    {Py_tp_doc,
     const_cast<char*>("Exports one HostSlabPool slot to a memoryview and keeps the pool's "
                       "mapping alive while that memoryview exists.")},
    {0, nullptr},
};

PyType_Spec g_slot_buffer_spec = {
    "kvortex._native.SlotBuffer",
    static_cast<int>(sizeof(SlotBufferObject)),
    0,
    // Created only by view(): an instance made from Python would hold no memory.
    Py_TPFLAGS_DEFAULT | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    g_slot_buffer_slots,
};

py::object make_view(SlotMemory memory, std::int64_t size) {
  PyObject* raw = g_slot_buffer_type->tp_alloc(g_slot_buffer_type, 0);
  if (raw == nullptr) throw py::error_already_set();
  auto* obj = reinterpret_cast<SlotBufferObject*>(raw);
  new (&obj->memory) SlotMemory(std::move(memory));
  obj->size = static_cast<Py_ssize_t>(size);
  // The memoryview takes its own reference to the exporter; ours is dropped right after.
  PyObject* view = PyMemoryView_FromObject(raw);
  Py_DECREF(raw);
  if (view == nullptr) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(view);
}

// ---------------------------------------------------------------------------------------------
// Argument conversion.

std::string repr_of(py::handle value) { return py::repr(value).cast<std::string>(); }

[[noreturn]] void not_an_integer(const char* name, py::handle value) {
  throw Error(ErrorCode::kInvalidType, std::string(name) + "=" + repr_of(value) +
                                           " is not an integer (got " +
                                           Py_TYPE(value.ptr())->tp_name + ")");
}

// An integer argument: an int, or anything with __index__ (numpy integers); never a bool.
// Sets *overflow to -1 / +1 when the value lies below / above int64.
std::int64_t integer_arg(const char* name, py::handle value, int* overflow) {
  PyObject* o = value.ptr();
  *overflow = 0;
  if (PyLong_CheckExact(o)) {
    const long long v = PyLong_AsLongLongAndOverflow(o, overflow);
    if (v == -1 && PyErr_Occurred()) throw py::error_already_set();
    return v;
  }
  if (PyBool_Check(o) || !PyIndex_Check(o)) not_an_integer(name, value);
  py::object index = py::reinterpret_steal<py::object>(PyNumber_Index(o));
  if (!index) throw py::error_already_set();
  const long long v = PyLong_AsLongLongAndOverflow(index.ptr(), overflow);
  if (v == -1 && PyErr_Occurred()) throw py::error_already_set();
  return v;
}

// A slot id; its type is checked before the pool's state, as in the Python fallback.
std::int64_t slot_arg(const SlabPool& pool, const char* op, py::handle value) {
  PyObject* o = value.ptr();
  if (PyLong_CheckExact(o)) {  // the fast path: a plain int that fits
    int overflow = 0;
    const long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (overflow == 0) return v;
  }
  int overflow = 0;
  const std::int64_t v = integer_arg("slot", value, &overflow);
  if (overflow == 0) return v;
  // Beyond int64: out of range, unless the closed pool is the first thing to report.
  const std::string call = std::string(op) + "(" + repr_of(value) + ")";
  if (pool.closed()) throw Error(ErrorCode::kPoolClosed, call + " on a closed HostSlabPool");
  throw Error(ErrorCode::kSlotError, call + ": slot " + repr_of(value) +
                                         " is out of range; this pool has slots 0.." +
                                         std::to_string(pool.num_slots() - 1));
}

HugePages hugepages_arg(py::handle value) {
  if (value.ptr() == Py_True) return HugePages::kRequired;
  if (value.ptr() == Py_False) return HugePages::kOff;
  if (!PyUnicode_Check(value.ptr())) {
    throw Error(ErrorCode::kInvalidType, "hugepages=" + repr_of(value) +
                                             " is not allowed; expected 'auto', True or False "
                                             "(got " +
                                             Py_TYPE(value.ptr())->tp_name + ")");
  }
  if (value.cast<std::string>() == "auto") return HugePages::kAuto;
  throw Error(ErrorCode::kInvalidArgument,
              "hugepages=" + repr_of(value) + " is not allowed; expected 'auto', True or False");
}

std::unique_ptr<SlabPool> make_pool(py::handle slot_bytes, py::handle num_slots,
                                    py::handle numa_node, py::handle hugepages) {
  // Every argument's type first, then the values, in the order the Python fallback uses.
  int sb_over = 0;
  int ns_over = 0;
  int node_over = 0;
  const std::int64_t sb = integer_arg("slot_bytes", slot_bytes, &sb_over);
  const std::int64_t ns = integer_arg("num_slots", num_slots, &ns_over);
  std::int64_t node = 0;
  if (!numa_node.is_none()) node = integer_arg("numa_node", numa_node, &node_over);
  const HugePages mode = hugepages_arg(hugepages);

  // Values beyond int64 never reach the core; report them as it would, with Python's digits.
  auto below_one = [](std::int64_t v, int over) { return over < 0 || (over == 0 && v < 1); };
  if (below_one(sb, sb_over) || below_one(ns, ns_over)) {
    const bool sb_bad = below_one(sb, sb_over);
    throw Error(ErrorCode::kInvalidArgument,
                std::string(sb_bad ? "slot_bytes=" : "num_slots=") +
                    repr_of(sb_bad ? slot_bytes : num_slots) +
                    " is not allowed; expected an integer >= 1");
  }
  if (sb_over > 0 || ns_over > 0) {
    throw Error(ErrorCode::kInvalidArgument,
                "slot_bytes=" + repr_of(slot_bytes) + " x num_slots=" + repr_of(num_slots) +
                    " is too large: the region (slots rounded up to " +
                    std::to_string(kSlotAlignment) + " bytes) must be at most " +
                    std::to_string(std::numeric_limits<std::ptrdiff_t>::max()) + " bytes");
  }
  std::optional<int> node_id;
  if (!numa_node.is_none()) {
    if (node_over < 0 || (node_over == 0 && node < 0)) {
      throw Error(ErrorCode::kInvalidArgument,
                  "numa_node=" + repr_of(numa_node) +
                      " is not allowed; expected None or a NUMA node id >= 0");
    }
    if (node_over > 0 || node > INT_MAX) {
      const std::vector<int> nodes = HostMemoryInfo::numa_nodes();
      std::string present;
      for (int n : nodes) present += (present.empty() ? "" : ", ") + std::to_string(n);
      throw Error(ErrorCode::kInvalidArgument,
                  "numa_node=" + repr_of(numa_node) + " does not exist on this machine; " +
                      (nodes.empty() ? "no NUMA nodes are listed under /sys/devices/system/node"
                                     : "NUMA nodes present: " + present));
    }
    node_id = static_cast<int>(node);
  }
  try {
    return std::make_unique<SlabPool>(sb, ns, node_id, mode);
  } catch (const SystemCallError& e) {
    // OSError(errno, message), exactly what the Python fallback raises.
    PyErr_SetObject(PyExc_OSError, py::make_tuple(e.error_number(), e.what()).ptr());
    throw py::error_already_set();
  }
}

}  // namespace

void init_pool(py::module_& m) {
  if (g_slot_buffer_type == nullptr) {
    PyObject* type = PyType_FromSpec(&g_slot_buffer_spec);
    if (type == nullptr) throw py::error_already_set();
    g_slot_buffer_type = reinterpret_cast<PyTypeObject*>(type);
  }
  m.attr("SlotBuffer") = py::handle(reinterpret_cast<PyObject*>(g_slot_buffer_type));

  py::class_<SlabPool>(m, "HostSlabPool",
                       "Native host slab pool; use kvortex.memory.HostSlabPool instead.")
      .def(py::init(&make_pool), py::arg("slot_bytes"), py::arg("num_slots"),
           py::arg("numa_node") = py::none(), py::arg("hugepages") = "auto")
      .def("alloc",
           [](SlabPool& self) -> py::object {
             const std::int64_t slot = self.alloc();
             if (slot == SlabPool::kNoSlot) return py::none();
             return py::reinterpret_steal<py::object>(PyLong_FromLongLong(slot));
           })
      .def("free", [](SlabPool& self, py::handle slot) { self.free(slot_arg(self, "free", slot)); },
           py::arg("slot"))
      .def(
          "view",
          [](SlabPool& self, py::handle slot) {
            return make_view(self.memory(slot_arg(self, "view", slot)), self.slot_bytes());
          },
          py::arg("slot"))
      .def(
          "address",
          [](SlabPool& self, py::handle slot) {
            const auto addr = reinterpret_cast<std::uintptr_t>(
                self.address(slot_arg(self, "address", slot)));
            return py::reinterpret_steal<py::object>(
                PyLong_FromUnsignedLongLong(static_cast<unsigned long long>(addr)));
          },
          py::arg("slot"))
      .def("close", &SlabPool::close)
      .def_property_readonly("slot_bytes", &SlabPool::slot_bytes)
      .def_property_readonly("slot_stride", &SlabPool::slot_stride)
      .def_property_readonly("num_slots", &SlabPool::num_slots)
      .def_property_readonly("nbytes", &SlabPool::nbytes)
      .def_property_readonly("base_address",
                             [](const SlabPool& self) {
                               return static_cast<unsigned long long>(self.base_address());
                             })
      .def_property_readonly("used", &SlabPool::used)
      .def_property_readonly("available", &SlabPool::available)
      .def_property_readonly("closed", &SlabPool::closed)
      .def_property_readonly("numa_node",
                             [](const SlabPool& self) -> py::object {
                               if (!self.numa_node()) return py::none();
                               return py::int_(*self.numa_node());
                             })
      .def_property_readonly("hugepages", &SlabPool::hugepages);

  m.attr("HOT_PATHS")["pool"] = "";
}

}  // namespace kvortex::bindings
