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
  static PyObject* classes[7] = {};
  py::module_ errors = py::module_::import("kvortex.errors");
  const char* names[7] = {"InvalidArgumentError", "InvalidTypeError", "QueueTimeout",
                          "QueueClosed",          "SlotError",        "PoolClosed",
                          nullptr};
  for (int i = 0; i < 6; ++i) classes[i] = py::object(errors.attr(names[i])).release().ptr();
  classes[6] = PyExc_OSError;
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const kvortex::Error& e) {
      PyErr_SetString(classes[static_cast<int>(e.code())], e.what());
    }
  });
}

}  // namespace kvortex::bindings
