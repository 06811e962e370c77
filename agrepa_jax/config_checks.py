"""What each config value may be, checked before a run writes anything.

RULES maps a key to the values it allows (a range, or a set of choices that the code using the key
defines). `check(config)` raises console.UsageError (exit status 2) naming every key outside its
rule, and every key that base_config does not define (a typo in a config file would otherwise
leave the intended setting at its default). Keys without a rule are checked where they are used.
"""

import dataclasses
import difflib
import math

import ml_collections

from agrepa_jax import config_base, losses, model, selection
from agrepa_jax.console import UsageError
from agrepa_jax.data import sources
from agrepa_jax.generation import sampler

# A config may add to base_config: the compare workflow's section, and entries of the open sections
# (more mesh presets; more teachers, say as FAD embeddings: eval.embeddings names them).
ADDED_SECTIONS = ('compare',)
OPEN_SECTIONS = ('mesh.presets', 'teachers')


@dataclasses.dataclass(frozen=True)
class Range:
  """Numbers from `low` to `high`, each end included unless open; integers only if `integer`."""

  low: float = -math.inf
  high: float = math.inf
  low_open: bool = False
  high_open: bool = False
  integer: bool = False

  def allows(self, value) -> bool:
    kinds = int if self.integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
      return False
    above = value > self.low if self.low_open else value >= self.low
    below = value < self.high if self.high_open else value <= self.high
    return above and below

  def __str__(self) -> str:
    kind = 'an integer' if self.integer else 'a number'
    if self.high == math.inf:
      return f'{kind} {">" if self.low_open else "≥"} {self.low:g}'
    brackets = '(' if self.low_open else '[', ')' if self.high_open else ']'
    return f'{kind} in {brackets[0]}{self.low:g}, {self.high:g}{brackets[1]}'


@dataclasses.dataclass(frozen=True)
class OneOf:
  choices: tuple

  def allows(self, value) -> bool:
    return value in self.choices

  def __str__(self) -> str:
    return 'one of ' + ', '.join(repr(c) for c in self.choices)


def at_least(low: int) -> Range:
  return Range(low=low, integer=True)


POSITIVE = Range(low=0, low_open=True)
NON_NEGATIVE = Range(low=0)
PROBABILITY = Range(0, 1)
BELOW_ONE = Range(0, 1, high_open=True)  # a decay, a dropout rate, a held-out share

RULES = {
  'num_steps': at_least(1),
  'batch_size': at_least(1),
  'log_every': at_least(1),
  'eval_every': at_least(0),  # 0: no held-out evaluation
  'eval_batches': at_least(1),
  'checkpoint_every': at_least(1),
  'keep_checkpoints': at_least(1),  # 0 would delete every checkpoint, the newest included
  'stop_check_every': at_least(1),
  'optim.learning_rate': POSITIVE,  # negative: gradient ascent
  'optim.b1': BELOW_ONE,
  'optim.b2': BELOW_ONE,
  'optim.weight_decay': NON_NEGATIVE,
  'optim.grad_clip': POSITIVE,
  'optim.pct_start': Range(0, 1, low_open=True, high_open=True),
  'optim.div_factor': POSITIVE,
  'optim.final_div_factor': POSITIVE,
  'optim.ema_decay': BELOW_ONE,
  'model.num_layers': at_least(1),
  'model.width': at_least(1),
  'model.num_heads': at_least(1),
  'model.mlp_ratio': POSITIVE,
  'model.dropout': BELOW_ONE,
  'model.token_dim': at_least(1),
  'model.vocab_size': at_least(1),
  'model.num_codebooks': OneOf((1, 2)),
  'model.remat': OneOf(tuple(model.REMAT_POLICIES)),
  'model.dropout_rng': OneOf(model.DROPOUT_RNGS),
  **{f'model.{k}': OneOf(v) for k, v in model.FORM_CHOICES.items() if k != 'bitc_form'},
  'bitc.form': OneOf(model.FORM_CHOICES['bitc_form']),
  'flow.noise_std': POSITIVE,
  'flow.max_prompt_fraction': PROBABILITY,
  'flow.token_drop_prob': PROBABILITY,
  'flow.reference_drop_prob': PROBABILITY,
  'repa.selection': OneOf(tuple(selection.SELECTIONS)),
  'repa.granularity': OneOf(losses.GRANULARITIES),
  'repa.probe_every': at_least(1),
  'repa.score_ema': BELOW_ONE,
  'data.clip_seconds': POSITIVE,
  'data.heldout_fraction': BELOW_ONE,
  'data.token_rate': POSITIVE,
  'data.chunk_size': at_least(1),
  'data.shard_clips': at_least(1),
  'data.max_seconds': NON_NEGATIVE,
  'data.tokenizer_clips': at_least(1),
  'data.claim_timeout': POSITIVE,
  'data.mel_via_rate': at_least(0),
  'teachers.padding': OneOf(('masked', 'official')),
  **{f'data.datasets.{d}': OneOf(sources.CORPORA) for d in ('speech', 'audio')},
  'data.num_workers': at_least(0),
  'probe.batch_size': at_least(1),
  'probe.top_k': at_least(1),
  'probe.lambda_rule': OneOf(tuple(selection.LAMBDA_RULES)),
  'sample.num_points': at_least(2),
  'sample.cfg_form': OneOf(sampler.CFG_FORMS),
  'sample.batch_size': at_least(1),
  'eval.batch_size': at_least(1),
}


def flat_items(config: ml_collections.ConfigDict, prefix: str = ''):
  """(dotted key, value) of every leaf of `config`."""
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from flat_items(value, f'{prefix}{key}.')
    else:
      yield f'{prefix}{key}', value


def unknown_keys(config, known, prefix: str = '') -> list[str]:
  """Problems naming each key of `config` that `known` (base_config) lacks and may not add."""
  problems = []
  for key, value in config.items():
    name = f'{prefix}{key}'
    if key not in known:
      if name not in ADDED_SECTIONS and prefix[:-1] not in OPEN_SECTIONS:
        close = difflib.get_close_matches(key, list(known.keys()), n=1)
        hint = f' (did you mean {prefix}{close[0]}?)' if close else ''
        problems.append(f'{name}: no such key{hint}')
    elif isinstance(value, ml_collections.ConfigDict) and isinstance(
      known[key], ml_collections.ConfigDict
    ):
      problems += unknown_keys(value, known[key], f'{name}.')
  return problems


def check(config):
  """Raises UsageError naming every unknown key and every value outside its rule in RULES."""
  problems = unknown_keys(config, config_base.base_config())
  values = dict(flat_items(config))
  problems += [
    f'{key}={values[key]!r}: expected {rule}'
    for key, rule in RULES.items()
    if key in values and not rule.allows(values[key])
  ]
  if problems:
    raise UsageError('; '.join(problems))
