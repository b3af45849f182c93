"""The API key rule on its own (the served app's 401s are in tests/test_serve.py)."""

import base64

import pytest
from starlette.requests import Request

from optical_ray.service.auth import allowed, check_auth

ENV = "OPTICAL_RAY_AUTH_TEST_KEY"


def request(**headers) -> Request:
    return Request({"type": "http", "headers": [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()]})


def basic(password: str) -> str:
    return "Basic " + base64.b64encode(f"anyone:{password}".encode()).decode()


@pytest.mark.parametrize("headers", [{"x_api_key": "s3cret"}, {"authorization": "Bearer s3cret"},
                                     {"authorization": basic("s3cret")}])
def test_the_key_is_accepted_in_each_form(monkeypatch, headers):
    monkeypatch.setenv(ENV, "s3cret")
    assert allowed(request(**headers), "/search", "api_key", ENV)


@pytest.mark.parametrize("headers", [{}, {"x_api_key": "wrong"}, {"authorization": "Bearer "},
                                     {"authorization": basic("wrong")}, {"authorization": "Basic %%%"},
                                     {"authorization": "Token s3cret"}])
def test_anything_else_is_refused(monkeypatch, headers):
    monkeypatch.setenv(ENV, "s3cret")
    assert not allowed(request(**headers), "/search", "api_key", ENV)


def test_fails_closed_without_a_key_in_the_environment(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert not allowed(request(x_api_key=""), "/search", "api_key", ENV)
    with pytest.raises(RuntimeError, match=f"refusing to start without an API key: set {ENV}"):
        check_auth("api_key", ENV)
    check_auth("none", ENV)  # open on purpose
    assert allowed(request(), "/search", "none", ENV)
    assert allowed(request(), "/healthz", "api_key", ENV)
    with pytest.raises(ValueError, match="auth must be api_key or none, got 'off'"):
        check_auth("off", ENV)
