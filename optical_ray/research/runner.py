"""The research experiment: which loss terms narrow the R@1 gap between high- and low-resource
languages, on which retrieval protocol, does the gain reach languages never trained on -- and what
changes when the teacher already knows the retrieval task?

:func:`run_experiment`, all choices on the dev set and test data used for nothing but evaluation:

1. for each trained arm, a Ray Tune sweep over *its own* knobs (``Arm.knobs``) with the same budget;
2. each arm x seed trained on Ray Train with the same student start, baseline teacher (the first of
   ``teachers``), data and steps, then evaluated on every test set. Each finished run is written as a
   small JSON record under ``results_dir/runs`` keyed by a hash of its effective config, and skipped on
   the next call: an interrupted experiment continues where it stopped, even in another session;
3. with several teacher candidates: the task-trained teacher (``teacher_training``, recorded under
   ``results_dir/teachers``; on a machine without its model, trained again and checked against the
   record), an MSE run per candidate to choose one on dev, and -- when the choice is not the baseline --
   every arm and seed again with it (retuned, or with the baseline's knobs);
4. arms listed in ``chosen_teacher_arms`` (the image-pivot arm), with the chosen teacher only; then the
   tuning check (``tuning_check``): each arm swept again under it, and rerun where that clearly wins;
5. the training-length curves (``curve``): a longer run per listed arm with the teacher its knobs were
   swept under, evaluated at each kept checkpoint;
6. :func:`optical_ray.research.report.write_results` turns the records into results.json, RESULTS.md and plots
   (refreshed after every run, so partial results are readable).

Held-out languages (``held_out_languages``) are removed from training and from the dev objective, so
nothing is trained or chosen on them; they stay in the test sets.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from .. import checkpoints, data
from ..config import (
    TASK_TRAINED,
    DistillConfig,
    ExperimentConfig,
    TeacherConfig,
    TestSet,
    derive,
    to_dict,
    training_fields,
)
from ..distill import dev_metrics
from ..encoder import Encoder
from ..evaluate import COMPARISON_MAX_LENGTH, rank_queries
from ..metrics import pack_ranks
from ..model_store import model_revision
from ..teacher import dev_recall
from ..train import run_training, train_teacher
from ..tune import OBJECTIVES, run_sweep
from .plan import (
    ARMS,
    TRIAL_LOGS,
    arm_config,
    check_arms,
    check_sweep_config,
    config_key,
    placement,
    sweep_config,
    sweep_key,
)
from .report import write_results

log = logging.getLogger(__name__)

# A teacher trained again from its record on another machine may differ in the last bits of its weights
# (other CPU kernels): its dev R@1 may move this much -- 7 of the 1,500 dev queries -- and it is still
# the recorded teacher.
TEACHER_REBUILD_TOLERANCE = 0.005


@dataclass
class TestData:
    spec: TestSet
    captions: pa.Table
    query_images: dict[str, np.ndarray]  # per language, each query's image id, in ranking order


def load_test_sets(cfg: ExperimentConfig) -> list[TestData]:
    tests = []
    for spec in cfg.test_sets:  # protocol and gaps are checked where the config is read (config.TestSet)
        captions = data.without_images(data.read_captions(spec.data), spec.exclude_images_from)
        images = {lang: data.query_captions(captions, lang)["image_id"].to_numpy(zero_copy_only=False)
                  for lang in spec.query_langs}
        tests.append(TestData(spec, captions, images))
    return tests


def evaluate_model(model: str, tests: list[TestData]) -> dict:
    encoder = Encoder.load(model, max_length=COMPARISON_MAX_LENGTH)
    return {t.spec.name: {lang: pack_ranks(r) for lang, r in rank_queries(
        encoder, t.captions, t.spec.query_langs, progress=False, mask_source=t.spec.protocol == "semantic").items()}
        for t in tests}


def tests_key(tests: list[TestData]) -> list[dict]:
    """What of the test sets a record's key holds: their specs (a changed test set is a new run)."""
    return [to_dict(t.spec) for t in tests]


def this_machine() -> dict:
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "cuda": torch.cuda.is_available()}


def write_record(path: Path, record: dict) -> None:
    """Written whole or not at all: a record that exists is a finished run. A new record names the
    machine that wrote it, so a report says where its runs ran, whichever machine writes the report;
    a record written again (a teacher rebuilt) keeps what it said, or did not say, of its first machine."""
    if not path.exists():
        record.setdefault("machine", this_machine())
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(record, indent=1) + "\n")
    partial.replace(path)


class Runner:
    """Runs (or finds recorded) sweeps and runs; everything it returns is a record. With
    ``recorded_only`` it runs nothing and returns None for what is not recorded yet."""

    def __init__(self, cfg: ExperimentConfig, tests: list[TestData], recorded_only: bool = False,
                 verbose: bool = True):
        self.cfg, self.tests, self.recorded_only, self.verbose = cfg, tests, recorded_only, verbose
        self.results = Path(cfg.results_dir)
        self.tests_key = tests_key(tests)
        self.written = 0  # records written by this runner: what a progress report waits for

    def write(self, path: Path, record: dict) -> None:
        write_record(path, record)
        self.written += 1

    def _recorded(self, path: Path) -> dict | None:
        """The record at ``path``, None when there is none. Every method returns it when it exists and,
        with ``recorded_only``, also when it does not (None) instead of running anything."""
        return json.loads(path.read_text()) if path.exists() else None

    def untrained(self) -> dict:
        student = self.cfg.distill.student
        key = config_key({"student": student, "tests": self.tests_key})
        path = self.results / "runs" / f"none-{key}.json"
        if (record := self._recorded(path)) is not None or self.recorded_only:
            return record
        started = time.time()
        record = {"arm": "none", "seed": None, "key": key, "params": {}, "student": student,
                  "tests": evaluate_model(student, self.tests), "wall_s": time.time() - started}
        if revision := model_revision(student):
            record["model_revisions"] = {"student": revision}
        self.write(path, record)
        return record

    def run_config(self, arm: str, seed: int, teacher: str, params: dict) -> tuple[DistillConfig, str, Path]:
        """One run's config, its key and its record's path (named by arm, seed and key)."""
        arm_cfg = arm_config(self.cfg, arm, teacher, seed, params)
        key = config_key({"arm": arm, "distill": training_fields(arm_cfg), "tests": self.tests_key})
        return arm_cfg, key, self.results / "runs" / f"{arm.replace('+', '-')}-seed{seed}-{key}.json"

    def settled(self, arm: str, teacher: str, params: dict) -> dict:
        """A sweep's knobs, or the exact knobs of a recorded run of the arm with this teacher that equal them
        to 12 significant digits. The same seeded Tune draw has come out one ulp apart on another machine
        (lr 7.700029501048745e-05 against ...744e-05), and a run is found by its exact config: without
        this, finished runs would be trained again for a difference no training can see."""
        for path in sorted((self.results / "runs").glob(f"{arm.replace('+', '-')}-seed*.json")):
            recorded = json.loads(path.read_text())
            knobs = recorded["params"]
            if (recorded["arm"] == arm and knobs != params and knobs.keys() == params.keys()
                    and all(math.isclose(knobs[k], v, rel_tol=1e-12) for k, v in params.items())
                    and self.run_config(arm, recorded["seed"], teacher, knobs)[2] == path):
                log.info("%s: the swept knobs %s are those of %s to 12 digits; its exact values are used",
                         arm, params, path.name)
                return knobs
        return params

    def trained(self, arm: str, seed: int, teacher: str, params: dict) -> dict | None:
        arm_cfg, key, path = self.run_config(arm, seed, teacher, params)
        if (record := self._recorded(path)) is not None:
            log.info("%s seed %d: recorded in %s, skipped", arm, seed, path)
        if record is not None or self.recorded_only:
            return record
        # Runs of the baseline teacher's tuned arms are named by arm and seed; any other run of the same
        # arm and seed (another teacher, the teacher choice's default knobs) also by its key, so its Ray
        # storage is its own (a run folder holding another config is refused).
        if not (teacher == self.cfg.teachers[0] and params):
            arm_cfg = derive(arm_cfg, placement(self.cfg, path.stem))
        log.info("%s seed %d (teacher %s): training and evaluating; Ray storage %s/%s", arm, seed, teacher,
                 arm_cfg.ray.storage_path, arm_cfg.ray.name)
        started = time.time()
        student = str(run_training(arm_cfg))
        dev = json.loads((Path(arm_cfg.output_dir) / "dev" / "report.json").read_text())
        record = {"arm": arm, "seed": seed, "key": key, "teacher": teacher, "params": params,
                  "config": training_fields(arm_cfg), "dev": dev_metrics(dev),
                  "tests": evaluate_model(student, self.tests), "wall_s": time.time() - started}
        if revisions := checkpoints.model_revisions(arm_cfg):  # Hugging Face ids: the commits trained with
            record["model_revisions"] = revisions
        self.write(path, record)
        log.info("%s seed %d: recorded in %s after %.0f min", arm, seed, path, record["wall_s"] / 60)
        self.discard(arm_cfg.output_dir, Path(arm_cfg.ray.storage_path) / arm_cfg.ray.name)
        return record

    def discard(self, *folders: str | Path) -> None:
        """Once a run or a sweep is recorded, its student and Ray checkpoints (1.3 GB a run, up to 2.5 GB a
        sweep) have served it and its resumption: deleted unless ``keep_models``."""
        if not self.cfg.keep_models:
            for folder in folders:
                shutil.rmtree(folder, ignore_errors=True)

    def curve(self, arm: str, teacher: str, params: dict) -> dict:
        """One long run of ``arm`` keeping a checkpoint every ``curve.every`` steps, each evaluated on
        ``curve.test_sets`` (every test set if empty) once training is done. The record grows a point per
        evaluated checkpoint, so an interrupted curve resumes its training (Ray Train) or its evaluations
        where they stopped."""
        curve = self.cfg.curve
        stem = f"curve-{arm.replace('+', '-')}-seed{curve.seed}"
        base = arm_config(self.cfg, arm, teacher, curve.seed, params)
        arm_cfg = derive(base, {"steps": curve.steps, "checkpoint_every": curve.every, "eval_every": curve.every,
                                "ray.num_to_keep": curve.steps // curve.every + 1})
        tests = [t for t in self.tests if not curve.test_sets or t.spec.name in curve.test_sets]
        key = config_key({"arm": arm, "distill": training_fields(arm_cfg), "tests": tests_key(tests)})
        arm_cfg = derive(arm_cfg, placement(self.cfg, f"{stem}-{key}"))
        path = self.results / "curves" / f"{stem}-{key}.json"
        wanted = list(range(curve.every, curve.steps + 1, curve.every))
        record = self._recorded(path) or {
            "arm": arm, "seed": curve.seed, "key": key, "teacher": teacher, "params": params,
            "config": training_fields(arm_cfg), "batch_size": arm_cfg.batch_size, "points": {}}
        if all(str(s) in record["points"] for s in wanted) or self.recorded_only:
            return record if record["points"] else None
        folder = Path(arm_cfg.ray.storage_path) / arm_cfg.ray.name
        if not (folder / f"step_{curve.steps:07d}").exists():
            log.info("curve %s: training %d steps; Ray storage %s", stem, curve.steps, folder)
            run_training(arm_cfg)
            self.discard(arm_cfg.output_dir)  # the exported copy; the checkpoints are what is evaluated
        for step in wanted:
            checkpoint = folder / f"step_{step:07d}"
            if str(step) in record["points"]:
                continue
            if not checkpoint.exists():
                raise RuntimeError(f"curve {stem}: no checkpoint at step {step} in {folder}")
            record["points"][str(step)] = evaluate_model(str(checkpoint), tests)
            self.write(path, record)
            log.info("curve %s: step %d recorded in %s", stem, step, path)
            if step != curve.steps:
                self.discard(checkpoint)  # 0.6 GB each; the last one stays as the finished run's
        return record

    def teacher_config(self) -> tuple[TeacherConfig, str, Path]:
        """The task teacher's config placed under out_dir, its key and its record's path."""
        key = config_key(training_fields(self.cfg.teacher_training))
        name = f"teacher-{key}"
        teacher_cfg = derive(self.cfg.teacher_training, placement(self.cfg, name, folder=""))
        return teacher_cfg, key, self.results / "teachers" / f"{name}.json"

    def task_teacher(self) -> dict:
        """Train (or find recorded) the experiment's own teacher: ``teacher_training`` with its output
        under ``out_dir``. The record holds its before/after report and where the model is."""
        teacher_cfg, key, path = self.teacher_config()
        model = str(Path(teacher_cfg.output_dir) / "student")  # the root: its latest version
        record = self._recorded(path)
        if self.recorded_only or (record is not None and Path(model).exists()):  # a report needs no model
            return record
        if record is not None:
            return self.rebuild_teacher(teacher_cfg, path, record)
        log.info("training the task teacher; Ray storage %s/%s", teacher_cfg.ray.storage_path, teacher_cfg.ray.name)
        started = time.time()
        _, report = train_teacher(teacher_cfg)
        record = {"key": key, "model": model, "config": training_fields(teacher_cfg), "report": report,
                  "wall_s": time.time() - started}
        self.write(path, record)
        self.discard(Path(teacher_cfg.ray.storage_path) / teacher_cfg.ray.name)  # the model stays
        return record

    def rebuild_teacher(self, teacher_cfg: TeacherConfig, path: Path, record: dict) -> dict:
        """Train the recorded teacher again when its model is gone (out_dir does not outlive a machine,
        the record does), checked against the record by its dev R@1 instead of the whole before/after
        report: runs recorded with the first model are only comparable with runs of the same teacher."""
        log.info("the task teacher is recorded in %s but its model is gone: training it again; Ray storage %s/%s",
                 path, teacher_cfg.ray.storage_path, teacher_cfg.ray.name)
        started = time.time()
        rebuilt = dev_recall(teacher_cfg, str(run_training(teacher_cfg)))
        recorded = record["report"]["sets"]["dev"]["after"]["R@1"]
        if abs(rebuilt - recorded) > TEACHER_REBUILD_TOLERANCE:
            raise RuntimeError(
                f"the task teacher trained again in {record['model']} has dev R@1 {rebuilt:.4f}, its record {path} "
                f"{recorded:.4f}: it is another teacher, and the runs recorded with the first one cannot be "
                "compared with runs of this one. Delete the record and the chosen teacher's runs to start over.")
        record.setdefault("rebuilds", []).append({"dev_R@1": rebuilt, "wall_s": time.time() - started,
                                                  "machine": this_machine()})
        self.write(path, record)
        log.info("task teacher trained again: dev R@1 %.4f (recorded %.4f)", rebuilt, recorded)
        self.discard(Path(teacher_cfg.ray.storage_path) / teacher_cfg.ray.name)
        return record

    def sweep(self, arm: str, teacher: str, check: bool = False) -> dict:
        """The arm's sweep under ``teacher``, or (``check``) its tuning-check sweep."""
        sweep = (check_sweep_config if check else sweep_config)(self.cfg, arm, teacher)
        key = sweep_key(sweep)
        name = f"{'check-' if check else ''}{arm.replace('+', '-')}-{key}"
        path = self.results / "sweeps" / f"{name}.json"
        if (record := self._recorded(path)) is not None or self.recorded_only:
            return record
        sweep.name = name
        # Ray storage lives and dies with this machine; the trial log, committed beside the records, lets
        # a sweep cut short by the end of a session go on elsewhere without training its finished trials again.
        trial_log = self.results / TRIAL_LOGS / f"{name}.json"
        log.info("%s: sweeping %s (teacher %s); Ray storage %s/%s; trial log %s", arm, ", ".join(ARMS[arm].knobs),
                 teacher, sweep.storage_path, sweep.name, trial_log)
        result = run_sweep(sweep, resume=True, verbose=self.verbose, trial_log=str(trial_log))
        if result.best is None:
            raise RuntimeError(f"arm {arm}: no sweep trial finished; see {sweep.storage_path}/{sweep.name}/trials.csv")
        record = {"arm": arm, "key": key, "teacher": teacher, "params": result.best_params,
                  "knobs": list(ARMS[arm].knobs), "trials": result.trials.to_pylist(), "trial_steps": result.trial_steps}
        if result.replayed:
            record["trials_from_log"] = result.replayed
        self.write(path, record)
        trial_log.unlink(missing_ok=True)  # its trials are in the record now
        self.discard(Path(sweep.storage_path) / sweep.name)
        return record


def choose_teacher(cfg: ExperimentConfig, candidates: list[str], runs: dict[str, dict]) -> dict:
    """The candidate whose choice run -- the same MSE run (default knobs, first seed) under each teacher,
    which the report also compares on the test sets -- scores best on dev. {} while a run is missing."""
    if any(teacher not in runs for teacher in candidates):
        return {}
    scores = {teacher: float(OBJECTIVES[cfg.sweep.objective](runs[teacher]["dev"])) for teacher in candidates}
    chosen = max(scores, key=scores.get)
    log.info("teacher chosen on dev: %s (%s)", chosen, scores)
    return {"chosen": chosen, "dev_scores": scores}


def tuning_verdict(cfg: ExperimentConfig, runs: list[dict], check: dict) -> dict:
    """The arm's dev objective over its seeds (mean, sd) against the best finished trial of its tuning
    check; ``rerun`` when that beats the mean by more than the seed sd (the knobs, not the seed, were
    holding it back)."""
    objective = OBJECTIVES[cfg.sweep.objective]
    scores = np.array([objective(r["dev"]) for r in runs])
    finished = [t["objective"] for t in check["trials"]
                if t.get("status") == "OK" and t.get("steps") == cfg.distill.steps and t.get("objective") is not None]
    best = max(finished) if finished else None
    mean, sd = float(scores.mean()), float(scores.std(ddof=1)) if len(scores) > 1 else 0.0
    return {"dev_mean": mean, "dev_sd": sd, "best": best, "rerun": best is not None and best - mean > sd}


def run_experiment(cfg: ExperimentConfig, recorded_only: bool = False, verbose: bool = True,
                   tests: list[TestData] | None = None) -> dict:
    """Every arm with the baseline teacher (the first candidate), seed by seed, each arm swept just before
    its first run (so one seed of every arm comes first, each as soon as its knobs are). Then, with
    several candidates, the task-trained teacher (when listed) and the choice on dev; if the choice is not
    the baseline, every arm and seed again with it (swept again under it if ``retune_for_teacher``).
    Arms in ``chosen_teacher_arms`` run with the chosen teacher only. Then the tuning check (each arm
    swept again under the chosen teacher, rerun where that beats its knobs). Last, the curves, with the teacher
    the knobs were swept under. Results are rewritten after each run.
    ``recorded_only``: train and evaluate nothing, only write the results of what is recorded so far.
    ``verbose``: Tune's status tables for each sweep; otherwise a bar of finished trials. ``tests``: the
    test sets already loaded (else read from the config)."""

    check_arms(cfg.arms)
    tests = tests if tests is not None else load_test_sets(cfg)  # progress reports reuse the loaded ones
    runner = Runner(cfg, tests, recorded_only, verbose)
    untrained_run = runner.untrained() if "none" in cfg.arms else None  # first: it checks every test set cheaply
    untrained = [untrained_run] if untrained_run is not None else []
    trained = [arm for arm in cfg.arms if ARMS[arm].weights is not None]
    baseline = cfg.teachers[0]
    runs = {baseline: Teacher(baseline)}
    task_teacher, choice, choice_runs, curves = None, {}, {}, []

    def report() -> dict:
        return write_results(cfg, tests, untrained, runs, task_teacher, choice, curves, choice_runs)

    reported = [0]

    def progress() -> None:
        # After each record written, from every record on disk, not only those this pass has reached: a
        # resumed experiment walking its recorded runs must not rewrite RESULTS.md with fewer than it had.
        if not recorded_only and runner.written > reported[0]:
            reported[0] = runner.written
            run_experiment(cfg, recorded_only=True, verbose=verbose, tests=tests)

    def run_arms(teacher: Teacher, swept_under: str, arms: list[str]) -> None:
        for seed in cfg.seeds:
            for arm in arms:
                if arm not in teacher.sweeps and (sweep := runner.sweep(arm, swept_under)) is not None:
                    teacher.sweeps[arm] = {**sweep, "params": runner.settled(arm, teacher.name, sweep["params"])}
                if arm not in teacher.sweeps:  # with recorded_only: not swept yet
                    continue
                record = runner.trained(arm, seed, teacher.name, teacher.sweeps[arm]["params"])
                if record is not None:
                    teacher.records.append(record)
                    progress()

    progress()
    later = [arm for arm in trained if arm in cfg.chosen_teacher_arms] if len(cfg.teachers) > 1 else []
    run_arms(runs[baseline], baseline, [arm for arm in trained if arm not in later])
    if len(cfg.teachers) > 1:
        if TASK_TRAINED in cfg.teachers:
            task_teacher = runner.task_teacher()
            progress()
        if task_teacher is not None or TASK_TRAINED not in cfg.teachers:
            candidates = [task_teacher["model"] if t == TASK_TRAINED else t for t in cfg.teachers]
            for teacher in candidates:
                if (record := runner.trained("mse", cfg.seeds[0], teacher, params={})) is not None:
                    choice_runs[teacher] = record
                    choice = choose_teacher(cfg, candidates, choice_runs)  # made with the last one in
                    progress()
            chosen = choice.get("chosen")
            if chosen not in (None, baseline):
                runs[chosen] = Teacher(chosen)
                run_arms(runs[chosen], chosen if cfg.retune_for_teacher else baseline, trained)
            elif chosen == baseline:
                run_arms(runs[baseline], baseline, later)
    if cfg.tuning_check:
        checked = runs[choice["chosen"]] if choice.get("chosen") in runs else runs[baseline]
        for arm in trained:
            own = [r for r in checked.records if r["arm"] == arm]
            if len(own) < len(cfg.seeds) or (check := runner.sweep(arm, checked.name, check=True)) is None:
                continue
            checked.checks[arm] = {"params": check["params"], "trials": len(check["trials"]),
                                   **tuning_verdict(cfg, own, check), "records": []}
            progress()
            for seed in cfg.seeds if checked.checks[arm]["rerun"] else []:
                if (record := runner.trained(arm, seed, checked.name, check["params"])) is not None:
                    checked.checks[arm]["records"].append(record)
                    progress()
    if cfg.curve:
        # With the teacher the arms' knobs were swept under: the baseline's, unless retuned for the chosen
        # one (OT + contrastive's knobs, reused with the task-trained teacher, collapse its retrieval).
        teacher = runs[choice["chosen"]] if cfg.retune_for_teacher and choice.get("chosen") in runs else runs[baseline]
        for arm in check_arms(cfg.curve.arms):
            if arm in teacher.sweeps and (curve := runner.curve(arm, teacher.name, teacher.sweeps[arm]["params"])):
                curves.append(curve)
                progress()
    return report()


@dataclass
class Teacher:
    """One teacher's part of the experiment: its sweeps (or the baseline's, reused) and its runs."""

    name: str
    sweeps: dict[str, dict] = field(default_factory=dict)  # by arm, filled as each arm's first run starts
    records: list[dict] = field(default_factory=list)
    checks: dict[str, dict] = field(default_factory=dict)  # by arm: the tuning check and its reruns
