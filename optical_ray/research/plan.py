"""The experiment's plan: its arms (which loss terms each trains, which knobs its sweep tunes), and the
distill and sweep config of each run, with the keys its records are found by.

The arms are one table, read by the runner (what to train) and by the report (what to call each arm).
"""

from __future__ import annotations

import copy
import hashlib
import json
import zlib
from dataclasses import dataclass
from pathlib import Path

from ..config import DistillConfig, ExperimentConfig, SweepConfig, derive, to_dict, training_fields
from ..losses import LossWeights
from ..tune import KNOBS


@dataclass(frozen=True)
class Arm:
    label: str
    weights: LossWeights | None  # None: the undistilled student
    knobs: tuple[str, ...] = ()  # what its sweep tunes (optical_ray.tune.KNOBS)
    # How its training pairs are made from the caption tables (data.bitext_pairs); "image_pivot" arms also
    # read the experiment's ``pivot_train`` tables.
    pairing: str = "translation"


# The arms, in report order. A new arm is one line here.
ARMS = {
    "none": Arm("(0) none", None),
    "mse": Arm("(1) MSE", LossWeights(ot=0.0, contrastive=0.0, mse=1.0), ("lr",)),
    "ot": Arm("(2) OT", LossWeights(ot=1.0, contrastive=0.0, mse=0.0), ("lr", "sinkhorn_reg")),
    "ot+contrastive": Arm("(3) OT + contrastive", LossWeights(ot=1.0, contrastive=1.0, mse=0.0),
                          ("lr", "sinkhorn_reg", "temperature", "ot_weight")),
    "contrastive": Arm("(4) contrastive", LossWeights(ot=0.0, contrastive=1.0, mse=0.0), ("lr", "temperature")),
    "mse+contrastive": Arm("(5) MSE + contrastive", LossWeights(ot=0.0, contrastive=1.0, mse=1.0),
                           ("lr", "temperature")),
    # Each caption with a *different* English description of its image, independent descriptions
    # included: aimed at retrieval that is more than matching a translation (issue #33 item 5).
    "pivot-contrastive": Arm("(6) image-pivot contrastive", LossWeights(ot=0.0, contrastive=1.0, mse=0.0),
                             ("lr", "temperature"), pairing="image_pivot"),
}


# Under results_dir: the trial log of each sweep cut short (optical_ray.tune), kept until its record is.
TRIAL_LOGS = "trial-logs"


def check_arms(names: list[str]) -> list[str]:
    unknown = [n for n in names if n not in ARMS]
    if unknown:
        raise ValueError(f"unknown arm(s) {', '.join(unknown)} (known: {', '.join(ARMS)})")
    return names


def arm_config(cfg: ExperimentConfig, arm: str, teacher: str, seed: int, params: dict | None = None,
               run: str | None = None) -> DistillConfig:
    """The distill config of one run: the experiment's ``distill`` section with the arm's loss weights,
    its chosen knob values, the seed, and every held-out language removed from training and dev."""
    weights = ARMS[arm].weights
    if weights is None:
        raise ValueError(f"arm {arm!r} is not trained")
    held = set(cfg.held_out_languages)
    d = cfg.distill.data
    name = run or f"{arm.replace('+', '-')}-seed{seed}"
    overrides = {
        "teacher": teacher, "seed": seed,
        "loss.ot_weight": weights.ot, "loss.contrastive_weight": weights.contrastive, "loss.mse_weight": weights.mse,
        "data.languages": [lang for lang in d.languages if lang not in held],
        "data.dev_languages": [lang for lang in d.dev_languages if lang not in held],
        "data.high_resource": [lang for lang in d.high_resource if lang not in held],
        "data.low_resource": [lang for lang in d.low_resource if lang not in held],
        **placement(cfg, name),
        **{KNOBS[k]: v for k, v in (params or {}).items()},
    }
    if ARMS[arm].pairing != "translation":  # only then: the other arms' configs, and keys, stay as they were
        overrides.update({"data.pairing": ARMS[arm].pairing, "data.train": [*d.train, *cfg.pivot_train]})
    return derive(cfg.distill, overrides)


def placement(cfg: ExperimentConfig, name: str, folder: str = "arms") -> dict:
    """Where a run named ``name`` writes: its model under out_dir/folder (the task teacher's right under
    out_dir: folder ""), its Ray storage under out_dir/ray."""
    return {"output_dir": str(Path(cfg.out_dir) / folder / name),
            "ray.storage_path": str((Path(cfg.out_dir) / "ray").resolve()), "ray.name": name}


def sweep_config(cfg: ExperimentConfig, arm: str, teacher: str) -> SweepConfig:
    """The arm's sweep: the experiment's search ranges for the arm's knobs only, on the first seed."""
    sweep = copy.deepcopy(cfg.sweep)
    sweep.distill = arm_config(cfg, arm, teacher, cfg.seeds[0], run=f"sweep-{arm.replace('+', '-')}")
    for knob in vars(sweep.search):
        if knob not in ARMS[arm].knobs:
            setattr(sweep.search, knob, [])
    sweep.storage_path = str((Path(cfg.out_dir) / "tune").resolve())
    return sweep


def check_sweep_config(cfg: ExperimentConfig, arm: str, teacher: str) -> SweepConfig:
    """The arm's tuning-check sweep (``cfg.tuning_check``): its knobs as in :func:`sweep_config`, the
    check's lr range and trials, and a searcher seed of its own, drawn from the arm's name."""
    check = cfg.tuning_check
    sweep = sweep_config(cfg, arm, teacher)
    sweep.distill = arm_config(cfg, arm, teacher, cfg.seeds[0], run=f"check-{arm.replace('+', '-')}")
    sweep.num_samples, sweep.search.lr, sweep.seed = check.num_samples, list(check.lr), zlib.crc32(arm.encode())
    return sweep


def config_key(value: dict) -> str:
    """A short, stable hash of a config: records are reused only for exactly the same run."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:12]


def sweep_key(sweep: SweepConfig) -> str:
    """What a sweep record is keyed by: everything but where its trials run and write."""
    fields = to_dict(sweep)
    for where in ("storage_path", "custom_resources"):
        fields.pop(where)
    fields["distill"] = training_fields(sweep.distill)
    return config_key(fields)
