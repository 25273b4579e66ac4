// Maps kvortex::Error codes to the Python classes of kvortex/errors.py (looked up once, at
// import, so both backends raise the very same types).
#include <kvortex/errors.h>

#include "bindings.h"

namespace py = pybind11;

namespace kvortex::bindings {

void register_errors(py::module_& m) {
  (void)m;
  // Leaked on purpose: the translator may run during interpreter shutdown, after module
  // objects are gone; a strong reference held for the life of the process is the safe choice.
  // Indexed by ErrorCode; the order here must follow the enum in errors.h.
  static PyObject* classes[8] = {};
  py::module_ errors = py::module_::import("kvortex.errors");
  const char* names[8] = {"InvalidArgumentError", "InvalidTypeError", "QueueTimeout",
                          "QueueClosed",          "SlotError",        "PoolClosed",
                          nullptr,                "TransferError"};
  for (int i = 0; i < 8; ++i) {
    classes[i] = names[i] ? py::object(errors.attr(names[i])).release().ptr() : PyExc_OSError;
  }
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const kvortex::Error& e) {
      PyErr_SetString(classes[static_cast<int>(e.code())], e.what());
    }
  });
}

}  // namespace kvortex::bindings
