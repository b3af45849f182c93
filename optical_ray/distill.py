"""The training loop, written once: sentence pairs -> student (and a frozen teacher) -> objective ->
AdamW, with dev evaluations, checkpoints and exact resume.

:func:`fit` is the loop; a :class:`Learner` is what it trains: :class:`Distiller` (bitext, from a
teacher) or :class:`optical_ray.teacher.CaptionRetrieval` (training that teacher). Where it runs
decides only its :class:`Reporter` -- where metrics and checkpoints go and which checkpoint to resume from: :class:`LocalRun` for the single-process
:func:`distill` (a folder), Ray Train's worker in :mod:`optical_ray.train`, a Tune trial in
:mod:`optical_ray.tune`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from . import batching, beir, checkpoints, data, pretokenized, storage
from .card import write_model_card
from .config import DataConfig, DistillConfig, TrainingConfig, save_config
from .encoder import Encoder, EncoderOutput
from .evaluate import bitext_report, evaluate, read_bitext, report_markdown, write_report
from .losses import DistillationObjective, LossWeights, TeacherSpace
from .model_store import publish

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_bitext(cfg: DistillConfig) -> pa.Table:
    """All training pairs in memory: from prepared shards, or built from the caption tables."""
    if cfg.data.bitext:
        return pa.concat_tables([storage.read_parquet(f) for f in data.check_bitext_shards(cfg.data.bitext)])
    captions = data.read_captions(cfg.data.train, cfg.data.drop_blank)
    held_out = data.image_ids(cfg.data.exclude_images_from, cfg.data.drop_blank)
    return data.bitext_pairs(captions, cfg.data.languages, held_out, cfg.data.pairing)[0]


def training_batches(cfg: DistillConfig, start_step: int, rank: int = 0, world: int = 1,
                     columns: tuple[str, ...] = batching.TEXT_COLUMNS) -> Iterator[tuple[list, ...]]:
    """This worker's batches of ``columns`` from ``start_step`` on: prepared shards are read in
    ``data.lanes`` lanes, each worker only its own row groups (:func:`batching.lane_batches`); pairs built
    from caption tables are held in memory and shuffled whole (:func:`batching.batches`). Either order is
    a function of (seed, step) alone, so resuming is exact on any number of workers."""
    order = {"batch_size": cfg.batch_size, "seed": cfg.seed, "start_step": start_step, "rank": rank, "world": world,
             "columns": columns, "length_buckets": cfg.length_buckets}
    if cfg.data.bitext:
        return batching.lane_batches(data.check_bitext_shards(cfg.data.bitext), lanes=cfg.data.lanes, **order)
    return batching.batches(load_bitext(cfg), **order)


def load_models(cfg: DistillConfig, device: torch.device) -> tuple[Encoder, Encoder]:
    """(student, frozen teacher). ``teacher: student-init`` is a frozen copy of the student's start."""
    student = Encoder.load(cfg.student, max_length=cfg.max_length).to(device)
    if cfg.freeze_word_embeddings:
        student.freeze_word_embeddings()
    teacher = Encoder.load(cfg.teacher, max_length=cfg.max_length).to(device).eval()
    teacher.requires_grad_(False)
    if TeacherSpace.needed(student, teacher):
        # A submodule of the student, so the optimiser and DDP see it; Encoder.save leaves it out.
        student.to_teacher = TeacherSpace(student, teacher).to(device)
    return student, teacher


def linear_warmup_decay(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class Learner:
    """What :func:`fit` trains, one optimisation step at a time: the student, its loss on a batch of
    sentence pairs, its batches and its dev evaluation. ``model`` is what the forward pass runs -- the
    student itself, or its DDP wrapper under Ray Train -- while ``student`` tokenises and saves.

    Subclasses: :class:`Distiller` (bitext, from a frozen teacher) and
    :class:`optical_ray.teacher.CaptionRetrieval` (a teacher trained on caption pairs)."""

    name = "train"  # what the progress bar calls the run

    def __init__(self, cfg: TrainingConfig, student: Encoder, model: torch.nn.Module | None = None):
        self.cfg, self.student = cfg, student
        self.model = model if model is not None else student
        params = [p for p in student.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
        self.scheduler = linear_warmup_decay(self.optimizer, cfg.optim.warmup_steps, cfg.steps)
        self.step_count = 0
        # bf16 autocast on CUDA (CPU bf16 matmuls are slower than float32 on most CPUs); settable for tests.
        self.bf16 = student.device.type == "cuda" and cfg.bf16

    @classmethod
    def create(cls, cfg: TrainingConfig, device: torch.device, wrap: Callable[[Encoder], torch.nn.Module] | None = None
               ) -> Learner:
        raise NotImplementedError

    def prepare(self, first: list[str], second: list[str], *columns) -> dict:
        """The batch as the tensors :meth:`loss` takes. Runs ahead of the step in a background thread;
        with pre-tokenised bitext (:mod:`optical_ray.pretokenized`) it only pads."""
        raise NotImplementedError

    def loss(self, inputs: dict) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def batches(self, start_step: int, rank: int = 0, world: int = 1) -> Iterator[tuple[list, ...]]:
        """Endless batches from ``start_step``: two text columns, then whatever :meth:`prepare` also takes."""
        raise NotImplementedError

    def dev_data(self) -> pa.Table | tuple | beir.RetrievalSet:
        """What :meth:`dev_report` evaluates on, read once per run."""
        raise NotImplementedError

    def dev_report(self, dev: pa.Table | tuple | beir.RetrievalSet, progress: bool = False) -> dict:
        raise NotImplementedError

    def step(self, first: list[str], second: list[str], inputs: dict | None = None) -> dict[str, float]:
        """One optimisation step on a batch of pairs (``inputs``: the batch already :meth:`prepare`-d)."""
        inputs = inputs if inputs is not None else self.prepare(first, second)
        self.model.train()
        with torch.autocast(self.student.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            loss, parts = self.loss(inputs)
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


class Distiller(Learner):
    """Distillation on (english, translation) bitext: the student's translation against the frozen
    teacher's English, with the OT / contrastive / MSE objective of :mod:`optical_ray.losses`."""

    name = "distill"

    def __init__(self, cfg: DistillConfig, student: Encoder, teacher: Encoder, model: torch.nn.Module | None = None):
        super().__init__(cfg, student, model)
        self.teacher = teacher
        weights = LossWeights(cfg.loss.ot_weight, cfg.loss.contrastive_weight, cfg.loss.mse_weight)
        self.objective = DistillationObjective(weights, cfg.loss.sinkhorn_reg, cfg.loss.temperature, cfg.loss.sinkhorn_iters)
        # What each forward pass reads, as (encoder, [(text column, prompt), ...]). Each side is encoded
        # as retrieval will use it: translations are queries, English sentences are the corpus (E5's
        # "passage:"); teaching translations to match English *queries* would pull them away from what
        # the index holds. With the student's English too, both student sides share one batch: one
        # forward pass, as DDP expects one forward per backward.
        student_reads = [("translation", "query")]
        if self.objective.needs_student_english:
            student_reads.append(("english", "passage"))
        self.reads = {"teacher": (teacher, [("english", "passage")]), "student": (student, student_reads)}
        # The token columns of prepared bitext, per forward pass, when it was tokenised for its model.
        prepared = data.prepared_tokens(cfg.data.bitext) if cfg.data.bitext else {}
        self.token_columns: dict[str, list[str]] = {}
        for name, (encoder, reads) in self.reads.items():
            found = [pretokenized.find_columns(prepared, encoder, column, prompt) for column, prompt in reads] if prepared else [None]
            if all(found):
                self.token_columns[name] = [c for pair in found for c in pair]
        # A teacher that tokenises as the student does (e.g. a frozen copy of it) shares its columns.
        self._columns = ("english", "translation",
                         *dict.fromkeys(c for columns in self.token_columns.values() for c in columns))

    @classmethod
    def create(cls, cfg: DistillConfig, device: torch.device, wrap=None) -> Distiller:
        student, teacher = load_models(cfg, device)
        return cls(cfg, student, teacher, model=wrap(student) if wrap else None)

    def state_dict(self) -> dict:
        """The base state, and the map into a wider or narrower teacher's space (the student's saved
        folder leaves it out), so resuming restores it exactly."""
        state = super().state_dict()
        if hasattr(self.student, "to_teacher"):
            state["to_teacher"] = self.student.to_teacher.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if hasattr(self.student, "to_teacher"):
            self.student.to_teacher.load_state_dict(state["to_teacher"])

    def columns(self) -> tuple[str, ...]:
        """The bitext columns a batch carries, in this order: the texts, and the token columns
        :meth:`prepare` pads (fixed when the learner is made)."""
        return self._columns

    def prepare(self, english: list[str], translation: list[str], *tokens: pa.Array) -> dict:
        """The batch as tensors: the prepared token columns (``tokens``, in :meth:`columns` order)
        padded where the bitext carries them for this model, else the texts tokenised here."""
        texts, given = {"english": english, "translation": translation}, dict(zip(self.columns()[2:], tokens))

        def inputs(name: str) -> dict:
            encoder, reads = self.reads[name]
            if name in self.token_columns:
                arrays = [given[c] for c in self.token_columns[name]]
                return pretokenized.collate(arrays[0::2], arrays[1::2], encoder.pad_id)
            return encoder.tokenize([t for column, _ in reads for t in texts[column]],
                                    [prompt for column, prompt in reads for _ in texts[column]])

        return {"teacher": inputs("teacher"), "student": inputs("student"), "n": len(translation)}

    def loss(self, inputs: dict) -> tuple[torch.Tensor, dict[str, float]]:
        with torch.no_grad():
            teacher_out = self.teacher(inputs["teacher"])
        out = self.model(inputs["student"])
        if hasattr(self.student, "to_teacher"):
            out = self.student.to_teacher(out)
        student_out, student_en = split_output(out, inputs["n"]) if self.objective.needs_student_english else (out, None)
        return self.objective(teacher_out, student_out, student_en)

    def batches(self, start_step: int, rank: int = 0, world: int = 1) -> Iterator[tuple[list, ...]]:
        return training_batches(self.cfg, start_step, rank, world, self.columns())

    def dev_data(self) -> pa.Table | tuple | beir.RetrievalSet:
        """The dev caption tables, the dev bitext's (English lines, {language: lines}) or the BEIR set."""
        d = self.cfg.data
        if d.dev_beir:
            return beir.load_set(d.dev_beir, d.dev_beir_split)
        if d.dev_bitext:
            return read_bitext(d.dev_bitext["en"], {lang: d.dev_bitext[lang] for lang in d.dev_languages})
        return data.read_captions(d.dev, d.drop_blank)

    def dev_report(self, dev: pa.Table | tuple | beir.RetrievalSet, progress: bool = False) -> dict:
        return dev_report(self.cfg, self.student, dev, progress)


def split_output(out: EncoderOutput, n: int) -> tuple[EncoderOutput, EncoderOutput]:
    """The first ``n`` rows of a batched encoder output, and the rest."""
    def part(rows: slice) -> EncoderOutput:
        return EncoderOutput(out.token_states[rows], out.content_mask[rows], out.embedding[rows])

    return part(slice(0, n)), part(slice(n, None))


def dev_report(cfg: DistillConfig, student: Encoder, dev: pa.Table | tuple | beir.RetrievalSet,
               progress: bool = False) -> dict:
    """Dev retrieval: caption tables (queries find their image's captions), bitext (each sentence
    finds its English translation) or a BEIR set (queries rank a corpus), as :meth:`Distiller.dev_data`
    read them."""
    d = cfg.data
    if isinstance(dev, beir.RetrievalSet):
        runs = beir.search(student, dev, d.dev_languages, cfg.eval_batch_size, progress)
        return beir.build_report(dev.qrels, runs, d.high_resource, d.low_resource)
    if isinstance(dev, tuple):
        return bitext_report(student, *dev, high=d.high_resource, low=d.low_resource, batch_size=cfg.eval_batch_size,
                             progress=progress)
    return evaluate(student, dev, d.dev_languages, high=d.high_resource, low=d.low_resource,
                    batch_size=cfg.eval_batch_size, progress=progress)


def is_beir_report(report: dict) -> bool:
    return report["gap"].get("measure") == "nDCG@10"


def write_dev_report(report: dict, out: Path, title: str) -> Path:
    """report.json and report.md of a dev evaluation, in the layout of its kind of dev set."""
    return beir.write_report(report, out, title) if is_beir_report(report) else write_report(report, out, title)


def dev_report_markdown(report: dict, title: str) -> str:
    return beir.report_markdown(report, title) if is_beir_report(report) else report_markdown(report, title)


# The measure a dev set is scored by (BEIR sets: nDCG@10, the rest: R@1) and its name in metric keys:
# dev_r1_de, dev_ndcg10_sw; the tune objectives low_r1, mean_ndcg10, ... are named the same way.
DEV_MEASURES = {"R@1": "r1", "nDCG@10": "ndcg10"}


def dev_measure(d: DataConfig) -> str:
    """The measure the configured dev set is scored by."""
    return "nDCG@10" if d.dev_beir else "R@1"


def dev_metrics(report: dict) -> dict[str, float]:
    """Flat metrics for logging and for Ray: the dev measure per language, its mean over all and over
    the low-resource languages, and the high-minus-low gap."""
    measure = "nDCG@10" if is_beir_report(report) else "R@1"
    key, gap = DEV_MEASURES[measure], report["gap"].get("value", report["gap"].get("R@1"))
    values = {lang: m[measure] for lang, m in report["languages"].items()}
    out = {f"dev_{key}_{lang}": v for lang, v in values.items()}
    out[f"dev_{key}_mean"] = float(np.mean(list(values.values())))
    if report["gap"]["low"]:
        out[f"dev_{key}_low"] = float(np.mean([values[lang] for lang in report["gap"]["low"]]))
    if gap is not None:
        out["dev_gap"] = gap
    return out


@dataclass
class DistillResult:
    model_dir: Path
    dev_report: dict
    history: list[dict] = field(default_factory=list)


def evaluation_due(cfg: TrainingConfig, step: int) -> bool:
    """Whether step ``step`` ends with a dev evaluation: every ``eval_every`` steps and the last one."""
    return step == cfg.steps or bool(cfg.eval_every and step % cfg.eval_every == 0)


def checkpoint_due(cfg: TrainingConfig, step: int) -> bool:
    """Every ``checkpoint_every`` steps and at every dev evaluation (so the last step always has one)."""
    return evaluation_due(cfg, step) or bool(cfg.checkpoint_every and step % cfg.checkpoint_every == 0)


class Reporter(Protocol):
    """Where a run of :func:`fit` reports. ``report`` is called on every worker at the same steps
    (logging steps and checkpoint steps); ``checkpoint`` is a folder on rank 0 at checkpoint steps,
    else None, and is deleted after the call."""

    def resume_from(self) -> contextlib.AbstractContextManager[str | None]: ...

    def report(self, metrics: dict, checkpoint: str | None) -> None: ...


def fit(cfg: TrainingConfig, reporter: Reporter, *, learner: type[Learner] | None = None, rank: int = 0, world: int = 1,
        device: torch.device | None = None, wrap: Callable[[Encoder], torch.nn.Module] | None = None,
        progress: bool = False) -> tuple[Encoder, dict]:
    """Train from the reporter's latest checkpoint (or from the start) to ``cfg.steps``.

    ``learner`` is what is trained (default :class:`Distiller`; e.g.
    :class:`optical_ray.teacher.CaptionRetrieval` for a teacher).
    Every worker runs this with its ``rank`` of ``world``; ``wrap`` makes the forward model (DDP).
    Returns (student, dev report of the last step); the report is {} on ranks other than 0.
    """
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    seed_everything(cfg.seed)  # the same initial weights everywhere (DDP also broadcasts them)
    learner = (learner or Distiller).create(cfg, device, wrap)
    student = learner.student
    report: dict = {}
    with reporter.resume_from() as folder:
        if folder:
            report = checkpoints.restore(folder, student, learner, cfg)
            log.info("resumed from step %d (%d pairs consumed)", learner.step_count, learner.step_count * cfg.batch_size)
    dev = learner.dev_data() if rank == 0 else None
    first_step, start = learner.step_count, time.perf_counter()
    bar = tqdm(total=cfg.steps, initial=first_step, desc=learner.name, unit="step", disable=not progress)
    with contextlib.closing(prefetched(learner.batches(learner.step_count, rank, world), learner.prepare)) as stream:
        while learner.step_count < cfg.steps:
            batch, inputs = next(stream)
            torch.manual_seed(checkpoints.step_seed(cfg.seed, learner.step_count, rank))
            metrics = learner.step(batch[0], batch[1], inputs=inputs)
            step = learner.step_count
            metrics.update(step=step, pairs_per_s=(step - first_step) * cfg.batch_size / (time.perf_counter() - start))
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", pairs_s=f"{metrics['pairs_per_s']:.1f}")
            evaluate_now, checkpoint_now = evaluation_due(cfg, step), checkpoint_due(cfg, step)
            if evaluate_now and rank == 0:
                report = learner.dev_report(dev, progress=progress and step == cfg.steps)
                metrics.update(dev_metrics(report))
            if checkpoint_now or step % cfg.log_every == 0:
                with tempfile.TemporaryDirectory() as folder:
                    saved = None
                    if checkpoint_now and rank == 0:
                        saved = checkpoints.save(folder, student, learner, cfg, report if evaluate_now else None)
                    reporter.report(metrics, saved)
    bar.close()
    return student, report


def prefetched(batches: Iterator[tuple[list, ...]], prepare: Callable[..., dict], depth: int = 2
               ) -> Iterator[tuple[tuple[list, ...], dict]]:
    """``(batch, prepare(*batch))``, prepared ``depth`` batches ahead in one background thread. The
    batches are drawn in order on the caller's thread, so what is trained does not change."""
    def job(batch: tuple[list, ...]) -> tuple[tuple[list, ...], dict]:
        return batch, prepare(*batch)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepare") as pool:
        pending = deque(pool.submit(job, next(batches)) for _ in range(depth))
        while True:
            ready = pending.popleft().result()
            pending.append(pool.submit(job, next(batches)))
            yield ready


class LocalRun:
    """The single-process reporter: metrics appended to ``output_dir/metrics.jsonl`` and kept in
    ``history``; checkpoints in ``output_dir/checkpoints/step_NNNNNNN`` (the latest ``keep``)."""

    def __init__(self, cfg: TrainingConfig, on_metrics: Callable[[dict], None] | None = None, keep: int = 2):
        self.out = Path(cfg.output_dir)
        self.folder = self.out / "checkpoints"
        self.folder.mkdir(parents=True, exist_ok=True)
        checkpoints.claim(str(self.folder), cfg)
        self.on_metrics, self.keep, self.history = on_metrics, keep, []

    def saved(self) -> list[Path]:
        return sorted(self.folder.glob("step_*"))

    @contextlib.contextmanager
    def resume_from(self) -> Iterator[str | None]:
        saved = self.saved()
        step = int(saved[-1].name.removeprefix("step_")) if saved else 0
        log_file = self.out / "metrics.jsonl"
        if log_file.exists():  # steps after the checkpoint are trained (and logged) again
            lines = [line for line in log_file.read_text().splitlines() if json.loads(line)["step"] <= step]
            log_file.write_text("".join(line + "\n" for line in lines))
        yield str(saved[-1]) if saved else None

    def report(self, metrics: dict, checkpoint: str | None) -> None:
        if checkpoint:
            final = self.folder / f"step_{metrics['step']:07d}"
            staging = final.with_name(final.name + ".partial")  # a crash mid-copy leaves no half checkpoint
            shutil.rmtree(staging, ignore_errors=True)
            shutil.copytree(checkpoint, staging)
            staging.rename(final)
            for old in self.saved()[:-self.keep]:
                shutil.rmtree(old)
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
        self.history.append(metrics)
        if self.on_metrics:
            self.on_metrics(metrics)


def distill(cfg: TrainingConfig, progress: bool = True, on_metrics: Callable[[dict], None] | None = None,
            learner: type[Learner] | None = None) -> DistillResult:
    """:func:`fit` of ``learner`` (default :class:`Distiller`) in this process, resuming from ``output_dir/checkpoints`` when a run of the same
    config stopped there; then publish the student as a new version under ``output_dir/student`` (its
    ``LATEST`` names it; any model argument accepts the root), the dev report to ``output_dir/dev``,
    the config and ``metrics.jsonl``."""
    out = Path(cfg.output_dir)
    run = LocalRun(cfg, on_metrics)
    save_config(cfg, out / "config.yaml")
    student, report = fit(cfg, run, learner=learner, progress=progress)
    write_dev_report(report, out / "dev", title=f"Dev retrieval after {cfg.steps} steps")
    with tempfile.TemporaryDirectory() as staging:
        folder = student.save(Path(staging) / "student")
        write_model_card(folder, cfg, report)
        model_dir = Path(publish(folder, str(out / "student")))
    return DistillResult(model_dir=model_dir, dev_report=report, history=run.history)
