"""The token-conditioned flow-matching DiT (docs/method.md) and its alignment heads.

Blocks are stacked along a leading layer axis and run with `jax.lax.scan`, so compile time is flat
in depth. Every block takes an ablation gate g_ℓ from the caller: g = 1 is the normal model and
g_ℓ = 0 makes block ℓ exactly the identity, which is what FoG-A measures.
"""

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from agrepa_jax import sharding

HiddenOutput = Literal['none', 'utterance', 'frame']
REMAT_POLICIES = {
  'none': None,
  'full': jax.checkpoint_policies.nothing_saveable,
  'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


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
  frozen_token_projection: bool = False  # reference quirk: P_d identity-initialized, no gradient
  dtype: str = 'float32'  # activation dtype; parameters stay float32
  attention: str = ''  # jax.nn.dot_product_attention implementation: '' (XLA picks), xla, cudnn

  @classmethod
  def from_config(cls, config) -> 'ModelConfig':
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in config.items() if k in fields})


def sinusoidal_features(positions: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """(...,) -> (..., dim) sin/cos features with geometrically spaced frequencies."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  angles = positions[..., None].astype(jnp.float32) * freqs
  return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def interpolate_linear(x: jax.Array, length: int) -> jax.Array:
  """Linear resampling of (B, N, C) along N to `length` with half-pixel centers (align_corners off)."""
  n = x.shape[1]
  source = jnp.clip((jnp.arange(length) + 0.5) * (n / length) - 0.5, 0.0, n - 1)
  lower = jnp.floor(source).astype(jnp.int32)
  upper = jnp.minimum(lower + 1, n - 1)
  frac = (source - lower)[None, :, None].astype(x.dtype)
  return x[:, lower] * (1 - frac) + x[:, upper] * frac


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-6) -> jax.Array:
  return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), eps)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  """Inverted dropout; `key=None` means evaluation mode."""
  if key is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


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


def _dense(n_in, n_out, rngs, names, *, zero=False, dtype=None):
  """Linear n_in → n_out; `names` = the kernel's logical axes (in, out), the bias has (out,)."""
  init = nnx.initializers.zeros_init() if zero else nnx.initializers.xavier_uniform()
  return nnx.Linear(
    n_in,
    n_out,
    kernel_init=init,
    kernel_metadata=axes(*names),
    bias_metadata=axes(names[1]),
    dtype=dtype,
    rngs=rngs,
  )


class DiTBlock(nnx.Module):
  """adaLN-conditioned transformer block; attention output and last MLP linear start at zero."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d, dtype = cfg.width, jnp.dtype(cfg.dtype)
    self.cfg = cfg
    self.modulation = _dense(d, 6 * d, rngs, ('embed', 'modulation'), dtype=dtype)
    self.qkv = _dense(d, 3 * d, rngs, ('embed', 'heads'), dtype=dtype)
    self.attn_out = _dense(d, d, rngs, ('heads', 'embed'), zero=True, dtype=dtype)
    self.mlp_in = _dense(d, cfg.mlp_ratio * d, rngs, ('embed', 'mlp'), dtype=dtype)
    self.mlp_out = _dense(cfg.mlp_ratio * d, d, rngs, ('mlp', 'embed'), zero=True, dtype=dtype)

  def __call__(self, h, time_emb, gate, dropout_key=None):
    cfg = self.cfg
    keys = (None, None) if dropout_key is None else tuple(jax.random.split(dropout_key))
    shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(
      self.modulation(jax.nn.silu(time_emb))[:, None, :].astype(h.dtype), 6, axis=-1
    )

    x = layer_norm(h) * (1 + scale1) + shift1
    q, k, v = jnp.split(self.qkv(x), 3, axis=-1)
    heads = lambda a: a.reshape(*a.shape[:2], cfg.num_heads, -1)
    attn = jax.nn.dot_product_attention(
      heads(q), heads(k), heads(v), implementation=cfg.attention or None
    )
    attn = self.attn_out(attn.reshape(h.shape))
    h = h + gate * gate1 * dropout(attn, cfg.dropout, keys[0])

    x = layer_norm(h) * (1 + scale2) + shift2
    mlp = self.mlp_out(jax.nn.gelu(self.mlp_in(x), approximate=False))
    return h + gate * gate2 * dropout(mlp, cfg.dropout, keys[1])


@nnx.vmap(in_axes=(None, 0), out_axes=0, transform_metadata={nnx.PARTITION_NAME: 'layers'})
def _stacked_blocks(cfg, rngs):
  return DiTBlock(cfg, rngs)


class TokenEncoder(nnx.Module):
  """Tokens (B, K, N) -> per-frame conditioning e (B, T, token_dim), L2-normalized per frame.

  Each codebook has its own embedding; the projection P_d is chosen by the clip's domain d.
  """

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    dt = cfg.token_dim
    self.embeddings = nnx.List(
      [
        nnx.Embed(cfg.vocab_size, dt, embedding_metadata=axes('vocab', 'embed'), rngs=rngs)
        for _ in range(cfg.num_codebooks)
      ]
    )
    proj_init = nnx.initializers.xavier_uniform()
    if cfg.frozen_token_projection:
      proj_init = lambda key, shape, dtype: jnp.broadcast_to(jnp.eye(shape[-1], dtype=dtype), shape)
    self.domain_projection = nnx.Param(
      proj_init(rngs.params(), (cfg.num_domains, dt, dt), jnp.float32),
      **axes('domains', 'embed', 'hidden'),
    )
    self.merge = (
      _dense(cfg.num_codebooks * dt, dt, rngs, ('codebooks', 'embed'))
      if cfg.num_codebooks > 1
      else None
    )

  def __call__(self, tokens, domain, num_frames):
    # Every clip through every P_d, then the clip's own: cheap at the token rate, and it never
    # materializes a (B, dt, dt) gather of the projections.
    in_domain = jax.nn.one_hot(domain, self.cfg.num_domains, dtype=jnp.float32)
    project = lambda x: jnp.einsum(
      'bkne,bk->bne', jnp.einsum('bnd,kde->bkne', x, self.domain_projection[...]), in_domain
    )
    streams = [
      interpolate_linear(project(embed(tokens[:, k])), num_frames)
      for k, embed in enumerate(self.embeddings)
    ]
    e = self.merge(jnp.concatenate(streams, -1)) if self.merge is not None else streams[0]
    return l2_normalize(e)


class DiT(nnx.Module):
  """v_θ(x_t, t, tokens, m_ref; g): the velocity field, plus per-layer hidden states on request."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    d = cfg.width
    self.token_encoder = TokenEncoder(cfg, rngs)
    self.input_projection = _dense(2 * cfg.n_mels + cfg.token_dim, d, rngs, ('inputs', 'embed'))
    self.time_mlp_in = _dense(cfg.time_freq_dim, d, rngs, ('time_freq', 'embed'))
    self.time_mlp_out = _dense(d, d, rngs, ('embed', 'hidden'))
    self.blocks = _stacked_blocks(
      cfg, nnx.Rngs(params=jax.random.split(rngs.params(), cfg.num_layers))
    )
    self.output_norm = nnx.LayerNorm(
      d,
      scale_metadata=axes('embed'),
      bias_metadata=axes('embed'),
      rngs=rngs,
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
  ):
    """Returns (velocity (B, T, n_mels), extras).

    token_keep: (B,) 0/1, 0 drops a clip's tokens (classifier-free guidance); default keeps all.
    gates: (L,) ablation gates, default all ones.
    extras: 'token_embedding' e (B, T, token_dim) before token dropout, and 'hidden' —
      per-layer block outputs, time-pooled (L, B, width) or per frame (L, B, T, width).
    """
    cfg = self.cfg
    h, time_emb, e = self.embed_inputs(x_t, t, tokens, ref_mel, domain, token_keep)
    gates = jnp.ones((cfg.num_layers,), h.dtype) if gates is None else gates.astype(h.dtype)
    h, per_layer = run_blocks(
      self.blocks, h, time_emb, gates, self.layer_keys(dropout_key), hidden, cfg.remat
    )
    return self.output(h), {'token_embedding': e, 'hidden': per_layer}

  def layer_keys(self, dropout_key):
    """Per-block dropout keys (L,), or None in evaluation mode."""
    return None if dropout_key is None else jax.random.split(dropout_key, self.cfg.num_layers)

  def embed_inputs(self, x_t, t, tokens, ref_mel, domain, token_keep=None):
    """The blocks' input h0 (B, T, width), the time embedding (B, width) and e before token dropout."""
    cfg = self.cfg
    frames = x_t.shape[1]
    x_t, t, ref_mel = (sharding.constrain_batch(a) for a in (x_t, t, ref_mel))
    e = sharding.constrain_batch(self.token_encoder(tokens, domain, frames))
    e_in = e if token_keep is None else e * token_keep[:, None, None].astype(e.dtype)
    h = self.input_projection(jnp.concatenate([x_t, e_in, ref_mel], -1))
    h = (h + sinusoidal_features(jnp.arange(frames), cfg.width)).astype(jnp.dtype(cfg.dtype))
    h = sharding.constrain_batch(h)
    time_hidden = self.time_mlp_in(sinusoidal_features(1000.0 * t, cfg.time_freq_dim))
    time_emb = self.time_mlp_out(jax.nn.silu(sharding.constrain_batch(time_hidden)))
    time_emb = sharding.constrain_batch(time_emb)
    return h, time_emb, e

  def output(self, h):
    """Last block's output (B, T, width) -> velocity (B, T, n_mels)."""
    return self.output_projection(self.output_norm(h.astype(jnp.float32)))


def run_blocks(blocks: DiTBlock, h, time_emb, gates, layer_keys, hidden: HiddenOutput, remat: str):
  """Scans the stacked blocks over depth, emitting what `hidden` asks for at every layer."""
  graphdef, state = nnx.split(blocks)

  def body(h, layer):
    block_state, gate, key = layer
    h = nnx.merge(graphdef, block_state)(h, time_emb, gate, key)
    h = sharding.constrain_batch(h)
    out = {'none': None, 'utterance': h.mean(1), 'frame': h}[hidden]
    out = None if out is None else sharding.constrain_batch(out)
    return h, out

  if remat not in REMAT_POLICIES:
    raise ValueError(f'model.remat={remat!r}: expected one of {sorted(REMAT_POLICIES)}')
  if remat != 'none':
    body = jax.checkpoint(body, policy=REMAT_POLICIES[remat])
  return jax.lax.scan(body, h, (state, gates, layer_keys))


class RepaHeads(nnx.Module):
  """Per (layer, domain) MLP width → width → GELU → C_d applied to L2-normalized hidden states."""

  def __init__(self, num_layers: int, width: int, teacher_dims: tuple[int, ...], rngs: nnx.Rngs):
    def stacked(n_out):
      @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: 'layers'})
      def make(rngs):
        return RepaMLP(width, n_out, rngs)

      return make(nnx.Rngs(params=jax.random.split(rngs.params(), num_layers)))

    self.per_domain = nnx.List([stacked(dim) for dim in teacher_dims])

  def __call__(self, domain_index: int, z):
    """z: (L, B, [T,] width) -> (L, B, [T,] C_d), layer ℓ through head (ℓ, d)."""
    graphdef, state = nnx.split(self.per_domain[domain_index])
    # layer by layer, so FSDP gathers one head's weights at a time (as the depth scan does)
    return jax.lax.map(lambda layer: nnx.merge(graphdef, layer[0])(layer[1]), (state, z))


class RepaMLP(nnx.Module):
  def __init__(self, width, n_out, rngs):
    self.hidden = _dense(width, width, rngs, ('embed', 'hidden'))
    self.out = _dense(width, n_out, rngs, ('hidden', 'teacher'))

  def __call__(self, z):
    hidden = jax.nn.gelu(self.hidden(l2_normalize(sharding.constrain_batch(z))), approximate=False)
    return sharding.constrain_batch(self.out(sharding.constrain_batch(hidden)))


class BitcHeads(nnx.Module):
  """Input-side alignment heads: LayerNorm → Linear (orthogonal init) from mean_t e to C_d."""

  def __init__(self, token_dim: int, teacher_dims: tuple[int, ...], rngs: nnx.Rngs):
    self.norms = nnx.List(
      [
        nnx.LayerNorm(
          token_dim, scale_metadata=axes('embed'), bias_metadata=axes('embed'), rngs=rngs
        )
        for _ in teacher_dims
      ]
    )
    self.projections = nnx.List(
      [
        nnx.Linear(
          token_dim,
          dim,
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
    return sharding.constrain_batch(
      self.projections[domain_index](self.norms[domain_index](pooled_e))
    )


class AgRepaModel(nnx.Module):
  """Everything that trains: the DiT backbone and the alignment heads (counted apart)."""

  def __init__(self, cfg: ModelConfig, teacher_dims: tuple[int, ...], rngs: nnx.Rngs):
    self.backbone = DiT(cfg, rngs)
    self.repa_heads = RepaHeads(cfg.num_layers, cfg.width, teacher_dims, rngs)
    self.bitc_heads = BitcHeads(cfg.token_dim, teacher_dims, rngs)


def count_params(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
