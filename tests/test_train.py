"""Ray Train: 2 CPU workers, bitext streamed from S3 (moto on 127.0.0.1), checkpoints on S3, an
injected worker death, resume, and a clear error for bad shards before any training step."""

import json
import os
import tempfile
import time
from pathlib import Path

import pytest

from optical_ray import storage
from optical_ray.config import DistillConfig, load_config
from optical_ray.data import DataError, bitext_pairs, read_captions, write_bitext_shards
from optical_ray.models import Encoder
from optical_ray.train import run_training, train_loop_per_worker


def tiny_ray_config(student, teacher, bucket, run, **ray_overrides):
    ray = {"num_workers": 2, "cpus_per_worker": 0.5, "storage_path": f"s3://{bucket}/ray", "name": run,
           "max_failures": 1, **ray_overrides}
    return load_config(DistillConfig, {
        "student": str(student), "teacher": str(teacher), "output_dir": f"s3://{bucket}/out/{run}",
        "steps": 8, "batch_size": 8, "eval_every": 4, "log_every": 2, "max_length": 32,
        "data": {"bitext": f"s3://{bucket}/bitext", "dev_languages": ["de", "qu"]}, "ray": ray,
    })


@pytest.fixture(scope="module")
def s3_bitext(s3):
    from optical_ray.config import SAMPLE_DIR

    pairs, _ = bitext_pairs(read_captions(str(SAMPLE_DIR / "train_captions.parquet")), ["de", "qu"])
    write_bitext_shards(pairs, f"s3://{s3['bucket']}/bitext", rows_per_shard=1000)
    return pairs


def dies_once_in_step_7(config):
    """The real loop, except that one worker process dies (os._exit) in step 7 the first time, and
    each restore records the step it resumed from. It dies a few seconds after the step-4 checkpoint:
    Ray's controller registers reports when it polls the workers (every 2 s), so a checkpoint reported
    just before a crash can be lost, and the restart would then begin at step 0."""
    from optical_ray import distill

    marker = Path(config["test_dir"]) / "died"
    step, load = distill.Distiller.step, distill.Distiller.load_state_dict

    def flaky_step(self, english, translation):
        import ray.train

        if self.step_count == 6 and ray.train.get_context().get_world_rank() == 1 and not marker.exists():
            marker.touch()
            time.sleep(5)
            os._exit(1)
        return step(self, english, translation)

    def recording_load(self, state):
        load(self, state)
        with open(Path(config["test_dir"]) / "resumed_from", "a") as f:
            f.write(f"{self.step_count}\n")

    distill.Distiller.step, distill.Distiller.load_state_dict = flaky_step, recording_load
    train_loop_per_worker(config)


@pytest.mark.timeout(600)
def test_two_workers_from_s3_survive_a_worker_death(ray_cluster, s3, s3_bitext, tiny_model_dir, tiny_teacher_dir):
    import sys

    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    cfg = tiny_ray_config(tiny_model_dir, tiny_teacher_dir, s3["bucket"], "flaky")
    test_dir = tempfile.mkdtemp()

    def loop(config):
        dies_once_in_step_7({**config, "test_dir": test_dir})

    student_uri = run_training(cfg, train_loop=loop)

    assert Path(test_dir, "died").exists()
    assert Path(test_dir, "resumed_from").read_text().split() == ["4", "4"]  # both workers, from step 4
    keys = [o["Key"] for o in s3["client"].list_objects_v2(Bucket=s3["bucket"], Prefix="ray/flaky/")["Contents"]]
    assert any("step_0000008/train_state.pt" in k for k in keys) and any("step_0000004/" in k for k in keys)
    with tempfile.TemporaryDirectory() as local:
        storage.copy_dir(student_uri, local)
        encoder = Encoder.load(local)
        assert encoder.encode(["Ein Hund."], "query").shape == (1, 32)
    report = json.loads(storage.read_bytes(f"s3://{s3['bucket']}/out/flaky/dev/report.json"))
    assert set(report["languages"]) == {"de", "qu"}


@pytest.mark.timeout(300)
def test_bad_shards_fail_before_training_naming_the_uri(ray_cluster, s3, s3_bitext, tiny_model_dir):
    bucket = s3["bucket"]
    marker = b'{"parts": ["part-00000.parquet"]}'
    s3["client"].put_object(Bucket=bucket, Key="unfinished/part-00000.parquet", Body=b"PAR1 this is not parquet")
    cfg = tiny_ray_config(tiny_model_dir, tiny_model_dir, bucket, "broken")
    cfg.data.bitext = f"s3://{bucket}/unfinished"
    with pytest.raises(DataError, match=rf"s3://{bucket}/unfinished: no _SUCCESS.json"):
        run_training(cfg)
    s3["client"].put_object(Bucket=bucket, Key="broken/part-00000.parquet", Body=b"PAR1 this is not parquet")
    s3["client"].put_object(Bucket=bucket, Key="broken/_SUCCESS.json", Body=marker)
    cfg.data.bitext = f"s3://{bucket}/broken"
    with pytest.raises(storage.StorageError, match=rf"s3://{bucket}/broken/part-00000.parquet: not a readable Parquet"):
        run_training(cfg)
    cfg.data.bitext = "s3://no-such-bucket/bitext"
    with pytest.raises(storage.StorageError, match="bucket 'no-such-bucket' does not exist"):
        run_training(cfg)
    cfg.data.bitext = f"s3://{bucket}/empty-prefix"
    with pytest.raises(storage.StorageError, match="no such file or folder"):
        run_training(cfg)
    s3["client"].upload_file(str(tiny_model_dir / "config.json"), bucket, "wrong/part-00000.parquet")
    s3["client"].put_object(Bucket=bucket, Key="wrong/_SUCCESS.json", Body=marker)
    cfg.data.bitext = f"s3://{bucket}/wrong"
    with pytest.raises((DataError, storage.StorageError), match=rf"s3://{bucket}/wrong/part-00000.parquet"):
        run_training(cfg)
    assert s3["client"].list_objects_v2(Bucket=bucket, Prefix="ray/broken")["KeyCount"] == 0  # nothing written


@pytest.mark.timeout(600)
def test_submitted_as_a_ray_job(ray_cluster, s3, s3_bitext, tiny_model_dir, tmp_path):
    import sys

    import yaml
    from ray.job_submission import JobStatus, JobSubmissionClient

    from optical_ray.config import to_dict

    cfg = tiny_ray_config(tiny_model_dir, tiny_model_dir, s3["bucket"], "job", num_workers=1)
    cfg.steps, cfg.eval_every, cfg.output_dir = 4, 0, str(tmp_path / "out")
    config_path = tmp_path / "job.yaml"
    config_path.write_text(yaml.safe_dump(to_dict(cfg)))
    repo = Path(__file__).resolve().parents[1]

    client = JobSubmissionClient(ray_cluster["dashboard"])
    job = client.submit_job(
        entrypoint=f"{sys.executable} jobs/distill.py --config {config_path}",
        runtime_env={"working_dir": str(repo), "excludes": [".venv", ".git", "runs", "*.egg-info", "__pycache__"]},
    )
    deadline = time.time() + 480
    while client.get_job_status(job) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.time() < deadline, client.get_job_logs(job)[-3000:]
        time.sleep(2)
    logs = client.get_job_logs(job)
    assert client.get_job_status(job) == JobStatus.SUCCEEDED, logs[-3000:]
    assert "student saved to" in logs
    assert Encoder.load(tmp_path / "out" / "student").dim == 32


def test_a_student_on_s3_loads_by_uri(s3, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("OPTICAL_RAY_CACHE", str(tmp_path / "cache"))
    uri = f"s3://{s3['bucket']}/students/tiny"
    storage.copy_dir(str(tiny_model_dir), uri)
    remote, local = Encoder.load(uri), Encoder.load(tiny_model_dir)
    assert (remote.encode(["Ein Hund."], "query") == local.encode(["Ein Hund."], "query")).all()
    with pytest.raises(FileNotFoundError, match="no config.json there"):
        Encoder.load(f"s3://{s3['bucket']}/students/absent")
