"""The token-conditioned flow-matching DiT (docs/method.md) and its alignment heads.

Blocks are stacked along a leading layer axis and run with `jax.lax.scan`, so compile time is flat
in depth. Every block takes an ablation gate g_ℓ from the caller: g = 1 is the normal model and
g_ℓ = 0 makes block ℓ exactly the identity, which is what FoG-A measures.
"""

import dataclasses
import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from agrepa_jax import ops, sharding

HiddenOutput = Literal['none', 'utterance', 'frame']
REMAT_POLICIES = {
  'none': None,
  'full': jax.checkpoint_policies.nothing_saveable,
  'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
DROPOUT_RNGS = ('threefry', 'rbg', 'hash')


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  num_layers: int = 24
  width: int = 1024
  num_heads: int = 16
  mlp_ratio: int = 4
  dropout: float = 0.2
  n_mels: int = 100
  token_dim: int = 1024
  vocab_size: int = 4096
  num_codebooks: int = 1
  num_domains: int = 2
  time_freq_dim: int = 256
  remat: str = 'none'  # a key of REMAT_POLICIES
  dtype: str = 'float32'  # activation dtype; parameters stay float32
  attention: str = ''  # jax.nn.dot_product_attention implementation: '' (XLA picks), xla, cudnn
  # Forms that differ from the paper's official code (docs/fidelity.md); the first choice is ours.
  token_tables: str = 'per_domain'  # shared | per_domain: one embedding table per domain
  codebook_fusion: str = 'merge'  # merge | concat: the official dual-codebook conditioning
  second_vocab_size: int = 0  # codebook 2 (official: 1024 BEATs labels); 0 = vocab_size
  time_embedding: str = 'dit'  # dit | official
  dropout_positions: str = 'branch'  # branch | official
  modulation_init: str = 'xavier'  # xavier | normal: N(0, 0.02), the official
  bitc_form: str = 'affine'  # affine | official: LayerNorm without affine, Linear without bias
  frozen_token_conditioning: bool = False  # reference quirk: tables and projections never train
  dropout_rng: str = 'threefry'  # a key of DROPOUT_RNGS
  scan_unroll: bool = False  # unroll the depth scan (CPU: no stacked buffers; compile time ∝ L)

  def __post_init__(self):
    for name, choices in FORM_CHOICES.items():
      if getattr(self, name) not in choices:
        key = 'bitc.form' if name == 'bitc_form' else f'model.{name}'
        raise ValueError(f'{key}={getattr(self, name)!r}: expected one of {choices}')
    if self.codebook_fusion == 'concat' and self.num_codebooks != 2:
      raise ValueError(
        f"model.codebook_fusion='concat' needs model.num_codebooks=2, got {self.num_codebooks}"
      )

  @classmethod
  def from_config(cls, config) -> 'ModelConfig':
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in config.items() if k in fields})

  @property
  def vocab_sizes(self) -> tuple[int, ...]:
    """Vocabulary of each codebook."""
    second = self.second_vocab_size or self.vocab_size
    return (self.vocab_size, second)[: self.num_codebooks]


FORM_CHOICES = {
  'token_tables': ('shared', 'per_domain'),
  'codebook_fusion': ('merge', 'concat'),
  'time_embedding': ('dit', 'official'),
  'dropout_positions': ('branch', 'official'),
  'modulation_init': ('xavier', 'normal'),
  'bitc_form': ('affine', 'official'),
}


class Frozen(nnx.Variable):
  """A model variable the optimizer never touches: no gradient and no weight decay."""


def freeze(module: nnx.Module) -> None:
  """Turns every nnx.Param of `module` (and its submodules) into a Frozen variable, in place."""
  for _, child in nnx.iter_modules(module):
    for name, value in list(vars(child).items()):
      if isinstance(value, nnx.Param):
        setattr(child, name, Frozen(value[...]))


def sinusoidal_features(positions: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """(...,) -> (..., dim) sin/cos features with geometrically spaced frequencies."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  angles = positions[..., None].astype(jnp.float32) * freqs
  return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def interpolate_linear(x: jax.Array, length: int) -> jax.Array:
  """Linear resampling of (B, N, C) along N to `length`, half-pixel centers (align_corners off)."""
  n = x.shape[1]
  source = jnp.clip((jnp.arange(length) + 0.5) * (n / length) - 0.5, 0.0, n - 1)
  lower = jnp.floor(source).astype(jnp.int32)
  upper = jnp.minimum(lower + 1, n - 1)
  frac = (source - lower)[None, :, None].astype(x.dtype)
  return x[:, lower] * (1 - frac) + x[:, upper] * frac


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-6) -> jax.Array:
  return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), eps)


def dropout(x: jax.Array, rate: float, key: jax.Array | None, rng: str = 'threefry') -> jax.Array:
  """Inverted dropout; `key=None` means evaluation mode. rng 'hash': masks from `hash_bits`."""
  if key is None or rate == 0.0:
    return x
  if rng == 'hash':
    threshold = np.uint32(min(round(rate * 2.0**32), 2**32 - 1))
    keep = hash_bits(key, x.shape) >= threshold
  else:
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def _mix32(x: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finalizer: a bijection of uint32 that mixes every bit into every bit."""
  x = x ^ (x >> 16)
  x = x * np.uint32(0x85EBCA6B)
  x = x ^ (x >> 13)
  x = x * np.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


def hash_bits(key: jax.Array, shape) -> jax.Array:
  """Uniform uint32 of `shape`: a keyed hash of each element's index (model.dropout_rng='hash').

  Two 32-bit seeds come from `key`; the rest is elementwise integer arithmetic that XLA fuses
  into the consumer, where jax.random's bits on CPU run Threefry's rounds as a loop over
  materialized arrays (or expand RngBitGenerator), several passes over memory per mask.
  """
  seeds = jax.random.bits(key, (2,), jnp.uint32)
  index = jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
  return _mix32(_mix32(index ^ seeds[0]) + seeds[1])


def valid_mask(lengths: jax.Array, num_frames: int) -> jax.Array:
  """(B,) valid-frame counts -> (B, T) bool, True on each clip's first `lengths` frames."""
  return jnp.arange(num_frames)[None, :] < lengths[:, None]


def masked_mean(x: jax.Array, mask: jax.Array | None) -> jax.Array:
  """Mean of (B, T, ...) over the frames where the (B, T) `mask` is True (all frames if None).

  Accumulates in float32; a clip without a valid frame gives zeros.
  """
  if mask is None:
    return x.mean(1)
  weights = mask.astype(jnp.float32).reshape(*mask.shape, *(1,) * (x.ndim - 2))
  total = (x.astype(jnp.float32) * weights).sum(1)
  return (total / jnp.maximum(weights.sum(1), 1.0)).astype(x.dtype)


def attention(q, k, v, lengths: jax.Array | None, implementation: str = '') -> jax.Array:
  """Self-attention over (B, T, heads, head_dim); keys past a clip's `lengths` (B,) are masked.

  implementation '' chooses: the key-padding form runs as cuDNN flash attention on GPU in half
  precision, XLA elsewhere; 'xla' or 'cudnn' force one (model.attention). On CPU the XLA form
  masks through `key_padding_bias`.
  Queries on padding frames still get an output; nothing downstream reads it.
  """
  if lengths is not None:
    lengths = jnp.maximum(lengths, 1).astype(jnp.int32)  # a fully padded clip: no empty softmax
  if not implementation:
    half = q.dtype in (jnp.bfloat16, jnp.float16)
    implementation = 'cudnn' if half and jax.default_backend() == 'gpu' else 'xla'
  if lengths is not None and implementation == 'xla' and jax.default_backend() == 'cpu':
    bias = key_padding_bias(lengths, k.shape[1], q.dtype)
    return jax.nn.dot_product_attention(q, k, v, bias=bias, implementation='xla')
  return jax.nn.dot_product_attention(
    q, k, v, key_value_seq_lengths=lengths, implementation=implementation
  )


# Added to the logits of padding keys: its exp, at any softmax scale, is exactly 0 in float32.
PADDING_LOGIT = -1e9


def key_padding_bias(lengths: jax.Array, num_keys: int, dtype) -> jax.Array:
  """(B,) valid lengths -> (B, 1, 1, num_keys) logit bias: 0 on a clip's keys, PADDING_LOGIT past.

  The same probabilities as masking the logits with `key_value_seq_lengths`, but XLA:CPU keeps the
  logits' dot, the bias and the softmax in one fusion; the mask's select in between splits it and
  writes the logits and their masked copy, two more (B, H, T, T) arrays per attention.
  """
  valid = valid_mask(lengths, num_keys)
  return jnp.where(valid, 0.0, PADDING_LOGIT)[:, None, None, :].astype(dtype)


def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """LayerNorm without affine parameters (the adaLN modulation supplies scale and shift).

  Statistics are taken in float32 whatever the activation dtype.
  """
  x32 = x.astype(jnp.float32)
  mean = x32.mean(-1, keepdims=True)
  var = jnp.square(x32 - mean).mean(-1, keepdims=True)
  return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def axes(*names) -> dict:
  """Parameter metadata: logical axis `names`, which the config's mesh.rules map to mesh axes."""
  return {'out_sharding': names, 'eager_sharding': False}


def _dense(n_in, n_out, rngs, names, *, zero=False, dtype=None, kernel_init=None):
  """Linear n_in → n_out; `names` = the kernel's logical axes (in, out), the bias has (out,)."""
  init = nnx.initializers.zeros_init() if zero else nnx.initializers.xavier_uniform()
  return nnx.Linear(
    n_in,
    n_out,
    kernel_init=kernel_init or init,
    kernel_metadata=axes(*names),
    bias_metadata=axes(names[1]),
    dtype=dtype,
    rngs=rngs,
  )


def attention_with_probability_dropout(
  q, k, v, rate: float, key: jax.Array, lengths: jax.Array | None = None, rng: str = 'threefry'
) -> jax.Array:
  """Multi-head attention of (B, T, H, D) heads -> (B, T, H, D), dropout on the probabilities.

  The official dropout position; it materializes the (B, H, T, T) probabilities. Keys past a
  clip's `lengths` (B,) are masked, as in `attention`. The backward pass is written out
  (`_probability_dropout_attention_backward`): it keeps the probabilities alone of the (B, H, T, T)
  arrays and draws the dropout mask again, where autodiff keeps the probabilities, the mask and
  the dropped probabilities, and it needs three (B, H, T, T) temporaries where autodiff needs more.
  """
  keys_valid = None if lengths is None else valid_mask(jnp.maximum(lengths, 1), k.shape[1])
  return _probability_dropout_attention(rate, rng, q, k, v, key, keys_valid)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _probability_dropout_attention(rate, rng, q, k, v, key, keys_valid):
  return _probability_dropout_attention_forward(rate, rng, q, k, v, key, keys_valid)[0]


def _probability_dropout_attention_forward(rate, rng, q, k, v, key, keys_valid):
  q, k, v = (a.transpose(0, 2, 1, 3) for a in (q, k, v))  # (B, H, T, D)
  logits = jnp.einsum('bhqd,bhkd->bhqk', q, k).astype(jnp.float32) / math.sqrt(q.shape[-1])
  if keys_valid is not None:
    logits = jnp.where(keys_valid[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(q.dtype)
  out = jnp.einsum('bhqk,bhkd->bhqd', dropout(probs, rate, key, rng), v)
  return out.transpose(0, 2, 1, 3), (q, k, v, key, keys_valid, probs, out)


def _probability_dropout_attention_backward(rate, rng, residuals, d_out):
  """Dropout is linear given its mask, so the gradient flows back through the same `dropout`.

  The softmax gradient P ∘ (dP − rowsum(dP ∘ P)) takes its row sums as rowsum(dO ∘ O), which
  equals rowsum(dP ∘ P) through the dropout and P·V, and needs no (B, H, T, T) product.
  """
  q, k, v, key, keys_valid, probs, out = residuals
  d_out = d_out.transpose(0, 2, 1, 3)
  # The barrier ties the recomputed mask to d_out: without it XLA merges it with the forward's or
  # schedules it early, either way keeping every layer's (B, H, T, T) arrays alive at once.
  probs, key, d_out = jax.lax.optimization_barrier((probs, key, d_out))
  d_v = jnp.einsum('bhqk,bhqd->bhkd', dropout(probs, rate, key, rng), d_out)
  d_probs = dropout(jnp.einsum('bhqd,bhkd->bhqk', d_out, v), rate, key, rng)
  row_sums = (d_out.astype(jnp.float32) * out.astype(jnp.float32)).sum(-1, keepdims=True)
  d_logits = probs.astype(jnp.float32) * (d_probs.astype(jnp.float32) - row_sums)
  d_logits = (d_logits / math.sqrt(q.shape[-1])).astype(q.dtype)
  d_q = jnp.einsum('bhqk,bhkd->bhqd', d_logits, k)
  d_k = jnp.einsum('bhqk,bhqd->bhkd', d_logits, q)
  return *(a.transpose(0, 2, 1, 3) for a in (d_q, d_k, d_v)), None, None


_probability_dropout_attention.defvjp(
  _probability_dropout_attention_forward, _probability_dropout_attention_backward
)


class DiTBlock(nnx.Module):
  """adaLN-conditioned transformer block; attention output and last MLP linear start at zero.

  Dropout sits on the attention and MLP branch outputs ('branch'), or, as in the official code, on
  the attention probabilities, after the GELU and after the MLP ('official').
  """

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d, dtype = cfg.width, jnp.dtype(cfg.dtype)
    self.cfg = cfg
    modulation_init = nnx.initializers.normal(0.02) if cfg.modulation_init == 'normal' else None
    self.modulation = _dense(
      d, 6 * d, rngs, ('embed', 'modulation'), dtype=dtype, kernel_init=modulation_init
    )
    self.qkv = _dense(d, 3 * d, rngs, ('embed', 'heads'), dtype=dtype)
    self.attn_out = _dense(d, d, rngs, ('heads', 'embed'), zero=True, dtype=dtype)
    self.mlp_in = _dense(d, cfg.mlp_ratio * d, rngs, ('embed', 'mlp'), dtype=dtype)
    self.mlp_out = _dense(cfg.mlp_ratio * d, d, rngs, ('mlp', 'embed'), zero=True, dtype=dtype)

  def __call__(self, h, time_emb, gate, dropout_key=None, lengths=None):
    """h (B, T, width) -> same; `lengths` (B,): valid frames, the keys attention may read."""
    cfg = self.cfg
    official = cfg.dropout_positions == 'official'
    keys = (None,) * 3 if dropout_key is None else tuple(jax.random.split(dropout_key, 3))
    shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(
      self.modulation(jax.nn.silu(time_emb))[:, None, :].astype(h.dtype), 6, axis=-1
    )

    x = layer_norm(h) * (1 + scale1) + shift1
    q, k, v = jnp.split(self.qkv(x), 3, axis=-1)
    heads = lambda a: a.reshape(*a.shape[:2], cfg.num_heads, -1)
    if official and keys[0] is not None and cfg.dropout > 0:
      attn = attention_with_probability_dropout(
        heads(q), heads(k), heads(v), cfg.dropout, keys[0], lengths, cfg.dropout_rng
      )
    else:
      attn = attention(heads(q), heads(k), heads(v), lengths, cfg.attention)
    attn = self.attn_out(attn.reshape(h.shape))
    if not official:
      attn = dropout(attn, cfg.dropout, keys[0], cfg.dropout_rng)
    h = h + gate * gate1 * attn

    x = layer_norm(h) * (1 + scale2) + shift2
    # The elementwise work after mlp_in runs again in the backward pass, where autodiff would keep
    # its intermediates: two more (B, T, mlp_ratio·width) arrays per block, and the masks.
    mlp = jax.checkpoint(self.mlp_tail)(self.mlp_in(x), (keys[2], keys[1]))
    return h + gate * gate2 * mlp

  def mlp_tail(self, pre_activation, dropout_keys):
    """The MLP branch after its first projection: GELU, (dropout), mlp_out, dropout; the keys of
    the two dropouts in that order."""
    cfg = self.cfg
    hidden_key, out_key = dropout_keys
    hidden = ops.gelu(pre_activation)
    if cfg.dropout_positions == 'official':
      hidden = dropout(hidden, cfg.dropout, hidden_key, cfg.dropout_rng)
    return dropout(self.mlp_out(hidden), cfg.dropout, out_key, cfg.dropout_rng)


@nnx.vmap(in_axes=(None, 0), out_axes=0, transform_metadata={nnx.PARTITION_NAME: 'layers'})
def _stacked_blocks(cfg, rngs):
  return DiTBlock(cfg, rngs)


class TokenEncoder(nnx.Module):
  """Tokens (B, K, N) -> per-frame conditioning e (B, T, token_dim), L2-normalized per frame.

  Each codebook has its own embedding table, one per domain with `token_tables='per_domain'`
  (stored as one (domains·vocab, token_dim) table). The clip's domain d picks the projection P_d.
  codebook_fusion 'merge': every stream is projected by P_d (token_dim → token_dim), interpolated
  to T frames, and the streams are concatenated and merged by a shared Linear. 'concat' (the
  official dual codebook): the two embeddings are concatenated at the token rate and projected by
  P_d (2·token_dim → token_dim, no bias) before interpolation; the second stream's table is shared
  by the domains (it holds one tokenizer's labels for all audio).
  """

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    dt = cfg.token_dim
    self.embeddings = nnx.List(
      [
        nnx.Embed(
          self.num_tables(k) * vocab, dt, embedding_metadata=axes('vocab', 'embed'), rngs=rngs
        )
        for k, vocab in enumerate(cfg.vocab_sizes)
      ]
    )
    concat = cfg.codebook_fusion == 'concat'
    proj_init = nnx.initializers.xavier_uniform(batch_axis=0)
    if cfg.frozen_token_conditioning and not concat:
      proj_init = lambda key, shape, dtype: jnp.broadcast_to(jnp.eye(shape[-1], dtype=dtype), shape)
    proj_in = cfg.num_codebooks * dt if concat else dt
    self.domain_projection = nnx.Param(
      proj_init(rngs.params(), (cfg.num_domains, proj_in, dt), jnp.float32),
      **axes('domains', 'embed', 'hidden'),
    )
    merges = cfg.num_codebooks > 1 and not concat
    self.merge = (
      _dense(cfg.num_codebooks * dt, dt, rngs, ('codebooks', 'embed')) if merges else None
    )
    if cfg.frozen_token_conditioning:
      freeze(self)

  def num_tables(self, codebook: int) -> int:
    """Tables of a codebook: one per domain, or one for all."""
    shared_second = self.cfg.codebook_fusion == 'concat' and codebook == 1
    per_domain = self.cfg.token_tables == 'per_domain' and not shared_second
    return self.cfg.num_domains if per_domain else 1

  def embed(self, tokens, domain):
    """(B, K, N) tokens -> K embedded streams (B, N, token_dim), each from its clip's table."""
    streams = []
    for k, (table, vocab) in enumerate(zip(self.embeddings, self.cfg.vocab_sizes)):
      offset = domain[:, None] * vocab if self.num_tables(k) > 1 else 0
      streams.append(table(tokens[:, k] + offset))
    return streams

  def __call__(self, tokens, domain, num_frames):
    # Every clip through every P_d, then the clip's own: cheap at the token rate, and it never
    # materializes a (B, dt, dt) gather of the projections.
    in_domain = jax.nn.one_hot(domain, self.cfg.num_domains, dtype=jnp.float32)
    project = lambda x: jnp.einsum(
      'bkne,bk->bne', jnp.einsum('bnd,kde->bkne', x, self.domain_projection[...]), in_domain
    )
    streams = self.embed(tokens, domain)
    if self.cfg.codebook_fusion == 'concat':
      return l2_normalize(interpolate_linear(project(jnp.concatenate(streams, -1)), num_frames))
    streams = [interpolate_linear(project(x), num_frames) for x in streams]
    e = self.merge(jnp.concatenate(streams, -1)) if self.merge is not None else streams[0]
    return l2_normalize(e)


class DiT(nnx.Module):
  """v_θ(x_t, t, tokens, m_ref; g): the velocity field, plus per-layer hidden states on request."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    d = cfg.width
    self.token_encoder = TokenEncoder(cfg, rngs)
    self.input_projection = _dense(2 * cfg.n_mels + cfg.token_dim, d, rngs, ('inputs', 'embed'))
    # dit: features of 1000·t, MLP time_freq_dim → d → d; official: of t, MLP d → 4d → d.
    official_time = cfg.time_embedding == 'official'
    time_in, time_hidden = (d, 4 * d) if official_time else (cfg.time_freq_dim, d)
    self.time_mlp_in = _dense(time_in, time_hidden, rngs, ('time_freq', 'embed'))
    self.time_mlp_out = _dense(time_hidden, d, rngs, ('hidden', 'embed'))
    self.blocks = _stacked_blocks(
      cfg, nnx.Rngs(params=jax.random.split(rngs.params(), cfg.num_layers))
    )
    self.output_norm = nnx.LayerNorm(
      d, scale_metadata=axes('embed'), bias_metadata=axes('embed'), rngs=rngs
    )
    self.output_projection = _dense(d, cfg.n_mels, rngs, ('embed', 'mels'))

  def __call__(
    self,
    x_t,
    t,
    tokens,
    ref_mel,
    domain,
    *,
    token_keep=None,
    gates=None,
    dropout_key=None,
    hidden: HiddenOutput = 'none',
    lengths=None,
  ):
    """Returns (velocity (B, T, n_mels), extras).

    token_keep: (B,) 0/1, 0 drops a clip's tokens (classifier-free guidance); default keeps all.
    gates: (L,) ablation gates, default all ones.
    lengths: (B,) frames holding audio, a prefix of T (losses.frame_mask); default all T. Padding
      frames are masked out of attention and of the time-pooled hidden states.
    extras: 'token_embedding' e (B, T, token_dim) before token dropout, and 'hidden' —
      per-layer block outputs, time-pooled over valid frames (L, B, width) or per frame
      (L, B, T, width).
    """
    cfg = self.cfg
    h, time_emb, e = self.embed_inputs(x_t, t, tokens, ref_mel, domain, token_keep)
    gates = jnp.ones((cfg.num_layers,), h.dtype) if gates is None else gates.astype(h.dtype)
    h, per_layer = run_blocks(
      self.blocks,
      h,
      time_emb,
      gates,
      self.layer_keys(dropout_key),
      hidden,
      cfg.remat,
      lengths,
      unroll=cfg.scan_unroll,
    )
    return self.output(h), {'token_embedding': e, 'hidden': per_layer}

  def layer_keys(self, dropout_key):
    """Per-block dropout keys (L,) in the `dropout_rng` implementation, or None in evaluation."""
    if dropout_key is None:
      return None
    return jax.random.split(dropout_rng_key(dropout_key, self.cfg.dropout_rng), self.cfg.num_layers)

  def embed_inputs(self, x_t, t, tokens, ref_mel, domain, token_keep=None):
    """The blocks' input h0 (B, T, width), time embedding (B, width) and e before token dropout."""
    cfg = self.cfg
    frames = x_t.shape[1]
    x_t, t, ref_mel = (sharding.constrain_batch(a) for a in (x_t, t, ref_mel))
    e = sharding.constrain_batch(self.token_encoder(tokens, domain, frames))
    e_in = e if token_keep is None else e * token_keep[:, None, None].astype(e.dtype)
    h = self.input_projection(jnp.concatenate([x_t, e_in, ref_mel], -1))
    h = (h + sinusoidal_features(jnp.arange(frames), cfg.width)).astype(jnp.dtype(cfg.dtype))
    return sharding.constrain_batch(h), sharding.constrain_batch(self.time_embedding(t)), e

  def time_embedding(self, t):
    """(B,) flow times in [0, 1] -> (B, width)."""
    if self.cfg.time_embedding == 'official':
      features = sinusoidal_features(t, self.cfg.width)
    else:
      features = sinusoidal_features(1000.0 * t, self.cfg.time_freq_dim)
    hidden = sharding.constrain_batch(self.time_mlp_in(features))
    return self.time_mlp_out(jax.nn.silu(hidden))

  def output(self, h):
    """Last block's output (B, T, width) -> velocity (B, T, n_mels)."""
    return self.output_projection(self.output_norm(h.astype(jnp.float32)))


def dropout_rng_key(key: jax.Array, impl: str) -> jax.Array:
  """`key` as a key of PRNG implementation `impl` (rbg: derived from its bits, deterministic)."""
  if impl not in DROPOUT_RNGS:
    raise ValueError(f'model.dropout_rng={impl!r}: expected one of {DROPOUT_RNGS}')
  if impl in ('threefry', 'hash'):
    return key
  return jax.random.wrap_key_data(jax.random.bits(key, (4,), jnp.uint32), impl='rbg')


def run_blocks(
  blocks: DiTBlock,
  h,
  time_emb,
  gates,
  layer_keys,
  hidden: HiddenOutput,
  remat: str,
  lengths=None,
  unroll: bool = False,
):
  """Scans the stacked blocks over depth, emitting what `hidden` asks for at every layer.

  lengths: (B,) valid frames (None: all); 'utterance' pools each layer over them only.
  unroll: unroll the scan (model.scan_unroll), so no per-layer output is stacked into a buffer.
  """
  graphdef, state = nnx.split(blocks)
  mask = None if lengths is None else valid_mask(lengths, h.shape[1])

  def body(h, layer):
    block_state, gate, key = layer
    h = nnx.merge(graphdef, block_state)(h, time_emb, gate, key, lengths)
    h = sharding.constrain_batch(h)
    out = {'none': None, 'utterance': masked_mean(h, mask), 'frame': h}[hidden]
    out = None if out is None else sharding.constrain_batch(out)
    return h, out

  if remat not in REMAT_POLICIES:
    raise ValueError(f'model.remat={remat!r}: expected one of {sorted(REMAT_POLICIES)}')
  if remat != 'none':
    body = jax.checkpoint(body, policy=REMAT_POLICIES[remat])
  return jax.lax.scan(body, h, (state, gates, layer_keys), unroll=unroll)


class RepaHeads(nnx.Module):
  """Per (layer, domain) MLP width → width → GELU → C_d applied to L2-normalized hidden states.

  Only the layers in `layers[d]` (0-based, ascending) have a head for domain d: those a selection
  can pick. Each domain's heads are stacked in that order.
  """

  def __init__(
    self,
    num_layers: int,
    width: int,
    teacher_dims: tuple[int, ...],
    rngs: nnx.Rngs,
    layers: tuple[tuple[int, ...], ...] | None = None,
  ):
    if layers is None:
      layers = tuple(tuple(range(num_layers)) for _ in teacher_dims)
    self.num_layers = num_layers
    self.layers = tuple(tuple(sorted(set(map(int, chosen)))) for chosen in layers)

    def stacked(n_out, count):
      @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: 'layers'})
      def make(rngs):
        return RepaMLP(width, n_out, rngs)

      key = rngs.params()  # drawn for every domain, so later modules' draws never depend on it
      return make(nnx.Rngs(params=jax.random.split(key, count))) if count else None

    self.per_domain = nnx.List(
      [stacked(dim, len(chosen)) for dim, chosen in zip(teacher_dims, self.layers)]
    )

  def has_head(self) -> np.ndarray:
    """(num_layers, domains) bool: which (layer, domain) pairs have a head."""
    table = np.zeros((self.num_layers, len(self.layers)), bool)
    for d, chosen in enumerate(self.layers):
      table[list(chosen), d] = True
    return table

  def __call__(self, domain_index: int, z, layers=None):
    """z: (K, B, [T,] width) states of the 0-based `layers` (K,) -> (K, B, [T,] C_d).

    `layers` may be traced; each must have a head for this domain. Without `layers`, z holds every
    head layer of the domain, in `self.layers[domain_index]` order.
    """
    graphdef, state = nnx.split(self.per_domain[domain_index])
    if layers is not None:
      slot_of_layer = np.zeros((self.num_layers,), np.int32)
      slot_of_layer[list(self.layers[domain_index])] = np.arange(len(self.layers[domain_index]))
      slots = jnp.asarray(slot_of_layer)[layers]
      state = jax.tree.map(lambda p: p[slots], state)
    # layer by layer, so FSDP gathers one head's weights at a time (as the depth scan does)
    return jax.lax.map(lambda layer: nnx.merge(graphdef, layer[0])(layer[1]), (state, z))


class RepaMLP(nnx.Module):
  def __init__(self, width, n_out, rngs):
    self.hidden = _dense(width, width, rngs, ('embed', 'hidden'))
    self.out = _dense(width, n_out, rngs, ('hidden', 'teacher'))

  def __call__(self, z):
    hidden = ops.gelu(self.hidden(l2_normalize(sharding.constrain_batch(z))))
    return sharding.constrain_batch(self.out(sharding.constrain_batch(hidden)))


class BitcHeads(nnx.Module):
  """Input-side alignment heads: LayerNorm → Linear (orthogonal init) from mean_t e to C_d.

  official: LayerNorm without affine parameters (ε = 1e-5) and Linear without bias.
  """

  def __init__(
    self, token_dim: int, teacher_dims: tuple[int, ...], rngs: nnx.Rngs, official: bool = False
  ):
    norm = dict(use_scale=False, use_bias=False, epsilon=1e-5) if official else {}
    self.norms = nnx.List(
      [
        nnx.LayerNorm(
          token_dim, **norm, scale_metadata=axes('embed'), bias_metadata=axes('embed'), rngs=rngs
        )
        for _ in teacher_dims
      ]
    )
    self.projections = nnx.List(
      [
        nnx.Linear(
          token_dim,
          dim,
          use_bias=not official,
          kernel_init=nnx.initializers.orthogonal(),
          kernel_metadata=axes('embed', 'teacher'),
          bias_metadata=axes('teacher'),
          rngs=rngs,
        )
        for dim in teacher_dims
      ]
    )

  def __call__(self, domain_index: int, pooled_e):
    pooled_e = sharding.constrain_batch(pooled_e)
    projected = self.projections[domain_index](self.norms[domain_index](pooled_e))
    return sharding.constrain_batch(projected)


class AgRepaModel(nnx.Module):
  """Everything that trains: the DiT backbone and the alignment heads (counted apart)."""

  def __init__(
    self,
    cfg: ModelConfig,
    teacher_dims: tuple[int, ...],
    rngs: nnx.Rngs,
    repa_layers: tuple[tuple[int, ...], ...] | None = None,
  ):
    """repa_layers: per domain, the 0-based layers that get a REPA head (default: every layer)."""
    self.backbone = DiT(cfg, rngs)
    self.repa_heads = RepaHeads(cfg.num_layers, cfg.width, teacher_dims, rngs, repa_layers)
    self.bitc_heads = BitcHeads(
      cfg.token_dim, teacher_dims, rngs, official=cfg.bitc_form == 'official'
    )


def count_params(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
