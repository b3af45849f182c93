"""Ray Train's preflight: bad shards, buckets and prefixes fail in the driver, naming the URI, before
any worker starts; students load from S3 by URI. (Training on two workers, a lost node and exact resume,
submitted as a job: tests/test_multinode.py.)"""

import pytest

from optical_ray import storage
from optical_ray.config import DistillConfig, load_config
from optical_ray.data import DataError
from optical_ray.encoder import Encoder
from optical_ray.model_store import check_model
from optical_ray.train import run_training


def tiny_ray_config(student, teacher, bucket, run, **ray_overrides):
    ray = {"num_workers": 2, "cpus_per_worker": 0.5, "storage_path": f"s3://{bucket}/ray", "name": run,
           "max_failures": 1, **ray_overrides}
    return load_config(DistillConfig, {
        "student": str(student), "teacher": str(teacher), "output_dir": f"s3://{bucket}/out/{run}",
        "steps": 8, "batch_size": 8, "eval_every": 4, "log_every": 2, "max_length": 32,
        "data": {"bitext": f"s3://{bucket}/bitext", "dev_languages": ["de", "qu"]}, "ray": ray,
    })


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


def test_a_student_on_s3_loads_by_uri(s3, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("OPTICAL_RAY_CACHE", str(tmp_path / "cache"))
    uri = f"s3://{s3['bucket']}/students/tiny"
    storage.copy_dir(str(tiny_model_dir), uri)
    check_model(uri)  # what a driver does: checks, copies nothing
    assert not (tmp_path / "cache" / "s3").exists()
    remote, local = Encoder.load(uri), Encoder.load(tiny_model_dir)
    assert (remote.encode(["Ein Hund."], "query") == local.encode(["Ein Hund."], "query")).all()
    for load in (Encoder.load, check_model):
        with pytest.raises(FileNotFoundError, match="no config.json there"):
            load(f"s3://{s3['bucket']}/students/absent")


def test_a_run_resumed_with_another_config_is_refused_before_any_worker_starts(ray_cluster, s3, s3_bitext, tiny_model_dir):
    from optical_ray import checkpoints
    from optical_ray.config import ConfigError

    cfg = tiny_ray_config(tiny_model_dir, tiny_model_dir, s3["bucket"], "claimed")
    checkpoints.claim(storage.join(cfg.ray.storage_path, cfg.ray.name), cfg)  # as the first submission did
    cfg.steps, cfg.ray.num_workers = 16, 4  # the worker count is not part of what is trained
    with pytest.raises(ConfigError, match=rf"s3://{s3['bucket']}/ray/claimed holds a run with another config \(steps: 8 -> 16\)"):
        run_training(cfg)
    cfg.steps, cfg.ray.num_workers = 8, 3
    with pytest.raises(ConfigError, match="batch_size 8 does not split evenly over ray.num_workers 3"):
        run_training(cfg)
    cfg.ray.num_workers, cfg.teacher = 4, f"s3://{s3['bucket']}/teachers/absent"
    with pytest.raises(FileNotFoundError, match=rf"s3://{s3['bucket']}/teachers/absent.*no config.json"):
        run_training(cfg)


@pytest.mark.timeout(600)
def test_a_cls_teacher_of_another_width_distils_on_two_ray_train_workers(ray_cluster, s3, s3_bitext, tiny_model_dir,
                                                                         cls_teacher_dir):
    """DDP over two workers trains the student with its map into the 24-d/16-d teacher's space."""
    cfg = tiny_ray_config(tiny_model_dir, cls_teacher_dir, s3["bucket"], "wide-teacher")
    cfg.steps, cfg.loss.mse_weight = 4, 1.0
    student = Encoder.load(str(run_training(cfg)))
    assert student.dim == 32 and student.pooling == "mean"  # the student keeps its own space
    assert student.encode(["Ein Hund rennt."]).shape == (1, 32)
