// Declarations shared by the binding files. Only csrc/bindings/ includes pybind11.
#pragma once

#include <pybind11/pybind11.h>

namespace kvortex::bindings {

void register_errors(pybind11::module_& m);
void init_hashing(pybind11::module_& m);
void init_queue(pybind11::module_& m);
void init_pool(pybind11::module_& m);
void init_disk_io(pybind11::module_& m);

}  // namespace kvortex::bindings
