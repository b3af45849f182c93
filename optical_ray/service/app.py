"""The optical-ray retrieval service on Ray Serve.

Three deployments: ``QueryEncoder`` (the student, with ``@serve.batch`` gathering queries from
concurrent requests into one forward pass), ``Retriever`` (a FAISS index loaded from a local or
s3:// folder; a new ``index_uri`` in its user_config swaps it in while requests keep flowing) and
``SearchAPI`` (the FastAPI ingress: ``POST /search``, ``POST /embeddings`` (query vectors, OpenAI's
shape), ``GET /healthz``, ``GET /`` a search page,
OpenAPI docs at ``/docs``).

    serve run optical_ray.service.app:build_app model=student-init index_uri=runs/index
    serve deploy serve/config.yaml

Fails closed (:mod:`optical_ray.service.auth`): every route but ``/healthz`` needs the key in
``OPTICAL_RAY_API_KEY``; without the variable the app refuses to start, unless its args say ``auth: none``
(then it starts open and logs one warning). Set it in the environment of
the Ray node processes (``OPTICAL_RAY_API_KEY=... ray start``, or a Kubernetes Secret in the pod spec),
never in a runtime_env's ``env_vars``: Ray writes those to its logs and keeps them in the cluster
state. The ``api_key_env`` argument names another variable, for apps that need keys of their own.

Bounded: bodies over ``MAX_BODY_BYTES`` get 413 before they are read; when ``max_in_flight`` requests
(SearchAPI's user_config) are already in a SearchAPI replica, or a downstream deployment's queue is full
(``max_queued_requests``), the answer is 503 with ``Retry-After``; ``http_options.request_timeout_s``
caps a request's life. Every error is JSON ``{"error": ...}`` and documented in the OpenAPI schema; the
request and response models and their limits are in :mod:`optical_ray.service.schemas`.

A swap to an index that cannot be used (missing, checksum mismatch, another model or dimension) is
refused: the replica keeps serving the index it has, logs why, and reports it at ``/status``.
"""

import asyncio
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from ray.serve.metrics import Counter, Histogram
from starlette.exceptions import HTTPException as StarletteHTTPException

from optical_ray.index import load_index
from optical_ray.model_store import resolve_model
from optical_ray.onnx_encoder import BACKENDS, load_query_encoder
from optical_ray.service.auth import API_KEY_ENV, allowed, check_auth
from optical_ray.service.schemas import (
    ERRORS,
    MAX_BODY_BYTES,
    MAX_QUERY_CHARS,
    EmbeddingsRequest,
    EmbeddingsResponse,
    SearchRequest,
    SearchResponse,
)

log = logging.getLogger("ray.serve")

MAX_IN_FLIGHT = 64
TIMEOUT_S = 25.0  # below serve/config.yaml's request_timeout_s (30), so the app answers first, in JSON
RETRY_AFTER_S = 1
PAGE = Path(__file__).with_name("search.html")
LATENCY_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000]


@serve.deployment(max_ongoing_requests=32)
class QueryEncoder:
    """Embeds one query per call; concurrent calls are batched by ``@serve.batch``."""

    def __init__(self, model: str, backend: str = "torch"):
        self.encoder = load_query_encoder(model, backend)
        self.encode_ms = Histogram("optical_ray_encode_latency_ms", "one batched forward pass of the query encoder",
                                   boundaries=LATENCY_MS)
        self.batch_size = Histogram("optical_ray_encode_batch_size", "queries per batched forward pass",
                                    boundaries=[1, 2, 4, 8, 16, 32, 64])

    def reconfigure(self, config: dict) -> None:
        self.embed.set_max_batch_size(int(config.get("max_batch_size", 32)))
        self.embed.set_batch_wait_timeout_s(float(config.get("batch_wait_timeout_s", 0.005)))

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def embed(self, queries: list[str]) -> list[np.ndarray]:
        started = time.perf_counter()
        vectors = list(self.encoder.encode(queries, "query", batch_size=len(queries)))
        self.encode_ms.observe(1000 * (time.perf_counter() - started))
        self.batch_size.observe(len(queries))
        return vectors

    async def __call__(self, query: str) -> np.ndarray:
        return await self.embed(query)


class IndexMismatchError(ValueError):
    """A stored index that cannot serve this app's encoder."""


def local_model_id(model: str) -> str:
    """The same model named the same way: local folders by absolute path, names and URIs as given."""
    return model if model.startswith("s3://") or not os.path.exists(model) else os.path.abspath(model)


@serve.deployment(max_ongoing_requests=64)
class Retriever:
    """Holds one FAISS index copy per replica (FAISS is a library, not a server).

    The index comes from ``user_config.index_uri`` when the deployment has one (loaded once, by
    ``reconfigure``), else from ``index_uri``. A swap that fails keeps the current index serving.
    """

    def __init__(self, index_uri: str, model: str):
        self.default_uri, self.model = index_uri, local_model_id(model)
        self.dim = json.loads((resolve_model(model) / "config.json").read_text())["hidden_size"]
        self.state: tuple | None = None  # (uri, index, ids, image ids, texts, version)
        self.failed_swaps, self.last_error, self.configured = 0, None, False
        self.search_ms = Histogram("optical_ray_search_latency_ms", "one FAISS search call", boundaries=LATENCY_MS)
        self.hits = Counter("optical_ray_hits", "hits returned")
        self.swap_failures = Counter("optical_ray_failed_index_swaps", "index swaps refused (the old index kept serving)")
        self.index_loads = Counter("optical_ray_index_loads", "index versions loaded (the latest is served)",
                                   tag_keys=("index", "version"))

    def _load(self, uri: str) -> tuple:
        stored = load_index(uri)
        built_with = stored.manifest.get("model")
        if built_with is not None and local_model_id(built_with) != self.model:
            raise IndexMismatchError(f"{uri} was built with model {built_with!r}, this app encodes with {self.model!r}")
        if stored.index.d != self.dim:
            raise IndexMismatchError(f"{uri} holds {stored.index.d}-d vectors, the encoder makes {self.dim}-d ones")
        meta = stored.metadata
        return (uri, stored.index, meta["id"].to_pylist(), meta["image_id"].to_pylist(), meta["text"].to_pylist(),
                stored.manifest.get("version"))

    def _swap(self, uri: str) -> None:
        """Load ``uri`` completely, then replace the old index with one assignment, so requests in flight
        finish on the old index; on failure keep the old one (or, with none yet, fail the replica)."""
        if self.state is not None and uri == self.state[0]:
            return
        try:
            state = self._load(uri)
        except Exception as err:  # any failure to load is a refused swap, never an outage
            self.failed_swaps += 1
            self.swap_failures.inc()
            self.last_error = f"{uri}: {type(err).__name__}: {err}"
            if self.state is None:
                raise
            log.error("index swap refused, still serving %s: %s", self.state[0], self.last_error)
            return
        self.state = state
        self.index_loads.inc(tags={"index": uri, "version": str(state[5])})
        log.info("index swapped to %s (version %s)", uri, state[5])

    def reconfigure(self, config: dict) -> None:
        """``index_uri``: a root (its CURRENT version) or a version folder; ``version`` (optional) picks
        a version under the root, so a rebuild is rolled out, or back, by one user_config change."""
        self.configured = True
        uri = config.get("index_uri") or self.default_uri
        self._swap(f"{uri.rstrip('/')}/{config['version']}" if config.get("version") else uri)

    def _current(self) -> tuple:
        if self.state is None and not self.configured:
            self._swap(self.default_uri)
        return self.state

    def check_health(self) -> None:
        """Serve's readiness probe: a replica without a usable index is not healthy."""
        if self._current() is None:
            raise RuntimeError(f"no usable index: {self.last_error}")

    def status(self) -> dict:
        uri, index, *_, version = self._current()
        return {"index": uri, "version": version, "count": int(index.ntotal), "dim": int(index.d),
                "failed_swaps": self.failed_swaps, "last_error": self.last_error}

    def search(self, vectors: np.ndarray, k: int) -> dict:
        uri, index, ids, image_ids, texts, _ = self._current()
        started = time.perf_counter()
        scores, rows = index.search(np.ascontiguousarray(vectors, dtype=np.float32), k)
        self.search_ms.observe(1000 * (time.perf_counter() - started))
        results = [[{"id": ids[r], "image_id": image_ids[r], "score": float(s), "text": texts[r]}
                    for s, r in zip(score_row, row) if r >= 0] for score_row, row in zip(scores, rows)]
        self.hits.inc(sum(len(hits) for hits in results))
        return {"results": results, "index": uri}


app = FastAPI(title="optical-ray search",
              description="Cross-lingual caption retrieval with a distilled multilingual encoder and FAISS.")


def error(status: int, message: str, headers: dict | None = None, **extra) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)


@app.middleware("http")
async def guard(request: Request, call_next):
    """API key (fail closed) and body size, before anything reads the body."""
    path = request.scope["path"].removeprefix(request.scope.get("root_path", "").rstrip("/"))
    state = request.app.state
    if not allowed(request, path, getattr(state, "auth", "api_key"), getattr(state, "api_key_env", API_KEY_ENV)):
        return error(401, "missing or wrong API key", {"WWW-Authenticate": 'Basic realm="optical-ray"'})
    if request.method in ("POST", "PUT", "PATCH"):
        length = request.headers.get("content-length")
        if length is None:
            return error(411, "a request body needs a Content-Length header")
        if not length.isdigit() or int(length) > MAX_BODY_BYTES:
            return error(413, f"body of {length} bytes: at most {MAX_BODY_BYTES}")
    return await call_next(request)


@app.exception_handler(RequestValidationError)
async def readable_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    def where(loc) -> str:
        parts = [p for p in loc if p != "body"]
        if len(parts) >= 2 and parts[0] == "queries" and isinstance(parts[1], int):
            return f"queries[{parts[1]}]" + "".join(f".{p}" for p in parts[2:])
        return ".".join(str(p) for p in parts) or "body"

    def message(e: dict) -> str:
        if e["type"] == "string_pattern_mismatch":
            return f"{where(e['loc'])} is blank"
        if e["type"] == "string_too_long" and isinstance(e.get("input"), str):
            return f"{where(e['loc'])} has {len(e['input'])} characters (at most {MAX_QUERY_CHARS})"
        return f"{where(e['loc'])}: {e['msg']}"

    return error(422, "; ".join(message(e) for e in exc.errors()),
                 detail=[{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()])


@app.exception_handler(StarletteHTTPException)
async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))


@app.exception_handler(Exception)
async def internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("request failed")
    return error(500, f"internal error ({type(exc).__name__})")


async def retry_once(call):
    """Await a downstream call, once more if the replica that took it died: encoding and searching are
    idempotent, and Serve routes the second try to a live replica (a killed or preempted replica
    then costs its callers latency, not errors)."""
    try:
        return await call()
    except RayActorError as err:
        log.warning("downstream replica lost (%s): retrying once", type(err).__name__)
        return await call()


@serve.deployment(max_ongoing_requests=256)
@serve.ingress(app)
class SearchAPI:
    def __init__(self, encoder: DeploymentHandle, retriever: DeploymentHandle, api_key_env: str = API_KEY_ENV,
                 auth: str = "api_key", model: str = ""):
        check_auth(auth, api_key_env)  # in the replica too: its node's environment is what counts
        if auth == "none":
            log.warning("serving WITHOUT authentication (auth: none): every route is public")
        self.encoder, self.retriever, self.model = encoder, retriever, model
        self.max_in_flight, self.in_flight, self.timeout_s = MAX_IN_FLIGHT, 0, TIMEOUT_S
        self.requests = Counter("optical_ray_search_requests", "/search and /embeddings requests by outcome",
                                tag_keys=("outcome",))
        self.queries = Counter("optical_ray_queries", "queries answered")
        self.latency_ms = Histogram("optical_ray_search_request_latency_ms", "one /search or /embeddings request, end to end",
                                    boundaries=LATENCY_MS)
        app.state.api_key_env, app.state.auth = api_key_env, auth

    def reconfigure(self, config: dict) -> None:
        self.max_in_flight = int(config.get("max_in_flight", MAX_IN_FLIGHT))
        self.timeout_s = float(config.get("timeout_s", TIMEOUT_S))

    @app.post("/search", response_model=SearchResponse, responses=ERRORS)
    async def search(self, request: SearchRequest):
        async def answer() -> dict:
            vectors = await self.embed(request.queries)
            return await retry_once(lambda: self.retriever.search.remote(np.stack(vectors), request.k))

        return await self.guarded(answer, len(request.queries))

    @app.post("/embeddings", response_model=EmbeddingsResponse, responses=ERRORS)
    async def embeddings(self, request: EmbeddingsRequest):
        """Query embeddings (the student's ``query`` prompt, L2-normalised), in OpenAI's response shape."""
        texts = [request.input] if isinstance(request.input, str) else request.input

        async def answer() -> dict:
            vectors = await self.embed(texts)
            return {"object": "list", "model": self.model,
                    "data": [{"object": "embedding", "index": i, "embedding": v.tolist()} for i, v in enumerate(vectors)]}

        return await self.guarded(answer, len(texts))

    async def embed(self, texts: list[str]) -> list[np.ndarray]:
        # One call per text: the encoder's @serve.batch gathers them with other requests' texts.
        return await asyncio.gather(*(retry_once(lambda t=t: self.encoder.remote(t)) for t in texts))

    async def guarded(self, answer, n_queries: int):
        """``answer()`` within the in-flight bound and the timeout, each outcome counted."""
        # Shed load here, with a JSON answer, rather than queueing without bound: a client that waits
        # past its own timeout only makes the replicas work for nobody.
        if self.in_flight >= self.max_in_flight:
            self.requests.inc(tags={"outcome": "shed"})
            return error(503, f"overloaded: {self.in_flight} requests in progress", {"Retry-After": str(RETRY_AFTER_S)})
        self.in_flight += 1
        started = time.perf_counter()
        try:
            result = await asyncio.wait_for(answer(), self.timeout_s)
        except asyncio.TimeoutError:  # the builtin TimeoutError from Python 3.11 on
            self.requests.inc(tags={"outcome": "timeout"})
            return error(504, f"not answered within {self.timeout_s:g} s; the work was cancelled")
        except BackPressureError as err:
            self.requests.inc(tags={"outcome": "shed"})
            return error(503, f"overloaded: {err}", {"Retry-After": str(RETRY_AFTER_S)})
        except asyncio.CancelledError:
            # The client went away: Serve cancels this call, and with it the encoder and retriever
            # calls it awaits, so no replica keeps working for nobody.
            self.requests.inc(tags={"outcome": "cancelled"})
            raise
        finally:
            self.in_flight -= 1
        self.requests.inc(tags={"outcome": "ok"})
        self.queries.inc(n_queries)
        self.latency_ms.observe(1000 * (time.perf_counter() - started))
        return result

    @app.get("/healthz")
    async def healthz(self) -> dict:
        """Liveness for load balancers: open, and it says nothing about the index or the model."""
        return {"status": "ok"}

    @app.get("/status", responses=ERRORS)
    async def status(self) -> dict:
        """The index one Retriever replica serves, and its refused swaps (the last error named)."""
        return {"retriever": await self.retriever.status.remote(), "in_flight": self.in_flight}

    @app.get("/", response_class=HTMLResponse, responses=ERRORS)
    async def page(self) -> str:
        return PAGE.read_text()


def build_app(args: dict) -> serve.Application:
    """``serve run optical_ray.service.app:build_app model=DIR index_uri=URI`` or the ``args`` of serve/config.yaml
    (also ``auth``: api_key | none, ``api_key_env``, and ``encoder_backend``: torch | onnx | onnx-int8)."""
    missing = [k for k in ("model", "index_uri") if not args.get(k)]
    if missing:
        raise ValueError(f"serve app needs the argument(s) {', '.join(missing)} (e.g. model=student-init index_uri=runs/index)")
    auth, api_key_env = args.get("auth", "api_key"), args.get("api_key_env", API_KEY_ENV)
    check_auth(auth, api_key_env)
    backend = args.get("encoder_backend", "torch")
    if backend not in BACKENDS:
        raise ValueError(f"encoder_backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    encoder = QueryEncoder.bind(args["model"], backend)
    retriever = Retriever.bind(args["index_uri"], args["model"])
    return SearchAPI.bind(encoder, retriever, api_key_env, auth, args["model"])
