"""train_iterator against hand-computed crops, the (seed, position) contract, sharding, resume.

Each image of the fixture is distinct (noise), so every row of a batch is traced back to its
raw image by comparing pixels with that image's hand-computed transform.
"""

import json

import numpy as np
import pytest
import transformers
from PIL import Image

import livo_data_fixture as fixture
from livo_data_fixture import quiet
import tiny_sd
from livo_jax import conditioning, data

R = 16           # the fixture's 24x20 images resize to 19x16: 4 horizontal crop offsets
N_ALIGNED = 7


@pytest.fixture(scope="module")
def source(raw, tmp_path_factory):
  cache = str(tmp_path_factory.mktemp("cache"))
  return data.PreferenceSource(data.prepare(raw, cache_root=cache, log=quiet))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("tokenizer"))
  tiny_sd.write_tokenizer(folder)
  return transformers.CLIPTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def lines(raw):
  return fixture.read_metadata(raw)


@pytest.fixture(scope="module")
def identify(raw, lines):
  """pixels [R, R, 3] -> (index of its metadata line, whether mirrored), by exact match."""
  refs = np.stack([fixture.centre_crop(raw, l["path"], R, flip)
                   for l in lines for flip in (False, True)])

  def find(pixels):
    hits = np.flatnonzero(np.abs(refs - pixels).max(axis=(1, 2, 3)) < 1e-5)
    assert len(hits) == 1, f"{len(hits)} raw images match"
    return divmod(int(hits[0]), 2)
  return find


def iterator(source, tokenizer, **kwargs):
  return data.train_iterator(source, tokenizer=tokenizer, **{
      "resolution": R, "global_batch": 4, "seed": 0, **kwargs})


def batches(it, steps):
  return [next(it) for _ in range(steps)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def concat(parts):
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def test_batches_are_hand_computed_pairs_of_one_scene(source, tokenizer, lines, identify):
  it = iterator(source, tokenizer, global_batch=N_ALIGNED, seed=3)   # one epoch per batch
  epochs, flips = [], []
  for step, batch in enumerate(batches(it, 4)):
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        "pixels_w": ((7, R, R, 3), np.float32), "pixels_l": ((7, R, R, 3), np.float32),
        "prompt_ids": ((7, 77), np.int32), "value_ids": ((7, 77), np.int32),
        "position": ((7,), np.int64)}
    np.testing.assert_array_equal(batch["position"], np.arange(7 * step, 7 * step + 7))
    epoch = []
    for row in range(7):
      w, flip_w = identify(batch["pixels_w"][row])
      l, flip_l = identify(batch["pixels_l"][row])
      assert lines[w]["label"] == 1 and lines[l]["label"] == 0
      assert lines[l]["scene"] == lines[w]["scene"]
      prompt, value = lines[w]["prompt"], lines[w]["value"]
      ids = tokenizer([prompt, f"{value}, {prompt}"], padding="max_length", max_length=77,
                      truncation=True).input_ids
      np.testing.assert_array_equal(batch["prompt_ids"][row], ids[0])
      np.testing.assert_array_equal(batch["value_ids"][row], ids[1])
      epoch.append(w)
      flips += [flip_w, flip_l]
    # Every epoch visits each aligned image once, in its own order.
    assert sorted(epoch) == [i for i, l in enumerate(lines) if l["label"] == 1]
    epochs.append(epoch)
  assert len({tuple(e) for e in epochs}) > 1
  assert 0.25 < np.mean(flips) < 0.75   # 56 fair coins


def test_random_crop_takes_a_window_of_the_resized_image(source, tokenizer, raw, lines):
  it = iterator(source, tokenizer, center_crop=False, random_flip=False, global_batch=7)
  resized = {}
  for l in lines:
    image = Image.open(f"{raw}/{l['path']}").convert("RGB").resize((19, 16), Image.BILINEAR)
    resized[l["path"]] = np.asarray(image, np.float32) / np.float32(127.5) - np.float32(1)
  windows = {(p, left): x[:, left:left + R] for p, x in resized.items() for left in range(4)}
  offsets = set()
  for batch in batches(it, 4):
    for pixels in np.concatenate([batch["pixels_w"], batch["pixels_l"]]):
      hits = [key for key, x in windows.items() if np.abs(x - pixels).max() < 1e-5]
      assert len(hits) == 1
      offsets.add(hits[0][1])
  assert offsets == {0, 1, 2, 3}


def test_violating_draws_are_uniform_over_the_scene(source, tokenizer, lines, identify):
  it = iterator(source, tokenizer, random_flip=False, global_batch=20, seed=11)
  counts = {}
  for batch in batches(it, 30):
    for pixels_w, pixels_l in zip(batch["pixels_w"], batch["pixels_l"]):
      w, _ = identify(pixels_w)
      l, _ = identify(pixels_l)
      assert lines[l]["scene"] == lines[w]["scene"]
      counts.setdefault(lines[w]["scene"], {}).setdefault(l, 0)
      counts[lines[w]["scene"]][l] += 1
  # Each scene's violating images all appear, with chi-square under its 0.1% critical value.
  critical = {1: 0.0, 2: 10.83, 3: 13.82}
  for scene, by_image in counts.items():
    violating = [i for i, l in enumerate(lines) if l["scene"] == scene and l["label"] == 0]
    assert sorted(by_image) == violating
    observed = np.array(list(by_image.values()), np.float64)
    chi2 = ((observed - observed.mean()) ** 2 / observed.mean()).sum()
    assert chi2 <= critical[len(violating)], (scene, by_image)


def test_an_example_depends_only_on_seed_and_position(source, tokenizer):
  by_4 = concat(batches(iterator(source, tokenizer, global_batch=4, seed=5), 6))
  by_6 = concat(batches(iterator(source, tokenizer, global_batch=6, seed=5), 4))
  assert_batches_equal([by_4], [by_6])
  other = concat(batches(iterator(source, tokenizer, global_batch=6, seed=6), 4))
  assert not np.array_equal(other["pixels_w"], by_6["pixels_w"])


@pytest.mark.parametrize("process_count", [2, 4])
def test_processes_read_disjoint_blocks_of_the_global_batch(source, tokenizer, process_count):
  whole = batches(iterator(source, tokenizer, global_batch=8, seed=2), 3)
  parts = [batches(iterator(source, tokenizer, global_batch=8, seed=2, process_index=p,
                            process_count=process_count), 3) for p in range(process_count)]
  b = 8 // process_count
  for step in range(3):
    for p in range(process_count):
      np.testing.assert_array_equal(parts[p][step]["position"],
                                    8 * step + p * b + np.arange(b))
  assert_batches_equal(whole, [concat([parts[p][s] for p in range(process_count)])
                               for s in range(3)])


class CountingSource:
  """A source that counts the records read through it (aligned by index, others by id)."""

  def __init__(self, source):
    self.source = source
    self.read = []

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i):
    self.read.append(("aligned", i))
    return self.source[i]

  def record(self, record_id):
    self.read.append(("record", record_id))
    return self.source.record(record_id)

  def __getattr__(self, name):
    return getattr(self.source, name)


def test_a_process_reads_only_its_own_rows(source, tokenizer):
  counting = CountingSource(source)
  it = iterator(counting, tokenizer, global_batch=8, process_index=1, process_count=4,
                num_threads=0, prefetch=0)   # no read-ahead, to count exactly
  batches(it, 3)
  assert len(counting.read) == 3 * 2 * 2   # steps x local batch x (aligned, violating)


@pytest.mark.parametrize("process_index", [0, 1])
def test_set_state_resumes_the_stream_exactly(source, tokenizer, process_index):
  kwargs = dict(global_batch=4, seed=9, process_index=process_index, process_count=2)
  it = iterator(source, tokenizer, **kwargs)
  batches(it, 3)
  state = json.loads(json.dumps(it.get_state()))   # as a checkpoint stores it
  expected = batches(it, 4)
  resumed = iterator(source, tokenizer, **kwargs)
  batches(resumed, 1)   # wherever it is, set_state moves it
  resumed.set_state(state)
  assert_batches_equal(batches(resumed, 4), expected)


def test_moments_stream_makes_the_same_draws_as_pixels(source, tokenizer):
  moments = data.cache_moments(source, fixture.pool_encode, resolution=R, random_flip=True,
                               key="pool", log=quiet)
  from_moments = batches(iterator(source, tokenizer, seed=4, moments=moments), 5)
  from_pixels = batches(iterator(source, tokenizer, seed=4), 5)
  for m, p in zip(from_moments, from_pixels):
    assert sorted(m) == ["moments_l", "moments_w", "position", "prompt_ids", "value_ids"]
    assert m["moments_w"].shape == (4, R // 4, R // 4, 6) and m["moments_w"].dtype == np.float32
    for k in ("position", "prompt_ids", "value_ids"):
      np.testing.assert_array_equal(m[k], p[k])
    np.testing.assert_allclose(m["moments_w"], fixture.pool_encode(p["pixels_w"]), atol=1e-5)
    np.testing.assert_allclose(m["moments_l"], fixture.pool_encode(p["pixels_l"]), atol=1e-5)


def test_text_cache_adds_each_rows_prompt_states(source, tokenizer):
  from test_data import fake_text_encode  # pylint: disable=g-import-not-at-top
  text = data.cache_text_embeddings(source, fake_text_encode, key="chars", log=quiet)
  from_cache = batches(iterator(source, tokenizer, seed=4, text=text), 3)
  plain = batches(iterator(source, tokenizer, seed=4), 3)
  for c, p in zip(from_cache, plain):
    assert sorted(c) == sorted(list(p) + ["prompt_embeds"])
    for k in p:
      np.testing.assert_array_equal(c[k], p[k])
    assert c["prompt_embeds"].shape == (4, 77, 4) and c["prompt_embeds"].dtype == np.float32
    for ids, states in zip(c["prompt_ids"], c["prompt_embeds"]):   # each row's own prompt
      prompt, = [q for q in text.rows if (conditioning.tokenize(tokenizer, [q])[0] == ids).all()]
      np.testing.assert_array_equal(states, fake_text_encode([prompt])[0])


def test_bad_arguments(source, tokenizer):
  with pytest.raises(ValueError, match="global_batch 6 must be a positive multiple of "
                                       "process_count 4"):
    iterator(source, tokenizer, global_batch=6, process_count=4)
  with pytest.raises(ValueError, match=r"process_index 2 is not in \[0, 2\)"):
    iterator(source, tokenizer, process_index=2, process_count=2)
  plain_only = data.cache_moments(source, fixture.pool_encode, resolution=R, random_flip=False,
                                  key="pool-plain", log=quiet)
  with pytest.raises(ValueError, match="needs center_crop=True"):
    iterator(source, tokenizer, moments=plain_only, center_crop=False, random_flip=False)
  with pytest.raises(ValueError, match="made at resolution 16, not 32"):
    iterator(source, tokenizer, moments=plain_only, resolution=32, random_flip=False)
  with pytest.raises(ValueError, match="random_flip needs a latent cache made with random_flip"):
    iterator(source, tokenizer, moments=plain_only)
