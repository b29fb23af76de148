"""LiVO's conditioning format: the one place that knows how the value token joins the prompt.

The value encoder (a CLIP text model, initialised from SD's text encoder) reads
`"<value>, <prompt>"`; its pooled output is one extra token put in front of the frozen text
encoder's 77 hidden states of the prompt.

The rule, the same in training and sampling: a conditioning with a value is 78 tokens,
`[value_token, text_hidden(prompt padded to 77)]`, exactly what the released LiVO weights were
trained on. (The original samples with the prompt cut to 76 tokens instead, a length the value
token never saw in training; it did so only because classifier-free guidance batches cond with
uncond, and those must have one length.) Rows without a value token - the unconditional half of
guidance, the no-value draws of debiasing, the reference passes of the loss - keep their plain 77
tokens, padded with one token that attention masks out exactly (`context_lengths` = 77), so
they are plain SD and still share one UNet call with the 78-token rows.
"""

from typing import Sequence

import jax.numpy as jnp
import numpy as np

TEXT_TOKENS = 77                      # SD's text context
VALUE_TOKENS = TEXT_TOKENS + 1        # with the value token in front


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
  """The 78-token conditioning and each row's attended length.

  Args:
    text_hidden: [B, 77, D], the frozen text encoder's hidden states of the prompt.
    token: [B, 1, D], the value token.
    use_value: [B] bool: whether each row gets the value token.
  Returns:
    (context [B, 78, D], context_lengths [B] int32): rows with the value are
    `[token, text_hidden]` (length 78); rows without are `text_hidden` plus one masked token
    (length 77), i.e. plain SD.
  """
  with_value = value_context(text_hidden, token)
  without = jnp.concatenate([text_hidden, jnp.zeros_like(with_value[:, :1])], axis=1)
  use_value = jnp.asarray(use_value, bool)
  context = jnp.where(use_value[:, None, None], with_value, without)
  lengths = jnp.where(use_value, VALUE_TOKENS, TEXT_TOKENS).astype(jnp.int32)
  return context, lengths
