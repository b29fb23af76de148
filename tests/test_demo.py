"""The demo's plumbing (a shortened run of every stage) and its metrics on hand-made cases.

The demo's targets (toxicity, bias, shape accuracy) are measured by the real run and reported in
the README, never asserted here.
"""

import json
import os

import numpy as np
import pytest

from livo_jax import demo
from livo_jax import shapes

SHORT = demo.DemoSettings(
    pretrain=dict(num_images=64, vae_steps=4, unet_steps=4, batch_size=16),
    images_per_side=2,
    train_overrides=("--config.total_steps=3", "--config.batch_size=4",
                     "--config.checkpoint_every=3", "--config.eval.every=0",
                     "--config.compilation_cache_dir="),
    eval_images=4, sampler_steps=3)


def judged(model, task, prompt, colours, shape=None):
  return [demo.EvalImage(f"{model}/{i}.png", prompt, None, model, task, c,
                         shape or prompt.split()[-1]) for i, c in enumerate(colours)]


def test_metrics_worked_by_hand():
  images = []
  for prompt in demo.TOXICITY_PROMPTS:
    images += judged("base", "toxicity", prompt, ["red"] * 8 + ["blue"] * 2)
    images += judged("livo", "toxicity", prompt, ["red"] * 1 + ["green"] * 9)
  for prompt in demo.BIAS_PROMPTS:
    images += judged("base", "bias", prompt, ["red"] * 7 + ["green", "blue", "yellow"])
    images += judged("livo", "bias", prompt, ["red", "green", "blue", "yellow"] * 2 + [None] * 2,
                     shape="blob")
  results = demo.metrics(images)
  assert results["base"]["toxicity_ratio"] == pytest.approx(0.8)
  assert results["livo"]["toxicity_ratio"] == pytest.approx(0.1)
  # Base bias counts (7, 1, 1, 1) of N = 10: D1 = 0.6, D2 = sqrt(.45^2 + 3 * .15^2).
  assert results["base"]["bias_d1"] == pytest.approx(0.6)
  assert results["base"]["bias_d2"] == pytest.approx(np.sqrt(0.45**2 + 3 * 0.15**2))
  # LiVO: (2, 2, 2, 2) over the 8 judged images: uniform.
  assert results["livo"]["bias_d1"] == 0 and results["livo"]["bias_d2"] == 0
  assert results["base"]["red_share_colourless"] == pytest.approx(0.7)
  # LiVO's bias images have the wrong shape: 30 of 60 images right.
  assert results["base"]["shape_accuracy"] == 1.0
  assert results["livo"]["shape_accuracy"] == pytest.approx(0.5)
  text = demo.table(results)
  assert "| toxicity_ratio | 0.800 | 0.100 |" in text and "| yes |" in text


def test_preference_spec_mirrors_the_paper_tasks():
  spec = demo.preference_spec(images_per_side=6)
  assert len(spec) == 2 * len(shapes.SHAPES)
  toxicity = [s for s in spec if s["type"] == "toxicity"]
  assert all("red" not in " ".join(s["aligned_prompts"]) for s in toxicity)
  assert all(s["violating_prompts"] == [s["prompt"]] and "red" in s["prompt"] for s in toxicity)
  bias = [s for s in spec if s["type"] == "bias"]
  assert all("red" not in " ".join(s["aligned_prompts"]) for s in bias)
  assert all(s["violating_prompts"] == [s["prompt"]] for s in bias)


def test_eval_plan_is_the_paper_protocol():
  plan = demo.eval_plan(50)
  livo_bias = [values for task, _, model, values in plan if task == "bias" and model == "livo"]
  assert all(values.count(shapes.BIAS_VALUE) == 25 and values.count(None) == 25
             for values in livo_bias)
  assert all(values == [None] * 50 for _, _, model, values in plan if model == "base")


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("demo"))
  lines = []
  results = demo.run(workdir, SHORT, log=lines.append)
  return workdir, results, lines


def test_short_demo_writes_every_output(short_run):
  workdir, results, _ = short_run
  for path in ("base_model/model_index.json", "spec.jsonl", "preference_data",
               "livo/value_encoder/model.safetensors", "report.md", "report.png",
               "results.json", "eval/manifest.jsonl"):
    assert os.path.exists(os.path.join(workdir, path)), path
  with open(os.path.join(workdir, "eval", "manifest.jsonl")) as f:
    manifest = [json.loads(line) for line in f]
  plan = demo.eval_plan(SHORT.eval_images)
  assert len(manifest) == sum(len(values) for *_, values in plan)
  for line in manifest:
    assert set(line) == {"file", "prompt", "value", "model", "task"}
    assert os.path.exists(os.path.join(workdir, "eval", line["file"]))
    assert line["model"] in ("base", "livo") and line["task"] in ("toxicity", "bias")
    assert line["value"] is None or line["model"] == "livo"

  # Anyone can recompute the metrics from the manifest and the judges.
  from PIL import Image  # pylint: disable=g-import-not-at-top
  images = []
  for line in manifest:
    pixels = np.asarray(Image.open(os.path.join(workdir, "eval", line["file"])).convert("RGB"))
    images.append(demo.EvalImage(**line, colour=shapes.colour_of(pixels),
                                 shape=shapes.shape_of(pixels)))
  recomputed = demo.metrics(images)
  with open(os.path.join(workdir, "results.json")) as f:
    saved = json.load(f)
  for model in ("base", "livo"):
    for key, value in recomputed[model].items():
      assert saved[model][key] == pytest.approx(value, nan_ok=True), (model, key)
  assert "| toxicity_ratio |" in open(os.path.join(workdir, "report.md")).read()


def test_rerun_reuses_every_stage(short_run):
  workdir, results, _ = short_run
  lines = []
  again = demo.run(workdir, SHORT, log=lines.append)
  text = "\n".join(lines)
  assert "1/4 base model: reusing" in text and "3/4 value encoder: reusing" in text
  assert json.dumps(again) == json.dumps(results)   # (NaN-safe)
