"""The optical-ray retrieval service on Ray Serve.

Three deployments: ``QueryEncoder`` (the student, with ``@serve.batch`` gathering queries from
concurrent requests into one forward pass), ``Retriever`` (a FAISS index loaded from a local or
s3:// folder; a new ``index_uri`` in its user_config swaps it in while requests keep flowing) and
``SearchAPI`` (the FastAPI ingress: ``POST /search``, ``GET /healthz``, ``GET /`` a search page,
OpenAPI docs at ``/docs``).

    serve run serve.app:build_app model=student-init index_uri=runs/index
    serve deploy serve/config.yaml

When ``OPTICAL_RAY_API_KEY`` is set, every route but ``/healthz`` needs the key, as
``X-API-Key: KEY``, ``Authorization: Bearer KEY`` or HTTP Basic auth with KEY as the password (so a
browser can open the search page); the key is never logged. Set it in the environment of the Ray
node processes (``OPTICAL_RAY_API_KEY=... ray start``, or a Kubernetes Secret in the pod spec), never
in a runtime_env's ``env_vars``: Ray writes those to its logs and keeps them in the cluster state.
The ``api_key_env`` argument names another variable, for apps that need keys of their own.
"""

import asyncio
import base64
import hmac
import logging
import os
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator
from ray import serve
from ray.serve.handle import DeploymentHandle

from optical_ray.index import load_index
from optical_ray.models import Encoder

log = logging.getLogger("ray.serve")

MAX_QUERIES = 64
MAX_QUERY_CHARS = 1000
MAX_K = 100
API_KEY_ENV = "OPTICAL_RAY_API_KEY"
PAGE = Path(__file__).with_name("search.html")


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    queries: list[StrictStr] = Field(min_length=1, max_length=MAX_QUERIES,
                                     description="query texts, in any language the student reads")
    k: StrictInt = Field(10, ge=1, le=MAX_K, description="hits per query")

    @field_validator("queries")
    @classmethod
    def _non_blank_and_bounded(cls, queries: list[str]) -> list[str]:
        for i, query in enumerate(queries):
            if not query.strip():
                raise ValueError(f"queries[{i}] is blank")
            if len(query) > MAX_QUERY_CHARS:
                raise ValueError(f"queries[{i}] has {len(query)} characters (at most {MAX_QUERY_CHARS})")
        return queries


class Hit(BaseModel):
    id: int
    image_id: str
    score: float
    text: str


class SearchResponse(BaseModel):
    results: list[list[Hit]]
    index: str


@serve.deployment(max_ongoing_requests=32)
class QueryEncoder:
    """Embeds one query per call; concurrent calls are batched by ``@serve.batch``."""

    def __init__(self, model: str):
        self.encoder = Encoder.load(model)

    def reconfigure(self, config: dict) -> None:
        self.embed.set_max_batch_size(int(config.get("max_batch_size", 32)))
        self.embed.set_batch_wait_timeout_s(float(config.get("batch_wait_timeout_s", 0.005)))

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def embed(self, queries: list[str]) -> list[np.ndarray]:
        return list(self.encoder.encode(queries, "query", batch_size=len(queries)))

    async def __call__(self, query: str) -> np.ndarray:
        return await self.embed(query)


@serve.deployment(max_ongoing_requests=64)
class Retriever:
    """Holds one FAISS index copy per replica (FAISS is a library, not a server)."""

    def __init__(self, index_uri: str):
        self.state = self._load(index_uri)

    @staticmethod
    def _load(uri: str) -> tuple:
        stored = load_index(uri)
        meta = stored.metadata
        return uri, stored.index, meta["id"].to_pylist(), meta["image_id"].to_pylist(), meta["text"].to_pylist()

    def reconfigure(self, config: dict) -> None:
        """Hot swap: the new index is loaded completely before one assignment replaces the old one,
        so requests in flight finish on the old index and later ones see the new."""
        uri = config.get("index_uri")
        if uri and uri != self.state[0]:
            self.state = self._load(uri)
            log.info("index swapped to %s", uri)

    def search(self, vectors: np.ndarray, k: int) -> dict:
        uri, index, ids, image_ids, texts = self.state
        scores, rows = index.search(np.ascontiguousarray(vectors, dtype=np.float32), k)
        results = [[{"id": ids[r], "image_id": image_ids[r], "score": float(s), "text": texts[r]}
                    for s, r in zip(score_row, row) if r >= 0] for score_row, row in zip(scores, rows)]
        return {"results": results, "index": uri}


app = FastAPI(title="optical-ray search",
              description="Cross-lingual caption retrieval with a distilled multilingual encoder and FAISS.")


def _presented_key(request: Request) -> str | None:
    if key := request.headers.get("x-api-key"):
        return key
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        return value
    if scheme.lower() == "basic":
        try:
            return base64.b64decode(value).decode().partition(":")[2]
        except (ValueError, UnicodeDecodeError):
            return None
    return None


@app.middleware("http")
async def require_api_key(request: Request, call_next):
    expected = os.environ.get(getattr(request.app.state, "api_key_env", API_KEY_ENV))
    path = request.scope["path"].removeprefix(request.scope.get("root_path", "").rstrip("/"))
    if expected and path != "/healthz":
        presented = _presented_key(request)
        if presented is None or not hmac.compare_digest(presented.encode(), expected.encode()):
            return JSONResponse({"error": "missing or wrong API key"}, status_code=401,
                                headers={"WWW-Authenticate": 'Basic realm="optical-ray"'})
    return await call_next(request)


@app.exception_handler(RequestValidationError)
async def readable_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    def where(loc) -> str:
        return ".".join(str(p) for p in loc if p != "body") or "body"

    messages = [f"{where(e['loc'])}: {e['msg']}" for e in exc.errors()]
    return JSONResponse({"error": "; ".join(messages), "detail": [
        {"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]}, status_code=422)


@serve.deployment(max_ongoing_requests=64)
@serve.ingress(app)
class SearchAPI:
    def __init__(self, encoder: DeploymentHandle, retriever: DeploymentHandle, api_key_env: str = API_KEY_ENV):
        self.encoder, self.retriever = encoder, retriever
        app.state.api_key_env = api_key_env

    @app.post("/search", response_model=SearchResponse)
    async def search(self, request: SearchRequest) -> dict:
        vectors = await asyncio.gather(*(self.encoder.remote(q) for q in request.queries))
        return await self.retriever.search.remote(np.stack(vectors), request.k)

    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @app.get("/", response_class=HTMLResponse)
    async def page(self) -> str:
        return PAGE.read_text()


def build_app(args: dict) -> serve.Application:
    """``serve run serve.app:build_app model=DIR index_uri=URI`` or the ``args`` of serve/config.yaml."""
    missing = [k for k in ("model", "index_uri") if not args.get(k)]
    if missing:
        raise ValueError(f"serve app needs the argument(s) {', '.join(missing)} (e.g. model=student-init index_uri=runs/index)")
    encoder = QueryEncoder.bind(args["model"])
    retriever = Retriever.bind(args["index_uri"])
    return SearchAPI.bind(encoder, retriever, args.get("api_key_env", API_KEY_ENV))
