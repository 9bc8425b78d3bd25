#!/usr/bin/env bash
# Prints the path of a venv with the experiment trackers the tests talk to: a real MLflow tracking server
# (`mlflow server`) and the `tensorboard` package, whose event reader checks ferrotune's event files. Made once
# under $FERROTUNE_CACHE/tracking-venv (default ~/.cache/ferrotune); the product never needs it.
set -euo pipefail
venv="${FERROTUNE_TRACKING_VENV:-${FERROTUNE_CACHE:-$HOME/.cache/ferrotune}/tracking-venv}"
if ! "$venv/bin/python" -c 'import mlflow, tensorboard' >/dev/null 2>&1 || [ ! -x "$venv/bin/mlflow" ]; then
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv" >&2
  "$venv/bin/pip" install -q mlflow==3.17.2 tensorboard==2.21.0 >&2
fi
echo "$venv"
