"""Dead-channel diagnostic: which conv output channels still take part in training.

A channel whose ReLU never fires on any example (at any position) gets no gradient,
so its filter's L1 norm freezes and an L1-based search stops seeing it. It is found
without looking inside the model: for a random direction r over the logits, the
gradient of sum(logits * r) with respect to a conv kernel is zero in every entry of
output channel c exactly when no gradient reaches c on the whole batch: c never fires,
or everything downstream of it is dead (the gradient passes through ReLU only where it
fires; for a live path the random r makes an exact zero a measure-zero event). So a
channel counts as active when it fires *and* reaches the logits; the channels feeding
a dead layer count as dead too, as they are for training: they get no gradient either.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_prune.types import BatchStats, Params


def _conv_kernels(tree: Any) -> dict[str, Any]:
  """{'conv_0': kernel, 'stage1_block0/conv1': kernel, ...}: every 4-D 'kernel' leaf."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    names = [str(getattr(p, "key", getattr(p, "name", p))) for p in path]
    if names and names[-1] == "kernel" and jnp.ndim(leaf) == 4:
      out["/".join(names[:-1])] = leaf
  return out


def channel_activity(apply_fn: Callable) -> Callable[..., dict[str, float]]:
  """Builds `activity(params, batch_stats, x, key) -> {conv layer: fraction of its output
  channels active on x}` (active: fires and reaches the logits, module docstring;
  evaluation mode; jitted once per architecture).

  Args:
    apply_fn: `apply_fn(params, batch_stats, x, *, train) -> (logits, batch_stats)`.

  Returns:
    The function; `x` [B, ...] a batch of inputs, `key` draws the random direction.
    Layer names are the kernels' paths ('conv_0', 'stem/conv', ...).
  """

  @jax.jit
  def active_per_channel(params: Params, batch_stats: BatchStats, x: jax.Array, key: jax.Array):
    logits_shape = jax.eval_shape(lambda p: apply_fn(p, batch_stats, x, train=False)[0], params)
    direction = jax.random.normal(key, logits_shape.shape, logits_shape.dtype)

    def projected(p):
      return jnp.sum(apply_fn(p, batch_stats, x, train=False)[0] * direction)

    grads = _conv_kernels(jax.grad(projected)(params))
    return {name: jnp.any(g != 0, axis=(0, 1, 2)) for name, g in grads.items()}

  def activity(params: Params, batch_stats: BatchStats, x: jax.Array, key: jax.Array
               ) -> dict[str, float]:
    alive = jax.device_get(active_per_channel(params, batch_stats, x, key))
    return {name: float(np.mean(a)) for name, a in alive.items()}

  return activity


def activity_summary(activity: dict[str, float], params: Params) -> dict[str, float]:
  """Record fields of one `channel_activity` result on the model `params`:
  `active_channels` (the fraction of all its conv channels that fire) and
  `active_channels_min` (the least active layer's fraction; 0: a whole layer is dead)."""
  if not activity:
    return {}
  widths = {name: int(k.shape[-1]) for name, k in _conv_kernels(params).items()}
  total = sum(widths[name] for name in activity)
  return {"active_channels": sum(activity[n] * widths[n] for n in activity) / total,
          "active_channels_min": min(activity.values())}
