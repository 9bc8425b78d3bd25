"""Schema checks of deploy/k8s/*.yaml (run by `make lint` through scripts/check-k8s.sh):
- core kinds (Job, Service, PersistentVolumeClaim) with kubernetes-validate --strict (the Kubernetes OpenAPI
  schemas it bundles; unknown fields are errors);
- PyTorchJob (kubeflow.org/v1) against the training-operator SDK's generated models (kubeflow-training): every
  key of the spec and replica specs must be a field there, and each pod template is validated strictly as a core
  PodTemplate;
- TrainJob (trainer.kubeflow.org/v1alpha1) against Kubeflow Trainer's generated pydantic models
  (kubeflow-trainer-api): the object must validate, with no key the models do not know.
Exit status 1 with one line per problem."""
import sys
from pathlib import Path

import kubernetes_validate
import yaml

K8S = "1.33.0"
problems = []


def strict_core(doc, where):
    try:
        kubernetes_validate.validate(doc, K8S, strict=True)
    except Exception as e:  # ValidationError, InvalidSchemaError, …
        problems.append(f"{where}: {str(e).splitlines()[0]}")


def pod_template(tpl, where):
    strict_core({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": tpl}, where)


def known(d, allowed, where):
    for k in d:
        if k not in allowed:
            problems.append(f"{where}: unknown field `{k}` (known: {', '.join(sorted(allowed))})")


def pytorchjob(doc, where):
    from kubeflow.training.models import KubeflowOrgV1PyTorchJobSpec, KubeflowOrgV1ReplicaSpec, KubeflowOrgV1RunPolicy

    known(doc, {"apiVersion", "kind", "metadata", "spec"}, where)
    spec = doc.get("spec", {})
    known(spec, set(KubeflowOrgV1PyTorchJobSpec.attribute_map.values()), f"{where}.spec")
    known(spec.get("runPolicy", {}), set(KubeflowOrgV1RunPolicy.attribute_map.values()), f"{where}.spec.runPolicy")
    replicas = spec.get("pytorchReplicaSpecs") or {}
    if "Master" not in replicas:
        problems.append(f"{where}.spec.pytorchReplicaSpecs: no Master")
    for role, r in replicas.items():
        if role not in ("Master", "Worker"):
            problems.append(f"{where}.spec.pytorchReplicaSpecs: unknown role `{role}`")
        known(r, set(KubeflowOrgV1ReplicaSpec.attribute_map.values()), f"{where}.spec.pytorchReplicaSpecs.{role}")
        pod_template(r.get("template", {}), f"{where}.spec.pytorchReplicaSpecs.{role}.template")
        names = [c.get("name") for c in r.get("template", {}).get("spec", {}).get("containers", [])]
        if "pytorch" not in names:
            problems.append(f"{where}.{role}: the operator needs a container named `pytorch`")


def trainjob(doc, where):
    from pydantic import BaseModel
    from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob

    def walk(model_cls, d, path):
        if not isinstance(d, dict) or not (isinstance(model_cls, type) and issubclass(model_cls, BaseModel)):
            return
        fields = {(f.alias or n): f for n, f in model_cls.model_fields.items()}
        for k, v in d.items():
            if k not in fields:
                problems.append(f"{path}: unknown field `{k}` (known: {', '.join(sorted(fields))})")
                continue
            ann = fields[k].annotation
            for cand in getattr(ann, "__args__", (ann,)):
                for inner in getattr(cand, "__args__", (cand,)):
                    if isinstance(inner, type) and issubclass(inner, BaseModel):
                        if isinstance(v, list):
                            for i, x in enumerate(v):
                                walk(inner, x, f"{path}.{k}[{i}]")
                        else:
                            walk(inner, v, f"{path}.{k}")
    # The generated models cannot read resource quantities written as plain strings ("8", 16Gi): the node's
    # resources and env are checked strictly as a core container's instead.
    import copy

    doc = copy.deepcopy(doc)
    trainer = doc.get("spec", {}).get("trainer", {})
    container = {"name": "node", "image": trainer.get("image", "x")}
    for key, core in (("resourcesPerNode", "resources"), ("env", "env")):
        if key in trainer:
            container[core] = trainer.pop(key)
    pod_template({"spec": {"containers": [container]}}, f"{where}.spec.trainer")
    try:
        TrainerV1alpha1TrainJob.model_validate(doc)
    except Exception as e:
        problems.append(f"{where}: {str(e).splitlines()[0]} {str(e).splitlines()[1:3]}")
    walk(TrainerV1alpha1TrainJob, doc, where)


for path in sorted(Path(sys.argv[1]).glob("*.yaml")):
    for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
        if doc is None:
            continue
        where = f"{path.name}[{i}] {doc.get('kind')}"
        kind = doc.get("kind")
        if kind == "PyTorchJob":
            pytorchjob(doc, where)
        elif kind == "TrainJob":
            trainjob(doc, where)
        else:
            strict_core(doc, where)
        print(f"checked {where}")

if problems:
    print("\n".join(problems))
    sys.exit(1)
print("deploy/k8s: every manifest validates")
