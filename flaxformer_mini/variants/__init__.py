"""Model variants composed from the core layers (one module per family; their training
tasks live in `flaxformer_mini.tasks`).

  bert       BERT encoder, pooler, masked-LM / classification heads, HF checkpoint import
  vit        Vision Transformer: patch embedding, class token, pre-LN encoder, class head
  llama      decoder-only LMs by config: Llama-style and GPT-style, HF Llama / GGUF import
  t5         T5 v1.0 / v1.1 as a Transformer config, HF T5 import
  hf_import  shared checks of the HF importers (missing / unexpected / misshapen tensors)
"""

from flaxformer_mini.variants import bert, llama, t5, vit
