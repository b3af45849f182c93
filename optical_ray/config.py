"""Configuration: plain dataclasses loaded from YAML with strict validation.

An unknown key or a value of the wrong type is an error that names the file and the key path
(``loss.temperature``), never a silent default. Defaults are the embedded demo's: the shipped
models and the sample data bundled with the package.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

SAMPLE_DIR = Path(__file__).parent / "sample_data"


class ConfigError(ValueError):
    """A configuration file or value is invalid; the message names the file and the key."""


def _sample(*names: str) -> list[str]:
    return [str(SAMPLE_DIR / name) for name in names]


@dataclass
class DataConfig:
    # Caption tables (Parquet files or folders, local or s3://) to build English<->L bitext from.
    train: list[str] = field(default_factory=lambda: _sample("train_captions.parquet"))
    # Or bitext shards written by `optical-ray data prepare` (a folder, local or s3://); when set,
    # `train`, `languages` and `exclude_images_from` were applied at preparation and are ignored.
    bitext: str | None = None
    # Languages paired with English for training.
    languages: list[str] = field(default_factory=lambda: ["de", "fr", "es", "ay", "gn", "qu"])
    # Images in these tables never enter training (keep every evaluation set here).
    exclude_images_from: list[str] = field(default_factory=lambda: _sample("val_captions.parquet", "test_2018_captions.parquet"))
    # Development set: caption tables and the query languages evaluated on it.
    dev: list[str] = field(default_factory=lambda: _sample("val_captions.parquet"))
    dev_languages: list[str] = field(default_factory=lambda: ["de", "fr", "es", "zh", "ay", "gn", "qu"])
    high_resource: list[str] = field(default_factory=lambda: ["de", "fr", "es", "zh"])
    low_resource: list[str] = field(default_factory=lambda: ["ay", "gn", "qu"])


@dataclass
class LossConfig:
    ot_weight: float = 1.0
    contrastive_weight: float = 1.0
    mse_weight: float = 0.0
    sinkhorn_reg: float = 0.05  # epsilon, the entropic regularization of the transport plan
    sinkhorn_iters: int = 300  # enough for a marginal error < 1e-3 at ε >= 0.01 (optical_ray.ot.MIN_REG)
    temperature: float = 0.05  # tau of the InfoNCE logits


@dataclass
class OptimConfig:
    lr: float = 2e-5
    weight_decay: float = 0.01
    warmup_steps: int = 20
    grad_clip: float = 1.0


@dataclass
class RayConfig:
    """How `optical-ray train` runs on Ray Train (ignored by the single-process `distill`)."""

    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0  # leave CPUs free for Ray Data's read tasks, or ingest stalls
    torch_threads: int = 0  # intra-op threads per CPU worker; 0: cpus_per_worker (at least 1)
    gpus_per_worker: float = 1.0
    # Custom resources each worker also needs, e.g. {trainer: 1} to keep training on the nodes started
    # with --resources '{"trainer": N}'.
    custom_resources: dict[str, float] = field(default_factory=dict)
    storage_path: str = "runs/ray"  # local folder or s3://bucket/prefix for checkpoints and results
    name: str = "distill"  # a run with the same name and storage resumes from its latest checkpoint
    # Worker-group restarts from the latest checkpoint before giving up; -1: no limit. A lost node or a
    # spot preemption costs one restart and at most checkpoint_every steps.
    max_failures: int = 3
    num_to_keep: int = 2  # the latest checkpoints kept


@dataclass
class DistillConfig:
    student: str = "student-init"  # shipped model name or model folder
    teacher: str = "student-init"  # "student-init" (frozen copy of the start) or "minilm-en"
    output_dir: str = "runs/distill"
    steps: int = 200
    batch_size: int = 32
    max_length: int = 64  # tokens per sentence in training (captions are short)
    freeze_word_embeddings: bool = True
    seed: int = 0
    eval_every: int = 0  # steps between dev evaluations; 0: only at the end
    # Steps between checkpoints (also taken at every dev evaluation); a restarted run resumes from the
    # latest, consuming the same pairs in the same order as an uninterrupted one. 0: evaluations only.
    checkpoint_every: int = 100
    eval_batch_size: int = 64
    log_every: int = 10
    bf16: bool = True  # bf16 autocast when training on CUDA; ignored on CPU
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ray: RayConfig = field(default_factory=RayConfig)


# Where a run writes and how often it saves: not part of what it trains.
NOT_TRAINING = ("output_dir", "ray", "checkpoint_every")


def training_fields(cfg: DistillConfig) -> dict:
    """What decides a trained student: two configs with equal fields train the same weights. Resuming
    is refused when they differ, and experiment records are keyed by them."""
    fields = to_dict(cfg)
    for key in NOT_TRAINING:
        fields.pop(key)
    return fields


def with_absolute_paths(cfg: DistillConfig) -> DistillConfig:
    """A copy whose local paths are absolute: Ray Train workers and Tune trials run in other working
    directories, where a path relative to the submitting shell means nothing. s3:// URIs and shipped
    model names are left as they are."""
    def fix(path: str) -> str:
        return path if path.startswith("s3://") else os.path.abspath(path)

    cfg = copy.deepcopy(cfg)
    d = cfg.data
    d.train, d.dev, d.exclude_images_from = [fix(p) for p in d.train], [fix(p) for p in d.dev], [fix(p) for p in d.exclude_images_from]
    d.bitext = fix(d.bitext) if d.bitext else None
    cfg.output_dir, cfg.ray.storage_path = fix(cfg.output_dir), fix(cfg.ray.storage_path)
    cfg.student, cfg.teacher = (fix(m) if os.path.exists(m) else m for m in (cfg.student, cfg.teacher))
    return cfg


def load_config(cls: type, source: str | Path | dict | None = None, overrides: dict | None = None):
    """Build ``cls`` from a YAML file (or a dict), then apply dotted-key ``overrides``.

    A file may start from another: ``base: other.yaml`` (relative to the file) loads that one first and
    merges this file's mappings over it, key by key; lists and values replace the base's."""
    name = "<config>"
    raw: dict = {}
    if isinstance(source, dict):
        raw = source
    elif source is not None:
        name = str(source)
        raw = _read_yaml(Path(source), seen=())
    if not isinstance(raw, dict):
        raise ConfigError(f"{name}: expected a mapping at the top level, got {type(raw).__name__}")
    raw = _deep_copy(raw)
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return _build(cls, _with_data_root(raw, name), name, "")


DATA_ROOT = "${data_root}"
SAMPLE_DATA = "${sample_data}"  # the small tables installed with the package, wherever it is installed


def _with_data_root(raw: dict, name: str) -> dict:
    """Every ``${data_root}`` in the config's strings replaced by its top-level ``data_root`` (the shared
    folder on one machine, an s3:// prefix on a cluster: ``--set data_root=s3://bucket/flickr30k-ml``).
    The key itself is consumed here, so configs that differ only in where the same data lives are equal."""
    root = raw.pop("data_root", None)

    def substitute(value, key: str):
        if isinstance(value, dict):
            return {k: substitute(v, f"{key}{k}.") for k, v in value.items()}
        if isinstance(value, list):
            return [substitute(v, key) for v in value]
        if isinstance(value, str) and DATA_ROOT in value:
            if root is None:
                raise ConfigError(f"{name}: {key.rstrip('.')} uses {DATA_ROOT} but no data_root is set "
                                  "(add data_root: to the file or --set data_root=...)")
            value = value.replace(DATA_ROOT, str(root).rstrip("/"))
        if isinstance(value, str):
            value = value.replace(SAMPLE_DATA, str(SAMPLE_DIR))
        return value

    return substitute(raw, "")


def _read_yaml(path: Path, seen: tuple) -> dict:
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(raw, dict) or "base" not in raw:
        return raw
    base = path.parent / str(raw.pop("base"))
    if base.resolve() in seen:
        raise ConfigError(f"{path}: base {base} includes itself")
    return _merge(_read_yaml(base, (*seen, path.resolve())), raw)


def _merge(base: dict, top: dict) -> dict:
    merged = dict(base)
    for key, value in top.items():
        merged[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return merged


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def save_config(config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def _build(cls: type, raw: dict, name: str, prefix: str):
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - fields)
    if unknown:
        where = f" in {prefix.rstrip('.')!r}" if prefix else ""
        raise ConfigError(f"{name}: unknown key {prefix}{unknown[0]}{where} (known: {', '.join(sorted(fields))})")
    values = {key: _check(hints[key], value, name, prefix + key) for key, value in raw.items()}
    return cls(**values)


def _check(kind, value, name: str, key: str):
    if dataclasses.is_dataclass(kind):
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: {key} must be a mapping, got {value!r}")
        return _build(kind, value, name, key + ".")
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        kind = next(k for k in options if k is not type(None))
        origin = typing.get_origin(kind)
    if origin is dict:
        _, item = typing.get_args(kind)
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: {key} must be a mapping, got {value!r}")
        return {str(k): _check(item, v, name, f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        (item,) = typing.get_args(kind)
        if isinstance(value, str) and item is str:  # "de,fr" is a list too
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{name}: {key} must be a list, got {value!r}")
        return [_check(item, v, name, f"{key}[{i}]") for i, v in enumerate(value)]
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind in (str, bool) and isinstance(value, kind):
        return value
    raise ConfigError(f"{name}: {key} must be {getattr(kind, '__name__', kind)}, got {value!r}")


def _deep_copy(raw: dict) -> dict:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in raw.items()}


@dataclass
class SearchSpace:
    """What a sweep draws: each knob is a log-uniform range [low, high]; an empty list leaves the distill
    config's value alone (and [v, v] fixes it)."""

    sinkhorn_reg: list[float] = field(default_factory=lambda: [0.01, 1.0])  # loss.sinkhorn_reg (ε)
    temperature: list[float] = field(default_factory=lambda: [0.01, 0.5])  # loss.temperature (τ)
    lr: list[float] = field(default_factory=list)  # optim.lr
    ot_weight: list[float] = field(default_factory=list)  # loss.ot_weight (relative to the others)
    contrastive_weight: list[float] = field(default_factory=list)
    mse_weight: list[float] = field(default_factory=list)


@dataclass
class SweepConfig:
    """`optical-ray tune`: trials of the single-process distillation loop, one process per trial."""

    distill: DistillConfig = field(default_factory=DistillConfig)  # every trial starts from this
    search: SearchSpace = field(default_factory=SearchSpace)
    objective: str = "low_r1"  # low_r1 | mean_r1 | neg_gap (all on the dev set, higher is better)
    scheduler: str = "asha"  # asha (stops weak trials at each dev evaluation) | fifo
    grace_period: int = 1  # dev evaluations every trial gets before ASHA may stop it
    reduction_factor: int = 2
    num_samples: int = 8
    max_concurrent_trials: int = 2
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0  # > 0 trains each trial on a GPU
    max_failures: int = 1  # retries of a failing trial; after that it is recorded as failed
    seed: int = 0
    storage_path: str = "runs/tune"  # local folder or s3://bucket/prefix
    name: str = "sweep"  # the same name and storage resume an interrupted sweep


@dataclass
class TestSet:
    """One evaluation: queries in each language against the English captions of the same images.

    ``protocol``: ``translation`` (the query translates one of the corpus captions), ``semantic`` (that
    caption is masked out, so the query must match the image's *other* captions) or ``independent``
    (the queries are descriptions written without seeing the English). ``groups`` name language sets;
    each gap in ``gaps`` is [higher group, lower group].
    """

    name: str = "test_2018"
    protocol: str = "translation"
    data: list[str] = field(default_factory=lambda: _sample("test_2018_captions.parquet"))
    exclude_images_from: list[str] = field(default_factory=list)  # e.g. the dev split
    query_langs: list[str] = field(default_factory=lambda: ["de", "fr", "es", "zh", "cs", "ar", "uk", "ay", "gn", "qu"])
    groups: dict[str, list[str]] = field(default_factory=lambda: {"high": ["de", "fr", "es", "zh"],
                                                                   "low": ["ay", "gn", "qu"]})
    gaps: dict[str, list[str]] = field(default_factory=lambda: {"low": ["high", "low"]})


@dataclass
class ExperimentConfig:
    """`optical-ray experiment`: which loss terms narrow the high/low-resource gap, on which protocol?

    Every arm (``optical_ray.experiment.ARMS``) starts from the same student and teacher, trains on the
    same data for the same steps with the same seeds, and gets the same sweep budget on the dev set
    over its own knobs. Finished runs are recorded under ``results_dir/runs`` and skipped on the next call.
    """

    distill: DistillConfig = field(default_factory=DistillConfig)  # data, steps shared by every arm
    arms: list[str] = field(default_factory=lambda: ["none", "mse", "ot", "ot+contrastive", "contrastive",
                                                     "mse+contrastive"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # data order and dropout per training seed
    held_out_languages: list[str] = field(default_factory=list)  # never trained on, never tuned on
    teachers: list[str] = field(default_factory=lambda: ["student-init"])  # > 1: chosen on dev with MSE runs
    teacher_steps: int = 0  # steps of the MSE runs that choose the teacher; 0: distill.steps
    sweep: SweepConfig = field(default_factory=SweepConfig)  # search ranges; each arm sweeps its own knobs
    test_sets: list[TestSet] = field(default_factory=lambda: [TestSet()])
    bootstrap: int = 1000  # image resamples for the 95% intervals
    out_dir: str = "runs/experiment"  # models and Ray storage (large, not committed)
    results_dir: str = "docs/experiment"  # run records, results.json, RESULTS.md and plots (committed)
    keep_models: bool = False  # a student is deleted once evaluated and recorded
