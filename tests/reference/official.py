"""A PyTorch re-implementation of the paper's official flow-matching model, written for the tests.

It follows the equations, shapes and layouts of the official code (zpforlove/AG-REPA, the
`Fusion_*` and `REPA_*` models), not its text: adaLN DiT blocks on torch.nn.MultiheadAttention,
a sinusoidal time embedding of raw t, interleaved sin/cos positions, one token table per domain
(plus one BEATs-label table shared by the domains in the dual-codebook model), BiT-C, REPA heads,
FoG-A and the Euler sampler with sway sampling and guidance v_u + w·(v_c − v_u), and the official
training step (`train_step`: token conditioning without gradients, the draws, the three losses,
backward, global-norm clipping, AdamW on a one-cycle schedule). Tensors follow the official
layout: mels (B, n_mels, T), conditioning (B, D_tok + n_mels, T).
"""

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn


@dataclasses.dataclass(frozen=True)
class OfficialConfig:
  num_layers: int
  width: int
  num_heads: int
  n_mels: int
  token_dim: int
  vocab_size: int  # S3 / AudioSet tokens, one table per domain
  teacher_dims: tuple[int, ...]  # C_d per domain (0: speech, 1: audio)
  dual: bool = False  # interleaved BEATs labels as a second stream
  beats_vocab_size: int = 1024
  mlp_ratio: int = 4
  dropout: float = 0.2
  max_len: int = 64


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
  """(B,) raw t -> (B, dim): cosines, then sines of t·max_period^(−i/half)."""
  half = dim // 2
  freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
  args = t[:, None].float() * freqs[None]
  return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def position_encoding(length: int, dim: int) -> torch.Tensor:
  """(length, dim): sin at even channels, cos at odd ones, frequency 10000^(−2i/dim)."""
  position = torch.arange(length, dtype=torch.float32)[:, None]
  div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
  encoding = torch.zeros(length, dim)
  encoding[:, 0::2] = torch.sin(position * div)
  encoding[:, 1::2] = torch.cos(position * div)
  return encoding


class Block(nn.Module):
  """adaLN block; modulation chunks (scale1, shift1, scale2, shift2, gate1, gate2)."""

  def __init__(self, dim, heads, mlp_ratio, dropout):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
    self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
    self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
    self.ff = nn.Sequential(
      nn.Linear(dim, mlp_ratio * dim),
      nn.GELU(),
      nn.Dropout(dropout),
      nn.Linear(mlp_ratio * dim, dim),
      nn.Dropout(dropout),
    )
    self.time_mlp = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

  def forward(self, x, te):
    scale1, shift1, scale2, shift2, gate1, gate2 = self.time_mlp(te)[:, None].chunk(6, dim=-1)
    y = self.norm1(x) * (1 + scale1) + shift1
    x = x + gate1 * self.attn(y, y, y, need_weights=False)[0]
    y = self.norm2(x) * (1 + scale2) + shift2
    return x + gate2 * self.ff(y)


def repa_head(width, out_dim):
  return nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, out_dim))


class FlowModel(nn.Module):
  def __init__(self, cfg: OfficialConfig):
    super().__init__()
    self.cfg = cfg
    d, dt, domains = cfg.width, cfg.token_dim, len(cfg.teacher_dims)
    self.token_tables = nn.ModuleList([nn.Embedding(cfg.vocab_size, dt) for _ in range(domains)])
    proj_in = 2 * dt if cfg.dual else dt
    self.token_projections = nn.ModuleList(
      [nn.Linear(proj_in, dt, bias=False) for _ in range(domains)]
    )
    self.beats_table = nn.Embedding(cfg.beats_vocab_size, dt) if cfg.dual else None
    self.input_proj = nn.Linear(2 * cfg.n_mels + dt, d)
    self.time_embed = nn.Sequential(nn.Linear(d, 4 * d), nn.SiLU(), nn.Linear(4 * d, d))
    self.blocks = nn.ModuleList(
      [Block(d, cfg.num_heads, cfg.mlp_ratio, cfg.dropout) for _ in range(cfg.num_layers)]
    )
    self.output_layer = nn.Sequential(nn.LayerNorm(d, eps=1e-6), nn.Linear(d, cfg.n_mels))
    self.register_buffer('pos_emb', position_encoding(cfg.max_len, d))
    self.teacher_proj = nn.ModuleList([nn.Linear(dt, c, bias=False) for c in cfg.teacher_dims])
    self.repa_heads = nn.ModuleList(
      [nn.ModuleList([repa_head(d, c) for _ in range(cfg.num_layers)]) for c in cfg.teacher_dims]
    )

  # ----- Conditioning (the official code runs it under no_grad) -----
  def embed_tokens(self, domain: int, tokens: torch.Tensor) -> torch.Tensor:
    """(N, L) tokens of one domain -> (N, D_tok, L'): table, then the domain's projection.

    Dual codebook: `tokens` interleave main and BEATs labels (m1, b1, m2, b2, ...); the two
    streams are split, truncated to the shorter, embedded and concatenated before projecting.
    """
    if not self.cfg.dual:
      embedded = self.token_tables[domain](tokens)
    else:
      main, beats = tokens[:, 0::2], tokens[:, 1::2]
      length = min(main.shape[1], beats.shape[1])
      main, beats = main[:, :length], beats[:, :length]
      embedded = torch.cat([self.token_tables[domain](main), self.beats_table(beats)], dim=-1)
    return self.token_projections[domain](embedded).permute(0, 2, 1)

  def fused_embedding(self, tokens, domain_ids, frames) -> torch.Tensor:
    """(B, L) tokens -> (B, D_tok, frames): per domain, embedded, interpolated, L2-normalized."""
    fused = torch.zeros(tokens.shape[0], self.cfg.token_dim, frames)
    for domain in range(len(self.cfg.teacher_dims)):
      rows = torch.nonzero(domain_ids == domain, as_tuple=True)[0]
      if len(rows):
        shared = self.embed_tokens(domain, tokens[rows])
        shared = F.interpolate(shared, size=frames, mode='linear', align_corners=False)
        fused[rows] = F.normalize(shared, p=2, dim=1)
    return fused

  # ----- Velocity -----
  def predict_velocity(self, xt, t, cond, skip_layers=()):
    """v (B, n_mels, T) and every block's output h, L × (B, T, width); skipped blocks pass h on."""
    h = self.input_proj(torch.cat([xt, cond], dim=1).permute(0, 2, 1))
    h = h + self.pos_emb[: xt.shape[-1]][None]
    te = self.time_embed(timestep_embedding(t, h.shape[-1]))
    hidden = []
    for index, block in enumerate(self.blocks):
      if index not in skip_layers:
        h = block(h, te)
      hidden.append(h)
    return self.output_layer(h).permute(0, 2, 1), hidden

  # ----- Losses, with the random draws given -----
  def losses(self, x, t, noise, fused, ref_mel, kept, domain_ids, teachers, lambdas, bitc_weights):
    """Batch means of the FM, BiT-C and REPA terms of the official per-clip total loss.

    x, noise, ref_mel: (B, n_mels, T); kept: (B,) 1 where the tokens were kept; teachers: (B, C_d)
    per domain; lambdas: {domain: {0-based layer: λ}}; bitc_weights: None (no BiT-C) or w_d.
    """
    masked = fused * kept[:, None, None]
    tb = t[:, None, None]
    xt = (1 - tb) * noise + tb * x
    velocity, hidden = self.predict_velocity(xt, t, torch.cat([masked, ref_mel], dim=1))
    fm = F.mse_loss(velocity, x - noise, reduction='none').mean(dim=(1, 2))
    bitc = torch.zeros_like(fm)
    if bitc_weights is not None:
      pooled = F.layer_norm(masked.mean(dim=2), (masked.shape[1],))
      for domain, (head, weight) in enumerate(zip(self.teacher_proj, bitc_weights)):
        cos = F.cosine_similarity(
          F.normalize(head(pooled), dim=-1), F.normalize(teachers[domain], dim=-1), dim=-1
        )
        bitc = bitc + weight * (1 - cos) * (domain_ids == domain).float() * kept
    repa = torch.zeros_like(fm)
    for domain, layers in lambdas.items():
      rows = domain_ids == domain
      for layer, weight in layers.items():
        z = self.repa_heads[domain][layer](F.normalize(hidden[layer].mean(dim=1)[rows], dim=-1))
        cos = F.cosine_similarity(
          F.normalize(z, dim=-1), F.normalize(teachers[domain][rows], dim=-1), dim=-1
        )
        repa[rows] = repa[rows] + weight * (1 - cos)
    return {'fm': fm.mean(), 'bitc': bitc.mean(), 'repa': repa.mean()}

  # ----- FoG-A -----
  def fog_attribution(self, x_in, cond, t_value, domain_ids, eps=1e-8):
    """{layer: [per-domain mean Δ]}: Δ = RMS(v_¬ℓ − v) / RMS(v) per clip, over all frames.

    The official probe feeds the clean mel as `x_in`, labelled t = 0.8.
    """
    t = torch.full((x_in.shape[0],), t_value)
    base, _ = self.predict_velocity(x_in, t, cond)
    base_energy = torch.sqrt((base**2).mean(dim=(1, 2)) + eps)
    scores = {}
    for layer in range(self.cfg.num_layers):
      ablated, _ = self.predict_velocity(x_in, t, cond, skip_layers={layer})
      delta = torch.sqrt(((ablated - base) ** 2).mean(dim=(1, 2)) + eps) / (base_energy + eps)
      scores[layer] = [
        delta[domain_ids == d].mean().item() for d in range(len(self.cfg.teacher_dims))
      ]
    return scores

  # ----- Sampling -----
  def guided_velocity(self, x, t_value, fused, ref_mel, cfg_scale):
    """v_u + w·(v_c − v_u); the unconditional pass zeroes the tokens and keeps the reference."""
    t = torch.full((x.shape[0],), float(t_value))
    v_cond, _ = self.predict_velocity(x, t, torch.cat([fused, ref_mel], dim=1))
    v_uncond, _ = self.predict_velocity(x, t, torch.cat([torch.zeros_like(fused), ref_mel], 1))
    return v_uncond + cfg_scale * (v_cond - v_uncond)

  def sample_trajectory(self, x0, fused, ref_mel, steps, cfg_scale, sway):
    """Euler states (steps, B, n_mels, T) over the sway-bent grid of `steps` times from 0 to 1."""
    t_span = torch.linspace(0.0, 1.0, steps)
    t_span = t_span + sway * (torch.cos(math.pi / 2 * t_span) - 1 + t_span)
    states = [x0]
    for t, t_next in zip(t_span[:-1], t_span[1:]):
      x = states[-1]
      states.append(x + (t_next - t) * self.guided_velocity(x, t, fused, ref_mel, cfg_scale))
    return torch.stack(states)


# ----- Training -----
@dataclasses.dataclass(frozen=True)
class FlowDraws:
  """The distributions of the per-step draws (the defaults of our flow config)."""

  noise_std: float = 0.5
  max_prompt_fraction: float = 0.3
  token_drop_prob: float = 0.1
  reference_drop_prob: float = 0.1


def draw_inputs(x: torch.Tensor, draws: FlowDraws, generator=None) -> dict:
  """t, noise, the reference prompt (a random prefix, dropped at random) and the token-keep flags.

  x: (B, n_mels, T) target mel whose every frame holds audio.
  """
  batch, _, frames = x.shape
  uniform = lambda *shape: torch.rand(*shape, generator=generator)
  t = uniform(batch)
  noise = draws.noise_std * torch.randn(x.shape, generator=generator)
  max_prompt = max(math.floor(draws.max_prompt_fraction * frames), 1)
  prompt = torch.randint(1, max_prompt + 1, (batch,), generator=generator)
  keep_ref = uniform(batch) >= draws.reference_drop_prob
  in_prompt = (torch.arange(frames)[None] < prompt[:, None]) & keep_ref[:, None]
  kept = (uniform(batch) >= draws.token_drop_prob).float()
  return {'t': t, 'noise': noise, 'ref_mel': x * in_prompt[:, None], 'kept': kept}


def make_optimizer(
  model: FlowModel,
  learning_rate,
  weight_decay,
  betas,
  total_steps,
  pct_start,
  div_factor=10.0,
  final_div_factor=100.0,
):
  """AdamW on the official OneCycleLR; like the official code it keeps OneCycleLR's default
  momentum cycling, which overrides β1 (0.95 -> 0.85 at the peak -> 0.95)."""
  optimizer = torch.optim.AdamW(
    model.parameters(), lr=learning_rate, betas=betas, weight_decay=weight_decay
  )
  schedule = torch.optim.lr_scheduler.OneCycleLR(
    optimizer,
    max_lr=learning_rate,
    total_steps=total_steps,
    pct_start=pct_start,
    div_factor=div_factor,
    final_div_factor=final_div_factor,
  )
  return optimizer, schedule


def train_step(model, optimizer, schedule, batch, lambdas, bitc_weights, draws, grad_clip=1.0):
  """One official optimization step on `batch` (mel (B, n_mels, T), tokens, domain, teachers).

  The token conditioning runs under no_grad, as in the official code; a parameter without a
  gradient (an unselected REPA head) is skipped by AdamW. Returns the losses and the gradient norm.
  """
  model.train()
  x, domain_ids = batch['mel'], batch['domain']
  with torch.no_grad():
    fused = model.fused_embedding(batch['tokens'], domain_ids, x.shape[-1])
  drawn = batch['draws'] if 'draws' in batch else draw_inputs(x, draws)
  parts = model.losses(
    x,
    drawn['t'],
    drawn['noise'],
    fused,
    drawn['ref_mel'],
    drawn['kept'],
    domain_ids,
    batch['teachers'],
    lambdas,
    bitc_weights,
  )
  loss = parts['fm'] + parts['bitc'] + parts['repa']
  optimizer.zero_grad(set_to_none=True)
  loss.backward()
  grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
  optimizer.step()
  if schedule is not None:
    schedule.step()
  return {'loss': loss.detach(), **{k: v.detach() for k, v in parts.items()}}, grad_norm


# ----- Front end -----
def resample(wave: torch.Tensor, orig_rate: int, new_rate: int, window: str) -> torch.Tensor:
  """torchaudio.functional.resample (6 zero crossings, roll-off 0.99) as the continuous-time sum its
  polyphase filters sample: y(n / new) = Σ_k x[k]·h(k / orig − n / new), h a windowed sinc with the
  cutoff 0.99·min(orig, new) (rates divided by their gcd), zero beyond ±6 zero crossings.

  window: 'hann' (the official loader's resampler to 16 kHz) or 'kaiser' (its mel extractor's, to
  24 kHz, β = 14.769656459379492).
  """
  divisor = math.gcd(orig_rate, new_rate)
  orig, new = orig_rate // divisor, new_rate // divisor
  width, cutoff = 6, 0.99 * min(orig, new)
  length = wave.shape[-1]
  outputs = torch.arange(math.ceil(new * length / orig), dtype=torch.float64)
  offsets = torch.arange(length, dtype=torch.float64)[None, :] / orig - outputs[:, None] / new
  phase = (offsets * cutoff).clamp(-width, width)  # sinc(±width) = 0: farther samples add nothing
  if window == 'hann':
    taper = torch.cos(phase * math.pi / width / 2) ** 2
  else:
    beta = torch.tensor(14.769656459379492, dtype=torch.float64)
    taper = torch.special.i0(beta * torch.sqrt(1 - (phase / width) ** 2)) / torch.special.i0(beta)
  weights = torch.sinc(phase) * taper * cutoff / orig
  return (weights @ wave.double()[..., None])[..., 0]


def whisper_target(extractor, encoder, wave_16k) -> torch.Tensor:
  """The official speech target of (B, N) 16 kHz clips: WhisperProcessor pads each to 30 s, the
  encoder runs on all 3 000 mel frames, and its 1 500 output frames are averaged."""
  features = extractor(list(wave_16k), sampling_rate=16000, return_tensors='pt').input_features
  with torch.no_grad():
    return encoder(features).last_hidden_state.mean(dim=1)
