"""The experiment's statistics, from run records: per-language R@k, gaps and their intervals.

R@1 per language is the mean over training seeds of the mean over queries; the seed spread is the
standard deviation of the per-seed value. Intervals are 95% percentile bootstraps at two levels
(hierarchical): each resample draws the test set's **images** with replacement -- one draw for every
language, seed and arm, so queries describing the same picture move together and a difference between
two arms is paired on images -- and, independently for each arm, its **training seeds** with
replacement, so the spread between training runs is in every interval. The image-only intervals are
kept beside them (``*_images``) to show which conclusions survive seed variance, and each change has a
bootstrap p-value for Holm's correction within its family of comparisons (:func:`families`). Two gaps
are reported: the absolute R@1 gap (mean R@1 of the higher group minus the lower; the answer uses this
one) and the relative error-rate gap ((1 - R@1 low) / (1 - R@1 high): how many times more often the
lower group misses).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from statsmodels.stats.multitest import multipletests

from .. import metrics
from ..metrics import unpack_ranks

GAP_KINDS = {"abs": metrics.resource_gap, "rel": metrics.relative_error_gap}
ALPHA = 0.05  # the family-wise error rate Holm's correction holds
TUNED = "@check"  # the suffix of a family at the tuning check's knobs (results["tuned"])


@dataclass
class GapDraws:
    """Bootstrap draws of each gap ("gap/kind") of one arm: over images and seeds, and over images only;
    ``recall``: each language's R@1 draws over images and seeds."""

    with_seeds: dict[str, np.ndarray]
    images_only: dict[str, np.ndarray]
    recall: dict[str, np.ndarray]

    def change(self, baseline: GapDraws, key: str, estimate: float) -> dict:
        """The intervals and p-value of this arm's gap minus ``baseline``'s (``estimate``: that change)."""
        diff = self.with_seeds[key] - baseline.with_seeds[key]
        return {"ci95": list(metrics.percentile_interval(diff)),
                "ci95_images": list(metrics.percentile_interval(self.images_only[key] - baseline.images_only[key])),
                "p": metrics.bootstrap_p(estimate, diff)}


def image_draws(test, n_resamples: int) -> tuple[np.ndarray, dict[str, np.ndarray], int]:
    """The test set's bootstrap weights over its images (seed 0: the same draw in every summary, so
    any two summaries of one test set are paired) and each language's query -> image index."""
    images = np.unique(np.concatenate(list(test.query_images.values())))
    query_index = {lang: np.searchsorted(images, ids) for lang, ids in test.query_images.items()}
    return metrics.image_resamples(len(images), n_resamples, seed=0), query_index, len(images)


def summarize_test(test, records: list[dict], arms: list[str], n_resamples: int) -> dict:
    """Per arm: R@k per language (seed mean and spread) and every gap with its interval and its paired
    interval against every other arm."""
    spec = test.spec
    weights, query_index, n_images = image_draws(test, n_resamples)
    out: dict = {"protocol": spec.protocol, "groups": spec.groups, "gaps": spec.gaps, "n_images": n_images,
                 "arms": {}}
    draws: dict[str, GapDraws] = {}
    for arm in arms:
        runs = [r for r in records if r["arm"] == arm and spec.name in r["tests"]]
        if runs:
            out["arms"][arm], draws[arm] = arm_summary(spec, runs, weights, query_index)
    for arm, summary in out["arms"].items():
        for gap, entry in summary["gaps"].items():
            for kind in GAP_KINDS:
                changes = {other: draws[arm].change(draws[other], f"{gap}/{kind}",
                                                    entry[kind]["value"] - out["arms"][other]["gaps"][gap][kind]["value"])
                           for other in out["arms"] if other != arm}
                entry[kind]["diff_ci95"] = {other: c["ci95"] for other, c in changes.items()}
                entry[kind]["diff_ci95_images"] = {other: c["ci95_images"] for other, c in changes.items()}
                entry[kind]["diff_p"] = {other: c["p"] for other, c in changes.items()}
    return out


def arm_summary(spec, runs: list[dict], weights: np.ndarray, query_index: dict[str, np.ndarray]
                ) -> tuple[dict, GapDraws]:
    """One arm's runs (its seeds) on one test set: (summary, bootstrap draws of every gap). The seeds
    are drawn by a key naming the arm and its teacher: the same runs get the same seed draws in every
    summary, other arms independent ones."""
    ranks = {lang: np.stack([unpack_ranks(r["tests"][spec.name][lang]) for r in runs]) for lang in spec.query_langs}
    seed_weights = metrics.seed_resamples(len(runs), len(weights), f"{runs[0].get('arm', '')}/{runs[0].get('teacher', '')}")
    recall_draws = {lang: metrics.weighted_recall(r <= 1, query_index[lang], weights, seed_weights)
                    for lang, r in ranks.items()}
    image_only = {lang: metrics.weighted_recall(r <= 1, query_index[lang], weights) for lang, r in ranks.items()}
    per_seed = {lang: (r <= 1).mean(axis=1) for lang, r in ranks.items()}
    languages = {lang: {"R@1": float(per_seed[lang].mean()), "R@1_sd": sd(per_seed[lang]),
                        **{f"R@{k}": float((r <= k).mean()) for k in (5, 10)},
                        "MRR": float((1.0 / r).mean()), "n_queries": int(r.shape[1])}
                 for lang, r in ranks.items()}
    gaps, draws = {}, GapDraws({}, {}, recall_draws)
    for gap, (upper, lower) in spec.gaps.items():
        hi = [lang for lang in spec.groups[upper] if lang in ranks]
        lo = [lang for lang in spec.groups[lower] if lang in ranks]
        gaps[gap] = {"upper": hi, "lower": lo}
        for kind, fn in GAP_KINDS.items():
            seeds = fn(per_seed, hi, lo)
            key = f"{gap}/{kind}"
            draws.with_seeds[key], draws.images_only[key] = fn(recall_draws, hi, lo), fn(image_only, hi, lo)
            gaps[gap][kind] = {"value": float(fn({k: v.mean() for k, v in per_seed.items()}, hi, lo)),
                               "ci95": list(metrics.percentile_interval(draws.with_seeds[key])),
                               "ci95_images": list(metrics.percentile_interval(draws.images_only[key])),
                               "seed_mean": float(np.mean(seeds)), "seed_sd": sd(np.atleast_1d(seeds))}
    return {"seeds": [r["seed"] for r in runs], "languages": languages, "gaps": gaps}, draws


def compare_teachers(test, baseline: list[dict], other: list[dict], arms: list[str], n_resamples: int) -> dict:
    """Per arm and gap: the absolute gap under the baseline teacher and under the other, the 95% interval
    of the change (other - baseline; paired on images, each teacher's seeds drawn independently) and
    each group's R@1 under both (a gap can also close because the higher group falls). Only the seeds
    both teachers have runs of (while the other teacher's runs land, the baseline's same seeds)."""
    spec = test.spec
    weights, query_index, _ = image_draws(test, n_resamples)
    out = {}
    for arm in arms:
        base_runs, other_runs = ([r for r in records if r["arm"] == arm and spec.name in r["tests"]]
                                 for records in (baseline, other))
        seeds = sorted({r["seed"] for r in base_runs} & {r["seed"] for r in other_runs})
        base_runs, other_runs = ([r for r in runs if r["seed"] in seeds] for runs in (base_runs, other_runs))
        if not seeds:
            continue
        (base, base_draws), (new, new_draws) = (arm_summary(spec, runs, weights, query_index)
                                                for runs in (base_runs, other_runs))
        changes = {gap: new_draws.change(base_draws, f"{gap}/abs",
                                         new["gaps"][gap]["abs"]["value"] - base["gaps"][gap]["abs"]["value"])
                   for gap in spec.gaps}
        out[arm] = {gap: {"baseline": base["gaps"][gap]["abs"]["value"], "other": new["gaps"][gap]["abs"]["value"],
                          "change_ci95": changes[gap]["ci95"], "change_ci95_images": changes[gap]["ci95_images"],
                          "change_p": changes[gap]["p"],
                          "r1": {group: {"baseline": group_r1(base, base["gaps"][gap][side]),
                                         "other": group_r1(new, base["gaps"][gap][side])}
                                 for group, side in zip(spec.gaps[gap], ("upper", "lower"))},
                          "seeds": seeds}
                    for gap in spec.gaps}
    return out


def choice_comparison(tests, choice_runs: dict[str, dict], baseline: str, n_resamples: int) -> dict:
    """Per test set, candidate and gap: the choice run's gap under the baseline teacher and under this
    candidate, with the paired interval of the change. Nothing else differs between choice runs, so this
    is the teacher's own effect (one seed, default knobs)."""
    if baseline not in choice_runs:
        return {}
    return {t.spec.name: {teacher: compare_teachers(t, [choice_runs[baseline]], [run], ["mse"], n_resamples).get("mse", {})
                          for teacher, run in choice_runs.items() if teacher != baseline} for t in tests}


def summarize_curves(test, curves: list[dict], n_resamples: int, start: dict | None = None) -> dict:
    """Per curve (arm): each evaluated checkpoint's pairs seen, absolute gaps with 95% intervals and each
    group's R@1. ``start``, the undistilled student's record, is every curve's point at 0 pairs."""
    spec = test.spec
    weights, query_index, _ = image_draws(test, n_resamples)
    out = {}
    for curve in curves:
        evaluated = {int(step): tests for step, tests in curve["points"].items() if spec.name in tests}
        if evaluated and start is not None and spec.name in start["tests"]:
            evaluated[0] = start["tests"]
        points = []
        for step, tests in sorted(evaluated.items()):
            summary, _ = arm_summary(spec, [{"seed": curve["seed"], "tests": tests}], weights, query_index)
            points.append({"step": step, "pairs": step * curve["batch_size"],
                           "gaps": {gap: {"value": g["abs"]["value"], "ci95": g["abs"]["ci95"]}
                                    for gap, g in summary["gaps"].items()},
                           "r1": {group: group_r1(summary, present) for group, langs in spec.groups.items()
                                  if (present := [lang for lang in langs if lang in summary["languages"]])}})
        out[curve["arm"]] = points
    return out


# Besides every arm against no distillation, the comparisons the answer draws between arms: what OT adds
# to contrastive, and the best-tuned combination against the baseline method (MSE); each its own family
# of Holm's correction, named here.
ARM_COMPARISONS = {("ot+contrastive", "contrastive"): "ot_added", ("ot+contrastive", "mse"): "ot_contrastive_vs_mse"}


def comparisons(arms) -> list[tuple[str, str]]:
    """(arm, against) pairs stated in the answer among ``arms``: each trained arm against ``none``,
    then :data:`ARM_COMPARISONS` where both arms are there."""
    return ([(arm, "none") for arm in arms if arm != "none"]
            + [(arm, other) for arm, other in ARM_COMPARISONS if arm in arms and other in arms])


def curve_changes(test, curves: list[dict], start: dict, n_resamples: int) -> dict:
    """The answer's comparisons at the curves' last step: per gap and (arm, against), the change of the
    absolute gap with its 95% interval over images (paired; one seed per curve, so no seed level).
    ``start``, the undistilled student's record, is ``none``. Only curves that reached the last step."""
    spec = test.spec
    if spec.name not in start["tests"]:
        return {}
    weights, query_index, _ = image_draws(test, n_resamples)
    last = max((int(step) for c in curves for step, tests in c["points"].items() if spec.name in tests), default=0)
    at_last = {"none": start} | {c["arm"]: {"seed": c["seed"], "tests": c["points"][str(last)]} for c in curves
                                 if spec.name in c["points"].get(str(last), {})}
    if len(at_last) < 2:
        return {}
    summaries = {arm: arm_summary(spec, [record], weights, query_index) for arm, record in at_last.items()}
    out: dict = {"step": last, "seed": curves[0]["seed"], "gaps": {gap: {} for gap in spec.gaps}}
    for gap, changes in out["gaps"].items():
        for arm, against in comparisons(at_last):
            (mine, my_draws), (theirs, their_draws) = summaries[arm], summaries[against]
            change = mine["gaps"][gap]["abs"]["value"] - theirs["gaps"][gap]["abs"]["value"]
            changes[f"{arm}/{against}"] = {"change": change,
                                           "ci95": my_draws.change(their_draws, f"{gap}/abs", change)["ci95"]}
    return out


def group_r1(summary: dict, langs: list[str]) -> float:
    """Mean R@1 of a language group in one arm's summary."""
    return float(np.mean([summary["languages"][lang]["R@1"] for lang in langs]))


def mean_dev(records: list[dict]) -> dict:
    keys = sorted({k for r in records for k in r.get("dev", {})})
    return {k: float(np.mean([r["dev"][k] for r in records if k in r.get("dev", {})])) for k in keys}


def sd(values: np.ndarray) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def group_r1_changes(test, records: list[dict], arm: str, other: str, n_resamples: int) -> dict:
    """Per language group of the test set: mean R@1 of ``arm`` minus that of ``other`` (runs of one
    teacher), with its 95% interval over images (paired) and each arm's seeds. {} unless both have runs."""
    spec = test.spec
    weights, query_index, _ = image_draws(test, n_resamples)
    parts = []
    for name in (arm, other):
        runs = [r for r in records if r["arm"] == name and spec.name in r["tests"]]
        if not runs:
            return {}
        parts.append(arm_summary(spec, runs, weights, query_index))
    (mine, my_draws), (theirs, their_draws) = parts
    out = {}
    for group, langs in spec.groups.items():
        present = [lang for lang in langs if lang in mine["languages"]]
        if present:
            diff = (np.mean([my_draws.recall[lang] for lang in present], axis=0)
                    - np.mean([their_draws.recall[lang] for lang in present], axis=0))
            out[group] = {"langs": present, "change": group_r1(mine, present) - group_r1(theirs, present),
                          "ci95": list(metrics.percentile_interval(diff))}
    return out


def clear(interval: list[float]) -> str:
    """'smaller' / 'larger' when the 95% interval of a difference excludes 0, else 'unclear'."""
    lo, hi = interval
    return "smaller" if hi < 0 else "larger" if lo > 0 else "unclear"


def families(results: dict) -> dict[str, list[dict]]:
    """Every reported change of an absolute gap, grouped into the families the report draws its
    conclusions from, with Holm's correction (statsmodels) within each family: per teacher, every arm
    against no distillation (``vs_none``) and each of :data:`ARM_COMPARISONS` (named there), and the same
    again at the tuning check's knobs (the kind suffixed with :data:`TUNED`); and each arm under the
    chosen teacher against the baseline teacher (``teacher``). Each change says whether
    its interval excludes 0 over images alone, over images and seeds, and after Holm."""
    out: dict[str, list[dict]] = {}
    parts = [(results["teacher"], results, "")]
    if "chosen_teacher" in results:
        parts.append((results["chosen_teacher"]["teacher"], results["chosen_teacher"], ""))
    if "tuned" in results:
        parts.append((results["tuned"]["teacher"], results["tuned"], TUNED))
    for teacher, part, knobs in parts:
        kinds = [f"{kind}{knobs}" for kind in ("vs_none", *ARM_COMPARISONS.values())]
        found: dict[str, list[dict]] = {kind: [] for kind in kinds}
        for name, test in part["tests"].items():
            arms = test["arms"]
            for arm, against in comparisons(arms):
                kind = ("vs_none" if against == "none" else ARM_COMPARISONS[(arm, against)]) + knobs
                for gap, entry in arms[arm]["gaps"].items():
                    g = entry["abs"]
                    if against in g["diff_p"]:
                        found[kind].append({"test": name, "gap": gap, "arm": arm, "against": against,
                                            "change": g["value"] - arms[against]["gaps"][gap]["abs"]["value"],
                                            "ci95": g["diff_ci95"][against], "ci95_images": g["diff_ci95_images"][against],
                                            "p": g["diff_p"][against]})
        out.update({f"{kind}/{teacher}": found[kind] for kind in kinds})
    if "chosen_teacher" in results:
        out["teacher"] = [{"test": name, "gap": gap, "arm": arm, "against": results["teacher"],
                           "change": g["other"] - g["baseline"], "ci95": g["change_ci95"],
                           "ci95_images": g["change_ci95_images"], "p": g["change_p"]}
                          for name, arms in results["chosen_teacher"]["vs_baseline"].items()
                          for arm, gaps in arms.items() for gap, g in gaps.items()]
    for family in out.values():
        if family:
            adjusted = multipletests([c["p"] for c in family], alpha=ALPHA, method="holm")[1]
            for c, p in zip(family, adjusted):
                c.update(p_holm=float(p), clear_images=clear(c["ci95_images"]), clear_seeds=clear(c["ci95"]),
                         clear_holm=("smaller" if c["change"] < 0 else "larger") if p < ALPHA else "unclear")
    return {name: family for name, family in out.items() if family}
