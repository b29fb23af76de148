"""A client of OpenAI-compatible chat completions endpoints: the retriever's LLM, the VLM judge.

  client = ChatClient("http://localhost:8000/v1", "llava-hf/llava-1.5-7b-hf")
  text = client.complete([{"role": "user", "content": "Say yes or no."}], temperature=0)

Any server of the chat completions API answers (vLLM, SGLang, llama.cpp, OpenAI). Every failure
(HTTP error, timeout, refused connection, a body that is not a completion) raises `ChatError`
with a short cause, for the caller to fall back on or to report. The client is built so that a
wrong or hostile server can neither take the key elsewhere nor hold a long evaluation:

- Redirects are refused, never followed: a POST must not turn into a GET, and the key must not
  go to another host. Set the URL to the final endpoint.
- `timeout` bounds each whole attempt (connect, headers, body), even against a server that
  trickles bytes: a watchdog shuts the socket down at the deadline.
- HTTP 5xx, 429, timeouts and connection errors are retried `retries` times, after
  `backoff_s * 2**attempt` seconds, or after a numeric Retry-After (capped). Other 4xx,
  redirects and malformed bodies are not: asking again would get the same answer.
- Messages carry no text the server chose: the standard phrase of the status code rather than
  the server's, never a body; and the key is redacted from every message.
- The HTTP(S)_PROXY environment variables are not used: the client connects to the URL's host.
"""

import contextlib
import dataclasses
import http
import http.client
import json
import os
import re
import socket
import threading
import time
import urllib.parse

DEFAULT_MODEL = "gpt-4o-mini"
DEFAULT_TIMEOUT_S = 30.0
DEFAULT_RETRIES = 2
DEFAULT_BACKOFF_S = 1.0
MAX_RETRY_AFTER_S = 30.0  # A server's Retry-After may not stall an evaluation for longer.


class ChatError(Exception):
  """The endpoint gave no usable answer; the message says why in a few words."""


class _AttemptError(Exception):
  """One attempt's failure: a short cause, whether to retry, and the server's Retry-After."""

  def __init__(self, cause: str, retry: bool = False, retry_after: float | None = None):
    super().__init__(cause)
    self.retry = retry
    self.retry_after = retry_after


@dataclasses.dataclass(frozen=True)
class ChatClient:
  """An OpenAI-compatible chat completions endpoint.

  Attributes:
    url: a base URL, to which "/chat/completions" is appended ("http://localhost:8000/v1",
      "https://api.openai.com/v1"), or a full URL ending in "/chat/completions", used as is.
    model: the model name sent with each request.
    api_key: sent as "Authorization: Bearer <key>" when given.
    timeout: seconds allowed for one whole attempt: connecting, sending, headers and body.
    retries: further attempts after a 5xx, 429, timeout or connection error.
    backoff_s: the wait before retry i (from 0) is `backoff_s * 2**i`, unless the server sent a
      numeric Retry-After.
  """
  url: str
  model: str = DEFAULT_MODEL
  api_key: str | None = None
  timeout: float = DEFAULT_TIMEOUT_S
  retries: int = DEFAULT_RETRIES
  backoff_s: float = DEFAULT_BACKOFF_S

  def __post_init__(self):
    # A malformed setting is a configuration mistake, so it fails here rather than at a request.
    parts = urllib.parse.urlsplit(self.url)
    # `parts.port` raises ValueError itself for a port that is not a number in range.
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.port == 0:
      raise ValueError(f"chat url {self.url!r} must be an http:// or https:// URL with a host")
    if not self.timeout > 0:
      raise ValueError(f"chat timeout must be positive, got {self.timeout}")
    if not (isinstance(self.retries, int) and self.retries >= 0):
      raise ValueError(f"chat retries must be an integer >= 0, got {self.retries!r}")
    if not self.backoff_s >= 0:
      raise ValueError(f"chat backoff_s must be >= 0, got {self.backoff_s}")

  @classmethod
  def from_env(cls, url: str | None = None, model: str | None = None,
               api_key: str | None = None, timeout: float = DEFAULT_TIMEOUT_S,
               retries: int = DEFAULT_RETRIES, backoff_s: float = DEFAULT_BACKOFF_S, *,
               prefix: str = "LIVO_LLM", default_model: str = DEFAULT_MODEL,
               ) -> "ChatClient | None":
    """A client from the arguments, or None when there is no URL.

    Arguments left out come from `<prefix>_URL`, `<prefix>_MODEL` and `<prefix>_API_KEY` (or
    OPENAI_API_KEY).
    """
    url = url or os.environ.get(f"{prefix}_URL")
    if not url:
      return None
    return cls(url=url, model=model or os.environ.get(f"{prefix}_MODEL") or default_model,
               api_key=(api_key or os.environ.get(f"{prefix}_API_KEY")
                        or os.environ.get("OPENAI_API_KEY") or None),
               timeout=timeout, retries=retries, backoff_s=backoff_s)

  @property
  def endpoint(self) -> str:
    url = self.url.rstrip("/")
    return url if url.endswith("/chat/completions") else url + "/chat/completions"

  def complete(self, messages: list[dict], **options) -> str:
    """The first choice's message text for `messages` (`options`: temperature, ...)."""
    return reply_text(self.post_json({"model": self.model, "messages": messages, **options}))

  def post_json(self, body: dict) -> bytes:
    """POSTs `body` to the endpoint, retrying; the 2xx response body, or `ChatError`."""
    payload = json.dumps(body).encode("utf-8")
    headers = {"Content-Type": "application/json"}
    if self.api_key:
      headers["Authorization"] = f"Bearer {self.api_key}"
    attempt = 0
    while True:
      attempt += 1
      try:
        return self._attempt(payload, headers)
      except _AttemptError as e:
        if not e.retry or attempt > self.retries:
          cause = f"{e} ({attempt} attempts)" if attempt > 1 else str(e)
          # `from None`: the original exception's text may come from the server.
          raise ChatError(self._redact(cause)) from None
        delay = e.retry_after
        time.sleep(self.backoff_s * 2 ** (attempt - 1) if delay is None else delay)

  def _attempt(self, payload: bytes, headers: dict) -> bytes:
    """One POST within `timeout`: the 2xx body, or `_AttemptError`."""
    parts = urllib.parse.urlsplit(self.endpoint)
    connection_class = (http.client.HTTPSConnection if parts.scheme == "https"
                        else http.client.HTTPConnection)
    connection = connection_class(parts.hostname, parts.port, timeout=self.timeout)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    try:
      with _deadline(connection, self.timeout):
        connection.request("POST", path, payload, headers)
        response = connection.getresponse()
        status = response.status
        if 200 <= status < 300:
          return response.read()
    except TimeoutError:
      raise _AttemptError(f"timeout after {self.timeout:g} s", retry=True) from None
    except http.client.HTTPException as e:  # Its text may quote the server's bytes.
      raise _AttemptError(f"connection error: {type(e).__name__}", retry=True) from None
    except OSError as e:
      raise _AttemptError(f"connection error: {e}", retry=True) from None
    finally:
      connection.close()
    if 300 <= status < 400:
      location = response.getheader("Location")
      target = _origin(urllib.parse.urljoin(self.endpoint, location)) if location else "nowhere"
      raise _AttemptError(f"HTTP {status} redirect to {target} refused: set the URL to the "
                          "final endpoint")
    cause = f"HTTP {status} {_phrase(status)}".strip()
    if status == 429 or status >= 500:
      raise _AttemptError(cause, retry=True,
                          retry_after=_retry_after(response.getheader("Retry-After")))
    raise _AttemptError(cause)

  def _redact(self, message: str) -> str:
    """`message` without the key, in any case (a server may echo it, e.g. in a host name)."""
    if not self.api_key:
      return message
    return re.sub(re.escape(self.api_key), "<redacted>", message, flags=re.IGNORECASE)


@contextlib.contextmanager
def _deadline(connection: http.client.HTTPConnection, seconds: float):
  """Connects `connection` and runs the block within `seconds`, else raises TimeoutError.

  The socket timeout bounds each read only; a watchdog shuts the socket down at the deadline,
  which wakes a blocked read however slowly the server sends.
  """
  expired = threading.Event()

  def expire():
    expired.set()  # Before looking at the socket: `connect` below checks it after making one.
    sock = connection.sock
    if sock is not None:
      with contextlib.suppress(OSError):  # Already closed.
        sock.shutdown(socket.SHUT_RDWR)

  watchdog = threading.Timer(seconds, expire)
  watchdog.daemon = True
  watchdog.start()
  try:
    connection.connect()  # Each address tried is bounded by the socket timeout.
    if expired.is_set():
      raise TimeoutError
    yield
  except (OSError, http.client.HTTPException):
    if expired.is_set():
      raise TimeoutError from None
    raise
  finally:
    watchdog.cancel()
    watchdog.join()
  if expired.is_set():  # A body cut short at the deadline can read as a complete one.
    raise TimeoutError


def _phrase(status: int) -> str:
  """The standard reason phrase of `status` ("" if unknown), never the one the server sent."""
  try:
    return http.HTTPStatus(status).phrase
  except ValueError:
    return ""


def _origin(url: str) -> str:
  """scheme://host[:port] of `url` (no path, no user info), or "an invalid location"."""
  try:
    parts = urllib.parse.urlsplit(url)
    port = parts.port
  except ValueError:
    return "an invalid location"
  host = parts.hostname or ""
  if not re.fullmatch(r"[a-z0-9.:_-]+", host):
    return "an invalid location"
  host = f"[{host}]" if ":" in host else host
  return f"{parts.scheme}://{host}" + (f":{port}" if port is not None else "")


def _retry_after(value: str | None) -> float | None:
  """A Retry-After in seconds (delay-seconds form only), capped; None without one."""
  value = (value or "").strip()
  if value.isascii() and value.isdigit():
    return min(float(value), MAX_RETRY_AFTER_S)
  return None


def reply_choice(body: bytes) -> dict:
  """The first choice of a chat completions response body, with a string message content."""
  try:
    reply = json.loads(body)
  except ValueError as e:  # Also bytes that are not UTF-8.
    raise ChatError("invalid JSON in response") from e
  try:
    choice = reply["choices"][0]
    content = choice["message"]["content"]
  except (KeyError, IndexError, TypeError) as e:
    raise ChatError("no choices[0].message.content in response") from e
  if not isinstance(content, str):
    raise ChatError("no choices[0].message.content in response")
  return choice


def reply_text(body: bytes) -> str:
  """The first choice's message text in a chat completions response body."""
  return reply_choice(body)["message"]["content"]
