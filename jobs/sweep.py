"""Entrypoint for `ray job submit`: a Ray Tune sweep of ε and τ.

    ray job submit --working-dir . -- python jobs/sweep.py --config configs/sweep.yaml

Same flags as `optical-ray tune`; inside a job, Ray connects to the job's cluster.
"""

import sys

from optical_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
