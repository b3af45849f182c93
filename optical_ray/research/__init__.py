"""The research harness: does contrastive + OT distillation narrow the R@1 gap between high- and
low-resource languages? One concept a module:

* :mod:`~optical_ray.research.plan` -- the arms and each run's config and record key;
* :mod:`~optical_ray.research.runner` -- runs (or finds recorded) sweeps, runs, the task teacher and
  the curves, and writes each finished one as a record;
* :mod:`~optical_ray.research.stats` -- intervals and comparisons from the records;
* :mod:`~optical_ray.research.report` -- results.json, RESULTS.md and the plots.

``optical-ray experiment`` calls :func:`optical_ray.research.runner.run_experiment`.
"""
