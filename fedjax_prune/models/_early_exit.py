"""ResNet with early-exit classifiers (ScaleFL's depth-scaled submodels).

The body is exactly the `ResNetSpec` model (same parameter names: stem,
stage{s}_block{b}, head); each stage s in `exit_stages` adds a classifier
`exit{s}`: global average pool of the stage's output -> Dense(width_s ->
classes, bias). `apply_fn` returns the logits of every exit, ordered
exit{s} for s in exit_stages, then the final head: [B, X, num_classes].

A depth-d submodel (the first d stages) predicts with exit d (the head when d
is the last stage); the layers after it receive no gradient.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from fedjax_prune.models import _build
from fedjax_prune.models import _layers
from fedjax_prune.models import _specs
from fedjax_prune.types import BatchStats, Params, PRNGKey


def _check(spec: _specs.ResNetSpec, exit_stages: Sequence[int]) -> tuple[int, ...]:
  if not isinstance(spec, _specs.ResNetSpec):
    raise ValueError(f'early exits need a ResNetSpec, got {type(spec).__name__}')
  if spec.head != 'gap':
    raise ValueError(f"early exits need ResNetSpec.head='gap', got {spec.head!r}")
  stages = tuple(int(s) for s in exit_stages)
  num_stages = len(spec.stage_widths)
  if list(stages) != sorted(set(stages)) or any(not 1 <= s < num_stages for s in stages):
    raise ValueError(f'exit_stages must be increasing stage numbers in [1, {num_stages - 1}] '
                     f'(the last stage exits through the head), got {exit_stages!r}')
  return stages


class _ResNetExits(nnx.Module):
  """stem, stage{s}_block{b}, head (as `_ResNet`) plus exit{s} classifiers."""

  def __init__(self, spec: _specs.ResNetSpec, exit_stages: tuple[int, ...], conv_impl: str,
               kernel_init_fn, *, rngs: nnx.Rngs):
    self.stem = _build._Stem(spec, conv_impl, kernel_init_fn, rngs=rngs)
    rows = spec.blocks()
    self.block_names = tuple(row[0] for row in rows)
    for name, in_width, inner_width, out_width, stride in rows:
      setattr(self, name, _build._BasicBlock(spec, in_width, inner_width, out_width, stride,
                                             conv_impl, kernel_init_fn, rngs=rngs))
    # The last block of each stage with an exit.
    last = {}
    for name in self.block_names:
      last[int(name.split('_')[0][len('stage'):])] = name
    self.exit_after = tuple((last[s], f'exit{s}') for s in exit_stages)
    for s in exit_stages:
      setattr(self, f'exit{s}', _layers.Dense(spec.stage_widths[s - 1], spec.num_classes,
                                              kernel_init_fn, rngs=rngs))
    self.head = _layers.Dense(spec.stage_widths[-1], spec.num_classes, kernel_init_fn, rngs=rngs)

  def __call__(self, x, *, train, example_mask):
    exits = dict(self.exit_after)
    h = self.stem(x, train=train, example_mask=example_mask)
    outs = []
    for name in self.block_names:
      h = getattr(self, name)(h, train=train, example_mask=example_mask)
      if name in exits:
        outs.append(getattr(self, exits[name])(_layers.global_avg_pool(h)))
    outs.append(self.head(_layers.global_avg_pool(h)))
    return jnp.stack(outs, axis=1)


def init_early_exit_params(spec: _specs.ResNetSpec, exit_stages: Sequence[int], key: PRNGKey
                           ) -> tuple[Params, BatchStats]:
  """Initial (params, batch_stats): the ResNet's own init plus exit{s} heads.

  The body uses `models.init_params(spec, key)` (so it equals the plain ResNet
  of the same key); exit kernels are U(+-1/sqrt(fan_in)) from fold_in(key, s),
  biases 0 (PyTorch's Linear default).
  """
  stages = _check(spec, exit_stages)
  params, batch_stats = _build.init_params(spec, key)
  params = dict(params)
  for s in stages:
    fan_in = spec.stage_widths[s - 1]
    bound = 1.0 / jnp.sqrt(jnp.float32(fan_in))
    kernel = jax.random.uniform(jax.random.fold_in(key, 1000 + s), (fan_in, spec.num_classes),
                                jnp.float32, -bound, bound)
    params[f'exit{s}'] = {'kernel': kernel, 'bias': jnp.zeros((spec.num_classes,), jnp.float32)}
  return params, batch_stats


def make_early_exit_apply(spec: _specs.ResNetSpec, exit_stages: Sequence[int], *,
                          conv_impl: str = 'auto', compute_dtype: Any = None) -> Callable:
  """`apply_fn(params, batch_stats, x, *, train, example_mask=None) -> (logits [B, X, K], stats)`.

  X = len(exit_stages) + 1 (the exits in stage order, then the head). Same
  conventions as `models.make_apply` otherwise (`compute_dtype` included).
  """
  stages = _check(spec, exit_stages)
  conv_impl = _layers.resolve_conv_impl(conv_impl)
  abstract = nnx.eval_shape(lambda: _ResNetExits(spec, stages, conv_impl,
                                                 _layers.default_kernel_init(),
                                                 rngs=nnx.Rngs(params=jax.random.key(0))))
  graphdef, abstract_params, abstract_stats = nnx.split(abstract, nnx.Param, nnx.BatchStat)
  input_shape = tuple(spec.input_shape)
  input_dtype, to_compute = _build.mixed_precision(compute_dtype)

  def apply_fn(params: Params, batch_stats: BatchStats, x: jax.Array, *, train: bool,
               example_mask: Optional[jax.Array] = None):
    model = nnx.merge(graphdef, _build._to_state(abstract_params, to_compute(params), 'params'),
                      _build._to_state(abstract_stats, batch_stats, 'batch_stats'))
    x = jnp.asarray(x).astype(input_dtype)
    x = x.reshape((x.shape[0],) + input_shape)
    logits = model(x, train=bool(train), example_mask=example_mask)
    return logits.astype(jnp.float32), nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))

  return apply_fn


def build_early_exit(spec: _specs.ResNetSpec, exit_stages: Sequence[int], key: PRNGKey, *,
                     conv_impl: str = 'auto') -> tuple[Callable, Params, BatchStats]:
  """(apply_fn, params, batch_stats) of the early-exit ResNet.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from fedjax_prune import models
    >>> spec = models.resnet18(width_multiplier=1 / 16, norm='batch_static', input_shape=(8, 8, 3))
    >>> apply_fn, params, _ = models.build_early_exit(spec, (1, 2, 3), jax.random.key(0))
    >>> apply_fn(params, {}, jnp.zeros((2, 8, 8, 3)), train=False)[0].shape
    (2, 4, 10)
  """
  params, batch_stats = init_early_exit_params(spec, exit_stages, key)
  return make_early_exit_apply(spec, exit_stages, conv_impl=conv_impl), params, batch_stats
