"""Fixtures shared by several test files."""

import pytest

import fake_chat


@pytest.fixture(scope="module")
def chat_server():
  """A local OpenAI-compatible chat server (see fake_chat), one per test module."""
  with fake_chat.chat_server() as server:
    yield server
