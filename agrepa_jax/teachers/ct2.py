"""Reader for CTranslate2 `model.bin` files: converted checkpoints load without ctranslate2.

Layout (binary versions 4–6, all little-endian): uint32 version; string spec name; uint32 spec
revision; uint32 variable count; per variable: string name, uint8 rank, rank × uint32 dims, uint8
dtype id, uint32 byte count, raw data; then uint32 alias count and (alias, target) string pairs.
A string is a uint16 length that counts its trailing NUL, then the UTF-8 bytes and the NUL.
"""

import dataclasses
import os
import struct

import numpy as np

SUPPORTED_VERSIONS = (4, 5, 6)
# Index = CTranslate2's DataType id; bfloat16 has no numpy dtype and is read as raw uint16 bits.
DTYPES = ('float32', 'int8', 'int16', 'int32', 'float16', 'bfloat16')


class CT2FormatError(ValueError):
  """A file that is not a readable CTranslate2 model.bin."""


@dataclasses.dataclass(frozen=True)
class CT2Model:
  spec_name: str  # e.g. 'WhisperSpec'
  spec_revision: int
  variables: dict[str, np.ndarray]

  def __getitem__(self, name: str) -> np.ndarray:
    return self.variables[name]


class _Cursor:
  """Reads little-endian values from a bytes buffer, raising CT2FormatError past its end."""

  def __init__(self, data: bytes, path: str):
    self.data = data
    self.offset = 0
    self.path = path

  def take(self, size: int) -> memoryview:
    if self.offset + size > len(self.data):
      raise CT2FormatError(
        f'{self.path}: truncated CTranslate2 model.bin (needs {size} bytes at '
        f'offset {self.offset}, file has {len(self.data)})'
      )
    view = memoryview(self.data)[self.offset : self.offset + size]
    self.offset += size
    return view

  def unpack(self, fmt: str) -> int:
    return struct.unpack('<' + fmt, self.take(struct.calcsize(fmt)))[0]

  def string(self) -> str:
    length = self.unpack('H')
    raw = bytes(self.take(length))
    if not raw.endswith(b'\0'):
      raise CT2FormatError(f'{self.path}: malformed string at offset {self.offset - length}')
    return raw[:-1].decode('utf-8')


def bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
  return (bits.astype(np.uint32) << 16).view(np.float32)


def _array(
  raw: memoryview, dtype_name: str, shape: tuple[int, ...], as_float32: bool
) -> np.ndarray:
  storage = 'uint16' if dtype_name == 'bfloat16' else dtype_name
  array = np.frombuffer(raw, dtype=np.dtype(storage).newbyteorder('<')).reshape(shape)
  if not as_float32:
    return array.copy()
  if dtype_name == 'bfloat16':
    return bfloat16_to_float32(array)
  if dtype_name in ('float16', 'float32'):
    return array.astype(np.float32)
  return array.copy()


def read_ct2_model(path: str | os.PathLike, as_float32: bool = True) -> CT2Model:
  """Parses a CTranslate2 model.bin (or a directory holding one) into named numpy arrays.

  as_float32: convert float16/bfloat16 weights to float32 (integer variables keep their dtype).
  Aliases become extra names that point at the same array.
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    path = os.path.join(path, 'model.bin')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: no such file (expected a CTranslate2 model.bin)')
  with open(path, 'rb') as f:
    cursor = _Cursor(f.read(), path)
  version = cursor.unpack('I')
  if version not in SUPPORTED_VERSIONS:
    raise CT2FormatError(
      f'{path}: not a CTranslate2 model.bin of a supported binary version '
      f'(header says {version}, supported {SUPPORTED_VERSIONS})'
    )
  spec_name = cursor.string()
  spec_revision = cursor.unpack('I')
  variables = {}
  for _ in range(cursor.unpack('I')):
    name = cursor.string()
    shape = tuple(cursor.unpack('I') for _ in range(cursor.unpack('B')))
    type_id = cursor.unpack('B')
    if type_id >= len(DTYPES):
      raise CT2FormatError(f'{path}: variable {name!r} has unknown dtype id {type_id}')
    num_bytes = cursor.unpack('I')
    dtype_name = DTYPES[type_id]
    storage_size = 2 if dtype_name == 'bfloat16' else np.dtype(dtype_name).itemsize
    if num_bytes != int(np.prod(shape)) * storage_size:
      raise CT2FormatError(
        f'{path}: variable {name!r} of shape {shape} and dtype {dtype_name} '
        f'declares {num_bytes} bytes'
      )
    variables[name] = _array(cursor.take(num_bytes), dtype_name, shape, as_float32)
  for _ in range(cursor.unpack('I')):
    alias, target = cursor.string(), cursor.string()
    variables[alias] = variables[target]
  return CT2Model(spec_name, spec_revision, variables)
