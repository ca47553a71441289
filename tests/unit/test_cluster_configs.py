"""cluster/: the launcher configs pass Ray's own validation, the KubeRay manifests the CRD schema, and both keep
cluster/README.md's promises: Ray's image at the project's Ray, GPU types from 0, no public dashboard, token auth,
and (launcher) SSH as the only way in, from one given range. No cloud call: the network scripts run against stubs.
"""

import copy
import importlib.resources
import importlib.util
import re
import shlex
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import ray
import yaml
from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.runtime_env import RuntimeEnv
from referencing import Registry, Resource

from ray_crm.config import load_config
from ray_crm.stages import STAGES

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
LAUNCHERS = sorted(p.name for p in CLUSTER.glob("*.yaml"))
NETWORK_SCRIPTS = {"aws.yaml": "aws-network.sh", "gcp.yaml": "gcp-network.sh"}
# Logs its argv (fields split by \x1f) and answers the two AWS calls whose output the script reads.
CLI_STUB = r"""#!/usr/bin/env bash
printf '%s\x1f' "$(basename "$0")" "$@" >> "$STUB_LOG"
printf '\n' >> "$STUB_LOG"
case " $* " in
  *" describe-vpcs "*) echo vpc-0stub ;;
  *" create-security-group "*) echo sg-0stub ;;
esac
"""
MANIFESTS = sorted(p.name for p in KUBERAY.glob("*.yaml"))
RAY_IMAGE = f"rayproject/ray:{ray.__version__}-py311-gpu"
K8S = "1.33"


def launcher(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def manifest(name: str) -> dict:
    return yaml.safe_load((KUBERAY / name).read_text())


def test_launcher_configs_exist_for_aws_and_gcp():
    assert {launcher(n)["provider"]["type"] for n in LAUNCHERS} == {"aws", "gcp"}


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_config_passes_rays_validation(name):
    validate_config(prepare_config(launcher(name)))  # what `ray up` checks before any cloud call
    typo = launcher(name)
    typo["available_node_types"]["rm_gpu"]["min_worker"] = 0
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        validate_config(prepare_config(typo))


def _spot(node_config: dict) -> bool:
    return (node_config.get("InstanceMarketOptions", {}).get("MarketType") == "spot"
            or node_config.get("scheduling", {}).get("provisioningModel") == "SPOT")


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_config_keeps_its_promises(name):
    cfg = launcher(name)
    assert cfg["docker"]["image"] == RAY_IMAGE and cfg["idle_timeout_minutes"] > 0
    assert any('ray_crm[gpu]"' in c for c in cfg["setup_commands"])
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in (CLUSTER / name).read_text()
    workers = {k: v for k, v in cfg["available_node_types"].items() if k != cfg["head_node_type"]}
    assert set(workers) == {"rm_gpu", "ppo_gpu"}
    for node in workers.values():
        assert node["min_workers"] == 0 and node["max_workers"] >= 1 and node["resources"]["GPU"] >= 1
    assert "GPU" not in cfg["available_node_types"][cfg["head_node_type"]]["resources"]
    assert _spot(workers["rm_gpu"]["node_config"])


@pytest.mark.parametrize("name", LAUNCHERS)
def test_every_node_starts_ray_with_token_auth_and_the_shared_token(name):
    cfg = launcher(name)
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [part.strip() for command in cfg[key] for part in command.split(";") if "ray start" in part]
        assert starts and all(shlex.split(s)[:3] == ["RAY_AUTH_MODE=token", "ray", "start"] for s in starts), key
    assert cfg["file_mounts"]["~/.ray"] == "~/.ray"  # where `ray get-auth-token --generate` puts the token


@pytest.mark.parametrize("name", LAUNCHERS)
def test_every_node_type_is_on_the_network_of_the_cluster_script(name):
    cfg = launcher(name)
    node_configs = [t["node_config"] for t in cfg["available_node_types"].values()]
    if cfg["provider"]["type"] == "aws":
        # Ray creates (and opens SSH to every address in) its own group for any node type without one.
        assert "security_group" not in cfg["provider"]
        assert all(c.get("SecurityGroupIds") == node_configs[0]["SecurityGroupIds"] != [] for c in node_configs)
    else:
        subnet = f"regions/{cfg['provider']['region']}/subnetworks/ray-crm"
        assert all([i["subnetwork"] for i in c["networkInterfaces"]] == [subnet] for c in node_configs)


def _run_network_script(name: str, tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    """Run a network script with `aws` and `gcloud` stubs first on PATH; return the run and the stubs' calls."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    for cli in ("aws", "gcloud"):
        stub = bin_dir / cli
        stub.write_text(CLI_STUB)
        stub.chmod(0o755)
    run = subprocess.run(["bash", str(CLUSTER / NETWORK_SCRIPTS[name])], check=False, capture_output=True, text=True,
                         env={"PATH": f"{bin_dir}:/usr/bin:/bin", "STUB_LOG": str(log), **env})
    calls = [line.split("\x1f")[:-1] for line in log.read_text().splitlines()] if log.exists() else []
    return run, calls


def _flags(call: list[str]) -> dict[str, str]:
    """--key value and --key=value arguments of a CLI call."""
    flags = {}
    for i, arg in enumerate(call):
        if arg.startswith("--"):
            key, eq, value = arg.partition("=")
            flags[key] = value if eq else (call[i + 1] if i + 1 < len(call) else "")
    return flags


@pytest.mark.parametrize("name", LAUNCHERS)
def test_network_script_refuses_to_run_without_an_ssh_range(name, tmp_path):
    run, calls = _run_network_script(name, tmp_path, GCP_PROJECT="p")
    assert run.returncode != 0 and "SSH_CIDR" in run.stderr and calls == []
    assert "0.0.0.0" not in (CLUSTER / NETWORK_SCRIPTS[name]).read_text()


def test_aws_security_group_admits_only_ssh_from_the_range_and_the_groups_own_nodes(tmp_path):
    run, calls = _run_network_script("aws.yaml", tmp_path, SSH_CIDR="203.0.113.7/32")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "sg-0stub"  # the id aws.yaml's SecurityGroupIds takes
    assert {_flags(c)["--region"] for c in calls} == {launcher("aws.yaml")["provider"]["region"]}
    ingress = [_flags(c) for c in calls if "authorize-security-group-ingress" in c]
    rules = sorted((f["--protocol"], f.get("--port"), f.get("--cidr"), f.get("--source-group")) for f in ingress)
    assert rules == [("-1", None, None, "sg-0stub"), ("tcp", "22", "203.0.113.7/32", None)]
    assert not any("egress" in arg for c in calls for arg in c)


def test_gcp_firewall_admits_only_ssh_from_the_range_and_the_subnet(tmp_path):
    run, calls = _run_network_script("gcp.yaml", tmp_path, SSH_CIDR="203.0.113.7/32", GCP_PROJECT="my-project")
    assert run.returncode == 0, run.stderr
    assert {_flags(c)["--project"] for c in calls} == {"my-project"}
    subnet = next(_flags(c) | {"name": c[5]} for c in calls if c[1:5] == ["compute", "networks", "subnets", "create"])
    assert f"regions/{subnet['--region']}/subnetworks/{subnet['name']}" == (
        launcher("gcp.yaml")["available_node_types"]["head"]["node_config"]["networkInterfaces"][0]["subnetwork"])
    rules = sorted((f["--network"], f["--direction"], f["--allow"], f["--source-ranges"])
                   for c in calls if c[1:4] == ["compute", "firewall-rules", "create"] for f in [_flags(c)])
    assert rules == [("ray-crm", "INGRESS", "tcp,udp,icmp", subnet["--range"]),
                     ("ray-crm", "INGRESS", "tcp:22", "203.0.113.7/32")]


def _load_render():
    spec = importlib.util.spec_from_file_location("kuberay_render", KUBERAY / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_manifests_are_what_render_writes_with_a_rayjob_per_stage():
    rendered = _load_render().render()
    assert {f"rayjob-{s}.yaml" for s in STAGES} <= set(rendered), "a stage has no RayJob"
    for name, text in rendered.items():
        assert (KUBERAY / name).read_text() == text, f"{name} is stale: run `python cluster/kuberay/render.py`"
    stale = {n for n in MANIFESTS if n.startswith("rayjob-")} - set(rendered)
    assert not stale, f"RayJobs of unregistered stages: {stale}"


@pytest.fixture(scope="module")
def kuberay_validator():
    """The KubeRay schema, with Kubernetes' strict core definitions as shipped by kubernetes-validate."""
    defs_file = importlib.resources.files(kubernetes_validate).joinpath(
        f"kubernetes-json-schema/v{K8S}.0-local-strict/_definitions.json")
    core = Resource.from_contents(yaml.safe_load(defs_file.read_text()))
    schema = yaml.safe_load((Path(__file__).parents[1] / "kuberay_v1.schema.yaml").read_text())
    registry = Registry().with_resources([(core.id(), core), (schema["$id"], Resource.from_contents(schema))])

    def validate(doc: dict) -> None:
        if doc["apiVersion"] != "ray.io/v1":
            kubernetes_validate.validate(doc, K8S, strict=True)
            return
        ref = {"$ref": f"{schema['$id']}#/$defs/{doc['kind']}"}
        jsonschema.Draft202012Validator(ref, registry=registry).validate(doc)

    return validate


@pytest.mark.parametrize("name", MANIFESTS)
def test_manifest_validates_against_its_schema(name, kuberay_validator):
    kuberay_validator(manifest(name))


def test_the_schema_rejects_typos_at_the_kuberay_and_the_pod_level(kuberay_validator):
    doc = manifest("raycluster.yaml")
    kuberay_validator(doc)
    typo = copy.deepcopy(doc)
    typo["spec"]["workerGroupSpecs"][0]["maxReplica"] = 4
    with pytest.raises(jsonschema.ValidationError, match="maxReplica"):
        kuberay_validator(typo)
    typo = copy.deepcopy(doc)
    typo["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(jsonschema.ValidationError, match="imagePullPolicyy"):
        kuberay_validator(typo)
    typo = copy.deepcopy(doc)
    typo["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0  # KubeRay wants strings here
    with pytest.raises(jsonschema.ValidationError):
        kuberay_validator(typo)


@pytest.mark.parametrize("name", [n for n in MANIFESTS if n.startswith("rayjob-")])
def test_a_rayjob_runs_a_valid_stage_command_in_a_valid_runtime_env(name):
    spec = manifest(name)["spec"]
    _python, script, flag, config, *overrides = shlex.split(spec["entrypoint"])
    assert (ROOT / script).is_file() and flag == "--config"
    load_config(ROOT / config, overrides)  # the job would fail at once on a bad key
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert env["working_dir"] == "/home/ray/ray_crm"  # the checkout inside the image of cluster/Dockerfile
    RuntimeEnv(**{**env, "working_dir": str(ROOT)})  # Ray's checks, with the same checkout at a path that exists here


def _cluster_specs() -> dict[str, dict]:
    specs = {"raycluster.yaml": manifest("raycluster.yaml")["spec"]}
    specs |= {n: manifest(n)["spec"]["rayClusterSpec"] for n in MANIFESTS if n.startswith("rayjob-")}
    return specs


@pytest.mark.parametrize("name", sorted(_cluster_specs()))
def test_rays_autoscaler_reads_the_cluster_and_scales_gpus_from_zero(name):
    spec = _cluster_specs()[name]
    # What the in-tree autoscaler derives from the custom resource, with Ray's own validation.
    config = _derive_autoscaling_config_from_ray_cr({"metadata": {"name": "c", "namespace": "default"}, "spec": spec})
    assert spec["enableInTreeAutoscaling"] and spec["rayVersion"] == ray.__version__
    for group, node in config["available_node_types"].items():
        if group != "headgroup":
            assert node["min_workers"] == 0 and node["max_workers"] >= 1 and node["resources"]["GPU"] >= 1
    if name == "raycluster.yaml":
        gpus = {g: n["resources"].get("GPU", 0) for g, n in config["available_node_types"].items()}
        assert gpus == {"headgroup": 0, "rm-gpu": 1, "ppo-gpu": 8}


def test_nothing_is_exposed_and_every_pod_runs_the_pinned_image():
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert re.search(rf"^FROM {re.escape(RAY_IMAGE)}$", dockerfile, re.MULTILINE)
    images = set()
    for name in MANIFESTS:
        text = (KUBERAY / name).read_text()
        assert not re.search(r"LoadBalancer|NodePort|enableIngress: true|kind: Ingress", text), name
        images |= set(re.findall(r"image: (\S+)", text))
        doc = manifest(name)
        if doc["kind"] == "RayJob":
            assert doc["spec"]["shutdownAfterJobFinishes"] is True
    for spec in _cluster_specs().values():
        assert spec["headGroupSpec"]["serviceType"] == "ClusterIP" and spec["authOptions"]["mode"] == "token"
    assert images == {_load_render().IMAGE}
