"""Cluster YAMLs: the launcher configs pass Ray's own validation (what `ray up` runs), the KubeRay manifests have
the CRDs' required fields, nothing opens a port to the internet, and the job they run is a valid dino-ray config."""
import copy
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray  # noqa: F401  (installed by the ray extra: a missing Ray fails, never skips)
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config  # noqa: E402

from dino_ray.core.config import load_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = sorted((ROOT / "cluster").glob("*.yaml"))
KUBERAY = sorted((ROOT / "cluster" / "kuberay").glob("*.yaml"))


def documents(path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_launcher_configs_pass_rays_validation(path):
    config = yaml.safe_load(path.read_text())
    validate_config(prepare_config(copy.deepcopy(config)))  # what `ray up` does before touching the cloud
    broken = {**copy.deepcopy(config), "max_worker": 3}  # a typo'd key is caught: the check can fail
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))
    workers = {n: t for n, t in config["available_node_types"].items() if n != config["head_node_type"]}
    assert workers and all(t["min_workers"] == 0 and t["max_workers"] > 0 for t in workers.values())  # scale to 0
    assert any(t["resources"].get("GPU") == 8 for t in workers.values())  # the paper's 8-GPU nodes
    commands = " ".join(config["setup_commands"])
    pins = re.findall(r"torch==[\d.]+|torchvision==[\d.]+", (ROOT / "pyproject.toml").read_text())
    assert all(pin in commands for pin in pins)  # the versions pyproject.toml pins
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "mlflow server --host $(hostname -I" in head


@pytest.mark.parametrize("path", LAUNCHER + KUBERAY, ids=lambda p: p.name)
def test_nothing_is_open_to_the_internet_and_no_secret_is_inline(path):
    text = path.read_text()
    assert "0.0.0.0/0" not in text and "::/0" not in text
    assert not re.search(r"AKIA[0-9A-Z]{16}|aws_secret_access_key|private_key", text, re.I)
    for doc in documents(path):
        exposed = list(values_of(doc, "serviceType"))
        if doc.get("kind") == "Service":
            exposed.append(doc["spec"].get("type", "ClusterIP"))
        assert not set(exposed) & {"LoadBalancer", "NodePort"}, (path.name, exposed)


def values_of(tree, key):
    """Every value stored under ``key`` anywhere in a parsed YAML document."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            if k == key:
                yield v
            yield from values_of(v, key)
    elif isinstance(tree, list):
        for item in tree:
            yield from values_of(item, key)


def check_cluster_spec(spec):
    """The fields the ray.io/v1 CRDs require (rayStartParams: before KubeRay 1.4), and sane scaling."""
    head = spec["headGroupSpec"]
    assert "rayStartParams" in head and head["template"]["spec"]["containers"]
    assert all(c["name"] and c["image"] for c in head["template"]["spec"]["containers"])
    assert spec["enableInTreeAutoscaling"] is True
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"] and "rayStartParams" in group
        assert all(c["name"] and c["image"] for c in group["template"]["spec"]["containers"])
        assert 0 == group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    return head


def test_kuberay_raycluster_and_rayjob_have_the_required_fields():
    (cluster,) = documents(ROOT / "cluster" / "kuberay" / "raycluster.yaml")
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster") and cluster["metadata"]["name"]
    check_cluster_spec(cluster["spec"])
    (job,) = documents(ROOT / "cluster" / "kuberay" / "rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    check_cluster_spec(job["spec"]["rayClusterSpec"])
    # the entrypoint is a real dino-ray command whose config and overrides resolve
    words = shlex.split(job["spec"]["entrypoint"])
    assert words[:3] == ["dino-ray", "pretrain", "--config"]
    cfg = load_config(ROOT / words[3], words[4:])
    assert cfg.scaling.num_workers == 8 and cfg.run.storage_path.startswith("s3://")
    kinds = [d["kind"] for d in documents(ROOT / "cluster" / "kuberay" / "mlflow.yaml")]
    assert kinds == ["PersistentVolumeClaim", "Deployment", "Service"]
