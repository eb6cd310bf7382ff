"""ViT on scikit-learn's load_digits (8x8 grayscale, 10 classes): a few minutes on CPU.

    python train.py --config=configs/vit_digits.py --workdir=runs/vit_digits

4 patches of 4x4 pixels + a class token, d_model 64, 4 pre-LN layers; AdamW with
warmup + cosine decay; +-1 pixel random shifts (without them the model memorizes the
1,437 images in ~500 steps and stalls near 97%). patch_size=2 (16 patches) costs ~3.4x
more per step. Reports dev (= held-out test split)
accuracy and, at the end, ``dev/test_accuracy`` over all 360 test images.
"""

import ml_collections

from configs import common


def get_config() -> ml_collections.ConfigDict:
  c = common.base_config()
  c.task = 'vit_digits'
  c.seed = 0
  c.batch_size = 64
  c.num_train_steps = 2000          # ~89 epochs of the 1,437 training images
  c.log_every = 100
  c.eval_every = 500
  c.checkpoint_every = 1000
  c.async_checkpointing = False

  # flaxformer_mini.variants.vit.ViTConfig.from_dict; `encoder` overrides
  # vit_encoder_config (pre-LN, GELU, learned positions, final LayerNorm).
  c.model = ml_collections.ConfigDict(dict(
      image_size=(8, 8), patch_size=4, num_channels=1, num_classes=10,
      encoder=dict(d_model=64, num_heads=4, d_ff=128, num_encoder_layers=4,
                   dropout_rate=0.0, attention_dropout_rate=0.0)))

  c.data = ml_collections.ConfigDict()
  c.data.test_fraction = 0.2         # stratified, fixed: 1,437 train / 360 test
  c.data.split_seed = 0
  c.data.shift = 1                   # random translation augmentation, pixels
  c.data.eval_batch_size = 128

  c.optimizer.schedule = 'cosine'
  c.optimizer.learning_rate = 3e-3
  c.optimizer.warmup_steps = 200
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-8
  c.optimizer.weight_decay = 0.05
  c.loss.label_smoothing = 0.0
  c.eval.num_samples = 5
  return c
