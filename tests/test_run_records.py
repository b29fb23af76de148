"""What a run leaves to read later: its records, metrics lines in a batch log, TensorBoard text
and hparams, W&B (a fake `wandb` module), and exports of any checkpoint with a tokenizer and a
model card.

One history serves most tests: a 3-step run as a real `scripts/train.py` process with stderr to a
file (a batch log), then an in-process resume to step 6 with another learning rate, reporting to
TensorBoard and a fake W&B.
"""

import contextlib
import json
import logging
import os
import re
import shutil
import struct
import subprocess
import sys
import types

import numpy as np
import pytest
import transformers

from livo_jax import train
from livo_jax.errors import ConfigError, RunError
from livo_jax.train import loop
from livo_jax.train import outputs
from livo_data_fixture import write_livo_data
from train_fixtures import REPO, load_config, train_command

RUN = {"checkpoint_every": 2, "keep_checkpoints": 5}
LINE = re.compile(r"step (\d+)/(\d+): loss [-\d.e+]+, gap_w [-\d.e+]+, gap_l [-\d.e+]+, "
                  r"grad_norm [-\d.e+]+, lr [-\d.e+]+, steps/s [\d.e+]+(, eta \d+:\d\d:\d\d)?$")


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory):
  return write_livo_data(str(tmp_path_factory.mktemp("livo_data")), size=(20, 16))


@pytest.fixture(scope="module")
def common(tmp_path_factory):
  return {"data.cache_dir": str(tmp_path_factory.mktemp("prepared")), **RUN}


@pytest.fixture(scope="module")
def make_config(sd_folder, train_dir, common):
  return lambda **overrides: load_config(sd_folder, train_dir, **{**common, **overrides})


class FakeWandb(types.ModuleType):
  """The part of wandb's API the trainer uses, recording every call."""

  def __init__(self):
    super().__init__("wandb")
    self.calls = []
    self.Image = lambda data: ("Image", data)  # pylint: disable=invalid-name

  def init(self, **kwargs):
    self.calls.append(("init", kwargs))
    calls = self.calls
    return types.SimpleNamespace(
        config=types.SimpleNamespace(update=lambda d, **kw: calls.append(("config", d, kw))),
        log=lambda d, step: calls.append(("log", d, step)),
        finish=lambda: calls.append(("finish",)))


@contextlib.contextmanager
def log_messages():
  """The root logger's messages at INFO and above while in the block."""
  messages, root = [], logging.getLogger()
  handler = logging.Handler()
  handler.emit = lambda record: messages.append(record.getMessage())
  level = root.level
  root.addHandler(handler)
  root.setLevel(logging.INFO)
  try:
    yield messages
  finally:
    root.removeHandler(handler)
    root.setLevel(level)


@pytest.fixture(scope="module")
def history(make_config, sd_folder, train_dir, common, tmp_path_factory):
  """A: 3 steps as a process (checkpoints 2, 3); its export copied aside. B: resumed to 6 at
  lr 2e-6 (checkpoints 4, 6), a metrics line for every step, with a fake W&B."""
  root = tmp_path_factory.mktemp("history")
  workdir = str(root / "workdir")
  with open(root / "batch.log", "w") as log:
    done = subprocess.run(train_command(workdir, sd_folder, train_dir, **common, total_steps=3,
                                        compilation_cache_dir=str(root / "compiled")),
                          stderr=log, stdout=log, timeout=600, check=False, cwd=REPO)
  with open(root / "batch.log") as f:
    batch_log = f.read()
  assert done.returncode == 0, batch_log[-3000:]
  shutil.copytree(os.path.join(workdir, "value_encoder"), root / "export_of_a")
  shutil.copy(os.path.join(workdir, "config.json"), root / "config_of_a.json")
  wandb = FakeWandb()
  with pytest.MonkeyPatch.context() as patch, log_messages() as messages:
    patch.setitem(sys.modules, "wandb", wandb)
    patch.setattr(loop, "_LINE_SECONDS", 0)
    train.train(make_config(**{"total_steps": 6, "optim.lr": 2e-6,
                               "report_to": "tensorboard,wandb"}), workdir)
  return types.SimpleNamespace(workdir=workdir, root=root, batch_log=batch_log,
                               log=messages, wandb=wandb.calls)


def read_json(path):
  with open(path) as f:
    return json.load(f)


def resumes(workdir):
  folder = os.path.join(workdir, "resumes")
  return [os.path.join(folder, name) for name in sorted(os.listdir(folder))]


def metrics_lines(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def file_bytes(folder):
  out = {}
  for base, _, names in os.walk(folder):
    for name in names:
      with open(os.path.join(base, name), "rb") as f:
        out[os.path.relpath(os.path.join(base, name), folder)] = f.read()
  return out


def test_the_first_start_is_recorded_and_kept(history, make_config):
  """config.json: the resolved config (flags applied) of the first start, how it ran and the
  value statements of its data; the resume leaves it as it was."""
  first = read_json(os.path.join(history.workdir, "config.json"))
  assert first == read_json(history.root / "config_of_a.json")
  expected = json.loads(json.dumps(make_config(total_steps=3, compilation_cache_dir=str(
      history.root / "compiled")).to_dict()))
  assert first["config"] == expected
  run = first["run"]
  assert run["start_step"] == 0 and run["argv"][0].endswith("scripts/train.py")
  assert "--config.total_steps=3" in run["argv"]
  assert run["jax"] and run["livo_jax"] and run["devices"] == 1 and run["processes"] == 1
  assert first["data"]["values"] == {"gender equality": 5, "racial equality": 2}
  assert first["data"]["aligned_images"] == 7 and first["data"]["scenes"] == 3


def test_a_resume_is_recorded_and_its_changes_named(history):
  (path,) = resumes(history.workdir)
  record = read_json(path)
  first = read_json(os.path.join(history.workdir, "config.json"))
  assert re.fullmatch(r"\d{8}T\d{6}Z-step3\.json", os.path.basename(path))
  assert record["run"]["start_step"] == 3 and record["run"]["id"] == first["run"]["id"]
  assert record["config"]["optim"]["lr"] == 2e-6 and record["config"]["total_steps"] == 6
  (warning,) = [m for m in history.log if m.startswith("resuming at step 3")]
  assert warning.endswith(
      ": compilation_cache_dir \"" + first["config"]["compilation_cache_dir"] + "\" -> \"\", "
      "optim.lr 1e-06 -> 2e-06, report_to \"tensorboard\" -> \"tensorboard,wandb\", "
      "total_steps 3 -> 6"), warning
  assert f"previous start (at step 0, {first['run']['time']})" in warning


def test_a_batch_log_has_metrics_lines_and_no_progress_bar(history):
  """stderr is a file: no bar; a line for the first step, then at most one per 30 s, and the
  last (this run's steps take well under 30 s)."""
  lines = [line.split("] ", 1)[-1] for line in history.batch_log.splitlines()
           if "] step " in line]
  assert [LINE.fullmatch(line)[1] for line in lines] == ["1", "3"], history.batch_log[-3000:]
  first = metrics_lines(history.workdir)[0]
  assert lines[0] == (f"step 1/3: loss {first['loss']:.4g}, gap_w {first['gap_w']:.4g}, "
                      f"gap_l {first['gap_l']:.4g}, grad_norm {first['grad_norm']:.4g}, "
                      f"lr 1e-06, steps/s {first['steps_per_second']:.3g}")
  assert not re.search(r"(^|\r)train:", history.batch_log, re.M)   # the bar's description
  # Without the 30 s floor, every step has its line; the eta from the second on.
  resumed = [LINE.fullmatch(m) for m in history.log if m.startswith("step ")]
  assert [(m[1], m[2], bool(m[3])) for m in resumed] == [
      ("4", "6", False), ("5", "6", True), ("6", "6", False)]


def test_a_terminal_gets_a_bar_and_no_lines(history, sd_folder, train_dir, common, tmp_path):
  """stderr a terminal (a pty of 120 columns): the progress bar with the loss, no step lines."""
  import fcntl, pty, termios  # pylint: disable=g-import-not-at-top,multiple-imports
  command = train_command(str(tmp_path / "workdir"), sd_folder, train_dir, **common,
                          total_steps=2, compilation_cache_dir=str(history.root / "compiled"))
  main, terminal = pty.openpty()
  fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
  run = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal,
                         cwd=REPO)
  os.close(terminal)
  output = b""
  with contextlib.suppress(OSError):   # EIO once the run has closed the terminal
    while chunk := os.read(main, 65536):
      output += chunk
  os.close(main)
  assert run.wait(timeout=600) == 0, output[-3000:]
  screen = output.decode(errors="replace").replace("\r", "\n").splitlines()
  assert [line for line in screen if line.startswith("train: 100%|") and "loss=" in line]
  assert not [line for line in screen if "] step " in line]


def tensorboard_events(folder):
  """Every event of the folder's event files (TFRecord framing: length, crc, data, crc)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  events = []
  for name in sorted(os.listdir(folder)):
    with open(os.path.join(folder, name), "rb") as f:
      data = f.read()
    at = 0
    while at < len(data):
      (length,) = struct.unpack("<Q", data[at:at + 8])
      events.append(event_pb2.Event.FromString(data[at + 12:at + 12 + length]))
      at += 12 + length + 4
  return events


def test_tensorboard_has_each_record_as_text_and_hparams(history):
  events = tensorboard_events(os.path.join(history.workdir, "tensorboard"))
  texts = [(e.step, v.tensor.string_val[0].decode()) for e in events for v in e.summary.value
           if v.tag.startswith("run_record")]
  records = [read_json(os.path.join(history.workdir, "config.json")),
             *map(read_json, resumes(history.workdir))]
  assert [(step, json.loads(text)) for step, text in texts] == [(0, records[0]), (3, records[1])]
  tags = [v.tag for e in events for v in e.summary.value]
  assert tags.count("_hparams_/experiment") == 2 and tags.count("_hparams_/session_start_info") == 2
  from tensorboardX.proto import plugin_hparams_pb2  # pylint: disable=g-import-not-at-top
  (start,) = [v for e in events if e.step == 3 for v in e.summary.value
              if v.tag == "_hparams_/session_start_info"]
  hparams = plugin_hparams_pb2.HParamsPluginData.FromString(
      start.metadata.plugin_data.content).session_start_info.hparams
  assert hparams["optim.lr"].number_value == 2e-6
  assert hparams["loss.name"].string_value == "livo"
  assert hparams["eval.prompts"].string_value == '["a photo of a doctor", "a photo of a nurse"]'


def test_wandb_gets_the_record_metrics_and_the_run_id(history):
  record = read_json(resumes(history.workdir)[0])
  calls = history.wandb
  assert calls[0] == ("init", {"project": "livo_jax", "dir": history.workdir,
                               "name": "workdir", "id": record["run"]["id"], "resume": "allow"})
  assert calls[1] == ("config", record["config"], {"allow_val_change": True})
  logged = [(step, d) for kind, d, step in (c for c in calls if c[0] == "log")]
  expected = [m for m in metrics_lines(history.workdir) if m["step"] > 3]
  assert logged == [(m["step"], {k: v for k, v in m.items() if k != "step"}) for m in expected]
  assert calls[-1] == ("finish",)


def test_wandb_images_and_a_failed_init(tmp_path, monkeypatch):
  wandb = FakeWandb()
  monkeypatch.setitem(sys.modules, "wandb", wandb)
  record = {"config": {"wandb_project": "p"}, "run": {"id": "abc"}}
  run = outputs.WandB(str(tmp_path), record)
  grid = np.zeros((4, 4, 3), np.uint8)
  run.image("validation", grid, 7)
  (_, logged, step), = [c for c in wandb.calls if c[0] == "log"]
  assert step == 7 and logged["validation"][0] == "Image" and logged["validation"][1] is grid

  def refuse(**kwargs):
    raise RuntimeError("api_key not configured\n(no tty)")
  monkeypatch.setattr(wandb, "init", refuse)
  with pytest.raises(RunError, match=r"^report_to wandb: wandb.init failed: api_key not "
                     r"configured \(no tty\) \(WANDB_MODE=offline"):
    outputs.WandB(str(tmp_path), record)


@pytest.mark.parametrize("report_to,message", [
    ("tensorbord", "report_to = 'tensorbord': 'tensorbord' is not one of ('tensorboard', "
     "'wandb')"),
    ("", "report_to = '': '' is not one of"),
    ("none,wandb", "report_to = 'none,wandb': 'none' is not one of"),
    ("tensorboard,wandb", "report_to = 'tensorboard,wandb': the wandb package is not installed"),
])
def test_report_to_is_checked_at_the_door(make_config, tmp_path, monkeypatch, report_to,
                                          message):
  monkeypatch.setitem(sys.modules, "wandb", None)   # as if not installed, here or anywhere
  with pytest.raises(ConfigError, match=re.escape(message)):
    train.train(make_config(report_to=report_to), str(tmp_path / "workdir"))
  assert os.listdir(tmp_path / "workdir") == []


def test_report_to_none_writes_metrics_jsonl_only(tmp_path):
  writer = outputs.MetricsWriter(str(tmp_path), 0, True,
                                 report_to=outputs.check_report_to("none"))
  writer.write(1, {"loss": 1.0})
  writer.close()
  assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl"]


def test_the_export_is_an_hf_folder_with_tokenizer_and_card(history, sd_folder):
  folder = os.path.join(history.workdir, "value_encoder")
  model, info = transformers.CLIPTextModel.from_pretrained(folder, output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
  tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
  sd_tokenizer = transformers.CLIPTokenizer.from_pretrained(os.path.join(sd_folder, "tokenizer"))
  text = "gender equality"
  assert tokenizer(text, padding="max_length").input_ids == sd_tokenizer(
      text, padding="max_length").input_ids
  assert model.config.hidden_size == 32
  with open(os.path.join(folder, "README.md")) as f:
    card = f.read()
  last = metrics_lines(history.workdir)[-1]
  for field in (f"- base model (frozen): `{sd_folder}`\n", "# LiVO value encoder, step 6\n",
                "- gender equality (5 aligned images)\n", "- racial equality (2 aligned images)\n",
                "- objective: livo (beta 1000, alpha 500, gamma1 1, gamma2 0.5)\n",
                "lr 2e-06, schedule constant", "- batch: 4 pairs\n", "- steps: 6\n",
                "- resolution: 16 px\n", "- dtype: float32 ", "## Metrics at step 6\n",
                f"- loss {last['loss']:.6g}\n", f"- gap_w {last['gap_w']:.6g}\n"):
    assert field in card, field
  assert card.startswith("---\nlibrary_name: transformers\n")
  assert "steps_per_second" not in card   # the card is the same for the same training


def test_any_checkpoint_exports_as_the_run_that_ended_there(history):
  """`tools/export_value_encoder.py --step=3` on the resumed workdir writes A's own export
  (the run that ended at step 3), byte for byte: weights, config, tokenizer and card (the card
  of A's config, lr 1e-6, and A's step 3 metrics). An unknown step lists the saved ones."""
  out = str(history.root / "step3")
  tool = [sys.executable, os.path.join(REPO, "tools", "export_value_encoder.py"),
          f"--workdir={history.workdir}"]
  done = subprocess.run([*tool, "--step=3", f"--out={out}"], capture_output=True, text=True,
                        timeout=600, check=False, cwd=REPO)
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stdout == f"wrote the value encoder of step 3 to {out}\n"
  assert file_bytes(out) == file_bytes(history.root / "export_of_a")
  assert sorted(file_bytes(out)) == ["README.md", "config.json", "model.safetensors",
                                     "tokenizer.json", "tokenizer_config.json"]

  bad = subprocess.run([*tool, "--step=5", f"--out={history.root / 'step5'}"],
                       capture_output=True, text=True, timeout=600, check=False, cwd=REPO)
  assert bad.returncode == 1
  assert bad.stderr.splitlines() == [
      f"error: {history.workdir}/checkpoints: no checkpoint of step 5; the steps saved are "
      "2, 3, 4, 6"]
  assert not os.path.exists(history.root / "step5")


def test_a_finished_workdir_trains_nothing_and_names_the_tool(history, make_config):
  workdir = history.workdir
  before = file_bytes(workdir)
  with log_messages() as messages:
    train.train(make_config(total_steps=5), workdir)
  assert (f"the workdir is at step 6, total_steps is 5: nothing to train; the checkpoints of "
          f"steps 2, 3, 4, 6 export with: python tools/export_value_encoder.py "
          f"--workdir={workdir} --step=N --out=DIR") in messages
  assert file_bytes(workdir) == before
