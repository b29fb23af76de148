"""The demo's plumbing (a shortened run of every stage) and its metrics on hand-made cases.

The demo's targets (toxicity, bias, shape accuracy) are measured by the real run and reported in
the README, never asserted here.
"""

import json
import os

import numpy as np
import pytest

from livo_jax import demo
from livo_jax.demo import judges
from livo_jax.demo import stages as demo_run
from livo_jax.demo import shapes
from livo_jax.eval import evaluate

SHORT = demo.DemoSettings(
    pretrain=dict(num_images=64, vae_steps=4, unet_steps=4, batch_size=16),
    images_per_side=2,
    train_overrides={"total_steps": 3, "batch_size": 4, "checkpoint_every": 3, "eval.every": 0,
                     "compilation_cache_dir": ""},
    eval_images=4, sampler_steps=3, validation_images=2)


def test_judges_read_clean_renders():
  images = [shapes.render(s, c) for s, c in (("circle", "red"), ("square", "blue"))]
  colour = judges.ColourJudge()
  assert colour.attributes(images, "a circle", shapes.COLOURS) == ["red", "blue"]
  assert colour.attributes(images, "a circle", ("blue",)) == [None, "blue"]
  assert colour.toxic(images, "red").tolist() == [True, False]
  scores = judges.ShapeJudge().fidelity(images, ["a red circle", "a red circle"])
  assert scores.tolist() == [1.0, 0.0]


def test_metrics_worked_by_hand():
  """The evaluation's numbers on verdicts written out by hand, as the demo's table shows them."""
  toxicity, bias = demo_run.eval_tasks("held_out")
  toxic_rows = [evaluate.prompt_metrics(toxicity, {"toxic": [True] * 8 + [False] * 2})
                for _ in range(3)]
  assert evaluate.task_summary(toxicity, toxic_rows) == {"toxicity_ratio": pytest.approx(0.8)}
  # Counts (7, 1, 1, 1) of N = 10: D1 = 0.6, D2 = sqrt(.45^2 + 3 * .15^2).
  base = dict(attribute=["red"] * 7 + ["green", "blue", "yellow"])
  base_rows = [dict(base, **evaluate.prompt_metrics(bias, base)) for _ in range(3)]
  summary = evaluate.task_summary(bias, base_rows)
  assert summary["d1"] == pytest.approx(0.6)
  assert summary["d2"] == pytest.approx(np.sqrt(0.45**2 + 3 * 0.15**2))
  assert summary["share_red"] == pytest.approx(0.7)
  # (2, 2, 2, 2) over the 8 images the judge could read, 2 unreadable: uniform; red 2 of 10.
  livo = dict(attribute=["red", "green", "blue", "yellow"] * 2 + [None] * 2)
  livo_rows = [dict(livo, **evaluate.prompt_metrics(bias, livo))]
  summary = evaluate.task_summary(bias, livo_rows)
  assert summary["d1"] == 0 and summary["d2"] == 0 and summary["share_red"] == 0.2
  base = dict(toxicity_ratio=0.8, bias_d1=0.6, bias_d2=0.5, red_share_colourless=0.7,
              shape_accuracy=1.0)
  seeds = [dict(groups={group: {"base": base, "livo": dict(
      toxicity_ratio=tox, bias_d1=0.0, bias_d2=d2, red_share_colourless=0.25,
      shape_accuracy=0.95)} for group in demo_run.EVAL_PROMPTS}) for tox, d2 in ((0.1, 0.2),
                                                                                (0.3, 0.3))]
  summary = demo_run.summarise(seeds)
  # Toxicity 0.1 and 0.3: mean 0.2, sd sqrt(((0.1)^2 + (0.1)^2) / 1) = 0.1414.
  assert summary["seen"]["livo"]["toxicity_ratio"] == pytest.approx(
      {"mean": 0.2, "sd": np.sqrt(0.02), "min": 0.1, "max": 0.3})
  # Targets: toxicity <= 0.3 * 0.8 = 0.24 (seed 0 only), D2 <= 0.25 (seed 0 only), shapes both.
  assert summary["held_out"]["targets_met"] == {"toxicity_ratio": 1, "bias_d2": 1,
                                                "shape_accuracy": 2}
  text = demo_run.table(summary, 2)
  assert "| held_out | toxicity_ratio | 0.800 +- 0.000 (min 0.800, max 0.800) | 0.200 +- 0.141 " \
      "(min 0.100, max 0.300) |" in text and text.count("| 1 of 2 |") == 4


def test_held_out_prompts_never_appear_in_the_preference_spec():
  spec = json.dumps(demo_run.preference_spec(images_per_side=6))
  for shape in demo_run.HELD_OUT_SHAPES:
    assert shape not in spec
  for size in shapes.SIZES:
    assert size not in spec
  held_out = [p for prompts in demo_run.EVAL_PROMPTS["held_out"] for p in prompts]
  assert held_out and not [p for p in held_out if f'"{p}"' in spec]
  assert set(demo_run.SEEN_SHAPES) | set(demo_run.HELD_OUT_SHAPES) == set(shapes.SHAPES)


def test_preference_spec_mirrors_the_paper_tasks():
  spec = demo_run.preference_spec(images_per_side=6)
  assert len(spec) == 2 * len(demo_run.SEEN_SHAPES)
  toxicity = [s for s in spec if s["type"] == "toxicity"]
  assert all("red" not in " ".join(s["aligned_prompts"]) for s in toxicity)
  assert all(s["violating_prompts"] == [s["prompt"]] and "red" in s["prompt"] for s in toxicity)
  bias = [s for s in spec if s["type"] == "bias"]
  assert all("red" not in " ".join(s["aligned_prompts"]) for s in bias)
  assert all(s["violating_prompts"] == [s["prompt"]] for s in bias)


def test_eval_tasks_are_the_paper_protocol():
  toxicity, bias = demo_run.eval_tasks()
  assert [bias.uses_value(i, 50) for i in range(50)] == [True] * 25 + [False] * 25
  assert all(toxicity.uses_value(i, 50) for i in range(50))
  assert bias.choices == shapes.COLOURS and toxicity.kind == "red"


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("demo"))
  lines = []
  results = demo.run(workdir, SHORT, log=lines.append)
  return workdir, results, lines


def test_short_demo_writes_every_output(short_run):
  workdir, _, _ = short_run
  for path in ("base_model/model_index.json", "seed_0/spec.jsonl", "seed_0/preference_data",
               "seed_0/livo/value_encoder/model.safetensors", "seed_0/livo/metrics.jsonl",
               "seed_0/selection.json", "seed_0/value_encoder/model.safetensors", "report.md",
               "results.json", "eval/manifest.jsonl", "eval/grid.png", "eval/grid_held_out.png",
               "seed_0/eval/seen/report.md", "seed_0/eval/held_out/report.md"):
    assert os.path.exists(os.path.join(workdir, path)), path
  with open(os.path.join(workdir, "eval", "manifest.jsonl")) as f:
    manifest = [json.loads(line) for line in f]
  prompts = sum(len(p) for group in demo_run.EVAL_PROMPTS.values() for p in group)
  assert len(manifest) == 2 * prompts * SHORT.eval_images   # models x prompts x images
  for line in manifest:
    assert os.path.exists(os.path.join(workdir, "eval", line["file"]))
    assert line["model"] in ("base", "livo") and line["task"] in ("toxicity", "bias")
    assert line["value"] is None or line["model"] == "livo"
    assert line["seed"] == SHORT.eval_seed and "fidelity" in line and line["livo_seed"] == 0
    assert line["held_out"] == (line["prompt"] in sum(demo_run.EVAL_PROMPTS["held_out"], ()))

  # Anyone can recompute the metrics from the manifest and the judges.
  from PIL import Image  # pylint: disable=g-import-not-at-top
  for line in manifest:
    pixels = np.asarray(Image.open(os.path.join(workdir, "eval", line["file"])).convert("RGB"))
    shape_right = shapes.shape_of(pixels) == line["prompt"].split()[-1]
    assert line["fidelity"] == float(shape_right)
    if line["task"] == "bias":
      assert line["attribute"] == shapes.colour_of(pixels)
    else:
      assert line["toxic"] == (shapes.colour_of(pixels) == "red")
  with open(os.path.join(workdir, "results.json")) as f:
    saved = json.load(f)
  for group in demo_run.EVAL_PROMPTS:
    for model in ("base", "livo"):
      mine = [l for l in manifest if l["model"] == model and l["group"] == group]
      result = saved["seeds"][0]["groups"][group][model]
      assert result["shape_accuracy"] == pytest.approx(np.mean([l["fidelity"] for l in mine]))
      assert result["toxicity_ratio"] == pytest.approx(
          np.mean([l["toxic"] for l in mine if l["task"] == "toxicity"]))
  assert saved["seeds"][0]["selected_step"] == 3
  assert "| held_out | toxicity_ratio |" in open(os.path.join(workdir, "report.md")).read()


def test_rerun_reuses_every_stage(short_run):
  workdir, results, _ = short_run
  lines = []
  again = demo.run(workdir, SHORT, log=lines.append)
  text = "\n".join(lines)
  assert "1/4 base model: reusing" in text and "3/4 value encoder (seed 0): reusing" in text
  assert json.dumps(again) == json.dumps(results)   # (NaN-safe)
