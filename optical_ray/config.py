"""Configuration: pydantic models loaded from YAML, validated on load.

An unknown key, a value of the wrong type or out of range is an error that names the file, the key
path (``loss.temperature``) and the value, never a silent default. Defaults are the embedded demo's:
the shipped models and the sample data bundled with the package.
"""

from __future__ import annotations

import copy
import logging
import os
import re
import typing
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    StrictBool,
    ValidationError,
    model_validator,
)

from . import languages

SAMPLE_DIR = Path(__file__).parent / "sample_data"


class ConfigError(ValueError):
    """A configuration file or value is invalid; the message names the file and the key."""


# The default language groups of every gap: one owner, imported by evaluation and the demo.
HIGH_RESOURCE = ("de", "fr", "es", "zh")
LOW_RESOURCE = ("ay", "gn", "qu")


def _sample(*names: str) -> list[str]:
    return [str(SAMPLE_DIR / name) for name in names]


def _comma_separated(value):
    """``"de,fr"`` is a list too (handy on the command line: ``--set data.languages=de,qu``)."""
    return [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value


_S3_URI = re.compile(r"s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?")


def _check_uri(value: str) -> str:
    if not value:
        raise ValueError("an empty path")
    if "://" in value and not value.startswith("s3://"):
        raise ValueError("only local paths and s3:// URIs are supported")
    if value.startswith("s3:") and not _S3_URI.fullmatch(value):
        raise ValueError("not a well-formed s3:// URI (s3://bucket/key, bucket 3-63 lowercase letters, digits, . or -)")
    return value


def _check_local(value: str) -> str:
    if not value:
        raise ValueError("an empty path")
    if "://" in value:
        raise ValueError("must be a folder on this machine: the experiment runs on one Ray node and reads "
                         "its records, models and checkpoints back from local disk")
    return value


def _check_tags(tags: list[str]) -> list[str]:
    bad = languages.invalid(tags)
    if bad:
        raise ValueError(languages.describe(bad))
    return tags


def _check_range(bounds: list[float]) -> list[float]:
    if bounds and (len(bounds) != 2 or not 0 < bounds[0] <= bounds[1]):
        raise ValueError("must be [] or [low, high] with 0 < low <= high")
    return bounds


Uri = Annotated[str, AfterValidator(_check_uri)]  # a local path or s3://bucket/key
LocalPath = Annotated[str, AfterValidator(_check_local)]
Uris = Annotated[list[Uri], BeforeValidator(_comma_separated)]
Names = Annotated[list[str], BeforeValidator(_comma_separated)]
# Language tags: any valid BCP-47 / ISO 639 tag (optical_ray.languages), e.g. sw, quy, zh-Hant.
Languages = Annotated[list[str], BeforeValidator(_comma_separated), AfterValidator(_check_tags)]
Range = Annotated[list[PositiveFloat], AfterValidator(_check_range)]


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(Config):
    # Caption tables (Parquet files or folders, local or s3://) to build English<->L bitext from.
    train: Uris = Field(default_factory=lambda: _sample("train_captions.parquet"))
    # Or bitext shards written by `optical-ray data prepare` (a folder, local or s3://); when set,
    # `train`, `languages` and `exclude_images_from` were applied at preparation and are ignored.
    bitext: Uri | None = None
    # How caption tables become pairs: `translation` pairs each caption with the English caption it
    # translates; `image_pivot` with another English description of the same image, independent
    # descriptions (e.g. Multi30k task 2 German) included (data.bitext_pairs).
    pairing: Literal["translation", "image_pivot"] = "translation"
    # Languages paired with English for training.
    languages: Languages = Field(default_factory=lambda: ["de", "fr", "es", "ay", "gn", "qu"])
    # Images in these tables never enter training (keep every evaluation set here).
    exclude_images_from: Uris = Field(default_factory=lambda: _sample("val_captions.parquet", "test_2018_captions.parquet"))
    # Development set: caption tables and the query languages evaluated on it.
    dev: Uris = Field(default_factory=lambda: _sample("val_captions.parquet"))
    dev_languages: Languages = Field(default_factory=lambda: [*HIGH_RESOURCE, *LOW_RESOURCE])
    high_resource: Languages = Field(default_factory=lambda: list(HIGH_RESOURCE))
    low_resource: Languages = Field(default_factory=lambda: list(LOW_RESOURCE))
    # Or line-aligned dev bitext (FLORES / Tatoeba style), one file per language: {en: FILE, sw: FILE};
    # when set, dev retrieval is each dev_languages sentence finding its English translation (and `dev`
    # is not read). The dev objective of tune and the experiment follows.
    dev_bitext: dict[str, Uri] = Field(default_factory=dict)
    # Or a BEIR-layout folder (corpus.jsonl, queries.<lang>.jsonl, qrels/<split>.tsv): dev retrieval is
    # each dev_languages query ranking the corpus, scored by nDCG@10 (objectives low_ndcg10, mean_ndcg10).
    dev_beir: Uri | None = None
    dev_beir_split: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._\-]*$")] = "dev"  # qrels/<split>.tsv
    # Blank captions are refused, naming the file and row; true drops them and logs how many per language.
    drop_blank: StrictBool = False
    # Prepared `bitext` is read in this many lanes of row groups (batching.lane_batches), each worker
    # reading only its own lanes: batch_size and any ray.num_workers used must divide into it evenly.
    # The order depends on it, not on the number of workers.
    lanes: PositiveInt = 8

    @model_validator(mode="after")
    def _dev_bitext_has_each_language(self) -> DataConfig:
        if self.dev_bitext and self.dev_beir:
            raise ValueError("dev_bitext and dev_beir are two dev sets: set one of them")
        if self.dev_bitext:
            _check_tags(list(self.dev_bitext))
            missing = [lang for lang in ["en", *self.dev_languages] if lang not in self.dev_bitext]
            if missing:
                raise ValueError(f"dev_bitext needs a file for en and for every dev_languages entry; missing: "
                                 f"{', '.join(missing)}")
        return self


class LossConfig(Config):
    ot_weight: NonNegativeFloat = 1.0
    contrastive_weight: NonNegativeFloat = 1.0
    mse_weight: NonNegativeFloat = 0.0
    sinkhorn_reg: PositiveFloat = 0.05  # epsilon, the entropic regularization of the transport plan
    sinkhorn_iters: PositiveInt = 300  # enough for a marginal error < 1e-3 at ε >= 0.01 (optical_ray.ot.MIN_REG)
    temperature: PositiveFloat = 0.05  # tau of the InfoNCE logits

    @model_validator(mode="after")
    def _something_to_learn(self) -> LossConfig:
        if not (self.ot_weight or self.contrastive_weight or self.mse_weight):
            raise ValueError("ot_weight, contrastive_weight and mse_weight are all 0: nothing to train")
        return self


class OptimConfig(Config):
    lr: PositiveFloat = 2e-5
    weight_decay: NonNegativeFloat = 0.01
    warmup_steps: NonNegativeInt = 20
    grad_clip: PositiveFloat = 1.0


class RayConfig(Config):
    """How `optical-ray train` runs on Ray Train (ignored by the single-process `distill`)."""

    num_workers: PositiveInt = 1
    use_gpu: StrictBool = False
    cpus_per_worker: PositiveFloat = 1.0
    torch_threads: NonNegativeInt = 0  # intra-op threads per CPU worker; 0: cpus_per_worker (at least 1)
    gpus_per_worker: NonNegativeFloat = 1.0
    # Custom resources each worker also needs, e.g. {trainer: 1} to keep training on the nodes started
    # with --resources '{"trainer": N}'.
    custom_resources: dict[str, NonNegativeFloat] = Field(default_factory=dict)
    storage_path: Uri = "runs/ray"  # local folder or s3://bucket/prefix for checkpoints and results
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._\-]*$")] = "distill"  # same name + storage: resume
    # Worker-group restarts from the latest checkpoint before giving up; -1: no limit. A lost node or a
    # spot preemption costs one restart and at most checkpoint_every steps.
    max_failures: Annotated[int, Field(ge=-1)] = 3
    num_to_keep: PositiveInt = 2  # the latest checkpoints kept


class TestSet(Config):
    """One evaluation: queries in each language against the English captions of the same images.

    ``protocol``: ``translation`` (the query translates one of the corpus captions), ``semantic`` (that
    caption is masked out, so the query must match the image's *other* captions) or ``independent``
    (the queries are descriptions written without seeing the English). ``groups`` name language sets;
    each gap in ``gaps`` is [higher group, lower group].
    """

    __test__ = False  # not a pytest test class

    name: str = "test_2018"
    protocol: Literal["translation", "semantic", "independent"] = "translation"
    data: Uris = Field(default_factory=lambda: _sample("test_2018_captions.parquet"))
    exclude_images_from: Uris = Field(default_factory=list)  # e.g. the dev split
    query_langs: Languages = Field(default_factory=lambda: ["de", "fr", "es", "zh", "cs", "ar", "uk", "ay", "gn", "qu"])
    groups: dict[str, Languages] = Field(default_factory=lambda: {"high": list(HIGH_RESOURCE), "low": list(LOW_RESOURCE)})
    gaps: dict[str, list[str]] = Field(default_factory=lambda: {"low": ["high", "low"]})

    @model_validator(mode="after")
    def _gaps_between_groups(self) -> TestSet:
        for gap, pair in self.gaps.items():
            unknown = [g for g in pair if g not in self.groups]
            if len(pair) != 2 or unknown:
                raise ValueError(f"gaps.{gap} must name two of the groups ({', '.join(self.groups)}), got {pair}")
        return self


class TrainingConfig(Config):
    """What every training run has: the encoder it starts from, the schedule, the optimizer, Ray."""

    student: str = "student-init"  # shipped model name or model folder: the encoder trained
    output_dir: Uri = "runs/distill"
    steps: PositiveInt = 200
    batch_size: PositiveInt = 32
    max_length: PositiveInt = 64  # tokens per sentence in training (captions are short)
    # Sort pairs by length within runs of this many batches (then shuffle those batches), so a batch
    # pads little: GPU work saved. 0: batches as drawn. The order stays a function of (seed, step).
    length_buckets: NonNegativeInt = 0
    freeze_word_embeddings: StrictBool = True
    seed: NonNegativeInt = 0
    eval_every: NonNegativeInt = 0  # steps between dev evaluations; 0: only at the end
    # Steps between checkpoints (also taken at every dev evaluation); a restarted run resumes from the
    # latest, consuming the same pairs in the same order as an uninterrupted one. 0: evaluations only.
    checkpoint_every: NonNegativeInt = 100
    eval_batch_size: PositiveInt = 64
    log_every: PositiveInt = 10
    bf16: StrictBool = True  # bf16 autocast when training on CUDA; ignored on CPU
    optim: OptimConfig = Field(default_factory=OptimConfig)
    ray: RayConfig = Field(default_factory=RayConfig)


class DistillConfig(TrainingConfig):
    """`optical-ray distill` / `train`: the student learns from a frozen teacher on English<->L bitext."""

    teacher: str = "student-init"  # "student-init" (frozen copy of the start), "minilm-en" or a model folder
    data: DataConfig = Field(default_factory=DataConfig)
    loss: LossConfig = Field(default_factory=LossConfig)

    @model_validator(mode="after")
    def _lanes_split_evenly(self) -> DistillConfig:
        if self.data.bitext and self.batch_size % self.data.lanes:
            raise ValueError(f"batch_size {self.batch_size} does not split into data.lanes {self.data.lanes}: "
                             "each batch takes the same number of pairs from every lane")
        if self.data.bitext and self.data.lanes % self.ray.num_workers:
            raise ValueError(f"data.lanes {self.data.lanes} do not split over ray.num_workers {self.ray.num_workers}: "
                             "each worker reads whole lanes (use a multiple of the worker count)")
        return self


class CaptionDataConfig(Config):
    # Caption tables with several captions per image in `lang` (Flickr30k's five English ones).
    train: Uris = Field(default_factory=lambda: _sample("train_english_captions.parquet"))
    lang: str = "en"
    # Images in these tables never enter training: every image any evaluation uses.
    exclude_images_from: Uris = Field(default_factory=lambda: _sample("val_captions.parquet", "test_2018_captions.parquet"))
    # Dev set: each caption retrieves the *other* captions of its image (its own is masked out).
    dev: Uris = Field(default_factory=lambda: _sample("val_english_captions.parquet"))
    drop_blank: StrictBool = False


class CaptionSet(Config):
    """Caption tables to evaluate on, less the images of ``exclude_images_from`` (e.g. the dev split)."""

    name: str
    data: Uris
    exclude_images_from: Uris = Field(default_factory=list)


class TeacherConfig(TrainingConfig):
    """`optical-ray teacher`: an encoder fine-tuned on caption<->caption retrieval in one language (two
    captions of the same image are a positive pair, the batch's others negatives), to distil from.

    OPTICAL's teacher already knows query-document matching in English; a frozen copy of the student's
    start does not, so distilling from it can only teach translation matching."""

    output_dir: Uri = "runs/teacher"
    data: CaptionDataConfig = Field(default_factory=CaptionDataConfig)
    temperature: PositiveFloat = 0.05  # tau of the InfoNCE logits
    ray: RayConfig = Field(default_factory=lambda: RayConfig(name="teacher"))
    # Evaluated before and after training like the dev set (not part of what is trained).
    test_sets: list[CaptionSet] = Field(default_factory=list)


# Where a run writes and how often it saves: not part of what it trains.
NOT_TRAINING = ("output_dir", "ray", "checkpoint_every", "test_sets")
# Fields added after records were keyed, with the default that trains what the records trained.
ADDED_LATER = {("data", "drop_blank"): False, ("data", "pairing"): "translation", ("data", "dev_bitext"): {},
               ("data", "dev_beir"): None, ("data", "dev_beir_split"): "dev", ("length_buckets",): 0,
               ("data", "lanes"): 8}


def training_fields(cfg: TrainingConfig) -> dict:
    """What decides a trained student: two configs with equal fields train the same weights. Resuming
    is refused when they differ, and experiment records are keyed by them."""
    fields = to_dict(cfg)
    for key in NOT_TRAINING:
        fields.pop(key, None)
    for path, default in ADDED_LATER.items():  # at their defaults, keys stay those of earlier records
        *parents, name = path
        holder = fields
        for parent in parents:
            holder = holder.get(parent, {})
        if name in holder and holder[name] == default:
            del holder[name]
    return portable_paths(fields)


def portable_paths(value):
    """``value`` with the bundled tables named ``${sample_data}/...`` rather than by the folder this
    package is installed in, so the same run has the same key in every checkout and on every machine."""
    if isinstance(value, dict):
        return {k: portable_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [portable_paths(v) for v in value]
    if isinstance(value, str) and value.startswith(str(SAMPLE_DIR) + os.sep):
        return SAMPLE_DATA + "/" + Path(value).relative_to(SAMPLE_DIR).as_posix()
    return value


def with_absolute_paths(cfg: TrainingConfig) -> TrainingConfig:
    """A copy whose local paths are absolute: Ray Train workers and Tune trials run in other working
    directories, where a path relative to the submitting shell means nothing. s3:// URIs and shipped
    model names are left as they are."""
    def fix(path: str) -> str:
        return path if path.startswith("s3://") else os.path.abspath(path)

    cfg = copy.deepcopy(cfg)
    d = cfg.data
    d.train, d.dev, d.exclude_images_from = [fix(p) for p in d.train], [fix(p) for p in d.dev], [fix(p) for p in d.exclude_images_from]
    for key in ("bitext", "dev_beir"):
        if getattr(d, key, None):
            setattr(d, key, fix(getattr(d, key)))
    if getattr(d, "dev_bitext", None):
        d.dev_bitext = {lang: fix(path) for lang, path in d.dev_bitext.items()}
    cfg.output_dir, cfg.ray.storage_path = fix(cfg.output_dir), fix(cfg.ray.storage_path)
    for model in ("student", "teacher"):
        if hasattr(cfg, model) and os.path.exists(getattr(cfg, model)):
            setattr(cfg, model, fix(getattr(cfg, model)))
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
    _drop_retired(raw, name)
    try:
        return cls.model_validate(_with_data_root(raw, name))
    except ValidationError as err:
        raise ConfigError(_describe(err, cls, name)) from None


# Keys that older configs (and sweeps started with them) carry, and why they no longer mean anything.
RETIRED = {("ray", "shuffle_buffer"): "the data order is a function of (seed, step), with no shuffle buffer"}


def _drop_retired(raw: dict, name: str) -> None:
    for node in (raw, raw.get("distill") if isinstance(raw.get("distill"), dict) else None):
        for (section, key), why in RETIRED.items():
            if isinstance(node, dict) and isinstance(node.get(section), dict) and key in node[section]:
                del node[section][key]
                logging.getLogger(__name__).warning("%s: %s.%s is ignored: %s", name, section, key, why)


def derive(config: Config, overrides: dict) -> Config:
    """A copy of ``config`` with dotted-key ``overrides``, validated like a file: the one way CLI
    ``--set``, Tune trials and experiment arms make a config from another."""
    return load_config(type(config), to_dict(config), overrides)


def _describe(err: ValidationError, cls: type[Config], name: str) -> str:
    """Every problem, each naming the key path (``loss.temperature``, ``data.train[0]``) and the value."""
    lines = []
    for problem in err.errors():
        path = problem["loc"]
        key = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in path).lstrip(".")
        if problem["type"] == "extra_forbidden":
            known = _fields_at(cls, path[:-1])
            where = f" in {key.rsplit('.', 1)[0]!r}" if len(path) > 1 else ""
            lines.append(f"unknown key {key}{where}" + (f" (known: {', '.join(sorted(known))})" if known else ""))
        else:
            message = problem["msg"].removeprefix("Value error, ")
            message = message[:1].lower() + message[1:]
            value = f" = {problem['input']!r}" if key and not isinstance(problem["input"], dict) else ""
            lines.append(f"{key or 'config'}{value}: {message}")
    return f"{name}: " + "; ".join(lines)


def _fields_at(cls: type[Config], path: tuple) -> list[str]:
    for part in path:
        if isinstance(part, int):
            continue
        annotation = cls.model_fields[part].annotation
        inner = typing.get_args(annotation) or (annotation,)
        nested = [t for t in inner if isinstance(t, type) and issubclass(t, BaseModel)]
        if not nested:
            return []
        cls = nested[0]
    return list(cls.model_fields)


DATA_ROOT = "${data_root}"
SAMPLE_DATA = "${sample_data}"  # the small tables installed with the package, wherever it is installed


def _with_data_root(raw: dict, name: str) -> dict:
    """Every ``${data_root}`` in the config's strings replaced by its top-level ``data_root`` (the shared
    folder on one machine, an s3:// prefix on a cluster: ``--set data_root=s3://bucket/flickr30k-ml``).
    The key itself is consumed here, so configs that differ only in where the same data lives are equal."""
    root = raw.pop("data_root", None)
    warned: set = set()

    def substitute(value, key: str):
        if isinstance(value, dict):
            return {k: substitute(v, f"{key}{k}.") for k, v in value.items()}
        if isinstance(value, list):
            return [substitute(v, key) for v in value]
        if isinstance(value, str) and DATA_ROOT in value:
            if root is None:
                raise ConfigError(f"{name}: {key.rstrip('.')} uses {DATA_ROOT} but no data_root is set "
                                  "(add data_root: to the file or --set data_root=...)")
            # A relative root (the default ../shared/...) depends on where the command runs: say so before
            # any model loads. A warning, not an error: a config is also loaded where its data is not read
            # (reports, comparisons), and absolute roots may be mounted only where the work runs.
            if "://" not in str(root) and not Path(root).is_absolute() and not Path(root).exists() and root not in warned:
                warned.add(root)
                logging.getLogger(__name__).warning(
                    "%s: data_root %s (used by %s) is not a folder here, so reading its tables will fail: point it "
                    "at the caption tables (--set data_root=/path or s3://bucket/prefix), or rebuild them from "
                    "their upstream repositories with `optical-ray data build`", name, root, key.rstrip("."))
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


def to_dict(config: Config) -> dict:
    return config.model_dump()


def save_config(config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def _deep_copy(raw: dict) -> dict:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in raw.items()}




class SearchSpace(Config):
    """What a sweep draws: each knob is a log-uniform range [low, high]; an empty list leaves the distill
    config's value alone (and [v, v] fixes it)."""

    sinkhorn_reg: Range = Field(default_factory=lambda: [0.01, 1.0])  # loss.sinkhorn_reg (ε)
    temperature: Range = Field(default_factory=lambda: [0.01, 0.5])  # loss.temperature (τ)
    lr: Range = Field(default_factory=list)  # optim.lr
    ot_weight: Range = Field(default_factory=list)  # loss.ot_weight (relative to the others)
    contrastive_weight: Range = Field(default_factory=list)
    mse_weight: Range = Field(default_factory=list)


class SweepConfig(Config):
    """`optical-ray tune`: trials of the single-process distillation loop, one process per trial."""

    distill: DistillConfig = Field(default_factory=DistillConfig)  # every trial starts from this
    search: SearchSpace = Field(default_factory=SearchSpace)
    # On the dev set, higher is better: the mean of its measure (R@1; nDCG@10 for data.dev_beir) over the
    # low-resource or all dev languages, or minus the gap.
    objective: Literal["low_r1", "mean_r1", "low_ndcg10", "mean_ndcg10", "neg_gap"] = "low_r1"
    scheduler: Literal["asha", "fifo"] = "asha"  # asha stops weak trials at each dev evaluation
    grace_period: PositiveInt = 1  # dev evaluations every trial gets before ASHA may stop it
    reduction_factor: Annotated[int, Field(ge=2)] = 2
    num_samples: PositiveInt = 8
    max_concurrent_trials: PositiveInt = 2
    cpus_per_trial: PositiveFloat = 1.0
    gpus_per_trial: NonNegativeFloat = 0.0  # > 0 trains each trial on a GPU (without it Ray hides the GPUs)
    custom_resources: dict[str, NonNegativeFloat] = Field(default_factory=dict)  # per trial, e.g. {trainer: 1}
    max_failures: Annotated[int, Field(ge=-1)] = 1  # retries of a failing trial from its checkpoint; -1: no limit
    seed: NonNegativeInt = 0
    storage_path: Uri = "runs/tune"  # local folder or s3://bucket/prefix
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._\-]*$")] = "sweep"  # same name + storage: resume


TASK_TRAINED = "task-trained"  # the teacher candidate an experiment trains itself


class CurveConfig(Config):
    """How the gap moves with training length: one long run per arm (the arm's swept knobs and the
    teacher they were swept under: the chosen one if ``retune_for_teacher``, else the baseline), the
    test sets evaluated at each of its checkpoints."""

    arms: Names = Field(default_factory=lambda: ["mse", "ot+contrastive"])
    steps: PositiveInt = 2000
    every: PositiveInt = 250  # steps between evaluated checkpoints
    seed: NonNegativeInt = 0
    test_sets: Names = Field(default_factory=list)  # by name; empty: every test set


class TuningCheckConfig(Config):
    """Is an arm behind because it was tuned less well? Under the chosen teacher each trained arm gets a
    second sweep: its own searcher seed (the first sweeps all drew the same points), one learning-rate
    range for every arm and more trials. An arm whose best trial beats the dev objective of its runs
    by more than their seed standard deviation runs its seeds again with the new knobs."""

    num_samples: PositiveInt = 8
    lr: Range = Field(default_factory=lambda: [1.0e-5, 3.0e-4])


class ExperimentConfig(Config):
    """`optical-ray experiment`: which loss terms narrow the high/low-resource gap, on which protocol?

    Every arm (``optical_ray.research.plan.ARMS``) starts from the same student and teacher, trains on the
    same data for the same steps with the same seeds, and gets the same sweep budget on the dev set
    over its own knobs. Then, optionally, the same arms with a teacher chosen on dev (``teachers``) and
    a longer run per curve arm (``curve``). Finished runs are recorded under ``results_dir`` and skipped
    on the next call.
    """

    distill: DistillConfig = Field(default_factory=DistillConfig)  # data, steps shared by every arm
    arms: Names = Field(default_factory=lambda: ["none", "mse", "ot", "ot+contrastive", "contrastive", "mse+contrastive"])
    seeds: list[NonNegativeInt] = Field(default_factory=lambda: [0, 1, 2], min_length=1)  # data order and dropout
    held_out_languages: Languages = Field(default_factory=list)  # never trained on, never tuned on
    # The first is the baseline every arm runs with. With more candidates, an MSE run each chooses one on
    # dev; when that is not the baseline, every arm and seed runs again with it. "task-trained" is the
    # teacher `teacher_training` trains (optical-ray teacher) before the choice.
    teachers: list[str] = Field(default_factory=lambda: ["student-init"], min_length=1)
    teacher_training: TeacherConfig | None = None
    retune_for_teacher: StrictBool = True  # false: the chosen teacher's arms reuse the baseline's swept knobs
    # Arms run with the chosen teacher only (the baseline's runs stay as recorded), e.g. an arm added
    # after the choice; with one teacher they run with it.
    chosen_teacher_arms: Names = Field(default_factory=list)
    # Tables the image-pivot arms also train on (English descriptions, independent descriptions: Multi30k
    # task 2); no other arm reads them.
    pivot_train: Uris = Field(default_factory=list)
    tuning_check: TuningCheckConfig | None = None  # after the chosen teacher's runs, before the curves
    curve: CurveConfig | None = None  # after everything else: gap vs pairs seen, for a few arms
    sweep: SweepConfig = Field(default_factory=SweepConfig)  # search ranges; each arm sweeps its own knobs
    test_sets: list[TestSet] = Field(default_factory=lambda: [TestSet()], min_length=1)
    bootstrap: PositiveInt = 1000  # image resamples for the 95% intervals
    out_dir: LocalPath = "runs/experiment"  # models and Ray storage (large, not committed)
    results_dir: LocalPath = "docs/experiment"  # run records, results.json, RESULTS.md and plots (committed)
    keep_models: StrictBool = False  # a run's student and Ray checkpoints, a sweep's Tune storage: deleted once recorded

    @model_validator(mode="after")
    def _task_trained_needs_training(self) -> ExperimentConfig:
        if TASK_TRAINED in self.teachers and self.teacher_training is None:
            raise ValueError(f"teachers lists {TASK_TRAINED!r} but no teacher_training section says how to train it")
        return self

    @model_validator(mode="after")
    def _chosen_teacher_arms_are_arms(self) -> ExperimentConfig:
        unknown = [arm for arm in self.chosen_teacher_arms if arm not in self.arms]
        if unknown:
            raise ValueError(f"chosen_teacher_arms names {', '.join(unknown)}, not among the arms ({', '.join(self.arms)})")
        return self

    @model_validator(mode="after")
    def _curve_test_sets_exist(self) -> ExperimentConfig:
        names = [t.name for t in self.test_sets]
        unknown = [n for n in (self.curve.test_sets if self.curve else []) if n not in names]
        if unknown:
            raise ValueError(f"curve.test_sets names {', '.join(unknown)}, not among the test_sets ({', '.join(names)})")
        return self
