"""Word error rate: word-level edit distance and corpus WER of texts normalized by Whisper's
English text normalizer (generation/normalizer.py), applied to references and hypotheses alike, so
that "2024", "twenty twenty four" and "two thousand and twenty four" compare as they do in Whisper
evaluations.
"""

import dataclasses
from typing import Protocol

import numpy as np

from agrepa_jax.generation.normalizer import normalize_english


class Transcriber(Protocol):
  def transcribe(self, audio_16k: np.ndarray, num_samples: np.ndarray) -> list[str]:
    """Text of each clip of (B, N) float32 16 kHz audio, zero-padded past its num_samples (B,)."""
    ...


@dataclasses.dataclass(frozen=True)
class EditCounts:
  substitutions: int
  deletions: int  # reference words missing from the hypothesis
  insertions: int  # hypothesis words absent from the reference
  reference_words: int

  @property
  def errors(self) -> int:
    return self.substitutions + self.deletions + self.insertions

  def __add__(self, other: 'EditCounts') -> 'EditCounts':
    return EditCounts(
      *(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other)))
    )


def word_edits(reference: list[str], hypothesis: list[str]) -> EditCounts:
  """Minimum word edits turning `reference` into `hypothesis`, split by kind.

  Among minimal alignments the backtrace prefers match/substitution, then deletion, then insertion.
  """
  n, m = len(reference), len(hypothesis)
  cost = np.zeros((n + 1, m + 1), np.int64)
  cost[:, 0] = np.arange(n + 1)
  cost[0, :] = np.arange(m + 1)
  for i in range(1, n + 1):
    for j in range(1, m + 1):
      cost[i, j] = min(
        cost[i - 1, j - 1] + (reference[i - 1] != hypothesis[j - 1]),
        cost[i - 1, j] + 1,
        cost[i, j - 1] + 1,
      )
  substitutions = deletions = insertions = 0
  i, j = n, m
  while i or j:
    if i and j and cost[i, j] == cost[i - 1, j - 1] + (reference[i - 1] != hypothesis[j - 1]):
      substitutions += int(reference[i - 1] != hypothesis[j - 1])
      i, j = i - 1, j - 1
    elif i and cost[i, j] == cost[i - 1, j] + 1:
      deletions += 1
      i -= 1
    else:
      insertions += 1
      j -= 1
  return EditCounts(substitutions, deletions, insertions, n)


def corpus_edits(references: list[str], hypotheses: list[str]) -> EditCounts:
  """Summed edits of normalized texts, pair by pair."""
  if len(references) != len(hypotheses):
    raise ValueError(f'{len(references)} references but {len(hypotheses)} hypotheses')
  total = EditCounts(0, 0, 0, 0)
  for reference, hypothesis in zip(references, hypotheses):
    total += word_edits(normalize_english(reference).split(), normalize_english(hypothesis).split())
  return total


def corpus_wer(references: list[str], hypotheses: list[str]) -> float:
  """Total edits / total reference words over the corpus (not a mean of per-clip rates)."""
  edits = corpus_edits(references, hypotheses)
  if edits.reference_words == 0:
    raise ValueError('WER needs at least one reference word')
  return edits.errors / edits.reference_words
