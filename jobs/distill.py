"""Entrypoint for `ray job submit`: distillation on Ray Train.

    ray job submit --working-dir . -- python jobs/distill.py --config configs/distill.yaml

Same flags as `optical-ray train`; inside a job, Ray connects to the job's cluster.
"""

import sys

from optical_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
