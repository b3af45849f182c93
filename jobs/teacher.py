"""Entrypoint for `ray job submit`: a task-trained English teacher on Ray Train.

    ray job submit --working-dir . -- python jobs/teacher.py --config configs/teacher.yaml

Same flags as `optical-ray teacher`; inside a job, Ray connects to the job's cluster.
"""

import sys

from optical_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["teacher", *sys.argv[1:]]))
