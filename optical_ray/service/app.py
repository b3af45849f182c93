"""The optical-ray retrieval service on Ray Serve.

Three deployments: ``QueryEncoder`` (the student, with ``@serve.batch`` gathering queries from
concurrent requests into one forward pass), ``Retriever`` (one version of a FAISS index, from a local
or s3:// folder) and ``SearchAPI`` (the FastAPI ingress: ``POST /search``; ``POST /v1/embeddings`` and
``/embeddings``, OpenAI's embeddings API, so its SDKs, LangChain and LlamaIndex work with
``base_url`` pointed here; ``GET /healthz`` (alive), ``GET /readyz`` (an index is loaded and the
encoder answers), ``GET /status``, ``GET /`` a search page, OpenAPI docs at ``/docs``).

    serve run optical_ray.service.app:build_app model=student-init index_uri=runs/index
    serve deploy serve/config.yaml

One index version at a time: ``build_app`` resolves the index root's ``CURRENT`` once, when the app is
deployed, and every Retriever replica (autoscaled or restarted ones too) serves that version; a
replica never re-reads ``CURRENT`` itself. A rebuild reaches the replicas through the deployment:
``serve deploy`` again (Serve replaces the replicas) or, in place, Retriever's user_config
``{index_uri: ROOT, version: V}``. Every answer names the version it came from. A swap to an index
that cannot be used (missing, checksum mismatch, another model or dimension, a root without a
version) is refused: the replica keeps serving what it has, and ``/status``, ``/readyz`` and the
``optical_ray_index_swap_refused`` gauge say so until the config is mended.

Fails closed (:mod:`optical_ray.service.auth`): every route but ``/healthz`` and ``/readyz`` needs a
client's key, and with no key to check the app refuses to start (unless ``auth: none`` on purpose).
Keys are per client (``auth: keys``, a file of SHA-256 digests, re-read when it changes), each with a
rate limit (:mod:`optical_ray.service.quota`: 429 + ``Retry-After``) and its own request metrics.
Keep keys in the node environment or a mounted Secret, never in a runtime_env's ``env_vars``: Ray
writes those to its logs and keeps them in the cluster state.

Bounded: bodies over ``MAX_BODY_BYTES`` get 413 before they are read; when a request would take a
SearchAPI replica past ``max_in_flight`` requests or ``max_queries_in_flight`` queries in progress
(its user_config), or a deployment's queue is full
(``max_queued_requests``; Serve answers for SearchAPI's own with its ``backpressure_config``), the
answer is 503 with ``Retry-After``; ``http_options.request_timeout_s`` caps a request's life. Every
error is JSON (OpenAI's error shape on the OpenAI routes) and documented in the OpenAPI schema
(:mod:`optical_ray.service.schemas`).

Operable: every response carries ``X-Request-ID`` (the caller's, when sent: Serve's proxy keeps it),
and every request leaves one JSON line on the replica's stdout (logger ``optical_ray.access``):
request id, client name, method, route, status, latency, never a key or a query text.
"""

import asyncio
import base64
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from ray import serve
from ray.exceptions import RayActorError, RayError
from ray.serve.exceptions import BackPressureError, RayServeException
from ray.serve.handle import DeploymentHandle
from ray.serve.metrics import Counter, Gauge, Histogram
from starlette.exceptions import HTTPException as StarletteHTTPException

from optical_ray import storage
from optical_ray.index import CURRENT_FILE, FilterError, Searchable, load_index, resolve_version
from optical_ray.model_store import resolve_model
from optical_ray.onnx_encoder import BACKENDS, load_query_encoder
from optical_ray.service.auth import API_KEY_ENV, OPEN_PATHS, KeyRing, check_auth, presented_key
from optical_ray.service.quota import RateLimiter
from optical_ray.service.schemas import (
    ERRORS,
    MAX_BODY_BYTES,
    MAX_QUERY_CHARS,
    OPENAI_ERRORS,
    EmbeddingsRequest,
    EmbeddingsResponse,
    SearchRequest,
    SearchResponse,
)
from optical_ray.st_folder import embedding_dimension

log = logging.getLogger("ray.serve")
access_log = logging.getLogger("optical_ray.access")

MAX_IN_FLIGHT = 64
MAX_QUERIES_IN_FLIGHT = 256  # a 64-query request is 64 times the work of a 1-query one
TIMEOUT_S = 25.0  # below serve/config.yaml's request_timeout_s (30), so the app answers first, in JSON
RETRY_AFTER_S = 1
READY_TIMEOUT_S = 10.0
OPENAI_PATHS = ("/embeddings", "/v1/embeddings")
ROUTES = ("/search", *OPENAI_PATHS, *OPEN_PATHS, "/status", "/", "/docs", "/openapi.json")
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
    async def embed(self, queries: list[str]) -> list[tuple[np.ndarray, int]]:
        """Each query's embedding and the number of tokens the encoder read for it (prompt and
        special tokens included: OpenAI's ``usage``), from one tokenising and one forward pass."""
        started = time.perf_counter()
        batch = self.encoder.tokenize(queries, "query")
        vectors = self.encoder.embed_tokens(batch)
        self.encode_ms.observe(1000 * (time.perf_counter() - started))
        self.batch_size.observe(len(queries))
        return list(zip(vectors, batch["attention_mask"].sum(1).tolist()))

    async def __call__(self, query: str) -> tuple[np.ndarray, int]:
        return await self.embed(query)

    def dimension(self) -> int:
        return int(self.encoder.dim)


class IndexMismatchError(ValueError):
    """A stored index that cannot serve this app's encoder."""


def local_model_id(model: str) -> str:
    """The same model named the same way: local folders by absolute path, names and URIs as given."""
    return model if model.startswith("s3://") or not os.path.exists(model) else os.path.abspath(model)


def pinned_index(uri: str, version: str | None = None) -> str:
    """The version folder to serve: ``uri/version``, a version folder as given, or (only here, once per
    deploy) the version a root's ``CURRENT`` names."""
    return storage.join(uri, version) if version else resolve_version(uri)


@serve.deployment(max_ongoing_requests=64)
class Retriever:
    """Holds one FAISS index copy per replica (FAISS is a library, not a server).

    ``index_uri`` is a version folder (``build_app`` pins it). Retriever's user_config may swap in
    another version in place: ``{index_uri: ROOT, version: V}`` or ``{index_uri: VERSION_FOLDER}``;
    a root alone is refused, because each replica would resolve ``CURRENT`` at its own moment. A swap
    that fails keeps the current index serving and is reported until the config is mended.
    """

    def __init__(self, index_uri: str, model: str):
        self.default_uri, self.model = index_uri, local_model_id(model)
        self.dim = embedding_dimension(resolve_model(model))  # what the encoder makes, Dense layers included
        self.state: tuple[str, Searchable] | None = None  # (uri, the index it holds)
        self.failed_swaps, self.last_error, self.configured, self.wanted = 0, None, False, index_uri
        self.search_ms = Histogram("optical_ray_search_latency_ms", "one FAISS search call", boundaries=LATENCY_MS)
        self.hits = Counter("optical_ray_hits", "hits returned")
        self.swap_failures = Counter("optical_ray_failed_index_swaps", "index swaps refused (the old index kept serving)")
        self.swap_refused = Gauge("optical_ray_index_swap_refused",
                                  "1 while this replica serves another index than its config asks for (a refused swap)")
        self.index_loads = Counter("optical_ray_index_loads", "index versions loaded (the latest is served)",
                                   tag_keys=("index", "version"))

    def _load(self, uri: str) -> tuple:
        if storage.exists(storage.join(uri, CURRENT_FILE)):
            raise IndexMismatchError(f"{uri} is an index root: name the version to serve (user_config version: V, "
                                     f"or a version folder), so every replica serves the same one; its {CURRENT_FILE} "
                                     f"names {resolve_version(uri).rsplit('/', 1)[-1]}")
        stored = load_index(uri)
        built_with = stored.manifest.get("model")
        if built_with is not None and local_model_id(built_with) != self.model:
            raise IndexMismatchError(f"{uri} was built with model {built_with!r}, this app encodes with {self.model!r}")
        if stored.index.d != self.dim:
            raise IndexMismatchError(f"{uri} holds {stored.index.d}-d vectors, the encoder makes {self.dim}-d ones")
        return uri, Searchable(stored)

    def _swap(self, uri: str) -> None:
        """Load ``uri`` completely, then replace the old index with one assignment, so requests in flight
        finish on the old index; on failure keep the old one (or, with none yet, fail the replica)."""
        self.wanted = uri
        if self.state is not None and uri == self.state[0]:
            self.swap_refused.set(0)
            return
        try:
            state = self._load(uri)
        except Exception as err:  # any failure to load is a refused swap, never an outage
            self.failed_swaps += 1
            self.swap_failures.inc()
            self.last_error = f"{uri}: {type(err).__name__}: {err}"
            if self.state is None:
                raise
            self.swap_refused.set(1)
            log.error("index swap refused, still serving %s: %s", self.state[0], self.last_error)
            return
        self.state = state
        self.swap_refused.set(0)
        self.index_loads.inc(tags={"index": uri, "version": str(state[1].version)})
        log.info("index swapped to %s (version %s)", uri, state[1].version)

    def reconfigure(self, config: dict) -> None:
        """``index_uri`` and ``version`` (see the class); an empty user_config serves the pinned default."""
        self.configured = True
        uri = config.get("index_uri")
        self._swap(storage.join(uri, config["version"]) if uri and config.get("version") else uri or self.default_uri)

    def _current(self) -> tuple:
        if self.state is None and not self.configured:
            self._swap(self.default_uri)
        return self.state

    def check_health(self) -> None:
        """Serve's readiness probe: a replica without a usable index is not healthy."""
        if self._current() is None:
            raise RuntimeError(f"no usable index: {self.last_error}")

    def status(self) -> dict:
        uri, served = self._current()
        return {"index": uri, "version": served.version, "count": int(served.index.ntotal), "dim": int(served.index.d),
                "configured": self.wanted, "swap_refused": uri != self.wanted,
                "failed_swaps": self.failed_swaps, "last_error": self.last_error}

    def search(self, vectors: np.ndarray, k: int, where: dict | None = None) -> dict:
        """Hits of each query (only rows whose metadata match ``where``); a filter on a field the index
        does not have answers ``{"error": ...}``, which the API turns into a 400 naming the field."""
        uri, served = self._current()
        started = time.perf_counter()
        try:
            results = served.search(vectors, k, where)
        except FilterError as err:
            return {"error": str(err)}
        self.search_ms.observe(1000 * (time.perf_counter() - started))
        self.hits.inc(sum(len(hits) for hits in results))
        return {"results": results, "index": uri, "version": served.version}


app = FastAPI(title="optical-ray search",
              description="Cross-lingual caption retrieval with a distilled multilingual encoder and FAISS.")


def openapi_schema() -> dict:
    """FastAPI's schema, less the 422 it lists on every route with a body: the OpenAI routes answer 400."""
    if app.openapi_schema is None:
        schema = FastAPI.openapi(app)  # builds and caches app.openapi_schema
        for path in OPENAI_PATHS:
            schema["paths"].get(path, {}).get("post", {}).get("responses", {}).pop("422", None)
    return app.openapi_schema


app.openapi = openapi_schema

OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 429: "rate_limit_error"}


def error(status: int, message: str, headers: dict | None = None, *, openai: bool = False, param: str | None = None,
          **extra) -> JSONResponse:
    """An error answer: ``{"error": message}``, or OpenAI's shape on its routes (``openai``)."""
    if openai:
        kind = OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    else:
        body = {"error": message, **extra}
    return JSONResponse(body, status_code=status, headers=headers)


def route_of(request: Request) -> str:
    return request.scope["path"].removeprefix(request.scope.get("root_path", "").rstrip("/")) or "/"


def is_openai(request: Request) -> bool:
    return route_of(request) in OPENAI_PATHS


@app.middleware("http")
async def guard(request: Request, call_next):
    """Per request, before anything reads the body: the client's key (fail closed), its rate limit
    and the body size; after it, one JSON access-log line and the per-client metric."""
    started, state, path = time.perf_counter(), request.app.state, route_of(request)
    client, status = None, 500
    openai = path in OPENAI_PATHS
    try:
        keys: KeyRing | None = getattr(state, "keys", None)
        if keys is not None and path not in OPEN_PATHS:
            client = keys.client(presented_key(request))
            if client is None:
                status = 401
                return error(401, "missing or wrong API key", {"WWW-Authenticate": 'Basic realm="optical-ray"'}, openai=openai)
            wait = state.limiter.retry_after(client.name, client.requests_per_s, client.burst)
            if wait:
                status = 429
                return error(429, f"rate limit of client {client.name!r} reached: retry in {wait} s",
                             {"Retry-After": str(wait)}, openai=openai)
        if request.method in ("POST", "PUT", "PATCH"):
            length = request.headers.get("content-length")
            if length is None:
                status = 411
                return error(411, "a request body needs a Content-Length header", openai=openai)
            if not length.isdigit() or int(length) > MAX_BODY_BYTES:
                status = 413
                return error(413, f"body of {length} bytes: at most {MAX_BODY_BYTES}", openai=openai)
        response = await call_next(request)
        status = response.status_code
        return response
    finally:
        latency_ms = 1000 * (time.perf_counter() - started)
        name = client.name if client else ("-" if keys is None or path in OPEN_PATHS else "unknown")
        access_log.info(json.dumps({
            "ts": round(time.time(), 3), "request_id": request.headers.get("x-request-id", "")[:128],
            "client": name, "method": request.method, "route": path, "status": status,
            "latency_ms": round(latency_ms, 2)}))
        if hasattr(state, "http_requests"):
            # Unknown paths share one tag, so scanners cannot grow the metric's series without bound.
            state.http_requests.inc(tags={"client": name, "route": path if path in ROUTES else "other",
                                          "status": str(status)})


@app.exception_handler(RequestValidationError)
async def readable_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    def where(loc) -> str:
        # Drop "body" and the names pydantic gives the branches of a union ("str", "list[...]").
        parts = [p for p in loc if p != "body" and not (isinstance(p, str) and p.startswith(("str", "list[", "constrained-")))]
        if len(parts) >= 2 and isinstance(parts[1], int):
            return f"{parts[0]}[{parts[1]}]" + "".join(f".{p}" for p in parts[2:])
        return ".".join(str(p) for p in parts) or "body"

    def message(e: dict) -> str:
        if e["type"] == "string_pattern_mismatch":
            return f"{where(e['loc'])} is blank"
        if e["type"] == "string_too_long" and isinstance(e.get("input"), str):
            return f"{where(e['loc'])} has {len(e['input'])} characters (at most {MAX_QUERY_CHARS})"
        return f"{where(e['loc'])}: {e['msg']}"

    errors = exc.errors()
    text = "; ".join(dict.fromkeys(message(e) for e in errors))
    if is_openai(request):
        return error(400, text, openai=True, param=where(errors[0]["loc"]).split("[")[0] if errors else None)
    return error(422, text, detail=[{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in errors])


@app.exception_handler(StarletteHTTPException)
async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return error(exc.status_code, str(exc.detail), getattr(exc, "headers", None), openai=is_openai(request))


@app.exception_handler(Exception)
async def internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("request failed")
    return error(500, f"internal error ({type(exc).__name__})", openai=is_openai(request))


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
                 auth: str = "api_key", model: str = "", api_keys_file: str | None = None, rate_limit: dict | None = None):
        check_auth(auth, api_key_env, api_keys_file)  # in the replica too: its node's environment is what counts
        if auth == "none":
            log.warning("serving WITHOUT authentication (auth: none): every route is public")
        self.encoder, self.retriever, self.model, self.dim = encoder, retriever, model, None
        self.max_in_flight, self.in_flight, self.timeout_s = MAX_IN_FLIGHT, 0, TIMEOUT_S
        self.max_queries, self.queries_in_flight = MAX_QUERIES_IN_FLIGHT, 0
        self.requests = Counter("optical_ray_search_requests", "/search and /embeddings requests by outcome",
                                tag_keys=("outcome",))
        self.queries = Counter("optical_ray_queries", "queries answered")
        self.latency_ms = Histogram("optical_ray_search_request_latency_ms", "one /search or /embeddings request, end to end",
                                    boundaries=LATENCY_MS)
        app.state.keys = None if auth == "none" else KeyRing(api_keys_file if auth == "keys" else None, api_key_env)
        app.state.limiter = RateLimiter(**(rate_limit or {}))
        app.state.http_requests = Counter("optical_ray_http_requests", "HTTP requests by client (key name), route and status",
                                          tag_keys=("client", "route", "status"))
        if not access_log.handlers:  # one JSON object per line on stdout, no prefix: what log shippers parse
            handler = logging.StreamHandler(sys.__stdout__)  # the process's own, past any redirection of sys.stdout
            handler.setFormatter(logging.Formatter("%(message)s"))
            access_log.addHandler(handler)
            access_log.setLevel(logging.INFO)
            access_log.propagate = False

    def reconfigure(self, config: dict) -> None:
        self.max_in_flight = int(config.get("max_in_flight", MAX_IN_FLIGHT))
        self.max_queries = int(config.get("max_queries_in_flight", MAX_QUERIES_IN_FLIGHT))
        self.timeout_s = float(config.get("timeout_s", TIMEOUT_S))

    def admits(self, n_queries: int) -> bool:
        """Whether a request of ``n_queries`` may start: both bounds, on requests and on queries in
        flight. Admission by queries is what keeps goodput under overload: admit only the work the
        encoders finish within timeout_s, shed the rest at once. A request alone is always admitted
        (however large, waiting would not make it fit), unless a bound is 0 (drained on purpose)."""
        if self.in_flight >= self.max_in_flight or self.max_queries == 0:
            return False
        return self.queries_in_flight == 0 or self.queries_in_flight + n_queries <= self.max_queries

    # Hits leave out what their index has not: image_id (collections), metadata (caption indexes).
    @app.post("/search", response_model=SearchResponse, response_model_exclude_none=True, responses=ERRORS)
    async def search(self, request: SearchRequest):
        async def answer() -> dict | JSONResponse:
            vectors = [vector for vector, _ in await self.embed(request.queries)]
            found = await retry_once(lambda: self.retriever.search.remote(np.stack(vectors), request.k, request.filter))
            return error(400, found["error"]) if "error" in found else found

        return await self.guarded(answer, len(request.queries))

    @app.post("/v1/embeddings", response_model=EmbeddingsResponse, responses=OPENAI_ERRORS)
    @app.post("/embeddings", response_model=EmbeddingsResponse, responses=OPENAI_ERRORS)
    async def embeddings(self, request: EmbeddingsRequest):
        """OpenAI's embeddings API: query embeddings (the student's ``query`` prompt, L2-normalised)."""
        texts = [request.input] if isinstance(request.input, str) else request.input
        if self.dim is None:
            self.dim = await retry_once(lambda: self.encoder.dimension.remote())
        if request.dimensions is not None and request.dimensions != self.dim:
            return error(400, f"dimensions: this model makes {self.dim}-d vectors and cannot shorten them; "
                              f"send dimensions: {self.dim} or leave it out", openai=True, param="dimensions")

        def encoded(vector: np.ndarray) -> list[float] | str:
            if request.encoding_format == "base64":
                return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()
            return vector.tolist()

        async def answer() -> dict:
            embedded = await self.embed(texts)
            tokens = sum(n for _, n in embedded)
            return {"object": "list", "model": self.model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                    "data": [{"object": "embedding", "index": i, "embedding": encoded(v)} for i, (v, _) in enumerate(embedded)]}

        return await self.guarded(answer, len(texts), openai=True)

    async def embed(self, texts: list[str]) -> list[tuple[np.ndarray, int]]:
        """Each text's embedding and token count."""
        # One call per text: the encoder's @serve.batch gathers them with other requests' texts.
        return await asyncio.gather(*(retry_once(lambda t=t: self.encoder.remote(t)) for t in texts))

    async def guarded(self, answer, n_queries: int, openai: bool = False):
        """``answer()`` within the in-flight bound and the timeout, each outcome counted."""
        # Shed load here, with a JSON answer, rather than queueing without bound: a client that waits
        # past its own timeout only makes the replicas work for nobody.
        if not self.admits(n_queries):
            self.requests.inc(tags={"outcome": "shed"})
            return error(503, f"overloaded: {self.in_flight} requests ({self.queries_in_flight} queries) in progress",
                         {"Retry-After": str(RETRY_AFTER_S)}, openai=openai)
        self.in_flight += 1
        self.queries_in_flight += n_queries
        started = time.perf_counter()
        try:
            result = await asyncio.wait_for(answer(), self.timeout_s)
        except asyncio.TimeoutError:  # the builtin TimeoutError from Python 3.11 on
            self.requests.inc(tags={"outcome": "timeout"})
            return error(504, f"not answered within {self.timeout_s:g} s; the work was cancelled", openai=openai)
        except BackPressureError as err:
            self.requests.inc(tags={"outcome": "shed"})
            return error(503, f"overloaded: {err}", {"Retry-After": str(RETRY_AFTER_S)}, openai=openai)
        except asyncio.CancelledError:
            # The client went away: Serve cancels this call, and with it the encoder and retriever
            # calls it awaits, so no replica keeps working for nobody.
            self.requests.inc(tags={"outcome": "cancelled"})
            raise
        finally:
            self.in_flight -= 1
            self.queries_in_flight -= n_queries
        self.requests.inc(tags={"outcome": "ok"})
        self.queries.inc(n_queries)
        self.latency_ms.observe(1000 * (time.perf_counter() - started))
        return result

    @app.get("/healthz")
    async def healthz(self) -> dict:
        """Liveness: the process answers. Open, and it says nothing about the index or the model."""
        return {"status": "ok"}

    @app.get("/readyz", responses={503: ERRORS[503]})
    async def readyz(self):
        """Readiness: a Retriever replica has an index loaded and the encoder embeds a probe query.
        Open (for load balancers and Kubernetes probes); a refused index swap is named, not hidden."""
        async def probe() -> dict:
            status, _ = await asyncio.gather(self.retriever.status.remote(), self.encoder.remote("readiness probe"))
            return status

        try:
            status = await asyncio.wait_for(probe(), READY_TIMEOUT_S)
        except (RayError, RayServeException, TimeoutError) as err:  # not ready: say why, and when to ask again
            return error(503, f"not ready: {type(err).__name__}", {"Retry-After": str(RETRY_AFTER_S)})
        if status["swap_refused"]:
            return {"status": "ready", "warning": "the configured index was refused; an older version serves (see /status)"}
        return {"status": "ready"}

    @app.get("/status", responses=ERRORS)
    async def status(self) -> dict:
        """The index one Retriever replica serves, the one its config asks for, and its refused swaps."""
        return {"retriever": await self.retriever.status.remote(), "in_flight": self.in_flight,
                "queries_in_flight": self.queries_in_flight}

    @app.get("/", response_class=HTMLResponse, responses=ERRORS)
    async def page(self) -> str:
        return PAGE.read_text()


def build_app(args: dict) -> serve.Application:
    """``serve run optical_ray.service.app:build_app model=DIR index_uri=URI`` or the ``args`` of
    serve/config.yaml: also ``auth`` (keys | api_key | none), ``api_keys_file``, ``api_key_env``,
    ``rate_limit`` ({requests_per_s, burst}: each client's default) and ``encoder_backend`` (torch |
    onnx | onnx-int8). ``index_uri``'s current version is resolved here, once per deploy."""
    missing = [k for k in ("model", "index_uri") if not args.get(k)]
    if missing:
        raise ValueError(f"serve app needs the argument(s) {', '.join(missing)} (e.g. model=student-init index_uri=runs/index)")
    auth, api_key_env, keys_file = args.get("auth", "api_key"), args.get("api_key_env", API_KEY_ENV), args.get("api_keys_file")
    check_auth(auth, api_key_env, keys_file)
    rate_limit = args.get("rate_limit") or None
    if rate_limit is not None:
        unknown = set(rate_limit) - {"requests_per_s", "burst"}
        if unknown:
            raise ValueError(f"serve app arg rate_limit takes requests_per_s and burst, not {', '.join(sorted(unknown))}")
        RateLimiter(**rate_limit)  # its own checks, here, before any replica starts
    backend = args.get("encoder_backend", "torch")
    if backend not in BACKENDS:
        raise ValueError(f"encoder_backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    encoder = QueryEncoder.bind(args["model"], backend)
    retriever = Retriever.bind(pinned_index(args["index_uri"], args.get("index_version")), args["model"])
    return SearchAPI.bind(encoder, retriever, api_key_env, auth, args["model"], keys_file, rate_limit)
