"""A compact PyTorch Vocos (mel backbone + ISTFT head) to test the JAX port against.

Written for these tests from the public model description (gemelo-ai/vocos); parameter names
follow the official state dict, so `state_dict()` has the keys of an official pytorch_model.bin.
The overlap-add is a transposed convolution here, a different route from the JAX shifted sums.
"""

import torch
from torch import nn


class ConvNeXtBlock(nn.Module):
  def __init__(self, dim: int, intermediate_dim: int, layer_scale: float):
    super().__init__()
    self.dwconv = nn.Conv1d(dim, dim, kernel_size=7, padding=3, groups=dim)
    self.norm = nn.LayerNorm(dim, eps=1e-6)
    self.pwconv1 = nn.Linear(dim, intermediate_dim)
    self.act = nn.GELU()
    self.pwconv2 = nn.Linear(intermediate_dim, dim)
    self.gamma = nn.Parameter(torch.full((dim,), layer_scale))

  def forward(self, x):  # (B, dim, T)
    h = self.norm(self.dwconv(x).transpose(1, 2))
    h = self.gamma * self.pwconv2(self.act(self.pwconv1(h)))
    return x + h.transpose(1, 2)


class Backbone(nn.Module):
  def __init__(self, input_channels: int, dim: int, intermediate_dim: int, num_layers: int):
    super().__init__()
    self.embed = nn.Conv1d(input_channels, dim, kernel_size=7, padding=3)
    self.norm = nn.LayerNorm(dim, eps=1e-6)
    self.convnext = nn.ModuleList(
      [ConvNeXtBlock(dim, intermediate_dim, 1 / num_layers) for _ in range(num_layers)]
    )
    self.final_layer_norm = nn.LayerNorm(dim, eps=1e-6)

  def forward(self, mel):  # (B, mels, T) -> (B, T, dim)
    x = self.norm(self.embed(mel).transpose(1, 2)).transpose(1, 2)
    for block in self.convnext:
      x = block(x)
    return self.final_layer_norm(x.transpose(1, 2))


class SameISTFT(nn.Module):
  def __init__(self, n_fft: int, hop_length: int):
    super().__init__()
    self.n_fft = n_fft
    self.hop_length = hop_length
    self.register_buffer('window', torch.hann_window(n_fft))

  def overlap_add(self, frames):  # (B, n_fft, T) -> (B, (T - 1) * hop + n_fft)
    identity = torch.eye(self.n_fft, dtype=frames.dtype).unsqueeze(1)
    return nn.functional.conv_transpose1d(frames, identity, stride=self.hop_length)[:, 0]

  def forward(self, spec):  # (B, n_fft // 2 + 1, T) complex
    num_frames = spec.shape[-1]
    frames = torch.fft.irfft(spec, self.n_fft, dim=1) * self.window[:, None]
    envelope = self.overlap_add((self.window**2)[None, :, None].expand(1, -1, num_frames))[0]
    trim = (self.n_fft - self.hop_length) // 2
    return self.overlap_add(frames)[:, trim:-trim] / envelope[trim:-trim]


class ISTFTHead(nn.Module):
  def __init__(self, dim: int, n_fft: int, hop_length: int):
    super().__init__()
    self.out = nn.Linear(dim, n_fft + 2)
    self.istft = SameISTFT(n_fft, hop_length)

  def forward(self, x):  # (B, T, dim) -> (B, T * hop)
    log_magnitude, p = self.out(x).transpose(1, 2).chunk(2, dim=1)
    magnitude = torch.exp(log_magnitude).clip(max=1e2)
    phase = torch.atan2(torch.sin(p), torch.cos(p))
    return self.istft(magnitude * torch.exp(1j * phase))


class Vocos(nn.Module):
  def __init__(
    self,
    input_channels=100,
    dim=512,
    intermediate_dim=1536,
    num_layers=8,
    n_fft=1024,
    hop_length=256,
  ):
    super().__init__()
    self.backbone = Backbone(input_channels, dim, intermediate_dim, num_layers)
    self.head = ISTFTHead(dim, n_fft, hop_length)

  def forward(self, log_mel):  # natural-log mel (B, mels, T) -> audio (B, T * hop)
    return self.head(self.backbone(log_mel))
