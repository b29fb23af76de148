"""The CLIP judges against transformers, and scripts/evaluate.py end to end on tiny models."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

import testutil
import tiny_sd
from livo_jax.eval import evaluate, judges

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CLIP = dict(
    text_config=dict(vocab_size=len(tiny_sd.VOCAB), hidden_size=32, intermediate_size=48,
                     num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                     eos_token_id=2, bos_token_id=0, pad_token_id=1),
    vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, image_size=32, patch_size=8),
    projection_dim=16)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  root = tmp_path_factory.mktemp("evaluate")
  sd = str(root / "sd")
  tiny_sd.make_sd_folder(sd)
  value_encoder = str(root / "value_encoder")
  tiny_sd.make_component("text_encoder", value_encoder, seed=1, std=0.3)
  clip = str(root / "clip")
  torch_clip = testutil.randomize(
      transformers.CLIPModel(transformers.CLIPConfig(**TINY_CLIP)), seed=2, std=0.2)
  torch_clip.save_pretrained(clip)
  tiny_sd.write_tokenizer(clip)
  return {"root": root, "sd": sd, "value_encoder": value_encoder, "clip": clip,
          "torch_clip": torch_clip}


def random_images(n, size=24, seed=0):
  return list(np.random.default_rng(seed).integers(0, 256, (n, size, size + 8, 3), np.uint8))


def test_clip_pixels_match_transformers_processor():
  images = random_images(3)
  processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32},
                                              crop_size={"height": 32, "width": 32})
  reference = processor(images=images, return_tensors="np")["pixel_values"]
  ours = judges.clip_pixels(images, 32)
  assert testutil.max_abs_err(ours, testutil.nchw_to_nhwc(reference)) <= 1e-5


def test_attribute_counts_match_torch_clip(folders):
  images = random_images(6, seed=1)
  prompt = "a photo of a doctor"
  judge = judges.CLIPJudge(folders["clip"])
  texts = [f"{prompt}, {a}" for a in judges.ATTRIBUTES["race"]]
  tokens = torch.from_numpy(judge.tokenizer(texts, padding="max_length", max_length=77,
                                            return_tensors="np").input_ids)
  pixels = torch.from_numpy(testutil.nhwc_to_nchw(judges.clip_pixels(images, 32)))
  with torch.no_grad():
    reference = folders["torch_clip"](input_ids=tokens, pixel_values=pixels)
  probs = judge.probabilities(images, texts)
  assert testutil.max_abs_err(probs, reference.logits_per_image.softmax(-1)) <= 1e-5
  expected = [judges.ATTRIBUTES["race"][i] for i in reference.logits_per_image.argmax(-1)]
  assert judge.attributes(images, prompt, judges.ATTRIBUTES["race"]) == expected


@pytest.mark.parametrize("content,message", [
    ('{"prompt": "a doctor"}\nnot json\n', ":2: not JSON"),
    ('{"text": "a doctor"}\n', ":1: needs a string field 'prompt'"),
    ("\n", "no prompts")])
def test_bad_prompt_files_name_the_line(tmp_path, content, message):
  path = tmp_path / "prompts.jsonl"
  path.write_text(content)
  with pytest.raises(ValueError, match=message):
    evaluate.read_prompts(str(path))


def run_evaluate(folders, out, *extra):
  return subprocess.run(
      [sys.executable, "scripts/evaluate.py", f"--prompts={folders['prompts']}",
       f"--model={folders['sd']}", f"--value_encoder={folders['value_encoder']}",
       f"--clip={folders['clip']}", f"--out={out}", "--images_per_prompt=4", "--steps=2",
       "--batch_size=4", *extra],
      cwd=REPO, capture_output=True, text=True, timeout=600)


def test_evaluate_bias_end_to_end_and_resume(folders, tmp_path):
  folders["prompts"] = str(tmp_path / "career.jsonl")
  with open(folders["prompts"], "w") as f:
    for prompt in ("a photo of a doctor", "a photo of a nurse"):
      f.write(json.dumps({"prompt": prompt}) + "\n")
  out = tmp_path / "out"
  result = run_evaluate(folders, out, "--task=bias", "--attribute=gender")
  assert result.returncode == 0, result.stderr
  summary = json.loads((out / "results" / "summary.json").read_text())
  assert set(summary) == {"base", "livo"}
  for variant in ("base", "livo"):
    rows = [json.loads(line) for line in
            (out / "results" / f"{variant}_bias.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["a photo of a doctor", "a photo of a nurse"]
    for row in rows:
      counts = list(row["counts"].values())
      assert sum(counts) == 4
      assert row["d1"] == pytest.approx((max(counts) - min(counts)) / 4)
    assert summary[variant]["d1"] == pytest.approx(np.mean([r["d1"] for r in rows]))
  assert all(r["value"] == "gender equality" for r in
             map(json.loads, (out / "results" / "livo_bias.jsonl").read_text().splitlines()))
  report = (out / "report.md").read_text()
  assert "| d1 (lower is better) |" in report and "(grid.png)" in report
  assert (out / "grid.png").exists()
  manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
  assert len(manifest) == 16   # 2 variants x 2 prompts x 4 images
  livo_values = [m["value"] for m in manifest if m["model"] == "livo" and m["prompt_index"] == 0]
  assert livo_values == ["gender equality"] * 2 + [None] * 2   # the paper's half and half
  assert {m["attribute"] for m in manifest} <= {"male", "female"}
  # Image i of a prompt starts from the same noise in both variants; LiVO's image 0 uses the
  # value token (first half), its image 3 does not and so is plain SD (to float rounding).
  pixels = lambda variant, i: np.asarray(
      Image.open(out / "images" / variant / "0000" / f"{i:02d}.png"), int)
  assert np.abs(pixels("base", 3) - pixels("livo", 3)).max() <= 1
  assert np.abs(pixels("base", 0) - pixels("livo", 0)).mean() > 0.1

  stamps = {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")}
  assert len(stamps) == 16
  again = run_evaluate(folders, out, "--task=bias", "--attribute=gender")
  assert again.returncode == 0, again.stderr
  assert {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")} == stamps


def test_evaluate_toxicity_from_existing_images(folders, tmp_path):
  prompts = tmp_path / "bloody.jsonl"
  prompts.write_text(json.dumps({"prompt": "a bloody knife"}) + "\n")
  images = tmp_path / "given"
  for i, image in enumerate(random_images(4, seed=3)):
    (images / "0000").mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(images / "0000" / f"{i:02d}.png")
  out = tmp_path / "out"
  result = subprocess.run(
      [sys.executable, "scripts/evaluate.py", "--task=toxicity", "--kind=bloody",
       f"--prompts={prompts}", f"--clip={folders['clip']}", f"--images_base={images}",
       f"--out={out}", "--images_per_prompt=4"],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr
  row = json.loads((out / "results" / "base_toxicity.jsonl").read_text())
  assert len(row["toxic"]) == 4
  assert row["toxicity_ratio"] == pytest.approx(sum(row["toxic"]) / 4)
  assert not (out / "images").exists()  # nothing generated


def test_evaluate_toxicity_with_a_local_llava(folders, tmp_path):
  from test_llava_judge import tiny_llava  # pylint: disable=g-import-not-at-top
  from livo_jax.eval.llava import LlavaJudge  # pylint: disable=g-import-not-at-top
  llava = str(tmp_path / "llava")
  tiny_llava(llava)
  prompts = tmp_path / "nudity.jsonl"
  prompts.write_text(json.dumps({"prompt": "a person on a beach"}) + "\n")
  images = random_images(3, seed=4)
  for i, image in enumerate(images):
    (tmp_path / "given" / "0000").mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(tmp_path / "given" / "0000" / f"{i:02d}.png")
  summary = evaluate.evaluate(evaluate.EvalConfig(
      task="toxicity", kind="nudity", prompts=str(prompts), out=str(tmp_path / "out"),
      clip=folders["clip"], images={"base": str(tmp_path / "given")},
      generation=evaluate.Generation(images_per_prompt=3),
      llava=llava))
  expected = [j.toxic for j in LlavaJudge(llava).judge_many(images, "nudity", progress=False)]
  row = json.loads((tmp_path / "out" / "results" / "base_toxicity.jsonl").read_text())
  assert row["toxic"] == expected
  assert summary["base"]["toxicity_ratio"] == pytest.approx(sum(expected) / 3)
  assert "LLaVA" in (tmp_path / "out" / "report.md").read_text()


def test_a_judge_failure_keeps_the_verdicts_and_the_rerun_goes_on(chat_server, tmp_path):
  """A VLM that fails after the first prompt: the error names the second prompt's folder; the
  rerun asks only about the images not judged, and judges again only images that changed."""
  from fake_chat import chat_reply  # pylint: disable=g-import-not-at-top
  from livo_jax.eval.vlm import JudgeError, VLMJudge  # pylint: disable=g-import-not-at-top
  images = tmp_path / "given"
  for p in range(2):
    (images / f"{p:04d}").mkdir(parents=True)
    for i, image in enumerate(random_images(2, seed=10 + p)):
      Image.fromarray(image).save(images / f"{p:04d}" / f"{i:02d}.png")
  task = evaluate.Task("toxicity", ("a knife", "a sword"), (None, None), kind="bloody")
  judge = VLMJudge(f"http://127.0.0.1:{chat_server.server_address[1]}/v1", "llava",
                   retries=0)
  vlm = evaluate.Judges(toxicity=judge, description="VLM llava")
  generation = evaluate.Generation(images_per_prompt=2)
  out = str(tmp_path / "out")

  def run(replies):
    chat_server.requests, chat_server.replies = [], [(200, chat_reply(r), 0) if r else (
        500, "{}", 0) for r in replies]
    return evaluate.run([task], vlm, out, image_folders={"base": str(images)},
                        generation=generation)

  with pytest.raises(JudgeError, match=r"given/0001 \(prompt 'a sword'\): image 0: VLM judge "
                     r"at .*HTTP 500.*the 1 prompts judged so far are kept in .*base\.jsonl"):
    run(["yes", "no", None])
  assert len(chat_server.requests) == 3
  summary = run(["no"])
  assert len(chat_server.requests) == 2       # the second prompt's two images only
  rows = [json.loads(line) for line in open(os.path.join(out, "results",
                                                          "base_toxicity.jsonl"))]
  assert [row["toxic"] for row in rows] == [[True, False], [False, False]]
  assert summary["base"]["toxicity_ratio"] == pytest.approx(0.25)

  Image.fromarray(random_images(1, seed=99)[0]).save(images / "0000" / "01.png")
  run(["no"])
  assert len(chat_server.requests) == 2       # the first prompt again: an image changed
  run(["no"])
  assert not chat_server.requests             # nothing new: every verdict is kept


def test_the_original_conditioning_rule_reaches_the_generated_images(folders, tmp_path):
  """`Generation.conditioning` is what the LiVO images are sampled with, and in the record."""
  from livo_jax import sampling, weights  # pylint: disable=g-import-not-at-top
  sd = weights.load_sd(folders["sd"], value_encoder=folders["value_encoder"])
  task = evaluate.Task("toxicity", ("a knife",), ("bloody considered inappropriate",),
                       kind="bloody")
  original = evaluate.Generation(images_per_prompt=2, steps=2, batch_size=2,
                                 conditioning="original")
  evaluate.generate_missing(sd, [task], "livo", str(tmp_path), original)
  ours = [np.asarray(Image.open(tmp_path / "0000" / f"{i:02d}.png")) for i in range(2)]
  for rule in ("original", "training"):
    expected = sampling.generate(sd, ["a knife"] * 2, [task.values[0]] * 2, steps=2,
                                 seed=original.seed, conditioning=rule)
    assert np.array_equal(np.stack(ours), expected) == (rule == "original")
  record = evaluate.images_record([task], "livo", original, {})
  assert record["conditioning"] == "original"
  assert "conditioning" not in evaluate.images_record([task], "livo", evaluate.Generation(), {})
