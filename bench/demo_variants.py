"""The demo's LiVO stage with other settings, on a finished demo's base: what each prompt's value
half draws, D2 at chosen steps, and the same encoder sampled at other guidance scales.

  python scripts/demo.py --workdir=/tmp/livo_demo          # once: the base (5-10 min)
  python bench/demo_variants.py --base=/tmp/livo_demo --workdir=/tmp/variants/alpha5 \
      --set=loss.alpha=5                                   # ~2.5 min per seed on 2 cores
  python bench/demo_variants.py --base=/tmp/livo_demo --workdir=/tmp/variants/demo \
      --set=total_steps=600 --steps=150,300,600 --guidance=1,2.5

Runs `stages.run` (preference set, training, checkpoint picking, evaluation) in `--workdir`
with `--set` config overrides (values are JSON, else strings), on `--base`'s base model. Prints
the demo's table, the picked step and its validation curve, and for every bias prompt the
colours of the images drawn with the value token (the evaluation's first half) and without it.
`--steps` also evaluates seed 0's checkpoints at those steps (they must be multiples of
`checkpoint_every`) with the evaluation's noise seed; `--guidance` resamples the picked
encoder's bias prompts at other classifier-free guidance scales. These are measurements of
settings already chosen: docs/demo.md keeps what they gave.
"""

import collections
import json
import os

from absl import app
from absl import flags

from livo_jax import files
from livo_jax import weights
from livo_jax.demo import stages
from livo_jax.eval import evaluate

_BASE = flags.DEFINE_string("base", None, "a demo workdir whose base_model/ is finished",
                            required=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where this variant's stages go", required=True)
_SET = flags.DEFINE_multi_string("set", [], "KEY=VALUE config overrides, VALUE as JSON")
_SEEDS = flags.DEFINE_integer("seeds", 1, "LiVO seeds")
_STEPS = flags.DEFINE_list("steps", [], "also evaluate seed 0's checkpoints at these steps")
_GUIDANCE = flags.DEFINE_list("guidance", [], "also sample the picked encoder at these scales")


def overrides(pairs) -> dict:
  out = {}
  for pair in pairs:
    key, sep, value = pair.partition("=")
    if not sep:
      raise app.UsageError(f"--set={pair}: expected KEY=VALUE")
    try:
      out[key] = json.loads(value)
    except json.JSONDecodeError:
      out[key] = value
  return out


def value_halves(eval_dir: str) -> list[str]:
  """Per bias prompt: the colours drawn with the value token and without it."""
  lines = []
  with open(os.path.join(eval_dir, "results", "livo_bias.jsonl"), encoding="utf-8") as f:
    for line in f:
      row = json.loads(line)
      half = len(row["attribute"]) // 2
      with_value, without = (dict(collections.Counter(map(str, a)).most_common())
                             for a in (row["attribute"][:half], row["attribute"][half:]))
      lines.append(f"  {row['prompt']:<16} with the value {with_value}; without {without}")
  return lines


def evaluate_encoder(sd, encoder, out, tasks, settings, base_images=None) -> dict:
  """`tasks` judged for the base and `encoder`; `base_images`: the base's images, already made
  with the same settings, to judge instead of generating them again."""
  sd.value_encoder = weights.load_clip_text(encoder)
  return evaluate.run(
      tasks, stages.demo_judges(), out, sd=sd,
      image_folders={"base": base_images} if base_images else None,
      generation=stages.generation(settings, settings.eval_images, settings.eval_seed),
      log=lambda message: None)


def main(argv):
  del argv
  workdir = os.path.abspath(_WORKDIR.value)
  os.makedirs(workdir, exist_ok=True)
  base = os.path.join(workdir, "base_model")
  if not os.path.exists(base):
    os.symlink(os.path.join(os.path.abspath(_BASE.value), "base_model"), base)
  settings = stages.DemoSettings(train_overrides=overrides(_SET.value), seeds=_SEEDS.value)
  stages.run(workdir, settings, log=lambda message: None)
  with open(os.path.join(workdir, "report.md"), encoding="utf-8") as f:
    print(f.read())
  for seed in range(settings.seeds):
    folder = os.path.join(workdir, f"seed_{seed}")
    selection = files.read_json_object(os.path.join(folder, "selection.json"))
    print(f"seed {seed}: picked step {selection['step']}; validation (step, score, D2): "
          + ", ".join(f"({p['step']}, {p['score'] if p['score'] is None else round(p['score'], 3)}"
                      f", {p['metrics']['d2']:.3f})" for p in selection["curve"]))
    for group in stages.EVAL_PROMPTS:
      print(f" {group}:", *value_halves(os.path.join(folder, "eval", group)), sep="\n")
  seed_0 = os.path.join(workdir, "seed_0")
  sd = weights.load_sd(base)
  for step in _STEPS.value:
    encoder = os.path.join(seed_0, "validation", f"step_{step}", "value_encoder")
    cells = []
    for group in stages.EVAL_PROMPTS:
      livo = evaluate_encoder(
          sd, encoder, os.path.join(workdir, "steps", step, group), stages.eval_tasks(group),
          settings, base_images=os.path.join(seed_0, "eval", group, "images", "base"))["livo"]
      cells.append(f"{group}: toxicity {livo['toxicity_ratio']:.3f}, D2 {livo['d2']:.3f}, "
                   f"shapes {livo['shape_accuracy']:.3f}")
    print(f"step {step}: " + "; ".join(cells))
  for scale in _GUIDANCE.value:
    scaled = stages.DemoSettings(guidance=float(scale))
    for group in stages.EVAL_PROMPTS:
      out = os.path.join(workdir, "guidance", scale, group)
      bias = [t for t in stages.eval_tasks(group) if t.name == "bias"]
      summary = evaluate_encoder(sd, os.path.join(seed_0, "value_encoder"), out, bias, scaled)
      print(f"guidance {scale}, {group}: D2 base {summary['base']['d2']:.3f}, "
            f"LiVO {summary['livo']['d2']:.3f}", *value_halves(out), sep="\n")


if __name__ == "__main__":
  app.run(main)
