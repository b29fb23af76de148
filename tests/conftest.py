"""Fixtures shared by several test files."""

import pytest

import fake_chat


@pytest.fixture(scope="module")
def chat_server():
  """A local OpenAI-compatible chat server (see fake_chat), one per test module."""
  with fake_chat.chat_server() as server:
    yield server


@pytest.fixture(scope="session")
def sd_folder(tmp_path_factory):
  """A tiny random SD folder (tiny_sd) shared by the trainer's tests."""
  import tiny_sd  # pylint: disable=g-import-not-at-top  (pulls torch; only tests that ask)
  folder = str(tmp_path_factory.mktemp("tiny_sd"))
  tiny_sd.make_sd_folder(folder, seed=0)
  return folder


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
  """A small raw livo_data folder (livo_data_fixture), one per test module."""
  import livo_data_fixture  # pylint: disable=g-import-not-at-top
  return livo_data_fixture.write_livo_data(str(tmp_path_factory.mktemp("raw") / "livo_data"))
