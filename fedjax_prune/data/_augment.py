"""Batch augmentation and preprocessing in pure jnp (run inside the jitted round).

Every random transform has the signature `fn(x_BxHxWxC, key) -> x_BxHxWxC`: it
draws independent randomness per example from one explicit key, keeps shape and
dtype, and is vmap-friendly (the engine may vmap it over the client axis with
one key per client). Deterministic transforms take `x` only; `ignore_key`
lifts them to the keyed signature so `compose` can chain everything.

`Augmentation(train_transform, eval_transform)` bundles a dataset's pipeline:
`train_transform(x, key) -> x`, `eval_transform(x) -> x`.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_prune.types import PRNGKey

# FIARSE / common CIFAR-10 statistics (FIARSE's official code).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)

KeyedTransform = Callable[[jax.Array, PRNGKey], jax.Array]
Transform = Callable[[jax.Array], jax.Array]


def _check_images(x):
  if x.ndim != 4:
    raise ValueError(f"expected a batch of images [B, H, W, C], got shape {x.shape}")


def random_crop(x_BxHxWxC: jax.Array, key: PRNGKey, padding: int = 4) -> jax.Array:
  """Zero-pads by `padding` on each side, then crops a random H x W window per example.

  Args:
    x_BxHxWxC: images, any dtype.
    key: PRNG key.
    padding: pixels of zero padding per side, a Python int >= 0 (0 = identity).

  Returns:
    [B, H, W, C] of the input dtype.
  """
  x = jnp.asarray(x_BxHxWxC)
  _check_images(x)
  if int(padding) != padding or padding < 0:
    raise ValueError(f"padding must be an integer >= 0, got {padding!r}")
  p = int(padding)
  b, h, w, c = x.shape
  xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
  ky, kx = jax.random.split(key)
  oy = jax.random.randint(ky, (b,), 0, 2 * p + 1)
  ox = jax.random.randint(kx, (b,), 0, 2 * p + 1)
  crop = lambda img, i, j: jax.lax.dynamic_slice(img, (i, j, 0), (h, w, c))  # noqa: E731
  return jax.vmap(crop)(xp, oy, ox)


def random_flip(x_BxHxWxC: jax.Array, key: PRNGKey) -> jax.Array:
  """Mirrors each example left-right with probability 1/2.

  Args:
    x_BxHxWxC: images.
    key: PRNG key.

  Returns:
    [B, H, W, C] of the input dtype.
  """
  x = jnp.asarray(x_BxHxWxC)
  _check_images(x)
  flip_B = jax.random.bernoulli(key, 0.5, (x.shape[0],))
  return jnp.where(flip_B[:, None, None, None], x[:, :, ::-1, :], x)


def cutout(x_BxHxWxC: jax.Array, key: PRNGKey, size: int) -> jax.Array:
  """Zeroes one size x size square per example (DeVries & Taylor, 2017).

  The square's centre is uniform over the image, so squares near a border are
  clipped (rows `cy - size // 2 .. cy - size // 2 + size - 1`, same for
  columns). As in the reference, apply it after `normalize` so 0 is the mean.

  Args:
    x_BxHxWxC: images.
    key: PRNG key.
    size: side of the square, a Python int >= 0.

  Returns:
    [B, H, W, C] of the input dtype.

  References:
    DeVries & Taylor, Improved Regularization of Convolutional Neural Networks
    with Cutout, arXiv 1708.04552.
  """
  x = jnp.asarray(x_BxHxWxC)
  _check_images(x)
  if int(size) != size or size < 0:
    raise ValueError(f"size must be an integer >= 0, got {size!r}")
  b, h, w, _ = x.shape
  ky, kx = jax.random.split(key)
  top_B = jax.random.randint(ky, (b,), 0, h) - size // 2
  left_B = jax.random.randint(kx, (b,), 0, w) - size // 2
  rows_BxH = (jnp.arange(h)[None, :] >= top_B[:, None]) & (jnp.arange(h)[None, :] < top_B[:, None] + size)
  cols_BxW = (jnp.arange(w)[None, :] >= left_B[:, None]) & (jnp.arange(w)[None, :] < left_B[:, None] + size)
  hole = rows_BxH[:, :, None, None] & cols_BxW[:, None, :, None]
  return jnp.where(hole, jnp.zeros((), x.dtype), x)


def normalize(x: jax.Array, mean, std) -> jax.Array:
  """(x - mean) / std per channel; integer images are first scaled to [0, 1].

  Args:
    x: [..., C] images; uint8 (or any integer dtype) is divided by 255 first
      (torchvision's ToTensor + Normalize).
    mean: scalar or [C].
    std: scalar or [C], > 0.

  Returns:
    float32 array of x's shape.
  """
  x = jnp.asarray(x)
  if jnp.issubdtype(x.dtype, jnp.integer):
    x = x.astype(jnp.float32) / 255.0
  else:
    x = x.astype(jnp.float32)
  mean = np.asarray(mean, np.float32).reshape(-1)
  std = np.asarray(std, np.float32).reshape(-1)
  if (std <= 0).any():
    raise ValueError(f"std must be > 0, got {std.tolist()}")
  for name, v in (("mean", mean), ("std", std)):
    if v.size not in (1, x.shape[-1]):
      raise ValueError(f"{name} must be a scalar or have one value per channel "
                       f"({x.shape[-1]}), got {v.size} values")
  bshape = (1,) * (x.ndim - 1) + (-1,)
  return (x - jnp.asarray(mean).reshape(bshape)) / jnp.asarray(std).reshape(bshape)


def center_crop_resize(x_BxHxWxC: jax.Array, crop: tuple[int, int] = (5, 20),
                       size: int = 28) -> jax.Array:
  """Crops rows and columns [crop[0], crop[1]) and resizes bilinearly to size x size.

  The ASP FEMNIST preprocessing (the ASP paper's code): rows/cols 5..19 (15 x 15) back
  to 28 x 28. Uses `jax.image.resize(..., 'bilinear', antialias=False)`, which
  samples at half-pixel centres (src = (dst + 0.5) * in / out - 0.5) and
  renormalises the weights of in-bounds taps at the borders; for upsampling
  that equals OpenCV's `cv2.resize(..., interpolation=INTER_LINEAR)` (also
  half-pixel, border replicated). The remaining difference is OpenCV's 11-bit
  fixed-point arithmetic for uint8 images (at most 1 grey level).

  Args:
    x_BxHxWxC: images.
    crop: (start, stop) row and column range, 0 <= start < stop <= min(H, W).
    size: output side.

  Returns:
    [B, size, size, C]; integer inputs are rounded and clipped back to their
    dtype, float inputs stay float.
  """
  x = jnp.asarray(x_BxHxWxC)
  _check_images(x)
  start, stop = (int(v) for v in crop)
  if not 0 <= start < stop <= min(x.shape[1:3]):
    raise ValueError(f"crop must satisfy 0 <= start < stop <= {min(x.shape[1:3])}, got {crop!r}")
  if int(size) != size or size < 1:
    raise ValueError(f"size must be a positive integer, got {size!r}")
  patch = x[:, start:stop, start:stop, :]
  out_shape = (x.shape[0], int(size), int(size), x.shape[3])
  if jnp.issubdtype(x.dtype, jnp.integer):
    info = jnp.iinfo(x.dtype)
    y = jax.image.resize(patch.astype(jnp.float32), out_shape, "bilinear", antialias=False)
    return jnp.clip(jnp.round(y), info.min, info.max).astype(x.dtype)
  return jax.image.resize(patch, out_shape, "bilinear", antialias=False)


def ignore_key(fn: Transform) -> KeyedTransform:
  """Lifts a deterministic `fn(x) -> x` to the keyed signature `(x, key) -> x`."""
  return lambda x, key: fn(x)


def compose(*fns: KeyedTransform) -> KeyedTransform:
  """Chains keyed transforms left to right, each with its own subkey of `key`.

  Args:
    *fns: `fn(x, key) -> x` (use `ignore_key` for deterministic ones and
      `functools.partial` for their options).

  Returns:
    `transform(x, key) -> x`.
  """
  fns = tuple(fns)

  def transform(x, key):
    if not fns:
      return x
    for fn, k in zip(fns, jax.random.split(key, len(fns))):
      x = fn(x, k)
    return x

  return transform


class Augmentation(NamedTuple):
  """A dataset's input pipeline, applied per batch inside jit.

  Attributes:
    train_transform: `(x_BxHxWxC, key) -> x` (random augmentation + preprocessing).
    eval_transform: `x_BxHxWxC -> x` (preprocessing only).
  """
  train_transform: KeyedTransform
  eval_transform: Transform


def identity_augmentation() -> Augmentation:
  """No augmentation, no preprocessing (the model normalises its own inputs)."""
  return Augmentation(lambda x, key: x, lambda x: x)


def cifar_augmentation(mean: Sequence[float] = CIFAR10_MEAN, std: Sequence[float] = CIFAR10_STD, *,
                       padding: int = 4, flip: bool = True,
                       cutout_size: int | None = None) -> Augmentation:
  """FIARSE's CIFAR pipeline: RandomCrop(pad 4) + HorizontalFlip + normalise (its code).

  Args:
    mean: per-channel mean of [0, 1] images.
    std: per-channel std.
    padding: random-crop padding (0 disables the crop).
    flip: random horizontal flips.
    cutout_size: optional cutout square after normalisation (None = off).

  Returns:
    Augmentation; eval normalises only. Outputs are float32.

  Example:
    >>> aug = cifar_augmentation()
    >>> x = jnp.zeros((2, 32, 32, 3), jnp.uint8)
    >>> aug.train_transform(x, jax.random.key(0)).shape
    (2, 32, 32, 3)
  """
  norm = lambda x: normalize(x, mean, std)  # noqa: E731
  steps = []
  if padding:
    steps.append(lambda x, key: random_crop(x, key, padding))
  if flip:
    steps.append(random_flip)
  steps.append(ignore_key(norm))
  if cutout_size:
    steps.append(lambda x, key: cutout(x, key, cutout_size))
  return Augmentation(compose(*steps), norm)


def femnist_asp_augmentation(crop: tuple[int, int] = (5, 20), size: int = 28) -> Augmentation:
  """ASP's FEMNIST preprocessing (its code): centre crop + bilinear resize, train and eval.

  No random augmentation; dtype is preserved (scale uint8 in the model).
  """
  fn = lambda x: center_crop_resize(x, crop, size)  # noqa: E731
  return Augmentation(ignore_key(fn), fn)
