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

HiddenOutput = Literal['none', 'utterance', 'frame']
REMAT_POLICIES = {
  'none': None,
  'full': jax.checkpoint_policies.nothing_saveable,
  'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
DROPOUT_RNGS = ('threefry', 'rbg')


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
  dropout_rng: str = 'threefry'  # a key of DROPOUT_RNGS

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


def attention(q, k, v, lengths: jax.Array | None) -> jax.Array:
  """Self-attention over (B, T, heads, head_dim); keys past a clip's `lengths` (B,) are masked.

  The key-padding form runs as cuDNN flash attention on GPU in half precision, XLA elsewhere.
  Queries on padding frames still get an output; nothing downstream reads it.
  """
  if lengths is not None:
    lengths = jnp.maximum(lengths, 1).astype(jnp.int32)  # a fully padded clip: no empty softmax
  half = q.dtype in (jnp.bfloat16, jnp.float16)
  implementation = 'cudnn' if half and jax.default_backend() == 'gpu' else 'xla'
  return jax.nn.dot_product_attention(
    q, k, v, key_value_seq_lengths=lengths, implementation=implementation
  )


def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """LayerNorm without affine parameters (the adaLN modulation supplies scale and shift).

  Statistics are taken in float32 whatever the activation dtype.
  """
  x32 = x.astype(jnp.float32)
  mean = x32.mean(-1, keepdims=True)
  var = jnp.square(x32 - mean).mean(-1, keepdims=True)
  return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def _dense(n_in, n_out, rngs, *, zero=False, dtype=None):
  init = nnx.initializers.zeros_init() if zero else nnx.initializers.xavier_uniform()
  return nnx.Linear(n_in, n_out, kernel_init=init, dtype=dtype, rngs=rngs)


class DiTBlock(nnx.Module):
  """adaLN-conditioned transformer block; attention output and last MLP linear start at zero."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d, dtype = cfg.width, jnp.dtype(cfg.dtype)
    self.cfg = cfg
    self.modulation = _dense(d, 6 * d, rngs, dtype=dtype)
    self.qkv = _dense(d, 3 * d, rngs, dtype=dtype)
    self.attn_out = _dense(d, d, rngs, zero=True, dtype=dtype)
    self.mlp_in = _dense(d, cfg.mlp_ratio * d, rngs, dtype=dtype)
    self.mlp_out = _dense(cfg.mlp_ratio * d, d, rngs, zero=True, dtype=dtype)

  def __call__(self, h, time_emb, gate, dropout_key=None, lengths=None):
    """h (B, T, width) -> same; `lengths` (B,): valid frames, the keys attention may read."""
    cfg = self.cfg
    keys = (None, None) if dropout_key is None else tuple(jax.random.split(dropout_key))
    shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(
      self.modulation(jax.nn.silu(time_emb))[:, None, :].astype(h.dtype), 6, axis=-1
    )

    x = layer_norm(h) * (1 + scale1) + shift1
    q, k, v = jnp.split(self.qkv(x), 3, axis=-1)
    heads = lambda a: a.reshape(*a.shape[:2], cfg.num_heads, -1)
    attn = attention(heads(q), heads(k), heads(v), lengths)
    attn = self.attn_out(attn.reshape(h.shape))
    h = h + gate * gate1 * dropout(attn, cfg.dropout, keys[0])

    x = layer_norm(h) * (1 + scale2) + shift2
    mlp = self.mlp_out(jax.nn.gelu(self.mlp_in(x), approximate=False))
    return h + gate * gate2 * dropout(mlp, cfg.dropout, keys[1])


@nnx.vmap(in_axes=(None, 0), out_axes=0)
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
      [nnx.Embed(cfg.vocab_size, dt, rngs=rngs) for _ in range(cfg.num_codebooks)]
    )
    proj_init = nnx.initializers.xavier_uniform()
    if cfg.frozen_token_projection:
      proj_init = lambda key, shape, dtype: jnp.broadcast_to(jnp.eye(shape[-1], dtype=dtype), shape)
    self.domain_projection = nnx.Param(
      proj_init(rngs.params(), (cfg.num_domains, dt, dt), jnp.float32)
    )
    self.merge = _dense(cfg.num_codebooks * dt, dt, rngs) if cfg.num_codebooks > 1 else None

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
    self.input_projection = _dense(2 * cfg.n_mels + cfg.token_dim, d, rngs)
    self.time_mlp_in = _dense(cfg.time_freq_dim, d, rngs)
    self.time_mlp_out = _dense(d, d, rngs)
    self.blocks = _stacked_blocks(
      cfg, nnx.Rngs(params=jax.random.split(rngs.params(), cfg.num_layers))
    )
    self.output_norm = nnx.LayerNorm(d, rngs=rngs)
    self.output_projection = _dense(d, cfg.n_mels, rngs)

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
      self.blocks, h, time_emb, gates, self.layer_keys(dropout_key), hidden, cfg.remat, lengths
    )
    return self.output(h), {'token_embedding': e, 'hidden': per_layer}

  def layer_keys(self, dropout_key):
    """Per-block dropout keys (L,) in the `dropout_rng` implementation, or None in evaluation."""
    if dropout_key is None:
      return None
    return jax.random.split(dropout_rng_key(dropout_key, self.cfg.dropout_rng), self.cfg.num_layers)

  def embed_inputs(self, x_t, t, tokens, ref_mel, domain, token_keep=None):
    """The blocks' input h0 (B, T, width), the time embedding (B, width) and e before token dropout."""
    cfg = self.cfg
    frames = x_t.shape[1]
    e = self.token_encoder(tokens, domain, frames)
    e_in = e if token_keep is None else e * token_keep[:, None, None].astype(e.dtype)
    h = self.input_projection(jnp.concatenate([x_t, e_in, ref_mel], -1))
    h = (h + sinusoidal_features(jnp.arange(frames), cfg.width)).astype(jnp.dtype(cfg.dtype))
    time_emb = self.time_mlp_out(
      jax.nn.silu(self.time_mlp_in(sinusoidal_features(1000.0 * t, cfg.time_freq_dim)))
    )
    return h, time_emb, e

  def output(self, h):
    """Last block's output (B, T, width) -> velocity (B, T, n_mels)."""
    return self.output_projection(self.output_norm(h.astype(jnp.float32)))


def dropout_rng_key(key: jax.Array, impl: str) -> jax.Array:
  """`key` as a key of PRNG implementation `impl` (rbg: derived from its bits, deterministic)."""
  if impl not in DROPOUT_RNGS:
    raise ValueError(f'model.dropout_rng={impl!r}: expected one of {DROPOUT_RNGS}')
  if impl == 'threefry':
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
):
  """Scans the stacked blocks over depth, emitting what `hidden` asks for at every layer.

  lengths: (B,) valid frames (None: all); 'utterance' pools each layer over them only.
  """
  graphdef, state = nnx.split(blocks)
  mask = None if lengths is None else valid_mask(lengths, h.shape[1])

  def body(h, layer):
    block_state, gate, key = layer
    h = nnx.merge(graphdef, block_state)(h, time_emb, gate, key, lengths)
    out = {'none': None, 'utterance': masked_mean(h, mask), 'frame': h}[hidden]
    return h, out

  if remat not in REMAT_POLICIES:
    raise ValueError(f'model.remat={remat!r}: expected one of {sorted(REMAT_POLICIES)}')
  if remat != 'none':
    body = jax.checkpoint(body, policy=REMAT_POLICIES[remat])
  return jax.lax.scan(body, h, (state, gates, layer_keys))


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
      @nnx.vmap(in_axes=0, out_axes=0)
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
    return jax.vmap(lambda s, x: nnx.merge(graphdef, s)(x))(state, z)


class RepaMLP(nnx.Module):
  def __init__(self, width, n_out, rngs):
    self.hidden = _dense(width, width, rngs)
    self.out = _dense(width, n_out, rngs)

  def __call__(self, z):
    return self.out(jax.nn.gelu(self.hidden(l2_normalize(z)), approximate=False))


class BitcHeads(nnx.Module):
  """Input-side alignment heads: LayerNorm → Linear (orthogonal init) from mean_t e to C_d."""

  def __init__(self, token_dim: int, teacher_dims: tuple[int, ...], rngs: nnx.Rngs):
    self.norms = nnx.List([nnx.LayerNorm(token_dim, rngs=rngs) for _ in teacher_dims])
    self.projections = nnx.List(
      [
        nnx.Linear(token_dim, dim, kernel_init=nnx.initializers.orthogonal(), rngs=rngs)
        for dim in teacher_dims
      ]
    )

  def __call__(self, domain_index: int, pooled_e):
    return self.projections[domain_index](self.norms[domain_index](pooled_e))


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
    self.bitc_heads = BitcHeads(cfg.token_dim, teacher_dims, rngs)


def count_params(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
