"""The cluster launcher YAML passes Ray's own schema; the KubeRay manifests parse and run our jobs."""

import shlex
from pathlib import Path

import pytest
import yaml

from optical_ray.cli import build_parser

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"


def test_launcher_config_passes_ray_schema_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    validate_config(prepare_config(config))  # fills in defaults as `ray up` does; raises on a violation
    assert config["available_node_types"]["gpu_worker"]["max_workers"] >= 1
    from jsonschema import ValidationError

    with pytest.raises(ValidationError, match="'many' is not of type 'integer'"):
        validate_config(prepare_config(dict(config, max_workers="many")))


@pytest.mark.parametrize("name", sorted(p.name for p in (CLUSTER / "kuberay").glob("*.yaml")))
def test_kuberay_manifests_parse_and_pin_our_ray_version(name):
    import ray

    doc = yaml.safe_load((CLUSTER / "kuberay" / name).read_text())
    assert doc["apiVersion"] == "ray.io/v1"
    spec = doc["spec"]
    cluster = {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec"), "RayService": spec.get("rayClusterConfig")}[doc["kind"]]
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["authOptions"] == {"mode": "token"}  # Ray's own endpoints need the cluster token
    head = cluster["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"  # the dashboard is not exposed outside the cluster
    for group in cluster["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["maxReplicas"]
    if doc["kind"] == "RayJob":  # the entrypoint's arguments are ones our CLI accepts
        argv = shlex.split(spec["entrypoint"])
        assert argv[0] == "python" and Path(CLUSTER.parent, argv[1]).is_file()
        command = {"jobs/distill.py": "train", "jobs/sweep.py": "tune"}[argv[1]]
        build_parser().parse_args([command, *argv[2:]])


def test_rayservice_embeds_the_serve_config_with_s3_uris():
    service = yaml.safe_load((CLUSTER / "kuberay" / "rayservice.yaml").read_text())
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    serve_config = yaml.safe_load((CLUSTER.parent / "serve" / "config.yaml").read_text())
    app = embedded["applications"][0]
    uris = [app["args"]["model"], app["args"]["index_uri"],
            *(d["user_config"]["index_uri"] for d in app["deployments"] if d["name"] == "Retriever")]
    assert all(uri.startswith("s3://") for uri in uris), uris  # a pod has no local runs/ folder
    local = serve_config["applications"][0]
    app["args"].update(model=local["args"]["model"], index_uri=local["args"]["index_uri"])
    for deployment in app["deployments"]:
        if deployment["name"] == "Retriever":
            deployment["user_config"]["index_uri"] = local["args"]["index_uri"]
    assert embedded["applications"] == serve_config["applications"]  # otherwise the same
    assert app["args"]["auth"] == "api_key"
    for group in [service["spec"]["rayClusterConfig"]["headGroupSpec"], *service["spec"]["rayClusterConfig"]["workerGroupSpecs"]]:
        env = {e["name"]: e for e in group["template"]["spec"]["containers"][0]["env"]}
        assert "secretKeyRef" in env["OPTICAL_RAY_API_KEY"]["valueFrom"]  # the key from a Secret, never inline
    deployments = {d["name"]: d for d in embedded["applications"][0]["deployments"]}
    assert deployments["QueryEncoder"]["autoscaling_config"]["max_replicas"] > deployments["QueryEncoder"]["autoscaling_config"]["min_replicas"]
    assert deployments["QueryEncoder"]["max_ongoing_requests"] >= deployments["QueryEncoder"]["user_config"]["max_batch_size"]
