"""Checks and numpy references shared by the tests."""
import types

import numpy as np

from experiments import build
from fedjax_prune import federated


def assert_counted_accuracy(accuracy: float, config) -> None:
  """`accuracy` is a count of correct predictions over the config's pooled test set: an exact
  multiple of 1 / N (a mean of padded per-batch means, a NaN or a made-up value is not)."""
  num_test = len(build.build_data(config).test_y)
  correct = accuracy * num_test
  assert num_test > 0 and abs(correct - round(correct)) < 1e-4, (accuracy, num_test)


def topk_half(x: np.ndarray, held: np.ndarray) -> np.ndarray:
  """`federated.Compression(topk_fraction=0.5)` of one leaf, in numpy.

  Keeps x on the round-half-up(m / 2) held coordinates of largest |x| (m = held.sum(); at
  least 1 when m > 0; ties to the lower flat index) and gives 0 elsewhere.

  Args:
    x: one client's leaf, any shape.
    held: bool, x's shape: the coordinates the client holds (sends from).

  Returns:
    float array of x's shape.
  """
  flat, h = np.abs(x).reshape(-1), held.reshape(-1)
  m = int(h.sum())
  k = min(max(int(np.floor(0.5 * m + 0.5)), 1), m) if m else 0
  order = np.lexsort((np.arange(flat.size), -np.where(h, flat, -np.inf)))
  keep = np.zeros(flat.size, bool)
  keep[order[:k]] = True
  return np.where(keep.reshape(x.shape), x, 0.0)


def assert_builds_stateful_aggregator(config, *, adaptive: bool, error_feedback: bool,
                                      num_clients: int = 5) -> None:
  """`config` validates, and the aggregator its method carries in its path holds the state
  the options ask for: under adaptive clipping a `ClipState` at config.privacy.clip_norm,
  with error feedback one zero residual row per client ([num_clients, 3] on a [3] leaf)."""
  build.validate(config)
  data = types.SimpleNamespace(train=types.SimpleNamespace(num_clients=num_clients),
                               num_classes=10)
  aggregator = build.in_path_aggregator(config, data)
  assert aggregator is not None, config.method
  state = aggregator.init({"w": np.zeros(3, np.float32)})
  assert isinstance(state, federated.CompressedState), type(state)
  if adaptive:
    assert isinstance(state.inner, federated.ClipState), state.inner
    np.testing.assert_allclose(state.inner.clip_norm, config.privacy.clip_norm)
  else:
    assert not isinstance(state.inner, federated.ClipState), state.inner
  if error_feedback:
    np.testing.assert_array_equal(state.residual["w"], np.zeros((num_clients, 3), np.float32))
  else:
    assert state.residual == (), state.residual


def overridden(c, **fields):
  """`c` (a ConfigDict) with each dotted `path=value` of `fields` set (types not checked:
  bad values are what the config tests pass)."""
  for path, value in fields.items():
    *parents, name = path.split(".")
    node = c
    for p in parents:
      node = node[p]
    with node.ignore_type():
      node[name] = value
  return c
