"""Training on Ray Train -- distillation, or a teacher: :func:`optical_ray.distill.fit` in each worker of a ``TorchTrainer``
(DDP: gloo on CPU, NCCL on GPU). This module is the wiring only: a reporter that hands metrics and
checkpoints to Ray, the scaling and failure policy, and the export of the final student.

Every worker takes its slice of each global batch (:mod:`optical_ray.batching`; from prepared shards it
reads only the row groups holding its slice), so the pairs trained on do not depend on the number of
workers, and a restarted worker group -- after a
worker or a node is lost, up to ``ray.max_failures`` times -- resumes from the latest checkpoint
(every ``checkpoint_every`` steps) consuming exactly the pairs an uninterrupted run would have.
Running again with the same ``ray.name`` and ``ray.storage_path`` resumes an interrupted run; with a
changed config it is refused (:func:`optical_ray.checkpoints.claim`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import ray
import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from . import checkpoints, data, storage, teacher
from .card import write_model_card
from .config import ConfigError, DistillConfig, TeacherConfig, TrainingConfig, load_config, to_dict, with_absolute_paths
from .distill import Distiller, fit
from .encoder import Encoder
from .evaluate import write_report
from .model_store import check_model, publish

log = logging.getLogger(__name__)


class RayTrainReport:
    """:class:`optical_ray.distill.Reporter` for a Ray Train worker: ``ray.train.report`` is a barrier
    every worker reaches at the same steps; rank 0 attaches the checkpoint."""

    def resume_from(self) -> contextlib.AbstractContextManager[str | None]:
        return checkpoints.opened(ray.train.get_checkpoint())

    def report(self, metrics: dict, checkpoint: str | None) -> None:
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(checkpoint) if checkpoint else None,
                         checkpoint_dir_name=f"step_{metrics['step']:07d}")


# What a worker's config dict is (train_loop_config["schema"]), and the learner that schema trains.
SCHEMAS = {"DistillConfig": (DistillConfig, Distiller), "TeacherConfig": (TeacherConfig, teacher.CaptionRetrieval)}


def train_loop_per_worker(config: dict) -> None:
    """Runs in every Ray Train worker. ``config["distill"]`` is a training config as a dict, of the
    schema ``config["schema"]`` (default DistillConfig)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")  # e.g. "resumed from step"
    schema, learner = SCHEMAS[config.get("schema", "DistillConfig")]
    cfg = load_config(schema, config["distill"])
    context = ray.train.get_context()
    if not cfg.ray.use_gpu:
        torch.set_num_threads(cfg.ray.torch_threads or max(1, int(cfg.ray.cpus_per_worker)))
    fit(cfg, RayTrainReport(), learner=learner, rank=context.get_world_rank(), world=context.get_world_size(),
        device=ray.train.torch.get_device(),
        wrap=lambda student: ray.train.torch.prepare_model(student, parallel_strategy_kwargs={"find_unused_parameters": False}))


def run_config(cfg: TrainingConfig) -> RunConfig:
    filesystem, path = storage.resolve(cfg.ray.storage_path)
    return RunConfig(
        name=cfg.ray.name,
        storage_path=path,
        storage_filesystem=filesystem,
        checkpoint_config=CheckpointConfig(num_to_keep=cfg.ray.num_to_keep),  # the latest: resume and export use it
        failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
    )


def scaling_config(cfg: TrainingConfig) -> ScalingConfig:
    resources = {"CPU": cfg.ray.cpus_per_worker, **cfg.ray.custom_resources}
    if cfg.ray.use_gpu:
        resources["GPU"] = cfg.ray.gpus_per_worker
    return ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu, resources_per_worker=resources)


def run_training(cfg: TrainingConfig, train_loop: Callable[[dict], None] = train_loop_per_worker) -> Path | str:
    """Fit on the connected Ray cluster, then export the final student to ``output_dir/student`` and
    its dev report to ``output_dir/dev`` (local or s3://). Returns the student's location."""
    cfg = with_absolute_paths(cfg)
    # Fail early, in the driver, on what would fail every worker (and every restart) alike.
    if cfg.batch_size % cfg.ray.num_workers:
        raise ConfigError(f"batch_size {cfg.batch_size} does not split evenly over ray.num_workers {cfg.ray.num_workers}")
    for model in (cfg.student, getattr(cfg, "teacher", None)):
        if model:
            check_model(model)
    if getattr(cfg.data, "bitext", None):
        data.check_bitext_shards(cfg.data.bitext)
    checkpoints.claim(storage.join(cfg.ray.storage_path, cfg.ray.name), cfg)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"distill": to_dict(cfg), "schema": type(cfg).__name__},
        scaling_config=scaling_config(cfg),
        run_config=run_config(cfg),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training finished without a checkpoint (see {result.path})")
    return export_student(cfg, result.checkpoint)


def export_student(cfg: TrainingConfig, checkpoint: Checkpoint) -> str:
    """The checkpoint's student, published as a new version under ``output_dir/student`` (local or
    s3://), and its dev report in ``output_dir/dev``. Returns the version's location."""
    with checkpoint.as_directory() as folder, tempfile.TemporaryDirectory() as staging:
        report = json.loads(Path(folder, checkpoints.DEV_REPORT).read_text())
        local = Encoder.load(folder, max_length=cfg.max_length).save(Path(staging) / "student")
        write_model_card(local, cfg, report)
        write_report(report, Path(staging) / "dev", title=f"Dev retrieval after {cfg.steps} steps")
        dev = storage.join(cfg.output_dir, "dev")
        if storage.is_s3(cfg.output_dir):
            storage.copy_dir(str(Path(staging) / "dev"), dev)
        else:
            shutil.rmtree(dev, ignore_errors=True)
            shutil.copytree(Path(staging) / "dev", dev)
        return publish(local, storage.join(cfg.output_dir, "student"))


def train_teacher(cfg: TeacherConfig) -> tuple[str, dict]:
    """Train on the connected Ray cluster (resuming an interrupted run of the same config), publish the
    teacher under ``output_dir/student``, and write ``output_dir/teacher_report.{json,md}``. Returns
    (the teacher's location, the report)."""
    trained = str(run_training(cfg))
    report = teacher.before_and_after(cfg, cfg.student, trained)
    storage.write_bytes((json.dumps(report, indent=1) + "\n").encode(), storage.join(cfg.output_dir, "teacher_report.json"))
    storage.write_bytes(teacher.report_markdown(report).encode(), storage.join(cfg.output_dir, "teacher_report.md"))
    log.info("teacher saved to %s", trained)
    return trained, report
