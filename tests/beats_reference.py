"""A compact PyTorch BEATs encoder for tests, written from the public definition (microsoft/unilm
beats: BEATs.py, backbone.py) at inference, without dropout or padding masks.

It keeps the official module names, so its state_dict has the official checkpoint layout (the
relative position table appears under every layer, all being the first layer's module), and the
official arithmetic: queries pre-divided by 32 and logits re-multiplied after subtracting their max.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

ATTENTION_ALPHA = 32


def relative_position_bucket(
  relative: torch.Tensor, num_buckets: int, max_distance: int
) -> torch.Tensor:
  half = num_buckets // 2
  buckets = (relative > 0).to(torch.long) * half
  distance = relative.abs()
  exact = half // 2
  far = exact + (
    torch.log(distance.float() / exact) / math.log(max_distance / exact) * (half - exact)
  ).to(torch.long)
  far = torch.min(far, torch.full_like(far, half - 1))
  return buckets + torch.where(distance < exact, distance, far)


class WeightNormConv1d(nn.Module):
  """Conv1d with weight = g v / ||v||, norms over all axes but the kernel axis (dim=2)."""

  def __init__(self, dim: int, kernel_size: int, groups: int):
    super().__init__()
    self.groups = groups
    self.weight_v = nn.Parameter(
      torch.randn(dim, dim // groups, kernel_size) * math.sqrt(4 / (kernel_size * dim))
    )
    self.weight_g = nn.Parameter(self.weight_v.detach().norm(dim=(0, 1), keepdim=True))
    self.bias = nn.Parameter(torch.zeros(dim))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    weight = self.weight_g * self.weight_v / self.weight_v.norm(dim=(0, 1), keepdim=True)
    return F.conv1d(x, weight, self.bias, padding=self.weight_v.shape[-1] // 2, groups=self.groups)


class DropLastStep(nn.Module):
  """SamePad: an even kernel gives one step too many."""

  def __init__(self, kernel_size: int):
    super().__init__()
    self.drop = 1 if kernel_size % 2 == 0 else 0

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return x[:, :, : -self.drop] if self.drop else x


class MultiheadAttention(nn.Module):
  def __init__(self, cfg: dict, relative_attention_bias: nn.Embedding):
    super().__init__()
    dim, self.heads = cfg['encoder_embed_dim'], cfg['encoder_attention_heads']
    self.head_dim = dim // self.heads
    self.scaling = self.head_dim**-0.5
    self.num_buckets, self.max_distance = cfg['num_buckets'], cfg['max_distance']
    self.q_proj, self.k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
    self.v_proj, self.out_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
    self.relative_attention_bias = relative_attention_bias
    self.grep_linear = nn.Linear(self.head_dim, 8)
    self.grep_a = nn.Parameter(torch.ones(1, self.heads, 1, 1))

  def compute_bias(self, length: int) -> torch.Tensor:
    positions = torch.arange(length)
    buckets = relative_position_bucket(
      positions[None, :] - positions[:, None], self.num_buckets, self.max_distance
    )
    return self.relative_attention_bias(buckets).permute(2, 0, 1)  # (H, T, T)

  def forward(self, x: torch.Tensor, position_bias: torch.Tensor | None):
    """x: (T, B, C) as fairseq lays it out; returns (output, the ungated position bias)."""
    length, batch, dim = x.shape
    if position_bias is None:
      position_bias = self.compute_bias(length)
    to_heads = lambda t: t.reshape(length, batch * self.heads, self.head_dim).transpose(0, 1)
    q = to_heads(self.q_proj(x) * self.scaling / ATTENTION_ALPHA)
    k, v = to_heads(self.k_proj(x)), to_heads(self.v_proj(x))
    weights = torch.bmm(q, k.transpose(1, 2))
    weights = (weights - weights.max(dim=-1, keepdim=True)[0]) * ATTENTION_ALPHA
    query = q.view(batch, self.heads, length, self.head_dim) * ATTENTION_ALPHA / self.scaling
    gates = torch.sigmoid(self.grep_linear(query).view(batch, self.heads, length, 2, 4).sum(-1))
    gate_a, gate_b = gates.chunk(2, dim=-1)
    gate = gate_a * (gate_b * self.grep_a - 1.0) + 2.0  # (B, H, T, 1)
    weights = weights + (gate * position_bias[None]).view(batch * self.heads, length, length)
    out = torch.bmm(F.softmax(weights, dim=-1), v)
    out = out.transpose(0, 1).reshape(length, batch, dim)
    return self.out_proj(out), position_bias


class EncoderLayer(nn.Module):
  def __init__(self, cfg: dict, relative_attention_bias: nn.Embedding):
    super().__init__()
    dim = cfg['encoder_embed_dim']
    self.alpha = (2 * cfg['encoder_layers']) ** 0.25 if cfg['deep_norm'] else 1.0
    self.self_attn = MultiheadAttention(cfg, relative_attention_bias)
    self.self_attn_layer_norm = nn.LayerNorm(dim)
    self.fc1 = nn.Linear(dim, cfg['encoder_ffn_embed_dim'])
    self.fc2 = nn.Linear(cfg['encoder_ffn_embed_dim'], dim)
    self.final_layer_norm = nn.LayerNorm(dim)

  def forward(self, x: torch.Tensor, position_bias: torch.Tensor | None):
    attended, position_bias = self.self_attn(x, position_bias)
    x = self.self_attn_layer_norm(x * self.alpha + attended)
    x = self.final_layer_norm(x * self.alpha + self.fc2(F.gelu(self.fc1(x))))
    return x, position_bias


class TransformerEncoder(nn.Module):
  def __init__(self, cfg: dict):
    super().__init__()
    dim = cfg['encoder_embed_dim']
    self.pos_conv = nn.Sequential(
      WeightNormConv1d(dim, cfg['conv_pos'], cfg['conv_pos_groups']),
      DropLastStep(cfg['conv_pos']),
      nn.GELU(),
    )
    shared_bias = nn.Embedding(cfg['num_buckets'], cfg['encoder_attention_heads'])
    self.layers = nn.ModuleList(
      EncoderLayer(cfg, shared_bias) for _ in range(cfg['encoder_layers'])
    )
    self.layer_norm = nn.LayerNorm(dim)

  def forward(self, x: torch.Tensor, tgt_layer: int | None = None) -> torch.Tensor:
    """x (B, T, C) -> output of layer tgt_layer (0-based, official convention) or of the last."""
    x = self.layer_norm(x + self.pos_conv(x.transpose(1, 2)).transpose(1, 2))
    x = x.transpose(0, 1)
    position_bias = None
    for i, layer in enumerate(self.layers):
      x, position_bias = layer(x, position_bias)
      if i == tgt_layer:
        break
    return x.transpose(0, 1)


class BEATs(nn.Module):
  def __init__(self, cfg: dict):
    super().__init__()
    patch, embed = cfg['input_patch_size'], cfg['embed_dim']
    self.patch_embedding = nn.Conv2d(1, embed, patch, stride=patch, bias=cfg['conv_bias'])
    self.layer_norm = nn.LayerNorm(embed)
    self.post_extract_proj = (
      nn.Linear(embed, cfg['encoder_embed_dim']) if embed != cfg['encoder_embed_dim'] else None
    )
    self.encoder = TransformerEncoder(cfg)
    self.predictor = (
      nn.Linear(cfg['encoder_embed_dim'], cfg['predictor_class'])
      if cfg.get('finetuned_model')
      else None
    )

  def extract_features(self, fbank: torch.Tensor, tgt_layer: int | None = None) -> torch.Tensor:
    """Normalized fbank (B, frames, 128) -> tokens (B, steps * freq patches, C)."""
    patches = self.patch_embedding(fbank.unsqueeze(1))  # (B, E, steps, freq patches)
    x = self.layer_norm(patches.flatten(2).transpose(1, 2))
    if self.post_extract_proj is not None:
      x = self.post_extract_proj(x)
    return self.encoder(x, tgt_layer)
