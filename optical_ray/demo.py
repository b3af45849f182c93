"""The embedded demo: shipped models, bundled sample data, nothing else needed.

Evaluates the undistilled student on Multi30k test_2018 (all 1,071 images), distils it briefly with
OT + contrastive losses on a local Ray Train worker, evaluates again and prints where the reports and
plots are.
"""

from __future__ import annotations

from pathlib import Path

import ray

from . import data
from .config import HIGH_RESOURCE, LOW_RESOURCE, SAMPLE_DIR, DistillConfig, load_config
from .encoder import Encoder
from .evaluate import COMPARISON_MAX_LENGTH, evaluate, write_report
from .train import run_training

TEST_LANGS = [*HIGH_RESOURCE, *LOW_RESOURCE]


def run_demo(out_dir: str = "runs/demo", steps: int = 150) -> dict:
    out = Path(out_dir)
    test = data.read_captions(str(SAMPLE_DIR / "test_2018_captions.parquet"))

    print("[1/3] evaluating the undistilled student (multilingual-e5-small) on test_2018 ...", flush=True)
    before = evaluate(Encoder.load("student-init", max_length=COMPARISON_MAX_LENGTH), test, TEST_LANGS, high=HIGH_RESOURCE, low=LOW_RESOURCE)
    write_report(before, out / "before", title="Undistilled student, test_2018")

    print(f"[2/3] distilling for {steps} steps on Ray Train, 1 local worker "
          "(OT + contrastive, teacher: student-init) ...", flush=True)
    cfg = load_config(DistillConfig, overrides={
        "output_dir": str(out / "distill"), "steps": steps,
        "ray.num_workers": 1, "ray.cpus_per_worker": 2, "ray.torch_threads": 2,  # one worker, both cores
        "ray.storage_path": str((out / "ray").resolve()), "ray.name": "demo",
    })
    if not ray.is_initialized():
        ray.init(num_cpus=2, dashboard_host="127.0.0.1", log_to_driver=False)
    student_dir = Path(run_training(cfg))

    print("[3/3] evaluating the distilled student on test_2018 ...", flush=True)
    after = evaluate(Encoder.load(student_dir, max_length=COMPARISON_MAX_LENGTH), test, TEST_LANGS, high=HIGH_RESOURCE, low=LOW_RESOURCE)
    write_report(after, out / "after", title=f"Distilled student ({steps} steps), test_2018")

    print("\nR@1 on test_2018     " + " ".join(f"{lang:>6}" for lang in TEST_LANGS) + "     gap")
    for name, report in (("before", before), ("after", after)):
        cells = " ".join(f"{report['languages'][lang]['R@1']:6.3f}" for lang in TEST_LANGS)
        print(f"{name:<20} {cells}  {report['gap']['R@1']:6.3f}")
    print(f"\nreports and plots: {out / 'before'}, {out / 'after'} (report.md, recall.png)")
    print(f"distilled student: {student_dir}")
    return {"before": before, "after": after}
