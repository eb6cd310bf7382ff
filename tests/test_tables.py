"""Tests of flaxformer_mini.data.records (RowErrors) and data.tables (user tables -> TFDS).

Every expected row, line number and message below is written out by hand from the file
contents the test writes: the readers must give exactly those, in every format.
"""

import gzip
import json
import logging
import os

import pytest

from flaxformer_mini.data import records, tables

COLUMNS = ('text', 'label')
# The same three rows in each format; the CSV row 2 holds a quoted comma, quotes and a
# newline, so it spans lines 3-4 and the third row starts on line 5.
ROWS = [{'text': 'a fine film', 'label': 'pos'},
        {'text': 'dull, "long"\nand slow', 'label': 'neg'},
        {'text': 'ok', 'label': 'pos'}]
TEXTS = {
    'tsv': ('t.tsv', 'id\ttext\tlabel\n1\ta fine film\tpos\n\n2\tdull, "long" and slow\tneg\n'
                     '3\tok\tpos\n', [2, 4, 5]),
    'csv': ('t.csv', 'id,text,label\n1,a fine film,pos\n2,"dull, ""long""\nand slow",neg\n'
                     '3,ok,pos\n', [2, 3, 5]),
    'jsonl': ('t.jsonl', '{"text": "a fine film", "label": "pos", "id": 1}\n\n'
                         '{"text": "dull, \\"long\\"\\nand slow", "label": "neg"}\n'
                         '{"label": "pos", "text": "ok"}\n', [1, 3, 4]),
}
LOG = 'flaxformer_mini.data'


def _write(tmp_path, name, text, gz=False):
  path = tmp_path / (name + ('.gz' if gz else ''))
  blob = text.encode('utf-8')
  path.write_bytes(gzip.compress(blob) if gz else blob)
  return str(path)


def _read(path, on_error='skip', **kw):
  errors = records.RowErrors(on_error, 'test split')
  rows = list(tables.read_rows(path, COLUMNS, errors, **kw))
  return rows, errors


# ------------------------------------------------------------------------------ RowErrors


def test_row_errors_stop_raises_naming_file_and_line():
  errors = records.RowErrors('stop', 'train split')
  errors.ok()
  with pytest.raises(records.BadRowError) as e:
    errors.bad('data/x.tsv', 7, 'empty text in column "text"')
  assert str(e.value) == ('data/x.tsv line 7: empty text in column "text" (train split; set '
                          'config.data.on_bad_row=skip to skip such rows)')
  assert isinstance(e.value, ValueError)
  with pytest.raises(records.BadRowError, match=r'^tfds:imdb/train example 3: empty text \('):
    errors.bad('tfds:imdb/train', 'example 3', 'empty text')  # a row named without a line


def test_row_errors_skip_counts_and_logs(caplog):
  errors = records.RowErrors('skip', 'dev split', max_logged=2)
  with caplog.at_level(logging.WARNING, LOG):
    for _ in range(5):
      errors.ok()
    errors.bad('d.tsv', 3, 'unknown label "x"')
    errors.bad('d.tsv', 4, 'missing column "label": 1 of 2 fields')
    errors.bad('d.tsv', 9, 'unknown label "x"')
    assert errors.finish() is errors
  skipping = [r.getMessage() for r in caplog.records if 'skipping' in r.getMessage()]
  assert skipping == ['dev split: skipping d.tsv line 3: unknown label "x"',
                      'dev split: skipping d.tsv line 4: missing column "label": 1 of 2 fields']
  assert caplog.records[-1].getMessage() == (
      'dev split: skipped 3 bad rows of 8 (2 x unknown label "x", 1 x missing column "label")')
  assert errors.summary() == {'good_rows': 5, 'bad_rows': 3, 'bad_reasons': {
      'unknown label "x"': 2, 'missing column "label"': 1}}
  assert errors.first == ['d.tsv line 3: unknown label "x"',
                          'd.tsv line 4: missing column "label": 1 of 2 fields',
                          'd.tsv line 9: unknown label "x"']


def test_row_errors_all_bad_split_is_an_error_either_way():
  for on_error in ('skip', 'stop'):
    errors = records.RowErrors(on_error, 'train split')
    if on_error == 'skip':
      errors.bad('t.tsv', 2, 'empty text')
    with pytest.raises(records.BadRowError, match=r'^train split: no usable rows') as e:
      errors.finish()
  assert str(e.value) == 'train split: no usable rows (0 bad)'
  skip = records.RowErrors('skip', 'train split')
  skip.bad('t.tsv', 2, 'empty text')
  with pytest.raises(records.BadRowError, match=r'\(1 bad; first: t.tsv line 2: empty text\)$'):
    skip.finish()


def test_row_errors_refuses_an_unknown_mode():
  with pytest.raises(ValueError, match=r"on_error='ignore' .*config.data.on_bad_row"):
    records.RowErrors('ignore')


# ------------------------------------------------------------------------------ read_rows


@pytest.mark.parametrize('gz', [False, True], ids=['plain', 'gz'])
@pytest.mark.parametrize('fmt', sorted(TEXTS))
def test_formats_give_the_same_rows_and_lines(tmp_path, fmt, gz):
  name, text, lines = TEXTS[fmt]
  # a TSV value cannot hold a newline: there the row has a space
  want = [dict(r, text=r['text'].replace('\n', ' ')) for r in ROWS] if fmt == 'tsv' else ROWS
  path = _write(tmp_path, name, text, gz)
  rows, errors = _read(path, on_error='stop')
  assert rows == list(zip(lines, want))
  assert errors.count == 0
  assert tables.detect_format(path) == fmt
  # an explicit format overrides the extension
  other = _write(tmp_path, 'table.data', text)
  assert _read(other, fmt=fmt)[0] == rows


def test_byte_order_mark_before_the_header_is_ignored(tmp_path):
  for name, text in (('b.csv', 'text,label\nhi,pos\n'), ('b.tsv', 'text\tlabel\nhi\tpos\n'),
                     ('b.jsonl', '{"text": "hi", "label": "pos"}\n')):
    path = _write(tmp_path, name, '\ufeff' + text)
    assert _read(path, on_error='stop')[0] == [(2 - name.endswith('jsonl'),
                                                {'text': 'hi', 'label': 'pos'})]


def test_header_lacking_a_column_names_file_and_column(tmp_path):
  path = _write(tmp_path, 'h.tsv', '\nsentence\tlabel\nhi\tpos\n')
  with pytest.raises(ValueError, match='has no column') as e:
    _read(path)
  assert str(e.value) == (f"{path} line 2: the header ['sentence', 'label'] has no column "
                          "'text' (needed: ['text', 'label']); the first line must name the "
                          'columns')
  with pytest.raises(ValueError, match=r'empty file \(expected a header line naming'):
    _read(_write(tmp_path, 'e.csv', '\n\n'))
  with pytest.raises(ValueError, match=r'empty file \(no JSON lines\)'):
    _read(_write(tmp_path, 'e.jsonl', '\n'))
  with pytest.raises(ValueError, match=r"cannot tell the format from the extension '.xlsx'"):
    _read(_write(tmp_path, 'e.xlsx', 'text\tlabel\n'))


BAD_DELIMITED = (
    'text\tlabel\tsource\n'
    'good one\tpos\tweb\n'               # 2
    'too\tmany\tfields\there\n'          # 3
    'no label\n'                         # 4
    '   \tneg\tweb\n'                    # 5 empty text
    'empty label\t \tweb\n'              # 6
    'short row\tneg\n'                   # 7 good: the unused column may be missing
)
BAD_REASONS = [
    (3, "4 fields, more than the header's 3 (a tab or delimiter inside a value?)"),
    (4, 'missing column "label" (1 of 3 fields)'),
    (5, 'empty text in column "text"'),
    (6, 'empty text in column "label"'),
]


def test_bad_rows_are_reported_with_file_and_line(tmp_path, caplog):
  path = _write(tmp_path, 'bad.tsv', BAD_DELIMITED, gz=True)
  with caplog.at_level(logging.WARNING, LOG):
    rows, errors = _read(path)
  assert rows == [(2, {'text': 'good one', 'label': 'pos'}),
                  (7, {'text': 'short row', 'label': 'neg'})]
  assert errors.count == 4
  logged = [r.getMessage() for r in caplog.records]
  assert logged == [f'test split: skipping {path} line {n}: {why}' for n, why in BAD_REASONS]
  # stop: the first bad row ends the reading
  with pytest.raises(records.BadRowError, match='^' + path.replace('.', r'\.') + ' line 3: 4 '):
    _read(path, on_error='stop')
  # allow_empty keeps the row whose label is blank
  rows, errors = _read(path, allow_empty=('label',))
  assert (6, {'text': 'empty label', 'label': ' '}) in rows and errors.count == 3


def test_csv_quoting_errors_are_bad_rows(tmp_path):
  text = ('text,label\n'
          '"a ""quoted"" word",pos\n'        # 2 good
          '"closed" early,neg\n'             # 3 text after the closing quote
          'fine,neg\n'                       # 4 good
          '"never closed,pos\n'              # 5 swallows the rest of the file
          'lost,neg\n')
  path = _write(tmp_path, 'q.csv', text)
  rows, errors = _read(path)
  assert rows == [(2, {'text': 'a "quoted" word', 'label': 'pos'}),
                  (4, {'text': 'fine', 'label': 'neg'})]
  assert errors.first == [f"{path} line 3: invalid CSV (',' expected after '\"')",
                          f'{path} line 5: invalid CSV (a quoted field is still open at the end '
                          'of the file)']


def test_jsonl_bad_rows(tmp_path):
  text = ('{"text": "fine", "label": 1}\n'   # a number is kept as its text
          '{"text": "x", "label": 2.5}\n'
          '{"text": "x"\n'                   # 3: ',' expected after the 12 chars
          '["text", "label"]\n'              # 4
          '{"text": "x", "label": null}\n'   # 5
          '{"text": ["x"], "label": "a"}\n'  # 6
          '{"text": "x", "label": true}\n'   # 7
          '{"text": "", "label": "a"}\n')    # 8
  path = _write(tmp_path, 'j.jsonl', text)
  rows, errors = _read(path)
  assert rows == [(1, {'text': 'fine', 'label': '1'}), (2, {'text': 'x', 'label': '2.5'})]
  assert errors.count == 6
  assert errors.first == [
      f"{path} line 3: invalid JSON (Expecting ',' delimiter at column 13)",
      f'{path} line 4: not a JSON object (a list)',
      f'{path} line 5: missing column "label"']
  assert dict(errors.reasons) == {'invalid JSON (Expecting \',\' delimiter at column 13)': 1,
                                  'not a JSON object (a list)': 1, 'missing column "label"': 1,
                                  'column "text" is a list, not a string or number': 1,
                                  'column "label" is a bool, not a string or number': 1,
                                  'empty text in column "text"': 1}


# -------------------------------------------------------------------------- the TFDS build


TRAIN = 'text\tlabel\nred apple\tfruit\ngreen leaf\tplant\n\tfruit\nyellow pear\tfruit\n'
DEV = 'text\tlabel\nrose\tplant\nrock\tmineral\nplum\tfruit\n'


class Checks:
  """check_row per split: train collects its labels, dev refuses the others; counts calls."""

  def __init__(self):
    self.seen, self.calls = set(), 0

  def collect(self, row):
    self.calls += 1
    self.seen.add(row['label'])

  def known(self, row):
    self.calls += 1
    return None if row['label'] in self.seen else f'unknown label "{row["label"]}"'

  def by_split(self):
    return {'train': self.collect, 'validation': self.known}


@pytest.fixture
def table_files(tmp_path):
  return {'train': _write(tmp_path, 'train.tsv', TRAIN, gz=True),
          'validation': _write(tmp_path, 'dev.tsv', DEV)}


def _prepare(files, data_dir, on_bad_row, checks, **kw):
  return tables.prepare_table_builder(files, COLUMNS, str(data_dir), 'my table!', on_bad_row,
                                      checks.by_split(), **kw)


def _all(builder, split):
  source = tables.table_source(builder, split)
  return [source[i] for i in range(len(source))]


def test_build_keeps_good_rows_in_order_and_checks_each_split(table_files, tmp_path, caplog):
  checks = Checks()
  with caplog.at_level(logging.WARNING, LOG):
    builder = _prepare(table_files, tmp_path / 'tfds', 'skip', checks)
  assert _all(builder, 'train') == [{'text': 'red apple', 'label': 'fruit'},
                                    {'text': 'green leaf', 'label': 'plant'},
                                    {'text': 'yellow pear', 'label': 'fruit'}]
  assert _all(builder, 'validation') == [{'text': 'rose', 'label': 'plant'},
                                         {'text': 'plum', 'label': 'fruit'}]
  assert checks.seen == {'fruit', 'plant'} and checks.calls == 3 + 3
  dev, train = table_files['validation'], table_files['train']
  text = caplog.text
  assert f'skipping {train} line 4: empty text in column "text"' in text
  assert f'skipping {dev} line 3: unknown label "mineral"' in text
  assert builder.builder_config.name.startswith('my_table__')
  with open(os.path.join(builder.data_dir, tables.BAD_ROWS_FILE)) as f:
    report = json.load(f)
  assert report['validation'] == {'good_rows': 2, 'bad_rows': 1,
                                  'bad_reasons': {'unknown label "mineral"': 1},
                                  'first': [f'{dev} line 3: unknown label "mineral"']}
  assert report['train']['bad_rows'] == 1 and report['train']['good_rows'] == 3


def test_stop_names_the_file_and_line_of_the_first_bad_row(table_files, tmp_path):
  with pytest.raises(records.BadRowError) as e:
    _prepare(table_files, tmp_path / 'tfds', 'stop', Checks())
  assert str(e.value).startswith(f'{table_files["train"]} line 4: empty text in column "text" '
                                 '(train split of my table! (')
  # With a clean train file the dev split's unknown label stops the build.
  table_files['train'] = _write(tmp_path, 'clean.tsv', TRAIN.replace('\tfruit\n', 'x\tfruit\n'))
  with pytest.raises(records.BadRowError, match=f'^{table_files["validation"]} line 3: unknown '
                     'label "mineral"'):
    _prepare(table_files, tmp_path / 'tfds', 'stop', Checks())
  assert not os.path.isdir(tmp_path / 'tfds' / 'user_table') or not any(
      'incomplete' not in d for d in os.listdir(tmp_path / 'tfds' / 'user_table'))


def test_cached_build_rereports_skipped_rows_and_refuses_stop(table_files, tmp_path, caplog):
  data_dir = tmp_path / 'tfds'
  first = _prepare(table_files, data_dir, 'skip', Checks())
  checks = Checks()
  with caplog.at_level(logging.WARNING, LOG):
    again = _prepare(table_files, data_dir, 'skip', checks)
  assert checks.calls == 0  # read from the cache, not rebuilt
  assert again.data_dir == first.data_dir
  assert _all(again, 'validation') == _all(first, 'validation')
  dev = table_files['validation']
  assert (f'validation split of my table!: skipped 1 bad rows of 3 (first: {dev} line 3: '
          'unknown label "mineral")') in caplog.text
  with pytest.raises(records.BadRowError) as e:
    _prepare(table_files, data_dir, 'stop', Checks())
  assert str(e.value) == (f'{table_files["train"]} line 4: empty text in column "text" (train '
                          'split, prepared earlier with on_bad_row=skip; set '
                          'config.data.on_bad_row=skip to skip such rows)')


def test_edited_file_or_reading_is_rebuilt(table_files, tmp_path):
  data_dir = tmp_path / 'tfds'
  first = _prepare(table_files, data_dir, 'skip', Checks())
  with open(table_files['validation'], 'a') as f:
    f.write('tulip\tplant\n')
  checks = Checks()
  edited = _prepare(table_files, data_dir, 'skip', checks)
  assert checks.calls > 0 and edited.data_dir != first.data_dir
  assert _all(edited, 'validation')[-1] == {'text': 'tulip', 'label': 'plant'}
  # Letting the text be empty keeps train line 4: another dataset, not the cached one.
  lenient = _prepare(table_files, data_dir, 'skip', Checks(), allow_empty=('text',))
  assert lenient.data_dir != edited.data_dir
  assert {'text': '', 'label': 'fruit'} in _all(lenient, 'train')


def test_build_errors_name_what_is_wrong(table_files, tmp_path):
  with pytest.raises(FileNotFoundError, match=r"validation file not found: '.*nope.tsv'"):
    _prepare(dict(table_files, validation=str(tmp_path / 'nope.tsv')), tmp_path, 'skip',
             Checks())
  with pytest.raises(ValueError, match=r"config.data.on_bad_row='warn' is not one of"):
    _prepare(table_files, tmp_path, 'warn', Checks())
  only_bad = _write(tmp_path, 'bad.tsv', 'text\tlabel\n \tx\n')
  with pytest.raises(records.BadRowError, match=r'train split of my table! .* no usable rows '
                     r'\(1 bad; first: .*bad.tsv line 2: empty text'):
    _prepare(dict(table_files, train=only_bad), tmp_path, 'skip', Checks())
