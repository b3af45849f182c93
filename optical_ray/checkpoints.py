"""Training checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint is a folder:

* the student as a model folder (``model.safetensors``, tokenizer, ``optical_ray.json``): loadable by
  :meth:`optical_ray.encoder.Encoder.load` like any saved student;
* ``train_state.pt``: optimizer, learning-rate schedule, step and pairs consumed (tensors and plain
  values only: read back with ``torch.load(weights_only=True)``);
* ``run.json``: the config fields that decide what is trained (:func:`optical_ray.config.training_fields`);
* ``dev_report.json`` when the step ended with a dev evaluation.

No random-number state is stored because none is needed: the data order is a function of (seed, step)
(:mod:`optical_ray.batching`) and dropout is reseeded from (seed, step, rank) before every step
(:func:`step_seed`), so the step *is* the random state -- on every worker, whatever the world size.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from . import data, storage
from .config import ConfigError, DistillConfig, portable_paths, training_fields
from .model_store import model_revision

TRAIN_STATE = "train_state.pt"
RUN_CONFIG = "run.json"
DEV_REPORT = "dev_report.json"
# The claim's fingerprint of prepared bitext (data.bitext_fingerprint): the same URI prepared again is
# other data, and a resumed run must not change data under its checkpoints.
BITEXT_CONTENT = "bitext_content"
# The commits Hugging Face ids resolved to when the run started: an id without @rev may move on the hub,
# and a resumed run must not change its teacher or student under its checkpoints.
MODEL_REVISIONS = "model_revisions"


def step_seed(seed: int, step: int, rank: int) -> int:
    """The torch seed of one step on one worker: independent streams, reproducible from the step alone."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


def save(folder: str | os.PathLike, student, distiller, cfg: DistillConfig, dev_report: dict | None = None) -> str:
    folder = Path(folder)
    student.save(folder)
    state = {**distiller.state_dict(), "pairs_consumed": distiller.step_count * cfg.batch_size}
    torch.save(state, folder / TRAIN_STATE)
    (folder / RUN_CONFIG).write_text(json.dumps(training_fields(cfg), sort_keys=True))
    if dev_report is not None:
        (folder / DEV_REPORT).write_text(json.dumps(dev_report))
    return str(folder)


def restore(folder: str | os.PathLike, student, distiller, cfg: DistillConfig) -> dict:
    """Load a checkpoint into ``student`` and ``distiller``; returns its dev report ({} if none).
    A checkpoint of a run with a different config is refused, naming the keys that differ."""
    folder = Path(folder)
    check_same_run(json.loads((folder / RUN_CONFIG).read_text()), cfg, str(folder))
    student.load_weights(folder)
    state = torch.load(folder / TRAIN_STATE, weights_only=True)
    distiller.load_state_dict(state)
    if state["pairs_consumed"] != distiller.step_count * cfg.batch_size:
        raise ConfigError(f"{folder}: checkpoint at step {distiller.step_count} consumed {state['pairs_consumed']} pairs, "
                          f"not {distiller.step_count} x batch_size {cfg.batch_size}")
    report = folder / DEV_REPORT
    return json.loads(report.read_text()) if report.exists() else {}


def claim(run_uri: str, cfg: DistillConfig) -> None:
    """Mark ``run_uri`` (a run's folder, local or s3://) as holding a run of ``cfg``, or -- when it already
    holds one -- check that it is the same run, so that resuming never mixes two configs."""
    marker = storage.join(run_uri, RUN_CONFIG)
    content = data.bitext_fingerprint(cfg.data.bitext) if getattr(cfg.data, "bitext", None) else None
    revisions = model_revisions(cfg)
    if storage.exists(marker):
        saved = json.loads(storage.read_bytes(marker))
        before = saved.pop(BITEXT_CONTENT, None)  # runs claimed before fingerprints have none
        pinned = saved.pop(MODEL_REVISIONS, {})
        check_same_run(saved, cfg, run_uri)
        for role, revision in revisions.items():
            if pinned.get(role, revision) != revision:
                name = getattr(cfg, role)
                raise ConfigError(f"{run_uri} started with {role} {name} at revision {pinned[role]}; it resolves to "
                                  f"{revision} now. Resume with {role}={name.partition('@')[0]}@{pinned[role]}, or "
                                  "start a new run (another output_dir / ray.name)")
        if before and content and before != content:
            raise ConfigError(f"{run_uri} holds a run on other data: the bitext at {cfg.data.bitext} was prepared again "
                              f"since it started (content {before[:12]} -> {content[:12]}); resuming would train on "
                              "other pairs than the checkpoints did. Start a new run (another output_dir / ray.name)")
    else:
        fields = training_fields(cfg) | ({BITEXT_CONTENT: content} if content else {}) | \
            ({MODEL_REVISIONS: revisions} if revisions else {})
        storage.write_bytes(json.dumps(fields, sort_keys=True).encode(), marker)


def model_revisions(cfg: DistillConfig) -> dict[str, str]:
    """The commit each Hugging Face id among the run's models resolved to (none for other references)."""
    return {role: rev for role in ("student", "teacher") if (rev := model_revision(getattr(cfg, role, "")))}


def check_same_run(saved: dict, cfg: DistillConfig, where: str) -> None:
    current = json.loads(json.dumps(training_fields(cfg), sort_keys=True))
    changed = differing_keys(portable_paths(saved), current)  # a run.json from before paths were portable
    if changed:
        details = "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in changed[:8])
        raise ConfigError(f"{where} holds a run with another config ({details}); resume it with its own config, "
                          "or start a new run (another output_dir / ray.name)")


def differing_keys(old: dict, new: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    """(dotted key, old value, new value) for every leaf that differs."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differing_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append((prefix + key, a, b))
    return out


@contextlib.contextmanager
def opened(checkpoint) -> Iterator[str | None]:
    """A Ray Train or Tune checkpoint (or None) as a local folder, for the duration."""
    if checkpoint is None:
        yield None
    else:
        with checkpoint.as_directory() as folder:
            yield folder
