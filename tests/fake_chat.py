"""Local servers for the chat client tests.

`chat_server` is an OpenAI-compatible chat-completions server (the LLM and VLM tests);
`raw_server` sends fixed bytes, for the faults a real server would not make on purpose
(redirects, reason phrases, trickled bytes).
"""

import contextlib
import http.server
import json
import math
import re
import socketserver
import threading


def chat_reply(content, top=None):
  """A response body; `top` lists (token, probability) as the first token's top_logprobs."""
  choice = {"index": 0, "message": {"role": "assistant", "content": content},
            "finish_reason": "length"}
  if top is not None:
    choice["logprobs"] = {"content": [{
        "token": content, "logprob": math.log(top[0][1]),
        "top_logprobs": [{"token": t, "logprob": math.log(p)} for t, p in top]}]}
  return json.dumps({"choices": [choice]})


class FakeChatHandler(http.server.BaseHTTPRequestHandler):
  """Records each request and answers with the server's next reply (status, body, delay_s).

  The last reply is repeated for any further request.
  """

  def do_POST(self):
    body = self.rfile.read(int(self.headers["Content-Length"]))
    self.server.requests.append({"path": self.path, "headers": dict(self.headers),
                                 "json": json.loads(body)})
    replies = self.server.replies
    status, reply, delay_s = replies.pop(0) if len(replies) > 1 else replies[0]
    if delay_s:
      self.server.release.wait(delay_s)  # Set at teardown, so no thread outlives its test.
    try:
      self.send_response(status)
      self.send_header("Content-Type", "application/json")
      self.send_header("Content-Length", str(len(reply.encode())))
      self.end_headers()
      self.wfile.write(reply.encode())
    except OSError:  # The client gave up (the timeout tests).
      pass

  def log_message(self, *args):
    pass


@contextlib.contextmanager
def chat_server():
  """A running server on 127.0.0.1 (port 0); set `.replies`, read `.requests`."""
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeChatHandler)
  server.release = threading.Event()
  server.requests, server.replies = [], [(200, chat_reply("no"), 0)]
  with _serving(server):
    yield server


def reset(server, first_reply):
  """Clears the recorded requests and queues `first_reply` for a new test."""
  server.requests = []
  server.replies = [first_reply]
  server.release.clear()


class RawHandler(socketserver.StreamRequestHandler):
  """Records one request and answers with the server's next raw response, trickled if asked.

  The server's `trickle_from` bytes of the response go at once, the rest one byte every
  `trickle_s` seconds; the last response is repeated for any further request.
  """

  def handle(self):
    head = b""
    while not head.endswith(b"\r\n\r\n"):
      line = self.rfile.readline()
      if not line:
        break
      head += line
    length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    request = head + (self.rfile.read(int(length[1])) if length else b"")
    server = self.server
    server.requests.append(request)
    responses = server.responses
    response = responses.pop(0) if len(responses) > 1 else responses[0]
    sent = server.trickle_from if server.trickle_s else len(response)
    try:
      self.wfile.write(response[:sent])
      for i in range(sent, len(response)):
        if server.release.wait(server.trickle_s):  # Set at teardown.
          return
        self.wfile.write(response[i:i + 1])
    except OSError:  # The client gave up (the timeout tests).
      pass


def raw_response(status, body=b"", reason="OK", headers=()):
  """The bytes of an HTTP/1.1 response; `reason` is sent as is, whatever `status` is."""
  lines = [f"HTTP/1.1 {status} {reason}", f"Content-Length: {len(body)}", *headers, "", ""]
  return "\r\n".join(lines).encode() + body


@contextlib.contextmanager
def raw_server(*responses, trickle_s=0.0, trickle_from=0):
  """A server on 127.0.0.1 that sends raw `responses` in turn; read `.requests` (bytes)."""
  server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), RawHandler)
  server.daemon_threads = True
  server.release = threading.Event()
  server.requests, server.responses = [], list(responses)
  server.trickle_s, server.trickle_from = trickle_s, trickle_from
  # A short poll: each test starts its own servers, and shutdown waits for a poll.
  with _serving(server, poll_s=0.05):
    yield server


@contextlib.contextmanager
def _serving(server, poll_s: float = 0.5):
  """Serves `server` from a daemon thread; at exit releases delayed replies and shuts it down."""
  thread = threading.Thread(target=server.serve_forever, args=(poll_s,), daemon=True)
  thread.start()
  try:
    yield
  finally:
    server.release.set()
    server.shutdown()
    server.server_close()
