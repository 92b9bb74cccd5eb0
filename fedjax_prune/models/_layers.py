"""Layers: NNX modules for conv/dense/BatchNorm plus pure conv and pooling functions.

Everything here is written for one unbatched-over-clients call; the engine
vmaps it. No implicit rank promotion: every broadcast is explicit.

Conv implementations (`conv_impl`):
  * `'lax'`: `lax.conv_general_dilated` with NHWC/HWIO layouts.
  * `'im2col'`: explicit padding, then the `kh * kw` shifted (strided) slices
    of the input concatenated along channels in (i, j, c) order -- the order of
    `kernel.reshape(kh * kw * ci, co)` -- and one matmul. Under `jax.vmap`
    over per-client kernels this is a batched GEMM instead of a grouped
    convolution (faster on CPU: docs/results/engine.md, "Figures moved out of the
    library's docstrings"; measure on other backends).
  * `'tapgrad'`: `lax.conv_general_dilated` forward with a custom VJP whose
    input and weight gradients are layout-canonical forward convolutions
    (`_conv_grad`); same values, fast inside XLA:CPU loop bodies.
  * `'auto'` (the default of `models.build`/`make_apply`): `'tapgrad'` when JAX's
    default backend is the CPU, `'lax'` elsewhere (`resolve_conv_impl`). Inside
    the compiled round's step loop XLA:CPU lowers `'lax'` convolution gradients
    to slow naive loops, an order of magnitude slower for a one-client LEAF CNN
    round (docs/results/engine.md, "Earlier: status at 2026-11-23, 04:00 UTC", item 2).

Initialisation lives in `_build.init_params` (PyTorch-default kernels
U(+-1/sqrt(fan_in)), zero biases, BN scale 1 / bias 0, running mean 0 / var 1);
`default_kernel_init()` is the same kernel rule as a `jax.nn.initializers`
callable, used when the modules are built directly.
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from fedjax_prune.models import _specs
from fedjax_prune.models._conv_grad import conv_tapgrad

BN_MOMENTUM = 0.9   # Flax convention: running = 0.9 * running + 0.1 * batch (= torch momentum 0.1).
BN_EPSILON = 1e-5
CONV_IMPLS = ('lax', 'im2col', 'tapgrad')
CONV_IMPL_CHOICES = CONV_IMPLS + ('auto',)


def resolve_conv_impl(conv_impl: str, platform: Optional[str] = None) -> str:
  """The concrete conv implementation of `conv_impl` on `platform` (default: JAX's default
  backend): `'auto'` is `'tapgrad'` on CPU and `'lax'` elsewhere; the others are themselves."""
  if conv_impl == 'auto':
    platform = jax.default_backend() if platform is None else platform
    return 'tapgrad' if platform == 'cpu' else 'lax'
  if conv_impl not in CONV_IMPLS:
    raise ValueError(f'conv_impl must be one of {CONV_IMPL_CHOICES}, got {conv_impl!r}')
  return conv_impl

KernelInit = Callable[[jax.Array, tuple[int, ...], jnp.dtype], jax.Array]


def default_kernel_init() -> KernelInit:
  """PyTorch's default conv/linear weight init: U(+-1/sqrt(fan_in))."""
  return jax.nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


# ----------------------------------------------------------------------------
# Pure functions.


def conv2d(x_BxHxWxC: jax.Array, kernel: jax.Array, stride: tuple[int, int],
           padding: str, conv_impl: str) -> jax.Array:
  """2-D convolution, NHWC input, HWIO kernel, no bias.

  Args:
    x_BxHxWxC: [B, H, W, ci] input.
    kernel: [kh, kw, ci, co].
    stride: (sh, sw).
    padding: 'SAME', 'VALID' or 'SYMMETRIC' (see `_specs`).
    conv_impl: 'lax', 'im2col', 'tapgrad' or 'auto' (module docstring).

  Returns:
    [B, Ho, Wo, co].
  """
  conv_impl = resolve_conv_impl(conv_impl)
  kh, kw, ci, co = kernel.shape
  pads = _specs.padding_pairs(x_BxHxWxC.shape[1:3], (kh, kw), stride, padding)
  if conv_impl == 'lax':
    return lax.conv_general_dilated(x_BxHxWxC, kernel, window_strides=stride, padding=pads,
                                    dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  if conv_impl == 'tapgrad':
    return conv_tapgrad(x_BxHxWxC, kernel, tuple(stride), tuple(tuple(p) for p in pads))
  if conv_impl != 'im2col':
    raise ValueError(f'conv_impl must be one of {CONV_IMPLS}, got {conv_impl!r}')
  x = x_BxHxWxC
  if any(p for pair in pads for p in pair):
    x = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
  b, h, w, c = x.shape
  sh, sw = stride
  ho, wo = (h - kh) // sh + 1, (w - kw) // sw + 1
  cols = [lax.slice(x, (0, i, j, 0), (b, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, c),
                    (1, sh, sw, 1))
          for i in range(kh) for j in range(kw)]
  patches = cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)
  return jnp.einsum('bhwk,ko->bhwo', patches, kernel.reshape(kh * kw * ci, co))


def max_pool(x_BxHxWxC: jax.Array, window: int) -> jax.Array:
  """Non-overlapping max-pool (stride = window), VALID floor semantics.

  Implemented as crop + reshape + max rather than `lax.reduce_window`:
  XLA:CPU's select-and-scatter gradient of reduce_window is slow. Ties share
  the gradient equally (jnp.max's rule) where reduce_window picks one.

  Args:
    x_BxHxWxC: [B, H, W, C].
    window: pool window and stride.

  Returns:
    [B, H // window, W // window, C].
  """
  b, h, w, c = x_BxHxWxC.shape
  ho, wo = h // window, w // window
  x = x_BxHxWxC[:, :ho * window, :wo * window, :]
  return jnp.max(x.reshape(b, ho, window, wo, window, c), axis=(2, 4))


def global_avg_pool(x_BxHxWxC: jax.Array) -> jax.Array:
  """Mean over H and W: [B, H, W, C] -> [B, C]."""
  return jnp.mean(x_BxHxWxC, axis=(1, 2))


def _channel_view(vector_C: jax.Array, ndim: int) -> jax.Array:
  """Reshape [C] to [1, ..., 1, C] for an explicit broadcast against an ndim array."""
  return vector_C.reshape((1,) * (ndim - 1) + (vector_C.shape[0],))


def masked_moments(x: jax.Array, example_mask_B: Optional[jax.Array]
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per-channel mean and (biased) variance over all axes but the last.

  Args:
    x: [B, ..., C].
    example_mask_B: None or [B] bool; only True examples contribute.

  Returns:
    (mean [C], var [C], count []): count is the number of contributing
    positions (examples x spatial positions), float32.
  """
  axes = tuple(range(x.ndim - 1))
  positions_per_example = 1
  for size in x.shape[1:-1]:
    positions_per_example *= size
  if example_mask_B is None:
    mean = jnp.mean(x, axis=axes)
    var = jnp.mean(jnp.square(x - _channel_view(mean, x.ndim)), axis=axes)
    count = jnp.asarray(x.shape[0] * positions_per_example, jnp.float32)
    return mean, var, count
  keep = example_mask_B.astype(bool).reshape((x.shape[0],) + (1,) * (x.ndim - 1))
  count = jnp.sum(example_mask_B.astype(jnp.float32)) * positions_per_example
  denominator = jnp.maximum(count, 1.0).astype(x.dtype)
  mean = jnp.sum(jnp.where(keep, x, 0), axis=axes) / denominator
  centred = jnp.where(keep, x - _channel_view(mean, x.ndim), 0)
  var = jnp.sum(jnp.square(centred), axis=axes) / denominator
  return mean, var, count


# ----------------------------------------------------------------------------
# NNX modules. Their in-place BatchStat updates are only ever applied to a
# module freshly merged inside the traced apply function (see `_build`).


class Conv(nnx.Module):
  """2-D conv (NHWC/HWIO) with optional bias. Params: kernel [kh, kw, ci, co], bias [co]."""

  def __init__(self, in_features: int, out_features: int, kernel: tuple[int, int],
               stride: tuple[int, int], padding: str, use_bias: bool, conv_impl: str,
               kernel_init_fn: KernelInit, *, rngs: nnx.Rngs):
    conv_impl = resolve_conv_impl(conv_impl)
    self.kernel = nnx.Param(kernel_init_fn(rngs.params(), (*kernel, in_features, out_features),
                                           jnp.float32))
    self.bias = nnx.Param(jnp.zeros((out_features,), jnp.float32)) if use_bias else None
    self.stride = tuple(stride)
    self.padding = padding
    self.conv_impl = conv_impl

  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    y = conv2d(x_BxHxWxC, self.kernel[...], self.stride, self.padding, self.conv_impl)
    if self.bias is not None:
      y = y + _channel_view(self.bias[...], y.ndim)
    return y


class Dense(nnx.Module):
  """Dense layer. Params: kernel [in, out], bias [out]."""

  def __init__(self, in_features: int, out_features: int, kernel_init_fn: KernelInit, *,
               rngs: nnx.Rngs):
    self.kernel = nnx.Param(kernel_init_fn(rngs.params(), (in_features, out_features),
                                           jnp.float32))
    self.bias = nnx.Param(jnp.zeros((out_features,), jnp.float32))

  def __call__(self, x_BxD: jax.Array, lowrank: Optional[tuple] = None) -> jax.Array:
    """x [B, in] -> [B, out]. With `lowrank = (left [R, in], right [R, out], probe [B, out])`
    the kernel is `kernel + left^T right` without forming it (x (kernel + left^T right) =
    x kernel + (x left^T) right), and `probe` is added to the output (pass zeros: the
    gradient with respect to it is the gradient with respect to the output)."""
    y = x_BxD @ self.kernel[...]
    if lowrank is not None:
      left_RxI, right_RxO, probe_BxO = lowrank
      y = y + (x_BxD @ left_RxI.T) @ right_RxO + probe_BxO
    return y + _channel_view(self.bias[...], 2)


class BatchNorm(nnx.Module):
  """BatchNorm over the last axis with example masking.

  Params: scale [C], bias [C]. Running statistics (mode 'batch_running' only):
  mean [C], var [C] as `nnx.BatchStat`.

  Batch statistics are computed over the examples selected by `example_mask`
  (all when None). The normalisation and the running update use the biased
  batch variance (Flax convention; torch updates its running var with the
  unbiased one). A batch with no real example leaves the running statistics
  unchanged.
  """

  def __init__(self, features: int, mode: str):
    if mode not in ('batch_running', 'batch_static'):
      raise ValueError(f"BatchNorm mode must be 'batch_running' or 'batch_static', got {mode!r}")
    self.scale = nnx.Param(jnp.ones((features,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((features,), jnp.float32))
    if mode == 'batch_running':
      self.mean = nnx.BatchStat(jnp.zeros((features,), jnp.float32))
      self.var = nnx.BatchStat(jnp.ones((features,), jnp.float32))
    self.mode = mode

  def __call__(self, x: jax.Array, *, train: bool,
               example_mask: Optional[jax.Array] = None) -> jax.Array:
    # Statistics and normalisation in float32 whatever the compute dtype (bf16 moments
    # lose the variance of large activations); the output keeps the input's dtype.
    compute_dtype = x.dtype
    x = x.astype(jnp.float32)
    if self.mode == 'batch_static' or train:
      mean, var, count = masked_moments(x, example_mask)
      if self.mode == 'batch_running':
        new_mean = BN_MOMENTUM * self.mean[...] + (1.0 - BN_MOMENTUM) * mean
        new_var = BN_MOMENTUM * self.var[...] + (1.0 - BN_MOMENTUM) * var
        if example_mask is not None:
          new_mean = jnp.where(count > 0, new_mean, self.mean[...])
          new_var = jnp.where(count > 0, new_var, self.var[...])
        self.mean[...] = new_mean
        self.var[...] = new_var
    else:
      mean, var = self.mean[...], self.var[...]
    inv = lax.rsqrt(var + BN_EPSILON) * self.scale[...].astype(jnp.float32)
    y = (x - _channel_view(mean, x.ndim)) * _channel_view(inv, x.ndim) + _channel_view(
        self.bias[...].astype(jnp.float32), x.ndim)
    return y.astype(compute_dtype)
