"""The retrieval service over real HTTP on 127.0.0.1: indexes built with Ray Data and stored on S3
(moto), the app deployed from serve/config.yaml with `serve deploy`, correct hits, client errors,
the API key, autoscaling up and down, a bounded load test with an index hot-swap, and the search
page in headless Chromium."""

import asyncio
import base64
import copy
import functools
import json
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
from conftest import free_port, wait_until
from ray import serve

from optical_ray.config import SAMPLE_DIR
from optical_ray.corpus_index import build_corpus_index
from optical_ray.index import load_index, resolve_version
from optical_ray.service.auth import add_key, digest, revoke_key

REPO = Path(__file__).resolve().parents[1]
TEST_CAPTIONS = str(SAMPLE_DIR / "test_2018_captions.parquet")


@pytest.fixture(scope="module")
def indexes(ray_cluster, s3):
    bucket = s3["bucket"]
    flat = f"s3://{bucket}/index/flat"
    hnsw = f"s3://{bucket}/index/hnsw"
    manifest = build_corpus_index("student-init", [TEST_CAPTIONS], flat, "Flat", query_langs=["de", "qu"], sample_queries=50)
    build_corpus_index("student-init", [TEST_CAPTIONS], hnsw, "HNSW32", query_langs=["de"], sample_queries=50)
    # The app serves the version a root's CURRENT names at deploy; answers name that version folder.
    return {"flat": flat, "hnsw": hnsw, "manifest": manifest,
            "flat_version": resolve_version(flat), "hnsw_version": resolve_version(hnsw)}


def serve_config(port: int, index_uri: str, keys_file: str) -> dict:
    """serve/config.yaml with test sizes: small CPU shares, short autoscaling delays, plus a second
    application that requires a client's key (from ``keys_file``)."""
    config = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    config["http_options"].update(host="127.0.0.1", port=port)  # the shipped timeouts stay
    app = config["applications"][0]
    app["args"]["index_uri"] = index_uri
    app["args"]["auth"] = "none"  # open on purpose (and said so): the tests of the key use "secure"
    app["args"].pop("rate_limit")  # the load tests' 16 clients are one client: test_keys_per_client limits
    for deployment in app["deployments"]:
        deployment["ray_actor_options"] = {"num_cpus": 0.05}
        if deployment["name"] == "QueryEncoder":
            deployment["autoscaling_config"] = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2,
                                                "upscale_delay_s": 1, "downscale_delay_s": 4, "metrics_interval_s": 0.5,
                                                "look_back_period_s": 2}
    secure = copy.deepcopy(app)
    secure.update(name="secure", route_prefix="/secure")
    secure["args"].update(auth="keys", api_keys_file=keys_file)
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
    keys_file = tmp_path_factory.mktemp("keys") / "keys.yaml"
    keys_file.write_text(f"default: {digest(API_KEY)}\n")  # the client every test of the secure app is
    config = serve_config(port, indexes["flat"], str(keys_file))
    deploy(config, ray_cluster["dashboard"], tmp_path_factory.mktemp("serve"))
    wait_running()
    yield {"url": f"http://127.0.0.1:{port}", "config": config, "dashboard": ray_cluster["dashboard"],
           "tmp": tmp_path_factory.mktemp("serve-redeploy"), "keys_file": keys_file}
    serve.shutdown()


def test_index_manifest_reports_recall_and_checksum(indexes):
    manifest = indexes["manifest"]
    assert manifest["count"] == 1071 and manifest["dim"] == 384 and manifest["factory"] == "Flat"
    assert manifest["recall_at_10_vs_exact"] == {"de": 1.0, "qu": 1.0}  # Flat is exact search
    # What a replica holds, for sizing its memory (cluster/kuberay/rayservice.yaml): at least the vectors.
    assert 1071 * 384 * 4 < manifest["replica_memory_bytes"] < 10 * 1071 * 384 * 4
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


def test_a_filter_is_checked_against_the_index_fields(service):
    url = f"{service['url']}/search"
    response = httpx.post(url, json={"queries": ["a dog"], "filter": {"lang": "de"}}, timeout=60)
    assert response.status_code == 400
    assert "no metadata field 'lang' in this index (fields: none" in response.json()["error"]
    response = httpx.post(url, json={"queries": ["a dog"], "filter": {"lang": ["de"]}}, timeout=60)
    assert response.status_code == 422 and "filter" in response.json()["error"]


def test_embeddings_are_the_students_query_vectors_in_openais_shape(service):
    from optical_ray.encoder import Encoder

    texts = ["Ein Hund rennt über eine Wiese.", "Allqu pampapi phawaykachan."]
    response = httpx.post(f"{service['url']}/embeddings", json={"input": texts, "model": "anything"}, timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "list" and body["model"] == "student-init"
    assert [d["index"] for d in body["data"]] == [0, 1] and {d["object"] for d in body["data"]} == {"embedding"}
    encoder = Encoder.load("student-init")
    expected = encoder.encode(texts, "query")
    np.testing.assert_allclose(np.array([d["embedding"] for d in body["data"]]), expected, atol=1e-4)
    tokens = int(encoder.tokenize(texts, "query")["attention_mask"].sum())  # "query: " and special tokens too
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    one = httpx.post(f"{service['url']}/v1/embeddings", json={"input": texts[0]}, timeout=60).json()
    np.testing.assert_allclose(one["data"][0]["embedding"], expected[0], atol=1e-4)
    packed = httpx.post(f"{service['url']}/v1/embeddings", json={"input": texts, "encoding_format": "base64",
                                                                 "dimensions": 384, "user": "u-1"}, timeout=60).json()
    unpacked = [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in packed["data"]]
    np.testing.assert_allclose(np.stack(unpacked), expected, atol=1e-4)
    for bad, param in (({"input": []}, "input"), ({"input": "  "}, "input"), ({"input": ["ok"] * 65}, "input"),
                       ({"texts": ["ok"]}, "input"), ({"input": "ok", "dimensions": 256}, "dimensions"),
                       ({"input": [[1, 2, 3]]}, "input"), ({"input": "ok", "encoding_format": "int8"}, "encoding_format")):
        refused = httpx.post(f"{service['url']}/v1/embeddings", json=bad, timeout=60)
        assert refused.status_code == 400, refused.text  # as OpenAI answers, in its shape
        error = refused.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == param and param in error["message"], error


def test_openai_and_langchain_clients_embed_through_the_endpoint(service):
    """The official OpenAI SDK with its defaults (base64 on the wire) and with floats, base_url with and
    without /v1, a string and a list; its error for a wrong dimension; and LangChain's OpenAIEmbeddings."""
    import openai
    from langchain_openai import OpenAIEmbeddings

    from optical_ray.encoder import Encoder

    texts = ["Ein Hund rennt über eine Wiese.", "一个男人在骑自行车。"]
    expected = Encoder.load("student-init").encode(texts, "query")
    for base_url in (f"{service['url']}/v1", service["url"]):
        client = openai.OpenAI(base_url=base_url, api_key="unused: the app is open", max_retries=0)
        default = client.embeddings.create(model="student-init", input=texts)  # the SDK asks for base64
        floats = client.embeddings.create(model="student-init", input=texts[0], encoding_format="float")
        np.testing.assert_allclose(np.array([d.embedding for d in default.data]), expected, atol=1e-4)
        np.testing.assert_allclose(floats.data[0].embedding, expected[0], atol=1e-4)
        assert default.usage.prompt_tokens > floats.usage.prompt_tokens > 0 and default.model == "student-init"
        assert client.embeddings.create(model="student-init", input=texts, dimensions=384).data[1].index == 1
        with pytest.raises(openai.BadRequestError) as err:
            client.embeddings.create(model="student-init", input=texts, dimensions=1536)
        assert err.value.status_code == 400 and "384-d" in err.value.message and err.value.param == "dimensions"
    # LangChain sends text (not tiktoken ids) with check_embedding_ctx_length off: the model is not OpenAI's.
    langchain = OpenAIEmbeddings(model="student-init", base_url=f"{service['url']}/v1", api_key="unused",
                                 check_embedding_ctx_length=False, max_retries=0)
    np.testing.assert_allclose(langchain.embed_documents(texts), expected, atol=1e-4)
    np.testing.assert_allclose(langchain.embed_query(texts[1]), expected[1], atol=1e-4)


def test_request_ids_access_log_and_liveness_apart_from_readiness(service, ray_cluster):
    url = f"{service['url']}/secure"
    sent = httpx.post(f"{url}/search", json={"queries": ["a dog"]}, headers={"X-API-Key": API_KEY, "X-Request-ID": "trace-42"})
    assert sent.status_code == 200 and sent.headers["x-request-id"] == "trace-42"
    made = httpx.post(f"{url}/search", json={"queries": ["a cat"]}, headers={"X-API-Key": API_KEY})
    refused = httpx.post(f"{url}/search", json={"queries": ["a cat"]}, headers={"X-API-Key": "nope"})
    assert made.headers["x-request-id"] and refused.status_code == 401 and refused.headers["x-request-id"]
    assert made.json()["version"] == load_index(made.json()["index"]).manifest["version"]
    assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}  # open: alive
    assert httpx.get(f"{url}/readyz").json() == {"status": "ready"}  # open: an index loaded, the encoder answers

    def access_lines() -> dict | None:
        lines = {}
        for path in Path(ray_cluster["temp_dir"]).rglob("worker-*.out"):
            for line in path.read_text(errors="ignore").splitlines():
                if line.startswith('{"ts"'):
                    entry = json.loads(line)
                    lines[entry["request_id"]] = entry
        return lines if {"trace-42", made.headers["x-request-id"], refused.headers["x-request-id"]} <= set(lines) else None

    lines = wait_until(access_lines, 60, "no JSON access-log line for the requests", every=1)
    assert {k: v for k, v in lines["trace-42"].items() if k not in ("ts", "latency_ms")} == {
        "request_id": "trace-42", "client": "default", "method": "POST", "route": "/search", "status": 200}
    assert lines[refused.headers["x-request-id"]]["status"] == 401 and lines[refused.headers["x-request-id"]]["client"] == "unknown"
    logs = "".join(p.read_text(errors="ignore") for p in Path(ray_cluster["temp_dir"]).rglob("worker-*.out"))
    assert API_KEY not in logs and "a cat" not in logs  # neither the key nor the query text


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
    shipped = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())["http_options"]["request_timeout_s"]
    running = httpx.get(f"{service['dashboard']}/api/serve/applications/", timeout=30).json()["http_options"]
    assert running["request_timeout_s"] == shipped  # the deployed proxy runs with serve/config.yaml's timeout
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
    for path in ("/v1/embeddings", "/embeddings"):  # OpenAI's routes answer 400 for invalid input, never 422
        assert "400" in schema["paths"][path]["post"]["responses"]
        assert "422" not in schema["paths"][path]["post"]["responses"]


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
        options = ["absent", "absent", "absent", 1, 5, 10, 100, 0, 101, "5", None, 2.5, True, 82.0, 101.0]
        k = options[int(rng.integers(len(options)))]
        if k != "absent":
            body["k"] = k  # 82.0 is an integer in JSON Schema's sense, so the server takes it
            ok &= (type(k) is int or (type(k) is float and k.is_integer())) and 1 <= k <= 100
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


def embeddings_fuzz_cases(rng: np.random.Generator, n: int) -> list[tuple[dict, bool]]:
    """Requests drawn around the OpenAI embeddings route's schema limits, with whether it accepts them."""
    inputs = [("a dog", True), ("Ein Hund", True), (["a dog", "un chien"], True), (["dog"] * 64, True),
              ("", False), (" ", False), ("x" * 1001, False), ([], False), (["dog"] * 65, False), ([1, 2], False),
              ([[1, 2]], False), (["ok", " "], False), (None, False)]
    fields = {"encoding_format": [("float", True), ("base64", True), ("int8", False), (None, False)],
              "dimensions": [(384, True), (384.0, True), (256, False), ("384", False), (0, False), (True, False)],
              "user": [("u-1", True), (7, False)], "model": [("anything", True), (3, False)]}
    cases = []
    for _ in range(n):
        value, ok = inputs[int(rng.integers(4 if rng.random() < 0.5 else len(inputs)))]  # the first 4 are valid
        body = {"input": value}
        for field, choices in fields.items():
            if rng.random() < 0.2:
                body[field], valid = choices[int(rng.integers(len(choices)))]
                ok &= valid
        if rng.random() < 0.05:
            body["extra"], ok = 1, False
        cases.append((body, ok))
    return cases


@pytest.mark.timeout(600)
def test_embeddings_schema_fuzz_no_5xx_no_undocumented_status_no_valid_request_refused(service):
    documented = {int(s) for s in httpx.get(f"{service['url']}/openapi.json").json()["paths"]["/v1/embeddings"]["post"]["responses"]}
    cases = embeddings_fuzz_cases(np.random.default_rng(1), 120)
    assert 20 < sum(ok for _, ok in cases) < 100
    with httpx.Client(timeout=120) as client:
        for body, ok in cases:
            response = client.post(f"{service['url']}/v1/embeddings", json=body)
            assert response.status_code in documented and response.status_code < 500, (body, response.text)
            assert (response.status_code == 200) == ok, (body, response.status_code, response.text[:300])
            if not ok:
                assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"


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


@pytest.mark.timeout(600)
def test_admission_by_queries_keeps_goodput_under_overload(service):
    """40 requests of 32 long queries at once, against a bound of 64 queries in flight (and none on
    requests that binds): what is admitted is answered within the timeout (>= 95%), the rest is shed
    with 503 + Retry-After at once rather than timing out with the rest."""
    configure_secure_search_api(service, {"max_in_flight": 64, "max_queries_in_flight": 64, "timeout_s": 25})
    heavy = heavy_request(32, 4)

    async def burst():
        async with httpx.AsyncClient(timeout=120, headers={"X-API-Key": API_KEY}) as client:
            async def one():
                started = time.perf_counter()
                response = await client.post(f"{service['url']}/secure/search", json=heavy)
                return response, time.perf_counter() - started
            return await asyncio.gather(*(one() for _ in range(40)))

    try:
        outcomes = asyncio.run(burst())
        statuses = [r.status_code for r, _ in outcomes]
        admitted = [s for s in statuses if s != 503]
        assert set(statuses) <= {200, 503, 504} and statuses.count(503) >= 20, statuses
        assert admitted.count(200) >= 0.95 * len(admitted) and admitted, statuses
        shed = [(r, t) for r, t in outcomes if r.status_code == 503]
        assert all(r.headers["retry-after"] == "1" and "queries" in r.json()["error"] for r, _ in shed)
        print(f"goodput: {statuses.count(200)} of {len(admitted)} admitted answered; {len(shed)} shed, "
              f"median {np.median([t for _, t in shed]):.2f} s to a 503")
    finally:
        deploy(service["config"], service["dashboard"], service["tmp"])


@pytest.mark.timeout(600)
def test_serves_own_queue_full_is_a_503_with_retry_after(service):
    """When SearchAPI's own queue (max_queued_requests) is full, Serve's proxy answers before the app
    does: its backpressure_config gives that 503 a Retry-After too."""
    config, deployments = app_config(service, "secure")
    deployments["SearchAPI"].update(max_ongoing_requests=1, max_queued_requests=1)
    deploy(config, service["dashboard"], service["tmp"])
    wait_until(lambda: serve.status().applications["secure"].status == "RUNNING", 120, lambda: serve.status())
    heavy = heavy_request(16, 2)

    async def burst():
        async with httpx.AsyncClient(timeout=120, headers={"X-API-Key": API_KEY}) as client:
            return await asyncio.gather(*(client.post(f"{service['url']}/secure/search", json=heavy) for _ in range(12)))

    try:
        responses = asyncio.run(burst())
        statuses = [r.status_code for r in responses]
        shed = [r for r in responses if r.status_code == 503]
        assert set(statuses) <= {200, 503} and statuses.count(200) >= 1 and shed, statuses
        assert all(r.headers.get("retry-after") == "1" for r in shed), [dict(r.headers) for r in shed][:2]
    finally:
        deploy(service["config"], service["dashboard"], service["tmp"])


@pytest.mark.timeout(600)
def test_keys_per_client_are_reloaded_without_restart_and_rate_limited(service, ray_cluster):
    """The secure app's key file: adding, revoking and rotating keys takes effect within seconds
    without a restart; a client past its rate limit gets 429 with Retry-After while the others go on;
    an emptied file lets nobody in; requests are counted per client."""
    keys_file, url = service["keys_file"], f"{service['url']}/secure"
    original = keys_file.read_text()
    alice, bob = add_key(keys_file, "alice"), add_key(keys_file, "bob", requests_per_s=0.5, burst=2)

    def get(key: str) -> httpx.Response:
        return httpx.get(f"{url}/status", headers={"Authorization": f"Bearer {key}"}, timeout=30)

    def reaches(key: str, status: int) -> None:
        wait_until(lambda: get(key).status_code == status, 30, f"the key did not get {status}", every=0.3)

    try:
        reaches(alice, 200)  # added: in within seconds, no redeploy
        assert get("guess").status_code == 401
        limited = [get(bob) for _ in range(4)]  # a burst of 2, then one every 2 s
        assert [r.status_code for r in limited[:2]] == [200, 200] and limited[3].status_code == 429, limited
        assert int(limited[3].headers["retry-after"]) in (1, 2) and "'bob'" in limited[3].json()["error"]
        assert all(get(alice).status_code == 200 for _ in range(5))  # bob's limit is bob's alone
        revoke_key(keys_file, "alice")
        reaches(alice, 401)
        new_bob = add_key(keys_file, "bob", replace=True)  # rotated, and without a limit of its own now
        reaches(new_bob, 200)
        assert get(bob).status_code == 401
        keys_file.write_text("")  # emptied: nobody, until it is mended
        reaches(API_KEY, 401)
        wait_until(lambda: sum(metric(ray_cluster, "optical_ray_http_requests", application="secure", client="bob",
                                      status="429")) >= 1, 90, "no 429 counted for client bob", every=3)
    finally:
        keys_file.write_text(original)
        reaches(API_KEY, 200)


@pytest.mark.timeout(300)
def test_requests_abandoned_by_their_clients_are_cancelled(service, ray_cluster):
    """A client that goes away takes its work with it: each abandoned request is counted as cancelled,
    and the secure app's encoder stops short of the queries nobody waits for any more."""
    url, key = f"{service['url']}/secure", {"X-API-Key": API_KEY}
    heavy = heavy_request(64, 4)

    def settled(read):
        # Ray exports metrics every 10 s: a value is taken once two reads further apart agree.
        last = read()
        for _ in range(10):
            time.sleep(11)
            if (value := read()) == last:
                return value
            last = value
        raise AssertionError(f"the metrics kept moving: {last}")

    def encoded() -> float:
        return sum(metric(ray_cluster, "optical_ray_encode_batch_size_sum", application="secure"))

    def cancelled() -> float:
        return sum(metric(ray_cluster, "optical_ray_search_requests", application="secure", outcome="cancelled"))

    before, cancelled_before = settled(lambda: (encoded(), cancelled()))

    async def abandon():
        async with httpx.AsyncClient(timeout=0.5, headers=key) as client:
            # 4 x 64 queries: all within max_queries_in_flight (256), so none is shed before it times out
            return await asyncio.gather(*(client.post(f"{url}/search", json=heavy) for _ in range(4)),
                                        return_exceptions=True)

    outcomes = asyncio.run(abandon())
    assert all(isinstance(o, httpx.TimeoutException) for o in outcomes), outcomes
    wait_until(lambda: secure_status(service)["in_flight"] == 0, 60,
               lambda: f"{secure_status(service)['in_flight']} abandoned requests still in progress", every=0.5)
    wait_until(lambda: cancelled() - cancelled_before >= 4, 90,
               lambda: f"{cancelled() - cancelled_before:g} of 4 abandoned requests recorded as cancelled", every=3)
    computed = settled(encoded) - before
    assert computed < 4 * 64, f"all {computed:g} queries of the abandoned requests were encoded for nobody"


def store_bad_indexes(indexes: dict, bucket: str) -> dict:
    """Four indexes a swap must refuse: missing, tampered (checksum), wrong dimension, and a root named
    without its version (each replica would resolve CURRENT at its own moment)."""
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
    return {"missing": f"s3://{bucket}/index/missing", "tampered": tampered, "wrong-dim": resolve_version(wrong_dim),
            "root": indexes["hnsw"]}


@pytest.mark.timeout(900)
def test_bad_index_swaps_roll_back_under_load(service, indexes, s3):
    bad = store_bad_indexes(indexes, s3["bucket"])
    url, key = f"{service['url']}/secure", {"X-API-Key": API_KEY}
    queries = ["Ein Hund rennt.", "Warmi t'ant'a manq'i.", "Un homme fait du vélo."]
    expected_errors = {"missing": "missing", "tampered": "checksum", "wrong-dim": "32-d", "root": "name the version"}
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
        version = indexes["hnsw_version"].rsplit("/", 1)[-1]
        deployments["Retriever"]["user_config"] = {"index_uri": indexes["hnsw"], "version": version}
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
        assert status["index"] == indexes["flat_version"], status  # the old index kept serving
        assert status["swap_refused"] and status["configured"] == bad[name], status  # and the refusal is reported
        assert name in status["last_error"] or bad[name] in status["last_error"]
        assert expected_errors[name] in status["last_error"].lower() or name == "missing", status
    assert {index for _, index in results} <= {indexes["flat_version"], indexes["hnsw_version"]}
    wait_until(lambda: secure_status(service)["retriever"]["index"] == indexes["hnsw_version"], 60,
               lambda: f"the good index is not served back: {secure_status(service)}", every=0.5)
    assert not secure_status(service)["retriever"]["swap_refused"]
    deploy(service["config"], service["dashboard"], service["tmp"])


def replica_actors(app: str, deployment: str) -> list[str]:
    import ray

    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith("SERVE_REPLICA::") and f"{app}#{deployment}#" in a["name"]]


def running_replicas(app: str, deployment: str) -> int:
    return serve.status().applications[app].deployments[deployment].replica_states.get("RUNNING", 0)


@pytest.mark.timeout(900)
def test_chaos_and_a_rebuild_leave_one_index_version_until_the_deployment_rolls_out_the_next(service, indexes, s3):
    """Two replicas each of the encoder and the retriever, under load. The root gets a new version
    (CURRENT moves on) and one replica of each deployment is killed (Ray's actor kill): the
    replacements come up on the deployed version, so every answer names one version. Then the new
    version is rolled out by a config change: answers move to it, and the window in which both
    versions answer is measured and bounded."""
    import ray

    from optical_ray import storage
    from optical_ray.index import CURRENT_FILE, INDEX_FILE, MANIFEST_FILE, METADATA_FILE

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
    deployments["Retriever"]["user_config"] = {"index_uri": root, "version": "v1"}
    deploy(config, service["dashboard"], service["tmp"])
    wait_until(lambda: running_replicas("secure", "QueryEncoder") == running_replicas("secure", "Retriever") == 2, 300,
               lambda: serve.status().applications["secure"])
    wait_until(lambda: secure_status(service)["retriever"]["index"] == f"{root}/v1", 60, lambda: secure_status(service))
    url, key = f"{service['url']}/secure", {"X-API-Key": API_KEY}
    publish(indexes["hnsw"], "v2")  # a rebuild: CURRENT names v2 now, and no replica may notice on its own
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
    # The replacement retriever serves the deployed version, v1, although CURRENT names v2.
    after_recovery = run_load(url, total=200, clients=8, queries=["Ein Hund rennt."], headers=key)
    assert {index for status, index in results + after_recovery if status == 200} == {f"{root}/v1"}
    print(f"chaos: {len(failed)} of {len(results)} requests failed; recovery (s): {recovered}")

    # The rollout: one config change moves every replica to v2.
    def roll_out():
        time.sleep(2)
        deployments["Retriever"]["user_config"] = {"index_uri": root, "version": "v2"}
        deploy(config, service["dashboard"], service["tmp"])

    rollout = threading.Thread(target=roll_out)
    rollout.start()
    timed = run_load(url, total=1500, clients=8, queries=["Ein Hund rennt."], headers=key, timed=True)
    rollout.join()
    assert [r for r in timed if r[0] != 200] == []
    v1 = [t for _, index, t in timed if index == f"{root}/v1"]
    v2 = [t for _, index, t in timed if index == f"{root}/v2"]
    assert v1 and v2 and {index for _, index, _ in timed} == {f"{root}/v1", f"{root}/v2"}
    window = max(v1) - min(v2)  # from the first v2 answer to the last v1 answer
    print(f"rollout window (both versions answer): {max(window, 0):.2f} s")
    assert window < 5.0, window  # the replicas reconfigure one after the other, seconds apart at most
    assert max(v2) > max(v1)  # and it ends on v2 alone
    deploy(service["config"], service["dashboard"], service["tmp"])


def run_load(url: str, total: int, clients: int, queries: list[str], headers: dict | None = None,
             timed: bool = False) -> list:
    """``total`` requests from ``clients`` concurrent clients; returns (status, index) per request, and
    with ``timed`` the time each answer arrived too."""
    async def main():
        results = []
        counter = iter(range(total))
        async with httpx.AsyncClient(timeout=60, headers=headers) as client:
            async def worker():
                for i in counter:
                    try:
                        r = await client.post(f"{url}/search", json={"queries": [queries[i % len(queries)]], "k": 5})
                        result = (r.status_code, r.json().get("index") if r.status_code == 200 else r.text[:200])
                    except httpx.HTTPError as err:
                        result = (0, repr(err))
                    results.append((*result, time.time()) if timed else result)
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
                deployment["user_config"] = {"index_uri": indexes["hnsw_version"]}  # a version folder
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
    assert served_by == {indexes["flat_version"], indexes["hnsw_version"]}, served_by  # the swap happened under load
    assert max(seen_replicas) > 1, f"QueryEncoder never scaled above 1 replica: {seen_replicas}"
    wait_until(lambda: encoder_replicas() == 1, 120, "QueryEncoder did not scale back down")


def metric(ray_cluster: dict, name: str, **tags) -> list[float]:
    """The values of one metric on Ray's Prometheus endpoint, one per series with these tags (a
    counter's name gets Prometheus's ``_total``)."""
    text = httpx.get(ray_cluster["metrics"], timeout=10).text
    wanted = [f'{k}="{v}"' for k, v in tags.items()]
    return [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith((f"ray_{name}{{", f"ray_{name}_total{{")) and all(t in line for t in wanted)]


@pytest.mark.timeout(600)
def test_metrics_reach_rays_prometheus_endpoint(service, ray_cluster, s3):
    """Counters, histograms and gauges of optical_ray/service/app.py, scraped over HTTP as Prometheus
    would, after this test has caused one of each outcome: answered, shed (max_in_flight 0) and a
    refused index swap (the gauge says so while it lasts)."""
    url, key = f"{service['url']}/secure", {"X-API-Key": API_KEY}
    before = secure_status(service)["retriever"]["failed_swaps"]
    config, deployments = app_config(service, "secure")
    deployments["SearchAPI"]["user_config"] = {"max_in_flight": 0}
    deployments["Retriever"]["user_config"] = {"index_uri": f"s3://{s3['bucket']}/index/not-there"}
    deploy(config, service["dashboard"], service["tmp"])
    wait_until(lambda: secure_status(service)["retriever"]["failed_swaps"] > before, 120,
               lambda: f"the missing index was not refused: {secure_status(service)}", every=0.5)
    assert httpx.post(f"{url}/search", json={"queries": ["a dog"]}, headers=key).status_code == 503
    wait_until(lambda: 1.0 in metric(ray_cluster, "optical_ray_index_swap_refused", application="secure"), 90,
               "the refused swap is not in the optical_ray_index_swap_refused gauge", every=3)
    deploy(service["config"], service["dashboard"], service["tmp"])
    time.sleep(2)
    assert httpx.post(f"{url}/search", json={"queries": ["a dog"]}, headers=key).status_code == 200
    wanted = ("ray_optical_ray_queries", "ray_optical_ray_search_request_latency_ms_bucket",
              "ray_optical_ray_encode_latency_ms_bucket", "ray_optical_ray_search_latency_ms_bucket",
              "ray_optical_ray_hits", "ray_optical_ray_failed_index_swaps", "ray_optical_ray_index_loads",
              "ray_optical_ray_http_requests", 'outcome="shed"', 'outcome="ok"')

    def exported() -> str | None:
        text = httpx.get(ray_cluster["metrics"], timeout=10).text
        return text if all(name in text for name in wanted) else None

    wait_until(exported, 90, f"not all of {wanted} exported", every=3)
    assert sum(metric(ray_cluster, "optical_ray_failed_index_swaps")) >= 1
    wait_until(lambda: set(metric(ray_cluster, "optical_ray_index_swap_refused", application="secure")) == {0.0}, 90,
               "the gauge still reports a refused swap after the config was mended", every=3)
    assert sum(metric(ray_cluster, "optical_ray_http_requests", application="secure", client="default",
                      route="/search", status="200")) >= 1


XSS = '<img src=x onerror="document.title=\'pwned\'">'


def store_xss_index(indexes: dict, bucket: str) -> tuple[str, str]:
    """The flat index with one caption replaced by a script payload; returns (uri, that caption's
    original text, which as a query finds it first)."""
    from optical_ray.index import save_index

    stored = load_index(indexes["flat"])
    texts = stored.metadata["text"].to_pylist()
    original, texts[0] = texts[0], XSS + " " + texts[0]
    uri = f"s3://{bucket}/index/xss"
    save_index(stored.index, stored.metadata.set_column(2, "text", pa.array(texts)),
               {k: v for k, v in stored.manifest.items() if k in ("model", "factory", "prompts")}, uri)
    return resolve_version(uri), original


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
