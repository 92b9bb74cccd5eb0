"""Inception-style CNN of the automatic-structured-pruning paper (arXiv 2411.01759).

stem conv3x3(c0, stride 2, VALID) -> ReLU -> naive inception modules (parallel
conv1x1 / conv3x3 / conv5x5, stride 1, SAME, ReLU each, channel concat in that
order) -> reduction convs 3x3 (stride 2, VALID, ReLU) -> global average pool ->
hidden denses (ReLU) -> logits. Every conv has a bias, there is no BatchNorm.

Parameter names (kernels HWIO / [in, out]):
    stem:          {kernel [3, 3, C, c0], bias [c0]}
    inception{m}:  {conv1x1: {kernel [1, 1, ci, a]}, conv3x3: {kernel [3, 3, ci, b]},
                    conv5x5: {kernel [5, 5, ci, c]}}  (each also with a bias)
    conv_{i}:      {kernel [3, 3, ci, co], bias [co]}     the reduction convs
    dense_{j}:     {kernel [in, out], bias [out]}         j = 0 .. len(hidden); last = logits
The concatenated output of module m has a + b + c channels, in branch order.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
from flax import nnx

from fedjax_prune.models import _layers
from fedjax_prune.models import _specs

BRANCH_KERNELS = (1, 3, 5)
BRANCH_NAMES = tuple(f'conv{k}x{k}' for k in BRANCH_KERNELS)


@dataclasses.dataclass(frozen=True, kw_only=True)
class InceptionSpec:
  """Inception-style CNN (module docstring).

  Attributes:
    input_shape: (H, W, C) of one example.
    num_classes: number of output logits.
    stem_width: filters of the stem conv (c0).
    modules: per inception module, the (1x1, 3x3, 5x5) branch widths.
    reduce_widths: widths of the stride-2 reduction convs after the modules.
    hidden: widths of the dense layers between the pooled features and the logits.
  """
  input_shape: tuple[int, int, int]
  num_classes: int
  stem_width: int
  modules: tuple[tuple[int, int, int], ...]
  reduce_widths: tuple[int, ...]
  hidden: tuple[int, ...] = (50,)

  def __post_init__(self):
    shape = _specs._int_tuple(self.input_shape, 'InceptionSpec.input_shape')
    if len(shape) != 3:
      raise ValueError(f'InceptionSpec.input_shape must be (H, W, C), got {self.input_shape!r}')
    object.__setattr__(self, 'input_shape', shape)
    _specs._positive_int(self.num_classes, 'InceptionSpec.num_classes')
    _specs._positive_int(self.stem_width, 'InceptionSpec.stem_width')
    try:
      mods = tuple(tuple(m) for m in self.modules)
    except TypeError:
      raise ValueError('InceptionSpec.modules must be a tuple of (1x1, 3x3, 5x5) width triples'
                       ) from None
    for m, widths in enumerate(mods):
      if len(widths) != len(BRANCH_KERNELS):
        raise ValueError(f'InceptionSpec.modules[{m}] must have 3 branch widths, got {widths!r}')
      _specs._int_tuple(widths, f'InceptionSpec.modules[{m}]')
    object.__setattr__(self, 'modules', mods)
    object.__setattr__(self, 'reduce_widths',
                       _specs._int_tuple(self.reduce_widths, 'InceptionSpec.reduce_widths'))
    object.__setattr__(self, 'hidden', _specs._int_tuple(self.hidden, 'InceptionSpec.hidden'))
    for field, hw in self._trace_hw():
      _specs._check_hw(hw, field, 'the conv')

  def _trace_hw(self):
    hw = _specs.conv_output_hw(self.input_shape[:2], (3, 3), (2, 2), 'VALID')
    rows = [('InceptionSpec.stem_width', hw)]
    for i in range(len(self.reduce_widths)):
      hw = _specs.conv_output_hw(hw, (3, 3), (2, 2), 'VALID')
      rows.append((f'InceptionSpec.reduce_widths[{i}]', hw))
    return rows

  def stem_hw(self) -> tuple[int, int]:
    """Spatial size after the stem (= inside the inception modules)."""
    return self._trace_hw()[0][1]

  def reduce_hw(self) -> tuple[tuple[int, int], ...]:
    """Spatial size after each reduction conv."""
    return tuple(hw for _, hw in self._trace_hw()[1:])

  def head_features(self) -> int:
    """Width of the pooled vector entering the first dense layer."""
    if self.reduce_widths:
      return self.reduce_widths[-1]
    return sum(self.modules[-1]) if self.modules else self.stem_width


def asp_inception(widths: tuple[int, ...] = (32, 16, 16, 16, 32, 32, 32, 96, 96),
                  num_classes: int = 62, input_shape: tuple[int, int, int] = (28, 28, 1),
                  dense_width: int = 50) -> InceptionSpec:
  """Inception-style model of the automatic-structured-pruning paper (arXiv 2411.01759).

  widths = [c0, a1, b1, c1, a2, b2, c2, d, e]. 246,236 parameters for FEMNIST
  (28x28x1, 62 classes), 243,752 for CelebA (84x84x3, 2 classes).
  """
  widths = _specs._int_tuple(widths, 'asp_inception widths')
  if len(widths) < 6 or (len(widths) - 3) % 3:
    raise ValueError('asp_inception widths must be [c0, (a, b, c) per module..., d, e], got '
                     f'{widths}')
  c0, rest = widths[0], widths[1:]
  modules = tuple(tuple(rest[i:i + 3]) for i in range(0, len(rest) - 2, 3))
  return InceptionSpec(input_shape=input_shape, num_classes=num_classes, stem_width=c0,
                       modules=modules, reduce_widths=tuple(rest[-2:]), hidden=(dense_width,))


class _InceptionModule(nnx.Module):
  """Parallel conv1x1 / conv3x3 / conv5x5 (SAME, ReLU), concatenated along channels."""

  def __init__(self, in_features: int, widths: tuple[int, int, int], conv_impl: str,
               kernel_init_fn, *, rngs: nnx.Rngs):
    for name, k, width in zip(BRANCH_NAMES, BRANCH_KERNELS, widths):
      setattr(self, name, _layers.Conv(in_features, width, (k, k), (1, 1), 'SAME', True,
                                       conv_impl, kernel_init_fn, rngs=rngs))

  def __call__(self, x):
    return jax.numpy.concatenate(
        [jax.nn.relu(getattr(self, name)(x)) for name in BRANCH_NAMES], axis=-1)


class Inception(nnx.Module):
  """stem, inception{m}, conv_{i}, dense_{j} (module docstring)."""

  def __init__(self, spec: InceptionSpec, conv_impl: str, kernel_init_fn, *, rngs: nnx.Rngs):
    self.stem = _layers.Conv(spec.input_shape[-1], spec.stem_width, (3, 3), (2, 2), 'VALID', True,
                             conv_impl, kernel_init_fn, rngs=rngs)
    width = spec.stem_width
    self.num_modules = len(spec.modules)
    for m, widths in enumerate(spec.modules):
      setattr(self, f'inception{m}', _InceptionModule(width, widths, conv_impl, kernel_init_fn,
                                                      rngs=rngs))
      width = sum(widths)
    self.num_reduce = len(spec.reduce_widths)
    for i, out in enumerate(spec.reduce_widths):
      setattr(self, f'conv_{i}', _layers.Conv(width, out, (3, 3), (2, 2), 'VALID', True, conv_impl,
                                              kernel_init_fn, rngs=rngs))
      width = out
    self.num_dense = len(spec.hidden) + 1
    for j, out in enumerate(spec.hidden + (spec.num_classes,)):
      setattr(self, f'dense_{j}', _layers.Dense(width, out, kernel_init_fn, rngs=rngs))
      width = out

  def __call__(self, x, *, train: bool, example_mask: Optional[jax.Array]):
    del train, example_mask  # no BatchNorm
    h = jax.nn.relu(self.stem(x))
    for m in range(self.num_modules):
      h = getattr(self, f'inception{m}')(h)
    for i in range(self.num_reduce):
      h = jax.nn.relu(getattr(self, f'conv_{i}')(h))
    h = _layers.global_avg_pool(h)
    for j in range(self.num_dense):
      h = getattr(self, f'dense_{j}')(h)
      if j < self.num_dense - 1:
        h = jax.nn.relu(h)
    return h
