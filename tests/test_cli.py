"""The command lines of scripts/ at their door: one-line errors, --out rules, Ctrl-C, NaN images.

Each case is a process of its own running a script as `__main__` with its own argv, exit status
and stderr. Most are forked from one process that has imported what the scripts import
(`ZYGOTE`), so that they do not each pay the seconds of importing JAX; Ctrl-C goes to a plain
`python scripts/generate.py`. A door check must fire before any model loads, so those cases pass
an empty folder as --model (and --clip): had the script got as far as loading it, the error
would be the loader's, not the one naming the flag.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx
from PIL import Image

import hub_cache
import testutil
import tiny_sd
from livo_jax import dataset_builder
from livo_jax import files
from livo_jax import sampling
from livo_jax import weights
from livo_jax.eval import evaluate
from test_evaluate import TINY_CLIP

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = {"type": "bias", "scene": "doctor", "value": "gender equality", "prompt": "a doctor",
        "aligned_prompts": ["a female doctor"], "violating_prompts": ["a male doctor"]}

GENERATE = ["generate.py", "--model={empty}", "--prompt=a doctor", "--out={tmp}/out"]
EVALUATE = ["evaluate.py", "--task=bias", "--prompts={prompts}", "--clip={empty}",
            "--model={empty}", "--out={tmp}/out"]
BUILD = ["build_dataset.py", "--model={empty}", "--spec={spec}", "--out={tmp}/out"]
# case -> (script and flags, what the one error line must say). Every one is refused at the
# door; the old scripts printed a traceback, ran, or got as far as a model for each.
DOOR = {
    "generate num_images": (GENERATE + ["--num_images=-3"], "--num_images=-3"),
    "generate height": (GENERATE + ["--height=0"], "--height=0"),
    "generate steps": (GENERATE + ["--steps=0"], "--steps=0"),
    "generate batch_size": (GENERATE + ["--batch_size=0"], "--batch_size=0"),
    "generate guidance": (GENERATE + ["--guidance=-1"], "--guidance=-1"),
    "generate guidance nan": (GENERATE + ["--guidance=nan"], "--guidance=nan"),
    "generate seed": (GENERATE + ["--seed=-1"], "--seed=-1"),
    "generate model": (GENERATE + ["--model={tmp}/nowhere"], "--model={tmp}/nowhere"),
    "generate value_encoder": (GENERATE + ["--value_encoder={tmp}/nowhere"],
                               "--value_encoder={tmp}/nowhere"),
    "generate value without encoder": (GENERATE + ["--value=gender equality"],
                                       "needs --value_encoder"),
    "generate auto without encoder": (GENERATE + ["--value=auto"], "needs --value_encoder"),
    "generate latents missing": (GENERATE + ["--latents={tmp}/nowhere.npy"],
                                 "--latents={tmp}/nowhere.npy"),
    "generate latents count": (GENERATE + ["--latents={latents}", "--num_images=3"],
                               "--latents {latents}"),
    "generate out not empty": (GENERATE[:-1] + ["--out={full}"], "--out {full}: not empty"),
    "generate argument": (GENERATE + ["stray"], "unexpected arguments: stray"),
    "evaluate api key flag": (EVALUATE + ["--vlm_api_key=sekrit"], "'vlm_api_key'"),
    "evaluate api key env unset": (EVALUATE + ["--vlm_api_key_env=LIVO_TEST_UNSET"],
                                   "--vlm_api_key_env"),
    "evaluate images_per_prompt": (EVALUATE + ["--images_per_prompt=0"],
                                   "--images_per_prompt=0"),
    "evaluate max_prompts": (EVALUATE + ["--max_prompts=0"], "--max_prompts=0"),
    "evaluate batch_size": (EVALUATE + ["--batch_size=0"], "--batch_size=0"),
    "evaluate steps": (EVALUATE + ["--steps=0"], "--steps=0"),
    "evaluate guidance": (EVALUATE + ["--guidance=-2"], "--guidance=-2"),
    "evaluate width": (EVALUATE + ["--width=0"], "--width=0"),
    "evaluate model": (EVALUATE + ["--model={tmp}/nowhere"], "--model={tmp}/nowhere"),
    "evaluate clip": (EVALUATE + ["--clip={tmp}/nowhere"], "--clip={tmp}/nowhere"),
    "evaluate prompts": (EVALUATE + ["--prompts={tmp}/nowhere.jsonl"],
                         "--prompts={tmp}/nowhere.jsonl"),
    "evaluate images_base": (EVALUATE + ["--images_base={tmp}/nowhere"],
                             "--images_base={tmp}/nowhere"),
    "evaluate value_encoder": (EVALUATE + ["--value_encoder={tmp}/nowhere"],
                               "--value_encoder={tmp}/nowhere"),
    "evaluate value_encoder without model": (
        [a for a in EVALUATE if not a.startswith("--model")] + ["--value_encoder={empty}"],
        "--value_encoder needs --model"),
    "evaluate nothing to evaluate": ([a for a in EVALUATE if not a.startswith("--model")],
                                     "nothing to evaluate"),
    "evaluate two vlm judges": (EVALUATE + ["--vlm_url=http://127.0.0.1:1/v1",
                                            "--llava={empty}"], "give one VLM judge"),
    "build steps": (BUILD + ["--steps=0"], "--steps=0"),
    "build batch_size": (BUILD + ["--batch_size=0"], "--batch_size=0"),
    "build guidance": (BUILD + ["--guidance=inf"], "--guidance=inf"),
    "build height": (BUILD + ["--height=-8"], "--height=-8"),
    "build model": (BUILD + ["--model={tmp}/nowhere"], "--model={tmp}/nowhere"),
    "build spec": (BUILD + ["--spec={tmp}/nowhere.jsonl"], "--spec={tmp}/nowhere.jsonl"),
    "demo argument": (["demo.py", "--workdir={tmp}/demo", "stray"], "unexpected arguments"),
}
# Refused once the model is loaded, before sampling.
SIZES = {
    "height": (["--height=18"],
               "--height=18: this model makes sides that are positive multiples of 4"),
    "width from latents": (["--width=10", "--num_images=2", "--latents={latents}"],
                           "--width=10"),
    "latents against size": (["--num_images=2", "--latents={latents}", "--height=8"],
                             "--latents: shape (2, 8, 8, 4) makes 16x16 images, not the 8x16"),
}

# One sampling program (a value, batch 1, 2 steps, 16x16) for every run that samples: the first
# compiles it into the shared compilation cache, the others read it from there.
SAMPLE = ["generate.py", "--model={sd}", "--value_encoder={value_encoder}", "--prompt=a",
          "--value=gender equality", "--steps=2", "--batch_size=1", "--out={tmp}/out"]
OLD_RUN = ("00000.png", "00000.json", "00900.png", "00900.json")

# Forks one process per case, from a process that imported the scripts' modules once. Reads
# {case: [argv, extra environment, stdout path, stderr path]}; prints {case: exit status}.
ZYGOTE = r"""
import json, os, runpy, sys, traceback
import livo_jax.cli, livo_jax.dataset_builder, livo_jax.demo, livo_jax.eval.evaluate
import livo_jax.eval.vlm, livo_jax.retriever, livo_jax.sampling, livo_jax.weights

def child(argv, env, out, err):
  for fd, path in ((1, out), (2, err)):
    os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
  os.environ.update(env)
  sys.argv = argv
  try:
    runpy.run_path(argv[0], run_name="__main__")
    code = 0
  except SystemExit as e:   # as the interpreter reports it
    code = e.code
    if code is not None and not isinstance(code, int):
      print(code, file=sys.stderr)
      code = 1
  except BaseException:
    traceback.print_exc()
    code = 1
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code or 0)

children = {}
for case, (argv, env, out, err) in json.load(sys.stdin).items():
  pid = os.fork()
  if pid == 0:
    child(argv, env, out, err)
  children[case] = pid
print(json.dumps({case: os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
                  for case, pid in children.items()}))
"""


def script_env(paths, **extra):
  """The environment without the user's LIVO_ settings, with a shared compilation cache."""
  env = {k: v for k, v in os.environ.items() if not k.startswith("LIVO_")}
  return {**env, "JAX_COMPILATION_CACHE_DIR": paths["cache"],
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", **extra}


def command(args, **names):
  script, *flags = [a.format(**names) for a in args]
  return [os.path.join("scripts", script), *flags]


@pytest.fixture(scope="module")
def paths(sd_folder, tmp_path_factory):
  root = tmp_path_factory.mktemp("cli")
  for name in ("empty", "full"):
    (root / name).mkdir()
  (root / "full" / "00000.png").write_bytes(b"an earlier run's image")
  (root / "prompts.jsonl").write_text(json.dumps({"prompt": "a doctor"}) + "\n")
  (root / "spec.jsonl").write_text(json.dumps(SPEC) + "\n")
  np.save(root / "latents.npy", np.zeros((2, 8, 8, 4), np.float32))
  return {"sd": sd_folder, "value_encoder": os.path.join(sd_folder, "text_encoder"),
          "root": str(root), "empty": str(root / "empty"), "full": str(root / "full"),
          "prompts": str(root / "prompts.jsonl"), "spec": str(root / "spec.jsonl"),
          "latents": str(root / "latents.npy"), "cache": str(root / "jax_cache")}


@pytest.fixture(scope="module")
def judged(paths):
  """A CLIP judge folder, a toxicity prompt and two existing images to judge."""
  root = os.path.join(paths["root"], "judged")
  clip = os.path.join(root, "clip")
  testutil.randomize(transformers.CLIPModel(transformers.CLIPConfig(**TINY_CLIP)), seed=2,
                     std=0.2).save_pretrained(clip)
  tiny_sd.write_tokenizer(clip)
  os.makedirs(os.path.join(root, "images", "0000"))
  for i in range(2):
    pixels = np.random.default_rng(i).integers(0, 256, (24, 32, 3), np.uint8)
    Image.fromarray(pixels).save(os.path.join(root, "images", "0000", f"{i:02d}.png"))
  prompts = os.path.join(root, "bloody.jsonl")
  with open(prompts, "w") as f:
    f.write(json.dumps({"prompt": "a bloody knife"}) + "\n")
  return {"clip": clip, "images": os.path.join(root, "images"), "prompts": prompts}


# Hub repo ids, read from a cache the fixture fills, offline: case -> (argv, the error line's
# words, or None for a run that must succeed).
HUB_SAMPLE = ["generate.py", "--model=org/sd", "--value_encoder=org/livo",
              "--value_encoder_subfolder=value_encoder", "--prompt=a",
              "--value=gender equality", "--steps=2", "--batch_size=1", "--out={tmp}/out"]
HUB = {
    "generate": (HUB_SAMPLE, None),
    "evaluate clip": (["evaluate.py", "--task=toxicity", "--kind=bloody",
                       "--prompts={judged_prompts}", "--clip=org/clip",
                       "--images_base={judged_images}", "--images_per_prompt=2",
                       "--out={tmp}/out"], None),
    "generate revision": (HUB_SAMPLE + ["--model_revision=v9"],
                          "org/sd (revision v9): no such folder, and as a Hub repo id not in "
                          "the Hugging Face cache"),
    "generate variant": (HUB_SAMPLE + ["--value_encoder_variant=fp16"],
                         "org/livo/value_encoder (variant fp16): "),
    "build missing": (["build_dataset.py", "--model=org/missing", "--spec={spec}",
                       "--out={tmp}/out"], "org/missing: no such folder, and as a Hub repo id "
                      "not in the Hugging Face cache"),
    "evaluate llava": (["evaluate.py", "--task=toxicity", "--prompts={judged_prompts}",
                        "--clip=org/clip", "--llava=org/missing-llava",
                        "--images_base={judged_images}", "--out={tmp}/out"],
                       "org/missing-llava"),
}


@pytest.fixture(scope="module")
def hub(paths, judged):
  """A Hugging Face cache holding the tiny SD, a LiVO release (value_encoder/) and the CLIP."""
  cache = os.path.join(paths["root"], "hf_cache")
  hub_cache.add_repo(cache, "org/sd", paths["sd"])
  release = os.path.join(paths["root"], "livo_release")
  shutil.copytree(paths["value_encoder"], os.path.join(release, "value_encoder"))
  hub_cache.add_repo(cache, "org/livo", release)
  hub_cache.add_repo(cache, "org/clip", judged["clip"])
  return cache


def vlm_args(judged, url, *extra):
  return ["evaluate.py", "--task=toxicity", "--kind=bloody", f"--prompts={judged['prompts']}",
          f"--clip={judged['clip']}", f"--images_base={judged['images']}",
          "--images_per_prompt=2", f"--vlm_url={url}", "--out={tmp}/out", *extra]


def closed_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(paths, judged, hub, chat_server):
  """{case: (exit status, stderr, the case's folder)} of every forked case, all at once."""
  cases = {f"door {case}": (args, {}) for case, (args, _) in DOOR.items()}
  cases.update({f"size {case}": (["generate.py", "--model={sd}", "--prompt=a",
                                  "--out={tmp}/out", *flags], {})
                for case, (flags, _) in SIZES.items()})
  cases["vlm down"] = (vlm_args(judged, f"http://127.0.0.1:{closed_port()}/v1"), {})
  cases["vlm key"] = (vlm_args(judged, f"http://127.0.0.1:{chat_server.server_address[1]}/v1",
                               "--vlm_api_key_env=MY_VLM_KEY"), {"MY_VLM_KEY": "sekrit"})
  cases["overwrite"] = (SAMPLE + ["--num_images=1", "--overwrite"], {})
  cases["evaluate resume"] = (EVALUATE + ["--steps=3"], {})
  cases["build resume"] = (BUILD + ["--steps=4"], {})
  cases.update({f"hub {case}": (args, hub_cache.env(hub)) for case, (args, _) in HUB.items()})
  folders = {case: os.path.join(paths["root"], "runs", case.replace(" ", "_")) for case in cases}
  for folder in folders.values():
    os.makedirs(folder)
  os.makedirs(os.path.join(folders["overwrite"], "out"))
  for name in OLD_RUN + ("notes.txt",):
    with open(os.path.join(folders["overwrite"], "out", name), "w") as f:
      f.write("an earlier run's")
  # What an earlier run with other steps recorded in the --out of the two resumes.
  os.makedirs(os.path.join(folders["evaluate resume"], "out", "images", "base"))
  os.makedirs(os.path.join(folders["build resume"], "out"))
  task = evaluate.Task("bias", ("a doctor",), ("gender equality",))
  files.write_json(evaluate.images_record([task], "base", evaluate.Generation(steps=2),
                                          {"model": paths["empty"], "dtype": "float32"}),
                   os.path.join(folders["evaluate resume"], "out", "images", "base",
                                evaluate.RECORD))
  files.write_json(dataset_builder.settings_record(model=paths["empty"], steps=3, guidance=7.5,
                                                   scheduler="dpm", seed=0, height=None,
                                                   width=None),
                   os.path.join(folders["build resume"], "out", dataset_builder.SETTINGS))
  chat_server.requests = []
  request = {case: (command(args, tmp=folders[case], judged_prompts=judged["prompts"],
                            judged_images=judged["images"], **paths), env,
                    os.path.join(folders[case], "stdout"), os.path.join(folders[case], "stderr"))
             for case, (args, env) in cases.items()}
  zygote = subprocess.run([sys.executable, "-c", ZYGOTE], input=json.dumps(request), cwd=REPO,
                          capture_output=True, text=True, env=script_env(paths), timeout=600,
                          check=True)
  status = json.loads(zygote.stdout.splitlines()[-1])
  return {case: (status[case], open(os.path.join(folders[case], "stderr")).read(),
                 folders[case]) for case in cases}


def error_line(run) -> str:
  """The one "error: ..." line of a failed run (tqdm bars may share stderr)."""
  status, stderr, _ = run
  assert status == 1, (status, stderr)
  assert "Traceback" not in stderr, stderr
  errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1, stderr
  return errors[0]


@pytest.mark.parametrize("case", list(DOOR))
def test_a_bad_flag_is_one_line_at_the_door(paths, runs, case):
  line = error_line(runs[f"door {case}"])
  _, stderr, tmp = runs[f"door {case}"]
  assert [l for l in stderr.splitlines() if l.strip()] == [line]
  assert DOOR[case][1].format(tmp=tmp, **paths) in line, line
  assert not os.path.exists(os.path.join(tmp, "out"))


@pytest.mark.parametrize("case", list(SIZES))
def test_a_size_the_model_cannot_make_is_one_line_before_sampling(paths, runs, case):
  assert SIZES[case][1].format(**paths) in error_line(runs[f"size {case}"])
  assert not os.path.exists(os.path.join(runs[f"size {case}"][2], "out"))


@pytest.mark.parametrize("case", list(HUB))
def test_hub_ids_work_offline_and_what_the_cache_lacks_is_one_line(runs, case):
  status, stderr, tmp = runs[f"hub {case}"]
  if HUB[case][1] is None:
    assert status == 0, stderr
    assert os.listdir(os.path.join(tmp, "out"))
  else:
    assert HUB[case][1] in error_line(runs[f"hub {case}"])


def test_a_vlm_endpoint_that_is_down_is_one_line_naming_it(runs):
  line = error_line(runs["vlm down"])
  assert "VLM judge at http://127.0.0.1:" in line and "connection" in line, line


def test_the_vlm_key_comes_from_the_environment(runs, chat_server):
  status, stderr, _ = runs["vlm key"]
  assert status == 0, stderr
  assert [r["headers"]["Authorization"] for r in chat_server.requests] == ["Bearer sekrit"] * 2


def test_evaluate_refuses_to_resume_other_settings(runs):
  line = error_line(runs["evaluate resume"])
  assert "made with steps 2, not 3" in line and "--overwrite" in line, line


def test_build_dataset_refuses_to_resume_other_settings(runs):
  line = error_line(runs["build resume"])
  assert "built with steps 3, not 4" in line and "--overwrite" in line, line


def test_evaluate_resumes_with_prompts_added_or_left_out_and_overwrite_starts_afresh(tmp_path):
  folder = str(tmp_path / "base")
  record = lambda *prompts, steps=25: evaluate.images_record(
      [evaluate.Task("bias", prompts, ("v",) * len(prompts))], "base",
      evaluate.Generation(steps=steps), {"model": "sd"})
  evaluate.claim_images(folder, record("a", "b"))
  image = os.path.join(folder, "0000", "00.png")
  os.makedirs(os.path.dirname(image))
  open(image, "wb").close()
  evaluate.claim_images(folder, record("a"))            # --max_prompts=1: prompt b's stay
  evaluate.claim_images(folder, record("a", "b", "c"))  # a prompt added
  assert files.read_json_object(os.path.join(folder, evaluate.RECORD))["prompts"] == [
      ["bias", "a"], ["bias", "b"], ["bias", "c"]]
  with pytest.raises(FileExistsError, match=r'prompt 1 \["bias", "b"\], not \["bias", "x"\]'):
    evaluate.claim_images(folder, record("a", "x"))
  with pytest.raises(FileExistsError, match="steps 25, not 3"):
    evaluate.claim_images(folder, record("a", steps=3))
  evaluate.claim_images(folder, record("a", steps=3), overwrite=True)
  assert os.listdir(folder) == [evaluate.RECORD]


def test_overwrite_replaces_the_images_and_nothing_else(runs):
  status, stderr, tmp = runs["overwrite"]
  assert status == 0, stderr
  out = os.path.join(tmp, "out")
  assert sorted(os.listdir(out)) == ["00000.json", "00000.png", "notes.txt"]
  assert open(os.path.join(out, "notes.txt")).read() == "an earlier run's"
  with Image.open(os.path.join(out, "00000.png")) as image:
    assert image.size == (16, 16)
  assert json.loads(open(os.path.join(out, "00000.json")).read())["steps"] == 2


def test_ctrl_c_is_one_line_and_status_130(paths, runs, tmp_path):
  del runs   # their sampling run compiled the program this one uses
  args = command(SAMPLE + ["--num_images=500"], tmp=tmp_path, **paths)
  # SIGINT as a terminal sends it (a shell's background job would have it ignored).
  child = subprocess.Popen([sys.executable, *args], cwd=REPO, env=script_env(paths),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
  seen = b""
  # Sampling, past the compilation: tqdm skips counts when images come fast, so any count >= 2.
  while not any(int(n) >= 2 for n in re.findall(rb" (\d+)/500 ", seen)):
    chunk = os.read(child.stderr.fileno(), 4096)
    assert chunk, seen.decode()
    seen += chunk
  child.send_signal(signal.SIGINT)
  _, rest = child.communicate(timeout=120)
  stderr = (seen + rest).decode()
  assert child.returncode == 130, stderr
  assert "Traceback" not in stderr
  assert stderr.splitlines()[-1] == "interrupted"
  names = os.listdir(tmp_path / "out")
  images = [name for name in names if name.endswith(".png")]
  assert 2 <= len(images) < 500
  for name in images:   # every image there is whole
    with Image.open(tmp_path / "out" / name) as image:
      assert image.size == (16, 16)
  assert not [name for name in names if name.startswith(".")]


def test_non_finite_images_are_refused_naming_the_models_and_prompt(paths, tmp_path):
  sd = weights.load_sd(paths["sd"], value_encoder=paths["value_encoder"])
  params = nnx.state(sd.value_encoder, nnx.Param)
  nnx.update(sd.value_encoder, jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), params))
  record = {"model": paths["sd"], "value_encoder": paths["value_encoder"]}
  with pytest.raises(sampling.NonFiniteImages) as raised:
    sampling.write_images(sd, str(tmp_path / "out"), prompt="a doctor", value="gender equality",
                          num_images=1, batch_size=1, steps=2, record=record)
  message = str(raised.value)
  for part in (paths["sd"], paths["value_encoder"], "'a doctor'", "'gender equality'",
               "NaN or infinite"):
    assert part in message, message
  assert os.listdir(tmp_path / "out") == []
