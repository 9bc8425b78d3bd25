#!/usr/bin/env bash
# Installs libtorch the one way ferrotune allows: the PyPI wheel torch==2.11.0 (the version tch 0.24 pairs
# with) in a virtualenv under the ferrotune cache. Idempotent: a venv that already imports that torch is kept.
# Prints nothing on success but the venv path.
set -euo pipefail
cache="${FERROTUNE_CACHE:-$HOME/.cache/ferrotune}"
venv="${FERROTUNE_VENV:-$cache/venv}"
want="2.11.0"
have=$("$venv/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || true)
if [ "$have" != "$want" ]; then
  echo "installing torch==$want into $venv (libtorch for tch 0.24)" >&2
  mkdir -p "$cache"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "torch==$want" numpy >&2
fi
# The CUDA C++ core library headers (libcu++ `nv/target`), which the CUDA runtime headers of the wheel's
# nvidia-* packages include: services/core/build.rs builds the NCCL shim with them (headers only).
if ! "$venv/bin/python" -c 'import glob, sys; sys.exit(not glob.glob(sys.prefix + "/lib/python3*/site-packages/nvidia/cu13/include/nv/target"))'; then
  "$venv/bin/pip" install -q --disable-pip-version-check "nvidia-cuda-cccl==13.0.*" >&2
fi
echo "$venv"
