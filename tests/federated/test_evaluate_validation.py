"""Argument validation and empty inputs for make_evaluate / make_evaluate_clients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_prune import federated
from fedjax_prune.data import ClientData


def _linear(params, batch_stats, x, train=False, example_mask=None):
  return x @ params, batch_stats


PARAMS = jnp.eye(3)


@pytest.mark.parametrize("make", [federated.make_evaluate, federated.make_evaluate_clients])
@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "8", None, np.float32(4.0)])
def test_batch_size_must_be_positive_int(make, bad):
  with pytest.raises(ValueError, match=r"eval batch_size must be"):
    make(_linear, batch_size=bad)


@pytest.mark.parametrize("bad", [0, -3, 1.5, False])
def test_clients_per_chunk_must_be_positive_int(bad):
  with pytest.raises(ValueError, match=r"eval clients_per_chunk must be"):
    federated.make_evaluate_clients(_linear, clients_per_chunk=bad)


def test_numpy_integer_batch_size_accepted():
  x = jnp.eye(3)[jnp.array([0, 1, 2, 0, 1])]
  y = jnp.array([0, 1, 2, 0, 2])
  sums = federated.make_evaluate(_linear, batch_size=np.int64(2))(PARAMS, None, x, y)
  assert float(sums.num_examples) == 5 and float(sums.correct_sum) == 4
  ev = federated.make_evaluate_clients(_linear, batch_size=np.int32(2), clients_per_chunk=np.int64(1))
  data = ClientData(x.reshape(1, 5, 3), y.reshape(1, 5), jnp.array([5], jnp.int32))
  np.testing.assert_array_equal(ev(PARAMS, None, data).correct_sum, [4.0])


def test_empty_test_set_gives_zero_sums():
  evaluate = federated.make_evaluate(_linear, batch_size=4)
  x, y = jnp.zeros((0, 3)), jnp.zeros((0,), jnp.int32)
  for sums in (evaluate(PARAMS, None, x, y), jax.jit(evaluate)(PARAMS, None, x, y)):
    assert float(sums.num_examples) == 0 and float(sums.loss_sum) == 0
    assert sums.means()["accuracy"] == 0


def test_empty_clients_give_zero_sums():
  ev = federated.make_evaluate_clients(_linear, batch_size=4)
  no_rows = ClientData(jnp.zeros((2, 0, 3)), jnp.zeros((2, 0), jnp.int32), jnp.zeros(2, jnp.int32))
  np.testing.assert_array_equal(ev(PARAMS, None, no_rows).num_examples, [0.0, 0.0])
  no_clients = ClientData(jnp.zeros((0, 4, 3)), jnp.zeros((0, 4), jnp.int32), jnp.zeros(0, jnp.int32))
  assert ev(PARAMS, None, no_clients).num_examples.shape == (0,)
