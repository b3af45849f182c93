"""The model card a saved student carries: README.md with Hugging Face front matter (languages, licence,
base model, ``pipeline_tag: sentence-similarity``, and the per-language dev measure of its last evaluation as
``model-index``), as sentence-transformers' saved models do, so a hub or a reader knows what it is."""

from __future__ import annotations

from pathlib import Path

import yaml

from .config import DistillConfig, TeacherConfig, TrainingConfig
from .model_store import model_revision
from .st_folder import FolderSettings, read_settings

# What the shipped starting points are, upstream.
BASE_MODELS = {"student-init": ("intfloat/multilingual-e5-small", "mit"),
               "minilm-en": ("sentence-transformers/all-MiniLM-L6-v2", "apache-2.0")}


def write_model_card(folder: str | Path, cfg: TrainingConfig, report: dict) -> Path:
    base, licence = BASE_MODELS.get(cfg.student, (None, "other"))
    revision = model_revision(cfg.student)  # a Hugging Face id: the commit it resolved to
    if revision:
        base = cfg.student.partition("@")[0]
    if isinstance(cfg, TeacherConfig):
        languages, title, tag, what = [cfg.data.lang], "optical-ray teacher", "caption-retrieval", teacher_summary(cfg)
    else:
        languages, title, tag, what = ["en", *cfg.data.languages], "optical-ray student", "knowledge-distillation", \
            student_summary(cfg)
    measure, metric_type, task, dataset, what_dev = dev_description(cfg, report)
    metrics = [{"type": metric_type, "value": round(float(m[measure]), 4), "name": f"{measure} {lang} -> en"}
               for lang, m in report.get("languages", {}).items()]
    front = {
        "language": sorted(set(languages)),
        "license": licence,
        **({"base_model": base} if base else {}),
        **({"base_model_revision": revision} if revision else {}),
        "library_name": "sentence-transformers",
        "pipeline_tag": "sentence-similarity",
        "tags": ["sentence-transformers", "feature-extraction", "optical-ray", tag],
        "model-index": [{"name": title, "results": [{
            "task": {"type": "text-retrieval", "name": task},
            "dataset": dataset,
            "metrics": metrics,
        }]}] if metrics else [],
    }
    body = f"""# {title}

{what}

{embedding_sentence(read_settings(folder))}

Dev {measure} of the last evaluation ({what_dev}):

| language | {measure} |
|---|---|
""" + "".join(f"| {lang} | {m[measure]:.3f} |\n" for lang, m in report.get("languages", {}).items())
    path = Path(folder) / "README.md"
    path.write_text("---\n" + yaml.safe_dump(front, sort_keys=False, allow_unicode=True) + "---\n\n" + body)
    return path


POOLING_NAMES = {"mean": "Mean", "cls": "CLS", "max": "Max", "lasttoken": "Last-token"}


def embedding_sentence(settings: FolderSettings) -> str:
    """How the folder embeds (as it states it) and how to call it with sentence-transformers."""
    steps = [f"{POOLING_NAMES.get(settings.pooling, settings.pooling)}-pooled"]
    steps += ["Dense-projected"] if settings.dense else []
    steps += ["L2-normalised"] if settings.normalize else []
    if {"query", "passage"} <= set(settings.prompts):
        call = ('prefix queries with the `query` prompt and documents with `passage`:\n\n```python\n'
                'from sentence_transformers import SentenceTransformer\n\n'
                'model = SentenceTransformer("path/to/this/folder")\n'
                'queries = model.encode(["Ein Hund rennt über die Wiese."], prompt_name="query")\n'
                'passages = model.encode(["A dog runs across the meadow."], prompt_name="passage")\n```')
    else:
        call = ('no prompts:\n\n```python\nfrom sentence_transformers import SentenceTransformer\n\n'
                'embeddings = SentenceTransformer("path/to/this/folder").encode(["A dog runs across the meadow."])\n```')
    return f"{', '.join(steps)} embeddings; {call}"


def dev_description(cfg: TrainingConfig, report: dict) -> tuple[str, str, str, dict, str]:
    """The dev set's measure, its model-index metric type, task name, dataset and a sentence on what
    was measured: caption tables, line-aligned bitext or a BEIR-layout set."""
    d = cfg.data
    if report.get("gap", {}).get("measure") == "nDCG@10":
        return ("nDCG@10", "ndcg_at_10", "Cross-lingual retrieval (query language -> corpus)",
                {"type": "beir", "name": f"{d.dev_beir} ({d.dev_beir_split})"},
                "queries in each language ranking the corpus of a BEIR-layout set")
    if getattr(d, "dev_bitext", None):
        return ("R@1", "recall_at_1", "Bitext retrieval (language -> English)",
                {"type": "bitext", "name": d.dev_bitext["en"]},
                "each sentence finding its English translation among all English sentences")
    return ("R@1", "recall_at_1", "Cross-lingual caption retrieval (query language -> English)",
            {"type": "flickr30k-ml", "name": "dev split"},
            f"queries in each language retrieving {d.lang if isinstance(cfg, TeacherConfig) else 'en'} captions")


def student_summary(cfg: DistillConfig) -> str:
    weights = cfg.loss
    return f"""A multilingual sentence encoder distilled with [optical-ray](https://github.com/optical-ray/optical-ray)
from `{cfg.teacher}` into `{cfg.student}` on English <-> {", ".join(cfg.data.languages)} caption bitext:
{cfg.steps} steps of {cfg.batch_size} pairs, loss weights OT {weights.ot_weight} (Sinkhorn ε {weights.sinkhorn_reg}),
contrastive {weights.contrastive_weight} (τ {weights.temperature}), MSE {weights.mse_weight}."""


def teacher_summary(cfg: TeacherConfig) -> str:
    return f"""`{cfg.student}` fine-tuned with [optical-ray](https://github.com/optical-ray/optical-ray) on
{cfg.data.lang} caption<->caption retrieval (two captions of the same image are a positive pair, InfoNCE
with in-batch negatives, τ {cfg.temperature}): {cfg.steps} steps of {cfg.batch_size} pairs. A teacher to
distil multilingual students from (`teacher:` in a distillation config)."""
