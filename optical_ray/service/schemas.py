"""What the service's HTTP API accepts and answers: the request and response models, the limits they
state, and the documented error responses. The OpenAPI schema at ``/openapi.json`` is generated from
these, so a client generated from it refuses what the server refuses."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, StringConstraints, field_validator

MAX_QUERIES = 64
MAX_QUERY_CHARS = 1000
MAX_K = 100
# A full request (64 queries of 1,000 characters, 4 bytes each in UTF-8 at worst) and JSON overhead.
MAX_BODY_BYTES = 512 * 1024

# "\S": at least one non-space character, in a form JSON Schema states too (a blank query is refused
# by a generated client as by the server).
Query = Annotated[StrictStr, StringConstraints(min_length=1, max_length=MAX_QUERY_CHARS, pattern=r"\S")]


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    queries: list[Query] = Field(min_length=1, max_length=MAX_QUERIES,
                                 description="query texts, in any language the student reads; none blank, "
                                             f"each at most {MAX_QUERY_CHARS} characters")
    k: StrictInt = Field(10, ge=1, le=MAX_K, description="hits per query")


class EmbeddingsRequest(BaseModel):
    """OpenAI's embeddings request shape (what infinity-emb, TEI and vLLM accept too)."""

    model_config = ConfigDict(extra="forbid")
    input: Query | list[Query] = Field(description=f"one query text or a list of 1 to {MAX_QUERIES}; none blank, "
                                                   f"each at most {MAX_QUERY_CHARS} characters")
    model: StrictStr | None = Field(None, description="ignored: the app serves one model")

    @field_validator("input")
    @classmethod
    def _bounded(cls, value):
        if isinstance(value, list) and not 1 <= len(value) <= MAX_QUERIES:
            raise ValueError(f"must hold 1 to {MAX_QUERIES} texts, got {len(value)}")
        return value


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float]


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str


class ErrorResponse(BaseModel):
    error: str = Field(description="what was wrong, naming the field for client errors")
    detail: list[dict] | None = Field(None, description="one entry per invalid field (422 only)")


ERRORS = {status: {"model": ErrorResponse, "description": text} for status, text in {
    400: "malformed request", 401: "missing or wrong API key", 411: "a body without Content-Length",
    413: f"body over {MAX_BODY_BYTES} bytes", 422: "a field is invalid (named in `error`)",
    500: "internal error", 503: "overloaded or no usable index: retry after `Retry-After` seconds",
    504: "not answered within the app's timeout_s (the work is cancelled)"}.items()}
# Answered by Serve's proxy, before the app, in plain text: past http_options.request_timeout_s (or a
# client's shorter x-request-timeout-seconds), and when SearchAPI's own max_queued_requests is full.
PLAIN = {"text/plain": {"schema": {"type": "string"}}}
ERRORS[408] = {"description": "request timed out (Serve's proxy, plain text)", "content": PLAIN}
ERRORS[503]["content"] = {"application/json": {"schema": ErrorResponse.model_json_schema()}, **PLAIN}


class Hit(BaseModel):
    id: int
    image_id: str
    score: float
    text: str


class SearchResponse(BaseModel):
    results: list[list[Hit]]
    index: str
