# Source this (`. scripts/env.sh`) to run cargo directly with the same environment as the Makefile:
# libtorch from the torch==2.11.0 venv (installed by `make libtorch`) and the shared target dir.
FERROTUNE_CACHE="${FERROTUNE_CACHE:-$HOME/.cache/ferrotune}"
export FERROTUNE_CACHE
export VIRTUAL_ENV="$FERROTUNE_CACHE/venv"
export PATH="$VIRTUAL_ENV/bin:$PATH"
export LIBTORCH_USE_PYTORCH=1
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$FERROTUNE_CACHE/target}"
