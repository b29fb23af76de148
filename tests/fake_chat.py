"""A local OpenAI-compatible chat-completions server for the LLM and VLM client tests."""

import contextlib
import http.server
import json
import math
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
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    yield server
  finally:
    server.release.set()
    server.shutdown()
    server.server_close()


def reset(server, first_reply):
  """Clears the recorded requests and queues `first_reply` for a new test."""
  server.requests = []
  server.replies = [first_reply]
  server.release.clear()
