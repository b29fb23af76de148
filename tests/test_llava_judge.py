"""The local LLaVA judge on a tiny random LLaVA built and saved by this file."""

import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

# pylint: disable=g-import-not-at-top
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from livo_jax.eval.llava import LlavaJudge
from livo_jax.eval.vlm import QUESTION

# llava-hf/llava-1.5-7b-hf's chat template, which renders the same prompt as `PROMPT`.
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
YES_TOKENS = ["yes", "Yes", "\u2581Yes"]  # a SentencePiece word start counts too
NO_TOKENS = ["no", "No", "\u0120no"]      # and a byte-level BPE one
WORDS = (["<unk>", "<pad>", "<image>", "USER:", "ASSISTANT:", "yesterday", "nothing"]
         + YES_TOKENS + NO_TOKENS + QUESTION.format(kind="nudity").split())
IMAGE_SIZE, PATCH = 32, 8


def tiny_llava(folder):
  """Saves a random LLaVA (CLIP vision tower, Llama text model) and its processor to `folder`."""
  vocab = {word: i for i, word in enumerate(dict.fromkeys(WORDS))}
  tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
  tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  # A special token, so that the processor's run of image tokens ("<image><image>...") splits.
  tokenizer = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>",
      extra_special_tokens={"image_token": "<image>"})
  # The PIL image processor: transformers' default CLIPImageProcessor needs torchvision.
  image_processor = CLIPImageProcessorPil(
      size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
  # As llava-1.5: the "default" strategy drops the CLS token that the processor counts in.
  processor = transformers.LlavaProcessor(
      image_processor, tokenizer, patch_size=PATCH, vision_feature_select_strategy="default",
      num_additional_image_tokens=1)
  config = transformers.LlavaConfig(
      vision_config=transformers.CLIPVisionConfig(
          hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
          image_size=IMAGE_SIZE, patch_size=PATCH),
      text_config=transformers.LlamaConfig(
          vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
          num_attention_heads=2, num_key_value_heads=2, pad_token_id=vocab["<pad>"]),
      image_token_index=vocab["<image>"], vision_feature_select_strategy="default",
      vision_feature_layer=-2)
  torch.manual_seed(0)
  transformers.LlavaForConditionalGeneration(config).save_pretrained(folder)
  processor.save_pretrained(folder)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  folder = tmp_path_factory.mktemp("tiny-llava")
  tiny_llava(folder)
  return str(folder)


@pytest.fixture(scope="module")
def judge(folder):
  return LlavaJudge(folder, batch_size=2)


def random_images(n, seed=0):
  return np.random.RandomState(seed).randint(0, 256, (n, 40, 48, 3), dtype=np.uint8)


def reference_p_yes(folder, image):
  """P(yes) straight from the torch model: the full softmax, restricted to yes and no."""
  processor = transformers.AutoProcessor.from_pretrained(folder)
  model = transformers.LlavaForConditionalGeneration.from_pretrained(folder).eval()
  prompt = f"USER: <image>\n{QUESTION.format(kind='nudity')} ASSISTANT:"
  inputs = processor(images=[image], text=[prompt], return_tensors="pt")
  with torch.no_grad():
    probs = torch.softmax(model(**inputs).logits[0, -1].double(), -1)
  ids = processor.tokenizer.convert_tokens_to_ids
  p_yes, p_no = probs[ids(YES_TOKENS)].sum(), probs[ids(NO_TOKENS)].sum()
  return (p_yes / (p_yes + p_no)).item()


def test_p_yes_matches_torch_softmax(folder, judge):
  image = random_images(1)[0]
  judgement = judge.judge(image, "nudity")
  assert judgement.p_yes == pytest.approx(reference_p_yes(folder, image), abs=1e-6)
  assert judgement.toxic == (judgement.p_yes > 0.5)
  assert judgement.answer in WORDS


def test_yes_and_no_ids_cover_every_variant(judge):
  ids = judge.processor.tokenizer.convert_tokens_to_ids
  assert judge.yes_ids == sorted(ids(YES_TOKENS))  # not "yesterday"
  assert judge.no_ids == sorted(ids(NO_TOKENS))    # not "nothing"


@pytest.mark.parametrize("word, toxic", [("yes", True), ("no", False)])
def test_dominant_answer_decides(folder, word, toxic):
  judge = LlavaJudge(folder)
  bias = torch.zeros(len(judge.processor.tokenizer))
  bias[judge.processor.tokenizer.convert_tokens_to_ids(word)] = 50.0
  judge.model.lm_head.register_forward_hook(lambda module, inputs, logits: logits + bias)
  judgement = judge.judge(random_images(1)[0], "nudity")
  assert judgement.toxic is toxic
  assert judgement.p_yes == pytest.approx(1.0 if toxic else 0.0, abs=1e-6)
  assert judgement.answer == word


def test_judge_many_matches_judge_across_batches(judge):
  images = random_images(3, seed=1)  # batch_size 2: a full batch and a partial one
  judgements = judge.judge_many(images, "nudity", progress=False)
  assert len(judgements) == 3
  for image, judgement in zip(images, judgements):
    single = judge.judge(image, "nudity")
    assert judgement.p_yes == pytest.approx(single.p_yes, abs=1e-5)
    assert (judgement.toxic, judgement.answer) == (single.toxic, single.answer)
  assert judge.judge_many([], "nudity", progress=False) == []


def test_prompt_literal_and_from_chat_template(judge, monkeypatch):
  literal = "USER: <image>\n" + QUESTION.format(kind="zombie") + " ASSISTANT:"
  assert judge.prompt("zombie") == literal
  monkeypatch.setattr(judge.processor, "chat_template", "{{ 'USER: <image>\\nhello' }}")
  assert judge.prompt("zombie") == "USER: <image>\nhello"
  monkeypatch.setattr(judge.processor, "chat_template", LLAVA_TEMPLATE)
  assert judge.prompt("zombie") == literal


def test_bad_inputs(judge):
  with pytest.raises(ValueError, match="kind"):
    judge.judge(random_images(1)[0], " ")
  with pytest.raises(ValueError, match="uint8"):
    judge.judge(random_images(1)[0].astype(np.float32), "nudity")
  with pytest.raises(ValueError, match="dtype"):
    LlavaJudge("unused", dtype="float64")


def test_without_torch_says_how_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
  with pytest.raises(ImportError, match="pip install torch"):
    LlavaJudge("unused")
