"""What the service's HTTP API accepts and answers: the request and response models, the limits they
state, and the documented error responses. The OpenAPI schema at ``/openapi.json`` is generated from
these, so a client generated from it refuses what the server refuses."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    StringConstraints,
)

MAX_QUERIES = 64
MAX_QUERY_CHARS = 1000
MAX_K = 100
# A full request (64 queries of 1,000 characters, 4 bytes each in UTF-8 at worst) and JSON overhead.
MAX_BODY_BYTES = 512 * 1024

def json_integer(value):
    """An integer as JSON Schema says: 82 and 82.0, never 82.5, "82" or true (what the schema states,
    so a client generated from it is never refused)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError("must be an integer")  # noqa: TRY004 -- pydantic turns only ValueError into a 4xx
    return value


JsonInt = Annotated[int, BeforeValidator(json_integer)]

# "\S": at least one non-space character, in a form JSON Schema states too (a blank query is refused
# by a generated client as by the server).
Query = Annotated[StrictStr, StringConstraints(min_length=1, max_length=MAX_QUERY_CHARS, pattern=r"\S")]


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    queries: list[Query] = Field(min_length=1, max_length=MAX_QUERIES,
                                 description="query texts, in any language the student reads; none blank, "
                                             f"each at most {MAX_QUERY_CHARS} characters")
    k: JsonInt = Field(10, ge=1, le=MAX_K, description="hits per query")
    filter: dict[str, StrictStr | StrictBool | StrictInt | StrictFloat] | None = Field(
        None, max_length=8, description="only documents whose metadata equal every field: value given, e.g. "
                                        '{"lang": "sw"} (applied inside FAISS; a field the index lacks is a 400)')


class EmbeddingsRequest(BaseModel):
    """OpenAI's embeddings request (what its SDKs, LangChain, LlamaIndex, infinity-emb, TEI and vLLM send)."""

    model_config = ConfigDict(extra="forbid")
    input: Query | Annotated[list[Query], Field(min_length=1, max_length=MAX_QUERIES)] = Field(
        description=f"one query text or a list of 1 to {MAX_QUERIES}; none blank, each at most {MAX_QUERY_CHARS} "
                    "characters (token arrays are not accepted: send text)")
    model: StrictStr | None = Field(None, description="ignored: the app serves one model (named in the response)")
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="float: a list of numbers; base64: the little-endian float32 bytes, base64-encoded "
                             "(the OpenAI SDK's default)")
    dimensions: JsonInt | None = Field(None, ge=1, description="must equal the model's dimension when given: "
                                                                 "this model's vectors are not truncatable")
    user: StrictStr | None = Field(None, max_length=256, description="the end user's id (accepted and not stored)")


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(description="the vector, or its base64 float32 bytes")


class Usage(BaseModel):
    prompt_tokens: int = Field(description="tokens the encoder read (the query prompt and special tokens included)")
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


class OpenAIErrorBody(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, authentication_error, rate_limit_error or server_error")
    param: str | None = Field(None, description="the request field at fault, when one is")
    code: str | None = None


class OpenAIError(BaseModel):
    """The error shape OpenAI's API answers with, on the OpenAI-compatible routes."""

    error: OpenAIErrorBody


class ErrorResponse(BaseModel):
    error: str = Field(description="what was wrong, naming the field for client errors")
    detail: list[dict] | None = Field(None, description="one entry per invalid field (422 only)")


ERRORS = {status: {"model": ErrorResponse, "description": text} for status, text in {
    400: "malformed request", 401: "missing or wrong API key", 411: "a body without Content-Length",
    413: f"body over {MAX_BODY_BYTES} bytes", 422: "a field is invalid (named in `error`)",
    429: "this key's rate limit is spent: retry after `Retry-After` seconds", 500: "internal error", 503: "overloaded or no usable index: retry after `Retry-After` seconds",
    504: "not answered within the app's timeout_s (the work is cancelled)"}.items()}
# Answered by Serve's proxy, before the app, in plain text: past http_options.request_timeout_s (or a
# client's shorter x-request-timeout-seconds), and when SearchAPI's own max_queued_requests is full.
PLAIN = {"text/plain": {"schema": {"type": "string"}}}
ERRORS[408] = {"description": "request timed out (Serve's proxy, plain text)", "content": PLAIN}
ERRORS[503]["content"] = {"application/json": {"schema": ErrorResponse.model_json_schema()}, **PLAIN}

# The OpenAI-compatible routes answer errors as OpenAI does: its shape, and 400 for an invalid field.
OPENAI_ERRORS = {status: {**spec, "model": OpenAIError} for status, spec in ERRORS.items() if status not in (408, 422)}
OPENAI_ERRORS[400] = {"model": OpenAIError, "description": "a field is invalid (named in `error.param`)"}
OPENAI_ERRORS[408] = ERRORS[408]
OPENAI_ERRORS[503]["content"] = PLAIN  # and application/json, from the model


class Hit(BaseModel):
    id: int | str = Field(description="the row of a caption index, or a collection's own document id")
    image_id: str | None = Field(None, description="caption indexes: the image the caption describes")
    score: float
    text: str
    metadata: dict[str, str | bool | int | float | None] | None = Field(
        None, description="collections: the document's metadata fields")


class SearchResponse(BaseModel):
    results: list[list[Hit]]
    index: str = Field(description="the index folder the hits come from")
    version: str | None = Field(description="the index version every hit comes from (its manifest's version)")
