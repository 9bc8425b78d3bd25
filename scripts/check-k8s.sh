#!/usr/bin/env bash
# Schema-checks deploy/k8s/*.yaml (scripts/check_k8s.py) with validators from PyPI, in a venv made once under
# $FERROTUNE_CACHE/k8s-venv: kubernetes-validate (core kinds, strict), kubeflow-training (PyTorchJob) and
# kubeflow-trainer-api (TrainJob).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${FERROTUNE_CACHE:-$HOME/.cache/ferrotune}/k8s-venv"
if ! "$venv/bin/python" -c 'import kubernetes_validate, kubeflow.training, kubeflow_trainer_api, yaml' >/dev/null 2>&1; then
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv" >&2
  "$venv/bin/pip" install -q kubernetes-validate==1.37.0 kubeflow-training==1.9.4 kubeflow-trainer-api==2.3.0 pyyaml >&2
fi
"$venv/bin/python" scripts/check_k8s.py deploy/k8s
