"""Tests for flaxformer_mini.variants.vit (and the vit_digits data split).

* patch embedding == a NumPy loop-over-patches reference, == a strided convolution;
* token 0 is the class token, tokens 1.. are the patches in row-major order (+ positions);
* positions are the only source of order: with a zero position table the class-token
  output is invariant to permuting patches, with the learned table it is not;
* the model overfits a tiny batch; the digits split is deterministic, disjoint, stratified.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flaxformer_mini.variants import vit as vit_lib


def _tiny(patch_size=2, **enc):
  encoder = dict(d_model=32, num_heads=4, d_ff=64, num_encoder_layers=2, dropout_rate=0.0)
  encoder.update(enc)
  return vit_lib.ViTConfig.from_dict(dict(image_size=(8, 8), patch_size=patch_size,
                                          num_channels=3, num_classes=5, encoder=encoder))


def _init(model, images):
  """Jitted init: eager flax init dispatches op by op and is slow on a loaded CPU."""
  return jax.jit(model.init)(jax.random.key(0), images)["params"]


def _images(rng, n=4, c=3):
  return rng.normal(size=(n, 8, 8, c)).astype(np.float32)


def _reference_patches(images, p):
  """Loop-based reference: patch (i, j) -> flattened images[:, i*p:(i+1)*p, j*p:(j+1)*p, :]."""
  b, h, w, _ = images.shape
  out = [images[:, i * p:(i + 1) * p, j * p:(j + 1) * p, :].reshape(b, -1)
         for i in range(h // p) for j in range(w // p)]
  return np.stack(out, axis=1)


@pytest.mark.parametrize("p", [1, 2, 4])
def test_patch_embedding_matches_numpy_and_conv(rng, p):
  images = _images(rng)
  module = vit_lib.PatchEmbedding(p, 16)
  params = _init(module, images)
  ours = np.asarray(jax.jit(module.apply)({"params": params}, images))
  kernel = np.asarray(params["projection"]["kernel"], np.float64)
  bias = np.asarray(params["projection"]["bias"], np.float64)
  want = _reference_patches(images.astype(np.float64), p) @ kernel + bias
  np.testing.assert_allclose(ours, want, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(vit_lib.patchify(images, p)),
                                _reference_patches(images, p))
  conv = jax.lax.conv_general_dilated(
      images, kernel.reshape(p, p, 3, 16).astype(np.float32), (p, p), "VALID",
      dimension_numbers=("NHWC", "HWIO", "NHWC")) + bias.astype(np.float32)
  np.testing.assert_allclose(ours, np.asarray(conv).reshape(4, -1, 16), atol=1e-5)


def test_class_token_prepended_and_positions_added(rng):
  cfg = _tiny()
  images = _images(rng)
  model = vit_lib.ViT(cfg)
  params = jax.tree_util.tree_map(np.asarray, _init(model, images))
  params["cls_token"] = rng.normal(size=params["cls_token"].shape).astype(np.float32)
  tokens = np.asarray(jax.jit(lambda p, x: model.apply({"params": p}, x, method=vit_lib.ViT.embed))(
      params, images))
  assert tokens.shape == (4, cfg.num_tokens, 32) and cfg.num_tokens == 17
  pos = params["position_embedding"]["embedding"]
  proj = params["patch_embedding"]["projection"]
  patches = _reference_patches(images, 2) @ proj["kernel"] + proj["bias"]
  np.testing.assert_allclose(tokens[:, 0], np.broadcast_to(params["cls_token"][0, 0] + pos[0],
                                                           (4, 32)), atol=1e-6)
  np.testing.assert_allclose(tokens[:, 1:], patches + pos[1:], atol=1e-6)


def _permute_patches(images, p, perm):
  """Moves patch perm[n] to grid slot n (row-major)."""
  w = images.shape[2]
  g = w // p
  out = np.empty_like(images)
  for n, m in enumerate(perm):
    (i, j), (k, l) = divmod(n, g), divmod(m, g)
    out[:, i * p:(i + 1) * p, j * p:(j + 1) * p] = images[:, k * p:(k + 1) * p, l * p:(l + 1) * p]
  return out


def test_positions_are_the_only_source_of_patch_order(rng):
  cfg = _tiny()
  images = _images(rng)
  model = vit_lib.ViT(cfg)
  params = jax.tree_util.tree_map(np.asarray, _init(model, images))
  params["position_embedding"]["embedding"] = (
      rng.normal(size=(cfg.num_tokens, 32)).astype(np.float32))
  shuffled = _permute_patches(images, 2, rng.permutation(cfg.num_patches))
  encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=vit_lib.ViT.encode)[:, 0])
  cls_out = lambda p, x: np.asarray(encode(p, x))
  assert np.abs(cls_out(params, images) - cls_out(params, shuffled)).max() > 1e-2
  no_pos = dict(params, position_embedding={"embedding": np.zeros_like(
      params["position_embedding"]["embedding"])})
  np.testing.assert_allclose(cls_out(no_pos, images), cls_out(no_pos, shuffled), atol=1e-5)


def test_overfits_a_tiny_batch(rng):
  cfg = _tiny(patch_size=4, num_encoder_layers=1)
  images = _images(rng, n=8)
  labels = np.arange(8) % 5
  model = vit_lib.ViT(cfg)
  params = _init(model, images)
  tx = optax.adam(3e-3)

  def loss_fn(p):
    logits = model.apply({"params": p}, images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  @jax.jit
  def step(p, s):
    loss, g = jax.value_and_grad(loss_fn)(p)   # loss before this update
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  state = jax.jit(tx.init)(params)
  losses = []
  for _ in range(31):                           # the 31st loss is after 30 updates
    params, state, loss = step(params, state)
    losses.append(float(loss))
  first, last = losses[0], losses[-1]
  assert first == pytest.approx(np.log(5), rel=1e-3)  # zero-initialised head
  assert last < 0.1 * first, (first, last)


def test_config_errors_name_the_value():
  with pytest.raises(ValueError, match=r"patch_size=3 must divide image_size=\(8, 8\)"):
    vit_lib.ViTConfig.from_dict({"patch_size": 3})
  with pytest.raises(ValueError, match=r"encoder.max_len=10 < 1 \+ num_patches = 17"):
    vit_lib.ViTConfig.from_dict({"patch_size": 2, "encoder": {"max_len": 10}})
  cfg = _tiny()
  with pytest.raises(ValueError, match=r"expected images \[batch, 8, 8, 3\].*got \(2, 8, 8, 1\)"):
    jax.eval_shape(vit_lib.ViT(cfg).init, jax.random.key(0), jnp.zeros((2, 8, 8, 1)))


def test_digits_split_deterministic_disjoint_stratified():
  pytest.importorskip("sklearn")
  vit_task = pytest.importorskip("flaxformer_mini.tasks.vit_digits")
  a, b = vit_task.digits_split(0.2, seed=0), vit_task.digits_split(0.2, seed=0)
  for key in ("train_index", "test_index", "train_images", "test_labels"):
    np.testing.assert_array_equal(a[key], b[key])
  train, test = a["train_index"], a["test_index"]
  assert len(np.intersect1d(train, test)) == 0
  assert len(train) + len(test) == 1797 and len(test) == 360
  np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(1797))
  counts = np.bincount(a["test_labels"], minlength=10)
  assert counts.min() >= 35 and counts.max() <= 37           # ~20% of each class
  assert abs(a["train_images"].mean()) < 1e-4 and abs(a["train_images"].std() - 1) < 1e-3
  other = vit_task.digits_split(0.2, seed=1)["test_index"]
  assert not np.array_equal(other, test)


def test_digits_batches_resume_exactly():
  pytest.importorskip("sklearn")
  vit_task = pytest.importorskip("flaxformer_mini.tasks.vit_digits")
  s = vit_task.digits_split()
  make = lambda: iter(vit_task.train_dataset(s["train_images"], s["train_labels"],
                                             batch_size=16, seed=3, shift=1, fill=-1.0))
  it = make()
  for _ in range(95):  # past the first epoch (89 batches)
    next(it)
  state = it.get_state()
  want = [next(it) for _ in range(3)]
  resumed = make()
  resumed.set_state(state)
  for w in want:
    got = next(resumed)
    np.testing.assert_array_equal(got["image"], w["image"])
    np.testing.assert_array_equal(got["label"], w["label"])
  batches = vit_task.eval_batches(s["test_images"], s["test_labels"], 128)
  assert [b["weight"].sum() for b in batches] == [128, 128, 104]
