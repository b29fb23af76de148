"""Fixtures shared by several test files; XLA's compile settings for the whole session."""

import os

import pytest

import fake_chat

# XLA's CPU backend (LLVM) at optimisation level 0, for this process and those the tests start
# (they inherit the environment; tests/test_multihost.py and the sharded tests add their
# device count to it): the tiny models' train steps compile in about half the time (11-21 s
# -> 7-12 s) and the suite runs a few steps of each, so compiling is most of its time.
# Benchmarks and real runs keep XLA's default.
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0"]).strip()


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
