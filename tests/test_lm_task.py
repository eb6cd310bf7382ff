"""The ``lm`` task's data path: hand-checked packing of documents into rows, resumption, config."""

import numpy as np

from flaxformer_mini.config import TransformerConfig
from flaxformer_mini.data import BOS_ID, EOS_ID
from flaxformer_mini.tasks import lm as lm_task
from flaxformer_mini.variants import llama


class _CharTokenizer:
  """'a' -> 10, 'b' -> 11, ...: ids readable by eye."""

  def encode(self, texts):
    return [np.array([ord(c) - ord("a") + 10 for c in t], np.int32) for t in texts]


def test_packed_rows_by_hand():
  # Stream: [B a b c E] [B d e f g h E] [B i j E]  (B=BOS, E=EOS); rows of 6 inputs.
  rows = lm_task.PackedRows(["abc", "defgh", "ij"], _CharTokenizer(), seq_len=6,
                            batch_size=2, shuffle=False, repeat=False)
  b, E = BOS_ID, EOS_ID
  batch = next(rows)
  np.testing.assert_array_equal(batch["inputs"], [[b, 10, 11, 12, E, b], [13, 14, 15, 16, 17, E]])
  np.testing.assert_array_equal(batch["targets"], [[10, 11, 12, E, b, 13], [14, 15, 16, 17, E, b]])
  np.testing.assert_array_equal(batch["segmentation"], [[1, 1, 1, 1, 1, 2], [1, 1, 1, 1, 1, 1]])
  np.testing.assert_array_equal(batch["positions"], [[0, 1, 2, 3, 4, 0], [0, 1, 2, 3, 4, 5]])
  # No loss where the next token starts another document.
  np.testing.assert_array_equal(batch["weights"], [[1, 1, 1, 1, 0, 1], [1, 1, 1, 1, 1, 0]])
  last = next(rows)   # the rest, then zero-weight padding rows
  np.testing.assert_array_equal(last["inputs"], [[b, 18, 19, 0, 0, 0], [0] * 6])
  np.testing.assert_array_equal(last["targets"][0, :3], [18, 19, E])
  np.testing.assert_array_equal(last["weights"], [[1, 1, 1, 0, 0, 0], [0] * 6])
  assert next(rows, None) is None


def test_packed_rows_resume_and_reshuffle():
  docs = ["abc", "defgh", "ij", "klmnop", "q"]
  make = lambda: lm_task.PackedRows(docs, _CharTokenizer(), seq_len=5, batch_size=2, seed=3)
  a = make()
  seen = [next(a) for _ in range(3)]
  state = a.get_state()
  rest = [next(a) for _ in range(4)]   # crosses into the next epochs
  b = make()
  b.set_state(state)
  for want in rest:
    got = next(b)
    for k in lm_task.BATCH_KEYS:
      np.testing.assert_array_equal(got[k], want[k])
  assert state["epoch"] < a.get_state()["epoch"]
  # Every train input token is real (no padding in an endless stream).
  assert all((x["segmentation"] > 0).all() for x in seen + rest)


def test_split_is_stable_and_disjoint():
  docs = [f"document {i}" for i in range(2000)]
  train, dev = lm_task.split_documents(docs, 50)
  assert set(train).isdisjoint(dev) and len(train) + len(dev) == 2000
  assert 50 < len(dev) < 160                             # ~5%
  assert lm_task.split_documents(docs[::-1], 50)[1] == dev[::-1]


def test_lm_en_config_is_llama_config():
  from configs import lm_en
  c = lm_en.get_config()
  assert c.task == "lm" and c.data.vocab_size == c.model.vocab_size
  assert TransformerConfig.from_dict(c.model) == llama.llama_config(
      vocab_size=4096, d_model=128, num_layers=4, num_heads=4, num_kv_heads=2, d_ff=352,
      max_len=128, tie_embeddings=True)
