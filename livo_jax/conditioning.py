"""LiVO's conditioning format: the one place that knows how the value token joins the prompt.

The value encoder (a CLIP text model, initialised from SD's text encoder) reads
`"<value>, <prompt>"`; its pooled output is one extra token put in front of the frozen text
encoder's hidden states of the prompt (docs/method.md section 2).

Training always uses 78 tokens, `[value_token, text_hidden(prompt padded to 77)]`. Sampling
follows one of two `RULES`:

- "training" (the default): the same 78 tokens, the length the released value encoders were
  trained on. Rows without a value token (the unconditional half of guidance, the no-value draws
  of debiasing; the loss's reference passes too) keep their plain 77 tokens.
- "original": as the original LiVO samples, to reproduce its numbers. The prompt is cut to 76
  tokens without padding (n <= 76), so a row with the value token has 1 + n tokens, and its
  unconditional half is the negative prompt padded or cut to the same 1 + n tokens, without a
  value token. Rows without the value are plain SD (77 tokens in both halves).

Every row is laid out in one [B, 78, D] buffer, and the UNet's cross-attention attends to each
row's first `lengths[b]` tokens only and masks the rest exactly, so rows of any length share one
UNet call. Token ids are always [B, 77], padded past a row's real ids: the text encoder's causal
attention makes the states of the first k tokens those of the first k ids alone.
"""

from typing import NamedTuple, Sequence

import jax.numpy as jnp
import numpy as np

TEXT_TOKENS = 77                      # SD's text context
VALUE_TOKENS = TEXT_TOKENS + 1        # with the value token in front
RULES = ("training", "original")      # the sampling rules of the module docstring
ORIGINAL_PROMPT_TOKENS = TEXT_TOKENS - 1   # the original's cut, so that value + prompt <= 77


def value_prompt(value: str, prompt: str) -> str:
  """The value encoder's input text."""
  return f"{value}, {prompt}"


def tokenize(tokenizer, texts: Sequence[str]) -> np.ndarray:
  """Texts -> [B, 77] int32 ids, padded and truncated as SD's pipeline does."""
  if tokenizer.model_max_length != TEXT_TOKENS:
    raise ValueError(f"the tokenizer's model_max_length is {tokenizer.model_max_length}; "
                     f"SD conditioning needs {TEXT_TOKENS} (set it in tokenizer_config.json)")
  ids = tokenizer(list(texts), padding="max_length", max_length=TEXT_TOKENS, truncation=True,
                  return_tensors="np").input_ids
  return ids.astype(np.int32)


def value_token(value_encoder, value_ids):
  """The value encoder's pooled output as one token: [B, 77] ids -> [B, 1, D]."""
  _, pooled = value_encoder(value_ids)
  return pooled[:, None, :]


def value_context(text_hidden, token):
  """The conditioning with the value: `[token, text_hidden]`, [B, 78, D]."""
  return jnp.concatenate([token.astype(text_hidden.dtype), text_hidden], axis=1)


def with_value_token(text_hidden, token, use_value):
  """The value token in front of the rows that use it, in one buffer of 78 tokens.

  Args:
    text_hidden: [B, 77, D], the frozen text encoder's hidden states of the prompt.
    token: [B, 1, D], the value token.
    use_value: [B] bool: whether each row gets the value token.
  Returns:
    [B, 78, D]: rows with the value are `[token, text_hidden]`, rows without are `text_hidden`
    and one zero token; `GuidanceTokens` says how many of them each row attends to.
  """
  with_value = value_context(text_hidden, token)
  without = jnp.concatenate([text_hidden, jnp.zeros_like(with_value[:, :1])], axis=1)
  return jnp.where(jnp.asarray(use_value, bool)[:, None, None], with_value, without)


class GuidanceTokens(NamedTuple):
  """Both halves of classifier-free guidance as ids, and the context tokens each row attends to."""
  prompt_ids: np.ndarray       # [B, 77] int32, for the conditional rows
  negative_ids: np.ndarray     # [B, 77] int32, for the unconditional rows
  cond_lengths: np.ndarray     # [B] int32, of the conditional rows' `with_value_token` buffer
  uncond_lengths: np.ndarray   # [B] int32, of the unconditional rows'


def check_rule(rule: str) -> None:
  """ValueError naming `conditioning` unless `rule` is one of `RULES`."""
  if rule not in RULES:
    raise ValueError(f"conditioning={rule!r}: one of {', '.join(map(repr, RULES))}")


def guidance_tokens(tokenizer, prompts: Sequence[str], negative_prompts: Sequence[str],
                    use_value, rule: str = "training") -> GuidanceTokens:
  """The token ids and attended lengths of guidance under `rule` (one of `RULES`).

  "training": 78 tokens with the value token, 77 without and in every unconditional row.
  "original": with the value token, the prompt's ids cut to 76 unpadded (n of them) give 1 + n
  tokens, and the negative prompt is padded or cut to 1 + n ids; without it, 77 and 77.
  """
  check_rule(rule)
  use_value = np.asarray(use_value, bool)
  prompt_ids, negative_ids = tokenize(tokenizer, prompts), tokenize(tokenizer, negative_prompts)
  cond_lengths = np.where(use_value, VALUE_TOKENS, TEXT_TOKENS).astype(np.int32)
  uncond_lengths = np.full(len(prompts), TEXT_TOKENS, np.int32)
  if rule == "original":
    for row in np.flatnonzero(use_value):
      ids = tokenizer(prompts[row], max_length=ORIGINAL_PROMPT_TOKENS, truncation=True).input_ids
      length = 1 + len(ids)
      negative = tokenizer(negative_prompts[row], max_length=length, truncation=True,
                           padding="max_length").input_ids
      prompt_ids[row] = _padded(tokenizer, ids)
      negative_ids[row] = _padded(tokenizer, negative)
      cond_lengths[row] = uncond_lengths[row] = length
  return GuidanceTokens(prompt_ids, negative_ids, cond_lengths, uncond_lengths)


def _padded(tokenizer, ids: Sequence[int]) -> list[int]:
  """`ids` padded to 77 with the tokenizer's padding id."""
  return list(ids) + [tokenizer.pad_token_id] * (TEXT_TOKENS - len(ids))
