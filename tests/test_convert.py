"""Folder conversion: bit-exact round trips, torch reloads, Flax checkpoints, clear errors."""

import asyncio
import gc
import json
import os
import re
import runpy
import shutil
import signal
import subprocess
import sys
import time

import diffusers
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

import testutil
from tiny_sd import CLIP_CONFIG, UNET_CONFIG, VAE_CONFIG, make_component, make_sd_folder
from livo_jax import weights
from livo_jax.errors import ConfigError, WeightsError
from livo_jax.models import (AutoencoderKL, CLIPTextConfig, CLIPTextModel, UNet2DConditionModel,
                             UNetConfig, VAEConfig)
from livo_jax.weights import load_clip_text, load_unet, load_vae

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(REPO, "tools", "convert_weights.py")

def torch_tensors(folder):
  """Every tensor of a torch component folder, keys normalised to the current layout."""
  kind = weights.kind_of_folder(folder)
  tensors = {}
  for path in weights.folders.weights_files(folder, kind):
    tensors.update(weights.tensors.open_tensors(path))
  return {k: np.asarray(v) for k, v in kind.normalise_keys(tensors).items()}


def assert_bit_exact(a, b):
  assert sorted(a) == sorted(b)
  for key in a:
    assert a[key].dtype == b[key].dtype, key
    assert a[key].shape == b[key].shape, key
    assert a[key].tobytes() == b[key].tobytes(), key


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("sd") / "tiny-sd")
  make_sd_folder(root)
  return root


@pytest.fixture(scope="module")
def round_trip(sd_folder, tmp_path_factory):
  base = tmp_path_factory.mktemp("round_trip")
  flax_dir, torch_dir = str(base / "flax"), str(base / "torch")
  weights.conversion.import_folder(sd_folder, flax_dir)
  weights.conversion.export_folder(flax_dir, torch_dir)
  return flax_dir, torch_dir


def test_whole_sd_folder_round_trip_is_bit_exact(sd_folder, round_trip):
  flax_dir, torch_dir = round_trip
  for name in weights.conversion.PIPELINE_COMPONENTS:
    assert weights.tensors.is_flax_checkpoint(os.path.join(flax_dir, name))
    assert_bit_exact(torch_tensors(os.path.join(sd_folder, name)),
                     torch_tensors(os.path.join(torch_dir, name)))
  for copied in ("model_index.json", "scheduler/scheduler_config.json", "tokenizer/vocab.json",
                 "tokenizer/merges.txt"):
    with open(os.path.join(sd_folder, copied), "rb") as a, \
         open(os.path.join(torch_dir, copied), "rb") as b:
      assert a.read() == b.read(), copied


def test_torch_classes_reload_exports_cleanly(round_trip):
  _, torch_dir = round_trip
  loaders = {"text_encoder": transformers.CLIPTextModel,
             "unet": diffusers.UNet2DConditionModel, "vae": diffusers.AutoencoderKL}
  for name, cls in loaders.items():
    _, info = cls.from_pretrained(os.path.join(torch_dir, name), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], (name, info)
    assert not info["mismatched_keys"], (name, info)


def test_text_encoder_export_keeps_transformers4_prefix(round_trip):
  _, torch_dir = round_trip
  keys = load_file(os.path.join(torch_dir, "text_encoder", "model.safetensors"))
  assert all(k.startswith("text_model.") for k in keys)


def test_loaders_accept_flax_checkpoints(sd_folder, round_trip):
  flax_dir, _ = round_trip
  for loader, name in ((load_clip_text, "text_encoder"), (load_unet, "unet"), (load_vae, "vae")):
    from_torch = weights.layout.flax_state_dict(loader(os.path.join(sd_folder, name)))
    from_flax = weights.layout.flax_state_dict(loader(os.path.join(flax_dir, name)))
    assert_bit_exact(from_torch, from_flax)


def test_fp16_file_stays_fp16(tmp_path):
  src, flax_dir, out = (str(tmp_path / n) for n in ("src", "flax", "out"))
  make_component("vae", src, dtype=torch.float16)
  weights.conversion.import_folder(src, flax_dir)
  weights.conversion.export_folder(flax_dir, out)
  exported = torch_tensors(out)
  assert {v.dtype for v in exported.values()} == {np.dtype("float16")}
  assert_bit_exact(torch_tensors(src), exported)
  # The loader keeps the storage dtype unless asked, and computes in the given dtype.
  vae = load_vae(src)
  assert vae.decoder.conv_out.kernel.get_value().dtype == jnp.float16
  assert load_vae(src, param_dtype=jnp.float32).decoder.conv_out.kernel.get_value().dtype == jnp.float32


def test_weights_variant_is_read(tmp_path, sd_folder):
  src = os.path.join(sd_folder, "vae")
  folder = str(tmp_path / "variant")
  os.makedirs(folder)
  shutil.copy(os.path.join(src, "config.json"), folder)
  tensors = load_file(os.path.join(src, "diffusion_pytorch_model.safetensors"))
  save_file({k: v.astype(np.float16) for k, v in tensors.items()},
            os.path.join(folder, "diffusion_pytorch_model.fp16.safetensors"))
  with pytest.raises(WeightsError, match="no weights file"):
    load_vae(folder)
  vae = load_vae(folder, variant="fp16")
  np.testing.assert_array_equal(vae.encoder.conv_in.kernel.get_value(),
                                weights.layout.to_flax_layout(("kernel",),
                                                       tensors["encoder.conv_in.weight"]
                                                       ).astype(np.float16))


def test_bin_weights_load_when_torch_is_installed(tmp_path):
  src = str(tmp_path / "bin")
  torch_model = make_component("text_encoder", src)
  os.remove(os.path.join(src, "model.safetensors"))  # transformers 5 writes only safetensors
  torch.save(torch_model.state_dict(), os.path.join(src, "pytorch_model.bin"))
  model = load_clip_text(src)
  ids = np.array([[0, 5, 9, 63, 1]])
  with torch.no_grad():
    ref = torch_model(torch.from_numpy(ids)).pooler_output
  assert testutil.max_abs_err(model(jnp.asarray(ids))[1], ref) <= 1e-5


def test_clip_keys_with_and_without_prefix_and_old_buffers(tmp_path, sd_folder):
  src = os.path.join(sd_folder, "text_encoder")
  tensors = load_file(os.path.join(src, "model.safetensors"))
  reference = weights.layout.flax_state_dict(load_clip_text(src))
  prefixed = {("" if k.startswith("text_model.") else "text_model.") + k: v
              for k, v in tensors.items()}
  prefixed["text_model.embeddings.position_ids"] = np.arange(77)[None]  # old files hold it
  folder = str(tmp_path / "prefixed")
  os.makedirs(folder)
  shutil.copy(os.path.join(src, "config.json"), folder)
  save_file(prefixed, os.path.join(folder, "model.safetensors"))
  assert_bit_exact(reference, weights.layout.flax_state_dict(load_clip_text(folder)))


def test_legacy_vae_attention_names_load(tmp_path, sd_folder):
  src = os.path.join(sd_folder, "vae")
  tensors = load_file(os.path.join(src, "diffusion_pytorch_model.safetensors"))
  legacy = {}
  for key, value in tensors.items():
    for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"),
                     ("to_out.0", "proj_attn")):
      key = key.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
    legacy[key] = value
  assert any(".attentions.0.query." in k for k in legacy)
  folder = str(tmp_path / "legacy_vae")
  os.makedirs(folder)
  shutil.copy(os.path.join(src, "config.json"), folder)
  save_file(legacy, os.path.join(folder, "diffusion_pytorch_model.safetensors"))
  assert_bit_exact(weights.layout.flax_state_dict(load_vae(src)),
                   weights.layout.flax_state_dict(load_vae(folder)))


# ---------------------------------------------------------------------------------------------
# Bad input: each error names the key, field or file.

def edited_copy(src, dst, edit_tensors=None, edit_config=None):
  shutil.copytree(src, dst)
  if edit_tensors:
    path = weights.folders.weights_files(dst, weights.kind_of_folder(dst))[0]
    tensors = load_file(path)
    edit_tensors(tensors)
    save_file(tensors, path)
  if edit_config:
    path = os.path.join(dst, "config.json")
    with open(path) as f:
      config = json.load(f)
    edit_config(config)
    with open(path, "w") as f:
      json.dump(config, f)
  return dst


def test_missing_key_is_named(sd_folder, tmp_path):
  key = "mid_block.resnets.0.conv1.weight"
  folder = edited_copy(os.path.join(sd_folder, "unet"), str(tmp_path / "u"),
                       edit_tensors=lambda t: t.pop(key))
  with pytest.raises(WeightsError, match=r"missing keys \(1\): " + key.replace(".", r"\.")):
    load_unet(folder)


def test_unexpected_key_is_named(sd_folder, tmp_path):
  folder = edited_copy(os.path.join(sd_folder, "unet"), str(tmp_path / "u"),
                       edit_tensors=lambda t: t.update(extra_head=np.zeros(3, np.float32)))
  with pytest.raises(WeightsError, match=r"unexpected keys \(1\): extra_head"):
    load_unet(folder)


def test_mis_shaped_key_is_named(sd_folder, tmp_path):
  key = "decoder.conv_out.weight"
  def widen(tensors):
    tensors[key] = np.zeros((3, 16, 3, 5), np.float32)
  folder = edited_copy(os.path.join(sd_folder, "vae"), str(tmp_path / "v"), edit_tensors=widen)
  with pytest.raises(WeightsError, match=key.replace(".", r"\.") +
                     r": file \(3, 16, 3, 5\), model expects \(3, 16, 3, 3\)"):
    load_vae(folder)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_weights_are_refused_at_load(sd_folder, tmp_path, bad):
  """A value encoder that a diverged run wrote would only give black images."""
  key = "encoder.layers.1.mlp.fc2.weight"
  def poison(tensors):
    tensors[key] = tensors[key].copy()
    tensors[key][3, :5] = bad
  folder = edited_copy(os.path.join(sd_folder, "text_encoder"), str(tmp_path / "t"),
                       edit_tensors=poison)
  path = os.path.join(folder, "model.safetensors")
  with pytest.raises(WeightsError, match=re.escape(
      f"{path}: non-finite weights in {key} (5 of 1,536 values are NaN or inf)")):
    load_clip_text(folder)


def test_unreadable_weights_file_is_named(sd_folder, tmp_path):
  folder = edited_copy(os.path.join(sd_folder, "text_encoder"), str(tmp_path / "t"))
  with open(os.path.join(folder, "model.safetensors"), "wb") as f:
    f.write(b"\x00not a safetensors file")
  with pytest.raises(WeightsError, match="model.safetensors: unreadable safetensors file"):
    load_clip_text(folder)


def test_missing_weights_file_is_named(sd_folder, tmp_path):
  folder = edited_copy(os.path.join(sd_folder, "vae"), str(tmp_path / "v"))
  os.remove(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
  with pytest.raises(WeightsError, match="no weights file"):
    load_vae(folder)


def test_unsupported_config_field_is_named(sd_folder, tmp_path):
  folder = edited_copy(os.path.join(sd_folder, "unet"), str(tmp_path / "u"),
                       edit_config=lambda c: c.update(class_embed_type="timestep"))
  with pytest.raises(ConfigError, match="'class_embed_type' = 'timestep' is not supported"):
    load_unet(folder)


def test_unreadable_config_is_named(sd_folder, tmp_path):
  folder = edited_copy(os.path.join(sd_folder, "vae"), str(tmp_path / "v"))
  with open(os.path.join(folder, "config.json"), "w") as f:
    f.write("{not json")
  with pytest.raises(ConfigError, match="config.json: unreadable config"):
    load_vae(folder)


def test_import_refuses_to_overwrite(sd_folder, tmp_path):
  dst = tmp_path / "dst"
  dst.mkdir()
  (dst / "keep.txt").write_text("precious")
  with pytest.raises(FileExistsError, match="not empty"):
    weights.conversion.import_folder(sd_folder, str(dst))
  assert (dst / "keep.txt").read_text() == "precious"


# ---------------------------------------------------------------------------------------------
# The command-line tool.

def run_tool(*args):
  return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True,
                        cwd=REPO, timeout=300)


def test_tool_import_export_inspect(sd_folder, tmp_path):
  flax_dir, torch_dir = str(tmp_path / "flax"), str(tmp_path / "torch")
  result = run_tool("import", os.path.join(sd_folder, "vae"), flax_dir)
  assert result.returncode == 0, result.stderr
  result = run_tool("export", flax_dir, torch_dir)
  assert result.returncode == 0, result.stderr
  assert_bit_exact(torch_tensors(os.path.join(sd_folder, "vae")), torch_tensors(torch_dir))
  result = run_tool("inspect", sd_folder)
  assert result.returncode == 0, result.stderr
  vae_count = sum(v.size for v in torch_tensors(os.path.join(sd_folder, "vae")).values())
  assert f"{vae_count:,} parameters" in result.stdout
  assert "encoder.conv_in.weight" in result.stdout and "float32" in result.stdout


def test_tool_error_is_one_line_naming_the_key(sd_folder, tmp_path):
  folder = edited_copy(os.path.join(sd_folder, "unet"), str(tmp_path / "u"),
                       edit_tensors=lambda t: t.pop("conv_in.bias"))
  result = run_tool("import", folder, str(tmp_path / "out"))
  assert result.returncode == 1
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and "conv_in.bias" in lines[0], result.stderr
  assert not os.path.exists(tmp_path / "out" / "flax_params")


def test_tool_non_finite_weights_stop_the_import_in_one_line(sd_folder, tmp_path):
  """Found as the tensors stream, with part of the checkpoint written: one line, no folder."""
  key = "encoder.layers.1.mlp.fc2.weight"
  def poison(tensors):
    tensors[key] = tensors[key].copy()
    tensors[key][0, 0] = np.nan
  folder = edited_copy(os.path.join(sd_folder, "text_encoder"), str(tmp_path / "t"),
                       edit_tensors=poison)
  result = run_tool("import", folder, str(tmp_path / "out"))
  assert result.returncode == 1
  assert result.stderr.splitlines() == [
      f"convert_weights import: error: {folder}/model.safetensors: non-finite weights in {key} "
      "(1 of 1,536 values are NaN or inf)"]
  assert os.listdir(tmp_path) == ["t"]


def test_sharded_safetensors_load(tmp_path, sd_folder):
  src = os.path.join(sd_folder, "unet")
  tensors = load_file(os.path.join(src, "diffusion_pytorch_model.safetensors"))
  folder = tmp_path / "sharded"
  folder.mkdir()
  shutil.copy(os.path.join(src, "config.json"), folder)
  keys = sorted(tensors)
  shards = {"part-1.safetensors": keys[::2], "part-2.safetensors": keys[1::2]}
  for name, shard_keys in shards.items():
    save_file({k: tensors[k] for k in shard_keys}, str(folder / name))
  index = {"weight_map": {k: name for name, ks in shards.items() for k in ks}}
  (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
  assert_bit_exact(weights.layout.flax_state_dict(load_unet(src)),
                   weights.layout.flax_state_dict(load_unet(str(folder))))


def test_models_built_in_jax_save_as_torch_folders(tmp_path):
  """Models made from a config (as the demo and the trainer make them) export for torch."""
  rng = np.random.default_rng(0)
  clip = CLIPTextModel(CLIPTextConfig(**CLIP_CONFIG), rngs=nnx.Rngs(1))
  weights.save_pretrained(clip, str(tmp_path / "clip"))
  torch_clip = transformers.CLIPTextModel.from_pretrained(str(tmp_path / "clip")).eval()
  ids = np.array([[0, 7, 63, 1, 1]])
  with torch.no_grad():
    ref = torch_clip(torch.from_numpy(ids))
  hidden, pooled = testutil.jitted(clip)(jnp.asarray(ids))
  assert testutil.max_abs_err(hidden, ref.last_hidden_state) <= 1e-5
  assert testutil.max_abs_err(pooled, ref.pooler_output) <= 1e-5

  unet = UNet2DConditionModel(UNetConfig(**UNET_CONFIG), rngs=nnx.Rngs(2))
  weights.save_pretrained(unet, str(tmp_path / "unet"))
  torch_unet, info = diffusers.UNet2DConditionModel.from_pretrained(
      str(tmp_path / "unet"), output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"]
  latents = rng.standard_normal((1, 8, 8, 4), np.float32)
  context = rng.standard_normal((1, 5, 32), np.float32)
  with torch.no_grad():
    ref = torch_unet.eval()(torch.from_numpy(testutil.nhwc_to_nchw(latents)), 10,
                            torch.from_numpy(context)).sample
  out = testutil.jitted(unet)(jnp.asarray(latents), jnp.array([10]), jnp.asarray(context))
  assert testutil.max_abs_err(out, testutil.nchw_to_nhwc(ref)) <= 1e-4 * float(ref.abs().max())

  vae = AutoencoderKL(VAEConfig(**VAE_CONFIG), rngs=nnx.Rngs(3))
  weights.save_pretrained(vae, str(tmp_path / "vae"))
  torch_vae = diffusers.AutoencoderKL.from_pretrained(str(tmp_path / "vae")).eval()
  assert torch_vae.config.scaling_factor == vae.scaling_factor
  assert torch_vae.config.sample_size == VAE_CONFIG["sample_size"]
  images = rng.uniform(-1, 1, (1, 16, 16, 3)).astype(np.float32)
  with torch.no_grad():
    ref = torch_vae.encode(torch.from_numpy(testutil.nhwc_to_nchw(images))).latent_dist.mean
  mean, _ = testutil.jitted(vae, "encode")(jnp.asarray(images))
  assert testutil.max_abs_err(mean, testutil.nchw_to_nhwc(ref)) <= 1e-4


def test_tool_inspect_fails_on_what_loading_would_refuse(sd_folder, tmp_path):
  """The listing still prints; then one line per component that would not load, exit 1."""
  folder = str(tmp_path / "sd")
  shutil.copytree(sd_folder, folder, ignore=shutil.ignore_patterns("unet", "vae"))
  edited_copy(os.path.join(sd_folder, "unet"), os.path.join(folder, "unet"),
              edit_tensors=lambda t: t.pop("conv_in.bias"))
  def widen(tensors):
    tensors["decoder.conv_out.weight"] = np.zeros((3, 16, 3, 5), np.float32)
  edited_copy(os.path.join(sd_folder, "vae"), os.path.join(folder, "vae"), edit_tensors=widen)
  result = run_tool("inspect", folder)
  assert result.returncode == 1, result.stderr
  assert "encoder.conv_in.weight" in result.stdout and "total:" in result.stdout
  unet_file = os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors")
  vae_file = os.path.join(folder, "vae", "diffusion_pytorch_model.safetensors")
  assert result.stderr.splitlines() == [
      f"convert_weights inspect: error: {unet_file}: weights do not match the model missing "
      "keys (1): conv_in.bias",
      f"convert_weights inspect: error: {vae_file}: weights do not match the model mis-shaped "
      "keys (1): decoder.conv_out.weight: file (3, 16, 3, 5), model expects (3, 16, 3, 3)"]


def truncated_checkpoint(flax_component, dst):
  """A copy of a Flax checkpoint with its largest data file cut to half."""
  shutil.copytree(flax_component, dst)
  data = [os.path.join(folder, name) for folder, _, names in os.walk(dst) for name in names
          if os.path.basename(folder) == "d"]
  largest = max(data, key=os.path.getsize)
  os.truncate(largest, os.path.getsize(largest) // 2)
  return dst


def test_tool_truncated_checkpoint_is_one_line(round_trip, tmp_path):
  """orbax's restore left reads in flight: each printed an "Event loop is closed" traceback."""
  folder = truncated_checkpoint(os.path.join(round_trip[0], "vae"), str(tmp_path / "vae"))
  result = run_tool("export", folder, str(tmp_path / "out"))
  assert result.returncode == 1
  lines = result.stderr.splitlines()
  assert len(lines) == 1, result.stderr
  assert lines[0].startswith(f"convert_weights export: error: {folder}/flax_params: "
                             "unreadable Flax checkpoint (ValueError: OUT_OF_RANGE: Error "
                             "reading \""), lines[0]
  assert not os.path.exists(tmp_path / "out")


def test_truncated_checkpoint_fails_to_load_without_noise(round_trip, tmp_path, monkeypatch):
  folder = truncated_checkpoint(os.path.join(round_trip[0], "vae"), str(tmp_path / "vae"))
  dropped = []   # what threads raise where Python cannot report it (the tracebacks of old)
  monkeypatch.setattr(sys, "unraisablehook", dropped.append)
  for _ in range(5):   # reads left in flight or not is a race: give it a few chances
    with pytest.raises(WeightsError, match="unreadable Flax checkpoint"):
      load_vae(folder)
  time.sleep(0.5)   # such reads would have completed by now
  assert not dropped, [str(d.exc_value) for d in dropped]


def test_flax_checkpoint_loads_inside_a_running_event_loop(sd_folder, round_trip):
  """As in a notebook (the reader runs its own loop, in a thread)."""
  async def load():
    return load_vae(os.path.join(round_trip[0], "vae"))
  assert_bit_exact(weights.layout.flax_state_dict(load_vae(os.path.join(sd_folder, "vae"))),
                   weights.layout.flax_state_dict(asyncio.run(load())))


# ---------------------------------------------------------------------------------------------
# Interrupted and killed conversions: nothing half-written stays behind.

def start_tool(*args):
  """The tool in the background, taking Ctrl-C as in a terminal.

  Under a shell's `&` pytest ignores SIGINT, and so would the tool; exec resets a handler, not
  an ignore, so one is set while the tool starts.
  """
  ignored = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    return subprocess.Popen([sys.executable, TOOL, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO)
  finally:
    signal.signal(signal.SIGINT, ignored)


def wait_for_partial(process, parent, timeout=120):
  """Waits until the conversion's partial folder appears beside its destination."""
  deadline = time.monotonic() + timeout
  while not any(".tmp-" in name for name in os.listdir(parent)):
    assert process.poll() is None, process.communicate()
    assert time.monotonic() < deadline, "no partial folder appeared"
    time.sleep(0.02)


@pytest.mark.parametrize("command,signum", [("import", signal.SIGTERM),
                                            ("export", signal.SIGINT)])
def test_tool_interrupted_removes_its_partial_folder(sd_folder, round_trip, tmp_path, command,
                                                     signum):
  src = sd_folder if command == "import" else round_trip[0]
  parent = tmp_path / "out"
  parent.mkdir()
  process = start_tool(command, src, str(parent / "dst"))
  wait_for_partial(process, parent)
  process.send_signal(signum)
  stdout, stderr = process.communicate(timeout=120)
  assert process.returncode == 128 + signum, stderr
  assert stderr.splitlines() == [f"convert_weights {command}: interrupted"]
  assert stdout == ""
  assert os.listdir(parent) == []


def test_tool_interrupt_dropped_in_a_gc_callback_comes_again(monkeypatch):
  """JAX's gc callback runs at every collection: a SIGTERM that Python raised there was lost."""
  tool = runpy.run_path(TOOL)   # its functions, not its main
  monkeypatch.setattr(sys, "unraisablehook", tool["_deliver_dropped_interrupts"])
  previous = signal.signal(signal.SIGTERM, tool["_interrupt"])
  raised = []

  def signal_in_gc(phase, info):
    del info
    if phase == "start" and not raised:
      raised.append(True)
      signal.raise_signal(signal.SIGTERM)   # its KeyboardInterrupt is dropped here

  gc.callbacks.append(signal_in_gc)
  try:
    with pytest.raises(KeyboardInterrupt) as interrupt:
      gc.collect()
      time.sleep(5)   # the signal comes again meanwhile
  finally:
    gc.callbacks.remove(signal_in_gc)
    signal.signal(signal.SIGTERM, previous)
  assert raised and interrupt.value.args == (signal.SIGTERM,)


def test_next_conversion_removes_what_a_killed_one_left(sd_folder, tmp_path):
  parent = tmp_path / "out"
  parent.mkdir()
  process = start_tool("import", sd_folder, str(parent / "dst"))
  wait_for_partial(process, parent)
  process.kill()   # kill -9: nothing runs on the way out
  process.communicate()
  killed = os.listdir(parent)
  assert len(killed) == 1 and killed[0].startswith(f".dst.tmp-{process.pid}-"), killed
  # A single-component import's partial: save_flax's own, beside the empty one it takes over,
  # holding orbax's temporary.
  dead = subprocess.Popen(["true"])
  dead.wait()
  nested = parent / f"..dst.tmp-{dead.pid}-0123abcd.tmp-{dead.pid}-4567cdef"
  (nested / "flax_params.orbax-checkpoint-tmp").mkdir(parents=True)
  (nested / "flax_params.orbax-checkpoint-tmp" / "part").write_bytes(b"\0" * 1000)
  live = parent / f".dst.tmp-{os.getpid()}-89abcdef"   # a conversion still running: kept
  live.mkdir()

  messages = []
  weights.conversion.import_folder(os.path.join(sd_folder, "vae"), str(parent / "dst"),
                                   log=messages.append)
  assert messages == [f"removed 2 leftover(s) of killed writes from {parent}: "
                      + ", ".join(sorted(killed + [nested.name]))]
  assert sorted(os.listdir(parent)) == sorted(["dst", live.name])


def test_safetensors_files_follow_the_umask(tmp_path):
  """safetensors alone creates its files 0600; a reader may be another user."""
  old = os.umask(0o027)
  try:
    weights.tensors.write_safetensors({"a": np.zeros(2, np.float32)},
                                     str(tmp_path / "a.safetensors"))
  finally:
    os.umask(old)
  assert os.stat(tmp_path / "a.safetensors").st_mode & 0o777 == 0o640
