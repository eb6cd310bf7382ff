"""A TFDS builder for local gzip'd parallel TSV files, read back without TensorFlow.

File format (the project's shared data, `../shared/data/translate/*.tsv.gz`):
gzip'd UTF-8, no header, one pair a line, `english \\t other \\t source-tag`, split on
plain tabs (no CSV quoting: columns may contain quotes).

The builder writes `array_record` files, which `builder.as_data_source(split)` (or
`tfds.data_source`) reads with random access and no TensorFlow.

Verified with tensorflow-datasets 4.9.10 and TensorFlow NOT installed:
`GeneratorBasedBuilder.download_and_prepare` with `file_format='array_record'` works
(the generator, shuffler and array_record writer are TF-free), as do
`as_data_source` and `tfds.testing.mock_data` for `tfds.data_source`. Two traps, both
unrelated to TF: `dataset_info_from_configs` looks for metadata files next to the
builder's module (we build `tfds.core.DatasetInfo` directly), and `code_path` needs the
undeclared `importlib_resources` package (we override it, see below).

Usage:
    paths = embedded_paths()              # or shared_paths('../shared')
    builder = prepare_tsv_builder(paths, other_lang='pt', data_dir='/tmp/tfds')
    source = builder.as_data_source('train')   # len(source), source[i] -> dict of bytes
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Iterator, Mapping
from typing import ClassVar

import tensorflow_datasets as tfds
from etils import epath

from flaxformer_mini.data import textfile

ENGLISH = 'en'
SOURCE_TAG = 'source'
SPLITS = ('train', 'validation')
_ASSETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'assets')


def embedded_paths(pair: str = 'en-pt') -> dict[str, str]:
  """Paths of the small real sample shipped in `flaxformer_mini/data/assets/`.

  Returns: {'train': path, 'validation': path} (30,000 / 500 en-pt pairs; see NOTICE.md).
  """
  return _existing_paths(_ASSETS_DIR, pair, 'embedded assets')


def shared_paths(root: str, pair: str = 'en-pt') -> dict[str, str]:
  """Paths of the full shared data under `root/data/translate/` (e.g. root='../shared').

  Args:
    root: directory that contains `data/translate/{pair}.{train,dev}.tsv.gz`.
    pair: 'en-pt' or 'en-de'.
  Returns: {'train': path, 'validation': path}.
  """
  return _existing_paths(os.path.join(root, 'data', 'translate'), pair, 'shared data')


def _existing_paths(directory: str, pair: str, what: str) -> dict[str, str]:
  paths = {
      'train': os.path.join(directory, f'{pair}.train.tsv.gz'),
      'validation': os.path.join(directory, f'{pair}.dev.tsv.gz'),
  }
  missing = [p for p in paths.values() if not os.path.isfile(p)]
  if missing:
    raise FileNotFoundError(f'{what}: missing {missing} (pair={pair!r}, dir={directory!r})')
  return paths


def read_tsv(path: str, other_lang: str) -> Iterator[dict[str, str]]:
  """Yields {'en': str, other_lang: str, 'source': str} per line of a (gzip'd) TSV file.

  Blank lines are skipped. Raises ValueError naming the file (and the line, 1-based, where
  there is one) for a row without 3 columns or with an empty text, a file with no rows,
  and the unreadable files of `textfile.read_lines` (not gzip, truncated, bad UTF-8).
  """
  rows = 0
  for line_no, line in textfile.read_lines(path):
    if not line:
      continue
    cols = line.split('\t')
    if len(cols) != 3:
      raise ValueError(
          f'{path} line {line_no}: expected 3 tab-separated columns '
          f'(english, {other_lang}, source-tag), got {len(cols)}: {line[:80]!r}')
    empty = [key for key, text in ((ENGLISH, cols[0]), (other_lang, cols[1]))
             if not text.strip()]
    if empty:
      raise ValueError(f'{path} line {line_no}: empty {" and ".join(empty)} text: '
                       f'{line[:80]!r}')
    rows += 1
    yield {ENGLISH: cols[0], other_lang: cols[1], SOURCE_TAG: cols[2]}
  if not rows:
    raise ValueError(f'{path}: empty file (no rows)')


@dataclasses.dataclass
class TsvTranslateConfig(tfds.core.BuilderConfig):
  """Which language pair and which files. `other_lang` is the second TSV column."""
  other_lang: str = 'pt'
  train_path: str = ''
  validation_path: str = ''


class TsvTranslate(tfds.core.GeneratorBasedBuilder):
  """Parallel text from local gzip'd TSV files; features {'en', other_lang, 'source'}."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES: ClassVar[dict[str, str]] = {'1.0.0': 'Initial release.'}

  # tfds 4.9.10 computes `code_path` (to look for a checksums file) through the
  # third-party `importlib_resources` backport, which it only declares for Python < 3.9,
  # so `download_and_prepare` dies with "No module named 'importlib_resources'"
  # (tensorflow/datasets#11212). Our code path is simply this file.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    # DatasetInfo directly, not dataset_info_from_configs: the latter reads metadata
    # files from this module's directory, which a library module does not have.
    cfg = self.builder_config
    return tfds.core.DatasetInfo(
        builder=self,
        description=f'Parallel en-{cfg.other_lang} text from {cfg.train_path}, '
        f'{cfg.validation_path}.',
        features=tfds.features.FeaturesDict({
            ENGLISH: tfds.features.Text(),
            cfg.other_lang: tfds.features.Text(),
            SOURCE_TAG: tfds.features.Text(),
        }),
        supervised_keys=(cfg.other_lang, ENGLISH),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Local files: nothing to download.
    cfg = self.builder_config
    paths = {'train': cfg.train_path, 'validation': cfg.validation_path}
    for split, path in paths.items():
      if not os.path.isfile(path):
        raise FileNotFoundError(f'TsvTranslate {split} file not found: {path!r}')
    return {split: self._generate_examples(path) for split, path in paths.items()}

  def _generate_examples(self, path):
    yield from enumerate(read_tsv(path, self.builder_config.other_lang))


def _fingerprint(paths: Mapping[str, str]) -> str:
  """Short hash of the absolute paths and sizes, so different files never share a cache dir."""
  h = hashlib.sha1()
  for split in SPLITS:
    p = os.path.abspath(paths[split])
    h.update(f'{p}\0{os.path.getsize(p)}\0'.encode())
  return h.hexdigest()[:8]


def tsv_builder(paths: Mapping[str, str], *, other_lang: str, data_dir: str,
                config_name: str | None = None) -> TsvTranslate:
  """Makes (does not prepare) a TsvTranslate builder writing array_record files.

  Args:
    paths: {'train': path, 'validation': path}, e.g. from `embedded_paths()`.
    other_lang: key of the non-English column, e.g. 'pt' or 'de'.
    data_dir: where TFDS writes `tsv_translate/<config_name>/1.0.0/`.
    config_name: defaults to `en_<other_lang>_<hash of file paths and sizes>` so that
      the embedded sample and the shared data never reuse each other's prepared files.
  """
  missing = [s for s in SPLITS if s not in paths]
  if missing:
    raise KeyError(f'paths is missing splits {missing}; got keys {sorted(paths)}')
  for split in SPLITS:
    if not os.path.isfile(paths[split]):
      raise FileNotFoundError(f'{split} TSV file not found: {paths[split]!r}')
  if other_lang in (ENGLISH, SOURCE_TAG):
    raise ValueError(f'other_lang={other_lang!r} collides with feature {other_lang!r}')
  name = config_name or f'en_{other_lang}_{_fingerprint(paths)}'
  config = TsvTranslateConfig(
      name=name, other_lang=other_lang,
      train_path=os.path.abspath(paths['train']),
      validation_path=os.path.abspath(paths['validation']))
  return TsvTranslate(config=config, data_dir=data_dir, file_format='array_record')


def prepare_tsv_builder(paths: Mapping[str, str], *, other_lang: str, data_dir: str,
                        config_name: str | None = None) -> TsvTranslate:
  """`tsv_builder(...)` then `download_and_prepare()` (a no-op when already prepared)."""
  builder = tsv_builder(paths, other_lang=other_lang, data_dir=data_dir,
                        config_name=config_name)
  builder.download_and_prepare()
  return builder
