"""Shared fixtures: the shared data, tiny random encoders with the real XLM-R tokenizer, and a real
S3 endpoint (moto's server on 127.0.0.1)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The serving tests' client key: the secure app holds only its SHA-256, in a key file (never in a
# runtime_env, which Ray logs).
TEST_API_KEY = "test-key-7d1f0c"
SHARED_DATA = Path(os.environ.get("OPTICAL_RAY_SHARED_DATA", REPO.parent / "shared" / "data" / "flickr30k-ml"))

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Read by Ray when it is imported: set before any test module imports it. The second keeps Ray's
# node address on loopback; auth is off for this loopback-only test cluster.
# No PYTHONPATH: Ray's workers import optical_ray (and its service) from the installed package, as on a cluster.
os.environ.update(RAY_USAGE_STATS_ENABLED="0", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "multi30k_task1_train.parquet").is_file():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def student_init_dir() -> Path:
    from optical_ray.model_store import student_init_path

    return student_init_path()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, student_init_dir) -> Path:
    """A 2-layer, 32-wide random BERT with the real XLM-R tokenizer and E5's prompts."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", student_init_dir, seed=0)


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory, student_init_dir) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-teacher") / "model", student_init_dir, seed=1)


@pytest.fixture(scope="session")
def cls_teacher_dir(tmp_path_factory, student_init_dir) -> Path:
    """A tiny CLS-pooled teacher of another width (24-d states) with a Dense layer to 16-d embeddings."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from optical_ray.encoder import Encoder

    torch.manual_seed(3)
    tokenizer = AutoTokenizer.from_pretrained(student_init_dir)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id)
    dense = torch.nn.Sequential(torch.nn.Linear(24, 16), torch.nn.Tanh())
    path = tmp_path_factory.mktemp("cls-teacher") / "model"
    Encoder(BertModel(config, add_pooling_layer=False), tokenizer, max_length=32, pooling="cls", dense=[dense]).save(path)
    return path


def make_tiny_model(path: Path, tokenizer_dir: Path, seed: int) -> Path:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from optical_ray.encoder import Encoder
    from optical_ray.model_store import E5_PROMPTS

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


@pytest.fixture(scope="session")
def s3_bitext(s3):
    """German and Quechua bitext from the sample tables, as prepared shards at s3://BUCKET/bitext."""
    from optical_ray.config import SAMPLE_DIR
    from optical_ray.data import bitext_pairs, read_captions, write_bitext_shards

    pairs, _ = bitext_pairs(read_captions(str(SAMPLE_DIR / "train_captions.parquet")), ["de", "qu"])
    write_bitext_shards(pairs, f"s3://{s3['bucket']}/bitext", rows_per_shard=1000)
    return pairs


def wait_until(condition: Callable, timeout: float, failure: str | Callable[[], str], every: float = 1.0):
    """Poll ``condition()`` until it returns something truthy and return that. After ``timeout``
    seconds fail with ``failure``: a message, or a callable that builds one (so logs are read only
    on failure). A condition may itself assert, to fail early (a process that died)."""
    deadline = time.time() + timeout
    while not (value := condition()):
        if time.time() > deadline:
            raise AssertionError(failure() if callable(failure) else failure)
        time.sleep(every)
    return value


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
    import urllib.request

    import ray

    # Every port chosen here, none of Ray's defaults: another Ray on the machine (a long experiment
    # in the background, say) already holds them, and its job agent would then be unreachable.
    port, dashboard_port, metrics_port, agent_port = free_port(), free_port(), free_port(), free_port()
    ray_bin = str(Path(sys.executable).with_name("ray"))
    temp_dir = tmp_path_factory.mktemp("ray")
    log_path = temp_dir / "ray-start.log"
    with open(log_path, "w") as log:
        head = subprocess.Popen(
            [ray_bin, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
             f"--object-store-memory={512 * 1024 ** 2}", f"--temp-dir={temp_dir}", "--disable-usage-stats",
             f"--metrics-export-port={metrics_port}", f"--dashboard-agent-listen-port={agent_port}"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    dashboard = f"http://127.0.0.1:{dashboard_port}"

    def dashboard_up() -> bool:
        assert head.poll() is None, f"ray start exited: {log_path.read_text()[-2000:]}"
        try:
            urllib.request.urlopen(f"{dashboard}/api/version", timeout=5)
            return True
        except OSError:
            return False

    try:
        wait_until(dashboard_up, 180, lambda: f"ray start did not come up: {log_path.read_text()[-2000:]}")
    except AssertionError:
        head.kill()
        raise
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


# `ray start` for a worker node on this machine's loopback. `ray start` refuses to join a second node
# while RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (what keeps every Ray process on 127.0.0.1 here), and with
# it at 1 it rewrites 127.0.0.1 -- the head's address and the node's own -- to the machine's network
# address, where the loopback-only head does not listen. So only this launcher process may join a
# cluster and keeps loopback addresses as given; the raylet and workers it starts inherit 0.
JOIN_AS_WORKER_NODE = ("import sys\n"
                       "from ray._private import ray_constants, services\n"
                       "ray_constants.ENABLE_RAY_CLUSTER = True\n"
                       "services.resolve_ip_for_localhost = lambda host: host\n"
                       "from ray.scripts.scripts import main\n"
                       "sys.argv[0] = 'ray'\n"
                       "sys.exit(main())\n")


@pytest.fixture
def worker_nodes(ray_cluster, tmp_path):
    """Starts worker nodes -- separate `ray start` processes joining the session's head on 127.0.0.1,
    each with a ``trainer`` resource so that training lands on them -- and kills them (the node's
    raylet, agents and workers, SIGKILL: a lost machine, not a shutdown). Every node left is killed
    at the end."""
    import signal
    import subprocess
    import sys
    import tempfile

    import ray

    nodes = []

    def live_trainer_nodes() -> set[str]:
        return {n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("trainer")}

    def start(trainer: int = 2) -> subprocess.Popen:
        before = live_trainer_nodes()
        log = open(tmp_path / f"node-{len(nodes)}.log", "w")  # noqa: SIM115 -- the node writes to it while it lives
        low = 20000 + 1000 * len(nodes)  # worker ports apart from the head's (10002-19999)
        node = subprocess.Popen(
            [sys.executable, "-c", JOIN_AS_WORKER_NODE, "start", "--block", f"--address={ray_cluster['address']}", "--node-ip-address=127.0.0.1",
             "--num-cpus=2", f'--resources={{"trainer": {trainer}}}', f"--object-store-memory={256 * 1024 ** 2}",
             "--disable-usage-stats", f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
             f"--metrics-export-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
             f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
             f"--min-worker-port={low}", f"--max-worker-port={low + 999}",
             # Its own folder, as on its own machine: nodes sharing one would clean up each other's
             # runtime_env packages (a job's working_dir vanished under it).
             f"--temp-dir={tempfile.mkdtemp(prefix='ray-node-')}"],  # short: socket paths are at most 107 bytes
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        nodes.append(node)
        log_path = tmp_path / f"node-{len(nodes) - 1}.log"

        def joined() -> set[str]:
            assert node.poll() is None, f"worker node exited: {log_path.read_text()[-2000:]}"
            return live_trainer_nodes() - before

        node.node_id = wait_until(joined, 120, lambda: f"worker node did not join: {log_path.read_text()[-2000:]}").pop()
        address = next(n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == node.node_id)
        assert address == "127.0.0.1", f"the worker node is on {address}, not loopback"
        return node

    def kill(node: subprocess.Popen) -> None:
        os.killpg(node.pid, signal.SIGKILL)
        node.wait()
        # The head notices the missed health checks.
        wait_until(lambda: node.node_id not in live_trainer_nodes(), 120, "the head still lists the killed node")

    yield type("WorkerNodes", (), {"start": staticmethod(start), "kill": staticmethod(kill)})
    for node in nodes:
        if node.poll() is None:
            os.killpg(node.pid, signal.SIGKILL)
            node.wait()

