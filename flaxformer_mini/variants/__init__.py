"""Model variants composed from the core layers (one module per family).

  bert       BERT encoder, pooler, masked-LM / classification heads, HF checkpoint import
  vit        Vision Transformer: patch embedding, class token, pre-LN encoder, class head
  vit_task   the ``vit_digits`` training task (imported by train.py's task registry, not here)
"""

from flaxformer_mini.variants import bert, vit
