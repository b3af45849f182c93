"""A real multi-node cluster on this machine: the session's head plus worker nodes started as separate
`ray start` processes with a ``trainer`` resource, so training lands on them. Jobs are submitted with
their code in the runtime_env (the working directory and the optical_ray package), data and
checkpoints on S3 (moto on 127.0.0.1); the worker node is killed mid-run, a new one joins, and the
run finishes from its last checkpoint with the weights of an uninterrupted run."""

import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import wait_until

from optical_ray import storage
from optical_ray.config import DistillConfig, load_config, to_dict
from optical_ray.encoder import Encoder
from optical_ray.train import run_training

REPO = Path(__file__).resolve().parents[1]
STEPS, CHECKPOINT_EVERY = 160, 40


def node_loss_config(student, teacher, bucket, run) -> DistillConfig:
    return load_config(DistillConfig, {
        "student": str(student), "teacher": str(teacher), "output_dir": f"s3://{bucket}/out/{run}",
        "steps": STEPS, "batch_size": 8, "checkpoint_every": CHECKPOINT_EVERY, "log_every": 20, "max_length": 32,
        "loss": {"ot_weight": 1.0, "contrastive_weight": 1.0}, "optim": {"lr": 1e-3, "warmup_steps": 5},
        "data": {"bitext": f"s3://{bucket}/bitext", "dev_languages": ["de", "qu"]},
        "ray": {"num_workers": 2, "cpus_per_worker": 0.5, "torch_threads": 1, "custom_resources": {"trainer": 1},
                "storage_path": f"s3://{bucket}/ray", "name": run, "max_failures": -1},
    })


def checkpoint_steps(s3, run: str) -> list[int]:
    keys = [o["Key"] for o in s3["client"].list_objects_v2(Bucket=s3["bucket"], Prefix=f"ray/{run}/").get("Contents", [])]
    return sorted({int(k.split("/step_")[1][:7]) for k in keys if "/step_" in k and k.endswith("/train_state.pt")})


def load_student(uri: str) -> Encoder:
    local = tempfile.mkdtemp()
    storage.copy_dir(uri, local)
    return Encoder.load(local)


@pytest.mark.timeout(900)
def test_a_job_that_loses_its_node_resumes_exactly(ray_cluster, s3, s3_bitext, worker_nodes, tiny_model_dir,
                                                   tiny_teacher_dir, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    first = worker_nodes.start()
    reference = load_student(str(run_training(node_loss_config(tiny_model_dir, tiny_teacher_dir, s3["bucket"], "uninterrupted"))))

    cfg = node_loss_config(tiny_model_dir, tiny_teacher_dir, s3["bucket"], "lost-node")
    config_path = tmp_path / "job.yaml"
    config_path.write_text(yaml.safe_dump(to_dict(cfg)))
    client = JobSubmissionClient(ray_cluster["dashboard"])
    job = client.submit_job(
        entrypoint=f"{sys.executable} jobs/distill.py --verbose --config {config_path}",
        runtime_env={"working_dir": str(REPO), "py_modules": [str(REPO / "optical_ray")],
                     "excludes": [".venv", ".git", "runs", "docs", "bench", "*.egg-info", "__pycache__"],
                     "env_vars": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}},
    )

    def checkpointed() -> list[int]:
        assert client.get_job_status(job) not in {JobStatus.FAILED, JobStatus.STOPPED}, client.get_job_logs(job)[-3000:]
        return checkpoint_steps(s3, "lost-node")

    wait_until(checkpointed, 300, "no checkpoint within 300 s", every=0.2)
    time.sleep(1.5)  # the controller registers a reported checkpoint when it next polls the workers
    worker_nodes.kill(first)
    before_loss = checkpoint_steps(s3, "lost-node")
    assert before_loss and before_loss[-1] < STEPS, f"the run finished before its node was lost: {before_loss}"
    worker_nodes.start()

    wait_until(lambda: client.get_job_status(job) in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}, 480,
               lambda: client.get_job_logs(job)[-3000:], every=2)
    logs = client.get_job_logs(job)
    assert client.get_job_status(job) == JobStatus.SUCCEEDED, logs[-3000:]
    resumed = [int(line.split("resumed from step ")[1].split()[0]) for line in logs.splitlines() if "resumed from step" in line]
    assert resumed and 0 < resumed[0] < STEPS and resumed[0] % CHECKPOINT_EVERY == 0, logs[-3000:]

    student = load_student(storage.join(cfg.output_dir, "student"))
    for (name, p), (_, q) in zip(reference.named_parameters(), student.named_parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-6, msg=name)


@pytest.mark.timeout(900)
def test_a_sweep_that_loses_its_node_finishes_every_trial(ray_cluster, s3, s3_bitext, worker_nodes, tiny_model_dir,
                                                          tiny_teacher_dir):
    """Both trials train on the worker node; it is killed once a trial has checkpointed (at its first dev
    evaluation), a new node joins, and every trial still finishes all its steps: the failed ones are
    restarted from their checkpoints (max_failures -1), not from step 0 and not dropped."""
    import threading

    from optical_ray.config import SweepConfig
    from optical_ray.tune import run_sweep

    first = worker_nodes.start()
    bucket = s3["bucket"]
    cfg = load_config(SweepConfig, {
        "distill": {"student": str(tiny_model_dir), "teacher": str(tiny_teacher_dir), "steps": 60, "batch_size": 8,
                    "eval_every": 20, "log_every": 10, "max_length": 32,
                    "data": {"bitext": f"s3://{bucket}/bitext", "dev_languages": ["de", "qu"]}},
        "search": {"sinkhorn_reg": [0.05, 0.5], "temperature": []}, "scheduler": "fifo", "num_samples": 2,
        "max_concurrent_trials": 2, "cpus_per_trial": 0.5, "custom_resources": {"trainer": 1}, "max_failures": -1,
        "storage_path": f"s3://{bucket}/tune", "name": "lost-node"})
    outcome = {}

    def sweep():
        try:
            outcome["result"] = run_sweep(cfg, verbose=False)
        except BaseException as err:  # noqa: BLE001 -- reported by the assertion below
            outcome["error"] = err

    thread = threading.Thread(target=sweep)
    thread.start()

    def keys():
        return [o["Key"] for o in s3["client"].list_objects_v2(Bucket=bucket, Prefix="tune/lost-node/").get("Contents", [])]

    def checkpointed() -> bool:
        assert thread.is_alive(), outcome
        return any("/checkpoint_" in k for k in keys())

    wait_until(checkpointed, 300, "no trial checkpoint within 300 s", every=0.2)
    time.sleep(1.5)
    worker_nodes.kill(first)
    worker_nodes.start()
    thread.join(timeout=600)
    assert not thread.is_alive() and "error" not in outcome, outcome
    rows = outcome["result"].trials.to_pylist()
    assert len(rows) == 2 and all(r["status"] == "OK" and r["steps"] == 60 for r in rows), rows
    assert any(r["restored"] for r in rows), rows  # resumed from a checkpoint, not rerun from step 0
    assert outcome["result"].best is not None
