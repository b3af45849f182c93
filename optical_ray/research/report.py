"""The experiment's records turned into numbers, words and plots: results.json, RESULTS.md, and the
per-language and per-gap plots. The numbers come from :mod:`optical_ray.research.stats`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..config import TASK_TRAINED, ExperimentConfig
from ..teacher import report_markdown as teacher_report_markdown
from ..tune import range_edges, read_trial_log
from .plan import ARMS, TRIAL_LOGS, check_sweep_config
from .stats import (
    TUNED,
    choice_comparison,
    clear,
    compare_teachers,
    comparisons,
    curve_changes,
    families,
    group_r1,
    group_r1_changes,
    mean_dev,
    summarize_curves,
    summarize_test,
)


def arm_label(arm: str) -> str:

    return ARMS[arm].label


def write_results(cfg: ExperimentConfig, tests, untrained: list[dict], runs: dict, task_teacher: dict | None,
                  choice: dict, curves: list[dict] = (), choice_runs: dict[str, dict] | None = None) -> dict:
    """results.json, RESULTS.md and plots from the records so far. ``runs``: teacher name -> its
    :class:`optical_ray.research.runner.Teacher` (the baseline first); ``choice``: the teacher choice on dev;
    ``choice_runs``: candidate teacher -> its choice run (the same MSE run under each teacher)."""
    trained = [arm for arm in cfg.arms if arm != "none"]
    baseline, *others = runs.values()
    records = untrained + baseline.records
    results = {
        "status": run_status(cfg, untrained, runs, choice, choice_runs or {}, curves),
        "teacher": baseline.name, "held_out_languages": cfg.held_out_languages, "objective": cfg.sweep.objective,
        "arms": arms_summary(cfg.arms, records, baseline.sweeps),
        "tests": {t.spec.name: summarize_test(t, records, cfg.arms, cfg.bootstrap) for t in tests},
        "bootstrap": cfg.bootstrap,
        "machines": machines([*untrained, *(r for t in runs.values() for r in t.records),
                              *(choice_runs or {}).values(), *curves, *([task_teacher] if task_teacher else [])]),
        "wall_time_s": sum(r.get("wall_s", 0.0) for t in runs.values() for r in t.records)
                       + sum(r.get("wall_s", 0.0) for r in untrained),
    }
    if len(cfg.teachers) > 1:
        results["teacher_choice"] = {"candidates": cfg.teachers, **choice,
                                     "task_trained": task_teacher and {"model": task_teacher["model"],
                                                                       "report": task_teacher["report"]},
                                     "vs_baseline": choice_comparison(tests, choice_runs or {}, baseline.name,
                                                                     cfg.bootstrap)}
    for other in others:
        other_records = untrained + other.records
        results["chosen_teacher"] = {
            "teacher": other.name, "retuned": cfg.retune_for_teacher,
            "arms": arms_summary(cfg.arms, other_records, other.sweeps),
            "tests": {t.spec.name: summarize_test(t, other_records, cfg.arms, cfg.bootstrap) for t in tests},
            "vs_baseline": {t.spec.name: compare_teachers(t, baseline.records, other.records, trained, cfg.bootstrap)
                            for t in tests}}
    if curves:
        start = untrained[0] if untrained else None
        summaries = {t.spec.name: summarize_curves(t, curves, cfg.bootstrap, start) for t in tests}
        results["curves"] = {name: arms for name, arms in summaries.items() if any(arms.values())}
        results["curve_teacher"] = curves[0]["teacher"]
        results["curve_seed"] = curves[0]["seed"]
        if start is not None:
            longer = {t.spec.name: curve_changes(t, curves, start, cfg.bootstrap) for t in tests}
            results["at_curve_length"] = {name: changes for name, changes in longer.items() if changes}
    pivot = {teacher.name: {t.spec.name: changes for t in tests
                            if (changes := group_r1_changes(t, teacher.records, *PIVOT_COMPARISON, cfg.bootstrap))}
             for teacher in runs.values()}
    if any(pivot.values()):
        results["pivot_vs_translation"] = {name: tests_ for name, tests_ in pivot.items() if tests_}
    checks = {teacher.name: {arm: tuning_check_summary(cfg, tests, teacher, arm, check)
                             for arm, check in teacher.checks.items()} for teacher in runs.values() if teacher.checks}
    if checks:
        results["tuning_check"] = checks
    if tuned := tuned_answer(cfg, tests, untrained, runs):
        results["tuned"] = tuned
    results["multiplicity"] = families(results)
    out = Path(cfg.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "RESULTS.md").write_text(results_markdown(results, cfg))
    plot_results(results, out)
    return results


def tuning_check_summary(cfg: ExperimentConfig, tests, teacher, arm: str, check: dict) -> dict:
    """One arm's tuning check: its knobs and dev objective (seed mean, sd) against the check's best
    trial and knobs (and which of those lie near an end of the check's range), and, when it was rerun
    with them, every gap's change (rerun - original)."""
    original = [r for r in teacher.records if r["arm"] == arm]
    search = check_sweep_config(cfg, arm, teacher.name).search
    summary = {"chosen": teacher.sweeps.get(arm, {}).get("params", {}),
               **{k: check[k] for k in ("params", "trials", "dev_mean", "dev_sd", "best", "rerun")},
               "at_edge": {knob: {"end": end, "range": getattr(search, knob)}
                           for knob, end in range_edges(check["params"], search).items()},
               "rerun_seeds": [r["seed"] for r in check["records"]]}
    if check["records"]:
        summary["vs_chosen_knobs"] = {t.spec.name: compare_teachers(t, original, check["records"], [arm], cfg.bootstrap)
                                      .get(arm, {}) for t in tests}
    return summary


def tuned_answer(cfg: ExperimentConfig, tests, untrained: list[dict], runs: dict) -> dict:
    """The answer's test summaries again at the best knobs each arm has, under the teacher the tuning
    check ran under: an arm's reruns with the check's knobs where the check called for them (once every
    seed is rerun), its first runs where it did not. Arms whose check or reruns are still to come are
    left out (``pending``); {} until some arm has been rerun (until then it is the answer above)."""
    checked = next((teacher for teacher in runs.values() if teacher.checks), None)
    if checked is None:
        return {}
    records, knobs = list(untrained), {}
    for arm, check in checked.checks.items():
        if not check["rerun"]:
            records += [r for r in checked.records if r["arm"] == arm]
            knobs[arm] = "first"
        elif len(check["records"]) == len(cfg.seeds):
            records += check["records"]
            knobs[arm] = "check"
    if "check" not in knobs.values():
        return {}
    arms = [arm for arm in cfg.arms if arm == "none" or arm in knobs]
    return {"teacher": checked.name, "knobs": knobs,
            "pending": [arm for arm in cfg.arms if arm not in arms],
            "tests": {t.spec.name: summarize_test(t, records, arms, cfg.bootstrap) for t in tests}}


def machines(records: list[dict]) -> dict:
    """The machines the records name (records from before they named one are counted apart)."""
    named = [json.dumps(r["machine"], sort_keys=True) for r in records if "machine" in r]
    return {"named": [{**json.loads(m), "records": named.count(m)} for m in sorted(set(named))],
            "unnamed": len(records) - len(named)}


def machines_sentence(found: dict) -> str:
    parts = [f"{m['platform']}, {m['cpus']} CPUs, torch {m['torch']}, CUDA {'yes' if m['cuda'] else 'no'} "
             f"({m['records']} records)" for m in found["named"]]
    if found["unnamed"]:
        parts.append(f"not named by {found['unnamed']} records written before records named their machine "
                     "(2-CPU Linux boxes, torch 2.13.0+cpu, no CUDA, as the earlier versions of this report said)")
    return "Machines: " + "; ".join(parts) + "."


def run_status(cfg: ExperimentConfig, untrained: list[dict], runs: dict, choice: dict, choice_runs: dict,
               curves: list[dict]) -> dict:
    """How far the experiment has come: run records so far and, in order, what it has still to run
    (the baseline teacher's arms and seeds, the teacher choice, the chosen teacher's runs, the curves)."""
    baseline, *others = runs.values()
    trained_arms = sum(arm != "none" for arm in cfg.arms)
    per_teacher = trained_arms * len(cfg.seeds)
    later = len(cfg.chosen_teacher_arms) if len(cfg.teachers) > 1 else 0  # the chosen teacher's arms only
    baseline_expected = (trained_arms - later) * len(cfg.seeds) + ("none" in cfg.arms)
    baseline_done = len(untrained) + len(baseline.records)
    pending = []
    if baseline_done < baseline_expected:
        pending.append(f"the baseline teacher's arms and seeds ({baseline_done} of {baseline_expected} runs)")
    if len(cfg.teachers) > 1 and not choice:
        pending.append(f"the teacher choice on dev ({len(choice_runs)} of {len(cfg.teachers)} candidate runs), and "
                       "if a teacher other than the baseline wins, every arm and seed again with it")
    elif choice.get("chosen", baseline.name) != baseline.name:
        chosen_done = sum(len(t.records) for t in others)
        if chosen_done < per_teacher:
            swept = (f"{sum(len(t.sweeps) for t in others)} of {trained_arms} sweeps, "
                     if cfg.retune_for_teacher else "")
            pending.append(f"every arm and seed with the chosen teacher ({swept}{chosen_done} of {per_teacher} runs)")
    if cfg.tuning_check:
        checked = sum(len(t.checks) for t in runs.values())
        if checked < trained_arms:
            logs = sorted((Path(cfg.results_dir) / TRIAL_LOGS).glob("check-*.json"))
            logged = sum(len(read_trial_log(None, str(log))) for log in logs)
            cut_short = f"; check sweeps cut short: {len(logs)}, their finished trials logged: {logged}" if logs else ""
            pending.append(f"the tuning check ({checked} of {trained_arms} arms{cut_short})")
    if cfg.curve:
        wanted = sum(arm in cfg.arms for arm in cfg.curve.arms) * (cfg.curve.steps // cfg.curve.every)
        points = sum(len(c["points"]) for c in curves)
        if points < wanted:
            pending.append(f"the training-length curves ({points} of {wanted} points)")
    runs_done = baseline_done + len(choice_runs) + sum(len(t.records) for t in others) + \
        sum(len(c["records"]) for t in runs.values() for c in t.checks.values())
    return {"runs": runs_done, "baseline_runs": baseline_done, "baseline_expected": baseline_expected,
            "pending": pending, "complete": not pending}


def status_line(status: dict) -> str:
    line = f"Status: {status['runs']} runs recorded"
    if status["complete"]:
        return line + ", the experiment complete."
    if status["baseline_runs"] < status["baseline_expected"]:
        line += (" — **partial**: arms or seeds are missing, so read every number below as preliminary."
                 " Still to run")
    else:
        line += f"; every arm and seed of the baseline teacher is in ({status['baseline_runs']} runs). Still to run"
    return line + f": {'; '.join(status['pending'])}. `optical-ray experiment` continues where it stopped."


def arms_summary(arms: list[str], records: list[dict], sweeps: dict[str, dict]) -> dict:
    return {arm: {"label": arm_label(arm), "seeds": [r["seed"] for r in records if r["arm"] == arm],
                  "params": sweeps.get(arm, {}).get("params", {}),
                  "sweep_trials": len(sweeps.get(arm, {}).get("trials", [])),
                  "dev": mean_dev([r for r in records if r["arm"] == arm])} for arm in arms}


def answer_lines(results: dict) -> list[str]:
    """The measured answer, one bullet per test set and gap (absolute R@1 gap), then what OT adds
    over contrastive alone."""
    lines = []
    for name, test in results["tests"].items():
        arms = test["arms"]
        if "none" not in arms or len(arms) < 2:
            continue
        for gap, ref in arms["none"]["gaps"].items():
            upper, lower = test["gaps"][gap]
            narrowed, widened, same = [], [], []
            for arm, summary in arms.items():
                if arm == "none":
                    continue
                entry = summary["gaps"][gap]["abs"]
                verdict = clear(entry["diff_ci95"]["none"])
                # Whether a gap closed because the low group rose or because the high group fell.
                moved = [f"{group} {group_r1(summary, langs) - group_r1(arms['none'], langs):+.3f}"
                         for group, langs in ((upper, ref["upper"]), (lower, ref["lower"]))]
                text = (f"{arm_label(arm)} {entry['value']:.3f} ({entry['value'] - ref['abs']['value']:+.3f}; "
                        f"R@1 {', '.join(moved)})")
                {"smaller": narrowed, "larger": widened, "unclear": same}[verdict].append(text)
            groups = f"{', '.join(ref['upper'])} − {', '.join(ref['lower'])}"
            parts = [f"narrowed by {'; '.join(narrowed)}" if narrowed else "narrowed by no arm",
                     *( [f"widened by {'; '.join(widened)}"] if widened else []),
                     *( [f"no clear change with {'; '.join(same)}"] if same else [])]
            lines.append(f"- **{name}** ({test['protocol']}), gap `{gap}` ({groups}) = {ref['abs']['value']:.3f} "
                         f"without distillation: {', '.join(parts)}.")
        lines += ot_over_contrastive(name, arms)
    chosen = results.get("chosen_teacher")
    for name, arms in (chosen or {}).get("vs_baseline", {}).items():
        changes = [f"{arm_label(arm)} `{gap}` {g['other'] - g['baseline']:+.3f} {fmt_interval(g['change_ci95'])} "
                   f"(R@1 {', '.join(f'{group} {change:+.3f}' for group, change in group_changes(g).items())})"
                   for arm, gaps in arms.items() for gap, g in gaps.items()]
        if changes:
            lines.append(f"- **{name}** with the {teacher_label(results, chosen['teacher'])} teacher instead of "
                         f"`{results['teacher']}`: gap change " + "; ".join(changes) + ".")
    for name, test in (chosen or {}).get("tests", {}).items():
        lines += ot_over_contrastive(name, test["arms"], f"the {teacher_label(results, chosen['teacher'])} teacher")
    return lines


def ot_over_contrastive(name: str, arms: dict, teacher: str | None = None) -> list[str]:
    """What adding OT to contrastive changes in each gap of one test set (paired image-bootstrap
    interval of OT + contrastive against contrastive alone, same seeds): one line, or none without both arms."""
    if "ot+contrastive" not in arms or "contrastive" not in arms:
        return []
    adds = []
    for gap in arms["ot+contrastive"]["gaps"]:
        diff, interval = change_of(arms, "ot+contrastive", "contrastive", gap)
        adds.append(f"`{gap}` {diff:+.3f} {fmt_interval(interval)}")
    under = f", {teacher}" if teacher else ""
    line = (f"  - OT added to contrastive ({name}{under}): gap change {', '.join(adds)} "
            "(negative: OT narrows it further; an interval containing 0: no measurable effect).")
    return [line]


def results_markdown(results: dict, cfg: ExperimentConfig) -> str:
    d = cfg.distill
    lines = ["# Which loss terms narrow the high/low-resource R@1 gap, and does it reach unseen languages?", "",
             status_line(results["status"]), "",
             "## Answer (absolute R@1 gap; 95% intervals over images and training seeds, vs no distillation)", "",
             *(answer_lines(results) or ["(no trained arm recorded yet)"]), "", *multiplicity_markdown(results),
             "## Method", ""]
    held = ", ".join(results["held_out_languages"]) or "none"
    lines += [
        (f"- Every arm starts from `{d.student}` with teacher `{results['teacher']}`"
         + (" (the baseline; another teacher below)" if "teacher_choice" in results else "")
         + f", trains {d.steps} steps of {d.batch_size} pairs on {', '.join(l for l in d.data.languages if l not in results['held_out_languages'])}"
         f" on Ray Train, seeds {', '.join(map(str, cfg.seeds))}. A seed sets the data order (shuffle) and dropout; "
         "the student start and the teacher are the same for every seed."),
        f"- Held out of training and of every dev choice: **{held}** (they stay in the test sets).",
        (f"- Equal tuning: each trained arm gets one Ray Tune sweep of {cfg.sweep.num_samples} trials "
         f"({cfg.sweep.scheduler}, objective {cfg.sweep.objective} on the dev split, trained languages only) over "
         "its own knobs; the chosen values:"), "",
        *knob_table(results["arms"])]
    lines += ["", ("- R@1: mean over seeds (± seed standard deviation). Gaps: absolute (`abs`, used by the answer) "
                   "and relative error rate (`rel` = (1 − R@1 low) / (1 − R@1 high)); intervals are 95% percentile "
                   f"bootstraps ({results['bootstrap']} resamples) at two levels: the test set's images (the same "
                   "draw for every language, seed and arm, so differences are paired on images) and each arm's "
                   "training seeds (drawn independently per arm and teacher); \"vs (0)\" is the interval of the "
                   "change."), ""]
    for name, test in results["tests"].items():
        arms = test["arms"]
        if not arms:
            continue
        langs = list(next(iter(arms.values()))["languages"])
        lines += [f"## {name} — {test['protocol']} ({test['n_images']} images)", "",
                  "Groups: " + "; ".join(f"{g}: {', '.join(v)}" for g, v in test["groups"].items()) + ".", "",
                  "| arm | seeds | " + " | ".join(langs) + " |", "|---|---|" + "---|" * len(langs)]
        for arm, summary in arms.items():
            cells = " | ".join(f"{m['R@1']:.3f}" + (f" ±{m['R@1_sd']:.3f}" if m["R@1_sd"] else "")
                               for m in summary["languages"].values())
            lines.append(f"| {arm_label(arm)} | {len(summary['seeds'])} | {cells} |")
        lines += ["", "| arm | gap | abs [95% CI] | abs seeds mean ± sd | abs vs (0) | rel [95% CI] | rel vs (0) |",
                  "|---|---|---|---|---|---|---|"]
        for arm, summary in arms.items():
            for gap, entry in summary["gaps"].items():
                a, r = entry["abs"], entry["rel"]
                vs_a = fmt_interval(a["diff_ci95"].get("none")) if arm != "none" else "—"
                vs_r = fmt_interval(r["diff_ci95"].get("none")) if arm != "none" else "—"
                lines.append(f"| {arm_label(arm)} | {gap} | {a['value']:.3f} {fmt_interval(a['ci95'], sign=False)} | "
                             f"{a['seed_mean']:.3f} ± {a['seed_sd']:.3f} | {vs_a} | "
                             f"{r['value']:.2f} {fmt_interval(r['ci95'], sign=False, digits=2)} | {vs_r} |")
        lines.append("")
    lines += teacher_markdown(results) + pivot_markdown(results) + tuning_check_markdown(results) + \
        tuned_markdown(results) + curves_markdown(results) + length_markdown(results, cfg)
    lines += ["## Plots", "", "![R@1 by language and arm](r1_by_arm.png)", "", "![Gaps by arm](gap_by_arm.png)", "",
              "## Reproduce", "", "```bash", "optical-ray experiment --config configs/experiment.yaml", "```", "",
              ("Finished runs are recorded in `runs/` (one JSON per arm and seed, keyed by a hash of its effective "
               "config) and sweeps in `sweeps/`; a rerun skips them. "
               f"{machines_sentence(results['machines'])} Training + evaluation time of the recorded runs: "
               f"{results['wall_time_s'] / 60:.0f} min (sweeps not included)."), ""]
    return "\n".join(lines)


# Arm (6) against the arm it differs from only in its pairs: what image-pivot pairs add to translation pairs.
PIVOT_COMPARISON = ("pivot-contrastive", "contrastive")


def pivot_markdown(results: dict) -> list[str]:
    found = results.get("pivot_vs_translation", {})
    if not found:
        return []
    lines = ["## Image-pivot pairs (6) against translation pairs (4)", "",
             ("Mean R@1 of each language group, arm (6) minus arm (4) (the same loss, other pairs), 95% interval "
              "over images and seeds. The hypothesis (issue #33): independent descriptions rise (nl ≥ +0.03, the "
              "interval excluding 0) with no high-resource loss over 0.01 on the semantic protocol."), ""]
    for teacher, tests in found.items():
        lines += [f"Teacher {teacher_label(results, teacher)}:", ""]
        for name, groups in tests.items():
            cells = "; ".join(f"{group} ({', '.join(g['langs'])}) {g['change']:+.3f} {fmt_interval(g['ci95'])}"
                              for group, g in groups.items())
            lines.append(f"- {name}: {cells}")
        lines.append("")
    return lines


def tuning_check_markdown(results: dict) -> list[str]:
    found = results.get("tuning_check", {})
    if not found:
        return []
    lines = ["## Tuning check", "",
             ("Each arm swept again under the teacher below with a searcher seed of its own, one lr range for "
              "every arm and more trials; an arm whose best trial beats its runs' dev objective by more than "
              "their seed sd ran its seeds again with the new knobs. A knob whose best value lies in the outer tenth "
              "(log scale) of the check's range is marked: better values may lie beyond it."), ""]
    for teacher, arms in found.items():
        lines += [f"Teacher {teacher_label(results, teacher)}:", "",
                  "| arm | knobs | dev objective (seed mean ± sd) | check: best trial | check's knobs | rerun |",
                  "|---|---|---|---|---|---|"]
        for arm, c in arms.items():
            knobs = ", ".join(f"{k} {v:.3g}" for k, v in c["chosen"].items()) or "—"
            found_knobs = ", ".join(f"{k} {v:.3g}" for k, v in c["params"].items()) or "—"
            found_knobs += "".join(f" ({knob} at the {e['end']} end of [{e['range'][0]:.3g}, {e['range'][1]:.3g}])"
                                   for knob, e in c.get("at_edge", {}).items())
            best = f"{c['best']:.3f} ({c['trials']} trials)" if c["best"] is not None else "none finished"
            done = ", ".join(map(str, c["rerun_seeds"]))
            rerun = (f"yes (seeds rerun: {done or 'none yet'})" if c["rerun"] else "no")
            lines.append(f"| {arm_label(arm)} | {knobs} | {c['dev_mean']:.3f} ± {c['dev_sd']:.3f} | {best} | "
                         f"{found_knobs} | {rerun} |")
        lines.append("")
        for arm, c in arms.items():
            for name, gaps in c.get("vs_chosen_knobs", {}).items():
                changes = [f"`{gap}` {g['baseline']:.3f} → {g['other']:.3f} {fmt_interval(g['change_ci95'])}"
                           for gap, g in gaps.items()]
                if changes:
                    lines.append(f"- {arm_label(arm)} rerun with the check's knobs, {name}: " + "; ".join(changes))
        lines.append("")
    return lines


FAMILY_TITLES = {"vs_none": "every arm vs no distillation", "ot_added": "OT added to contrastive",
                 "ot_contrastive_vs_mse": "OT + contrastive vs MSE", "teacher": "the chosen teacher vs the baseline, per arm"}


def family_title(kind: str) -> str:
    title = FAMILY_TITLES[kind.removesuffix(TUNED)]
    return f"{title}, at the tuning check's knobs" if kind.endswith(TUNED) else title


def multiplicity_markdown(results: dict) -> list[str]:
    """Which conclusions survive seed variance and Holm's correction, family by family."""
    found = results.get("multiplicity", {})
    if not found:
        return []
    lines = ["## Seeds and multiplicity", "",
             ("Every interval in this report resamples each arm's training seeds as well as the images "
              "(hierarchical bootstrap). Per family of comparisons (absolute gaps): how many changes exclude 0 "
              "over images alone (the intervals of earlier versions of this report), over images and seeds, and "
              "after Holm's correction within the family (family-wise α = 0.05; p-values from a Wald test with "
              "the bootstrap standard error). Conclusions outside these families, and every one that does not "
              "survive Holm, are exploratory."), "",
             "| family | teacher | changes | clear (images) | clear (images + seeds) | clear after Holm |",
             "|---|---|---|---|---|---|"]
    for name, family in found.items():
        kind, _, teacher = name.partition("/")
        label = teacher_label(results, teacher) if teacher else teacher_label(results, results["chosen_teacher"]["teacher"])
        counts = [sum(c[f"clear_{level}"] != "unclear" for c in family) for level in ("images", "seeds", "holm")]
        lines.append(f"| {family_title(kind)} | {label} | {len(family)} | " + " | ".join(map(str, counts)) + " |")
    lines.append("")
    changed = [(name, c) for name, family in found.items() for c in family if c["clear_images"] != c["clear_holm"]]
    if changed:
        lines += ["Conclusions that change (images alone → with seeds → after Holm):", ""]
        for name, c in changed:
            kind, _, teacher = name.partition("/")
            who = f"{arm_label(c['arm'])} vs {arm_label(c['against'])}" if kind != "teacher" else \
                f"{arm_label(c['arm'])}, {teacher_label(results, results['chosen_teacher']['teacher'])} vs `{c['against']}`"
            knobs = ", the check's knobs" if kind.endswith(TUNED) else ""
            under = f" ({teacher_label(results, teacher)} teacher{knobs})" if teacher else ""
            lines.append(f"- {c['test']} `{c['gap']}`, {who}{under}: {c['change']:+.3f}; "
                         f"{c['clear_images']} {fmt_interval(c['ci95_images'])} → {c['clear_seeds']} "
                         f"{fmt_interval(c['ci95'])} → {c['clear_holm']} (Holm p {c['p_holm']:.3f})")
        lines.append("")
    return lines


def teacher_markdown(results: dict) -> list[str]:
    """The teacher sections: the task-trained teacher's own before/after, the choice on dev, and every
    gap under the chosen teacher against the baseline."""
    if "teacher_choice" not in results:
        return []
    choice = results["teacher_choice"]
    lines = ["## A teacher that knows the task", ""]
    task = choice.get("task_trained")
    if task:
        lines += [teacher_report_markdown(task["report"]).split("\n", 2)[2].rstrip(), "", f"Model: `{task['model']}`.", ""]
    lines += choice_markdown(results)
    if "chosen" not in choice:
        return lines + ["The choice among " + ", ".join(f"`{t}`" for t in choice["candidates"]) + " is not made yet.", ""]
    scores = ", ".join(f"{teacher_label(results, t)} {v:.3f}" for t, v in choice["dev_scores"].items())
    lines += [(f"Chosen on dev (MSE student, default knobs, first seed; objective {results['objective']}): "
              f"**{teacher_label(results, choice['chosen'])}** ({scores})."), ""]
    chosen = results.get("chosen_teacher")
    if not chosen:
        return lines + ["The chosen teacher is the baseline: nothing more to run.", ""]
    lines += [(f"Every arm again with the {teacher_label(results, chosen['teacher'])} teacher: the absolute gap "
              f"under the baseline teacher `{results['teacher']}` and under it, with the paired 95% interval of the "
              "change (negative: the chosen teacher narrows the gap), and each group's R@1 under both; each arm "
              "on the seeds both teachers have runs of."), ""]
    if chosen["retuned"]:
        lines += ["Each arm swept again under it (the same budget and search); the chosen values:", "",
                  *knob_table({arm: info for arm, info in chosen["arms"].items() if info["params"]}),
                  ""]
    else:
        lines += ["Each arm with the knobs swept under the baseline teacher (`retune_for_teacher: false`).", ""]
    for name, arms in chosen["vs_baseline"].items():
        if not arms:
            continue
        lines += [f"### {name} ({results['tests'][name]['protocol']})", "",
                  ("| arm | seeds | gap | baseline teacher | chosen teacher | change [95% CI] | higher group R@1 | "
                   "lower group R@1 |"), "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {arm_label(arm)} | {len(g['seeds'])} | {gap} | {g['baseline']:.3f} | {g['other']:.3f} | "
                  f"{g['other'] - g['baseline']:+.3f} {fmt_interval(g['change_ci95'])} | {group_cells(g)} |"
                  for arm, gaps in arms.items() for gap, g in gaps.items()]
        lines.append("")
    return lines


def knob_table(arms: dict) -> list[str]:
    """Each arm's swept knobs, the values its sweep chose and its runs' mean dev scores."""

    lines = ["| arm | knobs swept | chosen | dev objective inputs (mean over seeds) |", "|---|---|---|---|"]
    for arm, info in arms.items():
        chosen = ", ".join(f"{k} {v:.3g}" for k, v in info["params"].items()) or "—"
        dev = ", ".join(f"{k[4:]} {v:.3f}" for k, v in info["dev"].items()
                        if k != "dev_gap" and k.endswith(("_low", "_mean"))) or "—"
        lines.append(f"| {info['label']} | {', '.join(ARMS[arm].knobs) or '—'} | {chosen} | {dev} |")
    return lines


def teacher_label(results: dict, teacher: str) -> str:
    """The task-trained teacher by what it is rather than by its model folder."""
    task = results.get("teacher_choice", {}).get("task_trained")
    return TASK_TRAINED if task and teacher == task["model"] else f"`{teacher}`"


def group_changes(comparison: dict) -> dict[str, float]:
    return {group: r["other"] - r["baseline"] for group, r in comparison["r1"].items()}


def group_cells(comparison: dict) -> str:
    """'high 0.812 → 0.790 | low 0.104 → 0.215': each group's R@1 under the baseline teacher, then the other."""
    return " | ".join(f"{group} {r['baseline']:.3f} → {r['other']:.3f}" for group, r in comparison["r1"].items())


def choice_markdown(results: dict) -> list[str]:
    """The choice runs on the test sets: each candidate teacher's MSE student against the baseline's."""
    comparison = results["teacher_choice"].get("vs_baseline", {})
    rows = [f"| {name} | {teacher_label(results, teacher)} | {gap} | {g['baseline']:.3f} | {g['other']:.3f} | "
            f"{g['other'] - g['baseline']:+.3f} {fmt_interval(g['change_ci95'])} | {group_cells(g)} |"
            for name, teachers in comparison.items() for teacher, gaps in teachers.items() for gap, g in gaps.items()]
    if not rows:
        return []
    baseline = results["teacher"]
    return [(f"The choice runs on the test sets: the same MSE run (default knobs, first seed) distilled from "
             f"each candidate, its absolute gap against the one distilled from `{baseline}`, with the paired "
             "95% interval of the change (negative: that teacher narrows the gap), and each group's R@1 under "
             "both: a gap also narrows when the higher group falls."), "",
            f"| test set | teacher | gap | with `{baseline}` | with it | change [95% CI] | higher group R@1 | lower group R@1 |",
            "|---|---|---|---|---|---|---|---|",
            *rows, ""]


def curves_markdown(results: dict) -> list[str]:
    if "curves" not in results:
        return []
    lines = ["## How the gap moves with training length", "",
             (f"One longer run per arm (the {teacher_label(results, results['curve_teacher'])} teacher, the arm's "
              f"swept knobs, seed {results['curve_seed']}), its test sets evaluated at each kept checkpoint (0 pairs: "
              "the undistilled student): absolute gap [95% image-bootstrap interval], then each group's mean R@1. "
              "![Gap vs pairs seen](gap_vs_pairs.png)"), ""]
    for name, arms in results["curves"].items():
        gaps, groups = list(results["tests"][name]["gaps"]), list(results["tests"][name]["groups"])
        lines += [f"### {name} ({results['tests'][name]['protocol']})", "",
                  "| arm | pairs seen | " + " | ".join(gaps) + " | " + " | ".join(f"R@1 {g}" for g in groups) + " |",
                  "|---|---|" + "---|" * (len(gaps) + len(groups))]
        for arm, points in arms.items():
            for point in points:
                cells = [f"{point['gaps'][g]['value']:.3f} {fmt_interval(point['gaps'][g]['ci95'], sign=False)}"
                         for g in gaps] + [f"{point['r1'][g]:.3f}" if g in point["r1"] else "—" for g in groups]
                lines.append(f"| {arm_label(arm)} | {point['pairs']:,} | {' | '.join(cells)} |")
        lines.append("")
    return lines


VERDICT = {"smaller": "narrows", "larger": "widens", "unclear": "no clear change"}


def holds(before: list[float], after: list[float]) -> str:
    """Whether a conclusion holds in two settings: both 95% intervals exclude 0 on the same side."""
    first, second = clear(before), clear(after)
    return (f"yes: {VERDICT[first]}" if first == second != "unclear" else
            "neither clear" if first == second else f"no: {VERDICT[first]} → {VERDICT[second]}")


def change_of(arms: dict, arm: str, against: str, gap: str) -> tuple[float, list[float]]:
    """``arm``'s absolute gap minus ``against``'s in one test summary, and the interval of that change."""
    entry = arms[arm]["gaps"][gap]["abs"]
    return entry["value"] - arms[against]["gaps"][gap]["abs"]["value"], entry["diff_ci95"][against]


def teacher_part(results: dict, teacher: str) -> dict:
    """The part of ``results`` that summarizes ``teacher``'s runs: the chosen teacher's, else the baseline's."""
    chosen = results.get("chosen_teacher", {})
    return chosen if chosen.get("teacher") == teacher else results


KNOBS_USED = {"check": "the check's (rerun)", "first": "its first (the check found no better)"}


def tuned_markdown(results: dict) -> list[str]:
    """The answer's comparisons at each arm's first knobs and at the tuning check's, and whether each
    holds at both."""
    tuned = results.get("tuned")
    if not tuned:
        return []
    first = teacher_part(results, tuned["teacher"])
    knobs = "; ".join(f"{arm_label(arm)}: {KNOBS_USED[k]}" for arm, k in tuned["knobs"].items())
    lines = ["## The answer at the tuning check's knobs", "",
             (f"Each change of an absolute gap that the answer states, under the {teacher_label(results, tuned['teacher'])} "
              "teacher: with every arm's first knobs (the equal sweeps above) and with the best knobs each arm "
              f"has after the tuning check ({knobs}). Intervals over images and seeds. A conclusion holds at both "
              "when both intervals exclude 0 on the same side. Negative: the first arm's gap is smaller.")]
    if tuned["pending"]:
        lines += ["", "Not in yet (check or reruns to come): " + ", ".join(arm_label(a) for a in tuned["pending"]) + "."]
    lines.append("")
    for name, test in tuned["tests"].items():
        arms, before = test["arms"], first["tests"][name]["arms"]
        rows = []
        for arm, against in comparisons(arms):
            for gap in test["gaps"]:
                (was, was_ci), (now, now_ci) = change_of(before, arm, against, gap), change_of(arms, arm, against, gap)
                rows.append(f"| {gap} | {arm_label(arm)} − {arm_label(against)} | {was:+.3f} {fmt_interval(was_ci)} | "
                            f"{now:+.3f} {fmt_interval(now_ci)} | {holds(was_ci, now_ci)} |")
        if rows:
            lines += [f"### {name} ({test['protocol']})", "",
                      "| gap | change | first knobs | check's knobs | holds at both |", "|---|---|---|---|---|",
                      *rows, ""]
    return lines


def length_markdown(results: dict, cfg: ExperimentConfig) -> list[str]:
    """The answer's comparisons at the arms' length and at the curves' length, and whether each holds at both."""
    found = results.get("at_curve_length", {})
    if not found:
        return []
    short = teacher_part(results, results["curve_teacher"])
    first = next(iter(found.values()))
    lines = [f"## The answer at {cfg.distill.steps} and at {first['step']:,} steps", "",
             (f"Each change of an absolute gap that the answer states, under the "
              f"{teacher_label(results, results['curve_teacher'])} teacher: at the arms' length ({cfg.distill.steps} "
              f"steps, seeds {', '.join(map(str, cfg.seeds))}; intervals over images and seeds) and at the curves' "
              f"length ({first['step']:,} steps, seed {first['seed']}; intervals over images only). A conclusion "
              "holds at both when both intervals exclude 0 on the same side. Negative: the first arm's gap is "
              "smaller."), ""]
    for name, at_length in found.items():
        arms = short["tests"][name]["arms"]
        lines += [f"### {name} ({results['tests'][name]['protocol']})", "",
                  f"| gap | change | {cfg.distill.steps} steps | {at_length['step']:,} steps | holds at both |",
                  "|---|---|---|---|---|"]
        for gap, changes in at_length["gaps"].items():
            for arm, against in comparisons(arms):
                if f"{arm}/{against}" not in changes:
                    continue
                long = changes[f"{arm}/{against}"]
                change, interval = change_of(arms, arm, against, gap)
                lines.append(f"| {gap} | {arm_label(arm)} − {arm_label(against)} | {change:+.3f} {fmt_interval(interval)} | "
                             f"{long['change']:+.3f} {fmt_interval(long['ci95'])} | {holds(interval, long['ci95'])} |")
        lines.append("")
    return lines


def fmt_interval(interval, sign: bool = True, digits: int = 3) -> str:
    if interval is None:
        return "—"
    lo, hi = interval
    spec = f"+.{digits}f" if sign else f".{digits}f"
    return f"[{lo:{spec}}, {hi:{spec}}]"


def plot_results(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tests = {name: t for name, t in results["tests"].items() if t["arms"]}
    if not tests:
        return
    fig, axes = plt.subplots(len(tests), 1, figsize=(12, 3.2 * len(tests)), squeeze=False)
    for ax, (name, test) in zip(axes[:, 0], tests.items()):
        arms = test["arms"]
        langs = list(next(iter(arms.values()))["languages"])
        width = 0.8 / len(arms)
        for i, (arm, summary) in enumerate(arms.items()):
            ax.bar(np.arange(len(langs)) + i * width, [summary["languages"][lang]["R@1"] for lang in langs], width,
                   yerr=[summary["languages"][lang]["R@1_sd"] for lang in langs], capsize=1.5, label=arm_label(arm))
        ax.set_xticks(np.arange(len(langs)) + 0.4 - width / 2, langs)
        ax.set_ylim(0, 1)
        ax.set_ylabel("R@1")
        ax.set_title(f"{name} ({test['protocol']}); error bars: seed sd", fontsize=10)
    axes[0, 0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(out / "r1_by_arm.png", dpi=110)
    plt.close(fig)

    panels = [(name, gap) for name, test in tests.items() for gap in test["gaps"]]
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels) + 1, 3.8), squeeze=False, sharey=True)
    for ax, (name, gap) in zip(axes[0], panels):
        arms = tests[name]["arms"]
        values = [s["gaps"][gap]["abs"]["value"] for s in arms.values()]
        errors = np.array([[v - s["gaps"][gap]["abs"]["ci95"][0], s["gaps"][gap]["abs"]["ci95"][1] - v]
                           for v, s in zip(values, arms.values())]).T
        ax.bar(np.arange(len(arms)), values, yerr=errors, capsize=3, color=[f"C{i}" for i in range(len(arms))])
        ax.set_xticks(np.arange(len(arms)), [arm_label(a) for a in arms], rotation=60, ha="right", fontsize=7)
        ax.set_title(f"{name}\n{gap}", fontsize=8)
        ax.axhline(0, color="k", lw=0.5)
    axes[0, 0].set_ylabel("absolute R@1 gap, 95% CI")
    fig.tight_layout()
    fig.savefig(out / "gap_by_arm.png", dpi=110)
    plt.close(fig)

    curves = {name: arms for name, arms in results.get("curves", {}).items() if any(arms.values())}
    panels = [(name, gap) for name, arms in curves.items() for gap in results["tests"][name]["gaps"]]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(2.8 * len(panels) + 1, 3.4), squeeze=False, sharey=True)
    for ax, (name, gap) in zip(axes[0], panels):
        for i, (arm, points) in enumerate(curves[name].items()):
            pairs = [p["pairs"] for p in points]
            ax.plot(pairs, [p["gaps"][gap]["value"] for p in points], marker="o", ms=3, color=f"C{i}", label=arm_label(arm))
            ax.fill_between(pairs, *zip(*[p["gaps"][gap]["ci95"] for p in points]), color=f"C{i}", alpha=0.2)
        ax.set_title(f"{name}\n{gap}", fontsize=8)
        ax.set_xlabel("pairs seen", fontsize=8)
    axes[0, 0].set_ylabel("absolute R@1 gap, 95% CI")
    axes[0, -1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(out / "gap_vs_pairs.png", dpi=110)
    plt.close(fig)
