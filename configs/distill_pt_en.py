"""Knowledge distillation pt->en: a small student from a trained teacher run (Kim & Rush 2016).

    python3 train.py --config=configs/translate_pt_en.py --workdir=runs/pt_en     # the teacher
    python3 train.py --config=configs/distill_pt_en.py:word --workdir=runs/student_word
    python3 train.py --config=configs/distill_pt_en.py:sequence --workdir=runs/student_seq
    python3 train.py --config=configs/distill_pt_en.py:none --workdir=runs/student_plain

Variants: ``word`` (KL to the teacher's softened distribution mixed with the label loss),
``sequence`` (the teacher's beam outputs over the training sources are the targets; built
once into ``<teacher>/distilled/``), ``both``, ``none`` (same student, same steps, the
original data: the baseline). The teacher directory is ``--config.distill.teacher_workdir``.
The student: 2+2 layers, d_model 128, the teacher's 8k SentencePiece vocabulary.

``deep``: the fast translator. Sequence-level distillation into a deep encoder and a
shallow decoder (4+1 layers, d_model 192; Kasai et al. 2021): decoding cost is the decoder's,
so one decoder layer decodes fast while the encoder keeps the quality.
"""

import ml_collections

from configs import translate_pt_en

KINDS = ('word', 'sequence', 'both', 'none')  # the distillation kinds (tasks/distill.py)
VARIANTS = KINDS + ('deep',)                   # deep: 'sequence' with a 4+1-layer student


def get_config(kind: str = 'word') -> ml_collections.ConfigDict:
  if kind not in VARIANTS:
    raise ValueError(f'config variant {kind!r} is not one of {VARIANTS}')
  deep, kind = kind == 'deep', 'sequence' if kind == 'deep' else kind
  c = translate_pt_en.get_config()
  c.task = 'distill'
  c.distill = ml_collections.ConfigDict(dict(
      kind=kind,                      # 'word' | 'sequence' | 'both' | 'none'
      teacher_workdir='runs/pt_en',
      teacher_step=0,                 # 0 = the teacher's newest checkpoint
      alpha=0.5,                      # weight of the word-level KL term
      temperature=2.0,                # softening of both distributions (loss x T^2)
      beam_size=4,                    # the teacher's search for the sequence-level corpus
      beam_alpha=0.6,
      cache_dir='',                   # '' = <teacher_workdir>/distilled
  ))
  c.model.update(d_model=128, num_heads=4, d_ff=512, num_encoder_layers=2,
                 num_decoder_layers=2)
  c.num_train_steps = 2000
  if deep:
    c.model.update(d_model=192, d_ff=768, num_encoder_layers=4, num_decoder_layers=1)
    c.num_train_steps = 5000
  c.eval.beam_size = 4
  return c
