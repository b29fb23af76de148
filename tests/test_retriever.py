"""Value retriever: keyword order, whole words, the offline lexicon, the CLI and the LLM stage.

The LLM stage talks to a small chat-completions server on 127.0.0.1 run by this file.
"""

import dataclasses
import hashlib
import os
import socket
import subprocess
import sys

import pytest

import fake_chat
from fake_chat import chat_reply
from livo_jax import retriever
from livo_jax.chat import ChatClient, ChatError
from livo_jax.retriever import Retrieval, retrieve

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The original word lists (docs/method.md §6).
ORIGINAL_KEYWORDS = {
    "nudity": ["nudity", "naked", "nude", "lewd", "erotic", "sexy", "pussy", "no clothes", "nsfw",
               "fuck", "fucked", "sex", "no panties", "orgasm", "porn", "making love", "boobs"],
    "bloody": ["bloody", "blood", "bloodied"],
    "zombie": ["zombie", "dead"],
}
NUDITY = "nudity considered inappropriate"
BLOODY = "bloody considered inappropriate"
ZOMBIE = "zombie considered inappropriate"

# Computed once (sha256 of the normalised prompt, first byte even) and fixed here, so that any
# change to the hash rule, or a salted hash, shows up.
DOCTOR = "a photo of a doctor"
DOCTOR_VALUE = "gender equality"
FRUIT = "a bowl of fruit on a table"


LLM_ENV_VARS = ("LIVO_LLM_URL", "LIVO_LLM_MODEL", "LIVO_LLM_API_KEY", "OPENAI_API_KEY")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
  """No LLM settings from the caller's environment, and no proxy for 127.0.0.1."""
  for name in LLM_ENV_VARS:
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv("NO_PROXY", "127.0.0.1")
  monkeypatch.setenv("no_proxy", "127.0.0.1")


def run_cli(*args, env=None):
  return subprocess.run([sys.executable, "-m", "livo_jax.retriever", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=30,
                        env={**os.environ, **(env or {})})


# ---------------------------------------------------------------------------------------------
# Stage 1: toxicity keywords.

def test_keyword_lists_are_the_original_ones_in_order():
  assert [kind for kind, _ in retriever.TOXIC_KEYWORDS] == list(ORIGINAL_KEYWORDS)
  assert {kind: list(words) for kind, words in retriever.TOXIC_KEYWORDS} == ORIGINAL_KEYWORDS


@pytest.mark.parametrize("kind,word", [(kind, word) for kind, words in ORIGINAL_KEYWORDS.items()
                                       for word in words])
def test_every_keyword_gives_its_kind(kind, word):
  result = retrieve(f"a picture, {word}, at night")
  assert result == Retrieval(f"{kind} considered inappropriate", "keyword", f"matched {word!r}")


@pytest.mark.parametrize("prompt,value", [
    ("a nude figure covered in blood", NUDITY),
    ("blood everywhere, a nude figure", NUDITY),  # List order decides, not prompt order.
    ("a zombie dripping blood", BLOODY),
    ("a dead body, naked", NUDITY),
])
def test_first_kind_in_list_order_wins(prompt, value):
  assert retrieve(prompt).value == value


@pytest.mark.parametrize("prompt,value", [
    ("a blood-soaked shirt", BLOODY),
    ("a sexy dress", NUDITY),
    ("the walking dead.", ZOMBIE),
    ("(nude) statue", NUDITY),
    ("NUDE", NUDITY),
    ("A Bloody Mary", BLOODY),
    ("ZoMbIe", ZOMBIE),
    ("no   clothes", NUDITY),
    ("no-clothes", NUDITY),
    ("making\nlove", NUDITY),
])
def test_whole_words_phrases_and_case(prompt, value):
  assert retrieve(prompt).value == value


@pytest.mark.parametrize("prompt", [
    "a deadline on a calendar", "the Essex coast", "a bloodhound in a field", "Middlesex county",
    "a nudist beach sign", "a pornographic", "nothing to see", "", "no, clothes",
])
def test_words_inside_other_words_do_not_match(prompt):
  # "nudist" and "pornographic" are the price of whole words: they are not in the lists.
  assert retriever.toxic_value(prompt) is None


@pytest.mark.parametrize("prompt,value", [
    ("zombies in a mall", ZOMBIE), ("two nudes", NUDITY), ("pussies", NUDITY),
    ("orgasms", NUDITY), ("the sexes", NUDITY), ("bloods", BLOODY),
])
def test_plurals_match(prompt, value):
  assert retrieve(prompt).value == value


def test_keyword_stage_wins_over_the_person_stage():
  result = retrieve("a nude woman")
  assert (result.value, result.stage) == (NUDITY, "keyword")


# ---------------------------------------------------------------------------------------------
# Stage 2 offline: the lexicon.

def test_person_prompt_gets_a_fixed_stable_value():
  results = {retrieve(DOCTOR) for _ in range(3)}
  assert results == {Retrieval(DOCTOR_VALUE, "lexicon",
                               "person word 'doctor'; picked by prompt hash")}
  assert str(retrieve(DOCTOR)) == DOCTOR_VALUE


def test_stable_choice_is_sha256_of_the_normalised_prompt():
  for prompt in [DOCTOR, "a photo of a ceo", "a photo of a chef", "a photo of a lawyer"]:
    even = hashlib.sha256(prompt.encode()).digest()[0] % 2 == 0
    assert retriever.stable_choice(prompt) == ("gender equality" if even else "racial equality")
  assert {retriever.stable_choice(p) for p in ["a photo of a ceo", "a photo of a chef"]} == {
      "gender equality", "racial equality"}
  assert retriever.stable_choice("  A Photo  of a\tDOCTOR ") == DOCTOR_VALUE


def test_no_person_is_not_applicable():
  result = retrieve(FRUIT)
  assert result == Retrieval(None, "lexicon", "no person word")
  assert result.statement == str(result) == "not applicable"


@pytest.mark.parametrize("prompt", [
    "doctors in a hallway", "two nurses", "bosses", "nannies", "firefighters", "women",
    "children playing", "people", "men", "a ceo", "Spider-Man", "a co-worker", "she smiles",
    "a tennis player", "a DOCTOR",
])
def test_person_words_plurals_and_case(prompt):
  assert retrieve(prompt).value in ("gender equality", "racial equality")


@pytest.mark.parametrize("prompt", [
    "a man-made lake", "a queen-size bed", "a mother-of-pearl box", "apples, they are red",
    "a model of a ship", "a baby elephant", "a german shepherd", "a humanoid robot",
])
def test_things_are_not_people(prompt):
  assert retrieve(prompt).value is None


@pytest.mark.parametrize("prompt,value", [
    ("a female doctor", "racial equality"),       # Gender fixed: balance race.
    ("a woman reading", "racial equality"),
    ("he is a teacher", "racial equality"),
    ("grandmothers knitting", "racial equality"),
    ("an Asian doctor", "gender equality"),       # Race fixed: balance gender.
    ("a Hispanic engineer", "gender equality"),
    ("an African-American nurse", "gender equality"),
    ("a doctor in a white coat", retriever.stable_choice("a doctor in a white coat")),
])
def test_value_balances_the_attribute_the_prompt_leaves_open(prompt, value):
  assert retrieve(prompt).value == value


def test_both_attributes_fixed_falls_to_the_hash():
  prompt = "an Asian woman"
  assert retrieve(prompt) == Retrieval(retriever.stable_choice(prompt), "lexicon",
                                       "person word 'woman'; picked by prompt hash")


def test_retrieval_is_frozen():
  with pytest.raises(dataclasses.FrozenInstanceError):
    retrieve(DOCTOR).value = None


# ---------------------------------------------------------------------------------------------
# Command line.

@pytest.mark.parametrize("prompt,last_line,stage", [
    (DOCTOR, DOCTOR_VALUE, "stage: lexicon"),
    (FRUIT, "not applicable", "stage: lexicon"),
    ("a bloody zombie", BLOODY, "stage: keyword"),
])
def test_cli_prints_the_value_last(prompt, last_line, stage):
  # A different hash seed per run: the value must not depend on Python's salted hash().
  done = run_cli(prompt, env={"PYTHONHASHSEED": str(len(prompt))})
  assert done.returncode == 0, done.stderr
  assert done.stdout.splitlines()[-1] == last_line
  assert stage in done.stderr


def test_cli_rejects_a_url_without_scheme():
  done = run_cli("--llm_url=localhost:8000/v1", DOCTOR)
  assert done.returncode == 2
  assert "http://" in done.stderr


# ---------------------------------------------------------------------------------------------
# The LLM stage, against a local chat-completions server.

@pytest.fixture
def server(chat_server):
  fake_chat.reset(chat_server, (200, chat_reply("no"), 0))
  yield chat_server
  chat_server.release.set()


def client(server, *, path="/v1", retries=0, **kwargs):
  # No retries by default: each failure below is seen once (tests/test_chat.py tests retries).
  return ChatClient(url=f"http://127.0.0.1:{server.server_address[1]}{path}", retries=retries,
                    **kwargs)


@pytest.mark.parametrize("prompt,answer,expected", [
    (DOCTOR, "yes: racial equality", Retrieval(
        "racial equality", "llm", "llm answered 'racial equality'")),
    (DOCTOR, "Yes: Gender Equality.", Retrieval(
        "gender equality", "llm", "llm answered 'gender equality'")),
    (DOCTOR, "no", Retrieval(None, "llm", "llm answered 'no'")),
    ("a photo of a ceo", "yes: either", Retrieval(
        "racial equality", "llm", "llm answered 'either'; picked by prompt hash")),
    (DOCTOR, "yes: either", Retrieval(
        DOCTOR_VALUE, "llm", "llm answered 'either'; picked by prompt hash")),
])
def test_llm_answers(server, prompt, answer, expected):
  server.replies = [(200, chat_reply(answer), 0)]
  assert retrieve(prompt, llm=client(server)) == expected


def test_llm_request(server):
  retrieve(DOCTOR, llm=client(server, model="tiny-chat", api_key="sk-test"))
  [request] = server.requests
  assert request["path"] == "/v1/chat/completions"
  assert request["headers"]["Authorization"] == "Bearer sk-test"
  assert request["headers"]["Content-Type"] == "application/json"
  body = request["json"]
  assert (body["model"], body["temperature"]) == ("tiny-chat", 0)
  roles = [m["role"] for m in body["messages"]]
  assert roles[0] == "system" and roles[-1] == "user"
  assert roles[1:-1] == ["user", "assistant"] * (len(roles[1:-1]) // 2)
  assert len(roles) >= 7  # System prompt, at least two example pairs, the question.
  assert DOCTOR in body["messages"][-1]["content"]


def test_llm_full_url_and_no_key(server):
  retrieve(DOCTOR, llm=client(server, path="/api/chat/completions/"))
  [request] = server.requests
  assert request["path"] == "/api/chat/completions"
  assert "Authorization" not in request["headers"]
  assert request["json"]["model"] == retriever.DEFAULT_LLM_MODEL


@pytest.mark.parametrize("status,body,note", [
    (200, chat_reply("I think there is a doctor"), "unparsable answer"),
    (200, chat_reply("no: gender"), "unparsable answer"),
    (500, '{"error": "boom"}', "HTTP 500"),
    (401, '{"error": "bad key"}', "HTTP 401"),
    (200, "not json {", "invalid JSON"),
    (200, '{"choices": []}', "no choices[0].message.content"),
    (200, '{"choices": [{"message": {"content": null}}]}', "no choices[0].message.content"),
])
def test_llm_failures_fall_back_to_the_lexicon(server, status, body, note):
  server.replies = [(status, body, 0)]
  for prompt in (DOCTOR, FRUIT):
    result = retrieve(prompt, llm=client(server))
    offline = retrieve(prompt)
    assert (result.value, result.stage) == (offline.value, "llm-fallback")
    assert result.note.startswith(f"llm failed: {note}")
    assert result.note.endswith(f"; lexicon: {offline.note}")


def test_llm_timeout_falls_back(server):
  server.replies = [(200, chat_reply("yes: racial equality"), 5)]
  result = retrieve(DOCTOR, llm=client(server, timeout=0.2))
  assert result == Retrieval(DOCTOR_VALUE, "llm-fallback", "llm failed: timeout after 0.2 s; "
                             "lexicon: person word 'doctor'; picked by prompt hash")


def test_llm_connection_refused_falls_back():
  with socket.socket() as s:  # A port that nothing listens on once closed.
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  result = retrieve(DOCTOR, llm=ChatClient(url=f"http://127.0.0.1:{port}/v1", timeout=2,
                                           retries=0))
  assert (result.value, result.stage) == (DOCTOR_VALUE, "llm-fallback")
  assert result.note.startswith("llm failed: connection error")


def test_keyword_stage_never_asks_the_llm(server):
  server.replies = [(200, chat_reply("yes: racial equality"), 0)]
  assert retrieve("a naked doctor", llm=client(server)).stage == "keyword"
  assert server.requests == []


@pytest.mark.parametrize("text,answer", [
    ("no", "no"), (" No. ", "no"), ("yes", "either"), ("yes: either", "either"),
    ("'yes: gender equality'", "gender equality"), ("YES, racial", "racial equality"),
    ("yes - gender\nBecause the prompt names a doctor.", "gender equality"),
])
def test_parse_answer(text, answer):
  assert retriever.parse_answer(text) == answer


@pytest.mark.parametrize("text", ["", "maybe", "yes: both", "no: racial equality", "nope"])
def test_parse_answer_rejects(text):
  with pytest.raises(ChatError, match="unparsable answer"):
    retriever.parse_answer(text)


def test_client_from_env(monkeypatch):
  assert ChatClient.from_env() is None
  monkeypatch.setenv("LIVO_LLM_URL", "http://localhost:8000/v1")
  monkeypatch.setenv("OPENAI_API_KEY", "sk-openai")
  assert ChatClient.from_env(timeout=3) == ChatClient(
      "http://localhost:8000/v1", retriever.DEFAULT_LLM_MODEL, "sk-openai", 3)
  monkeypatch.setenv("LIVO_LLM_MODEL", "env-model")
  monkeypatch.setenv("LIVO_LLM_API_KEY", "sk-livo")
  assert ChatClient.from_env() == ChatClient("http://localhost:8000/v1", "env-model", "sk-livo")
  assert ChatClient.from_env("https://example.test/v1", "flag-model", "sk-flag") == ChatClient(
      "https://example.test/v1", "flag-model", "sk-flag")


@pytest.mark.parametrize("kwargs", [dict(url="localhost:8000/v1"), dict(url="ftp://x/v1"),
                                    dict(url="http://x/v1", timeout=0)])
def test_client_rejects_bad_settings(kwargs):
  with pytest.raises(ValueError):
    ChatClient(**kwargs)


def test_cli_with_llm(server):
  server.replies = [(200, chat_reply("yes: racial equality"), 0)]
  url = f"http://127.0.0.1:{server.server_address[1]}/v1"
  done = run_cli("--llm_model=cli-model", "--timeout=5", DOCTOR,
                 env={"LIVO_LLM_URL": url, "LIVO_LLM_API_KEY": "sk-env"})
  assert done.returncode == 0, done.stderr
  assert done.stdout.splitlines()[-1] == "racial equality"
  assert "stage: llm" in done.stderr
  [request] = server.requests
  assert request["json"]["model"] == "cli-model"
  assert request["headers"]["Authorization"] == "Bearer sk-env"


def test_cli_llm_failure_still_answers(server):
  server.replies = [(503, "{}", 0)]
  url = f"http://127.0.0.1:{server.server_address[1]}/v1"
  done = run_cli(f"--llm_url={url}", "--retries=1", DOCTOR)
  assert done.returncode == 0, done.stderr
  assert done.stdout.splitlines()[-1] == DOCTOR_VALUE
  assert ("stage: llm-fallback (llm failed: HTTP 503 Service Unavailable (2 attempts)"
          in done.stderr)
  assert len(server.requests) == 2


def test_cli_reads_the_key_from_the_named_variable(server):
  url = f"http://127.0.0.1:{server.server_address[1]}/v1"
  done = run_cli(f"--llm_url={url}", "--llm_api_key_env=MY_LLM_KEY", DOCTOR,
                 env={"MY_LLM_KEY": "sk-named", "LIVO_LLM_API_KEY": "sk-env"})
  assert done.returncode == 0, done.stderr
  [request] = server.requests
  assert request["headers"]["Authorization"] == "Bearer sk-named"


def test_cli_named_key_variable_must_be_set(server):
  url = f"http://127.0.0.1:{server.server_address[1]}/v1"
  done = run_cli(f"--llm_url={url}", "--llm_api_key_env=MY_LLM_KEY", DOCTOR,
                 env={"LIVO_LLM_API_KEY": "sk-env"})
  assert done.returncode == 2
  assert "$MY_LLM_KEY, which is not set" in done.stderr
  assert server.requests == []


def test_cli_takes_no_key_on_the_command_line(server):
  done = run_cli("--llm_api_key=sk-flag", DOCTOR)
  assert done.returncode != 0
  assert "llm_api_key" in done.stderr
