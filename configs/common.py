"""Shared pieces of the experiment configs: `base_config()` with every field and its meaning.

An experiment file (configs/<name>.py) defines ``get_config()`` that starts from
`base_config()` and overrides what differs. All fields exist here, so a mistyped
override (``--config.optimizer.warmup_step=...``) is an error, not a new field.
"""

import os

import ml_collections

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = 'translation'              # name in flaxformer_mini.tasks registry
  c.seed = 0                          # params init, dropout and data-shuffle seed
  c.parallel = 'mesh'                 # 'mesh' (config.mesh over all devices of all
                                      # processes) | 'jit' (one device) | 'pmap' (replicas)
  c.mesh = ml_collections.ConfigDict()  # README "Scaling"; product = number of devices
  c.mesh.data = -1                    # batch rows split, params replicated; -1 = the rest
  c.mesh.fsdp = 1                     # batch rows AND params/optimizer split on 'embed'
  c.mesh.tensor = 1                   # params split on 'heads'/'mlp'/'vocab'
  # logical axis -> mesh axes ('data,fsdp'; '' = replicated); see flaxformer_mini/sharding.py
  c.mesh.rules = ml_collections.ConfigDict(dict(
      batch='data,fsdp', embed='fsdp', heads='tensor', mlp='tensor', vocab='tensor', kv='',
      norm='', position='', token_type='', buckets='', classes='', patch='', layers='',
      length=''))
  c.batch_size = 64                   # rows per micro-batch (global; split across devices)
  c.num_train_steps = 1000            # optimizer updates (each = accum_steps micro-batches)
  c.batch_chunks = 1                  # loss over this many row chunks of a micro-batch in one
                                      # step: same gradient; on CPU ~8-row chunks are faster
                                      # but compile longer (benchmarks/README.md)
  c.log_every = 50                    # train metrics to tqdm / TensorBoard / metrics.jsonl
  c.eval_every = 500                  # dev loss/accuracy (and at the end); 0 = only at end
  c.checkpoint_every = 500            # also at the end and on SIGTERM/Ctrl-C
  c.keep = 2                          # keep the last `keep` checkpoints ...
  c.keep_best = 1                     # ... plus the best `keep_best` by dev nll
  c.async_checkpointing = True        # orbax writes in the background (still atomic)
  c.restore_params_only = False       # resume with params/step/RNG only, fresh optimizer
                                      # state (after changing optimizer settings)
  c.start_over_if_unreadable = False  # every checkpoint unreadable: move them to corrupt/
                                      # and start at step 0 instead of stopping
  c.loss_scale = 'auto'               # 'auto' (dynamic when model.dtype='float16') |
                                      # 'dynamic' | 'none' (training.LossScale)
  c.loss_scale_period = 2000          # finite steps before the loss scale doubles
  c.nonfinite = 'stop'                # NaN/inf loss or gradient: 'stop' (state untouched,
                                      # exit naming the step) | 'skip' the update, count it

  # Fed as-is to flaxformer_mini.TransformerConfig.from_dict (unknown keys fail there).
  c.model = ml_collections.ConfigDict(dict(
      vocab_size=8000, d_model=256, num_heads=4, d_ff=1024,
      num_encoder_layers=3, num_decoder_layers=3,
      dropout_rate=0.1, attention_dropout_rate=0.0, dropout_impl='hash', max_len=128,
      norm_placement='pre', share_embeddings=True, tie_output=True,
      dtype='float32',
      remat='none',                   # 'full' | 'dots': recompute layer activations backward
      scan_layers=False))             # one nn.scan per stack: params [num_layers, ...]

  c.data = ml_collections.ConfigDict()
  c.data.source = 'embedded'          # 'embedded' (package sample) | 'shared' (../shared/data)
  c.data.shared_root = os.path.join(REPO_ROOT, '..', 'shared')
  c.data.pair = 'en-pt'               # file pair: en-pt | en-de
  c.data.src_lang = 'pt'
  c.data.tgt_lang = 'en'
  c.data.train_split = 'train'        # TFDS split syntax, e.g. 'train[:2000]'
  c.data.eval_split = 'validation'
  c.data.tfds_dir = ''                # '' = <workdir>/tfds
  c.data.vocab_size = c.model.get_ref('vocab_size')   # one value: tokenizer == model
  c.data.spm_model_type = 'unigram'
  c.data.spm_max_sentences = 0        # sentences (per language) to train SentencePiece; 0 = all
  c.data.max_source_len = 64          # packed row lengths
  c.data.max_target_len = 64
  c.data.pack = True
  c.data.overlong = 'truncate'        # or 'drop'
  c.data.eval_batch_size = 64
  c.data.input_shards = 1             # the global batch is this many row blocks, each from
                                      # its own slice of the data; a process reads only its
                                      # blocks (a multiple of the process count; 1 = every
                                      # process builds the whole batch and keeps its rows)

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.schedule = 'rsqrt'      # 'rsqrt' (paper) | 'cosine' | 'constant'
  c.optimizer.lr_factor = 1.0         # rsqrt: lr = factor * d_model^-0.5 * min(s^-.5, s*w^-1.5)
  c.optimizer.learning_rate = 1e-3    # cosine peak / constant value
  c.optimizer.warmup_steps = 4000
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.98
  c.optimizer.eps = 1e-9
  c.optimizer.clip_norm = 1.0         # global-norm clipping; 0 = off
  c.optimizer.weight_decay = 0.0      # decoupled (AdamW) on weight matrices, not emb/bias/norm
  c.optimizer.accum_steps = 1         # optax.MultiSteps micro-batches per update
  c.optimizer.layer_decay = 1.0       # fine-tuning: lr x decay^(L-i) for layer_<i> of L,
                                      # decay^(L+1) for embeddings, 1 for heads; 1 = off

  c.loss = ml_collections.ConfigDict()
  c.loss.label_smoothing = 0.1        # trained on (1-a)*onehot + a/V targets; nll/ppl stay plain

  c.eval = ml_collections.ConfigDict()
  c.eval.final_bleu = True            # decode the dev set at the end (BLEU + samples)
  c.eval.bleu_every = 0               # dev BLEU during training (0 = only at the end)
  c.eval.bleu_examples = 0            # dev sentences decoded for BLEU; 0 = all
  c.eval.max_decode_len = 64
  c.eval.decode_batch_size = 100
  c.eval.beam_size = 1                # 1 = greedy
  c.eval.alpha = 0.6                  # beam length penalty
  c.eval.num_samples = 3              # example translations printed
  return c


def model_section(preset) -> ml_collections.ConfigDict:
  """A `TransformerConfig` preset (``llama.llama_config(...)``, ``t5.t5_config(...)``) as
  ``config.model``.

  Every field is written out, so config.json records the whole model and any field can be
  overridden (``--config.model.dropout_rate=0.2``); the config file states only the call.
  """
  return ml_collections.ConfigDict(preset.to_dict())
