#!/usr/bin/env bash
# Dev-only: runs real llama.cpp (node-llama-cpp's prebuilt CPU build) on a GGUF file, to check that what
# `ferrotune export gguf` writes loads and computes correctly in llama.cpp itself. The product never needs it.
#
#   bash scripts/llama-cpp.sh eval FILE.gguf TEXT_FILE [--greedy N] [--prompt P] [--ctx N] [--threads N] [--kv F32|F16]
#
# prints one JSON object (see scripts/llama_cpp_eval.mjs): token_ids, mean_nll (nats, from full logits), greedy_ids,
# and the llama.cpp release/commit used. CPU only, 2 threads and a 512-token context unless told otherwise.
#
# The first run installs node-llama-cpp and its prebuilt binary package for this platform from the npm registry
# into ~/.cache/ferrotune-dev/node-llama-cpp (or $FERROTUNE_NLC_DIR): a plain `npm install` with
# --ignore-scripts (so node-llama-cpp's postinstall never downloads or builds llama.cpp) and --omit=optional (so
# the other platforms' and the CUDA/Vulkan binaries are not fetched; the one needed is a direct dependency).
# Needs node >= 20 and npm.
set -euo pipefail
[ "${1:-}" = eval ] || { echo "usage: bash scripts/llama-cpp.sh eval FILE.gguf TEXT_FILE [--greedy N] [--prompt P] [--ctx N] [--threads N] [--kv F32|F16]" >&2; exit 2; }
shift
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
dir="${FERROTUNE_NLC_DIR:-$HOME/.cache/ferrotune-dev/node-llama-cpp}"
version=3.22.1
case "$(uname -s)-$(uname -m)" in
  Linux-x86_64) bin=linux-x64 ;;
  Linux-aarch64) bin=linux-arm64 ;;
  *) echo "llama-cpp.sh: no prebuilt node-llama-cpp binary wired up for $(uname -sm)" >&2; exit 2 ;;
esac

# Never let node-llama-cpp download llama.cpp sources or build them, here or at run time.
export NODE_LLAMA_CPP_SKIP_DOWNLOAD=true NODE_LLAMA_CPP_GPU=false NODE_LLAMA_CPP_POSTINSTALL=skip

installed() {
  [ -f "$dir/node_modules/@node-llama-cpp/$bin/bins/$bin/llama-addon.node" ] &&
    node -e 'process.exit(require(process.argv[1]).version === process.argv[2] ? 0 : 1)' \
      "$dir/node_modules/node-llama-cpp/package.json" "$version" 2>/dev/null
}
if ! installed; then
  mkdir -p "$dir"
  cat > "$dir/package.json" <<EOF
{ "name": "ferrotune-dev-llama-cpp", "private": true, "type": "module",
  "dependencies": { "node-llama-cpp": "$version", "@node-llama-cpp/$bin": "$version" } }
EOF
  (cd "$dir" && npm install --omit=optional --ignore-scripts --no-audit --no-fund >&2)
  installed || { echo "llama-cpp.sh: install in $dir did not give node-llama-cpp $version + @node-llama-cpp/$bin" >&2; exit 1; }
fi

FERROTUNE_NLC_DIR="$dir" exec node "$here/llama_cpp_eval.mjs" "$@"
