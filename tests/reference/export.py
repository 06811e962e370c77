"""Exports the weights of our NNX `AgRepaModel` (official forms) into the PyTorch `FlowModel`.

Layouts differ only by fixed relabelings, which the exporter undoes:
- torch Linear weights are (out, in), our kernels (in, out);
- residual-stream channels: our positions are [sin | cos] halves, the official ones interleave
  sin and cos, so channel c of ours is channel `residual_order()[c]` there. Every weight that
  reads or writes the residual stream is permuted accordingly (an exact symmetry of the model);
- time features: ours [sin | cos], the official [cos | sin];
- adaLN chunks: ours (shift1, scale1, gate1, shift2, scale2, gate2), the official
  (scale1, shift1, scale2, shift2, gate1, gate2);
- per-domain token tables: ours are one (domains·vocab, D_tok) table.
"""

import numpy as np
import torch

from agrepa_jax.model import AgRepaModel
from tests.reference.official import FlowModel

# Official chunk k holds our chunk OURS_CHUNK[k].
OURS_CHUNK = (1, 0, 4, 3, 2, 5)


def residual_order(width: int) -> np.ndarray:
  """(width,) official channel index of each of our residual channels."""
  half, c = width // 2, np.arange(width)
  return np.where(c < half, 2 * c, 2 * (c - half) + 1)


def official_channels(width: int) -> np.ndarray:
  """(width,) our channel that each official residual channel holds."""
  return np.argsort(residual_order(width))


def as_array(variable) -> np.ndarray:
  return np.asarray(variable[...], np.float32)


def export_weights(model: AgRepaModel, reference: FlowModel) -> None:
  """Copies every parameter of `model` into `reference` (in place)."""
  cfg = model.backbone.cfg
  d, official = cfg.width, official_channels(cfg.width)
  backbone, blocks = model.backbone, model.backbone.blocks
  state = {}

  def linear(name, layer, rows=None, columns=None):
    """torch weight (out, in) = our kernel (in, out) transposed, then permuted."""
    weight = as_array(layer.kernel).T
    weight = weight if rows is None else weight[rows]
    state[f'{name}.weight'] = weight if columns is None else weight[:, columns]
    if getattr(layer, 'bias', None) is not None:
      bias = as_array(layer.bias)
      state[f'{name}.bias'] = bias if rows is None else bias[rows]

  encoder = backbone.token_encoder
  vocab, tables = cfg.vocab_size, as_array(encoder.embeddings[0].embedding)
  for domain in range(cfg.num_domains):
    state[f'token_tables.{domain}.weight'] = tables[domain * vocab : (domain + 1) * vocab]
    state[f'token_projections.{domain}.weight'] = as_array(encoder.domain_projection)[domain].T
  if cfg.num_codebooks == 2:
    state['beats_table.weight'] = as_array(encoder.embeddings[1].embedding)
  linear('input_proj', backbone.input_projection, rows=official)
  roll = (np.arange(d) + d // 2) % d  # official [cos | sin] from our [sin | cos]
  linear('time_embed.0', backbone.time_mlp_in, columns=roll)
  linear('time_embed.2', backbone.time_mlp_out)

  modulation_rows = np.concatenate([k * d + official for k in OURS_CHUNK])
  for layer in range(cfg.num_layers):
    weight = lambda module, i=layer: as_array(module.kernel)[i].T
    bias = lambda module, i=layer: as_array(module.bias)[i]
    prefix = f'blocks.{layer}'
    state[f'{prefix}.time_mlp.1.weight'] = weight(blocks.modulation)[modulation_rows]
    state[f'{prefix}.time_mlp.1.bias'] = bias(blocks.modulation)[modulation_rows]
    state[f'{prefix}.attn.in_proj_weight'] = weight(blocks.qkv)[:, official]
    state[f'{prefix}.attn.in_proj_bias'] = bias(blocks.qkv)
    state[f'{prefix}.attn.out_proj.weight'] = weight(blocks.attn_out)[official]
    state[f'{prefix}.attn.out_proj.bias'] = bias(blocks.attn_out)[official]
    state[f'{prefix}.ff.0.weight'] = weight(blocks.mlp_in)[:, official]
    state[f'{prefix}.ff.0.bias'] = bias(blocks.mlp_in)
    state[f'{prefix}.ff.3.weight'] = weight(blocks.mlp_out)[official]
    state[f'{prefix}.ff.3.bias'] = bias(blocks.mlp_out)[official]
    for domain, heads in enumerate(model.repa_heads.per_domain):
      head = f'repa_heads.{domain}.{layer}'
      state[f'{head}.0.weight'] = as_array(heads.hidden.kernel)[layer].T[:, official]
      state[f'{head}.0.bias'] = as_array(heads.hidden.bias)[layer]
      state[f'{head}.2.weight'] = as_array(heads.out.kernel)[layer].T
      state[f'{head}.2.bias'] = as_array(heads.out.bias)[layer]

  state['output_layer.0.weight'] = as_array(backbone.output_norm.scale)[official]
  state['output_layer.0.bias'] = as_array(backbone.output_norm.bias)[official]
  linear('output_layer.1', backbone.output_projection, columns=official)
  for domain, projection in enumerate(model.bitc_heads.projections):
    linear(f'teacher_proj.{domain}', projection)

  state['pos_emb'] = reference.pos_emb.numpy()
  reference.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()})
