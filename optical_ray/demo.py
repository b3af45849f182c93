"""The embedded demo: shipped models, bundled sample data, nothing else needed.

Evaluates the undistilled student on Multi30k test_2018 (all 1,071 images), distils it briefly with
OT + contrastive losses, evaluates again and prints where the reports and plots are.
"""

from __future__ import annotations

from pathlib import Path

from . import data
from .config import SAMPLE_DIR, DistillConfig, load_config
from .distill import distill
from .evaluate import evaluate, write_report
from .models import Encoder

TEST_LANGS = ["de", "fr", "es", "zh", "ay", "gn", "qu"]


def run_demo(out_dir: str = "runs/demo", steps: int = 150) -> dict:
    out = Path(out_dir)
    test = data.read_captions(str(SAMPLE_DIR / "test_2018_captions.parquet"))

    print("[1/3] evaluating the undistilled student (multilingual-e5-small) on test_2018 ...", flush=True)
    before = evaluate(Encoder.load("student-init"), test, TEST_LANGS)
    write_report(before, out / "before", title="Undistilled student, test_2018")

    print(f"[2/3] distilling for {steps} steps (OT + contrastive, teacher: student-init) ...", flush=True)
    cfg = load_config(DistillConfig, overrides={"output_dir": str(out / "distill"), "steps": steps})
    result = distill(cfg)

    print("[3/3] evaluating the distilled student on test_2018 ...", flush=True)
    after = evaluate(Encoder.load(result.model_dir), test, TEST_LANGS)
    write_report(after, out / "after", title=f"Distilled student ({steps} steps), test_2018")

    print("\nR@1 on test_2018     " + " ".join(f"{lang:>6}" for lang in TEST_LANGS) + "     gap")
    for name, report in (("before", before), ("after", after)):
        cells = " ".join(f"{report['languages'][lang]['R@1']:6.3f}" for lang in TEST_LANGS)
        print(f"{name:<20} {cells}  {report['gap']['R@1']:6.3f}")
    print(f"\nreports and plots: {out / 'before'}, {out / 'after'} (report.md, recall.png)")
    print(f"distilled student: {result.model_dir}")
    return {"before": before, "after": after}
