"""prepare and PreferenceSource against the raw folder read by hand; bad input; the latent cache."""

import json
import os
import re
import shutil

import numpy as np
import pytest
from PIL import Image

import livo_data_fixture as fixture
from livo_data_fixture import quiet
from livo_jax import data
from livo_jax.data import livo_data
from livo_jax.data import tfds_dataset
from livo_jax.errors import DataError


@pytest.fixture(scope="module")
def prepared(raw, tmp_path_factory):
  return data.prepare(raw, cache_root=str(tmp_path_factory.mktemp("cache")), log=quiet)


@pytest.fixture()
def copy(raw, tmp_path):
  """A fresh copy of the raw folder to damage."""
  return shutil.copytree(raw, str(tmp_path / "livo_data"))


def test_source_holds_every_line_in_folder_order(raw, prepared):
  source = data.PreferenceSource(prepared)
  lines = fixture.read_metadata(raw)
  aligned = [l for l in lines if l["label"] == 1]
  assert len(source) == len(aligned) == 3 + 2 + 2
  assert source.num_records == len(lines) == 13
  assert source.num_scenes == 3 and source.skipped == 0 and source.skip_reasons == []
  for i, line in enumerate(aligned):
    record = source.aligned(i)
    assert record == source[i]
    assert {k: record[k] for k in ("prompt", "value", "label", "scene", "path", "extra")} == dict(
        prompt=line["prompt"], value=line["value"], label=1, scene=line["scene"],
        path=line["path"], extra={"n": line["n"]})
    with open(os.path.join(raw, line["path"]), "rb") as f:
      assert record["image"] == f.read()
  for scene in range(3):
    violating = sorted(source.record(int(r))["path"] for r in source.violating(scene))
    assert violating == sorted(l["path"] for l in lines if l["scene"] == scene and not l["label"])
  assert [len(source.violating(s)) for s in range(3)] == [2, 3, 1]


def test_prepare_reuses_an_unchanged_folder_without_validating(raw, prepared, monkeypatch):
  index = os.path.join(prepared, tfds_dataset.INDEX)
  before = os.stat(index)
  monkeypatch.setattr(livo_data, "scan", lambda *a, **k: pytest.fail("re-validated"))
  messages = []
  again = data.prepare(raw, cache_root=os.path.dirname(prepared), log=messages.append)
  assert again == prepared
  assert "reusing" in messages[0]
  after = os.stat(index)
  assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
  # A prepared folder is taken as is.
  assert data.prepare(prepared, log=quiet) == prepared


def test_prepare_again_when_metadata_or_an_image_changes(copy, tmp_path):
  cache = str(tmp_path / "cache")
  first = data.prepare(copy, cache_root=cache, log=quiet)
  assert os.path.basename(first).startswith("livo_data-")
  meta = os.path.join(copy, "1-goodness", "kind", "metadata.jsonl")
  with open(meta) as f:
    text = f.read()
  with open(meta, "w") as f:
    f.write(text.replace("a kind person", "a generous person"))
  second = data.prepare(copy, cache_root=cache, log=quiet)
  assert second != first
  assert data.PreferenceSource(second).aligned(6)["prompt"] == "a generous person"
  # An image rewritten with the same metadata: its mtime changes the fingerprint.
  image = os.path.join(copy, fixture.read_metadata(copy)[0]["path"])
  os.utime(image, ns=(1, 1))
  third = data.prepare(copy, cache_root=cache, log=quiet)
  # skip_bad is part of the fingerprint too.
  fourth = data.prepare(copy, cache_root=cache, skip_bad=True, log=quiet)
  folders = (first, second, third, fourth)
  assert len(set(folders)) == 4
  assert sorted(os.listdir(cache)) == sorted(os.path.basename(p) for p in folders)


def test_prepare_default_cache_root_is_the_environment_variable(copy, tmp_path, monkeypatch):
  monkeypatch.setenv("LIVO_JAX_CACHE", str(tmp_path / "env_cache"))
  out = data.prepare(copy, log=quiet)
  assert os.path.dirname(out) == str(tmp_path / "env_cache")


def test_an_interrupted_prepare_leaves_nothing(copy, tmp_path, monkeypatch):
  cache = str(tmp_path / "cache")
  write = tfds_dataset._write

  def write_then_interrupt(scan, folder):
    write(scan, folder)   # everything but the rename
    raise KeyboardInterrupt

  monkeypatch.setattr(tfds_dataset, "_write", write_then_interrupt)
  with pytest.raises(KeyboardInterrupt):
    data.prepare(copy, cache_root=cache, log=quiet)
  assert os.listdir(cache) == []
  monkeypatch.setattr(tfds_dataset, "_write", write)
  assert len(data.PreferenceSource(data.prepare(copy, cache_root=cache, log=quiet))) == 7


def _rewrite_line(root, scene_dir, number, change):
  """Replaces line `number` (1-based) of a scene's metadata by change(line) (a dict or text)."""
  meta = os.path.join(root, scene_dir, "metadata.jsonl")
  with open(meta) as f:
    lines = f.read().splitlines()
  new = change(json.loads(lines[number - 1]))
  lines[number - 1] = new if isinstance(new, str) else json.dumps(new)
  with open(meta, "w") as f:
    f.write("\n".join(lines) + "\n")
  return meta


def _line_of(root, scene_dir, label):
  """(1-based number, fields) of the first line of the scene with the label."""
  with open(os.path.join(root, scene_dir, "metadata.jsonl")) as f:
    for number, line in enumerate(f, start=1):
      if json.loads(line)["label"] == label:
        return number, json.loads(line)
  raise AssertionError(f"no label {label} in {scene_dir}")


def _damage_image(root, scene_dir, number, how):
  with open(os.path.join(root, scene_dir, "metadata.jsonl")) as f:
    line = json.loads(f.read().splitlines()[number - 1])
  path = os.path.join(root, scene_dir, line["file_name"])
  if how == "missing":
    os.remove(path)
  elif how == "garbage":
    with open(path, "wb") as f:
      f.write(b"this is not an image")
  else:  # truncated: a JPEG whose header parses and pixel data ends early
    Image.open(path).convert("RGB").save(path, "JPEG")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
      f.truncate(size * 4 // 5)
    with Image.open(path) as image:
      image.verify()   # passes: only decoding the pixels finds it


# (name, line change, expected message): each damages line 2 of 0-career/doctor/metadata.jsonl.
LINE_CASES = [
    ("bad_json", lambda l: '{"file_name": "x.png", "prompt": ', r"not valid JSON"),
    ("not_object", lambda l: "[1, 2]", r"expected a JSON object, got list"),
    ("missing_prompt", lambda l: {k: v for k, v in l.items() if k != "prompt"},
     r"missing field 'prompt'"),
    ("missing_label", lambda l: {k: v for k, v in l.items() if k != "label"},
     r"missing field 'label'"),
    ("prompt_not_str", lambda l: dict(l, prompt=3), r"field 'prompt' must be a string, got 3"),
    ("value_null", lambda l: dict(l, value=None), r"field 'value' must be a string, got null"),
    ("label_bool", lambda l: dict(l, label=True), r"field 'label' must be 0 .* got true"),
    ("label_2", lambda l: dict(l, label=2), r"field 'label' must be 0 .* got 2"),
    ("label_str", lambda l: dict(l, label="1"), r"field 'label' must be 0 .* got \"1\""),
]


@pytest.mark.parametrize("name,change,message", LINE_CASES, ids=[c[0] for c in LINE_CASES])
def test_a_bad_line_names_its_file_and_line(copy, tmp_path, name, change, message):
  del name
  meta = _rewrite_line(copy, "0-career/doctor", 2, change)
  with pytest.raises(DataError, match=re.escape(f"{meta}:2: ") + message):
    data.prepare(copy, cache_root=str(tmp_path / "cache"), log=quiet)
  assert not os.path.exists(tmp_path / "cache") or os.listdir(tmp_path / "cache") == []


@pytest.mark.parametrize("how,message", [("missing", "is missing"),
                                         ("garbage", "is unreadable or corrupt"),
                                         ("truncated", "is unreadable or corrupt .*truncated")])
def test_a_bad_image_names_its_metadata_line(copy, tmp_path, how, message):
  number, line = _line_of(copy, "0-career/nurse", 0)
  _damage_image(copy, "0-career/nurse", number, how)
  meta = os.path.join(copy, "0-career/nurse/metadata.jsonl")
  image = os.path.join(copy, "0-career/nurse", line["file_name"])
  with pytest.raises(DataError, match=re.escape(f"{meta}:{number}: image {image} ") + message):
    data.prepare(copy, cache_root=str(tmp_path / "cache"), log=quiet)


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_a_file_name_outside_the_data_folder_is_refused(copy, tmp_path, how):
  """Each leads to a good image outside, which the reader used to take."""
  outside = str(tmp_path / "outside.png")   # copy is tmp_path/livo_data
  Image.new("RGB", (24, 20), (40, 60, 200)).save(outside)
  if how == "symlink":
    os.symlink(outside, os.path.join(copy, "0-career/doctor/linked.png"))
  file_name = {"dotdot": "../../../outside.png", "absolute": outside,
               "symlink": "linked.png"}[how]
  meta = _rewrite_line(copy, "0-career/doctor", 2, lambda l: dict(l, file_name=file_name))
  reason = re.escape(f"{meta}:2: field 'file_name' ") + (
      "must be relative to its scene folder" if how == "absolute"
      else re.escape(f"{json.dumps(file_name)} leads outside the data folder"))
  with pytest.raises(DataError, match=reason):
    data.prepare(copy, cache_root=str(tmp_path / "cache"), log=quiet)
  # skip_bad: the line is counted, left out and its reason kept.
  source = data.PreferenceSource(data.prepare(copy, cache_root=str(tmp_path / "cache"),
                                              skip_bad=True, log=quiet))
  assert source.skipped == 1 and len(source.skip_reasons) == 1
  assert re.match(reason, source.skip_reasons[0]), source.skip_reasons
  assert source.num_records == 12


def test_a_scene_without_violating_images_names_its_metadata(copy, tmp_path):
  number, _ = _line_of(copy, "1-goodness/kind", 0)
  meta = _rewrite_line(copy, "1-goodness/kind", number, lambda l: dict(l, label=1))
  with pytest.raises(DataError, match=re.escape(f"{meta}: scene has 3 aligned images but no "
                                                "violating")):
    data.prepare(copy, cache_root=str(tmp_path / "cache"), log=quiet)


def test_empty_folders_are_errors(tmp_path):
  empty = tmp_path / "empty"
  (empty / "0-career" / "doctor").mkdir(parents=True)
  with pytest.raises(DataError, match=re.escape(f"{empty}: no metadata.jsonl found")):
    data.prepare(str(empty), cache_root=str(tmp_path / "cache"), log=quiet)
  only_violating = fixture.write_livo_data(
      str(tmp_path / "only_violating"), scenes=[("t", "s", "v", "p", 0, 2)])
  with pytest.raises(DataError, match=re.escape(f"{only_violating}: no aligned (label 1) images")):
    data.prepare(only_violating, cache_root=str(tmp_path / "cache"), log=quiet)
  with pytest.raises(DataError, match="no such folder"):
    data.prepare(str(tmp_path / "nowhere"), cache_root=str(tmp_path / "cache"), log=quiet)


def test_skip_bad_counts_and_reports_what_it_leaves_out(copy, tmp_path):
  _rewrite_line(copy, "0-career/doctor", 1, lambda l: "not json")       # 1 line
  number, _ = _line_of(copy, "0-career/nurse", 1)
  _damage_image(copy, "0-career/nurse", number, "garbage")              # 1 aligned image
  number, _ = _line_of(copy, "1-goodness/kind", 0)                      # the only violating:
  _rewrite_line(copy, "1-goodness/kind", number, lambda l: dict(l, label=5))  # + 2 aligned
  messages = []
  out = data.prepare(copy, cache_root=str(tmp_path / "cache"), skip_bad=True,
                     log=messages.append)
  source = data.PreferenceSource(out)
  assert source.skipped == 1 + 1 + 1 + 2
  assert len(source.skip_reasons) == 4   # one per problem; the scene's counts its 2 lines
  assert any("not valid JSON" in r for r in source.skip_reasons)
  assert any("unreadable or corrupt" in r for r in source.skip_reasons)
  assert any("no violating image" in r for r in source.skip_reasons)
  assert any("skipped 5 bad samples" in m for m in messages)
  assert source.num_scenes == 2
  doctor_lines = [l for l in open(os.path.join(copy, "0-career/doctor/metadata.jsonl"))][1:]
  doctor_aligned = sum(json.loads(l)["label"] for l in doctor_lines)
  assert len(source) == doctor_aligned + 1   # nurse keeps 1 of its 2 aligned images


def test_skip_bad_with_nothing_left_is_still_an_error(tmp_path):
  root = fixture.write_livo_data(str(tmp_path / "raw"), scenes=[("t", "s", "v", "p", 2, 1)])
  number, _ = _line_of(root, "t/s", 0)
  _rewrite_line(root, "t/s", number, lambda l: "{")
  with pytest.raises(DataError, match="no aligned .* left after skipping 3 bad samples"):
    data.prepare(root, cache_root=str(tmp_path / "cache"), skip_bad=True, log=quiet)


def test_moments_cache_is_the_encoder_of_the_centre_crops(raw, prepared):
  source = data.PreferenceSource(prepared)
  shapes = []

  def encode(pixels):
    shapes.append(pixels.shape)
    return fixture.pool_encode(pixels)

  moments = data.cache_moments(source, encode, resolution=16, random_flip=True, key="tiny/vae",
                               batch_size=5, log=quiet)
  assert set(shapes) == {(5, 16, 16, 3)}   # the last batch of 3 is padded
  assert moments.plain.shape == moments.flipped.shape == (13, 4, 4, 6)
  paths = [source.record(i)["path"] for i in range(source.num_records)]
  plain, flipped = (fixture.pool_encode(np.stack([fixture.centre_crop(raw, p, 16, flip)
                                                   for p in paths])) for flip in (False, True))
  np.testing.assert_allclose(moments.plain, plain, atol=1e-6)
  np.testing.assert_allclose(moments.flipped, flipped, atol=1e-6)
  np.testing.assert_array_equal(moments.get(3, flip=True), moments.flipped[3])
  np.testing.assert_array_equal(moments.get(3, flip=False), moments.plain[3])

  # Reused: no encoding the second time, and no temporary file left behind.
  again = data.cache_moments(source, lambda x: pytest.fail("re-encoded"), resolution=16,
                             random_flip=True, key="tiny/vae", log=quiet)
  np.testing.assert_array_equal(again.flipped, moments.flipped)
  folder = os.path.dirname(again.plain.filename)
  assert sorted(os.listdir(folder)) == ["flipped.npy", "plain.npy"]
  assert folder.startswith(os.path.join(prepared, "latents", "tiny_vae-"))
  assert folder.endswith("-16px")


def fake_text_encode(prompts):
  """A stand-in text encoder: [n, 77, 4] filled from each prompt's characters."""
  codes = [[ord(c) for c in p] for p in prompts]
  return np.stack([np.resize(np.array(c, np.float32), (77, 4)) for c in codes])


def test_text_cache_holds_each_distinct_prompt_once(raw, prepared):
  source = data.PreferenceSource(prepared)
  calls = []

  def encode(prompts):
    calls.append(list(prompts))
    return fake_text_encode(prompts)

  text = data.cache_text_embeddings(source, encode, key="tiny/text", batch_size=2, log=quiet)
  prompts = sorted({line["prompt"] for line in fixture.read_metadata(raw)})
  assert sorted(text.rows) == prompts and len(prompts) > 1
  assert {len(c) for c in calls} == {2}                     # the last call is padded
  for prompt in prompts:
    np.testing.assert_array_equal(text.get(prompt), fake_text_encode([prompt])[0])
  with pytest.raises(DataError, match="'a prompt of another dataset' is not in the text cache"):
    text.get("a prompt of another dataset")

  again = data.cache_text_embeddings(source, lambda p: pytest.fail("re-encoded"),
                                     key="tiny/text", log=quiet)
  np.testing.assert_array_equal(again.table, text.table)
  folder = os.path.dirname(again.table.filename)
  assert sorted(os.listdir(folder)) == ["embeddings.npy", "prompts.json"]

  # A cache whose prompts are not this dataset's is refused, naming the folder.
  with open(os.path.join(folder, "prompts.json"), "w") as f:
    json.dump(prompts[:1], f)
  with pytest.raises(DataError, match=re.escape(folder) + ".*delete it to recompute"):
    data.cache_text_embeddings(source, encode, key="tiny/text", log=quiet)
