// kvortex._native: the one compiled module of the C++ core. Each hot path binds itself in its
// own file; this file only assembles them.
#include "bindings.h"

PYBIND11_MODULE(_native, m) {
  m.doc() = "KVortex compiled core (hashing, SPSC queue, host slab pool, disk I/O)";
  kvortex::bindings::register_errors(m);
  // Each init_* records its hot path here: "" when usable, else why not (kvortex info shows it).
  m.attr("HOT_PATHS") = pybind11::dict();
  kvortex::bindings::init_hashing(m);
  kvortex::bindings::init_queue(m);
  kvortex::bindings::init_pool(m);
  kvortex::bindings::init_disk_io(m);
}
