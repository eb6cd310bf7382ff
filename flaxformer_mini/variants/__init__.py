"""Model variants composed from the core layers (one module per family).

  bert       BERT encoder, pooler, masked-LM / classification heads, HF checkpoint import
  vit        Vision Transformer: patch embedding, class token, pre-LN encoder, class head
  vit_task   the ``vit_digits`` training task (imported by train.py's task registry, not here)
  llama      decoder-only LMs by config: Llama-style and GPT-style, HF Llama / GGUF import
  t5         T5 v1.0 / v1.1 as a Transformer config, HF T5 import
  hf_import  shared checks of the HF importers (missing / unexpected / misshapen tensors)
  lm_task    the ``lm`` training task (imported by train.py's task registry, not here)
"""

from flaxformer_mini.variants import bert, llama, t5, vit
