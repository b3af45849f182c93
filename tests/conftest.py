"""Shared fixtures: the shared data, tiny random encoders with the real XLM-R tokenizer, and a real
S3 endpoint (moto's server on 127.0.0.1)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The serving tests' API key reaches the replicas the way a deployment's should: through the
# environment of the Ray processes, not a runtime_env (which Ray logs).
TEST_API_KEY_ENV, TEST_API_KEY = "OPTICAL_RAY_TEST_API_KEY", "test-key-7d1f0c"
SHARED_DATA = Path(os.environ.get("OPTICAL_RAY_SHARED_DATA", REPO.parent / "shared" / "data" / "flickr30k-ml"))

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Read by Ray when it is imported: set before any test module imports it. The second keeps Ray's
# node address on loopback; auth is off for this loopback-only test cluster.
os.environ.update(RAY_USAGE_STATS_ENABLED="0", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled",
                  PYTHONPATH=str(REPO))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "multi30k_task1_train.parquet").is_file():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def student_init_dir() -> Path:
    from optical_ray.models import student_init_path

    return student_init_path()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, student_init_dir) -> Path:
    """A 2-layer, 32-wide random BERT with the real XLM-R tokenizer and E5's prompts."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", student_init_dir, seed=0)


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory, student_init_dir) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-teacher") / "model", student_init_dir, seed=1)


def make_tiny_model(path: Path, tokenizer_dir: Path, seed: int) -> Path:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from optical_ray.models import E5_PROMPTS, Encoder

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id)
    Encoder(BertModel(config, add_pooling_layer=False), tokenizer, prompts=E5_PROMPTS, max_length=32).save(path)
    return path


@pytest.fixture(scope="session")
def s3():
    """A real S3 endpoint on loopback; AWS_* variables point the standard configuration at it."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per S3 request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_ENDPOINT_URL")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_REGION="us-east-1",
                      AWS_ENDPOINT_URL=endpoint)
    client = boto3.client("s3")
    client.create_bucket(Bucket="optical-ray-test")
    yield {"endpoint": endpoint, "client": client, "bucket": "optical-ray-test"}
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster(s3, tmp_path_factory):
    """One local Ray head on 127.0.0.1 for the whole session (`ray start --head --block`), shared by
    the Train, Tune, Jobs and Serve tests. Started after the S3 fixture so its processes inherit the
    AWS_* variables that point at moto. Stopped by signalling that `ray start` alone, so any other
    Ray on the machine is left running (`ray stop` would end them all)."""
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    import ray

    # Every port chosen here, none of Ray's defaults: another Ray on the machine (a long experiment
    # in the background, say) already holds them, and its job agent would then be unreachable.
    port, dashboard_port, metrics_port, agent_port = free_port(), free_port(), free_port(), free_port()
    ray_bin = str(Path(sys.executable).with_name("ray"))
    temp_dir = tmp_path_factory.mktemp("ray")
    log_path = temp_dir / "ray-start.log"
    with open(log_path, "w") as log:
        env = dict(os.environ, **{TEST_API_KEY_ENV: TEST_API_KEY})
        head = subprocess.Popen(
            [ray_bin, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
             f"--object-store-memory={512 * 1024 ** 2}", f"--temp-dir={temp_dir}", "--disable-usage-stats",
             f"--metrics-export-port={metrics_port}", f"--dashboard-agent-listen-port={agent_port}"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    deadline = time.time() + 180
    while True:
        try:
            urllib.request.urlopen(f"{dashboard}/api/version", timeout=5)
            break
        except OSError:
            if head.poll() is not None or time.time() > deadline:
                head.kill()
                pytest.fail(f"ray start failed: {log_path.read_text()[-2000:]}")
            time.sleep(1)
    address = f"127.0.0.1:{port}"
    ray.init(address=address, log_to_driver=False)
    yield {"address": address, "dashboard": dashboard, "temp_dir": temp_dir,
           "metrics": f"http://127.0.0.1:{metrics_port}/metrics"}
    ray.shutdown()
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
