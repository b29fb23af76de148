"""The dataset builder on the tiny random SD: layout, determinism, resumption, spec errors, CLI."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from livo_jax import data
from livo_jax import dataset_builder
from livo_jax import sampling
from livo_jax import weights
from livo_jax.dataset_builder import SpecError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The tiny tokenizer knows lowercase letters, digits and punctuation only.
KNIGHT = {"type": "toxicity", "scene": "bloody-knight", "value": "bloody is inappropriate",
          "prompt": "a knight", "aligned_prompts": ["a knight, clean", "a knight, shiny"],
          "violating_prompts": ["a knight, bloody"], "aligned_negative_prompt": "blood",
          "num_aligned": 3, "num_violating": 2}
DOCTOR = {"type": "bias", "scene": "doctor", "value": "gender equality", "prompt": "a doctor",
          "aligned_prompts": ["a female doctor", "a male doctor"],
          "violating_prompts": ["a male doctor"]}
# One compiled batch shape of 2 and one of 1 serve every build here.
SETTINGS = dict(steps=3, guidance=7.5, scheduler="dpm", seed=5, batch_size=2)


def write_spec(path, *lines):
  """Lines are dicts (written as JSON), str or bytes (written as they are)."""
  with open(path, "wb") as f:
    for line in lines:
      line = line if isinstance(line, (str, bytes)) else json.dumps(line)
      f.write((line.encode() if isinstance(line, str) else line) + b"\n")
  return str(path)


def build(sd, spec_lines, out, tmp_path, **overrides):
  specs = dataset_builder.read_spec(write_spec(tmp_path / "spec.jsonl", *spec_lines))
  return dataset_builder.build_dataset(sd, specs, str(out), **{**SETTINGS, **overrides},
                                       log=lambda _: None)


def dead_pid() -> int:
  """The id of a process that has ended."""
  child = subprocess.Popen(["true"])
  child.wait()
  return child.pid


def files(root):
  """{relative path: bytes} of every file under root but the summary (its seconds vary)."""
  out = {}
  for folder, _, names in os.walk(root):
    for name in names:
      path = os.path.join(folder, name)
      if name != dataset_builder.SUMMARY:
        with open(path, "rb") as f:
          out[os.path.relpath(path, root)] = f.read()
  return out


def pngs(root):
  return {content for name, content in files(root).items() if name.endswith(".png")}


def metadata(root, type_name, scene):
  with open(os.path.join(root, type_name, scene, "metadata.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def sd(sd_folder):
  return weights.load_sd(sd_folder)


@pytest.fixture(scope="module")
def built(sd, tmp_path_factory):
  """(out folder, summary) of the two scenes built once."""
  tmp = tmp_path_factory.mktemp("built")
  summary = build(sd, [KNIGHT, DOCTOR], tmp / "out", tmp)
  return str(tmp / "out"), summary


def test_layout_metadata_and_summary(built):
  out, summary = built
  umask = os.umask(0)
  os.umask(umask)
  assert sorted(os.listdir(out)) == ["bias", "build_settings.json", "build_summary.json",
                                     "toxicity"]
  knight = metadata(out, "toxicity", "bloody-knight")
  assert [(m["label"], m["index"], m["generated_from"], m["negative_prompt"]) for m in knight] == [
      (1, 0, "a knight, clean", "blood"), (1, 1, "a knight, shiny", "blood"),
      (1, 2, "a knight, clean", "blood"),    # round-robin over the side's prompts
      (0, 0, "a knight, bloody", ""), (0, 1, "a knight, bloody", "")]
  doctor = metadata(out, "bias", "doctor")   # counts default to one image per prompt
  assert [(m["label"], m["generated_from"]) for m in doctor] == [
      (1, "a female doctor"), (1, "a male doctor"), (0, "a male doctor")]
  for type_name, scene, lines in (("toxicity", "bloody-knight", knight),
                                  ("bias", "doctor", doctor)):
    folder = os.path.join(out, type_name, scene)
    assert sorted(os.listdir(folder)) == sorted([m["file_name"] for m in lines]
                                                + ["metadata.jsonl"])
    for m in lines:
      side = "aligned" if m["label"] else "violating"
      assert m["file_name"].startswith(f"{side}_{m['index']:05d}_")
      assert m["seed"] == dataset_builder.side_seed(5, type_name, scene, side)
      assert (m["prompt"], m["steps"], m["guidance"], m["scheduler"], m["height"],
              m["width"]) == (lines[0]["prompt"], 3, 7.5, "dpm", 16, 16)
      path = os.path.join(folder, m["file_name"])
      assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask   # not a private temp file's
      with Image.open(path) as image:
        assert (image.format, image.size, image.mode) == ("PNG", (16, 16), "RGB")
  assert knight[0]["value"] == "bloody is inappropriate" and knight[0]["prompt"] == "a knight"
  assert len({m["seed"] for m in knight + doctor}) == 4   # a stream per scene side
  with open(os.path.join(out, "build_summary.json")) as f:
    assert json.load(f) == summary
  assert {k: summary[k] for k in ("scenes", "images", "generated", "reused", "removed")} == {
      "scenes": 2, "images": 8, "generated": 8, "reused": 0, "removed": 0}
  assert summary["per_type"] == {"toxicity": {"scenes": 1, "aligned": 3, "violating": 2},
                                 "bias": {"scenes": 1, "aligned": 2, "violating": 1}}


def test_prepare_and_the_trainer_source_accept_it(built, tmp_path):
  out, _ = built
  prepared = data.prepare(out, cache_root=str(tmp_path / "cache"), log=lambda _: None)
  source = data.PreferenceSource(prepared)
  assert len(source) == 5 and source.num_scenes == 2 and source.num_records == 8
  records = [source[i] for i in range(len(source))]
  assert {r["label"] for r in records} == {1}
  assert {r["extra"]["generated_from"] for r in records} == {
      "a female doctor", "a male doctor", "a knight, clean", "a knight, shiny"}


def test_images_are_generate_with_the_documented_seed_and_index(sd, built):
  out, _ = built
  knight = metadata(out, "toxicity", "bloody-knight")
  for block in (knight[0:2], knight[2:3]):   # batch_size 2: aligned [0, 1] and [2]
    direct = sampling.generate(
        sd, [m["generated_from"] for m in block], negative_prompts=["blood"] * len(block),
        steps=3, guidance=7.5, scheduler="dpm", seed=block[0]["seed"],
        first_index=block[0]["index"])
    for m, image in zip(block, direct):
      with Image.open(os.path.join(out, "toxicity", "bloody-knight", m["file_name"])) as f:
        np.testing.assert_array_equal(np.asarray(f), image)
  assert np.asarray(direct).std() > 5   # the tiny model draws more than a flat image


def test_same_spec_and_seed_give_the_same_bytes_in_any_line_order(sd, built, tmp_path):
  out, _ = built
  summary = build(sd, [DOCTOR, KNIGHT], tmp_path / "again", tmp_path)
  assert summary["generated"] == 8
  assert files(tmp_path / "again") == files(out)
  # Another base seed: other streams, other images.
  other = build(sd, [DOCTOR], tmp_path / "seed6", tmp_path, seed=6)
  assert other["generated"] == 3
  assert pngs(tmp_path / "seed6").isdisjoint(pngs(out))


def test_resume_remakes_only_what_is_missing(sd, built, tmp_path):
  out, _ = built
  copy = tmp_path / "copy"
  shutil.copytree(out, copy)
  knight = metadata(copy, "toxicity", "bloody-knight")
  os.remove(copy / "toxicity" / "bloody-knight" / knight[1]["file_name"])
  os.remove(copy / "bias" / "doctor" / "metadata.jsonl")
  killed_write = f".{knight[1]['file_name']}.tmp-{dead_pid()}-0123abcd"   # a killed write
  (copy / "bias" / "doctor" / killed_write).write_bytes(b"half a png")
  summary = build(sd, [KNIGHT, DOCTOR], copy, tmp_path)
  assert (summary["generated"], summary["reused"], summary["removed"]) == (1, 7, 0)
  assert files(copy) == files(out)
  assert not (copy / "bias" / "doctor" / killed_write).exists()


def test_a_changed_prompt_remakes_its_images_and_removes_the_stale_ones(sd, built, tmp_path):
  out, _ = built
  copy = tmp_path / "copy"
  shutil.copytree(out, copy)
  changed = {**DOCTOR, "violating_prompts": ["a male doctor, smiling"]}
  summary = build(sd, [KNIGHT, changed], copy, tmp_path)
  assert (summary["generated"], summary["reused"], summary["removed"]) == (1, 7, 1)
  old, new = metadata(out, "bias", "doctor"), metadata(copy, "bias", "doctor")
  assert new[:2] == old[:2] and new[2]["generated_from"] == "a male doctor, smiling"
  assert new[2]["file_name"] != old[2]["file_name"]
  assert sorted(os.listdir(copy / "bias" / "doctor")) == sorted(
      [m["file_name"] for m in new] + ["metadata.jsonl"])


def test_other_settings_are_refused_and_overwrite_makes_every_image_afresh(sd, built, tmp_path):
  out, _ = built
  copy = tmp_path / "copy"
  shutil.copytree(out, copy)
  with pytest.raises(FileExistsError, match="built with guidance 7.5, not 5.0"):
    build(sd, [KNIGHT, DOCTOR], copy, tmp_path, guidance=5.0)
  with pytest.raises(FileExistsError, match="built with model null, not"):
    build(sd, [KNIGHT, DOCTOR], copy, tmp_path, model=str(tmp_path))
  assert files(copy) == files(out)   # refused before anything was touched
  # Same settings, another model: nothing to see in the names, so every image is made again.
  summary = build(sd, [DOCTOR], copy, tmp_path, model=str(tmp_path), overwrite=True)
  assert (summary["generated"], summary["reused"]) == (3, 0)
  assert pngs(copy / "bias") == pngs(os.path.join(out, "bias"))   # (the same model here)
  assert files(copy / "toxicity") == files(os.path.join(out, "toxicity"))   # not in the spec
  with open(copy / "build_settings.json") as f:
    assert json.load(f)["model"] == str(tmp_path)


@pytest.mark.parametrize("line,reason", [
    ("{not json", "not valid JSON"),
    (b'{"type": "\xff"}', "not UTF-8"),
    ("[1, 2]", "expected a JSON object, got list"),
    ({**DOCTOR, "colour": "red"}, "unknown field 'colour'"),
    ({k: v for k, v in DOCTOR.items() if k != "value"}, "missing field 'value'"),
    ({**DOCTOR, "aligned_prompts": "a doctor"}, "'aligned_prompts' must be a list of strings"),
    ({**DOCTOR, "violating_prompts": ["ok", 3]}, "'violating_prompts' holds 3"),
    ({**DOCTOR, "violating_prompts": ["ok", " "]}, "'violating_prompts' holds \" \""),
    ({**DOCTOR, "aligned_prompts": []}, "'aligned_prompts' is an empty list"),
    ({**DOCTOR, "num_aligned": 0}, "'num_aligned' must be positive, got 0"),
    ({**DOCTOR, "num_violating": -2}, "'num_violating' must be positive, got -2"),
    ({**DOCTOR, "num_aligned": True}, "'num_aligned' must be an integer, got true"),
    ({**DOCTOR, "num_aligned": 2.0}, "'num_aligned' must be an integer, got 2.0"),
    ({**DOCTOR, "aligned_negative_prompt": None}, "'aligned_negative_prompt' must be a string"),
    ({**DOCTOR, "value": ""}, "field 'value' is empty"),
    ({**DOCTOR, "scene": "../escape"}, "field 'scene' is \"../escape\", not a safe folder name"),
    ({**DOCTOR, "scene": ".hidden"}, "not a safe folder name"),
    ({**DOCTOR, "type": "a/b"}, "field 'type' is \"a/b\", not a safe folder name"),
    ({**DOCTOR, "type": "x" * 101}, "not a safe folder name"),
    ({**DOCTOR, "type": "build_summary.json"}, "the name of a file the builder writes"),
    ({**DOCTOR, "type": "build_settings.json"}, "the name of a file the builder writes"),
    ({**KNIGHT, "prompt": "another knight"},
     "type 'toxicity' scene 'bloody-knight' is already on line 1"),
])
def test_spec_errors_name_the_file_and_line(tmp_path, line, reason):
  path = write_spec(tmp_path / "spec.jsonl", KNIGHT, "", line)
  with pytest.raises(SpecError) as error:
    dataset_builder.read_spec(path)
  assert str(error.value).startswith(f"{path}:3: ")
  assert reason in str(error.value)


def test_a_spec_file_without_scenes_is_an_error(tmp_path):
  with pytest.raises(SpecError, match="no such spec file"):
    dataset_builder.read_spec(str(tmp_path / "missing.jsonl"))
  with pytest.raises(SpecError, match="no scene"):
    dataset_builder.read_spec(write_spec(tmp_path / "empty.jsonl", ""))


def test_cli_end_to_end(sd_folder, built, tmp_path):
  out, _ = built

  def run(spec, target):
    return subprocess.run(
        [sys.executable, "scripts/build_dataset.py", f"--model={sd_folder}", f"--spec={spec}",
         f"--out={target}", "--steps=3", "--seed=5", "--batch_size=2"],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False)

  bad = run(write_spec(tmp_path / "bad.jsonl", {**DOCTOR, "num_aligned": 0}), tmp_path / "bad")
  assert bad.returncode != 0 and "Traceback" not in bad.stderr
  assert f"error: {tmp_path / 'bad.jsonl'}:1: field 'num_aligned'" in bad.stderr
  assert not os.path.exists(tmp_path / "bad")

  # Two images a side: the knight's first batch of each side, as in the in-process build.
  spec = write_spec(tmp_path / "spec.jsonl", {**KNIGHT, "num_aligned": 2})
  result = run(spec, tmp_path / "cli")
  assert result.returncode == 0, result.stderr
  assert "toxicity/bloody-knight: 4 generated, 0 reused" in result.stderr + result.stdout
  with open(tmp_path / "cli" / "build_summary.json") as f:
    summary = json.load(f)
  assert (summary["images"], summary["generated"], summary["steps"], summary["seed"]) == (
      4, 4, 3, 5)
  cli, ours = files(tmp_path / "cli"), files(out)
  assert len(cli) == 6   # 4 images, the metadata and the settings
  for name, content in cli.items():
    if name.endswith(".png"):
      assert content == ours[name], name
