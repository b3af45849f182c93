"""Distillation on Ray Train: the :class:`~optical_ray.distill.Distiller` loop in each worker of a
``TorchTrainer`` (DDP: gloo on CPU, NCCL on GPU), bitext streamed to the workers by Ray Data.

Each dev evaluation is reported with a checkpoint (student folder + optimizer, scheduler and step).
A worker failure restarts the worker group from the latest checkpoint (``ray.max_failures``); running
again with the same ``ray.name`` and ``ray.storage_path`` resumes an interrupted run.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import ray
import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from . import data, storage
from .config import DistillConfig, load_config, to_dict, with_absolute_paths
from .distill import Distiller, dev_metrics, dev_report, evaluation_due, load_bitext, load_models, seed_everything
from .evaluate import write_report
from .models import Encoder, publish

log = logging.getLogger(__name__)

SCORE = "dev_r1_mean"
TRAIN_STATE = "train_state.pt"
DEV_REPORT = "dev_report.json"


def train_loop_per_worker(config: dict) -> None:
    """Runs in every Ray Train worker. ``config["distill"]`` is a DistillConfig as a dict."""
    cfg = load_config(DistillConfig, config["distill"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} does not split evenly over {world} workers")
    local_batch = cfg.batch_size // world
    if not cfg.ray.use_gpu:
        torch.set_num_threads(cfg.ray.torch_threads or max(1, int(cfg.ray.cpus_per_worker)))
    seed_everything(cfg.seed)  # same initial state everywhere; DDP also broadcasts it

    device = ray.train.torch.get_device()
    student, teacher = load_models(cfg, device)
    model = ray.train.torch.prepare_model(student, parallel_strategy_kwargs={"find_unused_parameters": False})
    distiller = Distiller(cfg, student, teacher, model=model)

    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            restore(folder, student, distiller)
        log.info("resumed from step %d", distiller.step_count)
    dev_captions = data.read_captions(cfg.data.dev) if rank == 0 else None

    shard = ray.train.get_dataset_shard("train")
    start, pairs_seen = time.perf_counter(), 0
    while distiller.step_count < cfg.steps:
        for batch in shard.iter_batches(batch_size=local_batch, drop_last=True, batch_format="numpy",
                                        local_shuffle_buffer_size=cfg.ray.shuffle_buffer, local_shuffle_seed=cfg.seed + rank):
            metrics = distiller.step(list(batch["english"]), list(batch["translation"]))
            step = distiller.step_count
            pairs_seen += cfg.batch_size
            metrics.update(step=step, pairs_per_s=pairs_seen / (time.perf_counter() - start))
            final = step == cfg.steps
            if evaluation_due(cfg, step):
                report_checkpoint(cfg, rank, student, distiller, dev_captions, metrics, final)
            elif step % cfg.log_every == 0:
                ray.train.report(metrics)
            if final:
                return


def report_checkpoint(cfg: DistillConfig, rank: int, student: Encoder, distiller: Distiller, dev_captions,
                      metrics: dict, final: bool) -> None:
    """Rank 0 evaluates on the dev set and reports a checkpoint; the others report the same metrics
    (``ray.train.report`` is a barrier that every worker must reach)."""
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if rank == 0:
            report = dev_report(cfg, student, dev_captions)
            metrics.update(dev_metrics(report))
            student.save(folder)
            torch.save(distiller.state_dict(), os.path.join(folder, TRAIN_STATE))
            Path(folder, DEV_REPORT).write_text(json.dumps(report))
            checkpoint = Checkpoint.from_directory(folder)
        metrics["final"] = final
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"step_{distiller.step_count:07d}")


def restore(folder: str, student: Encoder, distiller: Distiller) -> None:
    from safetensors.torch import load_file

    state = load_file(os.path.join(folder, "model.safetensors"), device=str(student.device))
    student.model.load_state_dict(state)
    distiller.load_state_dict(torch.load(os.path.join(folder, TRAIN_STATE), weights_only=True))


def training_dataset(cfg: DistillConfig) -> ray.data.Dataset:
    """Bitext as a Ray Dataset: prepared shards are streamed (checked first, so a missing or corrupt
    shard fails before training); caption tables are joined here and handed over in memory."""
    if cfg.data.bitext:
        files = data.check_bitext_shards(cfg.data.bitext)
        filesystem, _ = storage.resolve(files[0])
        paths = [storage.resolve(f)[1] for f in files]
        return ray.data.read_parquet(paths, filesystem=filesystem, columns=list(data.BITEXT_COLUMNS)).randomize_block_order(seed=cfg.seed)
    return ray.data.from_arrow(load_bitext(cfg)).random_shuffle(seed=cfg.seed)


def run_config(cfg: DistillConfig) -> RunConfig:
    filesystem, path = storage.resolve(cfg.ray.storage_path)
    return RunConfig(
        name=cfg.ray.name,
        storage_path=path,
        storage_filesystem=filesystem,
        checkpoint_config=CheckpointConfig(num_to_keep=cfg.ray.num_to_keep, checkpoint_score_attribute=SCORE,
                                           checkpoint_score_order="max"),
        failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
    )


def scaling_config(cfg: DistillConfig) -> ScalingConfig:
    resources = {"CPU": cfg.ray.cpus_per_worker}
    if cfg.ray.use_gpu:
        resources["GPU"] = cfg.ray.gpus_per_worker
    return ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu, resources_per_worker=resources)


def run_training(cfg: DistillConfig, train_loop: Callable[[dict], None] = train_loop_per_worker) -> Path | str:
    """Fit on the connected Ray cluster, then export the final student to ``output_dir/student`` and
    its dev report to ``output_dir/dev`` (local or s3://). Returns the student's location."""
    cfg = with_absolute_paths(cfg)
    Encoder.load(cfg.student)  # fail early, in the driver, on a bad model name or folder
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"distill": to_dict(cfg)},
        scaling_config=scaling_config(cfg),
        run_config=run_config(cfg),
        datasets={"train": training_dataset(cfg)},
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training finished without a checkpoint (see {result.path})")
    return export_student(cfg, result.checkpoint)


def export_student(cfg: DistillConfig, checkpoint: Checkpoint) -> str:
    """The checkpoint's student, published as a new version under ``output_dir/student`` (local or
    s3://), and its dev report in ``output_dir/dev``. Returns the version's location."""
    with checkpoint.as_directory() as folder, tempfile.TemporaryDirectory() as staging:
        report = json.loads(Path(folder, DEV_REPORT).read_text())
        local = Encoder.load(folder, max_length=cfg.max_length).save(Path(staging) / "student")
        write_report(report, Path(staging) / "dev", title=f"Dev retrieval after {cfg.steps} steps")
        dev = storage.join(cfg.output_dir, "dev")
        if storage.is_s3(cfg.output_dir):
            storage.copy_dir(str(Path(staging) / "dev"), dev)
        else:
            shutil.rmtree(dev, ignore_errors=True)
            shutil.copytree(Path(staging) / "dev", dev)
        return publish(local, storage.join(cfg.output_dir, "student"))
