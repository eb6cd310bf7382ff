"""Bad rows in a user's labelled data: reported with file and line, counted, skipped or fatal.

Every reader of user-supplied examples (classification TSV/CSV/JSONL, SQuAD JSON,
summarization pairs) passes each problem it finds to one `RowErrors`::

    errors = RowErrors(on_error=config.data.on_bad_row, what='train split')
    for line_no, row in rows:
      if not row['text'].strip():
        errors.bad(path, line_no, 'empty text in column "text"')
        continue
      ...
    errors.finish()        # logs 'train split: skipped 3 bad rows of 8035 (...)'

``on_error='stop'`` raises `BadRowError` at the first bad row (the message names the file,
the line and the problem); ``'skip'`` logs the first ``max_logged`` of them, counts all,
and goes on. A split in which every row is bad is an error either way.
"""

from __future__ import annotations

import collections
import logging

ON_ERROR = ('stop', 'skip')

log = logging.getLogger(__name__)


class BadRowError(ValueError):
  """A row of a data file cannot be used (``on_error='stop'``, or every row was bad)."""


class RowErrors:
  """Collects the bad rows of one split.

  Args:
    on_error: 'stop' (raise at the first bad row) or 'skip' (log, count, go on).
    what: names the split in messages ('train split of movie_sentiment').
    max_logged: 'skip' logs this many bad rows one by one, then only counts.
  Attributes:
    count: bad rows seen; reasons: Counter of their reasons (without file/line);
    good: rows the reader accepted (call `ok()` for each).
  """

  def __init__(self, on_error: str = 'stop', what: str = 'data', max_logged: int = 20):
    if on_error not in ON_ERROR:
      raise ValueError(f'on_error={on_error!r} is not one of {ON_ERROR} '
                       '(config.data.on_bad_row)')
    self.on_error, self.what, self.max_logged = on_error, what, max_logged
    self.count, self.good = 0, 0
    self.reasons: collections.Counter[str] = collections.Counter()
    self.first: list[str] = []

  def bad(self, path: str, line: int | str, why: str) -> None:
    """Reports one bad row: ``why`` says what is wrong ('unknown label "neutral"').

    ``line``: the file's line number, or a str naming the row another way ('example 7').
    """
    where = line if isinstance(line, str) else f'line {line}'
    message = f'{path} {where}: {why}'
    self.count += 1
    self.reasons[why.split(':')[0]] += 1
    if len(self.first) < 3:
      self.first.append(message)
    if self.on_error == 'stop':
      raise BadRowError(f'{message} ({self.what}; set config.data.on_bad_row=skip to skip '
                        'such rows)')
    if self.count <= self.max_logged:
      log.warning('%s: skipping %s', self.what, message)

  def ok(self) -> None:
    """Counts one accepted row."""
    self.good += 1

  def finish(self) -> RowErrors:
    """Logs the summary; raises `BadRowError` if no row was usable."""
    if self.good == 0:
      detail = f'; first: {self.first[0]}' if self.first else ''
      raise BadRowError(f'{self.what}: no usable rows ({self.count} bad{detail})')
    if self.count:
      log.warning('%s: skipped %d bad rows of %d (%s)', self.what, self.count,
                  self.count + self.good,
                  ', '.join(f'{n} x {r}' for r, n in self.reasons.most_common(5)))
    return self

  def summary(self) -> dict:
    """JSON-able counts, for metrics.jsonl or a report."""
    return {'good_rows': self.good, 'bad_rows': self.count, 'bad_reasons': dict(self.reasons)}
