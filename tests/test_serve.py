"""The retrieval service over real HTTP on 127.0.0.1: indexes built with Ray Data and stored on S3
(moto), the app deployed from serve/config.yaml with `serve deploy`, correct hits, client errors,
the API key, autoscaling up and down, a bounded load test with an index hot-swap, and the search
page in headless Chromium."""

import asyncio
import copy
import functools
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pytest
import yaml
from conftest import TEST_API_KEY as API_KEY
from conftest import TEST_API_KEY_ENV, free_port, wait_until
from ray import serve

from optical_ray.config import SAMPLE_DIR
from optical_ray.corpus_index import build_corpus_index
from optical_ray.index import load_index

REPO = Path(__file__).resolve().parents[1]
TEST_CAPTIONS = str(SAMPLE_DIR / "test_2018_captions.parquet")


@pytest.fixture(scope="module")
def indexes(ray_cluster, s3):
    bucket = s3["bucket"]
    flat = f"s3://{bucket}/index/flat"
    hnsw = f"s3://{bucket}/index/hnsw"
    manifest = build_corpus_index("student-init", [TEST_CAPTIONS], flat, "Flat", query_langs=["de", "qu"], sample_queries=50)
    build_corpus_index("student-init", [TEST_CAPTIONS], hnsw, "HNSW32", query_langs=["de"], sample_queries=50)
    return {"flat": flat, "hnsw": hnsw, "manifest": manifest}


def serve_config(port: int, index_uri: str) -> dict:
    """serve/config.yaml with test sizes: small CPU shares, short autoscaling delays, plus a second
    application that requires an API key."""
    config = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    app = config["applications"][0]
    app["args"]["index_uri"] = index_uri
    app["args"]["auth"] = "none"  # open on purpose (and said so): the tests of the key use "secure"
    for deployment in app["deployments"]:
        deployment["ray_actor_options"] = {"num_cpus": 0.05}
        if deployment["name"] == "Retriever":
            deployment["user_config"]["index_uri"] = index_uri
        if deployment["name"] == "QueryEncoder":
            deployment["autoscaling_config"] = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2,
                                                "upscale_delay_s": 1, "downscale_delay_s": 4, "metrics_interval_s": 0.5,
                                                "look_back_period_s": 2}
    secure = copy.deepcopy(app)
    secure.update(name="secure", route_prefix="/secure")
    secure["args"].update(api_key_env=TEST_API_KEY_ENV, auth="api_key")  # set in the cluster's environment (conftest)
    for deployment in secure["deployments"]:
        deployment.pop("autoscaling_config", None)
        deployment["num_replicas"] = 1
    config["applications"].append(secure)
    return config


def deploy(config: dict, dashboard: str, tmp_path: Path) -> None:
    path = tmp_path / f"serve-{time.time_ns()}.yaml"
    path.write_text(yaml.safe_dump(config))
    serve_bin = str(Path(sys.executable).with_name("serve"))
    subprocess.run([serve_bin, "deploy", str(path), "--address", dashboard], check=True, capture_output=True, timeout=120)


def wait_running(apps=("search", "secure"), timeout=240):
    def running() -> bool:
        status = serve.status().applications
        return all(a in status and status[a].status == "RUNNING" for a in apps)

    wait_until(running, timeout, lambda: f"serve apps not running: {serve.status()}")


def secure_status(service) -> dict:
    """The secured app's /status: requests in flight and the retriever's index, version and swaps."""
    return httpx.get(f"{service['url']}/secure/status", headers={"X-API-Key": API_KEY}).json()


def encoder_replicas() -> int:
    deployment = serve.status().applications["search"].deployments["QueryEncoder"]
    return deployment.replica_states.get("RUNNING", 0)


@pytest.fixture(scope="module")
def service(ray_cluster, indexes, tmp_path_factory):
    port = free_port()
    config = serve_config(port, indexes["flat"])
    deploy(config, ray_cluster["dashboard"], tmp_path_factory.mktemp("serve"))
    wait_running()
    yield {"url": f"http://127.0.0.1:{port}", "config": config, "dashboard": ray_cluster["dashboard"],
           "tmp": tmp_path_factory.mktemp("serve-redeploy")}
    serve.shutdown()


def test_index_manifest_reports_recall_and_checksum(indexes):
    manifest = indexes["manifest"]
    assert manifest["count"] == 1071 and manifest["dim"] == 384 and manifest["factory"] == "Flat"
    assert manifest["recall_at_10_vs_exact"] == {"de": 1.0, "qu": 1.0}  # Flat is exact search
    hnsw = load_index(indexes["hnsw"]).manifest
    assert 0.8 <= hnsw["recall_at_10_vs_exact"]["de"] <= 1.0


def test_search_finds_the_captions_of_the_query_image(service):
    from optical_ray.data import query_captions, read_captions

    de = query_captions(read_captions(TEST_CAPTIONS), "de").slice(0, 20)
    queries, images = de["text"].to_pylist(), de["image_id"].to_pylist()
    response = httpx.post(f"{service['url']}/search", json={"queries": queries, "k": 5}, timeout=60)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == 20 and all(len(hits) == 5 for hits in results)
    top1 = np.mean([hits[0]["image_id"] == image for hits, image in zip(results, images)])
    assert top1 >= 0.8  # the undistilled student's de R@1 on this set is 0.90
    assert all(hits[0]["score"] >= hits[-1]["score"] for hits in results)
    assert set(results[0][0]) == {"id", "image_id", "score", "text"}
    assert httpx.get(f"{service['url']}/healthz").json() == {"status": "ok"}
    assert "/search" in httpx.get(f"{service['url']}/openapi.json").json()["paths"]


def test_embeddings_are_the_students_query_vectors_in_openais_shape(service):
    from optical_ray.encoder import Encoder

    texts = ["Ein Hund rennt über eine Wiese.", "Allqu pampapi phawaykachan."]
    response = httpx.post(f"{service['url']}/embeddings", json={"input": texts, "model": "anything"}, timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "list" and body["model"] == "student-init"
    assert [d["index"] for d in body["data"]] == [0, 1] and {d["object"] for d in body["data"]} == {"embedding"}
    expected = Encoder.load("student-init").encode(texts, "query")
    np.testing.assert_allclose(np.array([d["embedding"] for d in body["data"]]), expected, atol=1e-4)
    one = httpx.post(f"{service['url']}/embeddings", json={"input": texts[0]}, timeout=60).json()
    np.testing.assert_allclose(one["data"][0]["embedding"], expected[0], atol=1e-4)
    for bad, field in (({"input": []}, "input"), ({"input": "  "}, "input"), ({"input": ["ok"] * 65}, "input"),
                       ({"texts": ["ok"]}, "texts")):
        refused = httpx.post(f"{service['url']}/embeddings", json=bad, timeout=60)
        assert refused.status_code == 422 and field in refused.json()["error"], refused.text


@pytest.mark.parametrize("body, field", [
    ({"queries": [], "k": 3}, "queries"),
    ({"queries": ["   "], "k": 3}, "queries[0] is blank"),
    ({"queries": ["ok", "x" * 1001]}, "queries[1] has 1001 characters"),
    ({"queries": ["q"] * 65}, "queries"),
    ({"queries": ["ok", 7]}, "queries[1]"),
    ({"queries": ["ok"], "k": 0}, "k"),
    ({"queries": ["ok"], "k": 101}, "k"),
    ({"queries": ["ok"], "k": "ten"}, "k"),
    ({"query": ["ok"]}, "query"),
])
def test_client_errors_are_4xx_naming_the_field(service, body, field):
    response = httpx.post(f"{service['url']}/search", json=body, timeout=30)
    assert response.status_code == 422, response.text
    assert field in response.json()["error"]


def test_non_json_body_is_a_client_error(service):
    response = httpx.post(f"{service['url']}/search", content=b"queries=dog", headers={"content-type": "application/json"})
    assert response.status_code == 422 and "json" in response.json()["error"].lower()


def test_every_error_is_json_and_bounded(service):
    url = service["url"]
    big = httpx.post(f"{url}/search", content=b'{"queries": ["' + b"x" * 600_000 + b'"]}',
                     headers={"content-type": "application/json"})
    assert big.status_code == 413 and "at most" in big.json()["error"]

    def chunks():
        yield b'{"queries": ["a dog"]}'

    chunked = httpx.post(f"{url}/search", content=chunks(), headers={"content-type": "application/json"})
    assert chunked.status_code == 411 and "Content-Length" in chunked.json()["error"]
    missing = httpx.get(f"{url}/no-such-route")
    assert missing.status_code == 404 and missing.headers["content-type"] == "application/json"
    assert missing.json()["error"]
    wrong_method = httpx.get(f"{url}/search")
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]


def test_a_request_past_its_timeout_gets_408_as_documented(service):
    """Serve's proxy ends a request after http_options.request_timeout_s, or a client's shorter
    x-request-timeout-seconds (used here to make it fast), with the 408 the schema documents."""
    response = httpx.post(f"{service['url']}/search", json=heavy_request(64, 8), headers={"x-request-timeout-seconds": "0.05"},
                          timeout=60)
    assert response.status_code == 408 and "timed out" in response.text
    documented = httpx.get(f"{service['url']}/openapi.json").json()["paths"]["/search"]["post"]["responses"]
    assert "408" in documented and "text/plain" in documented["408"]["content"]


def heavy_request(n: int, repeat: int) -> dict:
    """``n`` distinct long queries: seconds of encoding on this machine."""
    return {"queries": [f"Zwei Kinder Nummer {i} spielen im Sand am Strand neben dem Meer" * repeat for i in range(n)]}


def configure_secure_search_api(service: dict, user_config: dict) -> None:
    """Redeploy with the secure app's SearchAPI user_config replaced (a reconfigure, no restart)."""
    config, deployments = app_config(service, "secure")
    deployments["SearchAPI"]["user_config"] = user_config
    deploy(config, service["dashboard"], service["tmp"])
    time.sleep(3)


@pytest.mark.timeout(300)
def test_a_request_past_the_apps_timeout_gets_a_json_504(service):
    configure_secure_search_api(service, {"timeout_s": 0.05})
    heavy = heavy_request(64, 8)
    try:
        response = httpx.post(f"{service['url']}/secure/search", json=heavy, headers={"X-API-Key": API_KEY}, timeout=60)
        assert response.status_code == 504 and "not answered within 0.05 s" in response.json()["error"]
    finally:
        deploy(service["config"], service["dashboard"], service["tmp"])


def test_openapi_states_what_the_server_enforces(service):
    schema = httpx.get(f"{service['url']}/openapi.json").json()
    search = schema["paths"]["/search"]["post"]
    assert {"401", "408", "413", "422", "503", "504"} <= set(search["responses"])
    request = schema["components"]["schemas"]["SearchRequest"]
    queries = request["properties"]["queries"]
    assert (queries["minItems"], queries["maxItems"]) == (1, 64)
    assert queries["items"] == {"type": "string", "minLength": 1, "maxLength": 1000, "pattern": "\\S"}
    assert request["additionalProperties"] is False


def fuzz_cases(rng: np.random.Generator, n: int) -> list[tuple[dict, bool]]:
    """Requests drawn around /search's schema limits, each with whether the schema accepts it."""
    strings = [("a dog", True), ("", False), ("   ", False), ("\t\n", False), ("x" * 1000, True), ("x" * 1001, False),
               ("é" * 999, True), ("<script>alert(1)</script>", True), (" Hund ", True)]
    cases = []
    for _ in range(n):
        count = int(rng.choice([0, 1, 1, 1, 1, 2, 3, 64, 65]))
        items, ok = [], 1 <= count <= 64
        for _ in range(count):
            if rng.random() < 0.03:
                items.append(int(rng.integers(0, 9)))
                ok = False
            else:
                text, valid = ("dog", True) if count >= 64 or rng.random() < 0.7 else strings[int(rng.integers(len(strings)))]
                items.append(text)
                ok &= valid
        body: dict = {"queries": items}
        options = ["absent", "absent", "absent", 1, 5, 10, 100, 0, 101, "5", None, 2.5, True]
        k = options[int(rng.integers(len(options)))]
        if k != "absent":
            body["k"] = k
            ok &= type(k) is int and 1 <= k <= 100
        if rng.random() < 0.05:
            body["extra"] = 1
            ok = False
        cases.append((body, bool(ok)))
    return cases


@pytest.mark.timeout(600)
def test_schema_fuzz_no_5xx_no_undocumented_status_no_valid_request_refused(service):
    documented = {int(s) for s in httpx.get(f"{service['url']}/openapi.json").json()["paths"]["/search"]["post"]["responses"]}
    cases = fuzz_cases(np.random.default_rng(0), 200)
    assert 40 < sum(ok for _, ok in cases) < 160  # both kinds are exercised
    with httpx.Client(timeout=120) as client:
        for body, ok in cases:
            response = client.post(f"{service['url']}/search", json=body)
            assert response.status_code in documented and response.status_code < 500, (body, response.text)
            assert (response.status_code == 200) == ok, (body, response.status_code, response.text[:300])
            assert response.headers["content-type"] == "application/json"


def test_api_key_guards_every_route_but_healthz(service, ray_cluster):
    url = f"{service['url']}/secure"
    assert httpx.get(f"{url}/healthz").status_code == 200
    for method, route in (("POST", "/search"), ("POST", "/embeddings"), ("GET", "/"), ("GET", "/docs"),
                          ("GET", "/openapi.json")):
        assert httpx.request(method, f"{url}{route}", json={"queries": ["a dog"]}).status_code == 401
    wrong = httpx.post(f"{url}/search", json={"queries": ["a dog"]}, headers={"X-API-Key": "nope"})
    assert wrong.status_code == 401
    for headers in ({"X-API-Key": API_KEY}, {"Authorization": f"Bearer {API_KEY}"}):
        assert httpx.post(f"{url}/search", json={"queries": ["a dog"]}, headers=headers).status_code == 200
    assert httpx.get(f"{url}/", auth=("anyone", API_KEY)).status_code == 200
    logs = [p for p in Path(ray_cluster["temp_dir"]).rglob("*") if p.is_file() and p.suffix in (".log", ".out", ".err")]
    assert logs and not [p for p in logs if API_KEY in p.read_text(errors="ignore")]


def app_config(service: dict, app: str) -> tuple[dict, dict]:
    """A copy of the deployed config, and in it the deployments of ``app`` by name."""
    config = copy.deepcopy(service["config"])
    spec = next(a for a in config["applications"] if a["name"] == app)
    return config, {d["name"]: d for d in spec["deployments"]}


@pytest.mark.timeout(600)
def test_open_app_warns_and_an_app_without_its_key_refuses_to_start(service, ray_cluster):
    logs = [p for p in Path(ray_cluster["temp_dir"]).rglob("*") if p.is_file() and p.suffix in (".log", ".out", ".err")]
    assert any("serving WITHOUT authentication" in p.read_text(errors="ignore") for p in logs)
    config = copy.deepcopy(service["config"])
    closed = copy.deepcopy(config["applications"][1])
    closed.update(name="closed", route_prefix="/closed")
    closed["args"].update(auth="api_key", api_key_env="OPTICAL_RAY_KEY_NOBODY_SET")
    config["applications"].append(closed)
    deploy(config, service["dashboard"], service["tmp"])

    def failed_app():
        app = serve.status().applications.get("closed")
        return app if app and app.status == "DEPLOY_FAILED" else None

    app = wait_until(failed_app, 180, lambda: f"the app without its key did not fail: {serve.status().applications.get('closed')}")
    assert "refusing to start without an API key" in app.message and "OPTICAL_RAY_KEY_NOBODY_SET" in app.message
    deploy(service["config"], service["dashboard"], service["tmp"])  # and it is gone again
    assert httpx.get(f"{service['url']}/closed/healthz").status_code == 404


@pytest.mark.timeout(600)
def test_overload_is_shed_with_503_and_retry_after(service):
    configure_secure_search_api(service, {"max_in_flight": 2})
    heavy = heavy_request(32, 3)

    async def burst():
        async with httpx.AsyncClient(timeout=120, headers={"X-API-Key": API_KEY}) as client:
            return await asyncio.gather(*(client.post(f"{service['url']}/secure/search", json=heavy) for _ in range(24)))

    try:
        started = time.time()
        responses = asyncio.run(burst())
        statuses = [r.status_code for r in responses]
        assert set(statuses) <= {200, 503} and statuses.count(200) >= 2 and statuses.count(503) >= 10, statuses
        shed = [r for r in responses if r.status_code == 503]
        assert all(r.headers["retry-after"] == "1" and "overloaded" in r.json()["error"] for r in shed)
        assert time.time() - started < 110
    finally:
        deploy(service["config"], service["dashboard"], service["tmp"])


@pytest.mark.timeout(300)
def test_requests_abandoned_by_their_clients_are_cancelled(service, ray_cluster):
    url, key = f"{service['url']}/secure", {"X-API-Key": API_KEY}
    heavy = heavy_request(64, 4)

    async def abandon():
        async with httpx.AsyncClient(timeout=0.5, headers=key) as client:
            return await asyncio.gather(*(client.post(f"{url}/search", json=heavy) for _ in range(8)),
                                        return_exceptions=True)

    outcomes = asyncio.run(abandon())
    assert all(isinstance(o, httpx.TimeoutException) for o in outcomes), outcomes
    wait_until(lambda: secure_status(service)["in_flight"] == 0, 60,
               lambda: f"{secure_status(service)['in_flight']} abandoned requests still in progress", every=0.5)

    def cancelled() -> float:
        text = httpx.get(ray_cluster["metrics"], timeout=10).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("ray_optical_ray_search_requests") and 'outcome="cancelled"' in line)

    wait_until(lambda: cancelled() >= 1, 90, "no request was recorded as cancelled", every=3)


def store_bad_indexes(indexes: dict, bucket: str) -> dict:
    """Three indexes a swap must refuse: missing, tampered (checksum), wrong dimension."""
    import faiss
    import pyarrow as pa

    from optical_ray import storage
    from optical_ray.index import INDEX_FILE, MANIFEST_FILE, METADATA_FILE, resolve_version, save_index

    tampered = f"s3://{bucket}/index/tampered"
    flat, hnsw = resolve_version(indexes["flat"]), resolve_version(indexes["hnsw"])
    for name in (MANIFEST_FILE, METADATA_FILE):
        storage.write_bytes(storage.read_bytes(storage.join(flat, name)), storage.join(tampered, name))
    storage.write_bytes(storage.read_bytes(storage.join(hnsw, INDEX_FILE)), storage.join(tampered, INDEX_FILE))
    wrong_dim = f"s3://{bucket}/index/wrong-dim"
    small = faiss.IndexFlatIP(32)
    small.add(np.random.default_rng(0).standard_normal((1071, 32)).astype(np.float32))
    meta = pa.table({"id": np.arange(1071), "image_id": ["x"] * 1071, "text": ["x"] * 1071})
    save_index(small, meta, {"model": "student-init", "factory": "Flat"}, wrong_dim)
    return {"missing": f"s3://{bucket}/index/missing", "tampered": tampered, "wrong-dim": wrong_dim}


@pytest.mark.timeout(900)
def test_bad_index_swaps_roll_back_under_load(service, indexes, s3):
    bad = store_bad_indexes(indexes, s3["bucket"])
    url, key = f"{service['url']}/secure", {"X-API-Key": API_KEY}
    queries = ["Ein Hund rennt.", "Warmi t'ant'a manq'i.", "Un homme fait du vélo."]
    expected_errors = {"missing": "missing", "tampered": "checksum", "wrong-dim": "32-d"}
    phases, results = [], []

    def failed_swaps(at_least: int) -> dict | None:
        status = secure_status(service)["retriever"]
        return status if status["failed_swaps"] >= at_least else None

    def swaps():
        for n, (name, uri) in enumerate(bad.items(), start=1):
            config, deployments = app_config(service, "secure")
            deployments["Retriever"]["user_config"] = {"index_uri": uri}
            deploy(config, service["dashboard"], service["tmp"])
            status = wait_until(functools.partial(failed_swaps, n), 120,
                                lambda name=name: f"{name}: no failed swap; retriever {secure_status(service)['retriever']}", every=0.5)
            phases.append((name, status))
        config, deployments = app_config(service, "secure")
        deployments["Retriever"]["user_config"] = {"index_uri": indexes["hnsw"]}
        deploy(config, service["dashboard"], service["tmp"])

    swapper = threading.Thread(target=swaps)
    swapper.start()

    async def load():
        async with httpx.AsyncClient(timeout=60, headers=key) as client:
            counter = iter(range(100_000))

            async def worker():
                for i in counter:
                    if not swapper.is_alive() and len(results) >= 1000:
                        return
                    try:
                        r = await client.post(f"{url}/search", json={"queries": [queries[i % 3]], "k": 3})
                        results.append((r.status_code, r.json().get("index")))
                    except httpx.HTTPError as err:
                        results.append((0, repr(err)))
            await asyncio.gather(*(worker() for _ in range(16)))

    asyncio.run(load())
    swapper.join()
    assert len(results) >= 1000 and [r for r in results if r[0] != 200] == []
    for name, status in phases:
        assert status["index"] == indexes["flat"], status  # the old index kept serving
        assert name in status["last_error"] or bad[name] in status["last_error"]
        assert expected_errors[name] in status["last_error"].lower() or name == "missing", status
    assert {index for _, index in results} <= {indexes["flat"], indexes["hnsw"]}
    wait_until(lambda: secure_status(service)["retriever"]["index"] == indexes["hnsw"], 60,
               lambda: f"the good index is not served back: {secure_status(service)}", every=0.5)
    deploy(service["config"], service["dashboard"], service["tmp"])


def replica_actors(app: str, deployment: str) -> list[str]:
    import ray

    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith("SERVE_REPLICA::") and f"{app}#{deployment}#" in a["name"]]


def running_replicas(app: str, deployment: str) -> int:
    return serve.status().applications[app].deployments[deployment].replica_states.get("RUNNING", 0)


@pytest.mark.timeout(900)
def test_chaos_killed_replicas_cost_no_requests_and_come_back_on_the_current_index(service, indexes, s3, ray_cluster):
    """Two replicas each of the encoder and the retriever; one of each is killed mid-load (Ray's actor
    kill). The retriever's root meanwhile gets a new version and loses the old one's files: the
    replacement replica still comes up, on the current version."""
    import ray

    from optical_ray import storage
    from optical_ray.index import CURRENT_FILE, INDEX_FILE, MANIFEST_FILE, METADATA_FILE, resolve_version

    root = f"s3://{s3['bucket']}/index/chaos"

    def publish(source: str, version: str) -> None:
        for name in (INDEX_FILE, METADATA_FILE, MANIFEST_FILE):
            storage.write_bytes(storage.read_bytes(storage.join(resolve_version(source), name)),
                                storage.join(root, version, name))
        storage.write_bytes(f"{version}\n".encode(), storage.join(root, CURRENT_FILE))

    publish(indexes["flat"], "v1")
    config, deployments = app_config(service, "secure")
    for name in ("QueryEncoder", "Retriever"):
        deployments[name]["num_replicas"] = 2
    deployments["Retriever"]["user_config"] = {"index_uri": root}
    deploy(config, service["dashboard"], service["tmp"])
    wait_until(lambda: running_replicas("secure", "QueryEncoder") == running_replicas("secure", "Retriever") == 2, 300,
               lambda: serve.status().applications["secure"])
    url, key = f"{service['url']}/secure", {"X-API-Key": API_KEY}
    assert secure_status(service)["retriever"]["version"] is not None

    publish(indexes["hnsw"], "v2")  # a rebuild: CURRENT moves on, and the old version's files are deleted
    for name in (INDEX_FILE, METADATA_FILE, MANIFEST_FILE):
        storage.delete(storage.join(root, "v1", name))
    killed = {}

    def chaos():
        time.sleep(3)
        for deployment in ("QueryEncoder", "Retriever"):
            name = replica_actors("secure", deployment)[0]
            ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
            killed[deployment] = time.time()
            time.sleep(3)

    thread = threading.Thread(target=chaos)
    thread.start()
    results = run_load(url, total=1200, clients=16, queries=["Ein Hund rennt.", "Warmi t'ant'a manq'i."], headers=key)
    thread.join()
    failed = [r for r in results if r[0] != 200]
    assert len(results) == 1200 and len(failed) <= 12, failed[:5]  # error budget: 1%
    recovered = {}

    def all_recovered() -> bool:
        for deployment, when in killed.items():
            if deployment not in recovered and running_replicas("secure", deployment) == 2:
                recovered[deployment] = time.time() - when
        return len(recovered) == 2

    wait_until(all_recovered, 300, lambda: serve.status().applications["secure"], every=0.5)
    print(f"chaos: {len(failed)} of {len(results)} requests failed; recovery (s): {recovered}")
    # The replacement retriever loaded the current version (v2) although v1's files are gone.
    assert any(index == root for _, index in results)
    # Which replica /status reaches is the router's choice; the index-load metric counts every replica.
    current = load_index(indexes["hnsw"]).manifest["version"]
    wait_until(lambda: f'version="{current}"' in httpx.get(ray_cluster["metrics"], timeout=10).text, 90,
               "the replacement retriever never loaded the current version", every=3)
    deploy(service["config"], service["dashboard"], service["tmp"])


def run_load(url: str, total: int, clients: int, queries: list[str], headers: dict | None = None) -> list:
    """``total`` requests from ``clients`` concurrent clients; returns (status, index) per request."""
    async def main():
        results = []
        counter = iter(range(total))
        async with httpx.AsyncClient(timeout=60, headers=headers) as client:
            async def worker():
                for i in counter:
                    try:
                        r = await client.post(f"{url}/search", json={"queries": [queries[i % len(queries)]], "k": 5})
                        results.append((r.status_code, r.json().get("index") if r.status_code == 200 else r.text[:200]))
                    except httpx.HTTPError as err:
                        results.append((0, repr(err)))
            await asyncio.gather(*(worker() for _ in range(clients)))
        return results
    return asyncio.run(main())


@pytest.mark.timeout(900)
def test_load_with_autoscaling_and_index_hot_swap(service, indexes):
    queries = ["Ein Hund rennt.", "Dos niños juegan en la playa.", "Warmi t'ant'a manq'i.", "一个男人在骑自行车。"]
    assert encoder_replicas() == 1
    seen_replicas = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            seen_replicas.append(encoder_replicas())
            time.sleep(0.5)

    def swap():
        time.sleep(8)
        config = copy.deepcopy(service["config"])
        for deployment in config["applications"][0]["deployments"]:
            if deployment["name"] == "Retriever":
                deployment["user_config"]["index_uri"] = indexes["hnsw"]
        deploy(config, service["dashboard"], service["tmp"])

    watcher, swapper = threading.Thread(target=watch), threading.Thread(target=swap)
    watcher.start(), swapper.start()
    results = run_load(service["url"], total=2000, clients=16, queries=queries)
    swapper.join()
    stop.set()
    watcher.join()

    statuses = [status for status, _ in results]
    assert len(results) == 2000 and statuses.count(200) == 2000, [r for r in results if r[0] != 200][:5]
    served_by = {index for _, index in results}
    assert served_by == {indexes["flat"], indexes["hnsw"]}, served_by  # the swap happened under load
    assert max(seen_replicas) > 1, f"QueryEncoder never scaled above 1 replica: {seen_replicas}"
    wait_until(lambda: encoder_replicas() == 1, 120, "QueryEncoder did not scale back down")


@pytest.mark.timeout(600)
def test_metrics_reach_rays_prometheus_endpoint(service, ray_cluster, s3):
    """Counters and histograms of optical_ray/service/app.py, scraped over HTTP as Prometheus would, after this test
    has caused one of each outcome: answered, shed (max_in_flight 0) and a refused index swap."""
    url, key = f"{service['url']}/secure", {"X-API-Key": API_KEY}
    before = secure_status(service)["retriever"]["failed_swaps"]
    config, deployments = app_config(service, "secure")
    deployments["SearchAPI"]["user_config"] = {"max_in_flight": 0}
    deployments["Retriever"]["user_config"] = {"index_uri": f"s3://{s3['bucket']}/index/not-there"}
    deploy(config, service["dashboard"], service["tmp"])
    wait_until(lambda: secure_status(service)["retriever"]["failed_swaps"] > before, 120,
               lambda: f"the missing index was not refused: {secure_status(service)}", every=0.5)
    assert httpx.post(f"{url}/search", json={"queries": ["a dog"]}, headers=key).status_code == 503
    deploy(service["config"], service["dashboard"], service["tmp"])
    time.sleep(2)
    assert httpx.post(f"{url}/search", json={"queries": ["a dog"]}, headers=key).status_code == 200
    wanted = ("ray_optical_ray_queries", "ray_optical_ray_search_request_latency_ms_bucket",
              "ray_optical_ray_encode_latency_ms_bucket", "ray_optical_ray_search_latency_ms_bucket",
              "ray_optical_ray_hits", "ray_optical_ray_failed_index_swaps", "ray_optical_ray_index_loads",
              'outcome="shed"', 'outcome="ok"')

    def exported() -> str | None:
        text = httpx.get(ray_cluster["metrics"], timeout=10).text
        return text if all(name in text for name in wanted) else None

    text = wait_until(exported, 90, f"not all of {wanted} exported", every=3)
    failed = [line for line in text.splitlines() if line.startswith("ray_optical_ray_failed_index_swaps")]
    assert sum(float(line.rsplit(" ", 1)[1]) for line in failed) >= 1


XSS = '<img src=x onerror="document.title=\'pwned\'">'


def store_xss_index(indexes: dict, bucket: str) -> tuple[str, str]:
    """The flat index with one caption replaced by a script payload; returns (uri, that caption's
    original text, which as a query finds it first)."""
    from optical_ray.index import load_index, save_index

    stored = load_index(indexes["flat"])
    texts = stored.metadata["text"].to_pylist()
    original, texts[0] = texts[0], XSS + " " + texts[0]
    uri = f"s3://{bucket}/index/xss"
    save_index(stored.index, stored.metadata.set_column(2, "text", pa.array(texts)),
               {k: v for k, v in stored.manifest.items() if k in ("model", "factory", "prompts")}, uri)
    return uri, original


@pytest.mark.timeout(600)
def test_search_page_in_headless_chromium(service, indexes, s3):
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("Debian's chromium and chromium-driver are not installed (make test installs them)")
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"):
        options.add_argument(flag)
    browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))

    def search(text: str) -> list[str]:
        browser.get(f"{service['url']}/")
        browser.find_element(By.ID, "query").send_keys(text)
        browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        WebDriverWait(browser, 60).until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#results li")) == 10
                                         or "error" in b.find_element(By.ID, "status").get_attribute("class"))
        return [li.text for li in browser.find_elements(By.CSS_SELECTOR, "#results li")]

    try:
        texts = search("Zwei Hunde spielen im Schnee")
        assert any("dog" in t.lower() for t in texts[:3]), texts
        # Script in a query and in an indexed caption is shown as text, never run.
        uri, original = store_xss_index(indexes, s3["bucket"])
        config, deployments = app_config(service, "search")
        deployments["Retriever"]["user_config"] = {"index_uri": uri}
        deploy(config, service["dashboard"], service["tmp"])
        wait_until(lambda: httpx.post(f"{service['url']}/search", json={"queries": ["x"]}).json()["index"] == uri, 120,
                   "the XSS index was never served")
        texts = search(original)
        assert texts[0].startswith(XSS), texts[:2]
        assert browser.find_elements(By.CSS_SELECTOR, "#results img") == [] and browser.title != "pwned"
        search(XSS)
        assert browser.find_elements(By.CSS_SELECTOR, "img") == [] and browser.title != "pwned"
    finally:
        browser.quit()
        deploy(service["config"], service["dashboard"], service["tmp"])
