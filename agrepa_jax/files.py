"""Paths that may be local or in an object store (gs://, s3://): every file a run writes goes
through etils.epath, so a workdir on a bucket works like a local one.

Object stores have no append and no rename-over; the helpers here write whole objects there and
use the cheaper local operations on local disks.
"""

import csv
import io
import json
import math
import os
import uuid

from etils import epath


def as_path(text: str | os.PathLike) -> epath.Path:
  """`text` as a path: URIs (gs://bucket/run) stay as they are, local paths become absolute.

  (pathlib would silently turn gs://bucket/run into the local directory gs:/bucket/run.)
  """
  path = epath.Path(text)
  return path if not is_local(path) else epath.Path(os.path.abspath(os.path.expanduser(text)))


def is_local(path: epath.Path) -> bool:
  return '://' not in os.fspath(path)


def write_atomic(path: epath.Path, content: str | bytes):
  """Readers see the old or the new content, never a partial file (a temporary, then renamed)."""
  temporary = path.parent / f'.{path.name}.{uuid.uuid4().hex}'
  if isinstance(content, bytes):
    temporary.write_bytes(content)
  else:
    temporary.write_text(content)
  temporary.replace(path)


def append_line(path: epath.Path, line: str):
  """Appends `line` and a newline; on an object store, rewrites the object with it appended."""
  if is_local(path):
    with path.open('a') as f:
      f.write(line + '\n')
    return
  old = path.read_text() if path.exists() else ''
  write_atomic(path, old + line + '\n')


def write_csv(path: epath.Path, columns, rows):
  """A CSV with header `columns`; rows are dicts (other keys left out) or sequences in column
  order."""
  buffer = io.StringIO()
  writer = csv.writer(buffer)
  writer.writerow(columns)
  for row in rows:
    writer.writerow([row.get(c, '') for c in columns] if isinstance(row, dict) else row)
  path.write_bytes(buffer.getvalue().encode())


def save_figure(figure, path: epath.Path, **savefig_options):
  """Writes a matplotlib figure as a PNG to `path` (local or object store)."""
  buffer = io.BytesIO()
  figure.savefig(buffer, format='png', **savefig_options)
  path.write_bytes(buffer.getvalue())


def _finite_or_none(value):
  if isinstance(value, float):
    return value if math.isfinite(value) else None
  if isinstance(value, dict):
    return {k: _finite_or_none(v) for k, v in value.items()}
  if isinstance(value, list | tuple):
    return [_finite_or_none(v) for v in value]
  return value


def json_text(value, **dumps_options) -> str:
  """JSON that every reader parses: a NaN or infinite float (an undefined score) is null, where
  json.dumps would write a bare NaN that jq, JavaScript and strict parsers reject."""
  return json.dumps(_finite_or_none(value), allow_nan=False, **dumps_options)
