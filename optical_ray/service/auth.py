"""The service's API key: fail closed.

Every route but ``OPEN_PATHS`` needs the key held in an environment variable (``OPTICAL_RAY_API_KEY``
unless the app's ``api_key_env`` names another), presented as ``X-API-Key: KEY``, ``Authorization:
Bearer KEY`` or HTTP Basic auth with KEY as the password (so a browser can open the search page). No
key in the environment: no start, unless the app says ``auth: none`` on purpose. The key is compared
in constant time and never logged.
"""

import base64
import hmac
import os

from starlette.requests import Request

API_KEY_ENV = "OPTICAL_RAY_API_KEY"
OPEN_PATHS = ("/healthz",)
MODES = ("api_key", "none")


def check_auth(auth: str, api_key_env: str) -> None:
    """Refuse to start open by accident: a key in ``api_key_env``, or ``auth: none`` said explicitly."""
    if auth not in MODES:
        raise ValueError(f"serve app arg auth must be api_key or none, got {auth!r}")
    if auth == "api_key" and not os.environ.get(api_key_env):
        raise RuntimeError(f"refusing to start without an API key: set {api_key_env} in the environment of the Ray "
                           "nodes (a Kubernetes Secret on KubeRay), or serve without one on purpose with the app "
                           "arg auth: none")


def allowed(request: Request, path: str, auth: str, api_key_env: str) -> bool:
    """Whether ``request`` may reach ``path``: an open path, an open app, or the right key presented."""
    if auth == "none" or path in OPEN_PATHS:
        return True
    expected, presented = os.environ.get(api_key_env), presented_key(request)
    return bool(expected) and presented is not None and hmac.compare_digest(presented.encode(), expected.encode())


def presented_key(request: Request) -> str | None:
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
