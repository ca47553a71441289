"""Write the KubeRay manifests of this folder from one description: a RayCluster, and a RayJob per stage.

    python cluster/kuberay/render.py --image REGISTRY/ray-crm:0.1.0-gpu

One source keeps the manifests alike (image, pod shapes, volumes, runtime env) and gives every registered stage its
RayJob; a test checks that the committed files are what this writes. Pods run the image of cluster/Dockerfile, with
the checkout at /home/ray/ray_crm. A RayJob's cluster is deleted when its job ends, so stages write to the
ReadWriteMany claim of outputs-pvc.yaml. Nothing is exposed outside Kubernetes: the head service is ClusterIP, no
ingress, and the Jobs API needs the cluster's token (authOptions: token).
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import Any

import yaml

from ray_crm.jobs_client import RUNTIME_ENV, job_script
from ray_crm.stages import STAGES

HERE = Path(__file__).resolve().parent
RAY_VERSION = "2.60.0"
IMAGE = "ray-crm:0.1.0-gpu"  # built from cluster/Dockerfile (FROM rayproject/ray:2.60.0-py311-gpu)
APP_DIR = "/home/ray/ray_crm"
OUTPUTS = "/mnt/ray-crm"
CLAIM = "ray-crm-outputs"
HEAD = {"cpu": "8", "memory": "30Gi"}
# Worker groups scale 0 -> max; pod shapes fit 1-GPU L4/A10G nodes and 8-GPU A100/H100 nodes of EKS and GKE.
GROUPS = {
    "rm-gpu": {"cpu": "6", "memory": "24Gi", "gpus": 1, "max": 4},
    "ppo-gpu": {"cpu": "64", "memory": "512Gi", "gpus": 8, "max": 2},
}
# A stage's RayJob: its config, the worker groups its own cluster gets beyond the head, and its overrides there.
GPU = ["train.use_gpu=true", "model.precision=bf16"]
JOBS: dict[str, tuple[str, list[str], list[str]]] = {
    "prepare": ("configs/prepare_vader.yaml", [], []),
    "bench": ("configs/bench_length.yaml", [], []),
    "train-rm": ("configs/demo.yaml", ["rm-gpu"], GPU),
    "train-dpo": ("configs/dpo_length.yaml", ["rm-gpu"], GPU),
    "sweep": ("configs/demo.yaml", ["rm-gpu"], GPU),
    "demo": ("configs/demo.yaml", ["rm-gpu"], GPU),
}
DEFAULT_JOB = ("configs/demo.yaml", ["rm-gpu"], [])

class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the runtime env) as literal blocks, readable in the manifest."""


_Dumper.add_representer(
    str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None)
)


def pod(name: str, image: str, cpu: str, memory: str, gpus: int = 0) -> dict[str, Any]:
    limits = {"cpu": cpu, "memory": memory, **({"nvidia.com/gpu": gpus} if gpus else {})}
    spec: dict[str, Any] = {
        "containers": [{
            "name": name, "image": image, "resources": {"requests": dict(limits), "limits": limits},
            "volumeMounts": [{"name": "outputs", "mountPath": OUTPUTS}],
        }],
        "volumes": [{"name": "outputs", "persistentVolumeClaim": {"claimName": CLAIM}}],
    }
    if gpus:  # GPU node pools of EKS and GKE carry this taint
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {"spec": spec}


def cluster_spec(image: str, groups: list[str]) -> dict[str, Any]:
    workers = [
        {"groupName": g, "replicas": 0, "minReplicas": 0, "maxReplicas": GROUPS[g]["max"], "rayStartParams": {},
         "template": pod("ray-worker", image, GROUPS[g]["cpu"], GROUPS[g]["memory"], GROUPS[g]["gpus"])}
        for g in groups
    ]
    return {
        "rayVersion": RAY_VERSION,
        "authOptions": {"mode": "token"},
        "enableInTreeAutoscaling": True,
        "autoscalerOptions": {"idleTimeoutSeconds": 600, "upscalingMode": "Default"},
        "headGroupSpec": {
            "serviceType": "ClusterIP",
            "rayStartParams": {"dashboard-host": "0.0.0.0"},  # the pod's address, behind the ClusterIP service
            "template": pod("ray-head", image, **HEAD),
        },
        "workerGroupSpecs": workers,
    }


def raycluster(image: str) -> dict[str, Any]:
    return {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": "ray-crm"},
            "spec": cluster_spec(image, list(GROUPS))}


def rayjob(stage: str, image: str) -> dict[str, Any]:
    config, groups, overrides = JOBS.get(stage, DEFAULT_JOB)
    env = {**yaml.safe_load(RUNTIME_ENV.read_text()), "working_dir": APP_DIR}
    entry = ["python", job_script(stage), "--config", config, f"output_dir={OUTPUTS}/outputs", *overrides]
    return {
        "apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": f"ray-crm-{stage}"},
        "spec": {
            "entrypoint": shlex.join(entry),
            "runtimeEnvYAML": yaml.safe_dump(env, sort_keys=False),
            "submissionMode": "K8sJobMode",
            "backoffLimit": 0,
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 120,
            "rayClusterSpec": cluster_spec(image, groups),
        },
    }


def render(image: str = IMAGE) -> dict[str, str]:
    """File name -> YAML text of every manifest."""
    header = ("# Written by cluster/kuberay/render.py: edit that, then run it. A RayJob's entrypoint is the stage's\n"
              "# command line: give it your config and overrides (they are checked when the job starts).\n")
    docs = {"raycluster.yaml": raycluster(image)} | {f"rayjob-{s}.yaml": rayjob(s, image) for s in STAGES}
    return {name: header + yaml.dump(doc, Dumper=_Dumper, sort_keys=False) for name, doc in docs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default=IMAGE, help="the pods' image (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=HERE, help="folder to write (default: this one)")
    args = parser.parse_args()
    for name, text in render(args.image).items():
        (args.out / name).write_text(text)
        print(args.out / name)


if __name__ == "__main__":
    main()
