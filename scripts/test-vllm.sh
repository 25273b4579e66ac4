#!/usr/bin/env bash
# KVortexConnector against the real vLLM: installs vllm==VERSION (from PyPI; about 9 GB, a few
# minutes the first time) and this repository into a private virtual environment, then runs the
# vllm-marked tests against the installed package.
#
#   scripts/test-vllm.sh 0.33.0        (scripts/test.sh runs it for 0.15.1 and 0.33.0)
#
# The environment lives in ${KVORTEX_VLLM_VENV_DIR:-<repo>/.venv-vllm}/VERSION and is reused by
# later runs. vLLM runs on CPU here: the tests drive its scheduler and model-runner plumbing
# with a tiny model config (tests/data/tiny_llama), no weights and no GPU.
set -euo pipefail
if [ $# -ne 1 ]; then
  echo "usage: $0 VLLM_VERSION (e.g. 0.33.0)" >&2
  exit 2
fi
version=$1
cd "$(dirname "$0")/.."
root=$(pwd)
py=${PYTHON:-python3}
venv=${KVORTEX_VLLM_VENV_DIR:-$root/.venv-vllm}/$version

step() { printf '\n==> %s\n' "$*"; }
# Temporary working directories (so the installed package, not the tree, is imported) go away
# on exit, pass or fail; the venv is kept for the next run.
work=$(mktemp -d "${TMPDIR:-/tmp}/kvortex-vllm.XXXXXX")
trap 'rm -rf "$work"' EXIT

step "virtual environment $venv (vllm $version)"
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"
python -m pip install -q --upgrade pip
# vLLM first: it pins the torch it was built against, and KVortex must run on that one.
python -m pip install -q "vllm==$version"
python -m pip install -q pytest hypothesis redis hiredis
# The repository itself (compiles the C++ core), rebuilt on every run so the tests see this
# tree; --no-deps keeps vLLM's pins untouched (KVortex's own dependencies come with vLLM).
python -m pip install -q --no-deps --force-reinstall .
python -m pip check

step "versions"
# From a temporary directory: the installed package, not the source tree, must be imported.
(cd "$work" && python - "$version") <<'EOF'
import sys

import kvortex
import kvortex.backend as backend
import torch
import vllm

assert vllm.__version__ == sys.argv[1], (vllm.__version__, sys.argv[1])
print(f"vllm {vllm.__version__}, torch {torch.__version__}, kvortex {kvortex.__version__}")
for choice in backend.describe():
    print(f"  {choice.hot_path}: {choice.active} ({choice.reason})")
EOF

step "vllm $version tests"
# From a temporary directory, so that the installed package, not the source tree, is tested.
# Offline: the tiny model config is read from tests/data, nothing is downloaded.
(cd "$work" && HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 KVORTEX_REQUIRE_VLLM=1 \
  python -m pytest -c "$root/pyproject.toml" --rootdir "$root" -m vllm -q \
  --basetemp "$work/pytest" \
  "$root/tests/test_vllm_scheduler.py" "$root/tests/test_vllm_worker.py")
step "vllm $version: all checks passed"
