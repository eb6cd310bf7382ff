"""Line-by-line reading of local UTF-8 text files, plain or gzip'd, with errors that name
the file and the line.

The data files a run trains on (the TSV corpora of `tsv_builder`, the LM corpus) are read
through `read_lines`, so a bad file fails with `<path> line 17: invalid UTF-8 (...)` or
`<path>: truncated gzip stream after line 1200` instead of the codec's `position 4322`
or gzip's `Not a gzipped file (b'Re')`, which name no file.
"""

from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Iterator

GZIP_MAGIC = b'\x1f\x8b'


def read_lines(path: str) -> Iterator[tuple[int, str]]:
  """Yields (line number counted from 1, line without its '\\n' or '\\r\\n').

  A path ending in `.gz` is read as gzip, any other path as plain text; both must be
  UTF-8.

  Raises:
    FileNotFoundError: there is no such file.
    ValueError naming the path: a `.gz` file that is not gzip, gzip data in a file not
      named `.gz`, a truncated or corrupt gzip stream (with the last good line), invalid
      UTF-8 (with line, byte and column).
  """
  with open(path, 'rb') as f:
    head = f.read(2)
  name = os.path.basename(path)
  compressed = path.endswith('.gz')
  if compressed and head and head != GZIP_MAGIC:
    raise ValueError(f'{path}: not a gzip file (starts with {head!r}); rename it to '
                     f'{name[:-3]} or recompress it')
  if not compressed and head == GZIP_MAGIC:
    raise ValueError(f'{path}: gzip data in a file not named .gz; rename it to {name}.gz')
  line_no = 0
  with (gzip.open if compressed else open)(path, 'rb') as f:
    try:
      for line_no, raw in enumerate(f, start=1):
        yield line_no, _decode(raw, path, line_no).removesuffix('\n').removesuffix('\r')
    except EOFError:  # the stream ends before gzip's end-of-stream marker
      raise ValueError(f'{path}: truncated gzip stream after line {line_no}') from None
    except (gzip.BadGzipFile, zlib.error) as e:  # a CRC or length mismatch, bad deflate data
      raise ValueError(f'{path}: corrupt gzip stream after line {line_no} ({e})') from None


def _decode(raw: bytes, path: str, line_no: int) -> str:
  """raw: one line's bytes -> str, or ValueError naming the first bad byte and its column."""
  try:
    return raw.decode('utf-8')
  except UnicodeDecodeError as e:
    column = len(raw[:e.start].decode('utf-8')) + 1  # characters, as an editor counts them
    raise ValueError(f'{path} line {line_no}: invalid UTF-8 (byte 0x{raw[e.start]:02x} at '
                     f'column {column})') from None
