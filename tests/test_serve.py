"""The retrieval service over real HTTP on 127.0.0.1: indexes built with Ray Data and stored on S3
(moto), the app deployed from serve/config.yaml with `serve deploy`, correct hits, client errors,
the API key, autoscaling up and down, a bounded load test with an index hot-swap, and the search
page in headless Chromium."""

import asyncio
import copy
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from conftest import TEST_API_KEY as API_KEY
from conftest import TEST_API_KEY_ENV, free_port
from ray import serve

from optical_ray.config import SAMPLE_DIR
from optical_ray.index import load_index
from optical_ray.indexing import build_corpus_index

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
    secure["args"]["api_key_env"] = TEST_API_KEY_ENV  # set in the cluster's environment (conftest)
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
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = serve.status().applications
        if all(a in status and status[a].status == "RUNNING" for a in apps):
            return
        time.sleep(1)
    raise AssertionError(f"serve apps not running: {serve.status()}")


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


@pytest.mark.parametrize("body, field", [
    ({"queries": [], "k": 3}, "queries"),
    ({"queries": ["   "], "k": 3}, "queries[0] is blank"),
    ({"queries": ["ok", "x" * 1001]}, "queries[1] has 1001 characters"),
    ({"queries": ["q"] * 65}, "queries"),
    ({"queries": ["ok", 7]}, "queries.1"),
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


def test_api_key_guards_every_route_but_healthz(service, ray_cluster):
    url = f"{service['url']}/secure"
    assert httpx.get(f"{url}/healthz").status_code == 200
    for method, route in (("POST", "/search"), ("GET", "/"), ("GET", "/docs"), ("GET", "/openapi.json")):
        assert httpx.request(method, f"{url}{route}", json={"queries": ["a dog"]}).status_code == 401
    wrong = httpx.post(f"{url}/search", json={"queries": ["a dog"]}, headers={"X-API-Key": "nope"})
    assert wrong.status_code == 401
    for headers in ({"X-API-Key": API_KEY}, {"Authorization": f"Bearer {API_KEY}"}):
        assert httpx.post(f"{url}/search", json={"queries": ["a dog"]}, headers=headers).status_code == 200
    assert httpx.get(f"{url}/", auth=("anyone", API_KEY)).status_code == 200
    logs = [p for p in Path(ray_cluster["temp_dir"]).rglob("*") if p.is_file() and p.suffix in (".log", ".out", ".err")]
    assert logs and not [p for p in logs if API_KEY in p.read_text(errors="ignore")]


def run_load(url: str, total: int, clients: int, queries: list[str]) -> list:
    """``total`` requests from ``clients`` concurrent clients; returns (status, index) per request."""
    async def main():
        results = []
        counter = iter(range(total))
        async with httpx.AsyncClient(timeout=60) as client:
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
    deadline = time.time() + 120
    while encoder_replicas() > 1:
        assert time.time() < deadline, "QueryEncoder did not scale back down"
        time.sleep(1)


def test_search_page_in_headless_chromium(service):
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
    try:
        browser.get(f"{service['url']}/")
        browser.find_element(By.ID, "query").send_keys("Zwei Hunde spielen im Schnee")
        browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        WebDriverWait(browser, 60).until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#results li")) == 10)
        texts = [li.text for li in browser.find_elements(By.CSS_SELECTOR, "#results li")]
        assert any("dog" in t.lower() for t in texts[:3]), texts
    finally:
        browser.quit()
