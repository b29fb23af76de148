"""The trainer end to end on the tiny SD and a synthetic livo_data folder.

One straight 8-step run is the reference the other runs are held to: a run stopped at step 4 and
resumed to 8 (bitwise), 8 CPU devices as data 4 x fsdp 2, gradient accumulation and the latent
cache (the same curves, see `assert_losses_follow`). Plus its outputs, and the errors that must
stop a run before compute.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import safetensors.numpy
import transformers

from livo_jax import train
from livo_jax.errors import ConfigError
from livo_jax.train import optim as optim_lib
from livo_jax.train import setup
from livo_jax.train import sharding
from livo_data_fixture import write_livo_data
from train_fixtures import assert_losses_follow, load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DESIGN_METRICS = ("step", "loss", "loss_theta_w", "loss_ref_w", "loss_theta_l", "loss_ref_l",
                  "lr")
RUN = {"batch_size": 8, "total_steps": 8, "checkpoint_every": 4, "keep_checkpoints": 1}


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory):
  return write_livo_data(str(tmp_path_factory.mktemp("livo_data")), size=(20, 16))


@pytest.fixture(scope="module")
def make_config(sd_folder, train_dir, tmp_path_factory):
  cache = str(tmp_path_factory.mktemp("prepared"))

  def make(**overrides):
    return load_config(sd_folder, train_dir, **{"data.cache_dir": cache, **RUN, **overrides})
  return make


def read_metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def read_weights(workdir: str) -> dict[str, np.ndarray]:
  return safetensors.numpy.load_file(os.path.join(workdir, "value_encoder", "model.safetensors"))


@pytest.fixture(scope="module")
def straight(make_config, tmp_path_factory):
  """8 steps in one go, with validation images at the end."""
  workdir = str(tmp_path_factory.mktemp("straight"))
  train.train(make_config(**{"eval.every": 8}), workdir)
  return workdir


def test_outputs(straight, sd_folder):
  metrics = read_metrics(straight)
  assert [m["step"] for m in metrics] == list(range(1, 9))
  for m in metrics:
    assert set(DESIGN_METRICS) <= set(m)
    assert m["gap_w"] == pytest.approx(m["loss_theta_w"] - m["loss_ref_w"], abs=1e-6)
    assert m["gap_l"] == pytest.approx(m["loss_ref_l"] - m["loss_theta_l"], abs=1e-6)
    assert m["beta_gap_w"] == pytest.approx(1000 * m["gap_w"], rel=1e-5)
    assert m["lr"] == pytest.approx(1e-6)
  # keep_checkpoints = 1: only the last survives.
  assert sorted(os.listdir(os.path.join(straight, "checkpoints"))) == ["8"]
  events = os.listdir(os.path.join(straight, "tensorboard"))
  assert len(events) == 1 and events[0].startswith("events.out.tfevents")
  assert os.path.getsize(os.path.join(straight, "tensorboard", events[0])) > 1000

  from PIL import Image  # pylint: disable=g-import-not-at-top
  grid = np.asarray(Image.open(os.path.join(straight, "images", "step_000008.png")))
  assert grid.shape == (2 * 16, 2 * 16, 3)     # (plain, with value) x 2 prompts of 16 px
  assert not np.array_equal(grid[:16], grid[16:])   # the value token changes the images

  # value_encoder/ is an HF CLIPTextModel that torch loads with nothing missing, and trained.
  model, info = transformers.CLIPTextModel.from_pretrained(
      os.path.join(straight, "value_encoder"), output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
  start = transformers.CLIPTextModel.from_pretrained(os.path.join(sd_folder, "text_encoder"))
  trained = model.state_dict()
  changed = [k for k, v in start.state_dict().items() if not np.array_equal(v, trained[k])]
  assert len(changed) > len(trained) // 2


def test_resume_is_exact(straight, make_config, tmp_path):
  """4 steps, stop, then 8: the same weights as 8 straight steps, bit for bit."""
  workdir = str(tmp_path)
  train.train(make_config(total_steps=4), workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4"]
  train.train(make_config(), workdir)
  ours, reference = read_weights(workdir), read_weights(straight)
  assert ours.keys() == reference.keys()
  for key, value in reference.items():
    np.testing.assert_array_equal(ours[key], value, err_msg=key)
  metrics = read_metrics(workdir)
  assert metrics == [dict(m, steps_per_second=n["steps_per_second"])
                     for m, n in zip(read_metrics(straight), metrics)]


def test_gradient_accumulation_matches_full_batch(straight, make_config, tmp_path):
  train.train(make_config(total_steps=2, **{"optim.grad_accum_steps": 2}), str(tmp_path))
  assert_losses_follow(read_metrics(str(tmp_path)), read_metrics(straight))


def test_pixels_match_the_caches(straight, make_config, tmp_path):
  """The recipe's cached VAE moments (both flips) and cached prompt states give the batches the
  step computes from pixels and token ids when the caches are off (the original's work)."""
  train.train(make_config(total_steps=2, **{"data.cache_latents": False,
                                            "data.cache_text": False}), str(tmp_path))
  assert_losses_follow(read_metrics(str(tmp_path)), read_metrics(straight))


_SHARDED_RUN = textwrap.dedent("""
    import json, os, sys
    sys.path[:0] = {paths!r}
    import jax
    from flax import nnx
    from livo_jax import train
    from livo_jax.train import setup, sharding
    from train_fixtures import assert_losses_follow, load_config
    assert jax.device_count() == 8
    for frozen in ("replicated", "fsdp"):
      config = load_config({sd!r}, {data!r}, **{overrides!r}, **{{"sharding.frozen": frozen}})
      train.train(config, os.path.join({workdir!r}, f"frozen_{{frozen}}"))
    # How the rules place the weights on this mesh.
    models = setup.load_models(config)
    mesh = sharding.make_mesh(4, 2)
    specs = {{}}
    for name in ("value_encoder", "unet"):
      _, params = nnx.split(getattr(models, name))
      for path, s in jax.tree_util.tree_flatten_with_path(
          sharding.tree_shardings(mesh, params, sharding.PRESETS["fsdp"]))[0]:
        specs[name + "/" + sharding.path_name(path)] = str(s.spec)
    print("SPECS " + json.dumps(specs))
""")


def test_sharded_run_follows_one_device(straight, make_config, sd_folder, train_dir,
                                        tmp_path):
  """8 CPU devices, data 4 x fsdp 2, same global batch and seed: the 1-device loss curves,
  with the frozen nets replicated and with them split over fsdp."""
  overrides = {"data.cache_dir": make_config().data.cache_dir, **RUN, "total_steps": 3,
               "mesh.data": 4, "mesh.fsdp": 2}
  script = _SHARDED_RUN.format(paths=[REPO, os.path.join(REPO, "tests")], sd=sd_folder,
                               data=train_dir, overrides=overrides, workdir=str(tmp_path))
  env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "")
             + " --xla_force_host_platform_device_count=8")   # conftest's flags, 8 devices
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                       timeout=600, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  for frozen in ("replicated", "fsdp"):
    assert_losses_follow(read_metrics(str(tmp_path / f"frozen_{frozen}")),
                         read_metrics(straight))
  specs = json.loads(next(l for l in out.stdout.splitlines() if l.startswith("SPECS "))[6:])
  # Matrices are split over fsdp along their largest axis; vectors stay replicated.
  fc1 = "value_encoder/encoder/layers/0/mlp/fc1"          # kernel [32, 48]
  assert specs[f"{fc1}/kernel"] == "P(None, 'fsdp')"
  assert specs["value_encoder/embeddings/token_embedding/embedding"] == "P('fsdp',)"
  assert specs[f"{fc1}/bias"] == "P()"
  assert specs["unet/conv_in/kernel"] == "P(None, None, None, 'fsdp')"   # [3, 3, 4, 16]


@pytest.mark.parametrize("overrides,message", [
    ({"model.pretrained": ""}, "model.pretrained is required"),
    ({"model.pretrained": "./no/such/sd"}, r"model.pretrained = './no/such/sd': no such folder "
     r"\(nor a Hub repo id"),
    ({"model.value_encoder_init": "/no/such/encoder"}, "model.value_encoder_init = "
     "'/no/such/encoder': no such folder"),
    ({"batch_size": 6, "optim.grad_accum_steps": 4}, "multiple of the device count"),
    ({"loss.name": "ppo"}, "loss.name = 'ppo'"),
    ({"loss.prediction_type": "sample"}, "loss.prediction_type"),
    ({"optim.schedule": "linear"}, "optim.schedule"),
    ({"dtype": "float8"}, r"dtype = 'float8': expected 'auto' or one of"),
    ({"model.remat": "attention"}, "model.remat = 'attention': expected 'auto' or one of"),
    ({"data.center_crop": False}, "needs data.center_crop=True.*data.cache_latents=False"),
    ({"eval.every": 5, "eval.value_statements": ("a", "b", "c")}, "eval.value_statements"),
    ({"total_steps": 0}, "total_steps"),
    ({"sharding.frozen": "everything"}, "sharding.frozen = 'everything'"),
    ({"sharding.rules.fsdp": (("(", "fsdp"),)}, "bad regex"),
    ({"sharding.rules.fsdp": ((".*", "half"),)}, "rule 'half'"),
    ({"mesh.dcn_data": 3}, "mesh.dcn_data = 3"),
    ({"batch_size": 0}, "batch_size = 0: must be >= 1"),
    ({"optim.grad_accum_steps": 0}, "optim.grad_accum_steps = 0: must be >= 1"),
    ({"data.resolution": 0}, "data.resolution = 0: must be a positive multiple of 8"),
    ({"data.resolution": 20}, "data.resolution = 20"),
    ({"optim.lr": -1.0}, "optim.lr = -1.0: must be finite and > 0"),
    ({"optim.b2": 1.0}, "optim.b2 = 1.0: must be finite and in"),
    ({"optim.weight_decay": float("nan")}, "optim.weight_decay = nan"),
    ({"loss.beta": float("inf")}, "loss.beta = inf: must be finite"),
    ({"loss.snr_gamma": -1.0}, "loss.snr_gamma = -1.0: must be >= 0"),
    ({"loss.margins": "relatve"}, "loss.margins = 'relatve'"),
    ({"loss.margins": "relative", "loss.relative_beta": 0.0}, "loss.relative_beta = 0.0"),
    ({"max_nonfinite_steps": 0}, "max_nonfinite_steps = 0: must be >= 1"),
    ({"eval.every": 4, "eval.steps": 0}, "eval.steps = 0"),
])
def test_config_errors_stop_before_compute(make_config, tmp_path, overrides, message):
  with pytest.raises(ConfigError, match=message):
    train.train(make_config(**overrides), str(tmp_path / "workdir"))
  assert os.listdir(tmp_path / "workdir") == []   # nothing written


def test_resolution_must_suit_the_model(make_config):
  """SD 1.5's VAE (x8) and four UNet levels (x8) need multiples of 64 px."""
  import types  # pylint: disable=g-import-not-at-top
  sd = types.SimpleNamespace(vae_scale_factor=8, unet=types.SimpleNamespace(
      config=types.SimpleNamespace(block_out_channels=(320, 640, 1280, 1280))))
  setup.check_resolution(make_config(**{"data.resolution": 512}), sd)
  with pytest.raises(ConfigError, match="data.resolution = 520: this model needs a multiple "
                     "of 64 px"):
    setup.check_resolution(make_config(**{"data.resolution": 520}), sd)


def test_config_keys_are_the_recipes(make_config, tmp_path):
  from livo_jax.train import recipe  # pylint: disable=g-import-not-at-top
  config = make_config()
  config.loss.betta = 3.0
  with pytest.raises(ConfigError, match="unknown config key 'loss.betta'"):
    train.train(config, str(tmp_path / "w1"))
  config = make_config()
  del config.data.cache_text
  with pytest.raises(ConfigError, match="no key 'data.cache_text'"):
    recipe.check_keys(config)
  config = make_config()
  config.sharding.rules.mine = ((".*", "replicated"),)   # rule sets are open
  recipe.check_keys(config)


def test_explicit_partition_specs(make_config):
  """A rule may be an explicit PartitionSpec; one that does not divide names the parameter."""
  import jax  # pylint: disable=g-import-not-at-top
  tree = {"a": jax.ShapeDtypeStruct((4, 6), "float32"), "b": jax.ShapeDtypeStruct((3,), "float32")}
  mesh = sharding.make_mesh(-1, 1, devices=jax.devices()[:1])
  specs = sharding.tree_shardings(mesh, tree, (("a", (None, "fsdp")), (".*", "replicated")))
  assert str(specs["a"].spec) == "P(None, 'fsdp')" and str(specs["b"].spec) == "P()"
  with pytest.raises(ConfigError, match="no sharding rule matches b"):
    sharding.tree_shardings(mesh, tree, (("a", "fsdp"),))


def test_unwritable_workdir_is_an_error_before_compute(make_config, tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  config = make_config(**{"model.pretrained": "/nonexistent"})
  with pytest.raises(ConfigError, match="cannot be written"):
    train.train(config, str(blocker / "workdir"))


def run_script(*args):
  return subprocess.run([sys.executable, os.path.join(REPO, "scripts", "train.py"),
                         "--config=" + os.path.join(REPO, "configs", "sd15.py"), *args],
                        capture_output=True, text=True, timeout=300, check=False, cwd=REPO)


def test_unknown_config_key_is_an_error(tmp_path):
  out = run_script(f"--workdir={tmp_path}", "--config.loss.betta=3")
  assert out.returncode != 0
  assert "unknown config key '--config.loss.betta'" in out.stderr
  assert "Traceback" not in out.stderr


def test_bad_data_names_file_and_line_and_keeps_the_workdir(sd_folder, tmp_path):
  data = write_livo_data(str(tmp_path / "data"))
  metadata = os.path.join(data, "0-career", "nurse", "metadata.jsonl")
  with open(metadata) as f:
    lines = f.readlines()
  lines[1] = lines[1].replace('"label": 0', '"label": 2').replace('"label": 1', '"label": 2')
  with open(metadata, "w") as f:
    f.writelines(lines)
  workdir = tmp_path / "workdir"
  workdir.mkdir()
  (workdir / "notes.txt").write_text("mine")
  out = run_script(f"--workdir={workdir}", f"--config.model.pretrained={sd_folder}",
                   f"--config.data.train_dir={data}",
                   f"--config.data.cache_dir={tmp_path / 'cache'}")
  assert out.returncode != 0
  assert f"error: {metadata}:2" in out.stderr, out.stderr[-2000:]
  assert "Traceback" not in out.stderr
  assert sorted(os.listdir(workdir)) == ["notes.txt"]


@pytest.mark.parametrize("overrides", [
    {"loss.name": "dpo", "dtype": "bfloat16"},
    {"loss.name": "sft"},
    {"loss.margins": "relative"},
    {"loss.prediction_type": "v_prediction", "loss.snr_gamma": 5.0, "loss.noise_offset": 0.1,
     "loss.input_perturbation": 0.1, "model.remat": "dots"},
])
def test_objectives_in_the_step(make_config, overrides):
  """Each objective and option (bf16 frozen nets, UNet remat) compiles into the step and
  reports what it computed."""
  import jax  # pylint: disable=g-import-not-at-top
  config = make_config(**overrides)
  trainer = setup.build_trainer(config, setup.load_models(config),
                                sharding.make_mesh(-1, 1, devices=jax.devices()[:1]))
  rng = np.random.default_rng(0)
  ids = np.asarray(rng.integers(3, 80, (2, 77)), np.int32)
  batch = dict(pixels_w=rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32),
               pixels_l=rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32),
               prompt_ids=ids, value_ids=ids[::-1])
  new_state, metrics = trainer.step(trainer.state, trainer.frozen, batch)
  metrics = {k: float(v) for k, v in metrics.items()}
  assert int(new_state["step"]) == 1 and np.isfinite(metrics["grad_norm"])
  if config.loss.name == "sft":
    assert set(metrics) >= {"loss", "loss_theta_w"} and "loss_ref_w" not in metrics
    assert metrics["loss"] == pytest.approx(metrics["loss_theta_w"], rel=1e-6)
  else:
    assert set(metrics) >= set(DESIGN_METRICS) - {"step"}
  if config.loss.name == "dpo":
    assert 0 <= metrics["dpo_accuracy"] <= 1
  if config.loss.margins == "relative":
    assert metrics["beta_gap_w"] == pytest.approx(100 * metrics["relative_gap_w"],
                                                 rel=1e-5, abs=1e-6)
    assert metrics["alpha_gap_l"] == pytest.approx(50 * metrics["relative_gap_l"],
                                                  rel=1e-5, abs=1e-6)


def test_float16_step_matches_float32(make_config):
  """float16 frozen nets: the backward pass runs on a loss scaled by 2^10 and the scale is
  divided out exactly, so errors and gradient norm are float32's up to float16 rounding."""
  import jax  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  ids = np.asarray(rng.integers(3, 80, (2, 77)), np.int32)
  batch = dict(pixels_w=rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32),
               pixels_l=rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32),
               prompt_ids=ids, value_ids=ids[::-1])
  metrics = {}
  for dtype in ("float32", "float16"):
    config = make_config(dtype=dtype)
    trainer = setup.build_trainer(config, setup.load_models(config),
                                  sharding.make_mesh(-1, 1, devices=jax.devices()[:1]))
    assert trainer.settings.loss_scale == {"float32": 1.0, "float16": 1024.0}[dtype]
    _, out = trainer.step(trainer.state, trainer.frozen, batch)
    metrics[dtype] = {k: float(v) for k, v in out.items()}
  assert metrics["float16"]["skipped"] == 0
  # Measured: errors within 3e-4 of float32's, the gradient norm within 1e-3. The loss is not
  # compared: beta 1000 turns float16's rounding of the gaps (~1e-4) into ~0.1 of loss.
  for key in ("loss_ref_w", "loss_ref_l", "loss_theta_w", "loss_theta_l"):
    assert metrics["float16"][key] == pytest.approx(metrics["float32"][key], rel=2e-3), key
  assert metrics["float16"]["grad_norm"] == pytest.approx(metrics["float32"]["grad_norm"],
                                                          rel=1e-2)


def test_auto_choices_by_platform(make_config, monkeypatch):
  import jax  # pylint: disable=g-import-not-at-top
  for backend, dtype, remat in (("cpu", "float32", "none"), ("gpu", "float16", "blocks"),
                                ("tpu", "float32", "blocks")):
    monkeypatch.setattr(jax, "default_backend", lambda backend=backend: backend)
    config = make_config(dtype="auto", **{"model.remat": "auto"})
    setup.resolve_auto(config)
    assert (config.dtype, config.model.remat) == (dtype, remat)
  config.dtype, config.model.remat = "bfloat16", "dots"     # what the user set stays
  setup.resolve_auto(config)
  assert (config.dtype, config.model.remat) == ("bfloat16", "dots")


def test_schedules(make_config):
  import optax  # pylint: disable=g-import-not-at-top
  optim = make_config().optim
  optim.lr, optim.warmup_steps = 1e-3, 10
  for name, expected in [
      ("constant", {0: 1e-3, 5: 1e-3, 100: 1e-3}),
      ("warmup_constant", {0: 0.0, 5: 0.5e-3, 10: 1e-3, 100: 1e-3}),
      ("cosine", {0: 0.0, 5: 0.5e-3, 10: 1e-3, 55: 0.5e-3, 100: 0.0}),
  ]:
    optim.schedule = name
    tx, schedule = optim_lib.make_optimizer(optim, total_steps=100)
    assert isinstance(tx, optax.GradientTransformation)
    for step, lr in expected.items():
      assert float(schedule(step)) == pytest.approx(lr, abs=1e-9), (name, step)


def test_value_encoder_init_folder(make_config, tmp_path):
  """`model.value_encoder_init` (e.g. released LiVO weights) replaces the text-encoder start."""
  import tiny_sd  # pylint: disable=g-import-not-at-top
  released = str(tmp_path / "value_encoder")
  torch_model = tiny_sd.make_component("text_encoder", released, seed=5)
  models = setup.load_models(make_config(**{"model.value_encoder_init": released}))
  ids = np.arange(3, 80, dtype=np.int64)[None, :77]
  import torch  # pylint: disable=g-import-not-at-top
  with torch.no_grad():
    expected = torch_model(torch.from_numpy(ids))[1].numpy()
  np.testing.assert_allclose(models.value_encoder(ids.astype(np.int32))[1], expected, atol=1e-5)
  assert models.value_encoder_config["hidden_size"] == 32


DESIGN_KEYS = ("model.pretrained", "model.value_encoder_init", "data.train_dir",
               "data.resolution", "data.skip_bad", "data.cache_latents", "batch_size",
               "total_steps", "seed", "loss.name", "loss.beta", "loss.alpha", "loss.gamma1",
               "loss.gamma2", "loss.beta_dpo", "loss.snr_gamma", "optim.lr",
               "optim.max_grad_norm", "checkpoint_every", "log_every", "mesh.data", "mesh.fsdp")


def test_sd15_config_is_the_recipe():
  from train_fixtures import config_module  # pylint: disable=g-import-not-at-top
  config = config_module("sd15").get_config()
  flat = {}

  def walk(node, prefix=""):
    for key, value in node.items():
      if hasattr(value, "items"):
        walk(value, f"{prefix}{key}.")
      else:
        flat[prefix + key] = value
  walk(config)
  assert set(DESIGN_KEYS) <= set(flat)
  recipe = {"batch_size": 8, "total_steps": 15000, "optim.lr": 1e-6, "optim.schedule": "constant",
            "optim.warmup_steps": 0, "optim.b1": 0.9, "optim.b2": 0.999, "optim.eps": 1e-8,
            "optim.weight_decay": 1e-2, "optim.max_grad_norm": 1.0, "loss.beta": 1000.0,
            "loss.alpha": 500.0, "loss.gamma1": 1.0, "loss.gamma2": 0.5, "loss.name": "livo",
            "loss.margins": "absolute", "dtype": "auto", "model.remat": "auto",
            "data.cache_latents": True, "data.cache_text": True,
            "data.resolution": 512, "data.center_crop": True, "data.random_flip": True,
            "checkpoint_every": 1000, "keep_checkpoints": 20, "eval.every": 1000}
  assert {k: flat[k] for k in recipe} == recipe
