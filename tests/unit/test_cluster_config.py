"""cluster.yaml against the JSON schema in Ray's wheel and Ray's own config validation (what `ray up`
runs before any cloud call), broken copies that must fail, and the KubeRay RayJob manifest."""

import copy
import json
import os
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def ray_schema() -> dict:
    """The cluster-config JSON schema shipped in the installed Ray wheel."""
    import ray.autoscaler

    with open(os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")) as f:
        return json.load(f)


def validate_cluster_config(config: dict) -> dict:
    """Raise if ``config`` is invalid: first the raw file against Ray's schema, then the steps of
    ``ray up`` (``_bootstrap_config``) before the provider is contacted: ``prepare_config``
    (defaults, merged setup commands, per-type min/max workers) and ``validate_config``.
    Returns the prepared config."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    jsonschema.validate(config, ray_schema())
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def ray_only_validation(config: dict) -> None:
    """Ray's own path alone (no direct jsonschema call): prepare_config + validate_config."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def test_cluster_yaml_is_valid_for_ray(cluster):
    prepared = validate_cluster_config(cluster)
    assert cluster["provider"]["type"] == "aws"
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["max_workers"] == 0
    gpu_types = [t for name, t in types.items() if name != prepared["head_node_type"]]
    assert gpu_types and all(t["resources"]["GPU"] >= 1 for t in gpu_types)
    assert "g5.xlarge" in [t["node_config"]["InstanceType"] for t in gpu_types]
    assert prepared["max_workers"] >= max(t["max_workers"] for t in gpu_types)
    # installs this checkout, never a package fetched from a named host
    assert prepared["file_mounts"]["~/raydistill"] == "."
    for cmds in ("head_setup_commands", "worker_setup_commands"):
        assert "pip install -q -e ~/raydistill" in prepared[cmds]
        assert not any("://" in c or "git+" in c for c in prepared[cmds])
    # token authentication on every node, with the token file copied from the launching machine
    assert prepared["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    for cmds in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert any("RAY_AUTH_MODE=token ray start" in c for c in prepared[cmds])
    # shared storage: the head serves /shared, every GPU type mounts it
    assert any("/etc/exports" in c for c in prepared["initialization_commands"])
    assert all(any("$RAY_HEAD_IP:/shared /shared" in c for c in t["initialization_commands"]) for t in gpu_types)


def _float_resources(c):
    c["available_node_types"]["gpu_a10g_x1"]["resources"]["CPU"] = 1.5


def _unknown_top_level_key(c):
    c["max_worker"] = 4  # typo of max_workers


def _head_type_is_a_list(c):
    c["head_node_type"] = ["head"]


def _head_type_not_a_node_type(c):
    c["head_node_type"] = "gpu"


def _min_workers_above_max_workers(c):
    c["available_node_types"]["gpu_a10g_x1"]["min_workers"] = 5


def _resources_missing(c):
    del c["available_node_types"]["gpu_a10g_x1"]["resources"]


def _provider_missing(c):
    del c["provider"]


BROKEN = [  # (breakage, what the error must say)
    (_float_resources, "1.5 is not of type 'integer'"),
    (_unknown_top_level_key, "'max_worker' was unexpected"),
    (_head_type_is_a_list, "is not of type 'string'"),
    (_head_type_not_a_node_type, "must be one of `available_node_types`"),
    (_min_workers_above_max_workers, "smaller than the sum of `min_workers`"),
    (_resources_missing, "'resources' is a required property"),
]


@pytest.mark.parametrize("breakage, message", BROKEN, ids=[b.__name__.strip("_") for b, _ in BROKEN])
def test_broken_copies_fail_validation(cluster, breakage, message):
    broken = copy.deepcopy(cluster)
    breakage(broken)
    with pytest.raises((jsonschema.ValidationError, ValueError), match=re.escape(message)):
        validate_cluster_config(broken)
    with pytest.raises((jsonschema.ValidationError, ValueError), match=re.escape(message)):
        ray_only_validation(broken)  # Ray alone rejects it too


def test_missing_provider_fails_schema(cluster):
    broken = copy.deepcopy(cluster)
    _provider_missing(broken)
    with pytest.raises(jsonschema.ValidationError, match="'provider' is a required property"):
        jsonschema.validate(broken, ray_schema())


def test_kuberay_rayjob_manifest():
    docs = [d for d in yaml.safe_load_all((REPO / "deploy" / "kuberay-rayjob.yaml").read_text()) if d]
    jobs = [d for d in docs if d.get("kind") == "RayJob"]
    assert len(jobs) == 1
    job = jobs[0]
    assert job["apiVersion"] == "ray.io/v1" and job["metadata"]["name"]
    spec = job["spec"]
    entry = spec["entrypoint"].split()
    assert entry[:3] == ["raydistill", "run", "jobs/cifar10_resnet18.yaml"]
    assert (REPO / entry[2]).is_file()
    assert entry[entry.index("--out") + 1].startswith("/shared/")
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]["template"]["spec"]
    assert head["containers"][0]["image"]
    workers = cluster["workerGroupSpecs"]
    assert workers and all(g["groupName"] and g["replicas"] >= 1 for g in workers)
    worker = workers[0]["template"]["spec"]["containers"][0]
    assert int(worker["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    # the job's num_workers matches the GPU workers the manifest asks for
    job_cfg = yaml.safe_load((REPO / entry[2]).read_text())
    assert sum(g["replicas"] for g in workers) == job_cfg["scale"]["num_workers"]
    # token auth everywhere and /shared mounted on every Ray pod
    pods = [head] + [g["template"]["spec"] for g in workers]
    for pod in pods + [spec["submitterPodTemplate"]["spec"]]:
        env = {e["name"]: e for e in pod["containers"][0]["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token" and "RAY_AUTH_TOKEN" in env
    for pod in pods:
        assert {"name": "shared", "mountPath": "/shared"} in pod["containers"][0]["volumeMounts"]
    claims = {d["metadata"]["name"] for d in docs if d.get("kind") == "PersistentVolumeClaim"}
    assert all(v["persistentVolumeClaim"]["claimName"] in claims for p in pods for v in p["volumes"])
