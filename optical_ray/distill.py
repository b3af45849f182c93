"""The distillation loop, single process: bitext pairs -> teacher (frozen) + student -> objective ->
AdamW. Ray Train runs the same :class:`Distiller` in each worker (see :mod:`optical_ray.train`).
"""

from __future__ import annotations

import json
import logging
import random
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from . import data, storage
from .config import DistillConfig, save_config
from .evaluate import evaluate, write_report
from .losses import DistillationObjective, LossWeights
from .models import Encoder, EncoderOutput, publish

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_bitext(cfg: DistillConfig) -> pa.Table:
    """All training pairs in memory: from prepared shards, or built from the caption tables."""
    if cfg.data.bitext:
        return pa.concat_tables([storage.read_parquet(f) for f in data.check_bitext_shards(cfg.data.bitext)])
    captions = data.read_captions(cfg.data.train)
    held_out = data.image_ids(cfg.data.exclude_images_from)
    return data.bitext_pairs(captions, cfg.data.languages, held_out)[0]


def batches(pairs: pa.Table, batch_size: int, seed: int, start_step: int = 0) -> Iterator[tuple[list[str], list[str]]]:
    """Endless (english, translation) batches of exactly ``batch_size``, reshuffled each epoch from
    ``seed``; starting at ``start_step`` gives the same stream a run from step 0 would have reached."""
    if pairs.num_rows < batch_size:
        raise ValueError(f"{pairs.num_rows} bitext pairs cannot fill one batch of {batch_size}")
    english = pairs["english"].to_pylist()
    translation = pairs["translation"].to_pylist()
    per_epoch = len(english) // batch_size
    step = start_step
    while True:
        epoch, offset = divmod(step, per_epoch)
        order = np.random.default_rng([seed, epoch]).permutation(len(english))
        for i in range(offset, per_epoch):
            idx = order[i * batch_size : (i + 1) * batch_size]
            yield [english[j] for j in idx], [translation[j] for j in idx]
            step += 1


def load_models(cfg: DistillConfig, device: torch.device) -> tuple[Encoder, Encoder]:
    """(student, frozen teacher). ``teacher: student-init`` is a frozen copy of the student's start."""
    student = Encoder.load(cfg.student, max_length=cfg.max_length).to(device)
    if cfg.freeze_word_embeddings:
        student.freeze_word_embeddings()
    teacher = Encoder.load(cfg.teacher, max_length=cfg.max_length).to(device).eval()
    teacher.requires_grad_(False)
    return student, teacher


def linear_warmup_decay(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class Distiller:
    """One training step at a time. ``model`` is what the forward pass runs -- the student itself,
    or its DDP wrapper under Ray Train -- while ``student`` is used for tokenising and saving."""

    def __init__(self, cfg: DistillConfig, student: Encoder, teacher: Encoder, model: torch.nn.Module | None = None):
        self.cfg, self.student, self.teacher = cfg, student, teacher
        self.model = model if model is not None else student
        weights = LossWeights(cfg.loss.ot_weight, cfg.loss.contrastive_weight, cfg.loss.mse_weight)
        self.objective = DistillationObjective(weights, cfg.loss.sinkhorn_reg, cfg.loss.temperature, cfg.loss.sinkhorn_iters)
        params = [p for p in student.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
        self.scheduler = linear_warmup_decay(self.optimizer, cfg.optim.warmup_steps, cfg.steps)
        self.step_count = 0
        self.autocast = student.device.type == "cuda" and cfg.bf16

    def step(self, english: list[str], translation: list[str]) -> dict[str, float]:
        self.model.train()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
            # Each side is encoded as retrieval will use it: translations are queries, English
            # sentences are the corpus (E5's "passage:"). Teaching translations to match English
            # *queries* would pull them away from what the index holds.
            with torch.no_grad():
                teacher_out = self.teacher(self.teacher.tokenize(english, "passage"))
            if self.objective.needs_student_english:
                # One forward pass over both sides: DDP expects one forward per backward.
                prompts = ["query"] * len(translation) + ["passage"] * len(english)
                both = self.model(self.student.tokenize(translation + english, prompts))
                student_out, student_en = split_output(both, len(translation))
            else:
                student_out, student_en = self.model(self.student.tokenize(translation, "query")), None
            loss, parts = self.objective(teacher_out, student_out, student_en)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"step {self.step_count}: loss is {float(loss)} ({parts})")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in self.student.parameters() if p.requires_grad], self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.step_count += 1
        return {"loss": float(loss.detach()), **{f"loss_{k}": v for k, v in parts.items()},
                "lr": self.scheduler.get_last_lr()[0]}

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(), "step": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step_count = int(state["step"])


def split_output(out: EncoderOutput, n: int) -> tuple[EncoderOutput, EncoderOutput]:
    """The first ``n`` rows of a batched encoder output, and the rest."""
    def part(rows: slice) -> EncoderOutput:
        return EncoderOutput(out.token_states[rows], out.content_mask[rows], out.embedding[rows])

    return part(slice(0, n)), part(slice(n, None))


def dev_report(cfg: DistillConfig, student: Encoder, dev_captions: pa.Table, progress: bool = False) -> dict:
    return evaluate(student, dev_captions, cfg.data.dev_languages, high=cfg.data.high_resource,
                    low=cfg.data.low_resource, batch_size=cfg.eval_batch_size, progress=progress)


def dev_metrics(report: dict) -> dict[str, float]:
    """Flat metrics for logging and for Ray: dev R@1 per language, their mean, and the gap."""
    out = {f"dev_r1_{lang}": m["R@1"] for lang, m in report["languages"].items()}
    out["dev_r1_mean"] = float(np.mean([m["R@1"] for m in report["languages"].values()]))
    low = report["gap"]["low"]
    if low:
        out["dev_r1_low"] = float(np.mean([report["languages"][lang]["R@1"] for lang in low]))
    if report["gap"]["R@1"] is not None:
        out["dev_gap"] = report["gap"]["R@1"]
    return out


@dataclass
class DistillResult:
    model_dir: Path
    dev_report: dict
    history: list[dict] = field(default_factory=list)


def evaluation_due(cfg: DistillConfig, step: int) -> bool:
    """Whether step ``step`` ends with a dev evaluation: every ``eval_every`` steps and the last one."""
    return step == cfg.steps or bool(cfg.eval_every and step % cfg.eval_every == 0)


def fit(cfg: DistillConfig, progress: bool = True, on_metrics: Callable[[dict], None] | None = None
        ) -> tuple[Encoder, dict, list[dict]]:
    """Train for ``cfg.steps`` and evaluate on the dev set every ``eval_every`` steps and at the end.

    ``on_metrics`` receives every logged metrics dict; those of evaluation steps (always the last one)
    carry the dev metrics. Returns (student, final dev report, logged metrics).
    """
    seed_everything(cfg.seed)
    pairs = load_bitext(cfg)
    dev_captions = data.read_captions(cfg.data.dev)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    student, teacher = load_models(cfg, device)
    distiller = Distiller(cfg, student, teacher)

    history: list[dict] = []
    report: dict = {}
    stream = batches(pairs, cfg.batch_size, cfg.seed)
    bar = tqdm(total=cfg.steps, desc="distill", unit="step", disable=not progress)
    start = time.perf_counter()
    for step in range(1, cfg.steps + 1):
        metrics = distiller.step(*next(stream))
        metrics.update(step=step, pairs_per_s=step * cfg.batch_size / (time.perf_counter() - start))
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", pairs_s=f"{metrics['pairs_per_s']:.1f}")
        evaluate_now = evaluation_due(cfg, step)
        if evaluate_now:
            report = dev_report(cfg, student, dev_captions, progress=progress and step == cfg.steps)
            metrics.update(dev_metrics(report))
        if evaluate_now or step % cfg.log_every == 0:
            history.append(metrics)
            if on_metrics:
                on_metrics(metrics)
    bar.close()
    return student, report, history


def distill(cfg: DistillConfig, progress: bool = True,
            on_metrics: Callable[[dict], None] | None = None) -> DistillResult:
    """:func:`fit`, then publish the student as a new version under ``output_dir/student`` (its
    ``LATEST`` names it; any model argument accepts the root), the dev report to ``output_dir/dev``,
    the config and ``metrics.jsonl``."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    with open(out / "metrics.jsonl", "w") as metrics_file:
        def log_metrics(metrics: dict) -> None:
            metrics_file.write(json.dumps(metrics) + "\n")
            metrics_file.flush()
            if on_metrics:
                on_metrics(metrics)

        student, report, history = fit(cfg, progress, log_metrics)
    write_report(report, out / "dev", title=f"Dev retrieval after {cfg.steps} steps")
    with tempfile.TemporaryDirectory() as staging:
        model_dir = Path(publish(student.save(Path(staging) / "student"), str(out / "student")))
    return DistillResult(model_dir=model_dir, dev_report=report, history=history)

