"""Tiny models, data and tree assertions for tests, doctests and notebooks."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_prune.data import ClientData, from_client_lists, to_device


def tiny_mlp(key: jax.Array, in_features: int = 6, hidden: int = 8, num_classes: int = 3):
  """A 2-layer MLP in the engine's apply convention (no BatchNorm).

  Returns:
    (apply_fn, params) with `apply_fn(params, batch_stats, x [B, in], *, train,
    example_mask=None) -> (logits [B, K], batch_stats)`.
  """
  k1, k2 = jax.random.split(key)
  params = {
      "dense_0": {"kernel": jax.random.normal(k1, (in_features, hidden)) / np.sqrt(in_features),
                  "bias": jnp.zeros((hidden,))},
      "dense_1": {"kernel": jax.random.normal(k2, (hidden, num_classes)) / np.sqrt(hidden),
                  "bias": jnp.zeros((num_classes,))},
  }

  def apply_fn(params, batch_stats, x, *, train, example_mask=None):
    del train, example_mask
    h = jax.nn.relu(x.reshape(x.shape[0], -1).astype(jnp.float32) @ params["dense_0"]["kernel"]
                    + params["dense_0"]["bias"][None, :])
    return h @ params["dense_1"]["kernel"] + params["dense_1"]["bias"][None, :], batch_stats

  return apply_fn, params


def tiny_client_data(seed: int = 0, num_clients: int = 3, in_features: int = 6, num_classes: int = 3,
                     sizes=(5, 9, 3)) -> ClientData:
  """A learnable toy federated dataset with unequal client sizes (device arrays)."""
  rng = np.random.default_rng(seed)
  sizes = list(sizes)[:num_clients] + [4] * max(0, num_clients - len(sizes))
  centers = rng.normal(size=(num_classes, in_features)) * 2
  xs, ys = [], []
  for n in sizes:
    y = rng.integers(0, num_classes, n)
    xs.append((centers[y] + rng.normal(size=(n, in_features))).astype(np.float32))
    ys.append(y.astype(np.int32))
  return to_device(from_client_lists(xs, ys))


def tiny_problem(key: jax.Array):
  """(apply_fn, params, data): tiny MLP and 3 clients with 5/9/3 examples."""
  apply_fn, params = tiny_mlp(key)
  return apply_fn, params, tiny_client_data()


def assert_trees_close(a, b, *, rtol: float = 1e-5, atol: float = 1e-6):
  """Asserts equal structure and leafwise closeness, naming the first bad leaf."""
  sa, sb = jax.tree.structure(a), jax.tree.structure(b)
  if sa != sb:
    raise AssertionError(f"tree structures differ:\n{sa}\n{sb}")
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    if x.shape != y.shape:
      raise AssertionError(f"{jax.tree_util.keystr(path)}: shapes {x.shape} vs {y.shape}")
    if not np.allclose(x, y, rtol=rtol, atol=atol):
      err = np.max(np.abs(x.astype(np.float64) - y))
      raise AssertionError(f"{jax.tree_util.keystr(path)}: max abs diff {err:.3g} (rtol={rtol}, atol={atol})")
