#include "bindings.h"

namespace kvortex::bindings {

void init_hashing(pybind11::module_& m) { (void)m; }

}  // namespace kvortex::bindings
