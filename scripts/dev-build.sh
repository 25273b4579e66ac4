#!/usr/bin/env bash
# Developer build: compile the native core into build/ and drop the extension(s) next to the
# Python sources, so `PYTHONPATH=. pytest` runs against the tree without a pip install.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=${BUILD_TYPE:-Release} \
  -DPython_EXECUTABLE="$(command -v "$py")" \
  -Dpybind11_DIR="$("$py" -c 'import pybind11; print(pybind11.get_cmake_dir())')" "$@" >/dev/null
cmake --build build
cp build/_native*.so kvortex/
cp build/_cuda*.so kvortex/ 2>/dev/null || true
cp build/_build_info.json kvortex/
