"""User tables (TSV/CSV with a header, JSONL) -> TFDS array_record splits of string columns.

The classification, QA and summarization tasks train on files a user brings. This module
reads them row by row, reports bad rows through one `records.RowErrors` per split (file
and line named; skipped or fatal by ``config.data.on_bad_row``), and writes the good rows
once into a TFDS dataset whose features are the requested columns (all strings)::

    builder = prepare_table_builder({'train': 'a.tsv.gz', 'validation': 'b.tsv.gz'},
                                    columns=('text', 'label'), data_dir='/tmp/tfds',
                                    name='movie', on_bad_row='skip')
    source = table_source(builder, 'train')     # len(source), source[i] -> {'text': str, ...}

The prepared dataset is keyed on the files' paths, sizes, mtimes and sha256, the columns,
the format and ``allow_empty``, so an edited file is rebuilt and an unchanged one is read
as a data source. The bad-row counts of the build are kept next to it (``bad_rows.json``)
and reported again on every later use; ``on_bad_row='stop'`` refuses a cached dataset
whose build skipped rows.

File formats (``fmt='auto'`` picks by extension, ``.gz`` stripped first):
  * ``.tsv``/``.txt``: UTF-8, first line the tab-separated column names, one row a line,
    plain split on tab (no quoting, so text may contain quotes);
  * ``.csv``: header line, RFC 4180 quoting (a quoted field may span lines; the row's
    first line is reported; broken quoting is a bad row);
  * ``.jsonl``/``.json``: one JSON object a line; string or number values.
A UTF-8 byte-order mark before the header is ignored. A column the header lacks is an
error for the whole file; a row without a value for a column, with more fields than the
header, or with an empty (whitespace) value is a bad row.
TFDS datasets by name are read with `tfds_table_source` (columns mapped by the caller).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import ClassVar

import tensorflow_datasets as tfds
from etils import epath

from flaxformer_mini.data import records, textfile

FORMATS = ('auto', 'tsv', 'csv', 'jsonl')
BAD_ROWS_FILE = 'bad_rows.json'
BOM = '\ufeff'
_EXTENSIONS = {'.tsv': 'tsv', '.txt': 'tsv', '.csv': 'csv', '.jsonl': 'jsonl',
               '.json': 'jsonl'}

log = logging.getLogger(__name__)
Row = dict[str, str]


def detect_format(path: str, fmt: str = 'auto') -> str:
  """'tsv' | 'csv' | 'jsonl' for ``path`` (by extension when fmt='auto')."""
  if fmt not in FORMATS:
    raise ValueError(f'format {fmt!r} for {path} is not one of {FORMATS}')
  if fmt != 'auto':
    return fmt
  ext = os.path.splitext(path.removesuffix('.gz'))[1].lower()
  if ext not in _EXTENSIONS:
    raise ValueError(f'{path}: cannot tell the format from the extension {ext!r}; name it '
                     f'one of {sorted(_EXTENSIONS)} (optionally .gz) or pass the format')
  return _EXTENSIONS[ext]


def read_rows(path: str, columns: Sequence[str], errors: records.RowErrors,
              fmt: str = 'auto', allow_empty: Sequence[str] = ()
              ) -> Iterator[tuple[int, Row]]:
  """Yields (line number, {column: value}) for every good row of a table file.

  Bad rows (missing value, extra fields, empty value) go to ``errors.bad(path, line, why)``
  and are not yielded. The caller calls ``errors.ok()`` for each row it keeps (after its
  own checks, e.g. an unknown label) and ``errors.finish()`` at the end.

  Args:
    path: the file (.gz read as gzip), see the module docstring for the formats.
    columns: the columns wanted; other columns of the file are ignored.
    errors: the split's bad-row collector.
    fmt: 'auto' | 'tsv' | 'csv' | 'jsonl'.
    allow_empty: columns whose value may be empty.
  Raises:
    ValueError naming the file: no header / a header without one of ``columns``, and the
      unreadable files of `textfile.read_lines` (not gzip, truncated, invalid UTF-8).
    records.BadRowError: a bad row when errors.on_error == 'stop'.
  """
  fmt = detect_format(path, fmt)
  if not columns:
    raise ValueError(f'{path}: no columns requested')
  if fmt == 'jsonl':
    rows = _jsonl_rows(path, columns, errors)
  else:
    rows = _delimited_rows(path, columns, errors, fmt)
  for line_no, row in rows:
    empty = [c for c in columns if c not in allow_empty and not row[c].strip()]
    if empty:
      errors.bad(path, line_no, f'empty text in column "{empty[0]}"')
      continue
    yield line_no, row


def _delimited_rows(path, columns, errors, fmt) -> Iterator[tuple[int, Row]]:
  lines = textfile.read_lines(path)
  if fmt == 'tsv':
    split = ((n, line.split('\t')) for n, line in lines if line.strip())
  else:
    split = _csv_records(lines)
  header_line, header = next(split, (0, None))
  if header is None:
    raise ValueError(f'{path}: empty file (expected a header line naming the columns '
                     f'{list(columns)})')
  if isinstance(header, csv.Error):
    raise ValueError(f'{path} line {header_line}: the header is not valid CSV ({header})')
  header = [h.strip() for h in header]
  if header_line == 1 and header:  # the byte-order mark spreadsheet programs write
    header[0] = header[0].removeprefix(BOM).strip()
  missing = [c for c in columns if c not in header]
  if missing:
    raise ValueError(f'{path} line {header_line}: the header {header} has no column '
                     f'{missing[0]!r} (needed: {list(columns)}); the first line must name '
                     'the columns')
  index = {c: header.index(c) for c in columns}
  for line_no, fields in split:
    if isinstance(fields, csv.Error):
      errors.bad(path, line_no, f'invalid CSV ({fields})')
      continue
    if len(fields) > len(header):
      errors.bad(path, line_no, f'{len(fields)} fields, more than the header\'s '
                 f'{len(header)} (a tab or delimiter inside a value?)')
      continue
    absent = [c for c in columns if index[c] >= len(fields)]
    if absent:
      errors.bad(path, line_no, f'missing column "{absent[0]}" ({len(fields)} of '
                 f'{len(header)} fields)')
      continue
    yield line_no, {c: fields[index[c]] for c in columns}


def _csv_records(lines: Iterator[tuple[int, str]]
                 ) -> Iterator[tuple[int, list[str] | csv.Error]]:
  """CSV records with the line each starts on; blank records are skipped.

  A record that breaks the quoting rules comes out as a `csv.Error` (strict mode: without
  it a stray quote would silently swallow the following lines into one field).
  """
  def text():
    for _, line in lines:
      yield line + '\n'
  reader = csv.reader(text(), strict=True)
  start = 1
  while True:
    line_no = start
    try:
      fields = next(reader)
    except StopIteration:
      return
    except csv.Error as e:
      start = reader.line_num + 1
      if str(e) == 'unexpected end of data':
        e = csv.Error('a quoted field is still open at the end of the file')
      yield line_no, e
      continue
    start = reader.line_num + 1
    if fields and any(f.strip() for f in fields):
      yield line_no, fields


def _jsonl_rows(path, columns, errors) -> Iterator[tuple[int, Row]]:
  seen_any = False
  for line_no, line in textfile.read_lines(path):
    if line_no == 1:
      line = line.removeprefix(BOM)
    if not line.strip():
      continue
    seen_any = True
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      errors.bad(path, line_no, f'invalid JSON ({e.msg} at column {e.colno})')
      continue
    if not isinstance(obj, dict):
      errors.bad(path, line_no, f'not a JSON object (a {type(obj).__name__})')
      continue
    absent = [c for c in columns if c not in obj or obj[c] is None]
    if absent:
      errors.bad(path, line_no, f'missing column "{absent[0]}"')
      continue
    wrong = [c for c in columns
             if isinstance(obj[c], bool) or not isinstance(obj[c], (str, int, float))]
    if wrong:
      errors.bad(path, line_no, f'column "{wrong[0]}" is a {type(obj[wrong[0]]).__name__}, '
                 'not a string or number')
      continue
    yield line_no, {c: str(obj[c]) for c in columns}
  if not seen_any:
    raise ValueError(f'{path}: empty file (no JSON lines)')


# ------------------------------------------------------------------------------- builder


@dataclasses.dataclass
class TableConfig(tfds.core.BuilderConfig):
  """Which files (split -> path) and columns; rows are passed in by `prepare_table_builder`."""
  files: dict = dataclasses.field(default_factory=dict)
  columns: tuple = ()


class UserTable(tfds.core.GeneratorBasedBuilder):
  """Rows of local table files; features: one Text per column."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES: ClassVar[dict[str, str]] = {'1.0.0': 'Initial release.'}

  # Same tfds 4.9.10 `importlib_resources` trap as tsv_builder.TsvTranslate.code_path.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)

  def __init__(self, *args, rows: Mapping[str, list[Row]] | None = None, **kwargs):
    self._rows = rows
    super().__init__(*args, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    return tfds.core.DatasetInfo(
        builder=self, description=f'Columns {list(cfg.columns)} of {cfg.files}.',
        features=tfds.features.FeaturesDict({c: tfds.features.Text() for c in cfg.columns}),
        disable_shuffling=True)  # source[i] is the i-th good row of the file

  def _split_generators(self, dl_manager):
    del dl_manager  # local files
    if self._rows is None:
      raise RuntimeError('UserTable is prepared through prepare_table_builder')
    return {split: self._generate_examples(split) for split in self._rows}

  def _generate_examples(self, split):
    yield from enumerate(self._rows[split])


def file_key(path: str) -> str:
  """sha256 of a file's bytes (with its absolute path, size and mtime as a cheap prefix)."""
  h = hashlib.sha256()
  st = os.stat(path)
  h.update(f'{os.path.abspath(path)}\0{st.st_size}\0{st.st_mtime_ns}\0'.encode())
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      h.update(block)
  return h.hexdigest()


def _fingerprint(files: Mapping[str, str], columns: Sequence[str], extra: str) -> str:
  h = hashlib.sha256()
  for split in sorted(files):
    h.update(f'{split}\0{file_key(files[split])}\0'.encode())
  h.update(('\0'.join(columns) + '\0' + extra).encode())
  return h.hexdigest()[:12]


def prepare_table_builder(files: Mapping[str, str], columns: Sequence[str], data_dir: str,
                          name: str, on_bad_row: str,
                          check_row: (Callable[[Row], str | None]
                                      | Mapping[str, Callable[[Row], str | None]]
                                      | None) = None, *,
                          fmt: str = 'auto', allow_empty: Sequence[str] = (),
                          check_key: str = '') -> UserTable:
  """Reads, checks and writes the splits once; returns the prepared builder.

  Args:
    files: split -> path, e.g. {'train': ..., 'validation': ...}.
    columns: the string columns to keep (feature names).
    data_dir: TFDS data dir (the dataset lands in ``user_table/<name>_<hash>/1.0.0``).
    name: a readable prefix for the dataset's config name (letters, digits, _).
    on_bad_row: 'stop' | 'skip' (``config.data.on_bad_row``).
    check_row: optional ``row -> reason or None`` for every split, or {split: check}: a
      further check (e.g. a label not in the train labels); a reason makes it a bad row.
      Splits are read in the order of ``files``, so a check of a later split may use what
      an earlier split's check collected. It must depend only on the files (its result is
      cached with them) or on ``check_key``.
    fmt / allow_empty: as `read_rows`.
    check_key: anything ``check_row`` depends on beyond the files, part of the cache key.
  Raises:
    records.BadRowError: a bad row with on_bad_row='stop' (also for a cached build that
      skipped rows), or a split with no good row.
  """
  if on_bad_row not in records.ON_ERROR:
    raise ValueError(f'config.data.on_bad_row={on_bad_row!r} is not one of '
                     f'{records.ON_ERROR}')
  for split, path in files.items():
    if not os.path.isfile(path):
      raise FileNotFoundError(f'{split} file not found: {path!r}')
  safe = ''.join(ch if ch.isalnum() else '_' for ch in name.lower()) or 'table'
  # What decides which rows are kept is part of the key, so a changed reading is rebuilt.
  key = '\0'.join([check_key, fmt, *sorted(allow_empty)])
  config = TableConfig(name=f'{safe}_{_fingerprint(files, columns, key)}',
                       files={s: os.path.abspath(p) for s, p in files.items()},
                       columns=tuple(columns))
  builder = UserTable(config=config, data_dir=data_dir, file_format='array_record')
  report = os.path.join(builder.data_dir, BAD_ROWS_FILE)
  if builder.is_prepared() and os.path.isfile(report):
    with open(report) as f:
      summary = json.load(f)
    for split, s in summary.items():
      if s['bad_rows'] and on_bad_row == 'stop':
        raise records.BadRowError(f'{s["first"][0]} ({split} split, prepared earlier with '
                                  f'on_bad_row=skip; set config.data.on_bad_row=skip to '
                                  'skip such rows)')
      if s['bad_rows']:
        log.warning('%s split of %s: skipped %d bad rows of %d (first: %s)', split, name,
                    s['bad_rows'], s['bad_rows'] + s['good_rows'], s['first'][0])
    return builder
  if check_row is None or callable(check_row):
    checks = dict.fromkeys(files, check_row)
  else:
    checks = dict(check_row)
  rows, summary = {}, {}
  for split, path in files.items():
    check = checks.get(split)
    errors = records.RowErrors(on_bad_row, what=f'{split} split of {name} ({path})')
    kept = []
    for line_no, row in read_rows(path, columns, errors, fmt, allow_empty):
      why = check(row) if check else None
      if why:
        errors.bad(path, line_no, why)
        continue
      errors.ok()
      kept.append(row)
    errors.finish()
    rows[split] = kept
    summary[split] = dict(errors.summary(), first=errors.first)
  builder = UserTable(config=config, data_dir=data_dir, file_format='array_record',
                      rows=rows)
  builder.download_and_prepare()
  with open(report, 'w') as f:
    json.dump(summary, f, indent=1)
  return builder


class _TextSource:
  """Random access over a TFDS data source, values decoded to str (ClassLabel -> name)."""

  def __init__(self, source, columns: Mapping[str, str], decoders: Mapping[str, Callable]):
    self._source, self._columns, self._decoders = source, dict(columns), dict(decoders)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, i: int) -> Row:
    ex = self._source[i]
    return {ours: self._decoders[theirs](ex[theirs]) for ours, theirs in self._columns.items()}


def _as_str(value) -> str:
  if isinstance(value, bytes):
    return value.decode('utf-8')
  if hasattr(value, 'item'):  # numpy scalar
    value = value.item()
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


def table_source(builder: UserTable, split: str) -> _TextSource:
  """A prepared table's split: ``len(source)``, ``source[i]`` -> {column: str}."""
  columns = builder.builder_config.columns
  return _TextSource(builder.as_data_source(split), {c: c for c in columns},
                     dict.fromkeys(columns, _as_str))


def tfds_table_source(name: str, split: str, columns: Mapping[str, str], *,
                      data_dir: str | None = None, download: bool = False) -> _TextSource:
  """A TFDS dataset by name as a table: ``source[i]`` -> {our column: str}.

  Args:
    name: e.g. 'imdb_reviews' (read with `tfds.data_source`, array_record, no TF).
    split: TFDS split syntax.
    columns: our column -> the dataset's feature, e.g. {'text': 'text', 'label': 'label'};
      a ClassLabel feature is turned into its class name.
    data_dir / download: as `tfds.data_source`.
  """
  source = tfds.data_source(name, split=split, data_dir=data_dir, download=download)
  features = source.dataset_info.features
  decoders = {}
  for ours, theirs in columns.items():
    if theirs not in features:
      raise KeyError(f'TFDS dataset {name!r} has no feature {theirs!r} (for column '
                     f'{ours!r}); it has {sorted(features)}')
    feature = features[theirs]
    if isinstance(feature, tfds.features.ClassLabel):
      decoders[theirs] = lambda v, f=feature: f.int2str(int(v))
    else:
      decoders[theirs] = _as_str
  return _TextSource(source, columns, decoders)
