"""Entrypoint for `ray job submit`: encode a corpus with Ray Data and build its FAISS index.

    ray job submit --working-dir . -- python jobs/build_index.py --model s3://bucket/students/x \\
        --data s3://bucket/captions/ --out s3://bucket/indexes/x --factory HNSW32

Same flags as `optical-ray index`; inside a job, Ray connects to the job's cluster.
"""

import sys

from optical_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["index", *sys.argv[1:]]))
