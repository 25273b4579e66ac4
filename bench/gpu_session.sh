#!/usr/bin/env bash
# One GPU session for the CUDA copy engine: build with CMake, run the GPU tests, run the
# transfer benchmark. Run from anywhere on the GPU machine:
#
#   bash bench/gpu_session.sh            # results and logs in $OUT (default: ./out)
#
# Needs: an NVIDIA driver and GPU, nvcc, cmake, a C++ compiler, Python with torch (CUDA),
# numpy, pybind11 and pytest. No network. Every step says what failed; the exit status
# is non-zero if the build, a test or the benchmark failed. The output ends with the benchmark's
# compact table and a result block; full logs: $OUT/{build,pytest,bench}.log, $OUT/transfer.json.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/out}
mkdir -p "$OUT"

die() {
  echo "gpu_session: FAILED: $*" >&2
  exit 1
}
step() { printf '\n=== %s ===\n' "$*"; }
# "exit N" for a failed command; timeout(1) exits with 124.
exit_text() {
  if [ "$1" = 124 ]; then echo "exit 124: timed out after $2 s"; else echo "exit $1"; fi
}

step "machine"
command -v nvidia-smi >/dev/null || die "nvidia-smi not found: no NVIDIA driver here"
nvidia-smi -L || die "nvidia-smi -L failed: is a GPU visible?"
if ! command -v nvcc >/dev/null; then
  for dir in /usr/local/cuda/bin /usr/local/cuda-*/bin; do
    if [ -x "$dir/nvcc" ]; then
      export PATH="$dir:$PATH"
      break
    fi
  done
fi
command -v nvcc >/dev/null || die "nvcc not found (not on PATH, not in /usr/local/cuda*/bin): cannot build kvortex._cuda"
nvcc --version | tail -1
command -v cmake >/dev/null || die "cmake not found"
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if command -v python >/dev/null; then PY=python; else PY=python3; fi
fi
command -v "$PY" >/dev/null || die "no Python interpreter ($PY)"
"$PY" -c "import torch, numpy, pybind11, pytest" ||
  die "missing Python packages: need torch, numpy, pybind11, pytest"
"$PY" -c "import torch; print(f'torch {torch.__version__} (CUDA {torch.version.cuda}), ' \
f'GPUs visible to torch: {torch.cuda.device_count()}')"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" ||
  die "torch.cuda.is_available() is False: torch is a CPU build or cannot use the driver"
echo "source: $(git -C "$ROOT" log -1 --oneline 2>/dev/null || echo 'no git metadata')"

step "build (CMake, Release) -> $OUT/build.log"
BUILD=$ROOT/build/gpu-session
GENERATOR=()
if command -v ninja >/dev/null; then GENERATOR=(-G Ninja); fi
if ! {
  cmake -S "$ROOT" -B "$BUILD" ${GENERATOR[@]+"${GENERATOR[@]}"} -DCMAKE_BUILD_TYPE=Release -DKVORTEX_CUDA=ON \
    -DCMAKE_CUDA_COMPILER="$(command -v nvcc)" \
    -DPython_EXECUTABLE="$(command -v "$PY")" \
    -Dpybind11_DIR="$("$PY" -c 'import pybind11; print(pybind11.get_cmake_dir())')" &&
    cmake --build "$BUILD" -j "$(nproc)"
} >"$OUT/build.log" 2>&1; then
  tail -60 "$OUT/build.log"
  die "build failed (last lines above, full log in $OUT/build.log)"
fi
grep -E "warning|kvortex:" "$OUT/build.log" || true
compgen -G "$BUILD/_cuda*.so" >/dev/null ||
  die "kvortex._cuda was not built (CMake found no CUDA compiler?); see $OUT/build.log"
cp "$BUILD"/_native*.so "$BUILD"/_cuda*.so "$BUILD"/_build_info.json "$ROOT/kvortex/"
echo "built: $(cd "$ROOT/kvortex" && echo _native*.so _cuda*.so) ($(cat "$ROOT/kvortex/_build_info.json"))"
if ldd "$ROOT"/kvortex/_cuda*.so | grep -E "libtorch|libc10|libcudart"; then
  die "kvortex._cuda links torch or the shared CUDA runtime (it must link cudart statically only)"
fi

step "kvortex._cuda on this machine"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
"$PY" - <<'EOF' || die "kvortex._cuda is not usable here (reason above)"
import sys

import torch

from kvortex import _loader

loaded = _loader.cuda()
if loaded.module is None:
    sys.exit(f"kvortex._cuda failed to import: {loaded.reason}")
c = loaded.module
print(f"kvortex._cuda: {c.device_count()} device(s), runtime {c.runtime_version()}, "
      f"driver {c.driver_version()}; torch sees {torch.cuda.device_count()}")
if c.device_count() < 1:
    sys.exit("kvortex._cuda sees no device: is the driver older than the CUDA runtime it was "
             "built with? (runtime and driver versions above)")
EOF

status=0
step "GPU tests -> $OUT/pytest.log"
TESTS=(tests/test_transfer_gpu.py tests/test_engine_gpu.py)
if [ -f tests/test_transfer.py ]; then TESTS+=(tests/test_transfer.py); fi
echo "$PY -m pytest -m gpu -q ${TESTS[*]}"
if KVORTEX_REQUIRE_NATIVE=1 timeout 180 "$PY" -m pytest -m gpu -q -rfEs --tb=short \
  "${TESTS[@]}" >"$OUT/pytest.log" 2>&1; then
  tests="ok"
else
  rc=$?
  tests="FAILED ($(exit_text "$rc" 180))"
  status=1
fi
tail -80 "$OUT/pytest.log"

if [ "${KVORTEX_TESTS_ONLY:-0}" = 1 ]; then
  [ "$status" = 0 ] || die "GPU tests failed"
  echo "tests only (KVORTEX_TESTS_ONLY=1): ok"
  exit 0
fi

step "benchmark -> $OUT/bench.log, $OUT/transfer.json"
if timeout 300 "$PY" bench/transfer.py --out "$OUT/transfer.json" >"$OUT/bench.log" 2>&1; then
  bench="ok"
else
  rc=$?
  bench="FAILED ($(exit_text "$rc" 300))"
  status=1
fi
if grep -q "^== KVortex transfer bench" "$OUT/bench.log"; then
  sed -n '/^== KVortex transfer bench/,$p' "$OUT/bench.log"
else
  tail -60 "$OUT/bench.log"
fi

step "engine benchmark -> $OUT/engine.log"
if timeout 240 "$PY" bench/engine.py >"$OUT/engine.log" 2>&1; then
  engine_bench="ok"
else
  rc=$?
  engine_bench="FAILED ($(exit_text "$rc" 240))"
  status=1
fi
cat "$OUT/engine.log"

step "connector benchmark -> $OUT/connector.log"
if timeout 240 "$PY" bench/connector.py >"$OUT/connector.log" 2>&1; then
  connector_bench="ok"
else
  rc=$?
  connector_bench="FAILED ($(exit_text "$rc" 240))"
  status=1
fi
cat "$OUT/connector.log"

step "result"
echo "build: ok"
echo "tests: $tests  ($(grep -E '[0-9]+ (passed|failed)' "$OUT/pytest.log" | tail -1))"
echo "bench: $bench"
echo "engine bench: $engine_bench"
echo "connector bench: $connector_bench"
echo "logs:  $OUT/build.log $OUT/pytest.log $OUT/bench.log $OUT/transfer.json"
[ "$status" = 0 ] || die "see the sections above"
