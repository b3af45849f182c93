"""The research question, measured: does OT + contrastive distillation narrow the zero-shot R@1 gap
between high- and low-resource languages?

:func:`run_experiment` chooses the teacher on the dev set (an MSE run per candidate), sweeps ε and τ
on the dev set with Ray Tune (arm 3's objective), trains the arms on Ray Train with the same data,
steps and seed, evaluates every arm on every test set, and writes ``RESULTS.md``, ``results.json``
and two plots. Test data is used for nothing but the final evaluation.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from . import data, metrics
from .config import DistillConfig, ExperimentConfig, TestSet, save_config
from .evaluate import build_report, rank_queries
from .models import Encoder
from .train import run_training
from .tune import OBJECTIVES, run_sweep

log = logging.getLogger(__name__)

ARMS = {  # name -> (ot, contrastive, mse) weights; None: the undistilled student
    "none": None,
    "mse": (0.0, 0.0, 1.0),
    "ot": (1.0, 0.0, 0.0),
    "ot+contrastive": (1.0, 1.0, 0.0),
}
LABELS = {"none": "(0) no distillation", "mse": "(1) MSE (Reimers & Gurevych)", "ot": "(2) OT only (OPTICAL)",
          "ot+contrastive": "(3) OT + contrastive"}


def arm_config(cfg: ExperimentConfig, arm: str, teacher: str, out: Path, steps: int | None = None,
               reg: float | None = None, temperature: float | None = None, run: str | None = None) -> DistillConfig:
    ot, contrastive, mse = ARMS[arm]
    arm_cfg = copy.deepcopy(cfg.distill)
    arm_cfg.teacher = teacher
    arm_cfg.steps = steps or cfg.distill.steps
    arm_cfg.loss.ot_weight, arm_cfg.loss.contrastive_weight, arm_cfg.loss.mse_weight = ot, contrastive, mse
    if reg is not None:
        arm_cfg.loss.sinkhorn_reg = reg
    if temperature is not None:
        arm_cfg.loss.temperature = temperature
    name = run or arm.replace("+", "-")
    arm_cfg.output_dir = str(out / "arms" / name)
    arm_cfg.ray.storage_path = str((out / "ray").resolve())
    arm_cfg.ray.name = name
    return arm_cfg


def train_arm(arm_cfg: DistillConfig) -> tuple[str, dict]:
    """Train on Ray Train; returns (student folder, final dev report)."""
    student = str(run_training(arm_cfg))
    report = json.loads((Path(arm_cfg.output_dir) / "dev" / "report.json").read_text())
    save_config(arm_cfg, Path(arm_cfg.output_dir) / "config.yaml")
    return student, report


def dev_objective(report: dict, objective: str) -> float:
    from .distill import dev_metrics

    return float(OBJECTIVES[objective](dev_metrics(report)))


def evaluate_arms(models: dict[str, str], test: TestSet, captions, bootstrap: int, seed: int) -> dict[str, dict]:
    """Each arm's report on one test set. Its gap carries a bootstrap interval (``ci95``) and, for
    every other arm, the paired interval of the gap difference (``diff_ci95[other]``: this arm's gap
    minus the other's, over the same resampled queries)."""
    hits, reports = {}, {}
    for arm, model in models.items():
        ranks = rank_queries(Encoder.load(model), captions, test.query_langs, progress=False)
        reports[arm] = build_report(ranks, test.high, test.low)
        hits[arm] = {lang: (r <= 1).astype(float) for lang, r in ranks.items()}
    high = [lang for lang in test.high if lang in test.query_langs]
    low = [lang for lang in test.low if lang in test.query_langs]
    for arm, report in reports.items():
        gap = report["gap"]
        gap["ci95"] = list(metrics.bootstrap_gap_ci(hits[arm], high, low, n_resamples=bootstrap, seed=seed))
        gap["diff_ci95"] = {other: list(metrics.bootstrap_gap_ci(hits[arm], high, low, n_resamples=bootstrap,
                                                                  seed=seed, baseline=hits[other]))
                            for other in reports if other != arm}
    return reports


def run_experiment(cfg: ExperimentConfig) -> dict:
    started = time.time()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)

    # 1. The teacher, chosen on the dev set with the baseline's (MSE) objective.
    teacher_steps = cfg.teacher_steps or cfg.distill.steps
    candidates = {}
    for teacher in cfg.teachers:
        run = f"teacher-{Path(teacher).name}"
        candidates[teacher] = train_arm(arm_config(cfg, "mse", teacher, out, steps=teacher_steps, run=run))
    scores = {t: dev_objective(report, cfg.sweep.objective) for t, (_, report) in candidates.items()}
    teacher = max(scores, key=scores.get)
    log.info("teacher chosen on dev: %s (%s)", teacher, scores)

    # 2. ε and τ for the OT arms, swept on the dev set with arm 3's objective.
    sweep_cfg = copy.deepcopy(cfg.sweep)
    sweep_cfg.distill = arm_config(cfg, "ot+contrastive", teacher, out)
    sweep_cfg.storage_path, sweep_cfg.name = str((out / "tune").resolve()), "sweep"
    # Saved with the sweep's effective distill section (the teacher is known only now).
    save_config(dataclasses.replace(cfg, sweep=sweep_cfg), out / "experiment.yaml")
    sweep = run_sweep(sweep_cfg)
    if sweep.best is None:
        raise RuntimeError(f"no sweep trial finished; see {out / 'tune' / 'sweep' / 'trials.csv'}")
    reg, temperature = sweep.best.loss.sinkhorn_reg, sweep.best.loss.temperature

    # 3. The arms: same start, data, steps and seed.
    models = {"none": cfg.distill.student}
    if teacher_steps == cfg.distill.steps:
        models["mse"] = candidates[teacher][0]
    else:
        models["mse"] = train_arm(arm_config(cfg, "mse", teacher, out))[0]
    models["ot"] = train_arm(arm_config(cfg, "ot", teacher, out, reg=reg))[0]
    models["ot+contrastive"] = train_arm(arm_config(cfg, "ot+contrastive", teacher, out, reg=reg, temperature=temperature))[0]

    # 4. Test sets, each evaluated once per arm.
    results = {"teacher": teacher, "teacher_dev_scores": scores, "sinkhorn_reg": reg, "temperature": temperature,
               "sweep_trials": sweep.trials.num_rows, "tests": {}}
    for test in cfg.test_sets:
        captions = data.read_captions(test.data)
        results["tests"][test.name] = evaluate_arms(models, test, captions, cfg.bootstrap, cfg.distill.seed)
    results["wall_time_s"] = time.time() - started
    results["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "torch": torch.__version__, "cuda": torch.cuda.is_available()}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot_results(results, out)
    (out / "RESULTS.md").write_text(results_markdown(results, cfg))
    return results


def relative_change(gap: float, reference: float) -> float:
    return (gap - reference) / reference if reference else float("nan")


def versus(gap: dict, other: str) -> str:
    """Whether a gap is smaller or larger than ``other``'s, judged by the paired 95% interval of
    their difference: 'smaller', 'larger' or 'not clearly different'."""
    lo, hi = gap["diff_ci95"][other]
    return "smaller" if hi < 0 else "larger" if lo > 0 else "not clearly different"


def answer(results: dict) -> str:
    """One sentence stating the measured answer on each test set."""
    parts = []
    for name, arms in results["tests"].items():
        g = {arm: r["gap"]["R@1"] for arm, r in arms.items()}
        ours = arms["ot+contrastive"]["gap"]
        lo, hi = ours["diff_ci95"]["none"]
        verdict = {"smaller": "narrowed", "larger": "widened",
                   "not clearly different": "did not clearly change"}[versus(ours, "none")]
        vs_mse = {"smaller": "narrower than", "larger": "wider than",
                  "not clearly different": "not clearly different from"}[versus(ours, "mse")]
        parts.append(f"on {name} OT + contrastive distillation {verdict} the R@1 gap from {g['none']:.3f} (no "
                     f"distillation) to {g['ot+contrastive']:.3f} "
                     f"({100 * relative_change(g['ot+contrastive'], g['none']):+.0f}%; paired 95% CI of the change "
                     f"{lo:+.3f} to {hi:+.3f}), {vs_mse} MSE distillation's {g['mse']:.3f}")
    sentence = "; ".join(parts)
    return sentence[0].upper() + sentence[1:] + "."


def results_markdown(results: dict, cfg: ExperimentConfig) -> str:
    d = cfg.distill
    teacher_scores = ", ".join(f"{Path(t).name} {s:.3f}" for t, s in results["teacher_dev_scores"].items())
    method = [
        (f"- Student start: `{d.student}`; teacher chosen on the dev set among "
         f"{', '.join(f'`{t}`' for t in cfg.teachers)}: **`{results['teacher']}`** "
         f"(dev {cfg.sweep.objective}: {teacher_scores})."),
        (f"- ε = {results['sinkhorn_reg']:.4g} and τ = {results['temperature']:.4g} from a Ray Tune sweep of "
         f"{results['sweep_trials']} trials on the dev set (objective {cfg.sweep.objective}, {cfg.sweep.scheduler}); "
         "arm (2) uses ε, arm (3) both."),
        (f"- Every arm: {d.steps} steps of {d.batch_size} pairs, seed {d.seed}, languages "
         f"{', '.join(d.data.languages)}, word embeddings {'frozen' if d.freeze_word_embeddings else 'trained'}, "
         f"lr {d.optim.lr:g}."),
        ("- Queries in each language retrieve among the English captions of the same images; gap = mean R@1 "
         "of the high group minus mean R@1 of the low group, with a 95% percentile-bootstrap interval over "
         f"queries ({cfg.bootstrap} resamples). \"vs (0)\" and \"vs (1)\" give the relative change of the gap "
         "and, in brackets, the paired 95% interval of its absolute change (the same resampled queries for "
         "both arms); a change whose interval excludes 0 is called clear."),
    ]
    lines = ["# Does OT + contrastive distillation narrow the high/low-resource R@1 gap?", "",
             f"**Answer.** {answer(results)}", "", "## Method", "", *method, ""]
    for name, arms in results["tests"].items():
        langs = list(next(iter(arms.values()))["languages"])
        gap = next(iter(arms.values()))["gap"]
        header = "| arm | " + " | ".join(langs) + " | gap | 95% CI | vs (0) | vs (1) |"
        lines += [f"## {name}", "", "R@1 (R@5, R@10 and MRR are in results.json):", "", header,
                  "|---|" + "---|" * (len(langs) + 4)]
        for arm, report in arms.items():
            g = report["gap"]
            cells = " | ".join(f"{report['languages'][lang]['R@1']:.3f}" for lang in langs)
            lines.append(f"| {LABELS[arm]} | {cells} | {g['R@1']:.3f} | {g['ci95'][0]:.3f}–{g['ci95'][1]:.3f} | "
                         f"{change_cell(arms, arm, 'none')} | {change_cell(arms, arm, 'mse')} |")
        lines += ["", f"High: {', '.join(gap['high'])}; low: {', '.join(gap['low'])}.", ""]
    machine = results["machine"]
    lines += ["## Reproduce", "", "```bash", "optical-ray experiment --config configs/experiment.yaml", "```", "",
              (f"Machine: {machine['platform']}, {machine['cpus']} CPUs, torch {machine['torch']}, "
               f"CUDA {'yes' if machine['cuda'] else 'no'}. Wall time {results['wall_time_s'] / 60:.0f} min."), "",
              ("Plots: `r1_by_arm.png`, `gap_by_arm.png`. Every number here is in `results.json`, written by the "
               "command above."), ""]
    return "\n".join(lines)


def change_cell(arms: dict, arm: str, reference: str) -> str:
    if arm == reference:
        return "—"
    gap = arms[arm]["gap"]
    lo, hi = gap["diff_ci95"][reference]
    return f"{100 * relative_change(gap['R@1'], arms[reference]['gap']['R@1']):+.0f}% [{lo:+.3f}, {hi:+.3f}]"


def plot_results(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tests = results["tests"]
    fig, axes = plt.subplots(len(tests), 1, figsize=(10, 3.2 * len(tests)), squeeze=False)
    for ax, (name, arms) in zip(axes[:, 0], tests.items()):
        langs = list(next(iter(arms.values()))["languages"])
        width = 0.8 / len(arms)
        for i, (arm, report) in enumerate(arms.items()):
            ax.bar(np.arange(len(langs)) + i * width, [report["languages"][lang]["R@1"] for lang in langs], width,
                   label=LABELS[arm])
        ax.set_xticks(np.arange(len(langs)) + 0.4 - width / 2, langs)
        ax.set_ylim(0, 1)
        ax.set_ylabel("R@1")
        ax.set_title(name, fontsize=10)
    axes[0, 0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "r1_by_arm.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / len(tests)
    for i, (name, arms) in enumerate(tests.items()):
        gaps = [r["gap"]["R@1"] for r in arms.values()]
        errors = np.array([[g - r["gap"]["ci95"][0], r["gap"]["ci95"][1] - g] for g, r in zip(gaps, arms.values())]).T
        ax.bar(np.arange(len(arms)) + i * width, gaps, width, yerr=errors, capsize=3, label=name)
    ax.set_xticks(np.arange(len(ARMS)) + 0.4 - width / 2, [LABELS[a].split(" ", 1)[0] for a in ARMS])
    ax.set_ylabel("R@1 gap (high − low)")
    ax.set_title("Gap by arm, 95% bootstrap CI", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "gap_by_arm.png", dpi=120)
    plt.close(fig)

