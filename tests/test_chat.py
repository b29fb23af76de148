"""The chat client against servers on 127.0.0.1 that misbehave: redirects, trickled bytes,
echoed keys, transient failures."""

import socket
import time

import pytest

from fake_chat import chat_reply, raw_response, raw_server
from livo_jax import chat
from livo_jax.chat import ChatClient, ChatError

KEY = "sk-Secret-0123456789"
OK = raw_response(200, chat_reply("yes").encode())
MESSAGES = [{"role": "user", "content": "Say yes or no."}]


@pytest.fixture(autouse=True)
def no_llm_env(monkeypatch):
  for name in ("LIVO_LLM_URL", "LIVO_LLM_MODEL", "LIVO_LLM_API_KEY", "OPENAI_API_KEY"):
    monkeypatch.delenv(name, raising=False)


def client(server, **kwargs):
  return ChatClient(url=f"http://127.0.0.1:{server.server_address[1]}/v1", **kwargs)


def closed_port():
  with socket.socket() as s:  # A port that nothing listens on once closed.
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# Redirects.

@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_redirect_is_refused_and_the_other_host_never_asked(status):
  with raw_server(OK) as other:
    target = f"http://127.0.0.1:{other.server_address[1]}"
    redirect = raw_response(status, reason="Found", headers=[
        f"Location: {target}/v1/chat/completions"])
    with raw_server(redirect) as server:
      with pytest.raises(ChatError) as error:
        client(server, api_key=KEY, retries=2, backoff_s=0).complete(MESSAGES)
      assert str(error.value) == (f"HTTP {status} redirect to {target} refused: set the URL "
                                  "to the final endpoint")
      assert len(server.requests) == 1  # Not retried.
    assert other.requests == []


@pytest.mark.parametrize("location,named", [
    ("/elsewhere", "http://127.0.0.1:{port}"),
    ("https://user:pw@Example.test:8443/v1?key=1", "https://example.test:8443"),
    ("http://[::1]:9/x", "http://[::1]:9"),
    ("http://bad host/", "an invalid location"),
    (None, "nowhere"),
])
def test_redirect_names_only_scheme_and_host(location, named):
  headers = [f"Location: {location}"] if location else []
  with raw_server(raw_response(302, headers=headers)) as server:
    with pytest.raises(ChatError) as error:
      client(server).post_json({})
  named = named.format(port=server.server_address[1])
  assert str(error.value).startswith(f"HTTP 302 redirect to {named} refused")


# ---------------------------------------------------------------------------------------------
# The deadline: `timeout` bounds the whole attempt.

@pytest.mark.parametrize("part", ["headers", "body"])
def test_a_trickling_server_cannot_hold_a_call(part):
  body = chat_reply("yes").encode()
  response = raw_response(200, body)
  head = len(response) - len(body)
  with raw_server(response, trickle_s=1.0, trickle_from=0 if part == "headers" else head) as server:
    start = time.monotonic()
    with pytest.raises(ChatError, match=r"^timeout after 2 s$"):
      client(server, timeout=2, retries=0).post_json({})
    elapsed = time.monotonic() - start
  assert 2 <= elapsed < 2 + 3  # A correctness bound, generous for a loaded machine.


def test_timeout_covers_a_server_that_never_answers():
  with raw_server(OK, trickle_s=60.0) as server:
    start = time.monotonic()
    with pytest.raises(ChatError, match=r"^timeout after 0\.5 s$"):
      client(server, timeout=0.5, retries=0).post_json({})
  assert time.monotonic() - start < 0.5 + 3


def test_a_slow_but_timely_answer_is_read_whole():
  with raw_server(OK, trickle_s=0.001) as server:  # About 0.2 s for the whole response.
    assert client(server, timeout=20, retries=0).complete(MESSAGES) == "yes"


# ---------------------------------------------------------------------------------------------
# Messages carry no server text and never the key.

def test_reason_phrase_and_body_are_never_in_the_message():
  body = f'{{"error": "invalid key {KEY}", "detail": "bodytext"}}'.encode()
  with raw_server(raw_response(401, body, reason=f"Bad key {KEY} bodytext")) as server:
    with pytest.raises(ChatError) as error:
      client(server, api_key=KEY).complete(MESSAGES)
  assert str(error.value) == "HTTP 401 Unauthorized"
  assert len(server.requests) == 1  # 401 is not retried.
  assert f"Bearer {KEY}".encode() in server.requests[0]


def test_unknown_status_gives_the_code_only():
  with raw_server(raw_response(499, reason=f"Custom {KEY}")) as server:
    with pytest.raises(ChatError, match=r"^HTTP 499$"):
      client(server, api_key=KEY).post_json({})


def test_a_bad_status_line_is_not_quoted():
  with raw_server(f"HTTP/1.1 two hundred {KEY}\r\n\r\n".encode()) as server:
    with pytest.raises(ChatError, match=r"^connection error: BadStatusLine$"):
      client(server, api_key=KEY, retries=0).post_json({})


def test_the_key_is_redacted_in_any_case():
  # A host name is lower-cased on the way: the key must still not show.
  location = f"http://{KEY}.evil.test/v1"
  with raw_server(raw_response(302, headers=[f"Location: {location}"])) as server:
    with pytest.raises(ChatError) as error:
      client(server, api_key=KEY).post_json({})
  message = str(error.value)
  assert KEY.lower() not in message.lower()
  assert message.startswith("HTTP 302 redirect to http://<redacted>.evil.test refused")


def test_the_cause_is_not_chained():
  # A traceback prints chained exceptions; theirs may quote the server.
  with raw_server(raw_response(500, reason=KEY)) as server:
    with pytest.raises(ChatError) as error:
      client(server, api_key=KEY, retries=0).post_json({})
  assert error.value.__cause__ is None and error.value.__suppress_context__


# ---------------------------------------------------------------------------------------------
# Retries.

def test_transient_failures_are_retried():
  with raw_server(raw_response(503), raw_response(503), OK) as server:
    assert client(server, retries=2, backoff_s=0.01).complete(MESSAGES) == "yes"
  assert len(server.requests) == 3
  assert all(r.startswith(b"POST /v1/chat/completions ") for r in server.requests)


def test_retry_after_is_honoured():
  busy = raw_response(429, headers=["Retry-After: 1"])
  with raw_server(busy, OK) as server:
    start = time.monotonic()
    assert client(server, retries=1, backoff_s=0).complete(MESSAGES) == "yes"
    assert time.monotonic() - start >= 1
  assert len(server.requests) == 2


@pytest.mark.parametrize("status,retry_after,delays", [
    (503, None, [0.5, 1.0, 2.0]),  # backoff_s * 2**i
    (500, "Wed, 21 Oct 2015 07:28:00 GMT", [0.5, 1.0, 2.0]),  # A date: the backoff.
    (429, "3", [3.0, 3.0, 3.0]),
    (429, "3600", [30.0, 30.0, 30.0]),  # Capped at 30 s.
])
def test_backoff_delays(monkeypatch, status, retry_after, delays):
  slept = []
  monkeypatch.setattr(chat.time, "sleep", slept.append)
  headers = [f"Retry-After: {retry_after}"] if retry_after else []
  with raw_server(raw_response(status, headers=headers)) as server:
    with pytest.raises(ChatError, match=r"\(4 attempts\)$"):
      client(server, retries=3, backoff_s=0.5).post_json({})
  assert slept == delays
  assert len(server.requests) == 4


@pytest.mark.parametrize("response,cause", [
    (raw_response(400), "HTTP 400 Bad Request"),
    (raw_response(404), "HTTP 404 Not Found"),
    (raw_response(200, b"not json {"), "invalid JSON in response"),
    (raw_response(200, b'{"choices": []}'), "no choices[0].message.content in response"),
])
def test_client_errors_and_bad_bodies_are_not_retried(response, cause):
  with raw_server(response) as server:
    with pytest.raises(ChatError) as error:
      client(server, retries=3, backoff_s=0).complete(MESSAGES)
  assert str(error.value) == cause
  assert len(server.requests) == 1


def test_the_last_error_names_the_attempts():
  with raw_server(raw_response(503, reason="Busy")) as server:
    with pytest.raises(ChatError) as error:
      client(server, retries=2, backoff_s=0.01).post_json({})
  assert str(error.value) == "HTTP 503 Service Unavailable (3 attempts)"
  assert len(server.requests) == 3


def test_a_retry_that_gets_a_client_error_stops():
  with raw_server(raw_response(502), raw_response(403), OK) as server:
    with pytest.raises(ChatError) as error:
      client(server, retries=5, backoff_s=0).post_json({})
  assert str(error.value) == "HTTP 403 Forbidden (2 attempts)"
  assert len(server.requests) == 2


def test_timeouts_are_retried():
  with raw_server(OK, trickle_s=60.0) as server:
    with pytest.raises(ChatError, match=r"^timeout after 0\.3 s \(2 attempts\)$"):
      client(server, timeout=0.3, retries=1, backoff_s=0).post_json({})
  assert len(server.requests) == 2


def test_connection_errors_are_retried():
  llm = ChatClient(url=f"http://127.0.0.1:{closed_port()}/v1", retries=2, backoff_s=0)
  with pytest.raises(ChatError, match=r"^connection error: .*refused.* \(3 attempts\)$"):
    llm.post_json({})


# ---------------------------------------------------------------------------------------------
# Settings.

def test_from_env_passes_retries_through(monkeypatch):
  monkeypatch.setenv("LIVO_LLM_URL", "http://localhost:8000/v1")
  assert ChatClient.from_env(timeout=3, retries=5, backoff_s=0.1) == ChatClient(
      "http://localhost:8000/v1", chat.DEFAULT_MODEL, None, 3, retries=5, backoff_s=0.1)
  assert ChatClient.from_env().retries == 2


@pytest.mark.parametrize("kwargs", [
    dict(url="http:///v1"), dict(url="http://x:port/v1"), dict(url="http://x:0/v1"),
    dict(url="http://x/v1", retries=-1), dict(url="http://x/v1", retries=1.5),
    dict(url="http://x/v1", backoff_s=-1), dict(url="http://x/v1", timeout=-1),
])
def test_bad_settings_raise(kwargs):
  with pytest.raises(ValueError):
    ChatClient(**kwargs)
