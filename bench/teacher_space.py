"""How far a teacher's embedding space sits from the student's own (issue 13: with the task-trained
teacher, MSE gains while OT + contrastive, on knobs swept under the frozen teacher, collapses). Run by
hand:

    .venv/bin/python bench/teacher_space.py --teacher runs/experiment/teacher-be2e61efd3ca/student

On the bundled test_2018_flickr captions (the first ``--n`` English captions and their ``--lang``
translations), it reports for the student's start and for the teacher:

* mean cosine between different captions (how crowded the space is: e5 models put every sentence
  near every other);
* the matched cosine of one English caption under both models, and English -> English R@1 across the
  two (1.0: the teacher's point for a caption is still nearest the student's point for it);
* ``--lang`` -> English R@1 within each model.

A teacher that keeps the neighbours but moves the space (R@1 across near 1, mean cosines far apart)
hands the student targets of another shape than the one its knobs were swept for; bench/RESULTS.md
has the reading of the recorded run.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pyarrow.compute as pc
import torch

from optical_ray import metrics
from optical_ray.config import SAMPLE_DIR
from optical_ray.data import read_captions
from optical_ray.encoder import Encoder


def recall_at_1(queries: np.ndarray, docs: np.ndarray) -> float:
    """Row i of ``queries`` should find row i of ``docs`` (ties count against it, as in the evaluation)."""
    rows = np.arange(len(queries))
    return metrics.recall_at(metrics.ranks_by_label(queries, docs, rows, rows), 1)


def mean_pairwise_cosine(emb: np.ndarray) -> float:
    sims = emb @ emb.T
    return float((sims.sum() - np.trace(sims)) / (len(emb) * (len(emb) - 1)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", required=True, help="model folder or shipped name")
    parser.add_argument("--student", default="student-init", help="the student's start")
    parser.add_argument("--lang", default="de")
    parser.add_argument("--n", type=int, default=400, help="caption pairs (at least 2)")
    args = parser.parse_args()
    if args.n < 2:
        parser.error(f"--n {args.n}: a mean cosine between different captions needs at least 2")
    torch.set_num_threads(1)  # beside a running experiment

    captions = read_captions(str(SAMPLE_DIR / "test_2018_captions.parquet"))
    by_lang = {lang: {(r["image_id"], r["caption_idx"]): r["text"]
                      for r in captions.filter(pc.equal(captions["lang"], lang)).to_pylist()} for lang in ("en", args.lang)}
    pairs = [key for key in by_lang["en"] if key in by_lang[args.lang]][: args.n]  # a caption and its translation
    if not pairs:
        raise SystemExit(f"--lang {args.lang}: no translations of the English captions in {SAMPLE_DIR}")
    english, other = ([by_lang[lang][key] for key in pairs] for lang in ("en", args.lang))
    student, teacher = Encoder.load(args.student), Encoder.load(args.teacher)
    s_en, s_other, t_en, t_other = (m.encode(texts) for m in (student, teacher) for texts in (english, other))
    print(json.dumps({
        "captions": len(english), "lang": args.lang, "student": args.student, "teacher": args.teacher,
        "mean_pairwise_cosine": {"student": mean_pairwise_cosine(s_en), "teacher": mean_pairwise_cosine(t_en)},
        "matched_english_cosine": float((s_en * t_en).sum(axis=1).mean()),
        "english_r1_teacher_to_student": recall_at_1(t_en, s_en),
        f"{args.lang}_to_english_r1": {"student": recall_at_1(s_other, s_en), "teacher": recall_at_1(t_other, t_en)},
    }, indent=1))


if __name__ == "__main__":
    main()
