"""Who may call the service, on its own: key forms, key files re-read on change, fail-closed starts,
and the per-client token bucket (the served app's 401s and 429s are in tests/test_serve.py)."""

import base64
import os

import pytest
from starlette.requests import Request

from optical_ray.cli import main as cli
from optical_ray.service import auth
from optical_ray.service.auth import KeyFileError, KeyRing, add_key, check_auth, digest, presented_key, revoke_key
from optical_ray.service.quota import Bucket, RateLimiter

ENV = "OPTICAL_RAY_AUTH_TEST_KEY"


def request(**headers) -> Request:
    return Request({"type": "http", "headers": [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()]})


def basic(password: str) -> str:
    return "Basic " + base64.b64encode(f"anyone:{password}".encode()).decode()


def caller(ring: KeyRing, **headers) -> str | None:
    client = ring.client(presented_key(request(**headers)))
    return client.name if client else None


@pytest.mark.parametrize("headers", [{"x_api_key": "s3cret"}, {"authorization": "Bearer s3cret"},
                                     {"authorization": basic("s3cret")}])
def test_the_key_is_accepted_in_each_form(monkeypatch, headers):
    monkeypatch.setenv(ENV, "s3cret")
    assert caller(KeyRing(api_key_env=ENV), **headers) == "default"


@pytest.mark.parametrize("headers", [{}, {"x_api_key": "wrong"}, {"authorization": "Bearer "},
                                     {"authorization": basic("wrong")}, {"authorization": "Basic %%%"},
                                     {"authorization": "Token s3cret"}])
def test_anything_else_is_refused(monkeypatch, headers):
    monkeypatch.setenv(ENV, "s3cret")
    assert caller(KeyRing(api_key_env=ENV), **headers) is None


def test_fails_closed_without_a_key_in_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv(ENV, raising=False)
    assert caller(KeyRing(api_key_env=ENV), x_api_key="") is None
    with pytest.raises(RuntimeError, match=f"refusing to start without an API key: set {ENV}"):
        check_auth("api_key", ENV)
    check_auth("none", ENV)  # open on purpose
    with pytest.raises(ValueError, match="auth must be one of keys, api_key, none, got 'off'"):
        check_auth("off", ENV)
    with pytest.raises(RuntimeError, match="auth: keys needs the app arg api_keys_file"):
        check_auth("keys", ENV)
    empty = tmp_path / "keys.yaml"
    empty.write_text("# nobody yet\n")
    for path, why in ((tmp_path / "absent.yaml", "cannot read"), (empty, "no keys")):
        with pytest.raises(RuntimeError, match=f"refusing to start: {path}: {why}"):
            check_auth("keys", ENV, str(path))


def test_key_file_names_clients_and_is_reread_when_it_changes(tmp_path, monkeypatch):
    monkeypatch.setattr(auth, "RELOAD_EVERY_S", 0.0)
    path = tmp_path / "keys.yaml"
    alice = add_key(path, "alice")
    bob = add_key(path, "bob", requests_per_s=2.5, burst=4)
    assert alice not in path.read_text() and digest(alice) in path.read_text()  # only digests at rest
    ring = KeyRing(str(path))
    assert caller(ring, x_api_key=alice) == "alice" and caller(ring, authorization=f"Bearer {bob}") == "bob"
    assert ring.client(bob).requests_per_s == 2.5 and ring.client(bob).burst == 4
    assert caller(ring, x_api_key="guess") is None

    revoke_key(path, "alice")  # revoked: refused with no restart
    assert caller(ring, x_api_key=alice) is None and caller(ring, x_api_key=bob) == "bob"
    carol = add_key(path, "carol")  # added
    assert caller(ring, x_api_key=carol) == "carol"
    with pytest.raises(KeyFileError, match="'bob' already has a key"):
        add_key(path, "bob")
    new_bob = add_key(path, "bob", replace=True)  # rotated: the old key stops working
    assert caller(ring, x_api_key=new_bob) == "bob" and caller(ring, x_api_key=bob) is None

    path.write_text("")  # emptied (or deleted): nobody gets in until it is mended
    assert caller(ring, x_api_key=carol) is None
    path.unlink()
    assert caller(ring, x_api_key=carol) is None
    path.write_text(f"carol: {digest(carol)}\n")
    assert caller(ring, x_api_key=carol) == "carol"


@pytest.mark.parametrize("text, message", [
    ("- a\n- b\n", "expected a mapping"),
    ("alice: 1234\n", "entry 'alice' needs the key's SHA-256"),
    ("alice: {sha256: " + "a" * 64 + ", rate: 3}\n", "entry 'alice' has unknown field(s) rate"),
    ("alice: {sha256: " + "a" * 64 + ", requests_per_s: 0}\n", "requests_per_s must be a number > 0"),
    ("alice: {sha256: " + "a" * 64 + ", burst: 0.5}\n", "burst must be an integer >= 1"),
    ("alice: " + "a" * 64 + "\nbob: " + "A" * 64 + "\n", "'alice' and 'bob' hold the same key"),
    ("alice: [\n", "cannot read the key file"),
])
def test_a_bad_key_file_is_refused_naming_file_and_entry(tmp_path, text, message):
    path = tmp_path / "keys.yaml"
    path.write_text(text)
    with pytest.raises(KeyFileError) as err:
        KeyRing(str(path))
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value)


def test_keys_cli_adds_rotates_and_revokes(tmp_path, capsys):
    path = str(tmp_path / "keys.yaml")
    assert cli(["keys", "add", "alice", "--file", path, "--requests-per-s", "5"]) == 0
    key = capsys.readouterr().out.strip()
    assert KeyRing(path).client(key).name == "alice" and oct(os.stat(path).st_mode)[-3:] == "600"
    assert cli(["keys", "add", "alice", "--file", path]) == 2
    assert "already has a key" in capsys.readouterr().err
    assert cli(["keys", "revoke", "nobody", "--file", path]) == 2
    assert "no client 'nobody' (clients: alice)" in capsys.readouterr().err


def test_token_bucket_admits_burst_then_the_rate():
    bucket = Bucket(requests_per_s=2.0, burst=3)
    t = bucket.at
    assert [bucket.take(t) for _ in range(3)] == [0.0, 0.0, 0.0]  # the burst at once
    assert bucket.take(t) == pytest.approx(0.5)  # one token more takes 1 / 2 s
    assert bucket.take(t + 0.25) == pytest.approx(0.25)  # half a token has come back
    assert bucket.take(t + 0.5) == 0.0  # and now a whole one
    assert bucket.take(t + 10.0) == 0.0 and bucket.tokens == pytest.approx(2.0)  # refills to the burst, not past it


def test_rate_limiter_keeps_one_bucket_per_client_and_rounds_retry_after_up():
    limiter = RateLimiter(requests_per_s=0.5, burst=1)
    assert limiter.retry_after("alice") == 0 and limiter.retry_after("alice") == 2  # 1 token at 0.5/s: 2 s
    assert limiter.retry_after("bob") == 0  # alice's use is not bob's
    assert limiter.retry_after("carol", requests_per_s=100.0, burst=5) == 0  # a client's own limit wins
    assert RateLimiter().retry_after("anyone") == 0  # no limit configured: unlimited
    with pytest.raises(ValueError, match="requests_per_s must be > 0"):
        RateLimiter(requests_per_s=0)
