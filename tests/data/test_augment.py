"""Augmentations: shapes/dtypes, exact semantics, keys, jit and vmap."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_prune import data


def _images(b=8, h=12, w=10, c=3, dtype=jnp.float32):
  x = jnp.arange(b * h * w * c, dtype=jnp.float32).reshape(b, h, w, c) % 251 + 1
  return x.astype(dtype)


KEYED = {
    "random_crop": functools.partial(data.random_crop, padding=2),
    "random_flip": data.random_flip,
    "cutout": functools.partial(data.cutout, size=4),
}


@pytest.mark.parametrize("name", sorted(KEYED))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.uint8])
def test_shape_dtype_jit_and_keys(name, dtype, key):
  fn = jax.jit(KEYED[name])
  x = _images(b=16, dtype=dtype)
  out = fn(x, key)
  assert out.shape == x.shape and out.dtype == x.dtype
  np.testing.assert_array_equal(out, fn(x, key))
  assert not np.array_equal(out, fn(x, jax.random.key(1)))
  np.testing.assert_array_equal(out, KEYED[name](x, key))  # jit == eager


@pytest.mark.parametrize("name", sorted(KEYED))
def test_vmap_over_clients(name, key):
  x_CxBxHxWxC = jnp.stack([_images(b=4), _images(b=4) + 1.0, _images(b=4) + 2.0])
  keys = jax.random.split(key, 3)
  out = jax.jit(jax.vmap(KEYED[name]))(x_CxBxHxWxC, keys)
  one = jax.jit(KEYED[name])
  for i in range(3):
    np.testing.assert_allclose(out[i], one(x_CxBxHxWxC[i], keys[i]))


def test_flip_is_exact_mirror_where_applied(key):
  x = _images(b=64)
  out, x = np.asarray(jax.jit(data.random_flip)(x, key)), np.asarray(x)
  flipped = np.array([np.array_equal(o, xi[:, ::-1]) for o, xi in zip(out, x)])
  kept = np.array([np.array_equal(o, xi) for o, xi in zip(out, x)])
  assert (flipped ^ kept).all()  # each example is exactly one of the two
  assert 10 < flipped.sum() < 54


def test_crop_padding_zero_is_identity(key):
  x = _images()
  np.testing.assert_array_equal(data.random_crop(x, key, padding=0), x)


def test_crop_is_a_shifted_window(key):
  x = _images(b=32)
  p = 3
  out = np.asarray(jax.jit(data.random_crop, static_argnums=2)(x, key, p))
  padded = np.pad(np.asarray(x), ((0, 0), (p, p), (p, p), (0, 0)))
  shifts = set()
  for o, xp in zip(out, padded):
    hits = [(i, j) for i in range(2 * p + 1) for j in range(2 * p + 1)
            if np.array_equal(o, xp[i:i + x.shape[1], j:j + x.shape[2]])]
    assert hits, "output is not a window of the zero-padded image"
    shifts.add(hits[0])
  assert len(shifts) > 5  # offsets vary per example


def test_cutout_zeroes_one_clipped_square(key):
  size = 5
  x = jnp.ones((200, 12, 10, 2))
  out = np.asarray(jax.jit(data.cutout, static_argnums=2)(x, key, size))
  interior = 0
  for o in out:
    zero = o[..., 0] == 0
    np.testing.assert_array_equal(zero, o[..., 1] == 0)  # all channels
    rows, cols = np.flatnonzero(zero.any(1)), np.flatnonzero(zero.any(0))
    assert rows.size and cols.size
    # A contiguous rectangle...
    assert zero.sum() == rows.size * cols.size
    assert rows.size == rows[-1] - rows[0] + 1 and cols.size == cols[-1] - cols[0] + 1
    # ... of size x size, clipped only where it touches a border.
    assert rows.size <= size and cols.size <= size
    if rows.size < size:
      assert rows[0] == 0 or rows[-1] == 11
    if cols.size < size:
      assert cols[0] == 0 or cols[-1] == 9
    interior += rows.size == size and cols.size == size
  assert interior > 50


def test_normalize():
  x = jnp.full((2, 3, 3, 3), 51, jnp.uint8)  # 0.2 after /255
  out = data.normalize(x, (0.1, 0.2, 0.3), (0.5, 1.0, 2.0))
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out[0, 0, 0], [0.2, 0.0, -0.05], atol=1e-6)
  np.testing.assert_allclose(data.normalize(jnp.ones((1, 2, 2, 1)), 0.5, 0.25), 2.0)
  with pytest.raises(ValueError, match="std"):
    data.normalize(x, 0.0, 0.0)
  with pytest.raises(ValueError, match="mean"):
    data.normalize(x, (0.1, 0.2), 1.0)


def _opencv_inter_linear(img, out):
  """NumPy transcription of cv2.resize(INTER_LINEAR) in float (half-pixel, clamped)."""
  def axis(n_in):
    src = (np.arange(out) + 0.5) * n_in / out - 0.5
    i0 = np.floor(src).astype(int)
    f = src - i0
    f = np.where(i0 < 0, 0.0, f)
    i0 = np.clip(i0, 0, n_in - 1)
    f = np.where(i0 >= n_in - 1, 0.0, f)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, f
  r0, r1, fr = axis(img.shape[0])
  c0, c1, fc = axis(img.shape[1])
  rows = img[r0] * (1 - fr)[:, None, None] + img[r1] * fr[:, None, None]
  return rows[:, c0] * (1 - fc)[None, :, None] + rows[:, c1] * fc[None, :, None]


def test_center_crop_resize_matches_opencv_convention():
  rng = np.random.default_rng(0)
  x = rng.uniform(0, 1, (3, 28, 28, 1)).astype(np.float32)
  out = np.asarray(data.center_crop_resize(x, (5, 20), 28))
  assert out.shape == (3, 28, 28, 1) and out.dtype == np.float32
  for o, xi in zip(out, x):
    np.testing.assert_allclose(o, _opencv_inter_linear(xi[5:20, 5:20], 28), atol=1e-5)
  # uint8 in, uint8 out, within one grey level of the float result.
  xu = (x * 255).round().astype(np.uint8)
  outu = np.asarray(data.center_crop_resize(xu))
  assert outu.dtype == np.uint8
  ref = _opencv_inter_linear(xu[0, 5:20, 5:20].astype(np.float32), 28)
  assert np.abs(outu[0].astype(np.float32) - ref).max() <= 1.0
  with pytest.raises(ValueError, match="crop"):
    data.center_crop_resize(x, (20, 5))


def test_compose_and_augmentations(key):
  x = _images(b=4, h=32, w=32, dtype=jnp.uint8)
  aug = data.cifar_augmentation(cutout_size=8)
  out = jax.jit(aug.train_transform)(x, key)
  assert out.shape == x.shape and out.dtype == jnp.float32
  np.testing.assert_array_equal(out, jax.jit(aug.train_transform)(x, key))
  np.testing.assert_allclose(aug.eval_transform(x),
                             data.normalize(x, data.CIFAR10_MEAN, data.CIFAR10_STD))
  # Compose gives each step its own subkey; the identity pipelines are no-ops.
  chain = data.compose(data.random_flip, data.ignore_key(lambda x: x * 2.0))
  xf = _images()
  k1, _ = jax.random.split(key)
  np.testing.assert_allclose(chain(xf, key), data.random_flip(xf, k1) * 2.0)
  np.testing.assert_array_equal(data.compose()(xf, key), xf)
  ident = data.identity_augmentation()
  np.testing.assert_array_equal(ident.train_transform(xf, key), ident.eval_transform(xf))
  fem = data.femnist_asp_augmentation()
  xm = _images(b=2, h=28, w=28, c=1)
  np.testing.assert_array_equal(fem.train_transform(xm, key), fem.eval_transform(xm))
  assert fem.eval_transform(xm).shape == (2, 28, 28, 1)
