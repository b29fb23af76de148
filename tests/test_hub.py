"""Hub repo ids wherever a model folder is taken: ids, subfolder, revision, variant, errors.

Every test reads a Hugging Face cache folder it filled itself (`hub_cache`), offline, the way a
user with `HF_HUB_OFFLINE=1` and SD in the cache runs; one test replaces the download itself to
see which files a fetch from the Hub would ask for.
"""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import hub_cache
from livo_jax import weights
from livo_jax.weights import hub
from livo_jax.weights import layout

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SD = "org/tiny-sd"
LIVO = "org/tiny-livo"
COMPONENT_FILES = {"text_encoder": "model", "unet": "diffusion_pytorch_model",
                   "vae": "diffusion_pytorch_model"}


def add_fp16_variant(folder: str) -> None:
  """Beside each component's weights, their `.fp16.safetensors` variant, as SD 1.5 has."""
  for component, stem in COMPONENT_FILES.items():
    path = os.path.join(folder, component, f"{stem}.safetensors")
    half = {k: v.astype(np.float16) for k, v in load_file(path).items()}
    save_file(half, os.path.join(folder, component, f"{stem}.fp16.safetensors"))


@pytest.fixture(scope="module")
def folders(sd_folder, tmp_path_factory):
  """The repos' contents: SD (plain + fp16 files), another SD for tag v2, a LiVO release."""
  import tiny_sd  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("hub_src")
  sd = str(root / "sd")
  shutil.copytree(sd_folder, sd)
  add_fp16_variant(sd)
  other = str(root / "sd_v2")
  tiny_sd.make_sd_folder(other, seed=1)
  livo = str(root / "livo")
  shutil.copytree(os.path.join(other, "text_encoder"), os.path.join(livo, "value_encoder"))
  return {"sd": sd, "sd_v2": other, "livo": livo}


@pytest.fixture(scope="module")
def cache(folders, tmp_path_factory):
  cache = str(tmp_path_factory.mktemp("hf_cache"))
  commits = {
      "main": hub_cache.add_repo(cache, SD, folders["sd"]),
      "v2": hub_cache.add_repo(cache, SD, folders["sd_v2"], revision="v2"),
      "livo": hub_cache.add_repo(cache, LIVO, folders["livo"]),
      # config.json but no weights: what an interrupted download leaves
      "broken": hub_cache.add_repo(cache, "org/broken", folders["sd"],
                                   skip=("unet/diffusion_pytorch_model.safetensors",
                                         "unet/diffusion_pytorch_model.fp16.safetensors")),
  }
  return cache, commits


@pytest.fixture
def offline(cache, monkeypatch):
  with hub_cache.offline_cache(monkeypatch, cache[0]):
    yield cache[1]


def params(model) -> dict[str, np.ndarray]:
  return {k: np.asarray(v) for k, v in layout.torch_state_dict(model).items()}


def assert_same(a, b):
  a, b = params(a), params(b)
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_a_repo_id_loads_what_its_folder_loads(folders, offline):
  from_hub = weights.load_sd(SD, value_encoder=weights.ModelRef(LIVO, subfolder="value_encoder"))
  local = weights.load_sd(folders["sd"],
                          value_encoder=os.path.join(folders["livo"], "value_encoder"))
  for part in ("text_encoder", "unet", "vae", "value_encoder"):
    assert_same(getattr(from_hub, part), getattr(local, part))
  assert from_hub.tokenizer("a circle").input_ids == local.tokenizer("a circle").input_ids
  assert from_hub.scheduler_config == local.scheduler_config


def test_revision_picks_the_tag_or_commit(folders, offline):
  by_tag = weights.load_unet(weights.ModelRef(SD, subfolder="unet", revision="v2"))
  by_commit = weights.load_unet(weights.ModelRef(SD, subfolder="unet", revision=offline["v2"]))
  v2 = weights.load_unet(os.path.join(folders["sd_v2"], "unet"))
  main = weights.load_unet(weights.ModelRef(SD, subfolder="unet"))
  assert_same(by_tag, v2)
  assert_same(by_commit, v2)
  assert not np.array_equal(params(main)["conv_in.weight"], params(v2)["conv_in.weight"])


def test_variant_reads_the_fp16_files(folders, offline):
  sd = weights.load_sd(weights.ModelRef(SD, variant="fp16"))
  unet = params(sd.unet)
  half = load_file(os.path.join(folders["sd"], "unet",
                                "diffusion_pytorch_model.fp16.safetensors"))
  assert unet["conv_in.weight"].dtype == np.float16
  np.testing.assert_array_equal(unet["conv_in.weight"], half["conv_in.weight"])


def test_a_local_folder_wins_over_the_id_it_spells(folders, offline, tmp_path, monkeypatch):
  shutil.copytree(os.path.join(folders["sd_v2"], "unet"), tmp_path / "org" / "tiny-sd")
  monkeypatch.chdir(tmp_path)   # "org/tiny-sd" is now also a folder here
  assert_same(weights.load_unet(SD), weights.load_unet(os.path.join(folders["sd_v2"], "unet")))
  with pytest.raises(ValueError, match="a revision applies to a Hub repo id"):
    weights.load_unet(weights.ModelRef(SD, revision="v2"))


def test_missing_weights_name_the_repo_and_the_files(offline):
  with pytest.raises(weights.HubError) as error:
    weights.load_sd("org/broken")
  message = str(error.value)
  assert "org/broken/unet" in message and "diffusion_pytorch_model.safetensors" in message
  assert "HF_HUB_OFFLINE=1" in message and "\n" not in message


@pytest.mark.parametrize("ref, expected", [
    (weights.ModelRef("org/not-cached"), "org/not-cached: no such folder, and as a Hub repo id not in the Hugging Face cache"),
    (weights.ModelRef(SD, revision="v9"), r"org/tiny-sd \(revision v9\): no such folder, and as a Hub "
     r"repo id not in the Hugging Face cache .*`hf download org/tiny-sd --revision v9`"),
    (weights.ModelRef(SD, subfolder="nothing"), "org/tiny-sd/nothing: the repo has no such "
     "folder"),
    (weights.ModelRef(LIVO, subfolder="value_encoder", variant="fp16"),
     r"org/tiny-livo/value_encoder \(variant fp16\): .* no weights file .*model.fp16.safetensors"),
    (weights.ModelRef("./no/such/folder"), r"\./no/such/folder: no such folder \(nor a Hub"),
])
def test_what_the_cache_cannot_give_is_one_line(offline, ref, expected):
  with pytest.raises(FileNotFoundError, match=expected) as error:
    weights.load_clip_text(ref)
  assert "\n" not in str(error.value)


def repo_listing(folders, root) -> str:
  """SD 1.5's repo in miniature, every kind of file it holds: the plain and fp16 weights, the
  legacy .bin files, the EMA-free UNet, the safety checker and the single-file checkpoints."""
  repo = os.path.join(root, "remote")
  shutil.copytree(folders["sd"], repo)
  extras = ["safety_checker/config.json", "safety_checker/model.safetensors",
            "feature_extractor/preprocessor_config.json", "v1-5-pruned.safetensors",
            "v1-5-pruned-emaonly.ckpt", "unet/diffusion_pytorch_model.non_ema.safetensors",
            "text_encoder/pytorch_model.bin", "unet/diffusion_pytorch_model.fp16.bin",
            "README.md"]
  for path in extras:
    os.makedirs(os.path.dirname(os.path.join(repo, path)) or repo, exist_ok=True)
    with open(os.path.join(repo, path), "w") as f:
      f.write("not needed")
  return repo


@pytest.mark.parametrize("variant", [None, "fp16"])
def test_a_download_fetches_only_what_the_load_reads(folders, tmp_path, monkeypatch, variant):
  """`huggingface_hub.snapshot_download` replaced by a copy from a local "remote" repo that
  keeps what huggingface_hub's own pattern filter selects, as the real download does."""
  import huggingface_hub  # pylint: disable=g-import-not-at-top
  from huggingface_hub.utils import filter_repo_objects  # pylint: disable=g-import-not-at-top
  remote = repo_listing(folders, tmp_path)
  listing = [os.path.relpath(os.path.join(r, n), remote)
             for r, _, names in os.walk(remote) for n in names]
  snapshot, fetched = str(tmp_path / "snapshot"), set()

  def snapshot_download(repo_id, revision=None, allow_patterns=None):
    assert (repo_id, revision) == (SD, None)
    for path in filter_repo_objects(listing, allow_patterns=allow_patterns):
      fetched.add(path)
      os.makedirs(os.path.dirname(os.path.join(snapshot, path)) or snapshot, exist_ok=True)
      shutil.copyfile(os.path.join(remote, path), os.path.join(snapshot, path))
    return snapshot

  monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
  weights.load_sd(weights.ModelRef(SD, variant=variant))
  suffix = ".fp16" if variant else ""
  tokenizer = {path for path in listing if path.startswith("tokenizer/")}
  assert fetched == tokenizer | {
      "model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
      f"text_encoder/model{suffix}.safetensors", "unet/config.json",
      f"unet/diffusion_pytorch_model{suffix}.safetensors", "vae/config.json",
      f"vae/diffusion_pytorch_model{suffix}.safetensors"}


def test_is_repo_id():
  assert hub.is_repo_id("stable-diffusion-v1-5/stable-diffusion-v1-5")
  assert hub.is_repo_id("gpt2")
  for name in ("./sd15", "/abs/sd15", "~/sd15", "a/b/c", "has space/x", ""):
    assert not hub.is_repo_id(name), name


def test_the_trainer_starts_from_hub_ids(folders, cache, offline, tmp_path):
  """`model.pretrained` and `model.value_encoder_init` (a release's subfolder) as repo ids: the
  models load, and `scripts/train.py` trains and exports."""
  from livo_data_fixture import write_livo_data  # pylint: disable=g-import-not-at-top
  from livo_jax.train import setup  # pylint: disable=g-import-not-at-top
  from train_fixtures import load_config, train_command  # pylint: disable=g-import-not-at-top
  overrides = {"model.value_encoder_init": LIVO,
               "model.value_encoder_init_subfolder": "value_encoder", "total_steps": 2,
               "data.cache_dir": str(tmp_path / "prepared")}
  models = setup.load_models(load_config(SD, **overrides))
  assert_same(models.value_encoder,
              weights.load_clip_text(os.path.join(folders["livo"], "value_encoder")))
  assert_same(models.unet, weights.load_unet(os.path.join(folders["sd"], "unet")))

  data = write_livo_data(str(tmp_path / "livo_data"), size=(20, 16))
  workdir = tmp_path / "workdir"
  run = subprocess.run(train_command(str(workdir), SD, data, **overrides),
                       env={**os.environ, **hub_cache.env(cache[0])}, capture_output=True,
                       text=True, timeout=600, check=False)
  assert run.returncode == 0, run.stderr
  assert (workdir / "value_encoder" / "model.safetensors").is_file()


def convert(*args, cache):
  return subprocess.run([sys.executable, os.path.join(REPO, "tools", "convert_weights.py"),
                         *args], env={**os.environ, **hub_cache.env(cache)},
                        capture_output=True, text=True, timeout=300, check=False)


def test_the_converter_reads_hub_ids(folders, cache, offline, tmp_path):
  listing = convert("inspect", SD, "--variant=fp16", cache=cache[0])
  assert listing.returncode == 0, listing.stderr
  assert "== unet: unet (torch)" in listing.stdout
  assert "conv_in.weight" in listing.stdout and "float16" in listing.stdout
  assert "float32" not in listing.stdout

  flax = tmp_path / "v2_flax"
  imported = convert("import", SD, str(flax), "--revision=v2", cache=cache[0])
  assert imported.returncode == 0, imported.stderr
  assert_same(weights.load_unet(str(flax / "unet")),
              weights.load_unet(os.path.join(folders["sd_v2"], "unet")))

  missing = convert("inspect", "org/broken", cache=cache[0])
  assert missing.returncode == 1
  assert missing.stderr.startswith("convert_weights inspect: error: org/broken/unet: ")
  assert len(missing.stderr.splitlines()) == 1
