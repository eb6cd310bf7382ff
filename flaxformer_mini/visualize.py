"""Pictures of what a run learned: positional encodings, attention maps, training curves.

    python -m flaxformer_mini.visualize --workdir=runs/default
    python -m flaxformer_mini.visualize --workdir=runs/default --sentence="Bom dia." --step=600

writes into ``<workdir>/plots/``:

  positional_encoding.png     the sinusoidal table PE [positions, d_model] and the dot
                              products PE(i)·PE(j) of every pair of positions
  attention_encoder_self.png  encoder self-attention, one map per layer (rows) and head
  attention_decoder_self.png  decoder (causal) self-attention
  attention_cross.png         encoder-decoder attention: which source token each output
                              token reads (a trained translator shows a rough alignment)
  training_curves.png         loss, token accuracy, learning rate and throughput from
                              ``<workdir>/metrics.jsonl``

The decoder side is the model's own greedy output for ``--sentence``, fed back
teacher-forced, so every map has real tokens on both axes (the last column of each
attention figure is the mean over heads). The attention maps need an encoder-decoder run
(translation or summarization, whose default input is then a short package description);
for other runs the positional-encoding and curve pictures are still drawn. A bad
``--workdir`` (missing, no config.json, no readable checkpoint) or a bad line of
metrics.jsonl is one ``error:`` line and exit status 2.

The weights come from the model itself: `MultiHeadAttention` sows them into the
``intermediates`` collection when that collection is mutable (`attention_maps`), so the
attention math is not repeated here and training/decoding never pay for it.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure  # a bare Figure draws to files without pyplot's backend

from flaxformer_mini import positions as positions_lib
from flaxformer_mini.config import TransformerConfig
from flaxformer_mini.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID
from flaxformer_mini.models import SCANNED_LAYERS, Transformer

log = logging.getLogger(__name__)

PLOTS_SUBDIR = 'plots'
DEFAULT_SENTENCE = 'Exibe o número da página atual.'
# The encoder input of the attention maps when --sentence is not given, per seq2seq task.
DEFAULT_INPUTS = {
    'translation': DEFAULT_SENTENCE,
    'summarization': 'GNU Make is a utility which controls the generation of executables '
                     'and other target files of a program from its source files.',
}
SPECIAL_PIECES = {PAD_ID: '<pad>', EOS_ID: '</s>', UNK_ID: '<unk>', BOS_ID: '<s>'}
MAP_KINDS = ('encoder_self', 'decoder_self', 'cross')

# ---------------------------------------------------------------------------
# The arrays (pure functions of a model, its params and token ids).
# ---------------------------------------------------------------------------


def positional_encoding(num_positions: int, d_model: int) -> tuple[np.ndarray, np.ndarray]:
  """The sinusoidal table and the similarity of positions.

  Returns:
    (table [num_positions, d_model] = `positions.sinusoidal_table`,
     similarity [num_positions, num_positions] = table · tableᵀ), float32.
  """
  table = np.asarray(positions_lib.sinusoidal_table(num_positions, d_model), np.float32)
  return table, table @ table.T


def _as_row(ids, what: str) -> jnp.ndarray:
  ids = np.asarray(ids)
  if ids.ndim != 1 or ids.size == 0:
    raise ValueError(f'expected {what} of shape [length] (one sentence, length >= 1), '
                     f'got shape {ids.shape}')
  if not np.issubdtype(ids.dtype, np.integer):
    raise TypeError(f'expected integer token ids for {what}, got dtype {ids.dtype}')
  return jnp.asarray(ids[None], jnp.int32)


def _per_layer(stack: Mapping[str, Any], sublayer: str, num_layers: int) -> np.ndarray:
  """[layers, heads, q, k] from one sentence's sown weights of a stack (scanned or not)."""
  if SCANNED_LAYERS in stack:  # one leaf [layers, batch=1, heads, q, k]
    (w,) = stack[SCANNED_LAYERS][sublayer]['attention_weights']
    return np.asarray(w[:, 0])
  return np.stack([np.asarray(stack[f'layer_{i}'][sublayer]['attention_weights'][0][0])
                   for i in range(num_layers)])


@functools.partial(jax.jit, static_argnums=0)
def _sown_weights(cfg: TransformerConfig, params, src, tgt):
  """The ``intermediates`` of one teacher-forced pass (jitted: one compile per length pair)."""
  _, state = Transformer(cfg).apply({'params': params}, src, tgt, mutable=['intermediates'])
  return state['intermediates']


def attention_maps(model: Transformer, params, src_ids, tgt_ids) -> dict[str, np.ndarray]:
  """Every attention map of an encoder-decoder for one sentence pair (teacher-forced).

  Args:
    model: a `Transformer`.
    params: its ``params`` collection.
    src_ids: [src_len] source ids (``PAD_ID`` entries are masked like padding).
    tgt_ids: [tgt_len] decoder inputs, BOS first (the target shifted right).

  Returns:
    ``encoder_self`` [num_encoder_layers, heads, src_len, src_len],
    ``decoder_self`` [num_decoder_layers, heads, tgt_len, tgt_len] and
    ``cross`` [num_decoder_layers, heads, tgt_len, src_len], float32 softmax weights:
    each row over the allowed keys sums to 1, masked keys (padding, the future) are 0.
  """
  if not isinstance(model, Transformer):
    raise TypeError(f'attention_maps needs an encoder-decoder Transformer, got '
                    f'{type(model).__name__}')
  cfg = model.cfg
  src, tgt = _as_row(src_ids, 'src_ids'), _as_row(tgt_ids, 'tgt_ids')
  sown = _sown_weights(cfg, params, src, tgt)
  return {
      'encoder_self': _per_layer(sown['encoder'], 'self_attention', cfg.num_encoder_layers),
      'decoder_self': _per_layer(sown['decoder'], 'self_attention', cfg.num_decoder_layers),
      'cross': _per_layer(sown['decoder'], 'cross_attention', cfg.num_decoder_layers),
  }


def greedy_pair(translator, sentence: str) -> tuple[np.ndarray, np.ndarray]:
  """(source ids [src_len], greedy output ids [out_len], EOS last when it was produced).

  ``translator`` is a `flaxformer_mini.translate.Translator`.
  """
  from flaxformer_mini.translate import SearchConfig
  (src,) = translator.encode([sentence])
  if src is None or len(src) == 0:
    raise ValueError(f'--sentence {sentence!r} has no tokens')
  seqs, _ = translator.search_ids(np.asarray(src)[None], SearchConfig('greedy'))
  out = [int(t) for t in np.asarray(seqs)[0]]
  if EOS_ID in out:
    out = out[:out.index(EOS_ID) + 1]
  return np.asarray(src, np.int32), np.asarray(out, np.int32)


def pieces(tokenizer, ids) -> list[str]:
  """Axis labels: SentencePiece pieces, ``<s>``/``</s>``/``<pad>``/``<unk>`` for specials."""
  return [SPECIAL_PIECES.get(int(i)) or tokenizer.id_to_piece(int(i)) for i in ids]


def read_metrics(path: str) -> list[dict]:
  """The records of a ``metrics.jsonl`` (one JSON object per line; blank lines skipped).

  Raises:
    ValueError naming the file and the line that is not a JSON object with a numeric
    ``"step"`` (e.g. a line cut short when a run was killed mid-write).
  """
  records = []
  with open(path, encoding='utf-8') as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f'{path} line {n}: not valid JSON ({e.msg} at column {e.colno}); '
                         'expected one metrics object per line') from None
      if not isinstance(record, dict) or not isinstance(record.get('step'), (int, float)):
        raise ValueError(f'{path} line {n}: expected a JSON object with a numeric "step", '
                         f'got {line.strip()[:80]!r}')
      records.append(record)
  return records


# ---------------------------------------------------------------------------
# Figures (each returns the Figure it saved, so a test can read back what was drawn).
# ---------------------------------------------------------------------------


def plot_positional_encoding(num_positions: int, d_model: int, path: str,
                             note: str = '') -> Figure:
  """Draws `positional_encoding` as two heatmaps with colorbars into ``path``."""
  table, similarity = positional_encoding(num_positions, d_model)
  fig = Figure(figsize=(17, 5), layout='constrained')
  left, middle, right = fig.subplots(1, 3, width_ratios=(1.1, 1, 1.1))
  im = left.imshow(table, cmap='RdBu_r', vmin=-1, vmax=1, aspect='auto',
                   interpolation='nearest')
  left.set(title=f'PE[pos, i]: sin at even i, cos at odd i (d_model={d_model})',
           xlabel='encoding dimension i', ylabel='position pos')
  fig.colorbar(im, ax=left, label='PE value')
  # Even (sin) columns spread over the dimensions: the wavelength grows geometrically with i.
  for i in sorted({2 * int(d_model * f / 2) for f in (0, 1 / 16, 1 / 8, 1 / 4, 1 / 2)}):
    middle.plot(table[:, i], label=f'i={i}')
  middle.set(title='PE[:, i] against the position (sin columns)', xlabel='position pos',
             ylabel='PE value')
  middle.legend(fontsize=8, loc='lower left')
  middle.grid(alpha=0.3)
  im = right.imshow(similarity, cmap='viridis', interpolation='nearest')
  right.set(title='PE(i) · PE(j): nearby positions are similar',
            xlabel='position j', ylabel='position i')
  fig.colorbar(im, ax=right, label='dot product')
  fig.suptitle('Sinusoidal positional encoding' + (f' ({note})' if note else ''))
  fig.savefig(path, dpi=110)
  return fig


def plot_attention(weights: np.ndarray, query_labels: Sequence[str],
                   key_labels: Sequence[str], path: str, *, title: str, query_axis: str,
                   key_axis: str) -> Figure:
  """A grid of maps: one row per layer, one column per head, plus the mean over heads.

  Args:
    weights: [layers, heads, q_len, kv_len].
    query_labels / key_labels: q_len / kv_len tick labels.
    path: the PNG to write.
    title, query_axis, key_axis: figure title and axis names.
  """
  layers, heads, q_len, kv_len = weights.shape
  if len(query_labels) != q_len or len(key_labels) != kv_len:
    raise ValueError(f'weights {weights.shape} need {q_len} query and {kv_len} key labels, '
                     f'got {len(query_labels)} and {len(key_labels)}')
  # Inches per map: room for one tick label per token.
  width, height = max(2.2, 0.2 * kv_len), max(2.2, 0.2 * q_len)
  fig = Figure(figsize=(width * (heads + 1) + 1.5, height * layers + 1.8),
               layout='constrained')
  axes = fig.subplots(layers, heads + 1, squeeze=False)
  font = 7 if max(q_len, kv_len) > 12 else 8
  for l in range(layers):
    for h in range(heads + 1):
      ax = axes[l, h]
      grid = weights[l, h] if h < heads else weights[l].mean(0)
      im = ax.imshow(grid, cmap='viridis', vmin=0.0, vmax=1.0, interpolation='nearest')
      ax.set_title(f'layer {l}, ' + (f'head {h}' if h < heads else 'mean of heads'),
                   fontsize=9)
      ax.set_xticks(range(kv_len))
      ax.set_yticks(range(q_len))
      ax.set_xticklabels(key_labels if l == layers - 1 else [], rotation=90, fontsize=font)
      ax.set_yticklabels(query_labels if h == 0 else [], fontsize=font)
  for ax in axes[-1]:
    ax.set_xlabel(key_axis, fontsize=9)
  for ax in axes[:, 0]:
    ax.set_ylabel(query_axis, fontsize=9)
  fig.colorbar(im, ax=axes, shrink=0.8, label='attention weight')
  fig.suptitle(title)
  fig.savefig(path, dpi=110)
  return fig


CURVE_PANELS = (
    ('loss (label-smoothed cross-entropy)', ('train/loss', 'dev/loss')),
    ('token accuracy', ('train/accuracy', 'dev/accuracy')),
    ('learning rate', ('learning_rate',)),
    ('throughput (tokens/s)', ('tokens_per_s',)),
)


FINAL_METRICS = (('final/bleu', 'BLEU'), ('final/rougeL', 'ROUGE-L'),
                 ('final/accuracy', 'accuracy'))  # the first one present goes in the title


def plot_training_curves(records: Sequence[Mapping[str, Any]], path: str,
                         title: str = 'Training curves') -> Figure:
  """Loss, accuracy, learning rate and throughput against the step (panels with data)."""
  panels = [(name, [(k, [(r['step'], r[k]) for r in records if k in r]) for k in keys])
            for name, keys in CURVE_PANELS]
  panels = [(name, [(k, pts) for k, pts in series if pts]) for name, series in panels]
  panels = [(name, series) for name, series in panels if series]
  if not panels:
    raise ValueError(f'no plottable metric ({[k for _, ks in CURVE_PANELS for k in ks]}) '
                     f'in {len(records)} records')
  fig = Figure(figsize=(5 * len(panels), 4), layout='constrained')
  axes = fig.subplots(1, len(panels), squeeze=False)[0]
  for ax, (name, series) in zip(axes, panels):
    for key, pts in series:
      steps, values = zip(*pts)
      ax.plot(steps, values, marker='o' if len(pts) < 5 else None, label=key)
    ax.set(title=name, xlabel='step')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  for key, name in FINAL_METRICS:
    final = [r[key] for r in records if key in r]
    if final:
      title += f' (final dev {name} {final[-1]:.2f})'
      break
  fig.suptitle(title)
  fig.savefig(path, dpi=110)
  return fig


# ---------------------------------------------------------------------------
# A run directory -> <workdir>/plots/*.png
# ---------------------------------------------------------------------------


def _read_config(workdir: str) -> dict:
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f'--workdir {workdir!r} does not exist; name a training run '
                            'directory (train.py --workdir)')
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'--workdir {workdir!r} is not a training run directory: it has '
                            'no config.json (train.py writes it when a run starts)')
  with open(path, encoding='utf-8') as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f'{path} line {e.lineno}: not valid JSON ({e.msg})') from None


@dataclasses.dataclass(frozen=True)
class AttentionMap:
  """One attention figure's data: the weights and the tokens on its axes.

  Attributes:
    weights: [layers, heads, q_len, kv_len] float32.
    query_labels: [q_len] tokens of the rows; key_labels: [kv_len] tokens of the columns.
    title, query_axis, key_axis: the figure's title and axis names.
  """
  weights: np.ndarray
  query_labels: list[str]
  key_labels: list[str]
  title: str
  query_axis: str
  key_axis: str


def sentence_attention(translator, sentence: str) -> tuple[dict[str, AttentionMap], str]:
  """Every attention map of ``sentence`` and the model's greedy output, teacher-forced.

  Returns:
    ({kind: AttentionMap} for `MAP_KINDS`, caption ``'sentence' -> 'output'``). Source
    tokens label the encoder side; on the decoder side the rows (queries) are the output
    tokens and the decoder self-attention columns (keys) its inputs: BOS, then the output
    shifted right.
  """
  src, out = greedy_pair(translator, sentence)
  decoder_inputs = np.concatenate([[BOS_ID], out[:-1]]).astype(np.int32)
  maps = attention_maps(translator.model, translator.params, src, decoder_inputs)
  tok = translator.tokenizer
  src_labels, in_labels, out_labels = (pieces(tok, ids) for ids in (src, decoder_inputs, out))
  output = tok.decode(out[None])[0]
  shorten = lambda text: text if len(text) <= 60 else text[:57] + '...'
  caption = f'{shorten(sentence)!r} -> {shorten(output)!r}'
  specs = {
      'encoder_self': (src_labels, src_labels, 'Encoder self-attention', 'source token (query)',
                       'source token (key)'),
      'decoder_self': (out_labels, in_labels, 'Decoder self-attention (causal)',
                       'output token (query position)', 'decoder input token (key)'),
      'cross': (out_labels, src_labels, 'Cross-attention (encoder-decoder)',
                'output token (query position)', 'source token (key)'),
  }
  return {kind: AttentionMap(maps[kind], *specs[kind]) for kind in MAP_KINDS}, caption


def draw_attention(translator, sentence: str, out_dir: str) -> list[str]:
  """The three attention figures of `sentence_attention`, ``attention_<kind>.png``."""
  maps, caption = sentence_attention(translator, sentence)
  paths = []
  for kind, m in maps.items():
    path = os.path.join(out_dir, f'attention_{kind}.png')
    plot_attention(m.weights, m.query_labels, m.key_labels, path,
                   title=f'{m.title}\n{caption}', query_axis=m.query_axis,
                   key_axis=m.key_axis)
    paths.append(path)
  return paths


def visualize(workdir: str, sentence: str | None = None, step: int | None = None,
              out_dir: str | None = None) -> list[str]:
  """Draws every picture the run directory allows; returns the paths written.

  Args:
    workdir: a training run directory (config.json, checkpoints/, metrics.jsonl).
    sentence: the encoder input of the attention maps (default: `DEFAULT_INPUTS` of the
      run's task); only translation and summarization runs get attention maps.
    step: the checkpoint (default: the newest readable one).
    out_dir: default ``<workdir>/plots``.
  """
  config = _read_config(workdir)
  out_dir = out_dir or os.path.join(workdir, PLOTS_SUBDIR)
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  model_cfg = TransformerConfig.from_dict(config.get('model', {}))
  note = '' if model_cfg.position_kind == 'sinusoidal' else (
      f'this model uses position_kind={model_cfg.position_kind!r}')
  path = os.path.join(out_dir, 'positional_encoding.png')
  plot_positional_encoding(model_cfg.max_len, model_cfg.d_model, path, note)
  paths.append(path)

  task = config.get('task', 'translation')
  if task in DEFAULT_INPUTS:
    from flaxformer_mini.translate import Translator
    translator = Translator.from_workdir(workdir, step, batch_size=1)
    paths += draw_attention(translator, sentence or DEFAULT_INPUTS[task], out_dir)
  else:
    log.warning('attention maps need an encoder-decoder run (task %s); %s has task=%r',
                ' or '.join(DEFAULT_INPUTS), workdir, task)

  metrics = os.path.join(workdir, 'metrics.jsonl')
  if os.path.isfile(metrics):
    path = os.path.join(out_dir, 'training_curves.png')
    name = os.path.basename(os.path.abspath(workdir))
    plot_training_curves(read_metrics(metrics), path, title=f'Training curves of {name}')
    paths.append(path)
  else:
    log.warning('no %s: training curves skipped', metrics)
  return paths


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog='python -m flaxformer_mini.visualize',
                              description=__doc__.split('\n\n')[0])
  p.add_argument('--workdir', required=True, help='the training run directory')
  p.add_argument('--sentence', default=None,
                 help='encoder input of the attention maps (default: a sentence for a '
                 'translation run, a short description for a summarization run)')
  p.add_argument('--step', type=int, default=None,
                 help='checkpoint step (default: the newest readable one)')
  p.add_argument('--out', default=None, help='output folder (default <workdir>/plots)')
  return p


def main(argv: Sequence[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format='%(levelname)s: %(message)s')
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.ERROR)  # orbax's read-only notices off
  try:
    paths = visualize(args.workdir, args.sentence, args.step, args.out)
  except (FileNotFoundError, ValueError, RuntimeError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  for path in paths:
    print(path)
  return 0


if __name__ == '__main__':
  sys.exit(main())
