"""Per-device memory of the train state (params + Adam) under data / fsdp / tensor meshes.

    python benchmarks/mesh_memory.py                 # the pt->en model, 1/2/4 simulated CPU devices
    python benchmarks/mesh_memory.py --model base    # Transformer-base sizes (d_model 512, 6+6)

Re-executes itself with ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` (CPU
devices stand in for accelerators: the layout, and so the bytes, are the same). For
each mesh it creates the sharded TrainState the way train.py does and reports, for the
fullest device: the measured bytes of its params and optimizer-state shards, the bytes
the formula of docs/scaling.md predicts, and XLA's compiled train-step figures
(`memory_analysis`: arguments, outputs, temporaries = activations and gradients).
"""

import argparse
import math
import os
import platform
import sys

if 'xla_force_host_platform_device_count' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_force_host_platform_device_count=4').strip()
  os.execv(sys.executable, [sys.executable] + sys.argv)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flaxformer_mini import models, sharding, training
from flaxformer_mini.config import TransformerConfig

MODELS = {
    'pt_en': dict(vocab_size=8000, d_model=256, num_heads=4, d_ff=1024, num_encoder_layers=3,
                  num_decoder_layers=3, max_len=128, norm_placement='pre'),
    'base': dict(vocab_size=32000, d_model=512, num_heads=8, d_ff=2048, num_encoder_layers=6,
                 num_decoder_layers=6, max_len=128, norm_placement='pre'),
}
LAYOUTS = [
    {'data': 1}, {'data': 2}, {'fsdp': 2}, {'tensor': 2},
    {'data': 4}, {'fsdp': 4}, {'tensor': 4}, {'fsdp': 2, 'tensor': 2},
]
MiB = 2 ** 20


def formula_bytes(params, mesh, rules, copies):
  """sum over leaves of bytes / (product of the mesh axes the leaf is split over)."""
  total = 0
  for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    name = sharding.path_str(path)
    spec = sharding.spec_for(sharding.logical_axes(name, x.ndim), x.shape, mesh, rules, name)
    parts = 1
    for entry in spec:
      for axis in (entry if isinstance(entry, tuple) else (entry,)):
        parts *= mesh.shape[axis] if axis else 1
    total += x.size * x.dtype.itemsize / parts
  return copies * total


def device_bytes(tree, device):
  return sum(s.data.nbytes for x in jax.tree_util.tree_leaves(tree)
             for s in x.addressable_shards if s.device == device)


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--model', choices=sorted(MODELS), default='pt_en')
  p.add_argument('--batch', type=int, default=64)
  p.add_argument('--length', type=int, default=64)
  args = p.parse_args()
  cfg = TransformerConfig(**MODELS[args.model])
  model = models.Transformer(cfg)
  tx = optax.adam(1e-3)
  ones = jnp.ones((1, args.length), jnp.int32)
  init = lambda: training.TrainState.create(model.init(jax.random.PRNGKey(0), ones, ones)['params'],
                                            tx, jax.random.PRNGKey(1))

  def loss_fn(params, batch, rng, deterministic):
    logits = model.apply({'params': params}, batch['inputs'], batch['decoder_inputs'],
                         deterministic=deterministic, rngs={'dropout': rng})
    sums = training.cross_entropy_sums(logits, batch['targets'], batch['targets'] > 0, 0.1)
    return sums['loss'], sums

  rows = np.ones((args.batch, args.length), np.int32)
  batch = {'inputs': rows, 'decoder_inputs': rows, 'targets': rows}
  abstract = jax.eval_shape(init)
  n_params = sum(x.size for x in jax.tree_util.tree_leaves(abstract.params))
  rules = sharding.parse_rules(sharding.DEFAULT_RULES)
  print(f'machine: {platform.machine()} {platform.processor() or ""} {os.cpu_count()} cores, '
        f'{jax.device_count()} simulated {jax.devices()[0].platform} devices; '
        f'jax {jax.__version__}')
  print(f'model {args.model}: {MODELS[args.model]}, {n_params:,} params, float32, Adam; '
        f'batch {args.batch} x {args.length}')
  print('| devices | mesh | params MiB/device | optimizer MiB/device | formula MiB | '
        'step arguments MiB | step temporaries MiB |')
  print('|---|---|---|---|---|---|---|')
  for layout in LAYOUTS:
    n = math.prod(layout.values())
    mesh = sharding.make_mesh(layout, devices=jax.devices()[:n])
    state_sh = sharding.state_shardings(abstract, mesh, rules)
    state = jax.jit(init, out_shardings=state_sh)()
    device = mesh.devices.flat[0]
    got_p, got_o = device_bytes(state.params, device), device_bytes(state.opt_state, device)
    want = formula_bytes(abstract.params, mesh, rules, copies=3)  # params + mu + nu
    batch_sh = sharding.batch_sharding(mesh, rules)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    def train_step(state, batch, mesh=mesh):
      with sharding.activation_sharding(mesh, rules):  # as training.make_step_fns does
        return training.train_step(state, batch, loss_fn=loss_fn, tx=tx)
    step = jax.jit(train_step, in_shardings=(state_sh, batch_sh),
                   out_shardings=(state_sh, replicated), donate_argnums=0)
    mem = step.lower(state, jax.device_put(batch, batch_sh)).compile().memory_analysis()
    name = ' x '.join(f'{k}={v}' for k, v in layout.items())
    print(f'| {n} | {name} | {got_p / MiB:.2f} | {got_o / MiB:.2f} | {want / MiB:.2f} | '
          f'{mem.argument_size_in_bytes / MiB:.2f} | {mem.temp_size_in_bytes / MiB:.2f} |',
          flush=True)
    del state


if __name__ == '__main__':
  main()
