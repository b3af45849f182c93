"""Sweeps of the Sinkhorn regularization ε, the InfoNCE temperature τ, the learning rate and the loss
weights on Ray Tune, with ASHA stopping weak trials at each dev evaluation.

Each trial runs :func:`optical_ray.distill.fit` in one process and reports its dev metrics and a
checkpoint at each dev evaluation (a trial restarted after a failure resumes from it), with
``objective`` (higher is better) set from ``SweepConfig.objective``:

* ``low_r1`` (default): mean dev R@1 over the low-resource languages -- the quantity this project
  exists to raise; a setting that helps them without hurting the rest shows up here first.
* ``mean_r1``: mean dev R@1 over all evaluated languages.
* ``low_ndcg10``, ``mean_ndcg10``: the same with nDCG@10, for a BEIR-layout dev set (``data.dev_beir``).
* ``neg_gap``: minus the high-vs-low gap. A gap can also shrink by making the high-resource
  languages worse, so it is a poor objective alone.

Results land in the sweep's storage: ``trials.csv`` (parameters, metrics and status of every trial),
``best.yaml`` (a config ``optical-ray distill`` accepts unchanged) and ``sweep.png``.

A sweep resumes from its storage (``resume``). Where that storage may be lost with its machine (local
disk on a machine lent for a few hours), a *trial log* keeps what each finished trial reported, a few
KB to keep anywhere: the sweep started again on a bare machine draws the same trials (the searcher is
seeded) and replays each logged one -- its dev reports handed to the scheduler again, nothing trained --
so ASHA decides as before and only the unlogged trials train.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import torch
import yaml
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import BasicVariantGenerator
from tqdm.auto import tqdm

from . import checkpoints, data, storage
from .config import ConfigError, DistillConfig, SearchSpace, SweepConfig, load_config, to_dict, with_absolute_paths
from .distill import DEV_MEASURES, dev_measure, fit
from .ot import MIN_REG

log = logging.getLogger(__name__)

OBJECTIVES = {
    **{f"{group}_{key}": (lambda m, name=f"dev_{key}_{group}": m[name])
       for key in DEV_MEASURES.values() for group in ("low", "mean")},
    "neg_gap": lambda m: -m["dev_gap"],
}
# Each knob a sweep may draw, and the distill config key it sets.
KNOBS = {"sinkhorn_reg": "loss.sinkhorn_reg", "temperature": "loss.temperature", "lr": "optim.lr",
         "ot_weight": "loss.ot_weight", "contrastive_weight": "loss.contrastive_weight",
         "mse_weight": "loss.mse_weight"}


def search_space(cfg: SweepConfig) -> dict:
    """Log-uniform draws for every knob with a [low, high] range (checked by the config); [v, v] fixes
    it, [] leaves it out."""
    space = {}
    for name in KNOBS:
        bounds = getattr(cfg.search, name)
        if not bounds:
            continue
        if name == "sinkhorn_reg" and bounds[0] < MIN_REG:
            raise ConfigError(f"search.sinkhorn_reg starts at {bounds[0]}: below {MIN_REG} Sinkhorn does not converge "
                              f"in loss.sinkhorn_iters iterations, so the loss is not the OT cost")
        space[name] = tune.loguniform(*bounds) if bounds[0] < bounds[1] else bounds[0]
    if not space:
        raise ConfigError("search: no knob to sweep (every range is empty)")
    return space


EDGE = 0.1  # the outer tenth of a range (log scale): a best value there may lie beyond the range


def range_edges(params: dict, search: SearchSpace) -> dict[str, str]:
    """The knobs of ``params`` whose value lies in the outer tenth (log scale) of their searched range,
    each "low" or "high": a best trial there says the range may have cut the search short."""
    edges = {}
    for name, value in params.items():
        bounds = getattr(search, name, None)
        if bounds and bounds[0] < bounds[1]:
            where = math.log(value / bounds[0]) / math.log(bounds[1] / bounds[0])
            if where < EDGE:
                edges[name] = "low"
            elif where > 1 - EDGE:
                edges[name] = "high"
    return edges


def trial_config(base: dict, params: dict) -> DistillConfig:
    """The distill config of one trial: the sweep's base with the sampled knob values."""
    return load_config(DistillConfig, base, {KNOBS[k]: v for k, v in params.items() if k in KNOBS})


class TrialReport:
    """:class:`optical_ray.distill.Reporter` for a Tune trial: dev evaluations only (what the scheduler
    compares), each with its checkpoint, so a trial restarted after a failure resumes from it."""

    def __init__(self, objective: str):
        self.objective = OBJECTIVES[objective]

    def resume_from(self) -> contextlib.AbstractContextManager[str | None]:
        return checkpoints.opened(tune.get_checkpoint())

    def report(self, metrics: dict, checkpoint: str | None) -> None:
        if "dev_gap" in metrics or any(k.startswith("dev_") and k.endswith("_mean") for k in metrics):
            tune.report({**metrics, "objective": self.objective(metrics)},
                        checkpoint=tune.Checkpoint.from_directory(checkpoint) if checkpoint else None)


def run_trial(config: dict) -> None:
    """Tune's function trainable: one distillation in this process, or the replay of a logged one."""
    if (reports := config.get("replay", {}).get(trial_key(config))) is not None:
        for metrics in reports:
            tune.report(metrics)
        return
    torch.set_num_threads(max(1, int(config["cpus"])))
    cfg = trial_config(config["distill"], config)
    cfg.checkpoint_every = 0  # a trial reports (and checkpoints) at dev evaluations only
    fit(cfg, TrialReport(config["objective"]))


def check(cfg: SweepConfig) -> None:
    if cfg.distill.eval_every <= 0 and cfg.scheduler == "asha":
        raise ConfigError("distill.eval_every must be > 0 for ASHA: it compares trials at dev evaluations")
    d = cfg.distill.data
    if not cfg.objective.startswith("mean_") and not (d.low_resource and set(d.low_resource) & set(d.dev_languages)):
        raise ConfigError(f"objective {cfg.objective} needs a low-resource language among distill.data.dev_languages")
    measure = dev_measure(d)
    if cfg.objective != "neg_gap" and not cfg.objective.endswith("_" + DEV_MEASURES[measure]):
        group = cfg.objective.split("_")[0]
        raise ConfigError(f"objective {cfg.objective} is not what the dev set measures: "
                          f"{'distill.data.dev_beir' if d.dev_beir else 'the dev set'} is scored by {measure}, "
                          f"so use objective {group}_{DEV_MEASURES[measure]}")


SWEEP_RECORD = "optical-ray-sweep.json"


def sweep_terms(cfg: SweepConfig) -> dict:
    """What a resumed sweep must share with the one it continues: the searcher's space, the budget
    and the objective (flattened to dotted keys). Resources and retries may change."""
    terms = {f"search.{knob}": span for knob, span in to_dict(cfg.search).items()}
    terms.update(objective=cfg.objective, scheduler=cfg.scheduler, grace_period=cfg.grace_period,
                 reduction_factor=cfg.reduction_factor, num_samples=cfg.num_samples, seed=cfg.seed)
    terms.update({"distill.steps": cfg.distill.steps, "distill.eval_every": cfg.distill.eval_every})
    if cfg.distill.data.bitext:  # prepared again under the same URI, it is other data
        terms[BITEXT_CONTENT] = data.bitext_fingerprint(cfg.distill.data.bitext)
    return terms


# A term records of older sweeps lack: compared only where the record has it.
BITEXT_CONTENT = "distill.data.bitext_content"


def refuse_changed_sweep(cfg: SweepConfig) -> None:
    """Before a resume: a sweep started with other terms cannot be continued (Tune would go on with
    the old space and budget, silently); refuse, naming each changed key."""
    record = storage.join(cfg.storage_path, cfg.name, SWEEP_RECORD)
    if storage.exists(record):  # else a sweep from before these records: nothing to compare
        refuse_changed_terms(json.loads(storage.read_bytes(record)), cfg,
                             f"tune --resume: the sweep at {storage.join(cfg.storage_path, cfg.name)}")


def refuse_changed_terms(started: dict, cfg: SweepConfig, what: str) -> None:
    now = json.loads(json.dumps(sweep_terms(cfg)))  # the same types as read back
    changed = sorted(k for k in started.keys() | now.keys() if started.get(k) != now.get(k)
                     and (k in started or k != BITEXT_CONTENT))
    if changed:
        raise ConfigError(f"{what} was started with other terms: "
                          + ", ".join(f"{k} {started.get(k)!r} -> {now.get(k)!r}" for k in changed)
                          + "; put them back, or start a new sweep under another name")


def trial_key(params: dict) -> str:
    """A trial's drawn knob values as text: the same draw gives the same key (JSON keeps floats exact)."""
    return json.dumps({k: float(params[k]) for k in KNOBS if k in params}, sort_keys=True)


def trial_row(name: str, params: dict, metrics: dict, error: Exception | str | None) -> dict:
    """A trial's row of ``trials.csv``: its knobs, status, steps trained and last dev metrics."""
    return {
        "trial": name,
        "status": "ERROR" if error else "OK",
        "error": str(error).splitlines()[0][:300] if error else "",
        **{k: float(params[k]) for k in KNOBS if k in params},
        "steps": int(metrics.get("step", 0)),
        # restarted from a checkpoint after a failure (a lost node, say): fewer reports since the restore
        "restored": int(metrics.get("iterations_since_restore", 0)) < int(metrics.get("training_iteration", 0)),
        **{k: float(v) for k, v in metrics.items() if k == "objective" or k.startswith("dev_")},
    }


def read_trial_log(cfg: SweepConfig | None, uri: str) -> dict[str, dict]:
    """The finished trials of the trial log at ``uri`` by :func:`trial_key` ({} when there is none);
    with ``cfg``, refused when the log is of a sweep with other terms (its trials are not its draws)."""
    if not storage.exists(uri):
        return {}
    contents = json.loads(storage.read_bytes(uri))
    if cfg is not None:
        refuse_changed_terms(contents["terms"], cfg, f"the trial log {uri}")
    return {key: trial for key, trial in contents["trials"].items() if "row" in trial}


class TrialLog(tune.Callback):
    """Writes the trial log: each trial's dev reports as they come, and its row when it finishes.
    Read and written whole at each event, so a driver started again goes on with what is there."""

    def __init__(self, cfg: SweepConfig, uri: str):
        self.uri, self.terms = uri, json.loads(json.dumps(sweep_terms(cfg)))

    def update(self, trial, change) -> None:
        contents = json.loads(storage.read_bytes(self.uri)) if storage.exists(self.uri) else {"terms": self.terms, "trials": {}}
        key = trial_key(trial.config)
        entry = contents["trials"].setdefault(key, {"params": json.loads(key), "reports": []})
        if "row" not in entry:  # a logged trial replayed: its record stays as it was
            change(entry)
            storage.write_bytes(json.dumps(contents, indent=1).encode(), self.uri)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        report = {k: v for k, v in result.items() if k in ("step", "objective") or k.startswith("dev_")}

        def add(entry: dict) -> None:  # one report per step: a trial restarted from a checkpoint repeats none
            entry["reports"] = [r for r in entry["reports"] if r["step"] != report["step"]] + [report]
        if "objective" in report:
            self.update(trial, add)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.update(trial, lambda entry: entry.update(
            row=trial_row(Path(trial.path).name, trial.config, trial.last_result, None)))


def make_tuner(cfg: SweepConfig, resume: bool = False, verbose: bool = True, trial_log: str | None = None,
               logged: dict[str, dict] | None = None) -> tune.Tuner:
    """The sweep's Tuner, restored from its storage with ``resume`` where it can be; ``trial_log``: the
    trial log to log finished trials to, ``logged``: its finished trials (:func:`read_trial_log`), whose
    reports are replayed to the scheduler instead of training them again (module docstring)."""
    check(cfg)
    filesystem, path = storage.resolve(cfg.storage_path)
    resources = {"CPU": cfg.cpus_per_trial, **({"GPU": cfg.gpus_per_trial} if cfg.gpus_per_trial else {}),
                 **cfg.custom_resources}
    trainable = tune.with_resources(run_trial, resources)
    experiment = storage.join(path, cfg.name)  # inside `filesystem`: no s3:// scheme
    if resume and tune.Tuner.can_restore(experiment, storage_filesystem=filesystem):
        refuse_changed_sweep(cfg)
        log.info("resuming the sweep at %s: finished trials are kept", storage.join(cfg.storage_path, cfg.name))
        return tune.Tuner.restore(experiment, trainable, storage_filesystem=filesystem, resume_errored=True)
    storage.write_bytes(json.dumps(sweep_terms(cfg), indent=1).encode(),
                        storage.join(cfg.storage_path, cfg.name, SWEEP_RECORD))
    if cfg.scheduler == "asha":
        scheduler = ASHAScheduler(time_attr="step", max_t=cfg.distill.steps,
                                  grace_period=cfg.grace_period * cfg.distill.eval_every,
                                  reduction_factor=cfg.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    param_space = {"distill": to_dict(with_absolute_paths(cfg.distill)), "objective": cfg.objective, "cpus": cfg.cpus_per_trial,
                   "replay": {key: trial["reports"] for key, trial in (logged or {}).items()}, **search_space(cfg)}
    callbacks = [] if verbose else [TrialProgress(cfg.num_samples)]
    if trial_log:
        callbacks.append(TrialLog(cfg, trial_log))
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(metric="objective", mode="max", scheduler=scheduler, num_samples=cfg.num_samples,
                                    search_alg=BasicVariantGenerator(random_state=cfg.seed,
                                                                     max_concurrent=cfg.max_concurrent_trials)),
        run_config=tune.RunConfig(name=cfg.name, storage_path=path, storage_filesystem=filesystem,
                                  failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                                  # quiet: one bar of finished trials instead of Tune's status tables
                                  verbose=1 if verbose else 0, callbacks=callbacks),
    )


class TrialProgress(tune.Callback):
    """A progress bar of finished trials, with the best dev objective so far."""

    def __init__(self, num_samples: int):
        self.total, self.bar, self.best = num_samples, None, None

    def setup(self, **info) -> None:
        self.bar = tqdm(total=self.total, desc="trials", unit="trial")

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if "objective" in result and (self.best is None or result["objective"] > self.best):
            self.best = result["objective"]
            self.bar.set_postfix(best_objective=f"{self.best:.3f}")

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.bar.update(1)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.bar.update(1)

    def on_experiment_end(self, trials, **info) -> None:
        self.bar.close()


@dataclass
class SweepResult:
    trials: pa.Table
    best: DistillConfig | None
    trial_steps: int  # training steps spent over all trials
    best_params: dict = field(default_factory=dict)  # the winning trial's knob values
    replayed: int = 0  # trials taken from the trial log, trained by an earlier start of the sweep
    at_edge: dict[str, str] = field(default_factory=dict)  # best knobs near an end of their range (range_edges)


def run_sweep(cfg: SweepConfig, resume: bool = False, verbose: bool = True, trial_log: str | None = None) -> SweepResult:
    """Run (or resume) the sweep on the connected Ray cluster and write its results. ``trial_log``: a
    local path or s3:// URI of the sweep's trial log (module docstring)."""
    logged = read_trial_log(cfg, trial_log) if trial_log else {}  # before this start logs its own
    results = make_tuner(cfg, resume, verbose, trial_log, logged).fit()
    rows = []
    for result in results:
        params = result.config or {}
        # A replayed trial's row is the logged one: the scheduler may now stop it before the step it reached.
        logged_row = logged.get(trial_key(params), {}).get("row") if not result.error else None
        rows.append(logged_row or trial_row(Path(result.path).name, params, result.metrics or {}, result.error))
    replayed = sum(trial_key(result.config or {}) in logged for result in results)
    trials = trials_table(rows)
    completed = [r for r in rows if r["status"] == "OK" and r["steps"] == cfg.distill.steps and "objective" in r]
    best, best_params = None, {}
    if completed:
        top = max(completed, key=lambda r: r["objective"])
        best_params = {k: top[k] for k in KNOBS if k in top}
        best = trial_config(to_dict(cfg.distill), best_params)
    write_results(cfg, trials, best)
    return SweepResult(trials=trials, best=best, trial_steps=sum(r["steps"] for r in rows), best_params=best_params,
                       replayed=replayed, at_edge=range_edges(best_params, cfg.search))


def trials_table(rows: list[dict]) -> pa.Table:
    """The rows of :func:`trial_row` as a table with every row's columns: an errored trial has no dev
    metrics, and ``Table.from_pylist`` would keep only the first row's."""
    columns = dict.fromkeys(k for row in rows for k in row)
    return pa.table({k: [row.get(k) for row in rows] for k in columns})


def write_results(cfg: SweepConfig, trials: pa.Table, best: DistillConfig | None) -> None:
    out = storage.join(cfg.storage_path, cfg.name)
    buffer = io.BytesIO()
    pacsv.write_csv(trials, buffer)
    storage.write_bytes(buffer.getvalue(), storage.join(out, "trials.csv"))
    if best is not None:
        storage.write_bytes(yaml.safe_dump(to_dict(best), sort_keys=False).encode(), storage.join(out, "best.yaml"))
    with tempfile.TemporaryDirectory() as folder:
        png = Path(folder) / "sweep.png"
        plot_sweep(trials, cfg.objective, png)
        storage.write_bytes(png.read_bytes(), storage.join(out, "sweep.png"))


def plot_sweep(trials: pa.Table, objective: str, path: Path) -> None:
    """The dev objective over the first two swept knobs (one knob: the objective against it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in trials.to_pylist() if r.get("objective") is not None and not math.isnan(r["objective"])]
    knobs = [k for k in KNOBS if k in trials.column_names]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    if rows and knobs:
        x = np.array([r[knobs[0]] for r in rows])
        obj = np.array([r["objective"] for r in rows])
        steps = np.array([r["steps"] for r in rows])
        y = np.array([r[knobs[1]] for r in rows]) if len(knobs) > 1 else obj
        points = ax.scatter(x, y, c=obj, s=30 + 120 * steps / max(1, steps.max()), cmap="viridis", edgecolors="k")
        fig.colorbar(points, ax=ax, label=f"objective ({objective})")
        best = int(np.argmax(obj))
        ax.annotate(f"best {obj[best]:.3f}", (x[best], y[best]), textcoords="offset points", xytext=(6, 6), fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel(knobs[0])
        if len(knobs) > 1:
            ax.set_yscale("log")
            ax.set_ylabel(knobs[1])
        else:
            ax.set_ylabel(f"objective ({objective})")
    ax.set_title("Sweep: dev objective (marker size: steps trained)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
