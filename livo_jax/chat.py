"""A client of OpenAI-compatible chat completions endpoints: the retriever's LLM, the VLM judge.

  client = ChatClient("http://localhost:8000/v1", "llava-hf/llava-1.5-7b-hf")
  text = client.complete([{"role": "user", "content": "Say yes or no."}], temperature=0)

Any server of the chat completions API answers (vLLM, SGLang, llama.cpp, OpenAI). Every failure
(HTTP error, timeout, refused connection, a body that is not a completion) raises `ChatError`
with a short cause, for the caller to fall back on or to report.
"""

import dataclasses
import http.client
import json
import os
import urllib.error
import urllib.parse
import urllib.request

DEFAULT_MODEL = "gpt-4o-mini"
DEFAULT_TIMEOUT_S = 30.0


class ChatError(Exception):
  """The endpoint gave no usable answer; the message says why in a few words."""


@dataclasses.dataclass(frozen=True)
class ChatClient:
  """An OpenAI-compatible chat completions endpoint.

  Attributes:
    url: a base URL, to which "/chat/completions" is appended ("http://localhost:8000/v1",
      "https://api.openai.com/v1"), or a full URL ending in "/chat/completions", used as is.
    model: the model name sent with each request.
    api_key: sent as "Authorization: Bearer <key>" when given.
    timeout: seconds allowed for connecting and for each read (urllib's socket timeout).
  """
  url: str
  model: str = DEFAULT_MODEL
  api_key: str | None = None
  timeout: float = DEFAULT_TIMEOUT_S

  def __post_init__(self):
    # A malformed URL is a configuration mistake, so it fails here rather than at a request.
    if urllib.parse.urlsplit(self.url).scheme not in ("http", "https"):
      raise ValueError(f"chat url {self.url!r} must start with http:// or https://")
    if not self.timeout > 0:
      raise ValueError(f"chat timeout must be positive, got {self.timeout}")

  @classmethod
  def from_env(cls, url: str | None = None, model: str | None = None,
               api_key: str | None = None, timeout: float = DEFAULT_TIMEOUT_S, *,
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
               timeout=timeout)

  @property
  def endpoint(self) -> str:
    url = self.url.rstrip("/")
    return url if url.endswith("/chat/completions") else url + "/chat/completions"

  def complete(self, messages: list[dict], **options) -> str:
    """The first choice's message text for `messages` (`options`: temperature, ...)."""
    return reply_text(self.post_json({"model": self.model, "messages": messages, **options}))

  def post_json(self, body: dict) -> bytes:
    """POSTs `body` to the endpoint; the raw response, or `ChatError` with a short cause."""
    headers = {"Content-Type": "application/json"}
    if self.api_key:
      headers["Authorization"] = f"Bearer {self.api_key}"
    request = urllib.request.Request(self.endpoint, data=json.dumps(body).encode("utf-8"),
                                     headers=headers, method="POST")
    try:
      with urllib.request.urlopen(request, timeout=self.timeout) as response:
        return response.read()
    except urllib.error.HTTPError as e:
      e.close()
      raise ChatError(f"HTTP {e.code} {e.reason}".strip()) from e
    except urllib.error.URLError as e:
      # urllib wraps errors while connecting, including timeouts, in URLError.
      if isinstance(e.reason, TimeoutError):
        raise ChatError(f"timeout after {self.timeout:g} s") from e
      raise ChatError(f"connection error: {e.reason}") from e
    except TimeoutError as e:  # While reading the response.
      raise ChatError(f"timeout after {self.timeout:g} s") from e
    except (OSError, http.client.HTTPException) as e:
      raise ChatError(f"connection error: {e!r}") from e


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
