"""A convolution whose gradients are layout-canonical forward convolutions ("tapgrad").

Why: on XLA:CPU (jax 0.10), the weight-gradient convolution that autodiff emits
for `lax.conv_general_dilated` runs one to two orders of magnitude slower inside a
loop body (`lax.scan`/`while`) than at top level, and so does the input-gradient
(transposed) convolution, while a plain NHWC x HWIO forward convolution is equally
fast in both places (the LEAF FEMNIST conv2 at batch 32: docs/results/engine.md,
"LEAF FEMNIST CNN"). Local
training is a `lax.scan` over steps, so every in-graph client loop hit this.
This conv computes both gradients as explicit forward convolutions with
canonical layouts (transposes done by hand, which are cheap): values are
identical to autodiff's, and the weight gradient is fast in a loop too
(docs/results/engine.md, "Figures moved out of the library's docstrings").
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

_DIMS = ("NHWC", "HWIO", "NHWC")


def _conv(x, kernel, stride, pads):
  return lax.conv_general_dilated(x, kernel, window_strides=stride, padding=pads,
                                  dimension_numbers=_DIMS)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_tapgrad(x_BxHxWxC: jax.Array, kernel: jax.Array, stride: tuple[int, int],
                 pads: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
  """NHWC x HWIO convolution, explicit padding pairs; same values as lax.conv.

  Args:
    x_BxHxWxC: [B, H, W, ci].
    kernel: [kh, kw, ci, co].
    stride: (sh, sw), static.
    pads: ((top, bottom), (left, right)), static.

  Returns:
    [B, Ho, Wo, co].
  """
  return _conv(x_BxHxWxC, kernel, stride, pads)


def _fwd(x, kernel, stride, pads):
  return _conv(x, kernel, stride, pads), (x, kernel)


def _input_grad(dy, kernel, x_shape, stride, pads):
  """dL/dx as a *forward* convolution (HWIO kernel) of the stride-dilated dy.

  Autodiff's transposed convolution (kernel with swapped I/O dims) also drops
  off XLA:CPU's fast path inside loops; flipping and transposing the kernel
  explicitly keeps it a plain NHWC x HWIO convolution.
  """
  kh, kw = kernel.shape[:2]
  kernel_t = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)  # [kh, kw, co, ci]
  padding = []
  for size, k, s, (lo, hi) in zip(x_shape[1:3], (kh, kw), stride, pads):
    extra = (size + lo + hi - k) % s  # input rows the strided forward never reached
    padding.append((k - 1 - lo, k - 1 - hi + extra))
  return lax.conv_general_dilated(dy, kernel_t, window_strides=(1, 1), padding=padding,
                                  lhs_dilation=stride, dimension_numbers=_DIMS)


def _kernel_grad(x, dy, kernel_shape, stride, pads):
  """dL/dW as a canonical forward convolution over the batch axis.

  dW[i, j, c, o] = sum_{b, h, w} x_pad[b, h*s + i, w*s + j, c] dy[b, h, w, o]: a
  stride-1 convolution of x (padded by `pads`) viewed as [ci, H, W, B] (batch <-> channels)
  with dy viewed as an HWIO kernel [Ho, Wo, B, co], dilated by the stride.
  Only layout-canonical (NHWC x HWIO) convolutions stay fast in XLA:CPU loops.
  """
  kh, kw = kernel_shape[:2]
  lhs = x.transpose(3, 1, 2, 0)    # [ci, H, W, B]
  rhs = dy.transpose(1, 2, 0, 3)   # [Ho, Wo, B, co]
  # The spatial padding goes into the convolution, not a jnp.pad: XLA:CPU's
  # convolution kernel pads on the fly, and an explicit padded copy made this
  # gradient slower (docs/results/engine.md, "Earlier on 2026-11-23: the in-graph
  # round beats a loop of jitted steps on CPU", item 2).
  out = lax.conv_general_dilated(lhs, rhs, window_strides=(1, 1), padding=pads,
                                 rhs_dilation=stride, dimension_numbers=_DIMS)
  return out[:, :kh, :kw, :].transpose(1, 2, 0, 3)  # [kh, kw, ci, co]


def _bwd(stride, pads, residuals, dy):
  x, kernel = residuals
  kh, kw, ci, co = kernel.shape
  dx = _input_grad(dy, kernel, x.shape, stride, pads)
  dkernel = _kernel_grad(x, dy, kernel.shape, stride, pads).astype(kernel.dtype)
  return dx, dkernel


conv_tapgrad.defvjp(_fwd, _bwd)
