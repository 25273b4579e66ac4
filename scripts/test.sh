#!/usr/bin/env bash
# The one test command (README, and .ci/run calls it): installs everything the tests need into
# private virtual environments, then runs lint, types, the suite over every backend, the
# pure-Python pass, the wheel/sdist build with a fresh-venv import, an install without a
# compiler, and the vLLM connector tests against vLLM 0.15.1 and 0.33.0 (scripts/test-vllm.sh;
# KVORTEX_VLLM_VERSIONS overrides the list, e.g. "" to skip them while iterating locally).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
py=${PYTHON:-python3}
venv=${KVORTEX_TEST_VENV:-$root/.venv-test}

step() { printf '\n==> %s\n' "$*"; }

# Temporary directories (the pytest working and --basetemp directories, the built dist, the
# fresh and no-compiler venvs) are made with tmpdir and removed on exit, pass or fail. The
# persistent .venv-test and .venv-vllm environments are reused by the next run and are kept.
tmpdirs=()
cleanup() {
  local d
  for d in ${tmpdirs[@]+"${tmpdirs[@]}"}; do
    rm -rf -- "$d"
  done
}
trap cleanup EXIT
# Sets the variable named $1 to a new temporary directory. Not $(...): a subshell could not
# add to tmpdirs.
tmpdir() {
  local d
  d=$(mktemp -d "${TMPDIR:-/tmp}/kvortex-test.XXXXXX")
  tmpdirs+=("$d")
  printf -v "$1" '%s' "$d"
}

step "virtual environment $venv"
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"
python -m pip install -q --upgrade pip
# torch (CPU) is what the transfer fallback and the tensor-input tests run on. 2.13.0 is the
# release this machine kind keeps on disk; any torch >= 2.4 works.
python -m pip install -q "torch==${KVORTEX_TEST_TORCH:-2.13.0}"
python -m pip install -q ".[test]"
# The shared-tier tests run against real redis-server processes (CI runs as root on Debian).
command -v redis-server >/dev/null || (apt-get update && apt-get install -y redis-server)

# CI must test the compiled core and the shared tier: a missing native build, redis-server or
# redis package fails instead of skipping.
export KVORTEX_REQUIRE_NATIVE=1
export KVORTEX_REQUIRE_REDIS=1
step "kvortex info"
kvortex info --no-cuda
redis-server --version

step "ruff + mypy"
ruff check kvortex tests bench
ruff format --check kvortex tests bench
mypy kvortex

step "tests (every backend)"
# Run from a temporary directory so the installed package, not the source tree, is tested.
tmpdir work
(cd "$work" && python -m pytest -c "$root/pyproject.toml" --rootdir "$root" \
  --basetemp "$work/pytest" "$root/tests" -q)

step "tests with KVORTEX_BACKEND=python"
tmpdir work
(cd "$work" && KVORTEX_BACKEND=python python -m pytest -c "$root/pyproject.toml" \
  --rootdir "$root" --basetemp "$work/pytest" "$root/tests" -q)

step "wheel + sdist, installed into a fresh venv"
tmpdir dist
python -m build --outdir "$dist" . >/dev/null
tmpdir fresh
fresh=$fresh/venv
"$py" -m venv "$fresh"
"$fresh/bin/python" -m pip install -q "$dist"/kvortex-*.whl
(cd "$fresh" && "$fresh/bin/python" -c "
import kvortex, kvortex.backend as b
assert all(c.active == 'native' for c in b.describe()), b.describe()
print('fresh venv import ok:', kvortex.__version__)")
ls "$dist"

step "install without a C++ compiler: the package still installs and runs on the fallbacks"
tmpdir nocc
nocc=$nocc/venv
"$py" -m venv "$nocc"
CXX=/nonexistent/c++ CUDACXX=/nonexistent/nvcc "$nocc/bin/python" -m pip install -q .
(cd "$nocc" && KVORTEX_REQUIRE_NATIVE=0 "$nocc/bin/python" -c "
import kvortex, kvortex.backend as b
assert all(c.active == 'python' for c in b.describe()), b.describe()
assert 'no C++ compiler' in b.native_reason('hashing'), b.native_reason('hashing')
assert len(kvortex.hash_chunks(list(range(512)))) == 2
print('no-compiler install ok:', b.native_reason('pool'))")
step "vLLM connector against the real vLLM, each line in its own venv"
for version in ${KVORTEX_VLLM_VERSIONS-0.15.1 0.33.0}; do
  bash scripts/test-vllm.sh "$version"
done
step "all checks passed"
