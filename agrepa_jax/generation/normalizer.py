"""Whisper's English text normalization, the standard preparation of texts for Whisper-based WER.

`normalize_english` reproduces the behavior of Whisper's EnglishTextNormalizer (parity-tested
against the `transformers` implementation) in these steps:
  1. lowercase; drop text in <…>, […] and (…), and the fillers hmm, mm, mhm, mmm, uh, um;
  2. expand contractions and titles ("won't" -> "will not", "dr" -> "doctor", "'ve" -> " have");
  3. drop thousands separators and periods that do not start a decimal; every other symbol and
     punctuation mark becomes a space, diacritics are dropped, but . % $ ¢ € £ stay for numbers;
  4. spelled-out numbers become digits ("twenty one" -> "21", "two point five" -> "2.5",
     "five dollars" -> "$5", "ten per cent" -> "10%", "third" -> "3rd"; "1" is written "one");
  5. British spellings become American (english_spellings.json, the table shipped with OpenAI
     Whisper, MIT license, copyright 2022 OpenAI);
  6. currency and decimal symbols not next to a digit are dropped; whitespace collapsed.
"""

import fractions
import functools
import json
import pathlib
import re
import unicodedata
from collections.abc import Iterator

SPELLINGS_FILE = pathlib.Path(__file__).with_name('english_spellings.json')

FILLERS = re.compile(r'\b(hmm|mm|mhm|mmm|uh|um)\b')
WHOLE_WORD_CONTRACTIONS = {
  "won't": 'will not',
  "can't": 'can not',
  "let's": 'let us',
  "ain't": 'aint',
  "y'all": 'you all',
  'wanna': 'want to',
  'gotta': 'got to',
  'gonna': 'going to',
  "i'ma": 'i am going to',
  'imma': 'i am going to',
  'woulda': 'would have',
  'coulda': 'could have',
  'shoulda': 'should have',
  "ma'am": 'madam',
}
TITLES = {
  'mr': 'mister',
  'mrs': 'missus',
  'st': 'saint',
  'dr': 'doctor',
  'prof': 'professor',
  'capt': 'captain',
  'gov': 'governor',
  'ald': 'alderman',
  'gen': 'general',
  'sen': 'senator',
  'rep': 'representative',
  'pres': 'president',
  'rev': 'reverend',
  'hon': 'honorable',
  'asst': 'assistant',
  'assoc': 'associate',
  'lt': 'lieutenant',
  'col': 'colonel',
  'jr': 'junior',
  'sr': 'senior',
  'esq': 'esquire',
}
# Applied after the whole words above, in this order ("'d been" before "'d", "n't" before "'t").
SUFFIX_CONTRACTIONS = {
  "'d been": ' had been',
  "'s been": ' has been',
  "'d gone": ' had gone',
  "'s gone": ' has gone',
  "'d done": ' had done',
  "'s got": ' has got',
  "n't": ' not',
  "'re": ' are',
  "'s": ' is',
  "'d": ' would',
  "'ll": ' will',
  "'t": ' not',
  "'ve": ' have',
  "'m": ' am',
}
REWRITES = (
  *((re.compile(rf'\b{re.escape(k)}\b'), v) for k, v in WHOLE_WORD_CONTRACTIONS.items()),
  *((re.compile(rf'\b{k}\b'), f'{v} ') for k, v in TITLES.items()),
  *((re.compile(rf'{re.escape(k)}\b'), v) for k, v in SUFFIX_CONTRACTIONS.items()),
)

NUMERIC_SYMBOLS = '.%$¢€£'
# Letters that NFKD does not split into a base letter and a combining mark.
LETTER_FOLDS = {
  'œ': 'oe',
  'Œ': 'OE',
  'ø': 'o',
  'Ø': 'O',
  'æ': 'ae',
  'Æ': 'AE',
  'ß': 'ss',
  'ẞ': 'SS',
  'đ': 'd',
  'Đ': 'D',
  'ð': 'd',
  'Ð': 'D',
  'þ': 'th',
  'Þ': 'th',
  'ł': 'l',
  'Ł': 'L',
}

ZEROS = frozenset({'o', 'oh', 'zero'})
UNITS = {
  name: value
  for value, name in enumerate(
    'one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen '
    'sixteen seventeen eighteen nineteen'.split(),
    start=1,
  )
}
TENS = {
  name: 10 * value
  for value, name in enumerate('twenty thirty forty fifty sixty seventy eighty ninety'.split(), 2)
}
MULTIPLIERS = {
  name: 1000**power
  for power, name in enumerate(
    'thousand million billion trillion quadrillion quintillion sextillion septillion octillion '
    'nonillion decillion'.split(),
    start=1,
  )
} | {'hundred': 100}
IRREGULAR_ORDINALS = {'first': 1, 'second': 2, 'third': 3, 'fifth': 5, 'twelfth': 12}


def _unit_ordinal(name: str) -> str:
  return name + ('h' if name.endswith('t') else 'th')  # eight -> eighth, nine -> nineth


# Number words that carry a suffix ('s' plural or ordinal) and end the number they close.
SUFFIXED_UNITS = (
  {('sixes' if name == 'six' else name + 's'): (v, 's') for name, v in UNITS.items()}
  | {'zeroth': (0, 'th')}
  | {name: (v, {1: 'st', 2: 'nd', 3: 'rd'}.get(v, 'th')) for name, v in IRREGULAR_ORDINALS.items()}
  | {_unit_ordinal(n): (v, 'th') for n, v in UNITS.items() if v > 3 and v not in (5, 12)}
)
SUFFIXED_TENS = {n.replace('y', 'ies'): (v, 's') for n, v in TENS.items()} | {
  n.replace('y', 'ieth'): (v, 'th') for n, v in TENS.items()
}
SUFFIXED_MULTIPLIERS = {n + 's': (v, 's') for n, v in MULTIPLIERS.items()} | {
  n + 'th': (v, 'th') for n, v in MULTIPLIERS.items()
}
SIGN_WORDS = {'minus': '-', 'negative': '-', 'plus': '+', 'positive': '+'}
CURRENCY_WORDS = {
  'pound': '£',
  'pounds': '£',
  'euro': '€',
  'euros': '€',
  'dollar': '$',
  'dollars': '$',
  'cent': '¢',
  'cents': '¢',
}
PREFIX_SYMBOLS = frozenset(SIGN_WORDS.values()) | frozenset(CURRENCY_WORDS.values())
PERCENT_WORDS = {'percent': '%', 'per': {'cent': '%'}}
JOINERS = frozenset({'and', 'double', 'triple', 'point'})
DECIMAL_DIGIT_WORDS = ZEROS | UNITS.keys() | TENS.keys()
NUMBER_WORDS = (
  DECIMAL_DIGIT_WORDS
  | SUFFIXED_UNITS.keys()
  | SUFFIXED_TENS.keys()
  | MULTIPLIERS.keys()
  | SUFFIXED_MULTIPLIERS.keys()
  | SIGN_WORDS.keys()
  | CURRENCY_WORDS.keys()
  | PERCENT_WORDS.keys()
  | JOINERS
)
ARABIC = re.compile(r'^\d+(\.\d+)?$')


def fold_symbols(text: str) -> str:
  """NFKD text with diacritics dropped, special letters folded, and every mark, symbol and
  punctuation character a space, except those in NUMERIC_SYMBOLS."""

  def fold(char: str) -> str:
    if char in NUMERIC_SYMBOLS:
      return char
    if char in LETTER_FOLDS:
      return LETTER_FOLDS[char]
    category = unicodedata.category(char)
    if category == 'Mn':
      return ''
    return ' ' if category[0] in 'MSP' else char

  return ''.join(fold(c) for c in unicodedata.normalize('NFKD', text))


def _as_fraction(value) -> fractions.Fraction | None:
  try:
    return fractions.Fraction(value)
  except ValueError:
    return None


def _append_count(value: int | str | None, count: int, previous: str | None) -> int | str:
  """The number so far after the word for `count` (1–19 or a multiple of ten up to 90).

  An int is a quantity being summed ("twenty" "one" -> 21); a str is read digit by digit ("one"
  "oh" "one" -> "101"), and so is a count after a unit word ("one" "twenty" -> "120").
  """
  if value is None:
    return count
  is_unit = count < 20
  if isinstance(value, str) or (is_unit and previous in UNITS):
    if is_unit and count < 10 and previous in TENS:
      return value[:-1] + str(count)  # "oh twenty" "five" -> "025"
    return f'{value}{count}'
  place = 10 if count < 10 else 100
  return value + count if value % place == 0 else f'{value}{count}'


def _scale(value: int, multiplier: int) -> int:
  """An int times a multiplier word, applied to the part below a thousand ("two thousand three"
  "hundred" -> 2300)."""
  return value // 1000 * 1000 + value % 1000 * multiplier


class _NumberReader:
  """Turns words into tokens with spelled-out numbers written in digits (see `read`).

  State: the number being read (`value`, see `_append_count`) and a pending sign or currency
  symbol (`prefix`); emitting a token attaches the prefix and clears both.
  """

  def __init__(self):
    self.value: int | str | None = None
    self.prefix: str | None = None

  def emit(self, token) -> str:
    token = f'{self.prefix or ""}{token}'
    self.value = self.prefix = None
    return token

  def flush(self) -> Iterator[str]:
    if self.value is not None:
      yield self.emit(self.value)

  def read(self, words: list[str]) -> Iterator[str]:
    skip_next = False
    for i, word in enumerate(words):
      if skip_next:
        skip_next = False
        continue
      previous = words[i - 1] if i else None
      following = words[i + 1] if i + 1 < len(words) else None
      skip_next = yield from self.read_word(word, previous, following)
    yield from self.flush()

  def read_word(self, word: str, previous, following) -> Iterator[str]:
    """Tokens completed by `word`; returns True when `word` consumed `following` as well."""
    following_is_number = following is not None and ARABIC.match(following) is not None
    following_can_be_number = following in NUMBER_WORDS or following_is_number
    prefixed = word[0] in PREFIX_SYMBOLS
    bare = word[1:] if prefixed else word
    if ARABIC.match(bare):
      if self.value is not None:
        if isinstance(self.value, str) and self.value.endswith('.'):
          self.value += word  # the digits after "point"
          return False
        yield self.emit(self.value)
      if prefixed:
        self.prefix = word[0]
      number = fractions.Fraction(bare)
      self.value = number.numerator if number.denominator == 1 else bare
    elif word not in NUMBER_WORDS:
      yield from self.flush()
      yield self.emit(word)
    elif word in ZEROS:
      self.value = f'{self.value or ""}0'
    elif word in UNITS or word in TENS:
      self.value = _append_count(self.value, UNITS.get(word) or TENS[word], previous)
    elif word in SUFFIXED_UNITS or word in SUFFIXED_TENS:
      count, suffix = SUFFIXED_UNITS.get(word) or SUFFIXED_TENS[word]
      yield self.emit(f'{_append_count(self.value, count, previous)}{suffix}')
    elif word in MULTIPLIERS:
      yield from self.multiply(MULTIPLIERS[word])
    elif word in SUFFIXED_MULTIPLIERS:
      yield from self.multiply_and_close(*SUFFIXED_MULTIPLIERS[word])
    elif word in SIGN_WORDS:
      yield from self.flush()
      if following_can_be_number:
        self.prefix = SIGN_WORDS[word]
      else:
        yield self.emit(word)
    elif word in CURRENCY_WORDS:
      if self.value is None:
        yield self.emit(word)
      else:
        self.prefix = CURRENCY_WORDS[word]
        yield self.emit(self.value)
    elif word in PERCENT_WORDS:
      return (yield from self.percent(PERCENT_WORDS[word], word, following))
    else:
      return (yield from self.joiner(word, previous, following, following_is_number))
    return False

  def multiply(self, multiplier: int) -> Iterator[str]:
    if self.value is None:
      self.value = multiplier
    elif isinstance(self.value, str) or self.value == 0:
      product = _as_fraction(self.value)
      product = None if product is None else product * multiplier
      if product is not None and product.denominator == 1:
        self.value = product.numerator
      else:
        yield self.emit(self.value)
        self.value = multiplier
    else:
      self.value = _scale(self.value, multiplier)

  def multiply_and_close(self, multiplier: int, suffix: str) -> Iterator[str]:
    if self.value is None:
      yield self.emit(f'{multiplier}{suffix}')
    elif isinstance(self.value, str):
      product = _as_fraction(self.value)
      product = None if product is None else product * multiplier
      if product is not None and product.denominator == 1:
        yield self.emit(f'{product.numerator}{suffix}')
      else:
        yield self.emit(self.value)
        yield self.emit(f'{multiplier}{suffix}')
    else:
      yield self.emit(f'{_scale(self.value, multiplier)}{suffix}')

  def percent(self, symbol, word: str, following) -> Iterator[str]:
    """'percent', or 'per' that makes a percent sign with the word after it ('per cent')."""
    if self.value is None:
      yield self.emit(word)
      return False
    if isinstance(symbol, str):
      yield self.emit(f'{self.value}{symbol}')
      return False
    if following in symbol:
      yield self.emit(f'{self.value}{symbol[following]}')
      return True
    yield self.emit(self.value)
    yield self.emit(word)
    return False

  def joiner(self, word: str, previous, following, following_is_number) -> Iterator[str]:
    """'and' (skipped after a multiplier), 'double'/'triple' (repeat the next digit) and 'point'
    (start decimals); each only where the next word can be part of a number."""
    following_can_be_number = following in NUMBER_WORDS or following_is_number
    if not following_can_be_number or (word == 'and' and previous not in MULTIPLIERS):
      yield from self.flush()
      yield self.emit(word)
    elif word in ('double', 'triple'):
      if following in UNITS or following in ZEROS:
        digit = str(UNITS.get(following, 0))
        self.value = f'{self.value or ""}{digit * (2 if word == "double" else 3)}'
        return True
      yield from self.flush()
      yield self.emit(word)
    elif word == 'point' and (following in DECIMAL_DIGIT_WORDS or following_is_number):
      self.value = f'{self.value or ""}.'
    return False


def _half_to_point_five(text: str) -> str:
  """'<number> and a half' -> '<number> point five'; pieces that are only spaces are dropped."""
  pieces = re.split(r'\band\s+a\s+half\b', text)
  out = []
  for i, piece in enumerate(pieces):
    if not piece.strip():
      continue
    out.append(piece)
    if i < len(pieces) - 1:
      last = piece.split()[-1]
      numeric = last in DECIMAL_DIGIT_WORDS or last in MULTIPLIERS
      out.append('point five' if numeric else 'and a half')
  return ' '.join(out)


def _join_currency_cents(text: str) -> str:
  """'$2 and ¢7' -> '$2.07'; '$0.5' -> '¢5'; and 'one(s)' for a lone '1(s)'."""
  text = re.sub(
    r'([€£$])([0-9]+) (?:and )?¢([0-9]{1,2})\b',
    lambda m: f'{m[1]}{m[2]}.{int(m[3]):02d}',
    text,
  )
  text = re.sub(r'[€£$]0.([0-9]{1,2})\b', lambda m: f'¢{int(m[1])}', text)
  return re.sub(r'\b1(s?)\b', r'one\1', text)


def standardize_numbers(text: str) -> str:
  """Spelled-out numbers in digits (step 4 of the module docstring)."""
  text = _half_to_point_five(text)
  text = re.sub(r'([a-z])([0-9])', r'\1 \2', text)
  text = re.sub(r'([0-9])([a-z])', r'\1 \2', text)
  text = re.sub(r'([0-9])\s+(st|nd|rd|th|s)\b', r'\1\2', text)  # keep 21st, 1960s together
  return _join_currency_cents(' '.join(_NumberReader().read(text.split())))


@functools.cache
def english_spellings() -> dict[str, str]:
  """British -> American spelling of single words."""
  return json.loads(SPELLINGS_FILE.read_text())


def normalize_english(text: str) -> str:
  """`text` normalized as Whisper's EnglishTextNormalizer does (see the module docstring)."""
  text = text.lower()
  text = re.sub(r'[<\[][^>\]]*[>\]]', '', text)
  text = re.sub(r'\(([^)]+?)\)', '', text)
  text = FILLERS.sub('', text)
  text = re.sub(r"\s+'", "'", text)
  for pattern, replacement in REWRITES:
    text = pattern.sub(replacement, text)
  text = re.sub(r'(\d),(\d)', r'\1\2', text)
  text = re.sub(r'\.([^0-9]|$)', r' \1', text)
  text = standardize_numbers(fold_symbols(text))
  spellings = english_spellings()
  text = ' '.join(spellings.get(word, word) for word in text.split())
  text = re.sub(r'[.$¢€£]([^0-9])', r' \1', text)
  text = re.sub(r'([^0-9])%', r'\1 ', text)
  return re.sub(r'\s+', ' ', text)
