"""A task-trained teacher: an encoder fine-tuned on caption<->caption retrieval in one language.

OPTICAL (Huang, Yu & Allan, WSDM 2023, arXiv 2301.12566) distils from a teacher that "already learns
the knowledge of query-document matching" in English; distillation on bitext then only has to carry
that skill to other languages. A frozen copy of the student's start has never been trained on finding
what a caption describes, so distilling from it can teach translation matching and little more.

:class:`CaptionRetrieval` is that training, in :func:`optical_ray.distill.fit`'s loop (checkpoints,
exact resume, Ray Train): two captions of the same image are a positive pair -- one encoded as a query,
the other as a passage, as retrieval will use them -- and the other pairs of the global batch are its
negatives (symmetric InfoNCE, gathered across workers: :func:`optical_ray.losses.info_nce`). Images of
the dev set and of every ``data.exclude_images_from`` table never enter training.

:func:`optical_ray.train.train_teacher` trains it on Ray Train and reports R@1 before and after on the dev set and every
test set, semantic protocol: each caption retrieves its image through the image's *other* captions.
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import torch

from . import batching, data, metrics
from .config import TeacherConfig
from .distill import Learner, split_output
from .encoder import Encoder
from .evaluate import evaluate, rank_queries
from .losses import info_nce

log = logging.getLogger(__name__)


def training_pairs(cfg: TeacherConfig) -> pa.Table:
    """(query, passage) caption pairs of the training images: never a dev image, nor an image of any
    ``data.exclude_images_from`` table."""
    d = cfg.data
    captions = data.read_captions(d.train, d.drop_blank)
    held_out = data.image_ids(d.exclude_images_from, d.drop_blank) | data.image_ids(d.dev, d.drop_blank)
    return data.caption_pairs(captions, d.lang, held_out)


class CaptionRetrieval(Learner):
    """InfoNCE between the query encoding of one caption and the passage encoding of another caption
    of the same image, at temperature ``cfg.temperature``."""

    name = "teacher"

    @classmethod
    def create(cls, cfg: TeacherConfig, device: torch.device, wrap=None) -> CaptionRetrieval:
        student = Encoder.load(cfg.student, max_length=cfg.max_length).to(device)
        if cfg.freeze_word_embeddings:
            student.freeze_word_embeddings()
        return cls(cfg, student, model=wrap(student) if wrap else None)

    def prepare(self, queries: list[str], passages: list[str]) -> dict:
        # Both sides in one batch: one forward pass, as DDP expects one forward per backward.
        prompts = ["query"] * len(queries) + ["passage"] * len(passages)
        return {"both": self.student.tokenize(queries + passages, prompts), "n": len(queries)}

    def loss(self, inputs: dict) -> tuple[torch.Tensor, dict[str, float]]:
        query_out, passage_out = split_output(self.model(inputs["both"]), inputs["n"])
        loss = info_nce(query_out.embedding, passage_out.embedding, self.cfg.temperature)
        return loss, {"contrastive": float(loss.detach())}

    def batches(self, start_step: int, rank: int = 0, world: int = 1):
        return batching.batches(training_pairs(self.cfg), self.cfg.batch_size, self.cfg.seed, start_step, rank, world,
                                columns=("query", "passage"), length_buckets=self.cfg.length_buckets)

    def dev_data(self) -> pa.Table:
        return data.read_captions(self.cfg.data.dev, self.cfg.data.drop_blank)

    def dev_report(self, captions: pa.Table, progress: bool = False) -> dict:
        lang = self.cfg.data.lang
        return evaluate(self.student, captions, [lang], lang, high=(), low=(), batch_size=self.cfg.eval_batch_size,
                        progress=progress, mask_source=True)


def evaluation_sets(cfg: TeacherConfig) -> dict[str, pa.Table]:
    """The dev set and every test set, as caption tables (a test set's excluded images removed)."""
    sets = {"dev": data.read_captions(cfg.data.dev, cfg.data.drop_blank)}
    for test in cfg.test_sets:
        sets[test.name] = data.without_images(data.read_captions(test.data, cfg.data.drop_blank), test.exclude_images_from)
    return sets


def semantic_ranks(cfg: TeacherConfig, model: str, sets: dict[str, pa.Table]) -> dict[str, np.ndarray]:
    """The rank of each ``cfg.data.lang`` caption's image among the other captions, per set."""
    encoder, lang = Encoder.load(model, max_length=cfg.max_length), cfg.data.lang
    return {name: rank_queries(encoder, captions, [lang], lang, cfg.eval_batch_size, progress=False,
                               mask_source=True)[lang] for name, captions in sets.items()}


def dev_recall(cfg: TeacherConfig, model: str) -> float:
    """Semantic-protocol R@1 of ``model`` on the dev set alone: enough to tell a retrained teacher from
    the recorded one without the whole report."""
    dev = {"dev": data.read_captions(cfg.data.dev, cfg.data.drop_blank)}
    return metrics.retrieval_metrics(semantic_ranks(cfg, model, dev)["dev"])["R@1"]


def before_and_after(cfg: TeacherConfig, start: str, trained: str, n_resamples: int = 1000) -> dict:
    """Semantic-protocol R@1 of ``start`` and ``trained`` on every evaluation set, with a 95% interval
    on the change (paired bootstrap over images)."""
    lang, sets = cfg.data.lang, evaluation_sets(cfg)
    ranks = {label: semantic_ranks(cfg, model, sets) for label, model in (("before", start), ("after", trained))}
    report = {"lang": lang, "start": start, "trained": trained, "steps": cfg.steps, "sets": {}}
    for name, captions in sets.items():
        images = data.query_captions(captions, lang)["image_id"].to_numpy(zero_copy_only=False)
        labels, index = np.unique(images, return_inverse=True)
        weights = metrics.image_resamples(len(labels), n_resamples, seed=0)
        draws = {label: metrics.weighted_recall(ranks[label][name] <= 1, index, weights) for label in ranks}
        report["sets"][name] = {
            "n_queries": len(images), "n_images": len(labels),
            **{label: metrics.retrieval_metrics(ranks[label][name]) for label in ranks},
            "change_R@1_ci95": list(metrics.percentile_interval(draws["after"] - draws["before"])),
        }
    return report


def report_markdown(report: dict) -> str:
    lines = [f"# Teacher: {report['lang']} caption retrieval, semantic protocol",
             "", (f"`{report['start']}` before and after {report['steps']} steps of caption<->caption training "
             "(each caption retrieves its image through the image's other captions; 95% interval: paired "
             "bootstrap over images)."), "",
             "| set | queries | R@1 before | R@1 after | change (95% CI) | R@5 after |", "|---|---|---|---|---|---|"]
    for name, s in report["sets"].items():
        lo, hi = s["change_R@1_ci95"]
        change = s["after"]["R@1"] - s["before"]["R@1"]
        lines.append(f"| {name} | {s['n_queries']} | {s['before']['R@1']:.3f} | {s['after']['R@1']:.3f} | "
                     f"{change:+.3f} [{lo:+.3f}, {hi:+.3f}] | {s['after']['R@5']:.3f} |")
    return "\n".join(lines) + "\n"
